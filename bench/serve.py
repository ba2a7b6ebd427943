"""`slm serve` under load: throughput and latency at 1, 4 and 16 concurrent clients.

One server process (`slm serve`, a random-init gpt2-shaped 124M model, fp32) and, in this
process, N client threads using the official openai client with streaming. Every level runs the
same fixed request mix: 32 requests cycling through 4 prompts (~10, ~40, ~80, ~160 tokens) and
max_tokens 16/32/48/32, greedy. Clients take the next request from a shared list until it is
empty, so 1 client runs them one by one and 16 clients run 16 at a time.

Measured per level: throughput (completion tokens over all clients / wall time), time to first
token (request sent -> first text chunk) p50/p95, and per-token latency (gap between successive
chunks of one stream) p50/p95. The server runs with --max-concurrency 16, so every client of a
level generates at once (no batching: each request has its own thread and KV cache), in two
configurations: the default (torch's threads divided among concurrent requests: 1 thread per
request here) and 2 threads per request (every request uses every core, oversubscribing them
as soon as two run at once).

Run: .venv/bin/python bench/serve.py [--requests 32] [--out bench/results/serve.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import openai
import torch

from slm.artifacts import save_model
from slm.config import preset
from slm.model import GPT

PROMPTS = [
    "The history of the city",
    "In the beginning of the twentieth century, the railways changed how people travelled, "
    "traded and thought about distance across the whole continent.",
    " ".join(["Water boils at one hundred degrees Celsius at sea level, but at higher altitudes"] * 5),
    " ".join(["A small language model can run on an ordinary laptop when its weights fit in memory"] * 9),
]
MAX_TOKENS = [16, 32, 48, 32]
LEVELS = [1, 4, 16]


def percentile(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))]


CONFIGS = {"default (1 thread/request)": [], "2 threads/request": ["--threads-per-request", "2"]}


def start_server(model_dir: Path, port: int, concurrency: int, extra: list[str]) -> subprocess.Popen:
    slm = Path(sys.executable).with_name("slm")
    proc = subprocess.Popen([str(slm), "serve", "--model", str(model_dir), "--port", str(port),
                             "--max-concurrency", str(concurrency), "--log-level", "warning", *extra],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0)
    for _ in range(600):
        try:
            client.models.list()
            return proc
        except openai.APIConnectionError:
            if proc.poll() is not None:
                raise SystemExit(f"slm serve exited: {proc.stderr.read()[-2000:]}")
            time.sleep(0.2)
    raise SystemExit("slm serve did not come up in 120 s")


def one_request(client, model: str, i: int) -> dict:
    t0 = time.perf_counter()
    stamps, tokens = [], 0
    stream = client.completions.create(model=model, prompt=PROMPTS[i % 4], max_tokens=MAX_TOKENS[i % 4],
                                       temperature=0, stream=True, stream_options={"include_usage": True})
    for chunk in stream:
        if chunk.choices and chunk.choices[0].text:
            stamps.append(time.perf_counter())
        if chunk.usage:
            tokens = chunk.usage.completion_tokens
    return {"ttft": stamps[0] - t0 if stamps else None, "gaps": [b - a for a, b in zip(stamps, stamps[1:])],
            "tokens": tokens}


def run_level(port: int, model: str, clients: int, n_requests: int) -> dict:
    todo = list(range(n_requests))
    lock = threading.Lock()
    results: list[dict] = []

    def client_loop():
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=600)
        while True:
            with lock:
                if not todo:
                    return
                i = todo.pop(0)
            r = one_request(client, model, i)
            with lock:
                results.append(r)

    t = time.perf_counter()
    threads = [threading.Thread(target=client_loop) for _ in range(clients)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    wall = time.perf_counter() - t
    tokens = sum(r["tokens"] for r in results)
    ttft = [r["ttft"] for r in results if r["ttft"] is not None]
    gaps = [g for r in results for g in r["gaps"]]
    return {"clients": clients, "requests": len(results), "completion_tokens": tokens, "wall_s": round(wall, 2),
            "throughput_tok_s": round(tokens / wall, 2),
            "ttft_p50_s": round(percentile(ttft, 50), 3), "ttft_p95_s": round(percentile(ttft, 95), 3),
            "per_token_p50_ms": round(1000 * percentile(gaps, 50), 1),
            "per_token_p95_ms": round(1000 * percentile(gaps, 95), 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=32, help="requests per level (the fixed mix)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "serve.json"))
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        model_dir = save_model(Path(tmp) / "gpt2-random", GPT(preset("gpt2")))
        rows = []
        for config, extra in CONFIGS.items():
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            proc = start_server(model_dir, port, max(LEVELS), extra)
            try:
                model = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none").models.list().data[0].id
                run_level(port, model, 1, 2)  # warm-up
                for clients in LEVELS:
                    rows.append({"config": config, **run_level(port, model, clients, args.requests)})
                    r = rows[-1]
                    print(f"{config:<26}{clients:>3} clients: {r['throughput_tok_s']:6.1f} tok/s, TTFT p50 "
                          f"{r['ttft_p50_s']:.2f} s p95 {r['ttft_p95_s']:.2f} s, per token p50 "
                          f"{r['per_token_p50_ms']:.0f} ms p95 {r['per_token_p95_ms']:.0f} ms", flush=True)
            finally:
                proc.terminate()
                proc.wait(30)
    scaling = {}
    for config in CONFIGS:
        mine = [r for r in rows if r["config"] == config]
        scaling[config] = {f"{r['clients']}_over_1": round(r["throughput_tok_s"] / mine[0]["throughput_tok_s"], 2)
                           for r in mine[1:]}
    result = {
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "torch_threads": torch.get_num_threads(), "load_avg_1m_at_end": os.getloadavg()[0]},
        "setup": {"model": "gpt2 (124M) random init, fp32", "server": "slm serve --max-concurrency 16",
                  "requests_per_level": args.requests, "prompt_chars": [len(p) for p in PROMPTS],
                  "max_tokens": MAX_TOKENS, "greedy": True, "stream": True},
        "rows": rows,
        "throughput_scaling": scaling,
    }
    for config, sc in scaling.items():
        print(f"{config}: throughput scaling", ", ".join(f"{k} {v}x" for k, v in sc.items()))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
