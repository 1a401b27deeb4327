"""GGUF files with the exact shapes of Llama-3.1-8B and Qwen2.5-7B and RANDOM WEIGHTS, for memory measurements.

    python3 bench/shape_models.py                      # both shapes, full size (~4.3 and ~4.1 GiB, Q4_0), cached
    python3 bench/shape_models.py llama-3.1-8b --check # write (or reuse) one, load it, decode one token
    python3 bench/shape_models.py --tiny --check       # the same architectures, 2 layers and 1024 tokens (MBs)
    python3 bench/shape_models.py --out-dir DIR --force

**The weights are random.** These files are not models: they have the hyper-parameters, tensor names, shapes
and quantization types of the real GGUF files (what llama.cpp allocates KV cache, compute buffers and weights
from), and random values. Use them for memory and speed of the shapes only; **no quality may ever be reported
from them** (perplexity, KLD, retrieval, text are meaningless). Every file says so in ``general.description``.

What is written (checked against the pinned llama.cpp's ``conversion/llama.py``, ``conversion/base.py``,
``src/models/llama.cpp``, ``src/models/qwen2.cpp`` and ``src/llama-vocab.cpp``):

* ``llama-3.1-8b``: arch ``llama``, 32 layers, n_embd 4096, 32 heads, 8 KV heads (head_dim 128), n_ff 14336,
  vocab 128256, rope_freq_base 500000 with the llama3 rope scaling written the way the convert script writes it
  (no ``rope.scaling.*`` keys; a ``rope_freqs.weight`` F32 tensor of head_dim/2 frequency factors, factor 8,
  low/high frequency factors 1/4, original context 8192, which llama.cpp's llama loader reads), context_length
  131072, rms eps 1e-5, untied ``output.weight``.
* ``qwen2.5-7b``: arch ``qwen2``, 28 layers, n_embd 3584, 28 heads, 4 KV heads (head_dim 128), n_ff 18944,
  vocab 152064, rope base 1e6, context_length 32768 (no YaRN keys: Qwen2.5's config ships without them; buffers
  do not depend on them), rms eps 1e-6, Q/K/V biases, untied ``output.weight``.

Types as ``llama-quantize ... Q4_0`` leaves them: every 2-D weight Q4_0 (token embeddings too), ``output.weight``
Q6_K, norms, biases and ``rope_freqs`` F32. Quantized blocks are written directly from random bytes (nibbles /
6-bit values uniform) with small random f16 scales chosen so a weight has a standard deviation of about
1/sqrt(n_in) (activations stay finite); a full file takes well under a minute, mostly disk. The tokenizer is a
minimal SentencePiece-style ``"llama"`` vocab of exactly n_vocab tokens (``<unk>``, ``<s>``, ``</s>``, the 256
byte tokens, then filler pieces) with scores and token types, so text prompts tokenize (byte fallback). It is
not the real tokenizer (the real files use a GPT-2 BPE); the vocab size, which is what shapes the embeddings,
logits and output buffer, is the real one.

Files are cached under ``~/.cache/chelsea-gguf/shape-models/`` as ``<name>-random-q4_0-<hash>.gguf``, the hash
taken over the whole configuration (hyper-parameters, tensor plan, seed, vocab, generator version): a file whose
hash already exists is reused, not rewritten. A ``.json`` beside it records the configuration.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gguf
import numpy as np

GENERATOR_VERSION = 1  # bump when the bytes written for a configuration change
RANDOM_NOTE = ("RANDOM WEIGHTS: this file has the shapes of {base} and random values; it is not a trained model. "
               "Use it for memory and speed of the shape only; report no quality (perplexity, KLD, retrieval, "
               "text) from it.")
CACHE_DIR = Path(os.environ.get("CHELSEA_SHAPE_MODELS", Path.home() / ".cache" / "chelsea-gguf" / "shape-models"))

Q = gguf.GGMLQuantizationType


@dataclass(frozen=True)
class ShapeConfig:
    """The hyper-parameters of one model shape (GGUF keys in the comments)."""

    name: str
    base: str                   # the real model whose shapes these are
    arch: str                   # general.architecture
    n_layer: int                # <arch>.block_count
    n_embd: int                 # <arch>.embedding_length
    n_head: int                 # <arch>.attention.head_count
    n_head_kv: int              # <arch>.attention.head_count_kv
    n_ff: int                   # <arch>.feed_forward_length
    n_vocab: int                # tokens in the vocab = rows of token_embd / output
    n_ctx_train: int            # <arch>.context_length
    rope_freq_base: float       # <arch>.rope.freq_base
    rms_eps: float              # <arch>.attention.layer_norm_rms_epsilon
    qkv_bias: bool = False      # attn_{q,k,v}.bias (Qwen2)
    llama3_rope: dict[str, float] | None = None  # rope_freqs.weight factors, as conversion/llama.py computes them
    write_vocab_size: bool = False  # <arch>.vocab_size (the llama convert writes it, qwen2's does not)
    weight_type: str = "Q4_0"
    output_type: str = "Q6_K"
    tiny: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def n_embd_kv(self) -> int:
        return self.n_head_kv * self.head_dim

    def f16_kv_bytes_per_cell(self) -> int:
        """K and V of every layer for one cell, f16: 2 x n_layer x n_head_kv x head_dim x 2 bytes."""
        return 2 * self.n_layer * self.n_embd_kv * 2


LLAMA_3_1_8B = ShapeConfig(
    name="llama-3.1-8b", base="Llama-3.1-8B", arch="llama", n_layer=32, n_embd=4096, n_head=32, n_head_kv=8,
    n_ff=14336, n_vocab=128256, n_ctx_train=131072, rope_freq_base=500000.0, rms_eps=1e-5,
    llama3_rope={"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                 "original_max_position_embeddings": 8192},
    write_vocab_size=True)

QWEN2_5_7B = ShapeConfig(
    name="qwen2.5-7b", base="Qwen2.5-7B", arch="qwen2", n_layer=28, n_embd=3584, n_head=28, n_head_kv=4,
    n_ff=18944, n_vocab=152064, n_ctx_train=32768, rope_freq_base=1000000.0, rms_eps=1e-6, qkv_bias=True)

SHAPES: dict[str, ShapeConfig] = {c.name: c for c in (LLAMA_3_1_8B, QWEN2_5_7B)}


def tiny(cfg: ShapeConfig) -> ShapeConfig:
    """The same architecture and head_dim (128) with 2 layers, 2 KV heads (the real GQA group size), a small FFN
    and 1024 tokens: a file of ~10 MB for tests. Not the real shape: for memory numbers use the full one."""
    group = cfg.n_head // cfg.n_head_kv
    n_head = 2 * group
    return dataclasses.replace(cfg, name=cfg.name + "-tiny", n_layer=2, n_head=n_head, n_head_kv=2,
                               n_embd=n_head * cfg.head_dim, n_ff=2048, n_vocab=1024, tiny=True)


# ---------------------------------------------------------------------------------------------- tensors

def llama3_rope_factors(cfg: ShapeConfig) -> np.ndarray:
    """``rope_freqs.weight`` exactly as llama.cpp's ``conversion/llama.py`` (``generate_extra_tensors``) computes
    it for ``rope_type == "llama3"``: one factor per rotated pair (head_dim / 2 values)."""
    p = cfg.llama3_rope or {}
    dim = cfg.head_dim
    freqs = 1.0 / (np.float32(cfg.rope_freq_base) ** (np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)))
    factor, low, high = p["factor"], p["low_freq_factor"], p["high_freq_factor"]
    old_ctx = p["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
    out = []
    for freq in freqs.astype(np.float32):
        wavelen = 2 * math.pi / float(freq)
        if wavelen < high_wavelen:
            out.append(1.0)
        elif wavelen > low_wavelen:
            out.append(factor)
        else:
            smooth = (old_ctx / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)


@dataclass(frozen=True)
class TensorPlan:
    name: str
    ne: tuple[int, ...]   # ggml order: ne0 (the row length) first
    qtype: str            # "F32", "Q4_0", "Q6_K"

    @property
    def np_shape(self) -> tuple[int, ...]:
        return tuple(reversed(self.ne))

    def nbytes(self) -> int:
        block, size = gguf.GGML_QUANT_SIZES[Q[self.qtype]]
        n = int(np.prod(self.ne))
        assert self.ne[0] % block == 0, (self.name, self.ne, self.qtype)
        return n // block * size


def tensor_plan(cfg: ShapeConfig) -> list[TensorPlan]:
    """Every tensor, in the order a converted file has them (token_embd, rope_freqs, blocks, output)."""
    w, e, kv, ff, v = cfg.weight_type, cfg.n_embd, cfg.n_embd_kv, cfg.n_ff, cfg.n_vocab
    t = [TensorPlan("token_embd.weight", (e, v), w)]
    if cfg.llama3_rope:
        t.append(TensorPlan("rope_freqs.weight", (cfg.head_dim // 2,), "F32"))
    for i in range(cfg.n_layer):
        b = f"blk.{i}"
        t.append(TensorPlan(f"{b}.attn_norm.weight", (e,), "F32"))
        for proj, n_out in (("q", e), ("k", kv), ("v", kv)):
            t.append(TensorPlan(f"{b}.attn_{proj}.weight", (e, n_out), w))
            if cfg.qkv_bias:
                t.append(TensorPlan(f"{b}.attn_{proj}.bias", (n_out,), "F32"))
        t.append(TensorPlan(f"{b}.attn_output.weight", (e, e), w))
        t.append(TensorPlan(f"{b}.ffn_norm.weight", (e,), "F32"))
        t.append(TensorPlan(f"{b}.ffn_gate.weight", (e, ff), w))
        t.append(TensorPlan(f"{b}.ffn_up.weight", (e, ff), w))
        t.append(TensorPlan(f"{b}.ffn_down.weight", (ff, e), w))
    t.append(TensorPlan("output_norm.weight", (e,), "F32"))
    t.append(TensorPlan("output.weight", (e, v), cfg.output_type))
    return t


def _f16_scales(rng: np.random.Generator, n: int, scale: float) -> np.ndarray:
    return (rng.uniform(0.5, 1.5, n).astype(np.float32) * np.float32(scale)).astype(np.float16)


def random_q4_0(rng: np.random.Generator, n_rows: int, row_len: int) -> np.ndarray:
    """Q4_0 blocks (f16 d, 16 bytes of nibbles per 32 values) from random bytes; value = d * (q - 8), q uniform in
    0..15 (std ~4.6 d), d ~ 1/(4.6 sqrt(row_len)): weights of std ~1/sqrt(n_in)."""
    n_blocks = n_rows * row_len // 32
    out = np.empty((n_blocks, 18), dtype=np.uint8)
    out[:, 2:] = np.frombuffer(rng.bytes(n_blocks * 16), dtype=np.uint8).reshape(n_blocks, 16)
    out[:, :2] = _f16_scales(rng, n_blocks, 1.0 / (4.6 * math.sqrt(row_len))).view(np.uint8).reshape(n_blocks, 2)
    return out.reshape(-1)


def random_q6_k(rng: np.random.Generator, n_rows: int, row_len: int) -> np.ndarray:
    """Q6_K super-blocks (ql[128], qh[64], int8 scales[16], f16 d per 256 values) from random bytes; value =
    d * scale * (q - 32), q uniform in 0..63 (std ~18.5), scales 1..15: weights of std ~1/sqrt(n_in)."""
    n_blocks = n_rows * row_len // 256
    out = np.empty((n_blocks, 210), dtype=np.uint8)
    out[:, :192] = np.frombuffer(rng.bytes(n_blocks * 192), dtype=np.uint8).reshape(n_blocks, 192)
    out[:, 192:208] = rng.integers(1, 16, (n_blocks, 16), dtype=np.uint8)  # int8 scales, positive
    out[:, 208:] = _f16_scales(rng, n_blocks, 1.0 / (8 * 18.5 * math.sqrt(row_len))).view(np.uint8).reshape(n_blocks, 2)
    return out.reshape(-1)


def tensor_data(cfg: ShapeConfig, t: TensorPlan, rng: np.random.Generator) -> np.ndarray:
    if t.name == "rope_freqs.weight":
        return llama3_rope_factors(cfg)
    if t.qtype == "F32":
        if t.name.endswith("norm.weight"):
            return np.ones(t.np_shape, dtype=np.float32)
        return (rng.standard_normal(t.np_shape, dtype=np.float32) * np.float32(0.02))  # biases
    row_len, n_rows = t.ne[0], int(np.prod(t.ne[1:]))
    if t.qtype == "Q4_0":
        return random_q4_0(rng, n_rows, row_len)
    if t.qtype == "Q6_K":
        return random_q6_k(rng, n_rows, row_len)
    raise ValueError(f"{t.name}: no random writer for {t.qtype}")


# ---------------------------------------------------------------------------------------------- vocab

def spm_vocab(n_vocab: int) -> tuple[list[str], list[float], list[int]]:
    """A minimal SentencePiece vocab llama.cpp accepts (``tokenizer.ggml.model = "llama"``): unk/bos/eos at 0/1/2
    (the defaults it assumes), the 256 byte-fallback tokens ``<0xNN>``, then unique filler pieces."""
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    types = [gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL] + [gguf.TokenType.BYTE] * 256
    printable = [chr(c) for c in range(33, 127)]
    pieces = ["\u2581"] + printable + ["\u2581" + c for c in printable]
    i = 0
    while len(tokens) + len(pieces) < n_vocab:
        pieces.append(f"\u2581w{i}")
        i += 1
    tokens += pieces[: n_vocab - len(tokens)]
    types += [gguf.TokenType.NORMAL] * (n_vocab - len(types))
    if len(tokens) != n_vocab:
        raise ValueError(f"n_vocab {n_vocab} is too small for a byte-fallback vocab (at least 259)")
    scores = [0.0] * 259 + [-float(j) for j in range(n_vocab - 259)]
    return tokens, scores, [int(x) for x in types]


# ---------------------------------------------------------------------------------------------- files

def config_dict(cfg: ShapeConfig, seed: int) -> dict[str, Any]:
    return {"generator_version": GENERATOR_VERSION, "seed": seed, "vocab": "spm-bytefallback",
            "config": dataclasses.asdict(cfg),
            "tensors": [[t.name, list(t.ne), t.qtype] for t in tensor_plan(cfg)]}


def config_hash(cfg: ShapeConfig, seed: int) -> str:
    return hashlib.sha256(json.dumps(config_dict(cfg, seed), sort_keys=True).encode()).hexdigest()[:12]


def model_path(cfg: ShapeConfig, seed: int = 0, out_dir: Path | None = None) -> Path:
    return Path(out_dir or CACHE_DIR) / f"{cfg.name}-random-{cfg.weight_type.lower()}-{config_hash(cfg, seed)}.gguf"


def write_model(cfg: ShapeConfig, path: Path, seed: int = 0) -> Path:
    """Write the random-weight file for ``cfg`` at ``path`` (through a temporary name, renamed when complete),
    one tensor at a time (memory: the largest tensor, ~0.5 GB for the 8B shape)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    plan = tensor_plan(cfg)
    w = gguf.GGUFWriter(str(tmp), cfg.arch)
    a = cfg.arch
    w.add_name(f"{cfg.base} shape (RANDOM WEIGHTS{', tiny' if cfg.tiny else ''})")
    w.add_description(RANDOM_NOTE.format(base=cfg.base) + (" Tiny variant: not the real shape." if cfg.tiny else ""))
    w.add_string("chelsea.shape_model.config_hash", config_hash(cfg, seed))
    w.add_bool("chelsea.shape_model.random_weights", True)
    w.add_uint32(f"{a}.block_count", cfg.n_layer)
    w.add_uint32(f"{a}.context_length", cfg.n_ctx_train)
    w.add_uint32(f"{a}.embedding_length", cfg.n_embd)
    w.add_uint32(f"{a}.feed_forward_length", cfg.n_ff)
    w.add_uint32(f"{a}.attention.head_count", cfg.n_head)
    w.add_uint32(f"{a}.attention.head_count_kv", cfg.n_head_kv)
    w.add_float32(f"{a}.rope.freq_base", cfg.rope_freq_base)
    w.add_float32(f"{a}.attention.layer_norm_rms_epsilon", cfg.rms_eps)
    if cfg.llama3_rope:
        w.add_uint32(f"{a}.rope.dimension_count", cfg.head_dim)
    if cfg.write_vocab_size:
        w.add_uint32(f"{a}.vocab_size", cfg.n_vocab)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q4_0 if cfg.weight_type == "Q4_0" else gguf.LlamaFileType.ALL_F32)
    tokens, scores, types = spm_vocab(cfg.n_vocab)
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)
    for t in plan:
        # element shape in numpy order; raw_dtype marks the type (a non-uint8 dtype keeps the shape as given)
        w.add_tensor_info(t.name, t.np_shape, np.dtype(np.float32), t.nbytes(), raw_dtype=Q[t.qtype])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    for i, t in enumerate(plan):
        rng = np.random.default_rng([seed, i])
        data = tensor_data(cfg, t, rng)
        assert data.nbytes == t.nbytes(), (t.name, data.nbytes, t.nbytes())
        w.write_tensor_data(data)
    w.close()
    meta = {**config_dict(cfg, seed), "note": RANDOM_NOTE.format(base=cfg.base), "bytes": tmp.stat().st_size}
    path.with_suffix(".json").write_text(json.dumps(meta, indent=1) + "\n")
    tmp.replace(path)
    return path


def ensure_model(cfg: ShapeConfig, seed: int = 0, out_dir: Path | None = None,
                 force: bool = False) -> tuple[Path, bool]:
    """The file for ``cfg``: reused when one with the same configuration hash exists, written otherwise. Returns
    (path, written)."""
    path = model_path(cfg, seed, out_dir)
    if path.exists() and not force:
        return path, False
    return write_model(cfg, path, seed), True


# ---------------------------------------------------------------------------------------------- loading

NO_REPACK = {"use_extra_bufts": False}  # Llama(model_params=...): no CPU repack copy of the Q4_0 weights


def no_alloc_params() -> dict[str, int | bool]:
    """llama.cpp's memory-fit mode (``no_alloc``, which needs mmap off): only the metadata is read, weights and KV
    cache get dummy buffers and the compute buffers are sized (logged as ``compute buffer size``) but not
    allocated. A context made from such a model cannot decode."""
    from chelsea_gguf._lib import lib

    return {"no_alloc": True, "load_mode": lib.LLAMA_LOAD_MODE_NONE}


class LogTap:
    """Collects llama.cpp's log lines (every level) while active, through chelsea_gguf's log routing."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def __enter__(self) -> "LogTap":
        from chelsea_gguf import _lib

        self._prev = _lib._forward
        prev = self._prev

        def forward(level: int, message: str) -> None:
            self.lines.append(message)
            if prev is not None:
                prev(level, message)

        _lib.take_back_log(forward)
        return self

    def __exit__(self, *exc: object) -> None:
        from chelsea_gguf import _lib

        _lib._forward = self._prev

    def text(self) -> str:
        return "".join(self.lines)


# ---------------------------------------------------------------------------------------------- check

def check_model(path: Path, cfg: ShapeConfig, n_threads: int = 1, repack: bool = False) -> dict[str, Any]:
    """Load ``path`` with chelsea_gguf.Llama (a 256-token context), check the hyper-parameters llama.cpp reports and
    decode one token after BOS. The output is random-weight noise: only that it runs (and is finite) means
    anything. ``repack=False`` loads without llama.cpp's CPU repack copy of the Q4_0 weights (``use_extra_bufts``
    off), which keeps the RSS of an 8B shape at the file's mmap instead of twice that."""
    from chelsea_gguf import Llama
    from chelsea_gguf._lib import ffi, lib

    t0 = time.time()
    with Llama(str(path), n_ctx=256, n_batch=64, n_ubatch=64, n_threads=n_threads, verbose=False,
               model_params=None if repack else NO_REPACK) as llm:
        load_s = time.time() - t0
        got = {"n_layer": int(llm.metadata(f"{cfg.arch}.block_count")),
               "n_head_kv": int(llm.metadata(f"{cfg.arch}.attention.head_count_kv")),
               "n_embd": int(llm.metadata(f"{cfg.arch}.embedding_length")),
               "n_vocab": llm.n_vocab(), "n_ctx_train": llm.n_ctx_train()}
        want = {"n_layer": cfg.n_layer, "n_head_kv": cfg.n_head_kv, "n_embd": cfg.n_embd, "n_vocab": cfg.n_vocab,
                "n_ctx_train": cfg.n_ctx_train}
        if got != want:
            raise AssertionError(f"{path}: llama.cpp reports {got}, expected {want}")
        kv = llm.kv_stats()
        per_cell = kv.buffer_bytes / kv.n_cells
        if per_cell != cfg.f16_kv_bytes_per_cell():
            raise AssertionError(f"{path}: {per_cell} KV bytes per cell, expected {cfg.f16_kv_bytes_per_cell()}")
        t1 = time.time()
        llm.eval([llm.token_bos()])  # one llama_decode of one token
        decode_s = time.time() - t1
        logits = np.array(ffi.unpack(lib.llama_get_logits_ith(llm.ctx, -1), llm.n_vocab()), dtype=np.float32)
        if llm.n_tokens != 1 or llm.kv_stats().n_cells_used != 1:
            raise AssertionError(f"{path}: the decoded token is not in the cache")
        if not np.isfinite(logits).all():
            raise AssertionError(f"{path}: non-finite logits after one decode")
        return {"path": str(path), "random_weights": True, "hparams": got, "kv_bytes_per_cell": per_cell,
                "logits_finite": True, "argmax_token": int(logits.argmax()), "load_s": round(load_s, 2),
                "decode_s": round(decode_s, 2), "model_description": llm.model_description(),
                "note": "random weights: the token decoded is noise; this only proves llama.cpp accepts the file"}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="*", default=list(SHAPES), help=f"shapes to write (default: all): {list(SHAPES)}")
    ap.add_argument("--tiny", action="store_true", help="2 layers, 1024 tokens, same arch and head_dim (tests)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out-dir", type=Path, default=None, help=f"default {CACHE_DIR}")
    ap.add_argument("--force", action="store_true", help="rewrite even if the file exists")
    ap.add_argument("--check", action="store_true", help="load with chelsea_gguf.Llama and decode one token")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repack", action="store_true",
                    help="--check with llama.cpp's CPU weight repacking (its default; doubles the RSS of Q4_0 weights)")
    args = ap.parse_args(argv)
    for name in args.models:
        if name not in SHAPES:
            ap.error(f"unknown shape {name!r}; known: {', '.join(SHAPES)}")
        cfg = tiny(SHAPES[name]) if args.tiny else SHAPES[name]
        t0 = time.time()
        path, written = ensure_model(cfg, args.seed, args.out_dir, args.force)
        print(json.dumps({"model": cfg.name, "path": str(path), "written": written, "bytes": path.stat().st_size,
                          "write_s": round(time.time() - t0, 1), "random_weights": True}), flush=True)
        if args.check:
            print(json.dumps(check_model(path, cfg, args.threads, args.repack)), flush=True)
    print("NOTE: random weights; no quality may be reported from these files.", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
