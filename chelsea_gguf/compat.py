"""Existing llama-cpp-python code on chelsea-gguf: ``llama_cpp`` on our patched llama.cpp, plus ``kv_cluster*``.

    import chelsea_gguf.compat        # first: points llama_cpp at this package's libllama
    import llama_cpp

    llm = llama_cpp.Llama("model.gguf", n_ctx=32768, kv_cluster=True, kv_cluster_ratio=0.2)

llama-cpp-python 0.3.36 vendors the same llama.cpp commit our patches apply to, so its ctypes bindings load
our ``libllama`` unchanged (installed without its own native build, see README). The keywords mean what they
mean on :class:`chelsea_gguf.Llama`: with clustering the context is allocated for about ``ratio * n_ctx``
cells while ``n_ctx()`` stays the logical context. ``kv_cluster=False`` (the default) leaves ``Llama``
exactly as stock.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import importlib
import logging
import os
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from chelsea_gguf import cluster, lookahead
from chelsea_gguf._lib import ffi, lib, library_dir, take_back_log
from chelsea_gguf.reread import Document, compress_reread

__all__ = ["LLAMA_CPP_PYTHON_VERSION", "CompatError", "install", "set_cluster_defaults", "kv_cluster_stats",
           "kv_cluster_compress", "llama_cpp_library"]

LLAMA_CPP_PYTHON_VERSION = "0.3.36"
INSTALL_COMMAND = ('CMAKE_ARGS="-DLLAMA_BUILD=OFF -DLLAVA_BUILD=OFF" '
                   f'pip install "llama-cpp-python[server]=={LLAMA_CPP_PYTHON_VERSION}"')

CLUSTER_KEYWORDS = ("kv_cluster", *cluster.KEYWORD_FIELDS)

_cluster_defaults: dict[str, Any] = {}


class CompatError(ImportError):
    """llama_cpp cannot run on chelsea-gguf's libraries in this process (and why)."""


def _libllama_name() -> str:
    return "libllama.dylib" if sys.platform == "darwin" else "libllama.so"


def _same_library(llama_cpp_lib: ctypes.CDLL) -> bool:
    """True if llama_cpp's ctypes handle is the libllama our cffi module is linked to (already loaded, so
    RTLD_NOLOAD hands back that very object)."""
    try:
        ours = ctypes.CDLL(str(library_dir() / _libllama_name()), mode=os.RTLD_NOLOAD | ctypes.RTLD_GLOBAL)
    except OSError:
        return False
    return ours._handle == llama_cpp_lib._handle


def _ctypes_library(module: ModuleType) -> ctypes.CDLL:
    """llama_cpp.llama_cpp's handle on the libllama it loaded (a private name of llama-cpp-python 0.3.36)."""
    return module._lib  # type: ignore[attr-defined,no-any-return]


def llama_cpp_library() -> Path:
    """The libllama file ``llama_cpp``'s bindings run on (after install(): this package's)."""
    return Path(_ctypes_library(sys.modules["llama_cpp.llama_cpp"])._name)


def _check_loaded(module: ModuleType) -> None:
    handle = _ctypes_library(module)
    if not _same_library(handle):
        raise CompatError(
            f"llama_cpp was already imported with its own libllama ({handle._name}); chelsea_gguf.compat must be "
            f"imported before llama_cpp, so that both use {library_dir() / _libllama_name()} "
            "(two llama.cpp builds in one process cannot share contexts)")


def install() -> ModuleType:
    """Import ``llama_cpp`` on chelsea-gguf's libraries and add the ``kv_cluster*`` keywords to
    ``llama_cpp.Llama``; returns the module. Safe to call more than once."""
    loaded = sys.modules.get("llama_cpp.llama_cpp")
    if loaded is not None:
        _check_loaded(loaded)
    else:
        ours = library_dir()
        given = os.environ.get("LLAMA_CPP_LIB_PATH")
        if given and Path(given).resolve() != ours.resolve():
            raise CompatError(f"LLAMA_CPP_LIB_PATH={given} points at another llama.cpp build; chelsea_gguf.compat "
                              f"loads llama_cpp on {ours} (unset the variable)")
        os.environ["LLAMA_CPP_LIB_PATH"] = str(ours)
        try:
            importlib.import_module("llama_cpp")
        except ModuleNotFoundError as e:
            if e.name != "llama_cpp":
                raise
            raise CompatError(f"llama-cpp-python is not installed; install it without its own llama.cpp build: "
                              f"{INSTALL_COMMAND}") from None
        _check_loaded(sys.modules["llama_cpp.llama_cpp"])
    llama_cpp = sys.modules["llama_cpp"]
    version = getattr(llama_cpp, "__version__", "?")
    if version != LLAMA_CPP_PYTHON_VERSION:
        raise CompatError(f"llama-cpp-python {version} is installed; chelsea-gguf is built against the llama.cpp of "
                          f"{LLAMA_CPP_PYTHON_VERSION} (its bindings mirror that commit): {INSTALL_COMMAND}")
    _patch_llama_class(llama_cpp.llama.Llama)
    # llama_cpp set its own log callback on import; ours keeps recent errors for chelsea_gguf's messages
    take_back_log(_log_like_llama_cpp)
    return llama_cpp


def _log_like_llama_cpp(level: int, message: str) -> None:
    """What llama_cpp's own callback does with a message (its verbose switch decides)."""
    from llama_cpp import _logger

    if _logger.logger.level <= _logger.GGML_LOG_LEVEL_TO_LOGGING_LEVEL.get(level, logging.DEBUG):
        print(message, end="", flush=True, file=sys.stderr)


def set_cluster_defaults(**keywords: Any) -> None:
    """Clustering keywords for every ``llama_cpp.Llama(...)`` that gives none of its own (chelsea-server uses
    this, since llama_cpp.server constructs the model itself). Validated now; no keywords: back to stock."""
    _cluster_options(keywords)  # TypeError for an unknown keyword
    _cluster_defaults.clear()
    _cluster_defaults.update(keywords)


def _cluster_options(keywords: dict[str, Any]) -> cluster.ClusterOptions | None:
    return cluster.options_for(keywords.get("kv_cluster", False),
                               {k: v for k, v in keywords.items() if k != "kv_cluster"})


def _model_facts(model_path: str) -> tuple[int, int]:
    """The model's trained context and sliding window (0: none), read without loading its weights."""
    params = lib.llama_model_default_params()
    # llama.cpp's memory-fit mode: hyper-parameters and metadata, no weights read (vocab_only leaves them 0)
    params.no_alloc = True
    params.load_mode = lib.LLAMA_LOAD_MODE_NONE
    model = lib.llama_model_load_from_file(str(model_path).encode(), params)
    if model == ffi.NULL:
        raise ValueError(f"failed to load model from {model_path}")
    try:
        return int(lib.llama_model_n_ctx_train(model)), int(lib.llama_model_n_swa(model))
    finally:
        lib.llama_model_free(model)


def _context_pointer(llm: Any) -> Any:
    return ffi.cast("struct llama_context *", ctypes.cast(llm.ctx, ctypes.c_void_p).value)


def kv_cluster_stats(llm: Any) -> dict[str, Any]:
    return cluster.kv_cluster_stats(_context_pointer(llm), getattr(llm, "kv_cluster_options", None))


kv_cluster_stats.__doc__ = f"Of a ``llama_cpp.Llama`` (also ``llm.kv_cluster_stats()``): " \
                           f"{cluster.kv_cluster_stats.__doc__}"


def kv_cluster_compress(llm: Any, reread: bool = False) -> int:
    """Of a ``llama_cpp.Llama`` (also ``llm.kv_cluster_compress()``): compress sequence 0 to its budget now, with
    ``reread=True`` ranking the merges by a re-read of its text (``chelsea_gguf.Llama.kv_cluster_compress``);
    returns the cells removed."""
    cluster.require_clustering(getattr(llm, "kv_cluster_options", None))
    ctx = _context_pointer(llm)
    if reread:
        doc = Document(ctx, [int(t) for t in llm.input_ids[:llm.n_tokens]], int(llm.token_bos()),
                       lambda text: list(llm.tokenize(text.encode(), add_bos=False, special=False)))
        return compress_reread(doc)
    return int(lib.chelsea_kv_cluster_compress(ctx, 0))


def _patch_llama_class(cls: type) -> None:
    if getattr(cls, "_chelsea_patched", False):
        return
    stock_init = cls.__init__
    stock_n_ctx = cls.n_ctx
    stock_getstate = cls.__getstate__
    stock_eval = cls.eval

    @functools.wraps(stock_init)
    def __init__(self: Any, model_path: str, *args: Any, **kwargs: Any) -> None:
        given = {k: kwargs.pop(k) for k in CLUSTER_KEYWORDS if k in kwargs}
        keywords = given if given else dict(_cluster_defaults)
        try:
            options = _cluster_options(keywords)
        except (TypeError, ValueError):
            self._stack = contextlib.ExitStack()  # what stock __del__ closes, as after its own early failures
            raise
        self.kv_cluster_options = options
        self._chelsea_keywords = keywords if options is not None else {}
        if options is None:
            stock_init(self, model_path, *args, **kwargs)
            return
        n_ctx_train, n_swa = _model_facts(model_path)
        logical = int(kwargs.get("n_ctx", 512)) or n_ctx_train
        n_batch = int(kwargs.get("n_batch", 512))
        n_ubatch = min(int(kwargs.get("n_ubatch", 512)), n_batch)
        # the context holds about ratio * n_ctx cells; positions (and llama_cpp's token buffers) span n_ctx
        kwargs["n_ctx"] = options.physical_cells(logical, min(n_batch, logical), n_swa, n_ubatch)
        stock_init(self, model_path, *args, **kwargs)
        self._chelsea_n_ctx = logical
        self._n_ctx = logical
        self.input_ids = np.zeros((logical,), dtype=np.intc)
        if self._logits_all:
            self.scores = np.zeros((logical, self._n_vocab), dtype=np.single)
        try:
            cluster.enable(_context_pointer(self), options)
        except ValueError:
            with contextlib.suppress(Exception):
                self.close()
            raise

    def n_ctx(self: Any) -> int:
        return getattr(self, "_chelsea_n_ctx", None) or stock_n_ctx(self)

    n_ctx.__doc__ = "Return the context window size (with kv_cluster: the logical context, more than the cells)."

    @functools.wraps(stock_eval)
    def eval(self: Any, tokens: Any) -> None:
        # as chelsea_gguf.Llama.eval: a prompt that must be merged while it is fed is read at its end first; not
        # with logits_all, whose prompt logits (logprobs) must not see what comes after them
        options = getattr(self, "kv_cluster_options", None)
        ctx = _context_pointer(self) if options is not None and not self._logits_all else None
        if ctx is not None:
            lib.llama_memory_seq_rm(lib.llama_get_memory(ctx), -1, self.n_tokens, -1)   # as stock eval does first
        tokens = list(tokens)
        base = self.n_tokens
        read = ctx is not None and lookahead.read_ahead(ctx, options, tokens, base, self.n_batch)
        try:
            if not read:
                stock_eval(self, tokens)
                return
            # a chunk at a time, so that the end can be read again before a chunk that must merge
            last_read = base
            for start in range(0, len(tokens), self.n_batch):
                chunk = tokens[start:start + self.n_batch]
                if start > 0 and lookahead.refresh(ctx, options, tokens, base, self.n_tokens, len(chunk), last_read):
                    last_read = self.n_tokens
                stock_eval(self, chunk)
        finally:
            if read:
                lookahead.drop(ctx)

    def __getstate__(self: Any) -> dict[str, Any]:
        state = stock_getstate(self)
        if getattr(self, "kv_cluster_options", None) is not None:
            state["n_ctx"] = self._chelsea_n_ctx
            state.update(self._chelsea_keywords)
        return state

    cls.__init__ = __init__
    cls.n_ctx = n_ctx
    cls.__getstate__ = __getstate__
    cls.eval = eval
    cls.kv_cluster_stats = kv_cluster_stats
    cls.kv_cluster_compress = kv_cluster_compress
    cls._chelsea_patched = True


install()
