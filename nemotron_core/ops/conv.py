"""Depthwise causal conv1d over the Mamba2 ``xBC`` stream (plain PyTorch reference).

Packed sequences: a tap that would read across a document boundary (``seq_idx`` changes) reads zero
instead, exactly as if each document were run alone.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def causal_conv1d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    seq_idx: torch.Tensor | None = None,
    initial_state: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """x ``[B, S, C]``, weight ``[C, K]`` -> (silu(conv(x)) ``[B, S, C]``, last K-1 inputs ``[B, C, K-1]``).

    ``initial_state`` holds the K-1 inputs before ``x`` (from a cache); zeros when absent.
    """
    bsz, seqlen, channels = x.shape
    k = weight.shape[-1]
    xt = x.transpose(1, 2).to(weight.dtype)
    if initial_state is None and seq_idx is None:
        # The common prefill/training case: let the conv pad, rather than concatenating a copy of x.
        out = F.conv1d(xt, weight.unsqueeze(1), bias, padding=k - 1, groups=channels)[..., :seqlen]
        final_state = F.pad(xt[..., max(seqlen - (k - 1), 0):], (max(k - 1 - seqlen, 0), 0))
        return F.silu(out).transpose(1, 2).to(x.dtype), final_state
    if initial_state is None:
        initial_state = xt.new_zeros(bsz, channels, k - 1)
    xpad = torch.cat([initial_state.to(xt.dtype), xt], dim=-1)  # [B, C, K-1+S]
    if seq_idx is None:
        out = F.conv1d(xpad, weight.unsqueeze(1), bias, groups=channels)
    else:
        # Sum the K taps by hand so each can be masked where it crosses into another document.
        out = torch.zeros_like(xt) if bias is None else bias[None, :, None].expand_as(xt).clone()
        seq_pad = F.pad(seq_idx, (k - 1, 0), value=-1)
        seq_pad[:, : k - 1] = seq_idx[:, :1]  # cached context belongs to the first document
        for j in range(k):
            tap = xpad[:, :, j : j + seqlen]
            same = (seq_pad[:, j : j + seqlen] == seq_idx).unsqueeze(1)
            out = out + weight[:, j, None] * tap * same
    final_state = xpad[:, :, -(k - 1):] if k > 1 else xpad[:, :, :0]
    return F.silu(out).transpose(1, 2).to(x.dtype), final_state


def causal_conv1d_step(
    x: torch.Tensor, conv_state: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """One decode step: x ``[B, C]``; ``conv_state`` ``[B, C, K-1]`` is shifted in place."""
    window = torch.cat([conv_state, x.unsqueeze(-1).to(conv_state.dtype)], dim=-1)  # [B, C, K]
    conv_state.copy_(window[:, :, 1:])
    out = (window.to(weight.dtype) * weight).sum(-1)
    if bias is not None:
        out = out + bias
    return F.silu(out).to(x.dtype)
