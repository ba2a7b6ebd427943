"""Turning chat messages into a prompt string, the same way for fine-tuning and serving.

Models with a chat template (e.g. SmolLM2-Instruct) use their own, through transformers'
`apply_chat_template`. slm's own GPT models use this plain template, which fine-tuning teaches
and the server reproduces exactly:

    ### System:
    {system message}

    ### User:
    {user message}

    ### Assistant:
    {assistant message}<|endoftext|>

Sections appear in message order; the prompt for a reply ends with "### Assistant:\\n" and
generation stops at <|endoftext|>.
"""

from __future__ import annotations

import uuid

from slm.errors import SlmError

ROLES = {"system": "System", "user": "User", "assistant": "Assistant"}


def plain_chat_prompt(messages: list[dict], add_generation_prompt: bool = True) -> str:
    parts = []
    for m in messages:
        role = m.get("role")
        if role not in ROLES:
            raise SlmError(f"unknown chat role {role!r}; use one of {', '.join(ROLES)}")
        content = m.get("content")
        if not isinstance(content, str):
            raise SlmError(f"chat message content must be a string, got {type(content).__name__}")
        parts.append(f"### {ROLES[role]}:\n{content}\n\n")
    if add_generation_prompt:
        parts.append("### Assistant:\n")
    return "".join(parts)


def chat_prompt(tokenizer, messages: list[dict], add_generation_prompt: bool = True) -> str:
    """The prompt text for `messages`: the tokenizer's chat template, else the plain one."""
    if getattr(tokenizer, "has_chat_template", False):
        return tokenizer.hf.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=False)
    return plain_chat_prompt(messages, add_generation_prompt)


def chat_prompt_ids(tokenizer, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
    """Token ids of the chat prompt, with every message's content encoded as plain text.

    The template's own special tokens (e.g. `<|im_start|>`) are real; the same strings typed
    inside a message stay text, so untrusted content cannot forge turns or end-of-text. The
    template is rendered with a unique marker in place of each content; the text between
    markers is encoded with special tokens, each content with `encode_ordinary`.
    """
    if not getattr(tokenizer, "has_chat_template", False):
        return tokenizer.encode_ordinary(plain_chat_prompt(messages, add_generation_prompt))
    tag = uuid.uuid4().hex
    markers = [f"[[{tag}:{i}]]" for i in range(len(messages))]
    rendered = chat_prompt(tokenizer, [{**m, "content": k} for m, k in zip(messages, markers)], add_generation_prompt)
    ids, pos = [], 0
    for m, k in zip(messages, markers):
        at = rendered.find(k, pos)
        if at < 0:  # the template left this message out
            continue
        ids += tokenizer.encode(rendered[pos:at]) + tokenizer.encode_ordinary(m["content"])
        pos = at + len(k)
    return ids + tokenizer.encode(rendered[pos:])
