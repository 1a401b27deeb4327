"""Tiny GGUF models generated on the fly, for architectures no real model of is at hand.

Each builder returns a :class:`TinySpec`: the architecture name, its hyperparameters (GGUF keys without the
``<arch>.`` prefix) and every tensor its loader in the pinned llama.cpp requires (``src/models/<arch>.cpp``,
``load_arch_tensors``), with shapes in ggml order (``ne0`` first). :func:`write_gguf` turns a spec into a
file of a few KB: random float32 weights (norms set to one), and no tokenizer (``tokenizer.ggml.model =
"no_vocab"`` with ``<arch>.vocab_size`` dummy tokens), so these models are driven with token ids.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Union

import gguf
import numpy as np

N_VOCAB = 32
N_EMBD = 32
N_FF = 64
N_HEAD = 2
HEAD_DIM = N_EMBD // N_HEAD
N_LAYER = 2
N_CTX_TRAIN = 512

# Mamba mixer sizes (llama.cpp supports only d_inner == 2 * n_embd)
SSM_D_INNER = 2 * N_EMBD
SSM_D_CONV = 4
SSM_D_STATE = 8
SSM_DT_RANK = 4

HParam = Union[int, float, str, list[int]]
Shape = tuple[int, ...]


@dataclass
class TinySpec:
    arch: str
    hparams: dict[str, HParam]
    tensors: dict[str, Shape] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------- shared parts

def base_hparams(**extra: HParam) -> dict[str, HParam]:
    """The keys every decoder reads: sizes, layer count, head count, norm epsilon."""
    hp: dict[str, HParam] = {"context_length": N_CTX_TRAIN, "embedding_length": N_EMBD, "block_count": N_LAYER,
                             "feed_forward_length": N_FF, "attention.head_count": N_HEAD,
                             "attention.layer_norm_rms_epsilon": 1e-5}
    hp.update(extra)
    return hp


def embeddings(output_norm_bias: bool = False) -> dict[str, Shape]:
    """Token embeddings and the final norm; the output projection is tied to the embeddings."""
    t: dict[str, Shape] = {"token_embd.weight": (N_EMBD, N_VOCAB), "output_norm.weight": (N_EMBD,)}
    if output_norm_bias:
        t["output_norm.bias"] = (N_EMBD,)
    return t


def attention(i: int, n_embd_kv: int = N_EMBD) -> dict[str, Shape]:
    """Separate Q/K/V/O projections (llama-style) and the pre-attention norm."""
    b = f"blk.{i}"
    return {f"{b}.attn_norm.weight": (N_EMBD,), f"{b}.attn_q.weight": (N_EMBD, N_EMBD),
            f"{b}.attn_k.weight": (N_EMBD, n_embd_kv), f"{b}.attn_v.weight": (N_EMBD, n_embd_kv),
            f"{b}.attn_output.weight": (N_EMBD, N_EMBD)}


def swiglu_ffn(i: int) -> dict[str, Shape]:
    b = f"blk.{i}"
    return {f"{b}.ffn_norm.weight": (N_EMBD,), f"{b}.ffn_gate.weight": (N_EMBD, N_FF),
            f"{b}.ffn_up.weight": (N_EMBD, N_FF), f"{b}.ffn_down.weight": (N_FF, N_EMBD)}


def ssm_hparams() -> dict[str, HParam]:
    return {"ssm.conv_kernel": SSM_D_CONV, "ssm.inner_size": SSM_D_INNER, "ssm.state_size": SSM_D_STATE,
            "ssm.time_step_rank": SSM_DT_RANK}


def mamba_mixer(i: int, dt_bc_norms: bool = False) -> dict[str, Shape]:
    """A Mamba-1 block (norm, in/conv/x/dt projections, A, D, out); Jamba adds norms of dt, B and C."""
    b = f"blk.{i}"
    t: dict[str, Shape] = {
        f"{b}.attn_norm.weight": (N_EMBD,), f"{b}.ssm_in.weight": (N_EMBD, 2 * SSM_D_INNER),
        f"{b}.ssm_conv1d.weight": (SSM_D_CONV, SSM_D_INNER), f"{b}.ssm_conv1d.bias": (SSM_D_INNER,),
        f"{b}.ssm_x.weight": (SSM_D_INNER, SSM_DT_RANK + 2 * SSM_D_STATE),
        f"{b}.ssm_dt.weight": (SSM_DT_RANK, SSM_D_INNER), f"{b}.ssm_dt.bias": (SSM_D_INNER,),
        f"{b}.ssm_a": (SSM_D_STATE, SSM_D_INNER), f"{b}.ssm_d": (SSM_D_INNER,),
        f"{b}.ssm_out.weight": (SSM_D_INNER, N_EMBD)}
    if dt_bc_norms:
        t.update({f"{b}.ssm_dt_norm.weight": (SSM_DT_RANK,), f"{b}.ssm_b_norm.weight": (SSM_D_STATE,),
                  f"{b}.ssm_c_norm.weight": (SSM_D_STATE,)})
    return t


def is_recurrent_layer(i: int) -> bool:
    """Hybrid models here alternate: even layers recurrent, odd layers attention."""
    return i % 2 == 0


def hybrid_head_count_kv() -> list[int]:
    """Per-layer KV head counts of a hybrid: 0 marks a recurrent layer (how llama.cpp tells them apart)."""
    return [0 if is_recurrent_layer(i) else N_HEAD for i in range(N_LAYER)]


def layers(*parts: Callable[[int], dict[str, Shape]]) -> dict[str, Shape]:
    """The tensors of every layer: ``parts`` applied to each layer index."""
    t: dict[str, Shape] = {}
    for i in range(N_LAYER):
        for part in parts:
            t.update(part(i))
    return t


# ---------------------------------------------------------------------------------------------- architectures

def llama() -> TinySpec:
    """A plain transformer: the control, whose cache can be clustered."""
    return TinySpec("llama", base_hparams(**{"attention.head_count_kv": N_HEAD, "rope.dimension_count": HEAD_DIM}),
                    {**embeddings(), **layers(attention, swiglu_ffn)})


def mamba() -> TinySpec:
    """Recurrent: Mamba-1, no attention, no KV cache at all."""
    hp = base_hparams(**ssm_hparams())
    del hp["attention.head_count"], hp["feed_forward_length"]
    return TinySpec("mamba", hp, {**embeddings(), **layers(mamba_mixer)})


def jamba_layer(i: int) -> dict[str, Shape]:
    """Jamba: Mamba or attention, then a dense SwiGLU FFN."""
    mixer = mamba_mixer(i, dt_bc_norms=True) if is_recurrent_layer(i) else attention(i)
    return {**mixer, **swiglu_ffn(i)}


def jamba() -> TinySpec:
    """Hybrid: Mamba layers (recurrent state) next to attention layers (KV cache)."""
    return TinySpec("jamba", base_hparams(**ssm_hparams(), **{"attention.head_count_kv": hybrid_head_count_kv()}),
                    {**embeddings(), **layers(jamba_layer)})


LFM2_L_CACHE = 3


def lfm2_layer(i: int) -> dict[str, Shape]:
    """LFM2: short convolution or attention with Q/K norms, then a dense SwiGLU FFN."""
    b = f"blk.{i}"
    if is_recurrent_layer(i):
        mixer: dict[str, Shape] = {
            f"{b}.attn_norm.weight": (N_EMBD,), f"{b}.shortconv.conv.weight": (LFM2_L_CACHE, N_EMBD),
            f"{b}.shortconv.in_proj.weight": (N_EMBD, 3 * N_EMBD), f"{b}.shortconv.out_proj.weight": (N_EMBD, N_EMBD)}
    else:
        mixer = {**attention(i), f"{b}.attn_q_norm.weight": (HEAD_DIM,), f"{b}.attn_k_norm.weight": (HEAD_DIM,)}
    return {**mixer, **swiglu_ffn(i)}


def lfm2() -> TinySpec:
    """Hybrid with a sliding window: LFM2 (conv + SWA attention), whose memory is llama_memory_hybrid_iswa."""
    hp = base_hparams(**{"attention.head_count_kv": hybrid_head_count_kv(), "shortconv.l_cache": LFM2_L_CACHE,
                         "attention.sliding_window": 64})
    tensors = {"token_embd.weight": (N_EMBD, N_VOCAB), "token_embd_norm.weight": (N_EMBD,), **layers(lfm2_layer)}
    return TinySpec("lfm2", hp, tensors)


# DeepSeek-2 multi-head latent attention: the cache holds one compressed latent (kv_lora_rank) plus the
# RoPE part of the key per token, shared by all heads
MLA_KV_LORA_RANK = 16
MLA_ROPE_DIM = 8
MLA_HEAD_K = 16  # no-RoPE part + RoPE part, per head after decompression
MLA_HEAD_V = 16


def mla_attention(i: int) -> dict[str, Shape]:
    b = f"blk.{i}"
    return {f"{b}.attn_norm.weight": (N_EMBD,), f"{b}.attn_kv_a_norm.weight": (MLA_KV_LORA_RANK,),
            f"{b}.attn_q.weight": (N_EMBD, N_HEAD * MLA_HEAD_K),
            f"{b}.attn_kv_a_mqa.weight": (N_EMBD, MLA_KV_LORA_RANK + MLA_ROPE_DIM),
            f"{b}.attn_k_b.weight": (MLA_HEAD_K - MLA_ROPE_DIM, MLA_KV_LORA_RANK, N_HEAD),
            f"{b}.attn_v_b.weight": (MLA_KV_LORA_RANK, MLA_HEAD_V, N_HEAD),
            f"{b}.attn_output.weight": (N_HEAD * MLA_HEAD_V, N_EMBD)}


def deepseek2() -> TinySpec:
    """MLA: DeepSeek-2 with kv_lora_rank, no q_lora (``attn_q``), every layer dense (no experts)."""
    hp = base_hparams(**{
        "attention.head_count_kv": 1, "attention.key_length": MLA_KV_LORA_RANK + MLA_ROPE_DIM,
        "attention.value_length": MLA_KV_LORA_RANK, "attention.key_length_mla": MLA_HEAD_K,
        "attention.value_length_mla": MLA_HEAD_V, "attention.q_lora_rank": 0,
        "attention.kv_lora_rank": MLA_KV_LORA_RANK, "rope.dimension_count": MLA_ROPE_DIM,
        "leading_dense_block_count": N_LAYER, "expert_feed_forward_length": N_FF, "expert_shared_count": 0})
    return TinySpec("deepseek2", hp, {**embeddings(), **layers(mla_attention, swiglu_ffn)})


def qwen2vl() -> TinySpec:
    """M-RoPE: Qwen2-VL, rotary sections over (time, height, width, extra) positions."""
    sections = [2, 3, 3, 0]  # pairs of rotated dims per section: sum == HEAD_DIM / 2
    hp = base_hparams(**{"attention.head_count_kv": N_HEAD, "rope.dimension_sections": sections})
    return TinySpec("qwen2vl", hp, {**embeddings(), **layers(attention, swiglu_ffn)})


def bloom_layer(i: int) -> dict[str, Shape]:
    """BLOOM: LayerNorm with biases, fused QKV, GELU MLP with biases."""
    b = f"blk.{i}"
    t: dict[str, Shape] = {f"{b}.attn_qkv.weight": (N_EMBD, 3 * N_EMBD), f"{b}.attn_qkv.bias": (3 * N_EMBD,),
                           f"{b}.attn_output.weight": (N_EMBD, N_EMBD), f"{b}.attn_output.bias": (N_EMBD,),
                           f"{b}.ffn_up.weight": (N_EMBD, N_FF), f"{b}.ffn_up.bias": (N_FF,),
                           f"{b}.ffn_down.weight": (N_FF, N_EMBD), f"{b}.ffn_down.bias": (N_EMBD,)}
    for norm in ("attn_norm", "ffn_norm"):
        t[f"{b}.{norm}.weight"] = t[f"{b}.{norm}.bias"] = (N_EMBD,)
    return t


def bloom() -> TinySpec:
    """ALiBi: BLOOM (its loader sets f_max_alibi_bias = 8, hence use_alibi)."""
    hp = base_hparams(**{"attention.layer_norm_epsilon": 1e-5})
    del hp["attention.layer_norm_rms_epsilon"]
    tensors = {**embeddings(output_norm_bias=True), "token_embd_norm.weight": (N_EMBD,),
               "token_embd_norm.bias": (N_EMBD,), **layers(bloom_layer)}
    return TinySpec("bloom", hp, tensors)


# ---------------------------------------------------------------------------------------------- writing

def tensor_values(name: str, shape: Shape, rng: np.random.Generator) -> np.ndarray:
    """Norm weights one, Mamba's A negative (a decaying state), everything else small and random."""
    np_shape = tuple(reversed(shape))  # numpy is row-major: ggml's ne0 is the last numpy axis
    if name.endswith("norm.weight"):
        return np.ones(np_shape, dtype=np.float32)
    if name.endswith(".ssm_a"):
        return -np.ones(np_shape, dtype=np.float32)
    return (rng.standard_normal(np_shape) * 0.1).astype(np.float32)


def add_hparam(writer: gguf.GGUFWriter, key: str, value: HParam) -> None:
    if isinstance(value, bool):
        writer.add_bool(key, value)
    elif isinstance(value, int):
        writer.add_uint32(key, value)
    elif isinstance(value, float):
        writer.add_float32(key, value)
    elif isinstance(value, str):
        writer.add_string(key, value)
    else:
        writer.add_array(key, value)


def write_gguf(path: Path, spec: TinySpec, seed: int = 0, nan_rows: dict[str, list[int]] | None = None) -> Path:
    """Write ``spec`` as a GGUF file (v3) at ``path``; return the path. ``nan_rows`` sets rows (ggml ``ne1``
    indices: a token's embedding in ``token_embd.weight``) of some tensors to NaN, for a model that writes NaN
    into its KV cache."""
    writer = gguf.GGUFWriter(str(path), spec.arch)
    writer.add_name(f"tiny-{spec.arch}")
    for key, value in spec.hparams.items():
        add_hparam(writer, f"{spec.arch}.{key}", value)
    writer.add_tokenizer_model("no_vocab")
    add_hparam(writer, f"{spec.arch}.vocab_size", N_VOCAB)
    rng = np.random.default_rng(seed)
    for name, shape in spec.tensors.items():
        values = tensor_values(name, shape, rng)
        values[(nan_rows or {}).get(name, [])] = np.nan
        writer.add_tensor(name, values)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
