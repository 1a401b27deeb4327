"""The loaded native library: cffi ``ffi``/``lib``, one-time backend init, and log routing.

llama.cpp logs through one process-wide callback. Messages go to stderr only while some object asked
for verbose output; the most recent error lines are kept either way, so that a failed load can say why.
"""

from __future__ import annotations

import collections
import sys
import threading
from collections.abc import Callable
from pathlib import Path

from chelsea_gguf._chelsea_native import ffi, lib

__all__ = ["ffi", "lib", "library_dir", "set_verbose", "recent_errors", "clear_recent_errors", "take_back_log"]

_state_lock = threading.Lock()
_verbose_users = 0
_recent_errors: collections.deque[str] = collections.deque(maxlen=20)
_last_level = lib.GGML_LOG_LEVEL_INFO
_initialized = False
_forward: Callable[[int, str], None] | None = None  # another logger of the same library (llama_cpp's)


@ffi.def_extern()
def chelsea_log_callback(level: int, text: object, user_data: object) -> None:  # noqa: ARG001
    global _last_level
    raw_level = level
    if level == lib.GGML_LOG_LEVEL_CONT:
        level = _last_level
    _last_level = level
    message = ffi.string(text).decode("utf-8", errors="replace")
    if level == lib.GGML_LOG_LEVEL_ERROR:
        _recent_errors.append(message.strip())
    if _verbose_users > 0 and level != lib.GGML_LOG_LEVEL_DEBUG:
        sys.stderr.write(message)
    if _forward is not None:
        _forward(raw_level, message)


def _init() -> None:
    global _initialized
    with _state_lock:
        if _initialized:
            return
        lib.llama_log_set(lib.chelsea_log_callback, ffi.NULL)
        lib.llama_backend_init()
        _initialized = True


def set_verbose(on: bool) -> None:
    """Count one more (or one fewer) user who wants llama.cpp's log on stderr."""
    global _verbose_users
    with _state_lock:
        _verbose_users = max(0, _verbose_users + (1 if on else -1))


def take_back_log(forward: Callable[[int, str], None]) -> None:
    """Route llama.cpp's log through this module again after another binding (llama_cpp) set its own
    callback, handing it every message, so that both keep working."""
    global _forward
    _forward = forward
    lib.llama_log_set(lib.chelsea_log_callback, ffi.NULL)


def recent_errors() -> list[str]:
    return [m for m in _recent_errors if m]


def clear_recent_errors() -> None:
    _recent_errors.clear()


def library_dir() -> Path:
    """Folder holding libllama and the ggml libraries of this install."""
    from chelsea_gguf import _chelsea_native

    return Path(_chelsea_native.__file__).resolve().parent / "lib"


_init()
