"""HF ↔ megatron-core weight layout for Llama / Qwen2 / Qwen3 decoders: names, fused tensors, TP shards.

Pure tensor code (no megatron import), so it is tested without megatron-core. A Megatron `GPTModel`
stores a decoder layer as

    input_layernorm.weight                       ← model.layers.i.input_layernorm.weight
    self_attention.linear_qkv.{weight,bias}      ← q_proj, k_proj, v_proj, *interleaved per query group*:
                                                   [q heads of group 0, k0, v0, q heads of group 1, k1, v1, …]
    self_attention.{q,k}_layernorm.weight        ← self_attn.{q,k}_norm.weight (Qwen3)
    self_attention.linear_proj.weight            ← self_attn.o_proj.weight
    pre_mlp_layernorm.weight                     ← post_attention_layernorm.weight
    mlp.linear_fc1.weight                        ← [gate_proj; up_proj] (SwiGLU: act(first half) * second)
    mlp.linear_fc2.weight                        ← mlp.down_proj.weight

under `decoder.layers.<i>.` (local layer index on a pipeline stage), plus `embedding.word_embeddings.weight`,
`decoder.final_layernorm.weight` and `output_layer.weight` (absent when embeddings are tied). With the
Transformer Engine layer spec the two norms live inside the next linear layer instead
(`linear_qkv.layer_norm_weight`, `linear_fc1.layer_norm_weight`): `fused_norms=True`.

Tensor parallelism splits column-parallel layers (linear_qkv by whole query groups, linear_fc1 as
[gate shard; up shard] per rank, the output layer and the embedding by vocabulary rows) on dim 0 and
row-parallel layers (linear_proj, linear_fc2) on dim 1; norms are replicated. Every conversion here is
reshapes, slices and concatenations, so HF → Megatron → HF is bit-exact.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "qwen3")

# (input_layernorm, pre_mlp_layernorm) names inside a Megatron layer: local spec / Transformer Engine spec.
NORM_NAMES = {False: ("input_layernorm.weight", "pre_mlp_layernorm.weight"),
              True: ("self_attention.linear_qkv.layer_norm_weight", "mlp.linear_fc1.layer_norm_weight")}


@dataclass(frozen=True)
class DecoderArch:
    """What the mapping and the Megatron model builder need to know about an HF decoder."""

    model_type: str
    num_layers: int
    hidden_size: int
    ffn_hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    tie_embeddings: bool
    qkv_bias: bool
    qk_norm: bool
    norm_eps: float
    rope_theta: float
    rope_scaling_factor: float | None  # Llama 3 style frequency scaling, None = plain RoPE
    max_position_embeddings: int

    @property
    def heads_per_group(self) -> int:
        return self.num_heads // self.num_kv_heads

    def check_parallel(self, tp_size: int, pp_size: int = 1) -> None:
        """Raise ValueError when the model cannot be split `tp_size` × `pp_size` ways."""
        for what, n in (("attention heads", self.num_heads), ("key/value heads", self.num_kv_heads),
                        ("FFN width", self.ffn_hidden_size), ("vocabulary rows", self.vocab_size)):
            if n % tp_size:
                raise ValueError(f"tensor_parallel={tp_size} does not divide the {n} {what}")
        if self.num_layers % pp_size:
            raise ValueError(f"pipeline_parallel={pp_size} does not divide the {self.num_layers} layers")


def arch_from_hf_config(cfg: Mapping) -> DecoderArch:
    """A `config.json` dict (Llama, Qwen2 or Qwen3) → DecoderArch; ValueError for what is not supported.

    Reads both the transformers ≥ 5 `rope_parameters` and the older `rope_theta` / `rope_scaling` keys.
    """
    model_type = cfg.get("model_type", "")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"model_type {model_type!r} is not supported by the megatron backend "
                         f"(supported: {', '.join(SUPPORTED_MODEL_TYPES)})")
    if cfg.get("hidden_act", "silu") != "silu":
        raise ValueError(f"hidden_act {cfg['hidden_act']!r}: only SwiGLU (silu) MLPs are supported")
    heads = cfg["num_attention_heads"]
    rope = dict(cfg.get("rope_scaling") or {})
    rope.update(cfg.get("rope_parameters") or {})
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    factor = None
    if rope_type == "llama3":
        # megatron-core's scaling hard-codes Llama 3.1's constants; anything else would silently differ.
        expected = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
        if any(float(rope.get(k, v)) != v for k, v in expected.items()):
            raise ValueError(f"llama3 rope scaling with {rope} differs from megatron-core's fixed constants")
        factor = float(rope["factor"])
    elif rope_type != "default":
        raise ValueError(f"rope type {rope_type!r} is not supported by the megatron backend")
    if model_type == "qwen2":
        qkv_bias = True  # Qwen2 always has q/k/v biases and no other linear bias
    else:
        qkv_bias = bool(cfg.get("attention_bias", False))
        if qkv_bias:
            raise ValueError("attention_bias=true (a bias on o_proj too) is not supported by the megatron backend")
    if cfg.get("mlp_bias", False):
        raise ValueError("mlp_bias=true is not supported by the megatron backend")
    if cfg.get("use_sliding_window", False):
        raise ValueError("sliding-window attention is not supported by the megatron backend")
    return DecoderArch(
        model_type=model_type,
        num_layers=cfg["num_hidden_layers"],
        hidden_size=cfg["hidden_size"],
        ffn_hidden_size=cfg["intermediate_size"],
        num_heads=heads,
        num_kv_heads=cfg.get("num_key_value_heads") or heads,
        head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
        vocab_size=cfg["vocab_size"],
        tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        qkv_bias=qkv_bias,
        qk_norm=model_type == "qwen3",
        norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        rope_theta=float(rope.get("rope_theta", cfg.get("rope_theta", 10000.0))),
        rope_scaling_factor=factor,
        max_position_embeddings=cfg.get("max_position_embeddings", 4096),
    )


def tp_replicated(megatron_name: str) -> bool:
    """Whether a Megatron parameter is whole on every TP rank (the norms) rather than split across them."""
    return megatron_name.endswith(("layernorm.weight", "layer_norm_weight"))


def stage_layers(num_layers: int, pp_rank: int, pp_size: int) -> range:
    """The global layer indices a pipeline stage holds (an even split, megatron-core's default)."""
    per = num_layers // pp_size
    return range(pp_rank * per, (pp_rank + 1) * per)


# ---- fused tensors -------------------------------------------------------------------------------

def fuse_qkv(q: Tensor, k: Tensor, v: Tensor, arch: DecoderArch) -> Tensor:
    """HF q/k/v projections → Megatron's linear_qkv, grouped: per KV group its q heads, then k, then v.

    Shape: q (H·d, …), k and v (G·d, …) → (G·(H/G + 2)·d, …); weights (…=hidden) and biases (…=()).
    """
    g, d, rest = arch.num_kv_heads, arch.head_dim, q.shape[1:]
    q = q.reshape(g, arch.heads_per_group * d, *rest)
    return torch.cat([q, k.reshape(g, d, *rest), v.reshape(g, d, *rest)], dim=1).reshape(-1, *rest)


def split_qkv(qkv: Tensor, arch: DecoderArch) -> tuple[Tensor, Tensor, Tensor]:
    """The inverse of `fuse_qkv` on the full (all-rank) tensor. Shape: → q (H·d, …), k, v (G·d, …)."""
    g, d, rest = arch.num_kv_heads, arch.head_dim, qkv.shape[1:]
    q, k, v = qkv.reshape(g, -1, *rest).split([arch.heads_per_group * d, d, d], dim=1)
    return q.reshape(-1, *rest), k.reshape(-1, *rest), v.reshape(-1, *rest)


# ---- HF → Megatron ---------------------------------------------------------------------------------

def _shard(t: Tensor, dim: int, rank: int, size: int) -> Tensor:
    return t.chunk(size, dim=dim)[rank].contiguous()


def to_megatron(hf: Mapping[str, Tensor], arch: DecoderArch, tp_rank: int = 0, tp_size: int = 1,
                pp_rank: int = 0, pp_size: int = 1, fused_norms: bool = False) -> dict[str, Tensor]:
    """HF state dict → the Megatron `GPTModel` state dict of one (tp_rank, pp_rank), weights only.

    linear_qkv is sharded by whole query groups (a rank holds G/tp groups, each with its q, k, v), which
    is what fusing first and then taking a contiguous dim-0 slice gives.
    """
    arch.check_parallel(tp_size, pp_size)
    out: dict[str, Tensor] = {}

    def col(t: Tensor) -> Tensor:
        return _shard(t, 0, tp_rank, tp_size)

    if pp_rank == 0:
        out["embedding.word_embeddings.weight"] = col(hf["model.embed_tokens.weight"])
    if pp_rank == pp_size - 1:
        out["decoder.final_layernorm.weight"] = hf["model.norm.weight"].contiguous()
        if not arch.tie_embeddings:
            out["output_layer.weight"] = col(hf["lm_head.weight"])
    for local, i in enumerate(stage_layers(arch.num_layers, pp_rank, pp_size)):
        h, m = f"model.layers.{i}.", f"decoder.layers.{local}."
        attn, mlp = h + "self_attn.", h + "mlp."
        qkv = (fuse_qkv(hf[attn + "q_proj.weight"], hf[attn + "k_proj.weight"], hf[attn + "v_proj.weight"], arch))
        out[m + "self_attention.linear_qkv.weight"] = col(qkv)
        if arch.qkv_bias:
            bias = fuse_qkv(hf[attn + "q_proj.bias"], hf[attn + "k_proj.bias"], hf[attn + "v_proj.bias"], arch)
            out[m + "self_attention.linear_qkv.bias"] = col(bias)
        if arch.qk_norm:
            out[m + "self_attention.q_layernorm.weight"] = hf[attn + "q_norm.weight"].contiguous()
            out[m + "self_attention.k_layernorm.weight"] = hf[attn + "k_norm.weight"].contiguous()
        out[m + "self_attention.linear_proj.weight"] = _shard(hf[attn + "o_proj.weight"], 1, tp_rank, tp_size)
        out[m + "mlp.linear_fc1.weight"] = torch.cat([col(hf[mlp + "gate_proj.weight"]),
                                                      col(hf[mlp + "up_proj.weight"])])
        out[m + "mlp.linear_fc2.weight"] = _shard(hf[mlp + "down_proj.weight"], 1, tp_rank, tp_size)
        norms = NORM_NAMES[fused_norms]
        out[m + norms[0]] = hf[h + "input_layernorm.weight"].contiguous()
        out[m + norms[1]] = hf[h + "post_attention_layernorm.weight"].contiguous()
    return out



# ---- Megatron → HF ---------------------------------------------------------------------------------

def to_hf(shards: Sequence[Mapping[str, Tensor]], arch: DecoderArch, pp_rank: int = 0, pp_size: int = 1,
          fused_norms: bool = False) -> dict[str, Tensor]:
    """The state dicts of all TP ranks of one pipeline stage (rank order) → HF names and layout.

    Column-parallel shards are concatenated on dim 0 (fc1 split into gate/up per shard first),
    row-parallel on dim 1; replicated tensors are taken from rank 0. `_extra_state` entries are ignored.
    A tied model yields `model.embed_tokens.weight` and no `lm_head.weight` (what `save_pretrained` writes).
    """
    first = shards[0]

    def col(name: str) -> Tensor:
        return torch.cat([s[name] for s in shards], dim=0)

    def row(name: str) -> Tensor:
        return torch.cat([s[name] for s in shards], dim=1)

    out: dict[str, Tensor] = {}
    if "embedding.word_embeddings.weight" in first:
        out["model.embed_tokens.weight"] = col("embedding.word_embeddings.weight")
    if "decoder.final_layernorm.weight" in first:
        out["model.norm.weight"] = first["decoder.final_layernorm.weight"]
        if not arch.tie_embeddings:
            out["lm_head.weight"] = col("output_layer.weight")
    norms = NORM_NAMES[fused_norms]
    for local, i in enumerate(stage_layers(arch.num_layers, pp_rank, pp_size)):
        h, m = f"model.layers.{i}.", f"decoder.layers.{local}."
        attn, mlp = h + "self_attn.", h + "mlp."
        q, k, v = split_qkv(col(m + "self_attention.linear_qkv.weight"), arch)
        out.update({attn + "q_proj.weight": q, attn + "k_proj.weight": k, attn + "v_proj.weight": v})
        if arch.qkv_bias:
            q, k, v = split_qkv(col(m + "self_attention.linear_qkv.bias"), arch)
            out.update({attn + "q_proj.bias": q, attn + "k_proj.bias": k, attn + "v_proj.bias": v})
        if arch.qk_norm:
            out[attn + "q_norm.weight"] = first[m + "self_attention.q_layernorm.weight"]
            out[attn + "k_norm.weight"] = first[m + "self_attention.k_layernorm.weight"]
        out[attn + "o_proj.weight"] = row(m + "self_attention.linear_proj.weight")
        gates, ups = zip(*(s[m + "mlp.linear_fc1.weight"].chunk(2, dim=0) for s in shards))
        out[mlp + "gate_proj.weight"] = torch.cat(gates)
        out[mlp + "up_proj.weight"] = torch.cat(ups)
        out[mlp + "down_proj.weight"] = row(m + "mlp.linear_fc2.weight")
        out[h + "input_layernorm.weight"] = first[m + norms[0]]
        out[h + "post_attention_layernorm.weight"] = first[m + norms[1]]
    return {k: v.contiguous() for k, v in out.items()}

