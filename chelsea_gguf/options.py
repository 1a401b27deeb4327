"""Parsing and validation of user-facing options, shared by ``Llama`` and ``chelsea-run``.

Every error names the option and the offending value, so a user can fix a call without reading code.
"""

from __future__ import annotations

import re
from typing import Any

from chelsea_gguf._lib import lib

# Cache types llama.cpp accepts for K/V (the -ctk/-ctv names of llama.cpp's tools).
KV_CACHE_TYPES: dict[str, int] = {
    "f32": lib.GGML_TYPE_F32,
    "f16": lib.GGML_TYPE_F16,
    "bf16": lib.GGML_TYPE_BF16,
    "q8_0": lib.GGML_TYPE_Q8_0,
    "q4_0": lib.GGML_TYPE_Q4_0,
    "q4_1": lib.GGML_TYPE_Q4_1,
    "iq4_nl": lib.GGML_TYPE_IQ4_NL,
    "q5_0": lib.GGML_TYPE_Q5_0,
    "q5_1": lib.GGML_TYPE_Q5_1,
}
KV_TYPE_NAMES: dict[int, str] = {v: k for k, v in KV_CACHE_TYPES.items()}

FLASH_ATTN_MODES: dict[str, int] = {
    "auto": lib.LLAMA_FLASH_ATTN_TYPE_AUTO,
    "on": lib.LLAMA_FLASH_ATTN_TYPE_ENABLED,
    "off": lib.LLAMA_FLASH_ATTN_TYPE_DISABLED,
}

_CTX_RE = re.compile(r"^\s*(\d+)\s*([kKmM]?)\s*$")

# the largest context llama.cpp can index with int32 positions and cell counts
MAX_CONTEXT = 1 << 24


def parse_context_size(value: str | int, option: str = "--ctx") -> int:
    """``8192``, ``8k`` or ``64K`` -> tokens (k = 1024). ``0`` means: the model's training context."""
    if isinstance(value, bool):
        raise ValueError(f"{option}: expected a token count such as 4096 or 64k, got {value!r}")
    if isinstance(value, int):
        n = value
    else:
        m = _CTX_RE.match(str(value))
        if not m:
            raise ValueError(f"{option}: cannot parse {value!r}; expected a token count such as 4096, 8k or 64k")
        n = int(m.group(1)) * {"": 1, "k": 1024, "m": 1024 * 1024}[m.group(2).lower()]
    if n < 0 or n > MAX_CONTEXT:
        raise ValueError(f"{option}: {value!r} is out of range (0 .. {MAX_CONTEXT} tokens)")
    return n


def parse_kv_type(value: str | int | None, option: str) -> int | None:
    """A K/V cache type as a name (``q8_0``) or a ggml type number; None keeps llama.cpp's default (f16)."""
    if value is None:
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        if value in KV_TYPE_NAMES:
            return value
        raise ValueError(f"{option}: ggml type {value} is not a supported KV cache type "
                         f"(supported: {', '.join(KV_CACHE_TYPES)})")
    name = str(value).strip().lower()
    if name in KV_CACHE_TYPES:
        return KV_CACHE_TYPES[name]
    raise ValueError(f"{option}: unknown KV cache type {value!r} (supported: {', '.join(KV_CACHE_TYPES)})")


def parse_flash_attn(value: bool | str | None, option: str = "flash_attn") -> int:
    if value is None:
        return lib.LLAMA_FLASH_ATTN_TYPE_DISABLED
    if isinstance(value, bool):
        return lib.LLAMA_FLASH_ATTN_TYPE_ENABLED if value else lib.LLAMA_FLASH_ATTN_TYPE_DISABLED
    name = str(value).strip().lower()
    if name in FLASH_ATTN_MODES:
        return FLASH_ATTN_MODES[name]
    raise ValueError(f"{option}: expected on, off or auto (or a bool), got {value!r}")


def require_int(option: str, value: Any, minimum: int, maximum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{option}: expected an integer, got {value!r}")
    if value < minimum or (maximum is not None and value > maximum):
        bound = f">= {minimum}" if maximum is None else f"in {minimum} .. {maximum}"
        raise ValueError(f"{option}: {value} is out of range (must be {bound})")
    return value


def require_float(option: str, value: Any, minimum: float | None = None, maximum: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{option}: expected a number, got {value!r}")
    v = float(value)
    if v != v or (minimum is not None and v < minimum) or (maximum is not None and v > maximum):
        lo = "-inf" if minimum is None else minimum
        hi = "inf" if maximum is None else maximum
        raise ValueError(f"{option}: {value} is out of range ({lo} .. {hi})")
    return v


def parse_tensor_split(value: Any, option: str = "tensor_split") -> list[float]:
    """Shares of the offloaded layers per device, ``[3, 1]`` or ``"3,1"`` (llama.cpp's ``--tensor-split``)."""
    items = value.split(",") if isinstance(value, str) else value
    try:
        shares = [float(v) for v in items]
    except (TypeError, ValueError):
        raise ValueError(f"{option}: expected shares per device such as 3,1, got {value!r}") from None
    if not shares or any(not (s >= 0.0) or s == float("inf") for s in shares) or sum(shares) <= 0.0:
        raise ValueError(f"{option}: expected non-negative shares per device, not all 0, got {value!r}")
    return shares
