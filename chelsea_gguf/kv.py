"""KV-cache statistics read from the native cache (``chelsea_kv_stats_get``)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from chelsea_gguf._lib import ffi, lib
from chelsea_gguf.options import KV_TYPE_NAMES

MIB = 1024 * 1024


@dataclass(frozen=True)
class KVStats:
    """What the KV cache holds and what it really allocated (summed over attention caches)."""

    n_caches: int
    n_layers: int
    n_stream: int
    n_cells: int        # physical cells allocated
    n_cells_used: int   # cells holding an entry
    n_cells_span: int   # cells attended per decode step (highest used cell + 1)
    tokens: int         # tokens sequence 0 represents in the full-attention cache
    k_bytes: int
    v_bytes: int
    buffer_bytes: int   # backend buffer bytes for K and V: the real allocation
    type_k: str
    type_v: str
    compute_bytes: int  # the context's compute buffers as allocated now (activations, masks, a batch's logits)

    @property
    def kv_mib(self) -> float:
        return self.buffer_bytes / MIB

    @property
    def compute_mib(self) -> float:
        return self.compute_bytes / MIB

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["kv_mib"] = self.kv_mib
        d["compute_mib"] = self.compute_mib
        return d


def read_kv_stats(ctx: object, seq_id: int = 0) -> KVStats:
    raw = ffi.new("struct chelsea_kv_stats *")
    if lib.chelsea_kv_stats_get(ctx, raw) != 0:
        raise RuntimeError("chelsea_kv_stats_get failed")
    tokens = int(lib.chelsea_kv_seq_tokens(ctx, seq_id))
    return KVStats(
        n_caches=raw.n_caches, n_layers=raw.n_layers, n_stream=raw.n_stream,
        n_cells=raw.n_cells, n_cells_used=raw.n_cells_used, n_cells_span=raw.n_cells_span,
        tokens=max(tokens, 0), k_bytes=raw.k_bytes, v_bytes=raw.v_bytes, buffer_bytes=raw.buffer_bytes,
        type_k=KV_TYPE_NAMES.get(raw.type_k, str(raw.type_k)),
        type_v=KV_TYPE_NAMES.get(raw.type_v, str(raw.type_v)),
        compute_bytes=int(lib.chelsea_compute_buffer_bytes(ctx)))
