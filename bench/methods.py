"""The KV-cache methods the benchmarks compare, one small class each: its Llama keywords, how it opens a
context for a logical context of n_ctx tokens, and how it makes a session (kvpress-style: the class is the
method, no dispatch on a kind string).

Baselines at R get the physical cells Chelsea allocates at R for the same logical context and make room by
evicting before each prompt chunk (``baselines.py``, ``key_eviction.py``). ``kind`` is the label recorded in
result rows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar

from chelsea_gguf import Llama
from chelsea_gguf._lib import lib
from chelsea_gguf.chat import format_chat_prompt
from chelsea_gguf.cluster import default_options

from baselines import ContextShift, EvictionPolicy, Session, StreamingEviction
from key_eviction import KeyScoredEviction

N_BATCH = 256    # prompt chunk for every method: Chelsea compresses between chunks, baselines evict between them
RANDOM_SEED = 1


def chelsea_budget(ratio: float, n_tokens: int) -> int:
    """Cells Chelsea compresses to at ratio R once it has seen n_tokens (``ClusterOptions.physical_cells``'
    budget; the protected sinks and recent window set its floor)."""
    opts = default_options()
    return max(math.ceil(ratio * n_tokens), opts.sinks + opts.recent + 2)


def chelsea_cells(ratio: float, n_ctx: int) -> int:
    """Physical cells Chelsea allocates at ratio R for a logical context n_ctx (the baselines get the same)."""
    return replace(default_options(), ratio=ratio).physical_cells(n_ctx, N_BATCH)


@dataclass(frozen=True)
class Method:
    """The full cache (f16, or quantized K/V with `type_kv`)."""

    name: str
    ratio: float = 1.0
    type_kv: str | None = None      # None: f16
    extra: dict[str, Any] = field(default_factory=dict)  # more Llama keywords (kv_cluster_recent=...)
    kind: ClassVar[str] = "full"
    bias: ClassVar[bool] = True     # recorded in result rows; Chelsea's is a field

    def llama_kwargs(self) -> dict[str, Any]:
        kw: dict[str, Any] = {}
        if self.type_kv:
            # llama.cpp needs flash attention for a quantized V cache
            kw.update(type_k=self.type_kv, type_v=self.type_kv, flash_attn=True)
        kw.update(self.extra)
        return kw

    def n_cells_for(self, n_ctx: int) -> int:
        """The n_ctx to open the context with (the baselines: Chelsea's physical cells)."""
        return n_ctx

    def open(self, n_ctx: int, model_path: str | None = None, n_threads: int | None = None) -> Llama:
        """A Llama that can take n_ctx tokens of one sequence with this method."""
        return Llama(model_path, n_ctx=self.n_cells_for(n_ctx), n_batch=N_BATCH, n_threads=n_threads,
                     verbose=False, **self.llama_kwargs())

    def session(self, llm: Llama, n_ctx: int) -> Session:
        """A fresh session (cleared cache) on a context this method opened."""
        return Session(llm)

    def chat(self, llm: Llama, messages: list[dict[str, Any]], max_tokens: int) -> tuple[str, int]:
        """A greedy chat answer through ``create_chat_completion``, and the cells held after it."""
        llm.reset()
        out = llm.create_chat_completion(messages, temperature=0.0, max_tokens=max_tokens)
        return out["choices"][0]["message"]["content"], llm.kv_stats().n_cells_used


@dataclass(frozen=True)
class Chelsea(Method):
    """Online clustering at kept fraction R (ClusterOptions' defaults otherwise)."""

    bias: bool = True               # type: ignore[misc]  # the log(size) bias (False: ablation)
    match_values: bool = True       # False: pair cells by keys alone (the paper's matching; ablation)
    kind: ClassVar[str] = "chelsea"

    def llama_kwargs(self) -> dict[str, Any]:
        return {**super().llama_kwargs(), "kv_cluster": True, "kv_cluster_ratio": self.ratio,
                "kv_cluster_bias": self.bias, "kv_cluster_match_values": self.match_values, **self.extra}


@dataclass(frozen=True)
class RandomMerge(Chelsea):
    """Chelsea's machinery merging random pairs instead of the most similar ones (seeded)."""

    kind: ClassVar[str] = "random"

    def llama_kwargs(self) -> dict[str, Any]:
        return {**super().llama_kwargs(), "kv_cluster_random_pairs": True, "kv_cluster_seed": RANDOM_SEED}


@dataclass(frozen=True)
class Eviction(Method):
    """A baseline that holds Chelsea's physical cells at R and evicts before each chunk that does not fit."""

    def n_cells_for(self, n_ctx: int) -> int:
        return chelsea_cells(self.ratio, n_ctx)

    def policy(self, llm: Llama) -> EvictionPolicy:
        raise NotImplementedError

    def session(self, llm: Llama, n_ctx: int) -> Session:
        # the cells allocated: those Chelsea requests at this R (budget plus one prompt chunk), padded by
        # llama.cpp as Chelsea's are, and Chelsea fills its buffer too before it merges; after the prompt the
        # policy evicts down to the budget Chelsea compresses to. Policies are stateful: a new one per session
        return Session(llm, self.policy(llm), budget=lambda n_tokens: chelsea_budget(self.ratio, n_tokens))

    def chat(self, llm: Llama, messages: list[dict[str, Any]], max_tokens: int) -> tuple[str, int]:
        """The prompt create_chat_completion would feed (same template), answered greedily through a session,
        since eviction happens between the session's chunks."""
        prompt = format_chat_prompt(llm.model, messages, llm.chat_format)
        tokens = llm.tokenize(prompt, add_bos=True, special=True)
        with self.session(llm, len(tokens) + max_tokens) as s:
            out = s.greedy(tokens, max_tokens)
            cells = s.cells_used()
        return llm.detokenize(out).decode("utf-8", errors="replace"), cells


@dataclass(frozen=True)
class Streaming(Eviction):
    """StreamingLLM: 16 sinks + the most recent window, positions kept."""

    kind: ClassVar[str] = "streaming"

    def policy(self, llm: Llama) -> EvictionPolicy:
        return StreamingEviction(llm.n_cells(), default_options().sinks)


@dataclass(frozen=True)
class Shift(Eviction):
    """llama.cpp's context shift: keep 16, drop half of the rest, shift positions down."""

    kind: ClassVar[str] = "shift"

    def policy(self, llm: Llama) -> EvictionPolicy:
        return ContextShift(llm.n_cells(), default_options().sinks)


@dataclass(frozen=True)
class KeyDiff(Eviction):
    """Evicts the cells whose keys are most like their head's mean key (KeyDiff), sinks and 64 recent kept."""

    kind: ClassVar[str] = "keydiff"

    def policy(self, llm: Llama) -> EvictionPolicy:
        opts = default_options()
        return KeyScoredEviction(llm.n_cells(), lib.llama_model_n_head_kv(llm.model), self.kind, opts.sinks,
                                 opts.recent, name=self.kind)


@dataclass(frozen=True)
class Knorm(KeyDiff):
    """Evicts the cells with the highest key norms (Knorm), sinks and 64 recent kept."""

    kind: ClassVar[str] = "knorm"


FULL = Method("full f16")


def chelsea(ratio: float, bias: bool = True, type_kv: str | None = None, match_values: bool = True) -> Chelsea:
    name = (f"chelsea R={ratio:g}" + ("" if bias else " no-bias") + ("" if match_values else " keys-only")
            + (f" {type_kv}" if type_kv else ""))
    return Chelsea(name, ratio, type_kv, bias=bias, match_values=match_values)


def full_quantized(type_kv: str) -> Method:
    return Method(f"full {type_kv}", type_kv=type_kv)


def random_merge(ratio: float) -> RandomMerge:
    return RandomMerge(f"random merge R={ratio:g}", ratio)


def streaming(ratio: float) -> Streaming:
    return Streaming(f"streaming R={ratio:g}", ratio)


def context_shift(ratio: float) -> Shift:
    return Shift(f"context shift R={ratio:g}", ratio)


def keydiff(ratio: float) -> KeyDiff:
    return KeyDiff(f"keydiff R={ratio:g}", ratio)


def knorm(ratio: float) -> Knorm:
    return Knorm(f"knorm R={ratio:g}", ratio)
