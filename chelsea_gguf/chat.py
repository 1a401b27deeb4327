"""Chat prompts through llama.cpp's built-in template engine (``llama_chat_apply_template``)."""

from __future__ import annotations

from typing import Any

from chelsea_gguf._lib import ffi, lib

ROLES = {"system", "user", "assistant", "tool", "developer"}
FALLBACK_TEMPLATE = "chatml"
# models whose GGUF carries no template get their family's built-in one
TEMPLATE_BY_ARCH = {"gemma": "gemma", "gemma2": "gemma", "gemma3": "gemma", "gemma3n": "gemma"}


def _architecture(model: object) -> str:
    buf = ffi.new("char[]", 64)
    n = lib.llama_model_meta_val_str(model, b"general.architecture", buf, 64)
    return ffi.string(buf).decode() if n >= 0 else ""


def message_text(message: dict[str, Any], index: int) -> str:
    """The text of an OpenAI-style message: a string, None, or a list of ``{"type": "text"}`` parts."""
    content = message.get("content")
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str):
                parts.append(part["text"])
            else:
                raise ValueError(f"messages[{index}].content: only text parts are supported, got {part!r}")
        return "".join(parts)
    raise ValueError(f"messages[{index}].content: expected a string or a list of text parts, got {content!r}")


def format_chat_prompt(model: object, messages: list[dict[str, Any]], chat_format: str | None = None) -> str:
    """Render messages with the model's template, or with ``chat_format`` (a llama.cpp template name
    such as ``chatml``, ``llama3``, ``gemma``); the prompt ends ready for the assistant's reply."""
    if not isinstance(messages, list) or not messages:
        raise ValueError("messages: expected a non-empty list of {'role': ..., 'content': ...} dicts")
    roles, texts = [], []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise ValueError(f"messages[{i}]: expected a dict with a role in {sorted(ROLES)}, got {m!r}")
        roles.append(ffi.new("char[]", m["role"].encode()))
        texts.append(ffi.new("char[]", message_text(m, i).encode("utf-8")))
    chat = ffi.new("struct llama_chat_message[]", len(messages))
    for i in range(len(messages)):
        chat[i].role = roles[i]
        chat[i].content = texts[i]

    if chat_format is not None:
        template = chat_format.encode()
    else:
        builtin = lib.llama_model_chat_template(model, ffi.NULL)
        if builtin != ffi.NULL:
            template = ffi.string(builtin)
        else:
            template = TEMPLATE_BY_ARCH.get(_architecture(model), FALLBACK_TEMPLATE).encode()
    size = 2 * sum(len(ffi.string(t)) for t in texts) + 1024
    buf = ffi.new("char[]", size)
    n = lib.llama_chat_apply_template(template, chat, len(messages), True, buf, size)
    if n > size:
        size = n + 1
        buf = ffi.new("char[]", size)
        n = lib.llama_chat_apply_template(template, chat, len(messages), True, buf, size)
    if n < 0:
        what = f"chat_format={chat_format!r}" if chat_format else "the model's chat template"
        raise ValueError(f"{what} is not supported by llama.cpp's template engine; pass chat_format "
                         "with a built-in name such as 'chatml', 'llama3' or 'gemma'")
    return ffi.unpack(buf, n).decode("utf-8", errors="replace")
