"""The megatron-core training backend: a `GPTModel` built from an HF config, tensor and pipeline parallel, HF
weights in and out. The one module of Flux that imports `megatron.core`, and only inside functions, so importing it
(and `flux`) needs no megatron-core.

What megatron-core provides here: the model (local layer spec on CPU, the Transformer Engine spec when TE is
installed and the device is CUDA), tensor-parallel layers and the vocab-parallel cross-entropy that gives
per-token log-probs through the model's labels path. What Flux keeps: the micro-batching, loss weighting and
`step` of the `Learner` base class (losses from the algorithm registry, unchanged), AdamW over each rank's shards
with a gradient norm taken over the whole model, and checkpoints in HF format; with pipeline_parallel > 1 the
step runs megatron's 1F1B schedule over the same micro-batches and weighting (`step`, `_pipeline`). Megatron's
own DDP and distributed optimizer are not used: with `learner.ranks` = tensor_parallel x PP x DP, the base class's
exact data parallelism (flux/integrations/distributed/data_parallel.py) runs over megatron's data-parallel
group (each DP rank its rows; gradients summed over that group before the clip).

Ranks: every rank of the model-parallel group builds a `MegatronLearner` with the same arguments and
calls the same methods in the same order (SPMD); `export_weights` and `save` gather the shards and stages.
One process alone (TP = PP = 1) needs no setup: a single-rank gloo group is made in-process.

CPU (the default device, and what CI tests): megatron-core 0.16 places a few tensors on
`torch.cuda.current_device()` (the RoPE frequencies, the attention score buffer) and builds its default
causal mask on "cuda". A CPU learner therefore points `torch.cuda.current_device` at the CPU while it
builds the model and while it runs forward passes (`cpu_current_device`, restored after each), passes an
explicit causal mask, seeds with megatron's inference RNG tracker (no CUDA RNG to fork; dropout is 0) and
builds the weights on the CPU; the pipeline schedule's few CUDA calls are sent to the CPU the same way
(`cpu_current_device`). These are the only CPU accommodations, and they are in the product path on
purpose: `flux train --set learner.backend=megatron` runs on a CPU machine exactly as the tests run it.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from flux.integrations.megatron.hf_layout import (
    DecoderArch,
    arch_from_hf_config,
    to_hf,
    to_megatron,
    tp_replicated,
)
from flux.learner.base import Learner, accumulate
from flux.learner.torch_learner import TOKENIZER_FILES, TrainBatch


def megatron_available() -> bool:
    """Whether megatron-core is installed (without importing it)."""
    try:
        return importlib.util.find_spec("megatron.core") is not None
    except ModuleNotFoundError:
        return False


def check_setup(model_path: str | Path, tensor_parallel: int = 1, pipeline_parallel: int = 1) -> None:
    """What `flux train` checks before any actor starts: megatron-core is installed and the model's family
    and split are supported. Raises ValueError with a one-line reason."""
    if not megatron_available():
        raise ValueError("megatron-core is not installed: pip install 'flux-rlhf[megatron]'")
    arch_from_hf_config(json.loads((Path(model_path) / "config.json").read_text())).check_parallel(
        tensor_parallel, pipeline_parallel)


@contextmanager
def cpu_current_device(on: bool = True):
    """While active (and `on`), `torch.cuda.current_device()` — where megatron-core 0.16 puts RoPE
    frequencies, attention buffers and pipeline receive buffers — is the CPU; `Tensor.cuda()` (called on a
    tied embedding's last-stage copy) leaves a tensor where it is; `torch.zeros(device="cuda")` (the
    pipeline schedule's token counter) is a CPU tensor and `torch.cuda.synchronize()` (after its shape
    exchange) does nothing. Held only around the CPU learner's model building and forward/backward
    passes, so nothing else in the process (a GPU engine, say) is affected."""
    if not on:
        yield
        return
    saved = torch.cuda.current_device, torch.Tensor.cuda, torch.zeros, torch.cuda.synchronize
    zeros = torch.zeros
    torch.cuda.current_device = lambda: torch.device("cpu")
    torch.Tensor.cuda = lambda self, *args, **kwargs: self
    torch.zeros = lambda *args, device=None, **kwargs: zeros(*args, device="cpu" if device == "cuda" else device,
                                                             **kwargs)
    torch.cuda.synchronize = lambda *args, **kwargs: None
    try:
        yield
    finally:
        torch.cuda.current_device, torch.Tensor.cuda, torch.zeros, torch.cuda.synchronize = saved


def init_parallel(tensor_parallel: int, seed: int, device: torch.device, pipeline_parallel: int = 1) -> None:
    """Process group (a single-rank gloo one if none exists) → megatron's model-parallel groups → seeds."""
    from megatron.core import parallel_state
    from megatron.core import tensor_parallel as mtp

    model_parallel = tensor_parallel * pipeline_parallel
    if not dist.is_initialized():
        if model_parallel != 1:
            raise RuntimeError(f"tensor_parallel x pipeline_parallel = {model_parallel} needs torch.distributed "
                               f"initialised with {model_parallel} ranks before MegatronLearner is built")
        dist.init_process_group("gloo" if device.type == "cpu" else "nccl", store=dist.HashStore(),
                                rank=0, world_size=1)
    if parallel_state.model_parallel_is_initialized():
        if (parallel_state.get_tensor_model_parallel_world_size(),
                parallel_state.get_pipeline_model_parallel_world_size()) != (tensor_parallel, pipeline_parallel):
            raise RuntimeError("megatron's model-parallel groups already exist with another TP or PP size")
    else:
        if dist.get_world_size() % model_parallel:
            raise RuntimeError(f"tensor_parallel x pipeline_parallel = {model_parallel} does not divide the "
                               f"{dist.get_world_size()} ranks of torch.distributed")
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=tensor_parallel,
                                                 pipeline_model_parallel_size=pipeline_parallel)
    mtp.model_parallel_cuda_manual_seed(seed, inference_rng_tracker=device.type == "cpu")


def tied_no_decay(no_decay: tuple[str, ...], tied: bool, pipeline_parallel: int) -> tuple[str, ...]:
    """`learner.no_decay` for a model whose tied embedding is two tensors across pipeline stages (the first
    stage's `embedding.word_embeddings`, the last's `output_layer`): a name that exempts one from weight
    decay exempts both, or the two copies of one parameter would drift apart."""
    names = ("embedding.word_embeddings.weight", "output_layer.weight")
    if tied and pipeline_parallel > 1 and any(k.lower() in n for k in no_decay for n in names):
        return (*no_decay, "word_embeddings", "output_layer")
    return no_decay


def parallel_state_model_group():
    """The ranks of one model replica (its TP x PP ranks)."""
    from megatron.core import parallel_state

    return parallel_state.get_model_parallel_group()


def build_gpt(arch: DecoderArch, tensor_parallel: int, dtype: torch.dtype, transformer_engine: bool,
              pipeline_parallel: int = 1, first: bool = True, last: bool = True):
    """A megatron-core `GPTModel` of `arch` (the pipeline stage that is `first` and/or `last`) with
    uninitialised weights (they are loaded next)."""
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt import gpt_layer_specs as specs
    from megatron.core.transformer import TransformerConfig

    config = TransformerConfig(
        num_layers=arch.num_layers, hidden_size=arch.hidden_size, ffn_hidden_size=arch.ffn_hidden_size,
        num_attention_heads=arch.num_heads, num_query_groups=arch.num_kv_heads, kv_channels=arch.head_dim,
        normalization="RMSNorm", layernorm_epsilon=arch.norm_eps, qk_layernorm=arch.qk_norm,
        gated_linear_unit=True, activation_func=F.silu, add_bias_linear=False, add_qkv_bias=arch.qkv_bias,
        hidden_dropout=0.0, attention_dropout=0.0, attention_softmax_in_fp32=True,
        tensor_model_parallel_size=tensor_parallel, params_dtype=dtype, bf16=dtype == torch.bfloat16,
        # Pipeline stages exchange activations whose shape varies with the micro-batch (sent first), and
        # each micro-batch's loss arrives already weighted by its share of the batch (no averaging).
        # (The MoE dispatcher is never used by these dense models; its default refuses variable lengths.)
        pipeline_model_parallel_size=pipeline_parallel, pipeline_dtype=dtype, variable_seq_lengths=True,
        calculate_per_token_loss=True, batch_p2p_comm=False, moe_token_dispatcher_type="alltoall",
        use_cpu_initialization=True, perform_initialization=False,
        # The fused kernels are CUDA-only; on GPU TE brings its own.
        bias_activation_fusion=False, bias_dropout_fusion=False, masked_softmax_fusion=False,
        apply_rope_fusion=False, persist_layer_norm=False, gradient_accumulation_fusion=False,
        cross_entropy_loss_fusion=False,
    )
    if transformer_engine:
        spec = specs.get_gpt_layer_with_transformer_engine_spec(qk_layernorm=arch.qk_norm)
    else:
        spec = specs.get_gpt_layer_local_spec(qk_layernorm=arch.qk_norm, normalization="RMSNorm")
    return GPTModel(config, spec, vocab_size=arch.vocab_size, max_sequence_length=arch.max_position_embeddings,
                    position_embedding_type="rope", rotary_base=arch.rope_theta,
                    rope_scaling=arch.rope_scaling_factor is not None,
                    rope_scaling_factor=arch.rope_scaling_factor or 8.0,
                    share_embeddings_and_output_weights=arch.tie_embeddings, parallel_output=True,
                    pre_process=first, post_process=last)


def read_hf_weights(path: str | Path) -> dict[str, Tensor]:
    """Every tensor of an HF checkpoint directory's *.safetensors files (one file or an index's shards)."""
    from safetensors.torch import load_file

    files = sorted(Path(path).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{path}: no *.safetensors weights")
    out: dict[str, Tensor] = {}
    for f in files:
        out.update(load_file(f))
    return out


class MegatronLearner(Learner):
    """The `Learner` (flux/learner/base.py) over a megatron-core `GPTModel` (Llama / Qwen2 / Qwen3 checkpoints).

    `logprobs`, `ref_logprobs`, `step(loss_fn, batch, micro_batches)` and the micro-batch options are the
    base class's, as for `TorchLearner`; `export_weights` returns HF names and layouts (tensor-parallel shards merged), `save`
    writes an HF checkpoint that `AutoModelForCausalLM` loads. Rows must be right-padded (RoPE positions are
    0..L-1 in Megatron), which is what `TrainBatch.from_samples` builds.
    """

    def __init__(self, model_path: str, *, tensor_parallel: int = 1, pipeline_parallel: int = 1,
                 device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                 gradient_checkpointing: bool = False, ranks=None, **kwargs):
        if not megatron_available():
            raise ImportError("megatron-core is not installed: pip install 'flux-rlhf[megatron]'")
        if gradient_checkpointing:
            raise ValueError("gradient_checkpointing is not supported by the megatron backend yet")
        device = torch.device(device)
        self.arch = arch_from_hf_config(json.loads((Path(model_path) / "config.json").read_text()))
        self.arch.check_parallel(tensor_parallel, pipeline_parallel)
        self.tensor_parallel, self.pipeline_parallel = tensor_parallel, pipeline_parallel
        # Transformer Engine only on CUDA (and only if installed); the local spec elsewhere.
        self.transformer_engine = device.type == "cuda" and importlib.util.find_spec("transformer_engine") is not None
        init_parallel(tensor_parallel, kwargs.get("seed", 0), device, pipeline_parallel)
        from megatron.core import parallel_state

        self.tp_group = parallel_state.get_tensor_model_parallel_group()
        self.tp_rank = parallel_state.get_tensor_model_parallel_rank()
        self.pp_group = parallel_state.get_pipeline_model_parallel_group()
        self.pp_rank = parallel_state.get_pipeline_model_parallel_rank()
        self.first, self.last = self.pp_rank == 0, self.pp_rank == pipeline_parallel - 1
        self.pp_last_rank = parallel_state.get_pipeline_model_parallel_last_rank()  # (global rank)
        self.dp_rank = parallel_state.get_data_parallel_rank()
        dp = parallel_state.get_data_parallel_world_size()
        if dp > 1:  # the base class's data parallelism, over megatron's data-parallel group
            from flux.integrations.distributed.data_parallel import RankGroup

            kwargs["ranks"] = RankGroup(self.dp_rank, dp, ranks.store if ranks else None, device=device,
                                        cpu_group=parallel_state.get_data_parallel_group_gloo(),
                                        group=parallel_state.get_data_parallel_group())
        kwargs["no_decay"] = tied_no_decay(tuple(kwargs.get("no_decay", ("bias", "norm"))), self.arch.tie_embeddings,
                                           pipeline_parallel)
        # With TP or PP > 1 weights leave through collectives: every rank calls export_weights and save (the
        # learner actor's `follow`), and rank 0 evaluates on a twin holding the last exported weights.
        self.collective = tensor_parallel * pipeline_parallel > 1
        self._eval_twin: torch.nn.Module | None = None
        self._latest: dict[str, Tensor] | None = None
        with cpu_current_device(device.type == "cpu"):
            super().__init__(model_path, device=device, dtype=dtype, **kwargs)

    # ---- the model ----------------------------------------------------------------------------------
    def _load_model(self, path: str, dtype: torch.dtype) -> torch.nn.Module:
        model = build_gpt(self.arch, self.tensor_parallel, dtype, self.transformer_engine, self.pipeline_parallel,
                          self.first, self.last)
        self._load_hf_weights(model, read_hf_weights(path))
        if self.temperature != 1.0 and self.last:
            # Scaling the last hidden state by 1/T scales the logits by 1/T, and keeps the labels path.
            model.output_layer.register_forward_pre_hook(lambda _, args: (args[0] / self.temperature, *args[1:]))
        return model

    def _load_hf_weights(self, model: torch.nn.Module, hf: dict[str, Tensor]) -> None:
        shard = to_megatron(hf, self.arch, self.tp_rank, self.tensor_parallel, self.pp_rank, self.pipeline_parallel,
                            fused_norms=self.transformer_engine)
        if self.arch.tie_embeddings and self.last and not self.first:  # the last stage's copy of the embedding
            shard["output_layer.weight"] = to_megatron(hf, self.arch, self.tp_rank, self.tensor_parallel)[
                "embedding.word_embeddings.weight"]
        missing, unexpected = model.load_state_dict(shard, strict=False)
        missing = [k for k in missing if not k.endswith("_extra_state")]
        if missing or unexpected:
            raise RuntimeError(f"HF weights do not fit the Megatron model: missing {missing}, "
                               f"unexpected {unexpected}")

    def _forward(self, model: torch.nn.Module, mb: TrainBatch) -> Tensor:
        """Per-token log-probs from the labels path: the model returns −log p(label) per position, (b, L)."""
        return self._logprobs_of(self._stage(model, mb), mb)

    @staticmethod
    def _logprobs_of(nll: Tensor, mb: TrainBatch) -> Tensor:
        lp = F.pad(-nll[:, :-1].float(), (1, 0))
        return torch.where(mb.response_mask > 0, lp, torch.zeros_like(lp))

    def _stage(self, model: torch.nn.Module, mb: TrainBatch) -> Tensor:
        """This pipeline stage's output: −log p(label) per position, (b, L), on the last stage; the hidden
        states the next stage takes (its input arrives through megatron's schedule) elsewhere."""
        ids, attn = mb.input_ids, mb.attention_mask.bool()
        if (attn[:, 1:] & ~attn[:, :-1]).any():
            raise ValueError("the megatron backend needs right-padded rows (a pad token precedes a real one)")
        b, length = ids.shape
        position_ids = torch.arange(length, device=ids.device).expand(b, length)
        labels = F.pad(ids[:, 1:], (0, 1))  # the label at t is token t+1; the last position's is a dummy
        # True = masked. Right padding: the causal mask alone keeps real tokens off the padding.
        causal = None
        if ids.device.type == "cpu":  # megatron's default mask is built on "cuda"
            causal = torch.ones(length, length, dtype=torch.bool, device=ids.device).triu(1)[None, None]
        with cpu_current_device(ids.device.type == "cpu"):
            return model(ids, position_ids, causal, labels=labels)

    # ---- pipeline parallel: megatron's 1F1B schedule instead of the shared micro-batch loop -----------
    def _pipeline(self, model: torch.nn.Module, mbs: list, loss_fn=None, total: float = 1.0) -> list:
        """Run micro-batches `mbs` [(rows, micro-batch, cols)] through the stages (forward only without a
        `loss_fn`). On the last stage, per micro-batch: (rows, cols, log-probs, weighted loss, stats, share);
        [] elsewhere. Each micro-batch loss is weighted by its share of the batch's tokens, as in `step`."""
        from megatron.core.pipeline_parallel import get_forward_backward_func

        out: list = []

        def forward_step(data, model):
            rows, mb, cols = next(data)
            mb = mb.to(self.device)

            def loss_func(nll):
                lp = self._logprobs_of(nll, mb)
                if loss_fn is None:
                    out.append((rows, cols, lp.cpu(), 0.0, {}, 0.0))
                    return nll.sum() * 0.0, torch.tensor(1), {}
                if mb.proximal_logprobs is None:  # (fill_proximal: the policy before this step is this one)
                    mb.proximal_logprobs = lp.detach()
                loss, stats = loss_fn(logprobs=lp, mask=mb.response_mask, batch=mb)
                share = float(mb.response_mask.sum()) / total
                out.append((rows, cols, lp.detach().cpu(), float(loss.detach()) * share, stats, share))
                return loss * share, torch.tensor(1), {}

            return self._stage(model, mb), loss_func

        if mbs:
            with cpu_current_device(self.device.type == "cpu"):
                get_forward_backward_func()(
                    forward_step_func=forward_step, data_iterator=iter(mbs), model=[model],
                    num_microbatches=len(mbs), seq_length=max(m.input_ids.shape[1] for _, m, _ in mbs),
                    micro_batch_size=max(len(m) for _, m, _ in mbs), forward_only=loss_fn is None)
        return out

    def _from_last_stage(self, obj):
        """The last pipeline stage's `obj` on every stage."""
        box = [obj]
        dist.broadcast_object_list(box, src=self.pp_last_rank, group=self.pp_group)
        return box[0]

    def _usable(self, batch: TrainBatch, parts) -> list:
        """[(rows, trimmed micro-batch, cols)] of the micro-batches that have response tokens."""
        mbs = [(rows, *self._trimmed(batch, rows)) for rows in parts]
        return [(rows, mb, cols) for rows, mb, cols in mbs if float(mb.response_mask.sum()) > 0]

    def _logprobs_with(self, model: torch.nn.Module, batch: TrainBatch) -> Tensor:
        if self.pipeline_parallel == 1:
            return super()._logprobs_with(model, batch)
        lp = torch.zeros(batch.input_ids.shape, dtype=torch.float32)
        with torch.no_grad():
            for rows, cols, part, *_ in self._from_last_stage(self._pipeline(model, self._usable(
                    batch, self._my_micro_batches(batch)))):
                lp[rows, cols] = part
        return self.ranks.sum_(lp).to(batch.input_ids.device)  # (rows: one data-parallel rank each)

    def step(self, loss_fn, batch: TrainBatch, micro_batches=None, fill_proximal: bool = False) -> dict[str, float]:
        """`Learner.step` through megatron's pipeline schedule when pipeline_parallel > 1 (the same weighting,
        proximal log-probs, gradient sums over the data-parallel ranks, clip and AdamW step)."""
        if self.pipeline_parallel == 1:
            return super().step(loss_fn, batch, micro_batches, fill_proximal)
        self.model.train()
        self._zero_grad()
        parts = micro_batches if micro_batches is not None else self._my_micro_batches(batch)
        done = self._from_last_stage(self._pipeline(self.model, self._usable(batch, parts), loss_fn,
                                                    float(batch.response_mask.sum())))
        acc: dict[str, float] = {}
        proximal = torch.zeros(batch.input_ids.shape, dtype=torch.float32)
        for rows, cols, lp, _, stats, share in done:
            proximal[rows, cols] = lp
            accumulate(acc, stats, share)
        if fill_proximal:
            batch.proximal_logprobs = self.ranks.sum_(proximal).to(batch.input_ids.device)
        self._sync_tied_embedding_grads()
        return self._finish_step(acc, sum(d[3] for d in done))

    def _sync_tied_embedding_grads(self) -> None:
        """Tied embeddings across stages: the first stage's embedding and the last stage's output layer are
        one parameter, so their gradients are summed over the two (megatron's embedding group)."""
        if not (self.arch.tie_embeddings and self.pipeline_parallel > 1 and (self.first or self.last)):
            return
        from megatron.core import parallel_state

        weight = self.model.embedding.word_embeddings.weight if self.first else self.model.output_layer.weight
        if weight.grad is None:
            weight.grad = torch.zeros_like(weight)
        dist.all_reduce(weight.grad, group=parallel_state.get_embedding_group())

    def _clip_gradients(self) -> float:
        """Clip to max_grad_norm by the norm of the whole model: sharded gradients summed over the TP group,
        replicated ones (norms; identical on every rank) counted once, the stages' summed over the pipeline
        (a tied embedding's copy on the last stage not counted again)."""
        # By name: megatron-core marks split parameters only when it initialises them, which we skip.
        copy = "output_layer.weight" if self.arch.tie_embeddings and self.last and not self.first else None
        grads = [(p.grad, not tp_replicated(name), name != copy) for name, p in self.model.named_parameters()
                 if p.grad is not None]
        if not grads:
            return 0.0
        sq = torch.zeros(2, dtype=torch.float64, device=self.device)  # [sharded, replicated]
        for g, sharded, counted in grads:
            sq[0 if sharded else 1] += g.detach().double().pow(2).sum() if counted else 0.0
        if self.tensor_parallel > 1:
            dist.all_reduce(sq[:1], group=self.tp_group)
        if self.pipeline_parallel > 1:
            dist.all_reduce(sq, group=self.pp_group)
        norm = float(sq.sum().sqrt())
        if self.max_grad_norm and self.max_grad_norm > 0:
            scale = min(1.0, self.max_grad_norm / (norm + 1e-6))  # as torch's clip_grad_norm_
            if scale < 1.0:
                for g, *_ in grads:
                    g.mul_(scale)
        return norm

    # ---- weights and checkpoints ----------------------------------------------------------------------
    def _local_state(self) -> dict[str, Tensor]:
        return {k: v.detach() for k, v in self.model.state_dict().items()
                if isinstance(v, Tensor) and not k.endswith("_extra_state")}

    def export_weights(self, device: str | torch.device | None = None) -> dict[str, Tensor]:
        """The whole model under HF names and layouts (collective when TP or PP > 1: the TP shards are merged
        on every rank, the pipeline stages' layers collected on the first stage; other stages get {})."""
        local = self._local_state()
        shards = [local]
        if self.tensor_parallel > 1:
            shards = [{} for _ in range(self.tensor_parallel)]
            for name, t in local.items():
                parts = [torch.empty_like(t) for _ in range(self.tensor_parallel)]
                dist.all_gather(parts, t.contiguous(), group=self.tp_group)
                for shard, part in zip(shards, parts):
                    shard[name] = part
        hf = to_hf(shards, self.arch, self.pp_rank, self.pipeline_parallel, fused_norms=self.transformer_engine)
        if self.pipeline_parallel > 1:
            from megatron.core import parallel_state

            stages: list | None = [None] * self.pipeline_parallel if self.first else None
            dist.gather_object({k: v.cpu() for k, v in hf.items()}, stages, group=self.pp_group,
                               dst=parallel_state.get_pipeline_model_parallel_first_rank())
            hf = {k: v.to(self.device) for stage in stages or () for k, v in stage.items()}
        out = {k: (v.to(device) if device is not None else v).contiguous() for k, v in hf.items()}
        self._latest = out if self.collective and dist.get_rank() == 0 else None  # (rank 0 evaluates)
        return out

    def eval_model(self) -> torch.nn.Module:
        """An HF twin of the model (built on first use) holding the current weights. With TP or PP > 1 (where
        an export is a collective) the weights of the last `export_weights`: the ones just published."""
        from flux.hf import from_pretrained

        weights = self._latest if self.collective else self.export_weights()
        if self._eval_twin is None:
            self._eval_twin = from_pretrained(self.model_path, next(self.model.parameters()).dtype).to(self.device)
            self._eval_twin.requires_grad_(False)
        if weights is not None:
            self._eval_twin.load_state_dict(weights, strict=not self.arch.tie_embeddings)
            self._latest = None
        return self._eval_twin

    def save(self, path: str | Path) -> Path:
        """HF checkpoint (config + model.safetensors + tokenizer files, by rank 0), one optimizer file per
        TP rank and pipeline stage, trainer_state.json. Collective when TP or PP > 1."""
        from safetensors.torch import save_file

        path = Path(path)
        weights = self.export_weights(device="cpu")
        if self.tp_rank == 0 and self.dp_rank == 0 and self.first:
            path.mkdir(parents=True, exist_ok=True)
            save_file(weights, str(path / "model.safetensors"), metadata={"format": "pt"})
            src = Path(self.model_path)
            for name in ("config.json", "generation_config.json", *TOKENIZER_FILES):
                if (src / name).is_file() and not (path / name).exists():
                    shutil.copy2(src / name, path / name)
            state = {"step": self.step_count, "model_path": self.model_path, "seed": self.seed,
                     "lr": self.optimizer.param_groups[0]["lr"], "temperature": self.temperature,
                     "backend": "megatron", "tensor_parallel": self.tensor_parallel,
                     "pipeline_parallel": self.pipeline_parallel}
            (path / "trainer_state.json").write_text(json.dumps(state, indent=2))
        self._barrier()
        if self.dp_rank == 0:  # (the data-parallel replicas hold the same state)
            torch.save(self.optimizer.state_dict(), path / self._optimizer_file())
        self._barrier()
        return path

    def load(self, path: str | Path) -> dict[str, Any]:
        """Restore weights (any HF checkpoint of this architecture), this rank's optimizer state and the step."""
        path = Path(path)
        with torch.no_grad():
            self._load_hf_weights(self.model, read_hf_weights(path))
        opt = path / self._optimizer_file()
        if opt.exists():
            self.optimizer.load_state_dict(torch.load(opt, map_location=self.device))
        state_file = path / "trainer_state.json"
        state = json.loads(state_file.read_text()) if state_file.exists() else {}
        self.step_count = int(state.get("step", 0))
        return state

    def _optimizer_file(self) -> str:
        """This rank's AdamW state file: one per TP rank (and pipeline stage)."""
        return f"optimizer_tp{self.tp_rank}" + (f"_pp{self.pp_rank}" if self.pipeline_parallel > 1 else "") + ".pt"

    def _barrier(self) -> None:
        if self.tensor_parallel * self.pipeline_parallel > 1:
            dist.barrier(group=parallel_state_model_group())
