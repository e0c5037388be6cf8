"""The attention block (``*``): causal GQA with no positional encoding."""
from __future__ import annotations

import torch
from torch import nn

from ..backend import BackendConfig, resolve_attn
from ..ops import triton_decode_attn
from ..ops.attention import eager_attention, sdpa_attention
from .linear import Linear, add_linear, project


class Attention(nn.Module):
    def __init__(self, config, layer_idx: int, backend: BackendConfig) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.scale = self.head_dim ** -0.5
        self.backend = backend
        h, bias = config.hidden_size, config.attention_bias
        self.q_proj = Linear(h, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = Linear(h, self.num_kv_heads * self.head_dim, bias=bias)
        self.v_proj = Linear(h, self.num_kv_heads * self.head_dim, bias=bias)
        self.o_proj = Linear(self.num_heads * self.head_dim, h, bias=bias)
        self._fused_qkv: torch.Tensor | None = None

    def _qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The q, k and v projections of ``x``: one GEMM over a fused weight where it applies.

        At decode the k and v projections are tiny (2 x 128 rows on the Nano shape), yet each cost a
        split-K GEMM and its reduction kernel, as much as q's. Inference on CUDA therefore stacks the
        three weights into one matrix and makes the three parameters views of its row blocks: the
        parameters keep their names, shapes and identity (checkpoints, optimizers, ``load_state_dict``
        write through the views), and no stale copy can exist. A ``.to()`` or an adapter wrapper
        (LoRA) undoes the views or the plain ``Linear`` type, and the projections run separately
        until the next fusion."""
        projs = (self.q_proj, self.k_proj, self.v_proj)
        fused = self._fused_weight(projs) if x.is_cuda and not torch.is_grad_enabled() else None
        if fused is None:
            return tuple(p(x) for p in projs)
        return project(self.backend, x, fused).split([p.out_features for p in projs], dim=-1)

    def _fused_weight(self, projs: tuple[nn.Module, ...]) -> torch.Tensor | None:
        if torch.compiler.is_compiling() or any(
                type(p) is not Linear or p.bias is not None or type(p.weight.data) is not torch.Tensor for p in projs):
            return None
        fused = self._fused_qkv
        if fused is not None and fused.dtype == projs[0].weight.dtype and fused.device == projs[0].weight.device:
            offset = 0
            for p in projs:
                if p.weight.data_ptr() != fused[offset].data_ptr() or p.weight.stride() != fused.stride():
                    break
                offset += p.out_features
            else:
                return fused
        fused = torch.cat([p.weight.detach() for p in projs])
        offset = 0
        for p in projs:
            p.weight.data = fused[offset:offset + p.out_features]
            offset += p.out_features
        self._fused_qkv = fused
        return fused

    def _flash_decode_valid(self, x: torch.Tensor, q: torch.Tensor, meta, k_cache: torch.Tensor) -> torch.Tensor | None:
        """The ``[B, L]`` mask to hand ``triton_decode_attn`` for this static-shape decode step, or None
        for the SDPA path: CUDA inference with the automatic attention backend (an explicit choice
        keeps its implementation; torch.compile traces the torch ops)."""
        if (not x.is_cuda or torch.is_grad_enabled() or torch.compiler.is_compiling() or self.backend.attn != "auto"
                or not triton_decode_attn.ENABLED):
            return None
        return decode_valid(q, meta, k_cache)

    def forward(self, x: torch.Tensor, meta, cache=None, residual: torch.Tensor | None = None) -> torch.Tensor:
        """The block's output; with ``residual``, ``residual + output``."""
        b, s, _ = x.shape
        q, k, v = self._qkv(x)
        q = q.view(b, s, self.num_heads, self.head_dim).transpose(1, 2)
        k = k.view(b, s, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = v.view(b, s, self.num_kv_heads, self.head_dim).transpose(1, 2)
        if cache is not None and meta.decode_pos is not None:
            k_cache, v_cache = cache.kv[self.layer_idx]
            valid = self._flash_decode_valid(x, q, meta, k_cache)
            if valid is not None:
                # Writes the new K/V row itself and reads only positions 0..pos.
                out = triton_decode_attn.decode_attention(q, k, v, k_cache, v_cache, meta.decode_pos, valid,
                                                          self.scale)
                return add_linear(residual, self.o_proj, out.transpose(1, 2).reshape(b, s, -1), meta)
            k, v = cache.write_kv_at(self.layer_idx, k, v, meta.decode_pos)
        elif cache is not None:
            k, v = cache.update_kv(self.layer_idx, k, v, meta.past_len)
        # FlexAttention's document mask only where it is the whole story: one packed row and no mask
        # from the caller (causal_mask_mapping); otherwise the exact masked path below.
        flex_ok = meta.flex_documents and cache is None
        impl = resolve_attn(self.backend, x.device.type, packed=flex_ok, dtype=q.dtype, head_dim=self.head_dim)
        if impl == "flex" and flex_ok:
            from ..ops.flex import flex_document_attention

            out = flex_document_attention(q, k, v, meta.flex_block_mask(), self.scale)  # never builds attn_mask
            return add_linear(residual, self.o_proj, out.transpose(1, 2).reshape(b, s, -1), meta)
        mask = meta.attn_mask
        if impl == "eager" and (mask is None or mask.dtype == torch.bool):
            out = eager_attention(q, k, v, mask, self.scale)
        else:
            if mask is not None and mask.is_floating_point() and mask.dtype != q.dtype:
                # A caller's additive bias (0 / -inf masks arrive boolean): SDPA wants q's dtype.
                mask = mask.to(q.dtype)
            out = sdpa_attention(q, k, v, mask, self.scale)
        return add_linear(residual, self.o_proj, out.transpose(1, 2).reshape(b, s, -1), meta)


def decode_valid(q: torch.Tensor, meta, k_cache: torch.Tensor) -> torch.Tensor | None:
    """``[B, L]`` (True = may attend) when ``triton_decode_attn`` can take this step, else None.

    Read from the step's own mask (the Decoder's ``kv_valid[:, None, None, :]``, a view) rather than a
    separate field, so both paths see the same positions."""
    mask = meta.attn_mask
    b, length = k_cache.shape[0], k_cache.shape[2]
    if mask is None or mask.dtype != torch.bool or mask.shape != (b, 1, 1, length):
        return None
    return mask[:, 0, 0] if triton_decode_attn.supported(q, k_cache) else None
