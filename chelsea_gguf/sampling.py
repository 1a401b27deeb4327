"""Sampler chains built from llama.cpp's own samplers, in llama-cpp-python's order."""

from __future__ import annotations

from dataclasses import dataclass

from chelsea_gguf._lib import ffi, lib
from chelsea_gguf.options import require_float, require_int

DEFAULT_SEED = 0xFFFFFFFF  # LLAMA_DEFAULT_SEED: a random seed per sampler
REPEAT_LAST_N = 64


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.8
    top_k: int = 40
    top_p: float = 0.95
    min_p: float = 0.05
    repeat_penalty: float = 1.0
    seed: int = DEFAULT_SEED

    def validated(self) -> "SamplingParams":
        require_float("temperature", self.temperature, 0.0)
        require_int("top_k", self.top_k, 0)
        require_float("top_p", self.top_p, 0.0, 1.0)
        require_float("min_p", self.min_p, 0.0, 1.0)
        require_float("repeat_penalty", self.repeat_penalty, 0.0)
        if self.repeat_penalty == 0.0:
            raise ValueError("repeat_penalty: 0 is invalid (1.0 disables the penalty)")
        require_int("seed", self.seed, 0, 0xFFFFFFFF)
        return self


class Sampler:
    """Owns one llama.cpp sampler chain; greedy when temperature is 0."""

    def __init__(self, params: SamplingParams, n_vocab: int) -> None:
        p = params.validated()
        chain_params = lib.llama_sampler_chain_default_params()
        chain_params.no_perf = True
        self._chain = lib.llama_sampler_chain_init(chain_params)
        self.uses_history = p.repeat_penalty != 1.0
        if self.uses_history:
            lib.llama_sampler_chain_add(
                self._chain, lib.llama_sampler_init_penalties(n_vocab, REPEAT_LAST_N, p.repeat_penalty, 0.0, 0.0))
        if p.temperature <= 0.0:
            lib.llama_sampler_chain_add(self._chain, lib.llama_sampler_init_greedy())
            return
        if p.top_k > 0:
            lib.llama_sampler_chain_add(self._chain, lib.llama_sampler_init_top_k(p.top_k))
        lib.llama_sampler_chain_add(self._chain, lib.llama_sampler_init_top_p(p.top_p, 1))
        lib.llama_sampler_chain_add(self._chain, lib.llama_sampler_init_min_p(p.min_p, 1))
        lib.llama_sampler_chain_add(self._chain, lib.llama_sampler_init_temp(p.temperature))
        lib.llama_sampler_chain_add(self._chain, lib.llama_sampler_init_dist(p.seed))

    def accept(self, token: int) -> None:
        lib.llama_sampler_accept(self._chain, token)

    def sample(self, ctx: object, output_index: int = -1) -> int:
        """Sample (and accept) a token from the logits of the given output of the last decode."""
        return int(lib.llama_sampler_sample(self._chain, ctx, output_index))

    def close(self) -> None:
        if self._chain is not None and self._chain != ffi.NULL:
            lib.llama_sampler_free(self._chain)
        self._chain = None

    def __del__(self) -> None:
        self.close()
