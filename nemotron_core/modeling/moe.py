"""The MoE block (``E``): sigmoid router with correction bias, routed relu2 experts, shared expert.

Routing (DeepSeek-V3 style): scores = sigmoid(x W^T) in fp32; experts are *chosen* by
``scores + e_score_correction_bias`` (restricted to the best ``topk_group`` groups when
``n_group > 1``, a group scored by the sum of its top-2), but *weighted* by the unbiased scores,
normalised to sum 1 when ``norm_topk_prob`` and scaled by ``routed_scaling_factor``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..ops import triton_experts, triton_moe, triton_router, triton_sorted_experts
from ..ops.experts import grouped_experts, grouped_mm_supported, loop_experts
from .linear import Linear
from .mlp import MLP


class Router(nn.Module):
    def __init__(self, hidden_size: int, n_experts: int, top_k: int, n_group: int, topk_group: int,
                 norm_topk_prob: bool, scaling: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(n_experts, hidden_size, dtype=torch.float32))
        self.register_buffer("e_score_correction_bias", torch.zeros(n_experts, dtype=torch.float32))
        self.top_k, self.n_group, self.topk_group = top_k, n_group, topk_group
        self.norm_topk_prob, self.scaling = norm_topk_prob, scaling

    def folds_norm(self, x: torch.Tensor) -> bool:
        """Whether ``forward_normed`` takes ``x``: a decode step's few rows on the Triton path."""
        return (self.n_group == 1 and x.is_cuda and triton_moe.usable(x) and not torch.is_grad_enabled()
                and triton_router.supported(x, self.weight) and x.shape[0] < triton_router.DECODE_ROWS)

    def forward_normed(self, x: torch.Tensor, norm_weight: torch.Tensor,
                       eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``forward(rms_norm(x))`` with the norm folded into the logits kernel (``folds_norm`` inputs):
        (ids, weights, the normalised x that the experts take)."""
        parts, normed = triton_router.router_partials(x, self.weight, norm=(norm_weight, eps))
        idx, weights = triton_moe.route_triton(parts, self.e_score_correction_bias.float(), self.top_k, self.scaling,
                                               self.norm_topk_prob)
        return idx, weights, normed

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x ``[N, H]`` -> (expert ids ``[N, k]``, fp32 weights ``[N, k]``)."""
        # Inference on CUDA: the logits (triton_router: a long prefill's on tensor cores with
        # IEEE-fp32 accuracy, a decode step's as partial sums over K; no fp32 copy of x), then one
        # kernel for all of the rest. None of them has a backward.
        fused = (self.n_group == 1 and x.is_cuda and triton_moe.usable(x)
                 and not (torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad)))
        ours = fused and triton_router.supported(x, self.weight)
        if ours and x.shape[0] >= triton_router.MIN_ROWS:
            logits = triton_router.router_logits(x, self.weight)
        elif ours and x.shape[0] < triton_router.DECODE_ROWS:
            logits = triton_router.router_partials(x, self.weight)  # [slices, N, E]
        else:
            logits = F.linear(x.float(), self.weight.float())
        if fused:
            return triton_moe.route_triton(logits, self.e_score_correction_bias.float(), self.top_k, self.scaling,
                                           self.norm_topk_prob)
        scores = logits.sigmoid()
        choice = scores + self.e_score_correction_bias.float()
        if self.n_group > 1:
            grouped = choice.view(x.shape[0], self.n_group, -1)
            group_score = grouped.topk(2, dim=-1).values.sum(-1)
            keep = torch.zeros_like(group_score, dtype=torch.bool)
            keep.scatter_(1, group_score.topk(self.topk_group, dim=-1).indices, True)
            choice = grouped.masked_fill(~keep[..., None], float("-inf")).view_as(choice)
        idx = choice.topk(self.top_k, dim=-1).indices
        weights = scores.gather(1, idx)
        if self.norm_topk_prob:
            weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
        return idx, weights * self.scaling

    def reset_parameters(self, std: float) -> None:
        nn.init.normal_(self.weight, std=std)
        nn.init.zeros_(self.e_score_correction_bias)


def _decode_gemv(x: torch.Tensor, idx: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> bool:
    """Whether routed experts over ``idx``'s (token, expert) slots run as the Triton decode GEMV:
    CUDA, no autograd, a few slots."""
    return x.is_cuda and not torch.is_grad_enabled() and triton_experts.supported(x, idx, up, down)


def _plain_weights(mlp: nn.Module) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The (up, down) weights of a shared-expert MLP of plain ``Linear`` layers without bias; None for
    an adapter-wrapped (LoRA) layer, whose extra path the GEMV would skip."""
    up, down = mlp.up_proj, mlp.down_proj
    if type(up) is Linear and type(down) is Linear and up.bias is None and down.bias is None:
        return up.weight, down.weight
    return None


class Experts(nn.Module):
    """Routed experts stacked as ``up_proj [E, inter, in]`` and ``down_proj [E, in, inter]``."""

    def __init__(self, n_experts: int, in_dim: int, inter: int, impl: str = "grouped") -> None:
        super().__init__()
        self.up_proj = nn.Parameter(torch.empty(n_experts, inter, in_dim))
        self.down_proj = nn.Parameter(torch.empty(n_experts, in_dim, inter))
        self.impl = impl

    def forward(self, x: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor,
                shared: torch.Tensor | None = None, shared_mlp: nn.Module | None = None, meta=None) -> torch.Tensor:
        """``sum_k weights * expert(x) (+ shared_mlp(x)) (+ shared)``, summed in fp32 and rounded once.

        ``shared_mlp`` (the block's shared expert, an ``MLP``) runs here so that the decode GEMV can
        take it as more experts in its own launches (``triton_experts.gemv_experts``); elsewhere it
        runs as itself, with ``shared`` added in its down projection's GEMM."""
        # Autocast does not cover grouped GEMMs: do what it does for a Linear (compute in its dtype),
        # and otherwise compute in the weights' dtype (e.g. fp32 activations on a bf16 LoRA base).
        device = x.device.type
        autocast = torch.is_autocast_enabled(device)
        dtype = torch.get_autocast_dtype(device) if autocast else self.up_proj.dtype
        gemv = self.impl != "loop" and _decode_gemv(x, idx, self.up_proj, self.down_proj)
        if shared_mlp is not None:
            pair = _plain_weights(shared_mlp) if gemv and not autocast and x.dtype == dtype else None
            if pair is not None and triton_experts.shared_parts(self.up_proj, self.down_proj, *pair):
                return triton_experts.gemv_experts(x, idx, weights, self.up_proj, self.down_proj, shared, pair)
            shared = shared_mlp(x, meta, residual=shared)
        x, up, down = x.to(dtype), self.up_proj.to(dtype), self.down_proj.to(dtype)
        if self.impl == "loop":
            return loop_experts(x, idx, weights, up, down, shared)
        if gemv:  # decode: a few slots
            return triton_experts.gemv_experts(x, idx, weights, up, down, shared)
        if x.is_cuda and triton_sorted_experts.ENABLED and triton_sorted_experts.supported(x, idx, up, down):
            return triton_sorted_experts.sorted_experts(x, idx, weights, up, down, shared)  # a short prompt
        return grouped_experts(x, idx, weights, up, down, shared)

    def capturable(self, slots: int, dtype: torch.dtype, device: torch.device) -> bool:
        """Whether a forward over ``slots`` (token, expert) pairs has static shapes (CUDA graphs).

        The loop reference sizes its work from the routing on the host; the GEMV and grouped paths
        do not. Deciding beforehand matters: a capture that fails part-way leaves CUDA's RNG state
        unusable for the rest of the process."""
        if self.impl == "loop":
            return False
        if triton_experts.takes(device, slots):
            return True
        return grouped_mm_supported(torch.empty(0, dtype=dtype, device=device), self.up_proj, self.down_proj)

    def reset_parameters(self, std: float) -> None:
        nn.init.normal_(self.up_proj, std=std)
        nn.init.normal_(self.down_proj, std=std)


class MoE(nn.Module):
    def __init__(self, config, experts_impl: str = "grouped") -> None:
        super().__init__()
        h = config.hidden_size
        latent = config.moe_latent_size
        self.gate = Router(h, config.n_routed_experts, config.num_experts_per_tok, config.n_group,
                           config.topk_group, config.norm_topk_prob, config.routed_scaling_factor)
        self.experts = Experts(config.n_routed_experts, latent or h, config.moe_intermediate_size, experts_impl)
        self.shared_experts = MLP(h, config.moe_shared_expert_intermediate_size, bias=config.mlp_bias)
        if latent is not None:
            # The router sees the full-width x; only the routed experts work in the latent space.
            self.fc1_latent_proj = Linear(h, latent, bias=config.mlp_bias)
            self.fc2_latent_proj = Linear(latent, h, bias=config.mlp_bias)
        else:
            self.fc1_latent_proj = self.fc2_latent_proj = None

    def decode_with_norms(self, x: torch.Tensor, norm: nn.Module, normed: torch.Tensor | None,
                          next_norm: nn.Module | None) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        """A decode step of the whole block, ``x + moe(norm(x))``, with the norms around it folded into
        the MoE kernels: the router's kernel normalises ``x`` (unless the previous block already
        returned ``normed``), and the experts' combine also returns ``next_norm`` of the block's output
        (the next block's normalised input; None without ``next_norm``). Two norm kernels fewer per MoE
        block at decode. Returns None where the decode kernels do not apply (the caller runs
        ``forward``)."""
        flat = x.reshape(-1, x.shape[-1])
        experts = self.experts
        shared = _plain_weights(self.shared_experts)
        if (self.fc1_latent_proj is not None or shared is None or experts.impl == "loop"
                or not self.gate.folds_norm(flat) or x.dtype != experts.up_proj.dtype
                or not triton_experts.takes(x.device, flat.shape[0] * self.gate.top_k)
                or not triton_experts.shared_parts(experts.up_proj, experts.down_proj, *shared)
                or not (experts.up_proj.stride(-1) == experts.down_proj.stride(-1) == 1)):
            return None
        if normed is None:
            idx, weights, normed = self.gate.forward_normed(flat, norm.weight, norm.eps)
        else:
            normed = normed.reshape(flat.shape)
            idx, weights = self.gate(normed)
        out = triton_experts.gemv_experts(normed, idx, weights, experts.up_proj, experts.down_proj, flat, shared,
                                          next_norm=None if next_norm is None else (next_norm.weight, next_norm.eps))
        if next_norm is None:
            return out.view_as(x), None
        return out[0].view_as(x), out[1].view_as(x)

    def forward(self, x: torch.Tensor, meta=None, cache=None, residual: torch.Tensor | None = None) -> torch.Tensor:
        """The block's output; with ``residual``, ``residual + output`` (the residual joins the shared
        expert's output inside its down projection's GEMM, or, at decode, the experts' combine)."""
        flat = x.reshape(-1, x.shape[-1])
        idx, weights = self.gate(flat)
        residual = None if residual is None else residual.reshape(flat.shape)
        if self.fc1_latent_proj is None:
            # The shared expert's output (with the residual) joins the routed sum before its one rounding.
            return self.experts(flat, idx, weights, residual, shared_mlp=self.shared_experts, meta=meta).view_as(x)
        shared = self.shared_experts(flat, meta, residual=residual)
        routed = self.experts(self.fc1_latent_proj(flat), idx, weights)
        return (self.fc2_latent_proj(routed) + shared).view_as(x)
