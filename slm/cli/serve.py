"""The `serve` command: an OpenAI-compatible HTTP API over any model slm can load."""

from __future__ import annotations

import ipaddress
import os
import sys

from slm.cli.options import add_dataclass_args, add_device, add_model, from_args


def register(sub) -> None:
    from slm.serve.config import ServeConfig

    p = sub.add_parser("serve", help="serve a model over an OpenAI-compatible HTTP API")
    add_model(p)
    add_dataclass_args(p, ServeConfig)
    add_device(p)
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"],
                   help="server log level (default: info)")
    p.set_defaults(func=cmd_serve)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def cmd_serve(args) -> int:
    from slm.loading import open_model
    from slm.runtime import resolve_device
    from slm.serve.app import run
    from slm.serve.config import ServeConfig

    base = {"api_key": os.environ["SLM_API_KEY"]} if os.environ.get("SLM_API_KEY") else {}
    cfg = from_args(ServeConfig, args, base)
    if not _is_loopback(cfg.host) and not cfg.api_key:
        print(f"warning: serving on {cfg.host} without --api-key: anyone who can reach this port can use the model",
              file=sys.stderr)
    loaded = open_model(args.model, device=resolve_device(args.device))
    print(f"serving {loaded.name} ({loaded.kind}, context {loaded.model.config.block_size}) on "
          f"http://{cfg.host}:{cfg.port}/v1; Ctrl-C stops", file=sys.stderr)
    run(loaded, cfg, args.log_level)
    return 0
