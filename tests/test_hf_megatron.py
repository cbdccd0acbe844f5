"""HF ↔ Megatron weight layout (flux.integrations.megatron.hf_layout): pure tensor code, no megatron-core needed."""

import pytest
import torch

transformers = pytest.importorskip("transformers")

from flux.integrations.megatron.hf_layout import (
    NORM_NAMES,
    arch_from_hf_config,
    fuse_qkv,
    split_qkv,
    stage_layers,
    to_hf,
    to_megatron,
    tp_replicated,
)

SHAPE = {"vocab_size": 64, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 4,
         "num_attention_heads": 8, "num_key_value_heads": 4, "max_position_embeddings": 64}


def hf_model(family: str):
    torch.manual_seed(0)
    if family == "qwen2":
        cfg = transformers.Qwen2Config(tie_word_embeddings=True, **SHAPE)
        return transformers.Qwen2ForCausalLM(cfg)
    if family == "qwen3":  # head_dim ≠ hidden / heads, q/k norms, untied
        cfg = transformers.Qwen3Config(head_dim=16, tie_word_embeddings=False, **SHAPE)
        return transformers.Qwen3ForCausalLM(cfg)
    cfg = transformers.LlamaConfig(tie_word_embeddings=False, **SHAPE)
    return transformers.LlamaForCausalLM(cfg)


def randomised(model) -> dict:
    """The model's HF state dict (tied tensors once) with every value random, so no two rows agree."""
    g = torch.Generator().manual_seed(1)
    return {k: torch.randn(v.shape, generator=g) for k, v in model.state_dict().items()
            if not (k == "lm_head.weight" and model.config.tie_word_embeddings)}


@pytest.mark.parametrize("family", ["qwen2", "qwen3", "llama"])
def test_arch_from_hf_config(family):
    model = hf_model(family)
    arch = arch_from_hf_config(model.config.to_dict())
    assert (arch.num_layers, arch.num_heads, arch.num_kv_heads, arch.ffn_hidden_size) == (4, 8, 4, 96)
    assert arch.head_dim == (16 if family == "qwen3" else 8)
    assert arch.qkv_bias == (family == "qwen2") and arch.qk_norm == (family == "qwen3")
    assert arch.tie_embeddings == (family == "qwen2") and arch.rope_theta == 10000.0


def test_arch_rejects_what_megatron_would_compute_differently():
    base = hf_model("llama").config.to_dict()
    with pytest.raises(ValueError, match="model_type"):
        arch_from_hf_config({**base, "model_type": "gpt2"})
    with pytest.raises(ValueError, match="rope type"):
        arch_from_hf_config({**base, "rope_parameters": {"rope_type": "yarn", "factor": 4.0}})
    with pytest.raises(ValueError, match="attention_bias"):
        arch_from_hf_config({**base, "attention_bias": True})
    llama3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
              "original_max_position_embeddings": 8192, "rope_theta": 500000.0}
    arch = arch_from_hf_config({**base, "rope_parameters": llama3})
    assert arch.rope_scaling_factor == 8.0 and arch.rope_theta == 500000.0
    with pytest.raises(ValueError, match="constants"):
        arch_from_hf_config({**base, "rope_parameters": {**llama3, "high_freq_factor": 2.0}})
    with pytest.raises(ValueError, match="tensor_parallel=3"):
        arch_from_hf_config(base).check_parallel(3)


def test_qkv_is_grouped_per_query_group():
    """linear_qkv rows: [q heads of group 0, k0, v0, q heads of group 1, k1, v1, ...]."""
    arch = arch_from_hf_config(hf_model("llama").config.to_dict())  # 8 heads, 4 groups, head_dim 8
    d, hpg = arch.head_dim, arch.heads_per_group
    q = torch.arange(8)[:, None].repeat_interleave(d, 0).float()          # q head h → value h
    k = 100 + torch.arange(4)[:, None].repeat_interleave(d, 0).float()    # k head g → 100 + g
    v = 200 + torch.arange(4)[:, None].repeat_interleave(d, 0).float()
    fused = fuse_qkv(q, k, v, arch).reshape(4, hpg + 2, d)[..., 0]  # one value per head
    assert fused.tolist() == [[2 * g, 2 * g + 1, 100 + g, 200 + g] for g in range(4)]
    back = split_qkv(fuse_qkv(q, k, v, arch), arch)
    assert all(torch.equal(a, b) for a, b in zip(back, (q, k, v)))


@pytest.mark.parametrize("family", ["qwen2", "qwen3", "llama"])
@pytest.mark.parametrize("tp", [1, 2, 4])
@pytest.mark.parametrize("fused_norms", [False, True])
def test_round_trip_is_bit_exact(family, tp, fused_norms):
    model = hf_model(family)
    arch = arch_from_hf_config(model.config.to_dict())
    hf = randomised(model)
    shards = [to_megatron(hf, arch, r, tp, fused_norms=fused_norms) for r in range(tp)]
    assert all(s.keys() == shards[0].keys() for s in shards)
    assert shards[0]["decoder.layers.0.self_attention.linear_qkv.weight"].shape == \
        ((arch.num_heads + 2 * arch.num_kv_heads) * arch.head_dim // tp, arch.hidden_size)
    assert shards[0]["decoder.layers.0.mlp.linear_fc2.weight"].shape == (arch.hidden_size, 96 // tp)
    assert ("output_layer.weight" in shards[0]) != arch.tie_embeddings
    assert f"decoder.layers.0.{NORM_NAMES[fused_norms][0]}" in shards[0]
    for name, t in shards[0].items():  # replicated = the same tensor on every rank; split = not
        assert tp_replicated(name) == all(torch.equal(s[name], t) for s in shards) or tp == 1, name
    back = to_hf(shards, arch, fused_norms=fused_norms)
    assert back.keys() == hf.keys()
    assert all(torch.equal(back[k], hf[k]) for k in hf)


def test_tp_shards_are_the_column_and_row_slices():
    """Rank r of TP=2 holds the first/second half of gate, of up (fc1), of down's columns, of the vocab."""
    model = hf_model("llama")
    arch = arch_from_hf_config(model.config.to_dict())
    hf = randomised(model)
    r1 = to_megatron(hf, arch, 1, 2)
    gate, up = r1["decoder.layers.2.mlp.linear_fc1.weight"].chunk(2)
    assert torch.equal(gate, hf["model.layers.2.mlp.gate_proj.weight"][48:])
    assert torch.equal(up, hf["model.layers.2.mlp.up_proj.weight"][48:])
    assert torch.equal(r1["decoder.layers.2.mlp.linear_fc2.weight"], hf["model.layers.2.mlp.down_proj.weight"][:, 48:])
    assert torch.equal(r1["decoder.layers.2.self_attention.linear_proj.weight"],
                       hf["model.layers.2.self_attn.o_proj.weight"][:, 32:])
    assert torch.equal(r1["embedding.word_embeddings.weight"], hf["model.embed_tokens.weight"][32:])
    assert torch.equal(r1["output_layer.weight"], hf["lm_head.weight"][32:])


@pytest.mark.parametrize("tp", [1, 2])
def test_pipeline_stages_cover_the_model_once(tp):
    model = hf_model("qwen3")
    arch = arch_from_hf_config(model.config.to_dict())
    hf = randomised(model)
    assert [list(stage_layers(4, r, 2)) for r in range(2)] == [[0, 1], [2, 3]]
    merged: dict = {}
    for pp_rank in range(2):
        shards = [to_megatron(hf, arch, r, tp, pp_rank, 2) for r in range(tp)]
        assert ("embedding.word_embeddings.weight" in shards[0]) == (pp_rank == 0)
        assert ("decoder.final_layernorm.weight" in shards[0]) == (pp_rank == 1)
        assert "decoder.layers.1.mlp.linear_fc1.weight" in shards[0]
        assert not any(k.startswith("decoder.layers.2.") for k in shards[0])  # local numbering per stage
        part = to_hf(shards, arch, pp_rank, 2)
        assert not merged.keys() & part.keys()
        merged.update(part)
    assert merged.keys() == hf.keys() and all(torch.equal(merged[k], hf[k]) for k in hf)
