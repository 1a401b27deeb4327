"""``Llama``: a high-level model + context, following llama-cpp-python's API where the two overlap."""

from __future__ import annotations

import dataclasses
import os
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

from chelsea_gguf import _lib
from chelsea_gguf._lib import ffi, lib
from chelsea_gguf import cluster, lookahead, rpc
from chelsea_gguf.chat import format_chat_prompt
from chelsea_gguf.kv import KVStats, read_kv_stats
from chelsea_gguf.kv_memory import KVLayout, KVMemoryPlan, measure_kv_layout, parse_memory_size, plan_for_budget
from chelsea_gguf.models import resolve_model
from chelsea_gguf.options import parse_context_size, parse_flash_attn, parse_kv_type, parse_tensor_split, \
    require_float, require_int
from chelsea_gguf.reread import Document, compress_reread
from chelsea_gguf.sampling import DEFAULT_SEED, Sampler, SamplingParams
from chelsea_gguf.text import StopScanner

GGUF_MAGIC = b"GGUF"
# the llama_model_params fields the bindings declare (_ffi_build.py), which model_params may set
_MODEL_PARAM_FIELDS = frozenset(name for name, _ in ffi.typeof("struct llama_model_params").fields)

PromptType = Union[str, bytes, Sequence[int]]


@dataclass
class Timings:
    """Token counts and wall time of the last completion, split the way llama.cpp reports them."""

    prompt_tokens: int = 0      # tokens actually evaluated for the prompt (after prefix reuse)
    prompt_ms: float = 0.0
    generated_tokens: int = 0   # tokens decoded after the prompt
    generation_ms: float = 0.0
    stop_reason: str = ""       # "eog", "max_tokens" or "context_full" once generation ended

    @property
    def prompt_tok_per_s(self) -> float:
        return self.prompt_tokens / (self.prompt_ms / 1000.0) if self.prompt_ms > 0 else 0.0

    @property
    def generation_tok_per_s(self) -> float:
        return self.generated_tokens / (self.generation_ms / 1000.0) if self.generation_ms > 0 else 0.0


@dataclass(frozen=True)
class LlamaState:
    """A saved context: the tokens it held and llama.cpp's serialized state."""

    tokens: list[int]
    data: bytes


def default_thread_count() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def check_model_file(path: Path) -> None:
    """Fail early, and with the path in the message, on what llama.cpp would only log."""
    if not path.exists():
        raise FileNotFoundError(f"model file not found: {path}")
    if path.is_dir():
        raise ValueError(f"model path is a directory, not a GGUF file: {path}")
    with path.open("rb") as f:
        magic = f.read(4)
    if magic != GGUF_MAGIC:
        raise ValueError(f"not a GGUF file (bad magic {magic!r}): {path}")


class Llama:
    """A GGUF model with one llama.cpp context.

    Keyword names and defaults follow ``llama_cpp.Llama``. ``model_path=None`` uses the default model
    (SmolLM2-135M-Instruct Q4_1); a known model name such as ``"gemma3-270m"`` fetches that model.

    ``kv_cluster=True`` clusters the KV cache online; the ``kv_cluster_<field>`` keywords set the fields of
    :class:`chelsea_gguf.cluster.ClusterOptions` (None or absent: the C library's default).
    ``kv_cluster_memory="2G"`` (bytes, or a size such as ``512M``) turns clustering on with the largest ratio whose
    KV allocation (K, V and cluster sizes, at the given K/V types, measured) fits the budget for ``n_ctx`` tokens;
    if the full cache fits, it is used unclustered.
    ``progress(done, total)`` is called before (done 0) and after each batch of a prompt. ``model_params`` sets
    fields of llama.cpp's ``llama_model_params`` before the model loads, for tools (e.g. ``{"use_extra_bufts":
    False}``: no CPU repack copy of the weights; ``{"no_alloc": True, "load_mode": 0}``: llama.cpp's memory-fit
    mode, which sizes buffers without allocating them; such a model cannot decode).
    ``rpc_servers="host:port,host:port"`` puts the offloaded layers (``n_gpu_layers``, split by ``tensor_split``) and
    their KV cache on ``chelsea-rpc-server`` workers, which also run the compressions of the layers they hold.
    """

    def __init__(
        self,
        model_path: str | os.PathLike[str] | None = None,
        *,
        n_gpu_layers: int = 0,
        tensor_split: Sequence[float] | str | None = None,
        rpc_servers: str | Sequence[str] | None = None,
        seed: int = DEFAULT_SEED,
        n_ctx: int | str = 512,
        n_batch: int = 512,
        n_ubatch: int = 512,
        n_threads: int | None = None,
        n_threads_batch: int | None = None,
        flash_attn: bool | str = False,
        swa_full: bool | None = None,
        rope_freq_base: float = 0.0,
        rope_freq_scale: float = 0.0,
        type_k: int | str | None = None,
        type_v: int | str | None = None,
        chat_format: str | None = None,
        verbose: bool = True,
        kv_cluster: bool | None = None,
        kv_cluster_memory: int | str | None = None,
        progress: Callable[[int, int], None] | None = None,
        model_params: Mapping[str, Any] | None = None,
        **kv_cluster_options: Any,
    ) -> None:
        self._model = ffi.NULL
        self._ctx = ffi.NULL
        self._batch = None
        self._verbose = False

        n_ctx_value = parse_context_size(n_ctx, "n_ctx")
        require_int("n_batch", n_batch, 1)
        require_int("n_ubatch", n_ubatch, 1)
        require_int("n_gpu_layers", n_gpu_layers, -1)
        split = None if tensor_split is None else parse_tensor_split(tensor_split)
        if split is not None and len(split) > lib.llama_max_devices():
            raise ValueError(f"tensor_split: {len(split)} shares, more than the {lib.llama_max_devices()} devices "
                             "llama.cpp can split over")
        endpoints = None if rpc_servers is None else rpc.parse_rpc_servers(rpc_servers)
        require_int("seed", seed, 0, 0xFFFFFFFF)
        threads = default_thread_count() if n_threads is None else require_int("n_threads", n_threads, 1, 1024)
        threads_batch = threads if n_threads_batch is None else require_int("n_threads_batch", n_threads_batch, 1, 1024)
        flash_attn_type = parse_flash_attn(flash_attn)
        kv_type_k = parse_kv_type(type_k, "type_k")
        require_float("rope_freq_base", rope_freq_base, 0.0)    # 0: the model's own
        require_float("rope_freq_scale", rope_freq_scale, 0.0)
        if swa_full is not None and not isinstance(swa_full, bool):
            raise ValueError(f"swa_full: expected a bool, got {swa_full!r}")
        kv_type_v = parse_kv_type(type_v, "type_v")
        if kv_cluster is not None and not isinstance(kv_cluster, bool):
            raise ValueError(f"kv_cluster: expected a bool, got {kv_cluster!r}")
        budget = None if kv_cluster_memory is None else parse_memory_size(kv_cluster_memory, "kv_cluster_memory")
        if budget is not None and kv_cluster is False:
            raise ValueError("kv_cluster_memory: a KV memory budget needs clustering, but kv_cluster=False")
        if budget is not None and kv_cluster_options.get("kv_cluster_ratio") is not None:
            raise ValueError("kv_cluster_memory and kv_cluster_ratio both set the ratio: give one of them")
        cluster_options = cluster.options_for(bool(kv_cluster) or budget is not None, kv_cluster_options)
        if progress is not None and not callable(progress):
            raise ValueError(f"progress: expected a callable(done, total), got {progress!r}")
        self._progress = progress
        if chat_format is not None and not isinstance(chat_format, str):
            raise ValueError(f"chat_format: expected a template name such as 'chatml', got {chat_format!r}")

        path = resolve_model(model_path)
        check_model_file(path)
        self.model_path = str(path)
        self.seed = seed
        self.chat_format = chat_format
        self.verbose = bool(verbose)
        if self.verbose:
            _lib.set_verbose(True)
            self._verbose = True

        mparams = lib.llama_model_default_params()
        mparams.n_gpu_layers = n_gpu_layers
        # llama.cpp reads both arrays while loading: they live as long as this object
        self._devices = self._tensor_split = None
        if endpoints is not None:
            try:
                self._devices = rpc.model_devices(endpoints)
            except ValueError:
                self.close()
                raise
            mparams.devices = self._devices
        if split is not None:
            self._tensor_split = ffi.new("float[]", split + [0.0]*(lib.llama_max_devices() - len(split)))
            mparams.tensor_split = self._tensor_split
        for name, value in (model_params or {}).items():
            if name not in _MODEL_PARAM_FIELDS:
                raise ValueError(f"model_params: {name!r} is not a llama_model_params field these bindings set "
                                 f"(known: {', '.join(sorted(_MODEL_PARAM_FIELDS))})")
            setattr(mparams, name, value)
        _lib.clear_recent_errors()
        self._model = lib.llama_model_load_from_file(str(path).encode(), mparams)
        if self._model == ffi.NULL:
            reason = "; ".join(_lib.recent_errors()[-3:]) or "llama.cpp could not load it"
            raise ValueError(f"failed to load model from {path}: {reason}")
        self._vocab = lib.llama_model_get_vocab(self._model)
        self._n_vocab = lib.llama_vocab_n_tokens(self._vocab)

        self._cparams = ffi.new("struct llama_context_params *", lib.llama_context_default_params())
        cparams = self._cparams[0]
        if n_ctx_value == 0:
            n_ctx_value = lib.llama_model_n_ctx_train(self._model)
        cparams.n_batch = n_batch
        cparams.n_ubatch = min(n_ubatch, n_batch)
        cparams.n_threads = threads
        cparams.n_threads_batch = threads_batch
        cparams.rope_freq_base = rope_freq_base
        cparams.rope_freq_scale = rope_freq_scale
        cparams.flash_attn_type = flash_attn_type
        if swa_full is not None:
            cparams.swa_full = swa_full
        if kv_type_k is not None:
            cparams.type_k = kv_type_k
        if kv_type_v is not None:
            cparams.type_v = kv_type_v
        # with clustering, the logical context (positions) outgrows the physical cells: the cache is
        # compressed between decodes, so it is allocated for about ratio * n_ctx cells
        self._n_ctx_logical = n_ctx_value
        self._kv_layout: KVLayout | None = None
        self.kv_memory_plan: KVMemoryPlan | None = None
        n_swa = int(lib.llama_model_n_swa(self._model))
        window_cells = cluster.window_cells(n_ctx_value, n_swa, int(cparams.n_ubatch))
        if budget is not None and cluster_options is not None:
            try:
                self.kv_memory_plan = plan_for_budget(self.kv_layout(), budget, n_ctx_value, n_batch, cluster_options,
                                                      min_cells=window_cells)
            except ValueError:
                self.close()
                raise
            # a budget the full cache fits gets the full cache: exact, and without the cluster sizes
            cluster_options = None if self.kv_memory_plan.ratio == 1.0 else \
                dataclasses.replace(cluster_options, ratio=self.kv_memory_plan.ratio)
        self.kv_cluster_options = cluster_options
        n_cells = n_ctx_value
        if self.kv_cluster_options is not None:
            n_cells = self.kv_cluster_options.physical_cells(n_ctx_value, min(n_batch, n_ctx_value), n_swa,
                                                             int(cparams.n_ubatch))
        cparams.n_ctx = n_cells
        cparams.n_batch = min(n_batch, n_cells)
        cparams.n_ubatch = min(n_ubatch, cparams.n_batch)
        _lib.clear_recent_errors()
        self._ctx = lib.llama_init_from_model(self._model, cparams)
        if self._ctx == ffi.NULL:
            reason = "; ".join(_lib.recent_errors()[-3:]) or "llama.cpp could not create it"
            self.close()
            raise ValueError(f"failed to create a context (n_ctx={n_ctx_value}, type_k={type_k}, "
                             f"type_v={type_v}, flash_attn={flash_attn}): {reason}")
        if self.kv_cluster_options is not None:
            try:
                cluster.enable(self._ctx, self.kv_cluster_options)
            except ValueError:
                self.close()
                raise
        else:
            self._n_ctx_logical = int(lib.llama_n_ctx(self._ctx))
        if self.kv_memory_plan is not None and self.kv_stats().buffer_bytes > budget:
            allocated = self.kv_stats().buffer_bytes
            self.close()
            raise ValueError(f"kv_cluster_memory: llama.cpp allocated {allocated} bytes of KV cache, over the "
                             f"budget of {budget} (planned {self.kv_memory_plan.kv_bytes}): please report this")
        self.n_batch = int(lib.llama_n_batch(self._ctx))
        self._batch = lib.llama_batch_init(self.n_batch, 0, 1)
        self._tokens: list[int] = []
        self.last_timings = Timings()

    # ------------------------------------------------------------------ lifetime

    def close(self) -> None:
        """Free the context and the model. Safe to call more than once."""
        if not hasattr(self, "_model"):  # __init__ never ran (bad arguments)
            return
        if self._batch is not None:
            lib.llama_batch_free(self._batch)
            self._batch = None
        if self._ctx != ffi.NULL:
            lib.llama_free(self._ctx)
            self._ctx = ffi.NULL
        if self._model != ffi.NULL:
            lib.llama_model_free(self._model)
            self._model = ffi.NULL
        if self._verbose:
            _lib.set_verbose(False)
            self._verbose = False

    def __enter__(self) -> "Llama":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        self.close()

    def _require_open(self) -> None:
        if self._ctx == ffi.NULL:
            raise RuntimeError("this Llama has been closed")

    # ------------------------------------------------------------------ model facts

    def n_ctx(self) -> int:
        """The logical context: how many tokens a sequence may hold (with clustering, more than cells)."""
        self._require_open()
        return self._n_ctx_logical

    def n_cells(self) -> int:
        """Physical KV cells allocated per sequence stream."""
        self._require_open()
        return int(lib.llama_n_ctx(self._ctx))

    def kv_layout(self) -> KVLayout:
        """The KV allocation of this model and these settings as a function of the cells (measured once with two
        probe contexts): what a full cache of any length would take."""
        if self._kv_layout is None:
            self._kv_layout = measure_kv_layout(self._model, self._cparams[0])
        return self._kv_layout

    def n_vocab(self) -> int:
        return int(self._n_vocab)

    def n_ctx_train(self) -> int:
        self._require_open()
        return int(lib.llama_model_n_ctx_train(self._model))

    def token_bos(self) -> int:
        return int(lib.llama_vocab_bos(self._vocab))

    def token_eos(self) -> int:
        return int(lib.llama_vocab_eos(self._vocab))

    def metadata(self, key: str) -> str | None:
        self._require_open()
        buf = ffi.new("char[]", 4096)
        n = lib.llama_model_meta_val_str(self._model, key.encode(), buf, 4096)
        return None if n < 0 else ffi.string(buf).decode("utf-8", errors="replace")

    def model_description(self) -> str:
        self._require_open()
        buf = ffi.new("char[]", 256)
        lib.llama_model_desc(self._model, buf, 256)
        return ffi.string(buf).decode("utf-8", errors="replace")

    @property
    def n_tokens(self) -> int:
        """Tokens of sequence 0 currently in the context."""
        return len(self._tokens)

    @property
    def ctx(self) -> Any:
        """The ``struct llama_context *`` (cffi), for calls into the C API (llama_cpp.Llama.ctx's name)."""
        self._require_open()
        return self._ctx

    @property
    def model(self) -> Any:
        """The ``struct llama_model *`` (cffi), for calls into the C API (llama_cpp.Llama.model's name)."""
        self._require_open()
        return self._model

    @property
    def input_ids(self) -> tuple[int, ...]:
        """The tokens of sequence 0 evaluated in the context, in order (llama_cpp.Llama.input_ids' name; here only
        the tokens held, read-only)."""
        return tuple(self._tokens)

    # ------------------------------------------------------------------ tokens

    def tokenize(self, text: bytes | str, add_bos: bool = True, special: bool = False) -> list[int]:
        """Text -> tokens. ``add_bos`` adds the model's BOS (if it uses one); ``special`` parses
        special tokens such as ``<|im_start|>`` instead of treating them as text."""
        self._require_open()
        data = text.encode("utf-8") if isinstance(text, str) else bytes(text)
        n_max = len(data) + 8
        buf = ffi.new("llama_token[]", n_max)
        n = lib.llama_tokenize(self._vocab, data, len(data), buf, n_max, add_bos, special)
        if n < 0:
            n_max = -n
            buf = ffi.new("llama_token[]", n_max)
            n = lib.llama_tokenize(self._vocab, data, len(data), buf, n_max, add_bos, special)
        if n < 0:
            raise ValueError(f"tokenization failed for a text of {len(data)} bytes")
        return list(buf[0:n])

    def detokenize(self, tokens: Sequence[int], prev_tokens: Sequence[int] | None = None,
                   special: bool = False) -> bytes:
        """Tokens -> UTF-8 bytes (``prev_tokens`` is accepted for llama-cpp-python compatibility)."""
        self._require_open()
        return b"".join(self._token_piece(t, special) for t in tokens)

    def _token_piece(self, token: int, special: bool = False) -> bytes:
        buf = ffi.new("char[]", 64)
        n = lib.llama_token_to_piece(self._vocab, token, buf, 64, 0, special)
        if n < 0:
            buf = ffi.new("char[]", -n)
            n = lib.llama_token_to_piece(self._vocab, token, buf, -n, 0, special)
        return ffi.unpack(buf, n) if n > 0 else b""

    # ------------------------------------------------------------------ evaluation

    def reset(self) -> None:
        """Forget every token of the context."""
        self._require_open()
        lib.llama_memory_clear(lib.llama_get_memory(self._ctx), True)
        self._tokens = []

    def _check_token_ids(self, tokens: Sequence[int]) -> None:
        for t in tokens:
            if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < self._n_vocab:
                raise ValueError(f"prompt: token id {t!r} is out of range (0 .. {self._n_vocab - 1})")

    def _reuse_prefix(self, tokens: Sequence[int]) -> int:
        """Keep the cached tokens shared with the new prompt; return how many are kept."""
        common = 0
        for a, b in zip(self._tokens, tokens):
            if a != b:
                break
            common += 1
        # the last prompt token is always evaluated again: its logits start the generation
        common = min(common, len(tokens) - 1)
        if common < len(self._tokens):
            if not lib.llama_memory_seq_rm(lib.llama_get_memory(self._ctx), 0, common, -1):
                self.reset()
                return 0
            del self._tokens[common:]
        return common

    def eval(self, tokens: Sequence[int]) -> None:
        """Append tokens to sequence 0, ``n_batch`` at a time; logits are kept for the last one."""
        self._require_open()
        n_ctx = self.n_ctx()
        if len(self._tokens) + len(tokens) > n_ctx:
            raise ValueError(f"{len(self._tokens) + len(tokens)} tokens do not fit in the context "
                             f"(n_ctx={n_ctx})")
        if self._progress is not None and len(tokens) > 1:
            self._progress(0, len(tokens))
        base0 = len(self._tokens)
        read_ahead = self.read_ahead(tokens, base0)
        last_read = base0
        try:
            for start in range(0, len(tokens), self.n_batch):
                chunk = tokens[start:start + self.n_batch]
                last_chunk = start + self.n_batch >= len(tokens)
                base = len(self._tokens)
                if read_ahead and start > 0 and self.refresh_read_ahead(tokens, base0, base, len(chunk), last_read):
                    last_read = base
                rc = self._decode(chunk, base, logits_last=last_chunk)
                if rc == 1:
                    raise RuntimeError(f"the KV cache is full: no room for {len(chunk)} tokens at position {base} "
                                       f"({self.n_cells()} cells)")
                if rc != 0:
                    raise RuntimeError(f"llama_decode failed with code {rc} at position {base} "
                                       f"(n_ctx={n_ctx}): " + "; ".join(_lib.recent_errors()[-2:]))
                self._tokens.extend(chunk)
                if self._progress is not None and len(tokens) > 1:
                    self._progress(min(start + self.n_batch, len(tokens)), len(tokens))
        finally:
            if read_ahead:
                self.drop_read_ahead()

    def _decode(self, chunk: Sequence[int], base: int, logits_last: bool) -> int:
        """llama_decode of chunk (at most n_batch tokens) into sequence 0 at positions base...; its return code."""
        batch = self._batch
        for i, tok in enumerate(chunk):
            batch.token[i] = tok
            batch.pos[i] = base + i
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = 0
            batch.logits[i] = 1 if (logits_last and i == len(chunk) - 1) else 0
        batch.n_tokens = len(chunk)
        return lib.llama_decode(self._ctx, batch)

    def read_ahead(self, tokens: Sequence[int], base: int) -> bool:
        """Before prompt tokens fed at positions base... that clustering must merge while they are fed: read their
        end first, so that those merges keep what it asks for (``chelsea_gguf.lookahead``). True if its queries are
        kept (until the prompt reaches them, or ``drop_read_ahead``). ``eval`` calls it."""
        self._require_open()
        return lookahead.read_ahead(self._ctx, self.kv_cluster_options, tokens, base, self.n_batch)

    def refresh_read_ahead(self, tokens: Sequence[int], base: int, n_past: int, n_next: int, last_read: int) -> bool:
        """Between chunks of prompt tokens fed at positions base... whose end ``read_ahead`` kept, n_past tokens in
        the sequence so far, the end last read at last_read: if the next n_next tokens must merge to fit, read that
        end again after the text fed so far (``chelsea_gguf.lookahead.refresh``). True if read. ``eval`` calls it
        before each chunk but the first."""
        self._require_open()
        if self.kv_cluster_options is None:
            return False
        return lookahead.refresh(self._ctx, self.kv_cluster_options, tokens, base, n_past, n_next, last_read)

    def drop_read_ahead(self) -> None:
        """Forget the queries read_ahead kept (a prompt fed to its end drops them by itself)."""
        if self.kv_cluster_options is not None:
            lookahead.drop(self._ctx)

    # ------------------------------------------------------------------ completion

    def _prompt_tokens(self, prompt: PromptType, add_bos: bool = True, special: bool = False) -> list[int]:
        if isinstance(prompt, (str, bytes)):
            tokens = self.tokenize(prompt, add_bos=add_bos, special=special)
        else:
            tokens = list(prompt)
            self._check_token_ids(tokens)
        if not tokens:
            tokens = [self.token_bos()] if self.token_bos() >= 0 else []
        if not tokens:
            raise ValueError("prompt: empty prompt and the model has no BOS token to start from")
        n_ctx = self.n_ctx()
        if len(tokens) > n_ctx:
            raise ValueError(f"prompt is {len(tokens)} tokens, longer than the context (n_ctx={n_ctx})")
        return tokens

    def generate_tokens(self, prompt_tokens: Sequence[int], sampling: SamplingParams,
                        max_tokens: int) -> Iterator[int]:
        """Evaluate the prompt (reusing the cached prefix) and yield sampled tokens until an
        end-of-generation token, ``max_tokens`` or a full context."""
        self._require_open()
        timings = Timings()
        self.last_timings = timings
        sampler = Sampler(sampling, self._n_vocab)
        try:
            t0 = time.perf_counter()
            kept = self._reuse_prefix(prompt_tokens)
            # no compression to budget here: the first token is sampled from the prompt's logits, which no
            # compression changes, and generating keeps the cache within budget + interval (the prompt's last
            # queries still rank those merges). A prompt that ends past that is compressed at the first step
            self.eval(prompt_tokens[kept:])
            if sampler.uses_history:
                for t in prompt_tokens[-64:]:
                    sampler.accept(t)
            token = sampler.sample(self._ctx)
            t1 = time.perf_counter()
            timings.prompt_tokens = len(prompt_tokens) - kept
            timings.prompt_ms = (t1 - t0) * 1000.0
            produced = 0
            while True:
                if lib.llama_vocab_is_eog(self._vocab, token):
                    timings.stop_reason = "eog"
                    return
                yield token
                produced += 1
                if produced >= max_tokens:
                    timings.stop_reason = "max_tokens"
                    return
                if len(self._tokens) >= self.n_ctx():
                    timings.stop_reason = "context_full"
                    return
                self.eval([token])
                token = sampler.sample(self._ctx)
                timings.generated_tokens += 1
                timings.generation_ms = (time.perf_counter() - t1) * 1000.0
        finally:
            sampler.close()

    def create_completion(
        self,
        prompt: PromptType,
        suffix: str | None = None,
        max_tokens: int | None = 16,
        temperature: float = 0.8,
        top_p: float = 0.95,
        min_p: float = 0.05,
        echo: bool = False,
        stop: str | list[str] | None = None,
        repeat_penalty: float = 1.0,
        top_k: int = 40,
        stream: bool = False,
        seed: int | None = None,
        **unsupported: Any,
    ) -> dict[str, Any] | Iterator[dict[str, Any]]:
        """OpenAI-style text completion; ``stream=True`` returns an iterator of chunks."""
        self._require_open()
        if suffix is not None:
            raise ValueError("suffix: infill prompts are not supported")
        reject_unsupported(unsupported)
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        sampling = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                                  repeat_penalty=repeat_penalty,
                                  seed=self.seed if seed is None else seed).validated()
        if max_tokens is not None and (isinstance(max_tokens, bool) or not isinstance(max_tokens, int)):
            raise ValueError(f"max_tokens: expected an integer or None, got {max_tokens!r}")
        prompt_tokens = self._prompt_tokens(prompt)
        room = self.n_ctx() - len(prompt_tokens)
        limit = room if max_tokens is None or max_tokens <= 0 else min(max_tokens, room)
        prefix = self.detokenize(prompt_tokens).decode("utf-8", errors="replace") if echo else ""
        chunks = self._completion_chunks(prompt_tokens, sampling, limit, stops, prefix)
        if stream:
            return chunks
        text, finish = "", None
        for chunk in chunks:
            text += chunk["choices"][0]["text"]
            finish = chunk["choices"][0]["finish_reason"] or finish
            last = chunk
        result = dict(last)
        result["choices"] = [{"text": text, "index": 0, "logprobs": None, "finish_reason": finish}]
        return result

    __call__ = create_completion

    def _completion_chunks(self, prompt_tokens: list[int], sampling: SamplingParams, limit: int,
                           stops: list[str], prefix: str) -> Iterator[dict[str, Any]]:
        completion_id = f"cmpl-{uuid.uuid4()}"
        created = int(time.time())
        scanner = StopScanner(stops)
        n_generated = 0

        def chunk(text: str, finish: str | None) -> dict[str, Any]:
            out: dict[str, Any] = {
                "id": completion_id, "object": "text_completion", "created": created, "model": self.model_path,
                "choices": [{"text": text, "index": 0, "logprobs": None, "finish_reason": finish}],
            }
            if finish is not None:
                out["usage"] = {"prompt_tokens": len(prompt_tokens), "completion_tokens": n_generated,
                                "total_tokens": len(prompt_tokens) + n_generated}
            return out

        if prefix:
            yield chunk(prefix, None)
        finish = "length"
        gen = self.generate_tokens(prompt_tokens, sampling, limit)
        for token in gen:
            n_generated += 1
            text = scanner.feed(self._token_piece(token))
            if text:
                yield chunk(text, None)
            if scanner.stopped:
                gen.close()
                break
        if scanner.stopped or self.last_timings.stop_reason == "eog":
            finish = "stop"
        yield chunk(scanner.flush(), finish)

    # ------------------------------------------------------------------ chat

    def create_chat_completion(
        self,
        messages: list[dict[str, Any]],
        temperature: float = 0.2,
        top_p: float = 0.95,
        top_k: int = 40,
        min_p: float = 0.05,
        stream: bool = False,
        stop: str | list[str] | None = None,
        seed: int | None = None,
        max_tokens: int | None = None,
        repeat_penalty: float = 1.0,
        **unsupported: Any,
    ) -> dict[str, Any] | Iterator[dict[str, Any]]:
        """OpenAI-style chat completion using the model's chat template (or ``chat_format``)."""
        self._require_open()
        reject_unsupported(unsupported)
        prompt = format_chat_prompt(self._model, messages, self.chat_format)
        tokens = self.tokenize(prompt, add_bos=True, special=True)
        completion = self.create_completion(
            tokens, max_tokens=max_tokens, temperature=temperature, top_p=top_p, min_p=min_p, stop=stop,
            repeat_penalty=repeat_penalty, top_k=top_k, stream=stream, seed=seed)
        if stream:
            return _chat_chunks(completion)  # type: ignore[arg-type]
        choice = completion["choices"][0]  # type: ignore[index]
        return {
            "id": "chat" + completion["id"], "object": "chat.completion",  # type: ignore[index]
            "created": completion["created"], "model": self.model_path,  # type: ignore[index]
            "choices": [{"index": 0, "message": {"role": "assistant", "content": choice["text"]},
                         "logprobs": None, "finish_reason": choice["finish_reason"]}],
            "usage": completion["usage"],  # type: ignore[index]
        }

    # ------------------------------------------------------------------ state

    def save_state(self) -> LlamaState:
        """Snapshot of the context (KV cache, tokens). With clustering it carries the cluster sizes, and only a
        context with clustering enabled can load it."""
        self._require_open()
        _lib.clear_recent_errors()
        size = lib.llama_state_get_size(self._ctx)
        buf = ffi.new("uint8_t[]", max(size, 1))
        written = lib.llama_state_get_data(self._ctx, buf, size) if size else 0
        if written == 0:
            reason = "; ".join(_lib.recent_errors()[-2:]) or "llama.cpp could not serialize the context"
            raise RuntimeError(f"save_state failed: {reason}")
        return LlamaState(list(self._tokens), bytes(ffi.buffer(buf, written)))

    def load_state(self, state: LlamaState) -> None:
        """Restore a snapshot taken by save_state() on a context of the same model and shape."""
        self._require_open()
        _lib.clear_recent_errors()
        if lib.llama_state_set_data(self._ctx, state.data, len(state.data)) == 0:
            reason = "; ".join(_lib.recent_errors()[-2:]) or "llama.cpp rejected the data"
            self._tokens = []
            raise ValueError(f"load_state failed: {reason}")
        self._tokens = list(state.tokens)

    # ------------------------------------------------------------------ KV cache

    def kv_stats(self) -> KVStats:
        """Cells, tokens represented and real K/V allocation of this context's KV cache."""
        self._require_open()
        return read_kv_stats(self._ctx, 0)

    def buffer_memory(self) -> list[rpc.BufferMemory]:
        """What this context and its model allocate per buffer type (the CPU, each GPU or RPC worker device)."""
        self._require_open()
        return rpc.buffer_memory(self._ctx)

    def kv_cluster_stats(self) -> dict[str, Any]:
        self._require_open()
        return cluster.kv_cluster_stats(self._ctx, self.kv_cluster_options)

    kv_cluster_stats.__doc__ = cluster.kv_cluster_stats.__doc__

    def kv_cluster_compress(self, reread: bool = False) -> int:
        """Compress sequence 0 down to its budget now; returns the cells removed.

        With ``reread=True`` the merges keep what the model attends to while it reads the context again after a
        request to repeat it (KVzip's signal, ``chelsea_gguf.reread``): for a document compressed before its
        questions are known, which the default ranking keeps poorly. It costs about one more reading of the context,
        which must be uncompressed, with free cells for a chunk of it (about 470 by default)."""
        self._require_open()
        cluster.require_clustering(self.kv_cluster_options)
        if reread:
            return compress_reread(Document.of(self))
        return int(lib.chelsea_kv_cluster_compress(self._ctx, 0))


def _chat_chunks(chunks: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    first = True
    for c in chunks:
        choice = c["choices"][0]
        delta: dict[str, str] = {}
        if first:
            delta["role"] = "assistant"
            first = False
        if choice["text"]:
            delta["content"] = choice["text"]
        out = {"id": "chat" + c["id"], "object": "chat.completion.chunk", "created": c["created"],
               "model": c["model"],
               "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": choice["finish_reason"]}]}
        if "usage" in c:
            out["usage"] = c["usage"]
        yield out


# llama-cpp-python keywords accepted when they ask for nothing this class does not do
_NEUTRAL_VALUES: dict[str, tuple[Any, ...]] = {
    "logprobs": (None, False), "top_logprobs": (None, 0), "typical_p": (1.0,), "tfs_z": (1.0,),
    "mirostat_mode": (0,), "grammar": (None,), "logit_bias": (None, {}), "stopping_criteria": (None,),
    "logits_processor": (None,), "functions": (None, []), "function_call": (None,), "tools": (None, []),
    "tool_choice": (None,), "response_format": (None,), "frequency_penalty": (0.0,), "presence_penalty": (0.0,),
    "n": (None, 1),
}
_ANY_VALUE = {"model", "mirostat_tau", "mirostat_eta", "user"}


def reject_unsupported(extra: dict[str, Any]) -> None:
    for name, value in extra.items():
        if name in _ANY_VALUE:
            continue
        if name in _NEUTRAL_VALUES and value in _NEUTRAL_VALUES[name]:
            continue
        raise ValueError(f"{name}={value!r}: not supported by chelsea_gguf.Llama")


Llama.__doc__ = f"{(Llama.__doc__ or '').rstrip()}\n" + "\n".join(
    f"    {line}" for line in cluster.keywords_doc().splitlines())
