"""NemotronV3Model (the backbone) and NemotronHForCausalLM (backbone + lm_head [+ MTP head]).

The public surface follows NeMo AutoModel's ``nemotron_v3`` model page. The forward reads like the
math; parallelism (FSDP2, activation checkpointing, pipeline stages) is applied from outside.
In-memory names follow that page (``model.embed_tokens``, ``model.layers.N``, ``model.norm``); the
Hugging Face checkpoint names (``backbone.embeddings`` ...) are a rename in ``checkpoint.py``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers.generation import GenerationMixin
from transformers.modeling_outputs import CausalLMOutputWithPast

from ..backend import BackendConfig
from ..batch import BatchMeta, causal_bool_mask, make_batch_meta
from ..config import ATTENTION, MAMBA, MLP as MLP_T, MOE, NemotronHConfig
from ..dtypes import cast_model
from ..errors import InputError
from ..ops import triton_ce
from .attention import Attention
from .linear import Linear
from .mamba2 import Mamba2
from .mlp import MLP
from .moe import MoE
from .norms import RMSNorm


# Inference folds RMSNorms into the MoE decode kernels (``Block.forward_folding_norms``); a switch for
# benchmarks (``benchmarks/gpu_ab.py``) and tests.
FOLD_NORMS = True


def make_mixer(block_type: str, config: NemotronHConfig, layer_idx: int, backend: BackendConfig) -> nn.Module:
    if block_type == MAMBA:
        return Mamba2(config, layer_idx, backend)
    if block_type == ATTENTION:
        return Attention(config, layer_idx, backend)
    if block_type == MLP_T:
        return MLP(config.hidden_size, config.intermediate_size, bias=config.mlp_bias)
    if block_type == MOE:
        return MoE(config, experts_impl=backend.experts)
    raise InputError(f"unknown block type {block_type!r}")


class Block(nn.Module):
    """Pre-norm residual block holding exactly one mixer: ``x + mixer(RMSNorm(x))``."""

    def __init__(self, config: NemotronHConfig, layer_idx: int, block_type: str, backend: BackendConfig) -> None:
        super().__init__()
        self.block_type = block_type
        self.layer_idx = layer_idx
        self.norm = RMSNorm(config.hidden_size, config.layer_norm_epsilon)
        self.mixer = make_mixer(block_type, config, layer_idx, backend)

    def forward(self, x: torch.Tensor, meta: BatchMeta, cache=None) -> torch.Tensor:
        # The mixer adds x to its output projection (often inside that GEMM: see add_linear).
        return self.mixer(self.norm(x), meta, cache, residual=x)

    def forward_folding_norms(self, x: torch.Tensor, meta: BatchMeta, cache, normed: torch.Tensor | None,
                              next_norm: nn.Module | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``forward`` for inference (``run_layers``), where a block may fold norms into its kernels:
        ``normed`` is ``self.norm(x)`` when the previous block already computed it; returns (output,
        ``next_norm(output)`` or None). Only MoE blocks at decode fold (``MoE.decode_with_norms``)."""
        if type(self.norm) is RMSNorm and isinstance(self.mixer, MoE) and type(next_norm) in (RMSNorm, type(None)):
            done = self.mixer.decode_with_norms(x, self.norm, normed, next_norm)
            if done is not None:
                return done
        return self.mixer(self.norm(x) if normed is None else normed, meta, cache, residual=x), None


@torch.no_grad()
def init_block(block: Block, config: NemotronHConfig, num_layers: int) -> None:
    std = config.initializer_range
    block.norm.reset_parameters()
    mixer = block.mixer
    if isinstance(mixer, Mamba2):
        mixer.reset_parameters(num_layers, std, config.rescale_prenorm_residual)
        return
    if isinstance(mixer, MoE):
        mixer.gate.reset_parameters(std)
        mixer.experts.reset_parameters(std)
    for m in mixer.modules():
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


class NemotronV3Model(nn.Module):
    """NemotronV3 base model (without LM head): embeddings, hybrid blocks, final norm.

    ``moe_overrides``: ``{key: value}`` over the config's MoE keys (``MOE_OVERRIDE_KEYS``), applied to a
    copy of ``config`` that becomes ``self.config``. ``moe_config`` (NeMo's ``MoEConfig``) is refused:
    the MoE layers are built from the config alone; see ``apply_moe_args``."""

    def __init__(self, config: NemotronHConfig, backend: BackendConfig | None = None,
                 moe_config: Any = None, moe_overrides: dict | None = None) -> None:
        super().__init__()
        config = apply_moe_args(config, moe_config, moe_overrides)
        self.config = config
        self.backend = backend or BackendConfig()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        # A ModuleDict keyed by the layer index keeps checkpoint names stable when a pipeline
        # splitter removes the layers another stage owns.
        self.layers = nn.ModuleDict({
            str(i): Block(config, i, t, self.backend) for i, t in enumerate(config.layers_block_type)
        })
        self.norm = RMSNorm(config.hidden_size, config.layer_norm_epsilon)
        for m in self.modules():
            if isinstance(m, Linear):
                m.backend = self.backend  # shared: a later change of model.backend.linear applies

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        causal_mask_mapping: dict[str, torch.Tensor] | None = None,
        inputs_embeds: torch.Tensor | None = None,
        past_key_values=None,
        cache_position: torch.LongTensor | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        """Supports BSHD ``[B, S]`` and THD ``[T]`` / ``[1, T]`` with ``cu_seqlens``; returns hidden states,
        ``[B, S, H]``, or ``[T, H]`` for flat THD input (``[T]`` ids or ``[T, H]`` embeddings), as the
        reference page states.

        The masks and packing keywords (``causal_mask_mapping``, ``padding_mask`` with True = padding,
        ``seq_idx``, ``_packed_seq_ids``, ...) are as in ``NemotronHForCausalLM.forward``."""
        if self.embed_tokens is None:  # a later pipeline stage receives hidden states
            inputs_embeds, input_ids = input_ids, None
        if (input_ids is None) == (inputs_embeds is None):
            raise InputError("pass exactly one of input_ids or inputs_embeds")
        flat = input_ids.dim() == 1 if input_ids is not None else inputs_embeds.dim() == 2
        if input_ids is not None:
            if input_ids.dim() == 1:
                input_ids = input_ids[None]
            check_token_ids(input_ids, self.config.vocab_size)
            hidden = self.embed_tokens(input_ids)
        else:
            hidden = inputs_embeds if inputs_embeds.dim() == 3 else inputs_embeds[None]
        meta = kwargs.get("batch_meta")
        if meta is None:
            meta = self.batch_meta(hidden.shape[0], hidden.shape[1], hidden.device, attention_mask,
                                   past_key_values, causal_mask_mapping=causal_mask_mapping, **kwargs)
        hidden = self.run_layers(hidden, meta, past_key_values, kwargs.get("hidden_states_sink"),
                                 owned=input_ids is not None)
        return hidden[0] if flat else hidden

    def run_layers(self, hidden: torch.Tensor, meta: BatchMeta, cache=None,
                   sink: list[torch.Tensor] | None = None, owned: bool = False) -> torch.Tensor:
        """The blocks and the final norm, without input validation (the decode loop calls this).

        Without autograd and without a ``sink`` nothing else holds a block's input once the block
        has run, so its output projection may add into it in place (``meta.residual_writable``):
        cuBLAS's addmm otherwise first copies the residual into a new output (two launches where
        one does; 30 a decode step on the Nano shape). ``owned``: ``hidden`` is this forward's own
        tensor (the embedding lookup's output); a caller's ``inputs_embeds`` is copied once first."""
        writable = sink is None and not torch.is_grad_enabled()
        if writable and not owned:
            hidden = hidden.clone()
        meta.residual_writable = writable
        layers = list(self.layers.values())
        # Blocks may fold their norms into their neighbours' kernels (Block.forward_folding_norms).
        fold = FOLD_NORMS and writable and hidden.is_cuda and all(type(b) is Block for b in layers)
        normed = None
        try:
            for i, layer in enumerate(layers):
                if sink is not None:
                    sink.append(hidden)
                if fold:
                    after = layers[i + 1].norm if i + 1 < len(layers) else self.norm
                    hidden, normed = layer.forward_folding_norms(hidden, meta, cache, normed, after)
                else:
                    hidden = layer(hidden, meta, cache)
        finally:
            meta.residual_writable = False  # others (the MTP head) pass this meta to blocks too
        if self.norm is not None:
            hidden = self.norm(hidden) if normed is None else normed
        if sink is not None:
            sink.append(hidden)
        return hidden

    def batch_meta(self, batch_size: int, seq_len: int, device: torch.device, attention_mask=None, cache=None,
                   causal_mask_mapping: dict[str, torch.Tensor] | None = None, **kwargs: Any) -> BatchMeta:
        """Describe the batch from forward's arguments, in their public conventions (``make_batch_meta``
        converts them: ``padding_mask`` is True on padding; ``_packed_seq_ids`` 0 on padding)."""
        if attention_mask is not None and attention_mask.dim() != 2:
            raise InputError("attention_mask must be a 2-D padding mask [batch, seq]")
        if causal_mask_mapping is not None and not isinstance(causal_mask_mapping, dict):
            raise InputError(f"causal_mask_mapping must be a dict like {{'full_attention': mask}}, "
                             f"got {type(causal_mask_mapping).__name__}")
        return make_batch_meta(
            batch_size, seq_len, device,
            attention_mask=attention_mask,
            padding_mask=kwargs.get("padding_mask"),  # True = padding (converted to a keep mask there)
            past_len=cache.get_seq_length() if cache is not None else 0,
            qkv_format=kwargs.get("qkv_format"),
            cu_seqlens=kwargs.get("cu_seqlens"),
            cu_seqlens_padded=kwargs.get("cu_seqlens_padded"),
            max_seqlen=kwargs.get("max_seqlen"),
            seq_idx=kwargs.get("seq_idx"),
            position_ids=kwargs.get("position_ids"),
            packed_seq_ids=kwargs.get("_packed_seq_ids"),
            # Only the attention layers' key is consumed: this model has no sliding-window layers.
            causal_mask=causal_mask_mapping.get("full_attention") if causal_mask_mapping else None,
            num_heads=self.config.num_attention_heads,
        )

    @torch.no_grad()
    def initialize_weights(self, buffer_device: torch.device | None = None) -> None:
        """Initialise according to the NemotronV3 spec (guards parts a pipeline split removed)."""
        std = self.config.initializer_range
        if self.embed_tokens is not None:
            nn.init.normal_(self.embed_tokens.weight, std=std)
        for layer in self.layers.values():
            init_block(layer, self.config, self.config.num_hidden_layers)
        if self.norm is not None:
            self.norm.reset_parameters()


def check_token_ids(input_ids: torch.Tensor, vocab_size: int) -> None:
    if input_ids.is_floating_point():
        raise InputError("input_ids must be integer token ids")
    if torch.compiler.is_compiling() or input_ids.numel() == 0:
        return
    lo, hi = int(input_ids.min()), int(input_ids.max())
    if lo < 0 or hi >= vocab_size:
        raise InputError(f"token id {hi if hi >= vocab_size else lo} is outside the vocabulary [0, {vocab_size})")


def _with_overrides(config: NemotronHConfig, overrides: dict) -> NemotronHConfig:
    """A validated copy of ``config`` with ``overrides`` applied (the caller's object is never changed)."""
    data = config.to_dict()
    data.update(overrides)
    from ..config import config_from_dict

    return config_from_dict(data)


# The config keys the MoE blocks are built from (moe.py): what ``moe_overrides`` may change. NeMo's
# MoEConfig spells several differently (route_scale, n_activated_experts, ...); neither FACTS.md nor
# the API page names that mapping, so those names are refused rather than guessed. n_shared_experts
# is left out: the blocks always hold one shared expert, so overriding it would change nothing.
MOE_OVERRIDE_KEYS = (
    "n_routed_experts", "num_experts_per_tok", "moe_intermediate_size", "moe_shared_expert_intermediate_size",
    "moe_latent_size", "n_group", "topk_group", "norm_topk_prob", "routed_scaling_factor",
)


def apply_moe_args(config: NemotronHConfig, moe_config: Any = None,
                   moe_overrides: dict[str, Any] | None = None) -> NemotronHConfig:
    """``config`` with ``moe_overrides`` applied, as a validated copy (``config`` itself when there are none).

    Applying them to the config, not to the MoE modules alone, keeps the backbone, the MTP head,
    ``model.config`` and a saved config.json in agreement. ``moe_config`` is refused: NeMo's
    ``MoEConfig`` has its own field names and knobs this implementation does not have (aux loss,
    gate bias updates, other activations), so honouring part of it would silently mislead."""
    if moe_config is not None and moe_overrides is not None:
        raise ValueError("pass moe_config or moe_overrides, not both")  # as the reference does
    if moe_config is not None:
        raise InputError("moe_config is not supported: the MoE layers are built from the model config; "
                         "pass moe_overrides={key: value} with config keys instead "
                         f"({', '.join(MOE_OVERRIDE_KEYS)})")
    if not moe_overrides:
        return config
    if not isinstance(moe_overrides, dict):
        raise InputError(f"moe_overrides must be a dict, got {type(moe_overrides).__name__}")
    unknown = [k for k in moe_overrides if k not in MOE_OVERRIDE_KEYS]
    if unknown:
        raise InputError(f"moe_overrides: unknown key(s) {', '.join(map(repr, unknown))}; "
                         f"expected config MoE keys: {', '.join(MOE_OVERRIDE_KEYS)}")
    return _with_overrides(config, moe_overrides)


@dataclass
class NemotronHCausalLMOutputWithPast(CausalLMOutputWithPast):
    """``CausalLMOutputWithPast`` plus declared MTP fields (declared so FSDP2's output casts keep them)."""

    mtp_per_depth_h: list[torch.Tensor] | None = None
    mtp_loss_scaling_factor: float | None = None


def shift_labels(labels: torch.Tensor, n: int, meta: BatchMeta | None = None, ignore_index: int = -100) -> torch.Tensor:
    """Targets ``n`` positions ahead: ``out[t] = labels[t + n]``, ignored past the end, on padding and
    (packed batches) where ``t + n`` lies in another document."""
    if labels.dim() != 2:
        raise InputError(f"labels must be [batch, seq] (or [T] when packed), got shape {tuple(labels.shape)}")
    if meta is not None and tuple(labels.shape) != (meta.batch_size, meta.seq_len):
        raise InputError(f"labels shape {tuple(labels.shape)} does not match the input's {(meta.batch_size, meta.seq_len)}")
    out = F.pad(labels, (0, n), value=ignore_index)[:, n:]
    if meta is not None and meta.seq_idx is not None:
        seq = F.pad(meta.seq_idx, (0, n), value=-1)
        out = out.masked_fill(seq[:, n:] != meta.seq_idx, ignore_index)
    if meta is not None and meta.padding_mask is not None:
        out = out.masked_fill(~meta.padding_mask, ignore_index)
    return out


def causal_lm_loss(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100,
                   num_items_in_batch: int | torch.Tensor | None = None) -> torch.Tensor:
    """Cross-entropy in fp32 of ``logits[t]`` against already-shifted ``targets[t]``; mean over the
    scored tokens, or sum / ``num_items_in_batch`` under gradient accumulation."""
    if targets.shape != logits.shape[:-1]:
        raise InputError(f"labels shape {tuple(targets.shape)} does not match the logits' {tuple(logits.shape[:-1])}")
    flat_logits, flat_targets = logits.reshape(-1, logits.shape[-1]), targets.reshape(-1).to(logits.device)
    if logits.is_cuda and not torch.compiler.is_compiling() and triton_ce.supported(flat_logits):
        # One fused pass each way over the logits in their own dtype, saving only an fp32 logsumexp
        # per row, instead of an fp32 copy and an fp32 log-softmax kept for the backward (~4 GB at
        # [4096, 131072]). Same fp32 math as below, sums in another order. Code being compiled by
        # torch.compile keeps the torch ops (no graph break on an opaque kernel).
        loss = triton_ce.cross_entropy_sum(flat_logits, flat_targets, ignore_index=ignore_index)
    else:
        # The reference (CPU tensors, other devices, torch.compile): fp32 cross-entropy, summed.
        loss = F.cross_entropy(flat_logits.float(), flat_targets, ignore_index=ignore_index, reduction="sum")
    if num_items_in_batch is None:
        num_items_in_batch = (targets != ignore_index).sum().clamp(min=1)
    return loss / num_items_in_batch


class NemotronHForCausalLM(nn.Module, GenerationMixin):
    """NemotronV3 model with language modelling head (and the MTP head when configured)."""

    config_class = NemotronHConfig
    main_input_name = "input_ids"
    base_model_prefix = "model"
    _is_stateful = True
    _supports_cache_class = True

    def __init__(self, config: NemotronHConfig, backend: BackendConfig | None = None,
                 mtp_loss_scaling_factor: float = 0.1, num_nextn_predict_layers: int | None = None,
                 mtp_use_repeated_layer: bool = False, **kwargs: Any) -> None:
        """``kwargs`` may hold ``moe_overrides`` / ``moe_config`` (as ``NemotronV3Model`` takes them).
        Every override lands in a copy of ``config`` before anything is built, so the backbone, the
        MTP head, ``self.config`` and a saved checkpoint all agree."""
        super().__init__()
        # The MoE overrides go to the config first: passed on to NemotronV3Model alone, they would
        # reshape the backbone but not the MTP head's MoE nor self.config (and so not config.json).
        config = apply_moe_args(config, kwargs.get("moe_config"), kwargs.get("moe_overrides"))
        if num_nextn_predict_layers is not None and num_nextn_predict_layers != config.num_nextn_predict_layers:
            config = _with_overrides(config, {"num_nextn_predict_layers": num_nextn_predict_layers})
        if mtp_use_repeated_layer and not getattr(config, "mtp_use_repeated_layer", False):
            config = _with_overrides(config, {"mtp_use_repeated_layer": True})  # never mutate the caller's config
        self.config = config
        self.backend = backend or BackendConfig()
        self.mtp_loss_scaling_factor = float(mtp_loss_scaling_factor)
        self.model = NemotronV3Model(config, self.backend)  # the MoE overrides are already in config
        self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False)
        self.lm_head.backend = self.backend  # (a batch-1 decode step may take the Triton GEMV)
        self.mtp = None
        if config.num_nextn_predict_layers > 0:
            from .mtp import MTPHead

            self.mtp = MTPHead(config, self.backend)
        from transformers import GenerationConfig

        self.generation_config = GenerationConfig.from_model_config(config)

    # ---- construction ------------------------------------------------------------------------
    @classmethod
    def from_config(cls, config: NemotronHConfig, backend: BackendConfig | None = None, **kwargs: Any) -> "NemotronHForCausalLM":
        return cls(config, backend=backend, **kwargs)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str, *model_args: Any, **kwargs: Any) -> "NemotronHForCausalLM":
        """Load a local Hugging Face-layout directory (safetensors only; nothing is downloaded).

        Positional ``model_args`` go to ``from_config(config, *model_args)`` as in the reference (the
        first is ``backend``). Keyword arguments: ``device`` (default cpu), ``dtype``/``torch_dtype``
        (default: as stored), ``backend``, and constructor arguments such as ``num_nextn_predict_layers``."""
        from ..checkpoint import load_pretrained

        return load_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs)

    def save_pretrained(self, save_directory: str, max_shard_size: int | str = "5GB",
                        dtype: torch.dtype | str | None = None, **kwargs: Any) -> None:
        from ..checkpoint import save_pretrained

        save_pretrained(self, save_directory, max_shard_size=max_shard_size, dtype=dtype)

    @torch.no_grad()
    def initialize_weights(self, buffer_device: torch.device | None = None, dtype: torch.dtype = torch.bfloat16) -> None:
        """Materialise (if on the meta device) and initialise all weights, then cast to ``dtype``
        keeping the fp32-only parameters in fp32."""
        if any(p.is_meta for p in self.parameters()):
            self.to_empty(device=buffer_device or "cpu")
        self.model.initialize_weights(buffer_device)  # guards the parts a pipeline split removed
        if self.lm_head is not None:
            nn.init.normal_(self.lm_head.weight, std=self.config.initializer_range)
        if self.mtp is not None:
            self.mtp.initialize_weights()
        cast_model(self, dtype)

    # ---- hooks applied from outside (activation checkpointing, pipeline stages) ----------------
    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict | None = None) -> None:
        """Wrap every decoder block (and MTP block) in non-reentrant activation checkpointing.
        Idempotent; state-dict keys do not change. ``gradient_checkpointing_kwargs`` is accepted for
        HF compatibility and unused."""
        from ..activation_checkpointing import apply_activation_checkpointing

        apply_activation_checkpointing(self)

    def gradient_checkpointing_disable(self) -> None:
        """Unwrap the blocks (inverse of ``gradient_checkpointing_enable``); idempotent."""
        from ..activation_checkpointing import remove_activation_checkpointing

        remove_activation_checkpointing(self)

    def _is_pipeline_parallel_stage(self) -> bool:
        """True when this instance was trimmed to a pipeline stage: lm_head or the embeddings were
        set to None, or blocks were removed. ``hasattr`` keeps a stub ``self.model`` that does not
        declare an attribute from being taken for a trimmed stage."""
        inner = getattr(self, "model", None)
        if hasattr(self, "lm_head") and self.lm_head is None:
            return True
        if inner is not None and hasattr(inner, "embed_tokens") and inner.embed_tokens is None:
            return True
        layers = getattr(inner, "layers", None)
        return layers is not None and len(layers) != self.config.num_hidden_layers

    def customize_pipeline_stage_modules(self, module_names_per_stage: list[list[str]], layers_prefix: str,
                                         text_model: nn.Module | None = None) -> list[list[str]]:
        """Pin the MTP head to the last stage (the default per-stage names know nothing of it).
        Returns new lists: the caller's (possibly reused for another split) are left as they were."""
        names = [list(stage) for stage in module_names_per_stage]
        if self.mtp is not None and names and "mtp" not in names[-1]:
            names[-1].append("mtp")
        return names

    def get_pipeline_stage_metas(self, is_first: bool, microbatch_size: int, seq_len: int,
                                 dtype: torch.dtype) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
        """Analytical (inputs_meta, outputs_meta) for this stage: plain ``[B, S, H]`` between stages,
        ``1 + D`` tensors when an MTP head is configured; the last stage returns the logits and, with
        the MTP head, each depth's logits (``1 + D`` tensors of ``[B, S, vocab]``)."""
        from ..pipeline import stage_metas

        return stage_metas(self, is_first, microbatch_size, seq_len, dtype)

    def _build_mtp_embed_inputs_for_pp(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Per-depth future-token embeddings, made on the first stage (which owns ``embed_tokens``)."""
        from .mtp import future_token_embeddings

        if self.model.embed_tokens is None:  # a later stage: the splitter removed the embedding table
            raise ValueError("_build_mtp_embed_inputs_for_pp runs on the first pipeline stage only: this stage "
                             "has no embed_tokens (later stages receive the embeddings as forward inputs)")
        return future_token_embeddings(self.model.embed_tokens, input_ids, self.config.num_nextn_predict_layers)

    def _stage_forward(self, inputs: torch.Tensor, carried: tuple[torch.Tensor, ...], attention_mask=None,
                       **kwargs: Any):
        """One pipeline stage: token ids (first stage) or hidden states in; hidden states (plus the
        MTP embeddings) out, or logits on the last stage (``(logits, *mtp_logits)`` with MTP)."""
        if inputs.dim() == 1:
            inputs = inputs[None]
        meta = self.model.batch_meta(inputs.shape[0], inputs.shape[1], inputs.device, attention_mask, None, **kwargs)
        if self.model.embed_tokens is not None and self.config.num_nextn_predict_layers > 0:
            carried = self._build_mtp_embed_inputs_for_pp(inputs)
        hidden = self.model(input_ids=inputs, batch_meta=meta)
        if self.lm_head is None:
            return (hidden, *carried) if carried else hidden
        logits = self.lm_head(hidden)
        if self.mtp is not None and carried:
            per_depth, _ = self.mtp(self, hidden, None, meta, None, embeds=tuple(carried))
            return (logits, *[self.lm_head(h) for h in per_depth])
        return logits

    @property
    def is_gradient_checkpointing(self) -> bool:
        from ..activation_checkpointing import is_checkpointed

        return is_checkpointed(self)

    # ---- accessors -----------------------------------------------------------------------------
    def get_input_embeddings(self) -> nn.Module:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.model.embed_tokens = value

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def set_output_embeddings(self, new_embeddings: nn.Module) -> None:
        self.lm_head = new_embeddings

    @property
    def device(self) -> torch.device:
        """The device of the first model parameter (GenerationMixin needs it)."""
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the first model parameter (used to build caches)."""
        return next(self.parameters()).dtype

    def num_parameters(self, active: bool = False) -> int:
        from ..params import count_parameters

        counts = count_parameters(self.config)
        return counts["active"] if active else counts["total"]

    @staticmethod
    def _make_causal_mask(query_len: int, kv_len: int, batch_size: int, dtype: torch.dtype,
                          device: torch.device) -> torch.Tensor:
        """4D additive SDPA mask ``[B, 1, q, kv]``: lower-triangular for prefill, all-visible for a
        single decode step, offset-causal for chunked prefill (query_len < kv_len)."""
        allowed = causal_bool_mask(query_len, kv_len, device)
        mask = torch.zeros(query_len, kv_len, dtype=dtype, device=device)
        mask = mask.masked_fill(~allowed, torch.finfo(dtype).min)
        return mask[None, None].expand(batch_size, 1, query_len, kv_len)

    # ---- generation (transformers' GenerationMixin) --------------------------------------------
    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # we bring our own hybrid cache (KV + Mamba states)

    def get_experts_implementation(self) -> dict[str, str]:
        """GenerationMixin asks this to decide whether to swap expert kernels for decoding; our
        grouped path needs no swap, so we report our own names (never transformers' 'grouped_mm')."""
        return {"": self.backend.experts}

    def set_experts_implementation(self, impl: dict[str, str] | str) -> None:
        value = impl if isinstance(impl, str) else impl.get("", self.backend.experts)
        self.backend.experts = value
        for m in self.modules():
            if hasattr(m, "impl") and hasattr(m, "up_proj"):
                m.impl = value

    def _prepare_cache_for_generation(self, generation_config, model_kwargs: dict, *args: Any, **kwargs: Any) -> None:
        # generate() knows the final length here but not yet the (beam-expanded) batch size, so the
        # cache itself is built on the first prepare_inputs_for_generation call.
        max_len = kwargs.get("max_cache_length", args[-1] if args else None)
        self._generation_max_length = int(max_len) + 1 if max_len is not None else None

    def _default_cache_length(self, prompt_len: int) -> int:
        """Cache length for a prefill outside generate(). transformers 5 leaves both max_new_tokens and
        max_length unset (None) by default; generate() then produces 20 new tokens, and so do we."""
        gen = self.generation_config
        if gen.max_new_tokens is not None:
            return prompt_len + int(gen.max_new_tokens)
        if gen.max_length is not None:
            return int(gen.max_length)  # a total length, prompt included
        return prompt_len + _DEFAULT_NEW_TOKENS

    def prepare_inputs_for_generation(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        past_key_values: Any = None,
        cache_position: torch.LongTensor | None = None,
        use_cache: bool | None = True,
        **kwargs: Any,
    ) -> dict:
        """First call (prefill): create a NemotronHybridCache and forward the whole prompt (or its
        embeddings). Later calls (decode): forward only the tokens the cache has not seen.

        The cache is preallocated (it cannot grow), so its length is fixed here: inside ``generate()``
        the final length generate() computed; called directly, ``generation_config.max_new_tokens``
        past the prompt, else ``generation_config.max_length``, else the prompt plus 20 new tokens
        (transformers 5's own default when neither is set); always at least the prompt plus one."""
        from ..cache import NemotronHybridCache

        cache = past_key_values if past_key_values is not None else kwargs.get("cache")
        if cache is None and use_cache is not False:
            prompt_len = inputs_embeds.shape[1] if inputs_embeds is not None else input_ids.shape[1]
            # generate() set this for the one cache it builds; cleared so that a later direct call
            # does not size its cache by an earlier generate()'s length.
            max_len = getattr(self, "_generation_max_length", None) or self._default_cache_length(prompt_len)
            self._generation_max_length = None
            cache = NemotronHybridCache(self.config, input_ids.shape[0], max(max_len, prompt_len + 1),
                                        dtype=self.dtype, device=self.device)
        past = cache.get_seq_length() if cache is not None else 0
        inputs: dict[str, Any] = {"attention_mask": attention_mask, "past_key_values": cache,
                                  "use_cache": use_cache, "logits_to_keep": kwargs.get("logits_to_keep", 1)}
        if inputs_embeds is not None and past == 0:
            inputs["inputs_embeds"] = inputs_embeds
            inputs["input_ids"] = None
            if cache is not None:
                # generate() then passes only the generated ids: the prompt lives in the cache as embeddings.
                cache.embedded_prefix = inputs_embeds.shape[1]
        elif cache is not None:
            inputs["input_ids"] = input_ids[:, past - cache.embedded_prefix:]
        else:
            inputs["input_ids"] = input_ids
        return inputs

    # ---- forward -------------------------------------------------------------------------------
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        *mtp_embed_inputs: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        causal_mask_mapping: dict[str, torch.Tensor] | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        past_key_values=None,
        use_cache: bool | None = None,
        cache_position: torch.LongTensor | None = None,
        position_ids: torch.LongTensor | None = None,
        padding_mask: torch.Tensor | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs: Any,
    ) -> NemotronHCausalLMOutputWithPast:
        """Forward pass with optional loss. BSHD ``[B, S]`` or THD (``qkv_format="thd"`` with
        ``cu_seqlens``); ``labels`` are the input ids themselves (shifted here), -100 ignored.

        Masks (conventions as NeMo AutoModel's ``nemotron_v3``):

        * ``attention_mask`` ``[B, S]``: 1 = real token, 0 = padding.
        * ``padding_mask`` ``[B, S]`` bool: **True = padding** (the reference builds it as
          ``attention_mask.bool().logical_not()``). With both masks, a token is real only where both
          say so. Padding is kept out of the Mamba state, attention keys and the loss.
        * ``causal_mask_mapping={"full_attention": mask}``: a precomputed 4D mask for the attention
          layers, ``[B or 1, 1 or heads, S, past + S]``, bool (True = may attend) or additive float
          (0 = attend, -inf / ``finfo.min`` = blocked; other values are added to the scores). It
          replaces the mask attention would build; Mamba layers take padding from the 2D masks only.

        Packing in BSHD (``kwargs``), any batch size, no cache:

        * ``_packed_seq_ids`` ``[B, S]`` int: the document of each token, 1, 2, ... and 0 on padding
          (NeMo's packed-row ids). Mamba state resets and attention stays inside each document.
        * ``seq_idx`` ``[B, S]`` int without ``qkv_format="thd"``: the same, without a padding id.

        Each contiguous run of one id is one document. THD keywords: ``qkv_format``, ``cu_seqlens``,
        ``cu_seqlens_padded``, ``max_seqlen`` (see ``nemotron_core.packing``)."""
        if self._is_pipeline_parallel_stage():
            return self._stage_forward(input_ids, mtp_embed_inputs, attention_mask, position_ids=position_ids,
                                       padding_mask=padding_mask, causal_mask_mapping=causal_mask_mapping,
                                       **kwargs)
        num_items = kwargs.pop("num_items_in_batch", None)
        if past_key_values is None:
            past_key_values = kwargs.pop("cache", None)  # transformers >= 5.2x names it `cache`
        kwargs.pop("cache", None)
        if input_ids is not None and input_ids.dim() == 1:
            input_ids = input_ids[None]
        if inputs_embeds is not None and inputs_embeds.dim() == 2:  # THD [T, H]: logits come back [1, T, V]
            inputs_embeds = inputs_embeds[None]
        if labels is not None and labels.dim() == 1:
            labels = labels[None]
        if output_hidden_states is None:  # as transformers: unset means the config's setting
            output_hidden_states = bool(getattr(self.config, "output_hidden_states", False))
        sink: list[torch.Tensor] | None = [] if output_hidden_states else None
        first = input_ids if input_ids is not None else inputs_embeds
        if first is None:
            raise InputError("pass input_ids or inputs_embeds")
        meta = self.model.batch_meta(first.shape[0], first.shape[1], first.device, attention_mask, past_key_values,
                                     causal_mask_mapping=causal_mask_mapping, padding_mask=padding_mask,
                                     position_ids=position_ids, **kwargs)
        hidden = self.model(input_ids=input_ids, inputs_embeds=inputs_embeds, past_key_values=past_key_values,
                            batch_meta=meta, hidden_states_sink=sink)
        if past_key_values is not None:
            past_key_values.advance(hidden.shape[1])

        kept = _keep(hidden, logits_to_keep)
        logits = self.lm_head(kept)
        loss = None
        if labels is not None:
            full = logits if isinstance(logits_to_keep, int) and logits_to_keep == 0 else self.lm_head(hidden)
            loss = causal_lm_loss(full, shift_labels(labels, 1, meta), num_items_in_batch=num_items)
        mtp_h = None
        if self.mtp is not None and (self.training or kwargs.get("return_mtp", False)) and input_ids is not None:
            mtp_h, mtp_loss = self.mtp(self, hidden, input_ids, meta, labels, num_items)
            if mtp_loss is not None and loss is not None:
                loss = loss + mtp_loss
        # use_cache is "whether to return past_key_values" (the page): an explicit False returns none
        # even when a cache was passed (and updated); unset returns the cache given, if any.
        cache_out = past_key_values if use_cache is not False else None
        return NemotronHCausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            **{_CACHE_FIELD: cache_out},
            hidden_states=tuple(sink) if sink is not None else None,
            mtp_per_depth_h=mtp_h,
            # As the reference: the factor accompanies the per-depth states it scales, so it is None
            # whenever the MTP head did not run (no head, or eval without return_mtp).
            mtp_loss_scaling_factor=self.mtp_loss_scaling_factor if mtp_h is not None else None,
        )


# New tokens transformers' generate() produces when no length is configured (its default max_length,
# counted past the prompt since transformers 5).
_DEFAULT_NEW_TOKENS = 20

# transformers renamed the output's cache field from past_key_values to cache (5.2x); use whichever
# this version declares so no deprecation path runs.
_CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


def _keep(hidden: torch.Tensor, logits_to_keep: int | torch.Tensor) -> torch.Tensor:
    if isinstance(logits_to_keep, int):
        return hidden if logits_to_keep == 0 else hidden[:, -logits_to_keep:]
    return hidden[:, logits_to_keep]


ModelClass = NemotronHForCausalLM
