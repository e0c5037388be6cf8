"""The Mamba2 SSD scan and its single-step state update (plain PyTorch references).

Notation (as in the Mamba2 paper): b batch, s positions, c chunks, l positions in a chunk, h heads,
p head dim, g groups, n state size. ``dt`` arrives raw; bias, softplus and the limit are applied
here so the reference and mamba_ssm's fused kernels take the same arguments.

Packed sequences (``seq_idx``): no state flows between positions of different documents, neither
inside a chunk (the decay matrix is masked) nor across chunks (the carried state is dropped).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

NO_LIMIT = (0.0, float("inf"))


def discretize_dt(dt: torch.Tensor, dt_bias: torch.Tensor, dt_limit: tuple[float, float]) -> torch.Tensor:
    dt = F.softplus(dt.float() + dt_bias.float())
    if tuple(dt_limit) != NO_LIMIT:
        dt = dt.clamp(min=dt_limit[0], max=dt_limit[1])
    return dt


def _segsum(x: torch.Tensor) -> torch.Tensor:
    """``out[..., i, j] = sum(x[..., j+1 : i+1])`` for i >= j, -inf above the diagonal.

    Summing masked copies (rather than subtracting two cumsums) keeps it exact for long chunks."""
    n = x.size(-1)
    x = x[..., None].expand(*x.shape, n)
    below = torch.tril(torch.ones(n, n, dtype=torch.bool, device=x.device), diagonal=-1)
    x = x.masked_fill(~below, 0).cumsum(dim=-2)
    keep = torch.tril(torch.ones(n, n, dtype=torch.bool, device=x.device))
    return x.masked_fill(~keep, -torch.inf)


def ssd_scan(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    chunk_size: int,
    D: torch.Tensor,
    dt_bias: torch.Tensor,
    dt_limit: tuple[float, float] = NO_LIMIT,
    seq_idx: torch.Tensor | None = None,
    initial_state: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """x ``[b,s,h,p]``, dt ``[b,s,h]``, A ``[h]``, B/C ``[b,s,g,n]`` -> (y ``[b,s,h,p]`` fp32, final state ``[b,h,p,n]`` fp32)."""
    bsz, seqlen, nheads, headdim = x.shape
    ngroups = B.shape[2]
    dt = discretize_dt(dt, dt_bias, dt_limit)
    x = x.float()
    B = B.float().repeat_interleave(nheads // ngroups, dim=2)
    C = C.float().repeat_interleave(nheads // ngroups, dim=2)

    # Pad to whole chunks: a padded step has dt = 0, so it neither decays nor adds to the state.
    pad = (-seqlen) % chunk_size
    if pad:
        x, B, C = (F.pad(t, (0, 0, 0, 0, 0, pad)) for t in (x, B, C))
        dt = F.pad(dt, (0, 0, 0, pad))
    if seq_idx is not None:
        seq_idx = F.pad(seq_idx, (0, pad), mode="replicate") if pad else seq_idx
        seq = seq_idx.view(bsz, -1, chunk_size)  # [b,c,l]
    nchunks = (seqlen + pad) // chunk_size

    def chunks(t: torch.Tensor) -> torch.Tensor:
        return t.reshape(bsz, nchunks, chunk_size, *t.shape[2:])

    xdt = chunks(x * dt[..., None])  # [b,c,l,h,p]
    B, C = chunks(B), chunks(C)  # [b,c,l,h,n]
    a = chunks(A.float() * dt).permute(0, 3, 1, 2)  # [b,h,c,l]
    a_cum = a.cumsum(-1)

    # 1. Within each chunk: an attention-like product masked by the decay between positions.
    decay = torch.exp(_segsum(a))  # [b,h,c,l,l]
    if seq_idx is not None:
        decay = decay * (seq[:, :, :, None] == seq[:, :, None, :]).unsqueeze(1)
    scores = torch.einsum("bclhn,bcshn->bhcls", C, B) * decay
    y = torch.einsum("bhcls,bcshp->bclhp", scores, xdt)

    # 2. The state each chunk adds by its end (positions of other documents excluded).
    to_end = torch.exp(a_cum[..., -1:] - a_cum)  # [b,h,c,l]
    if seq_idx is not None:
        to_end = to_end * (seq == seq[:, :, -1:]).unsqueeze(1)
    chunk_states = torch.einsum("bclhn,bhcl,bclhp->bchpn", B, to_end, xdt)

    # 3. Carry states across chunks; a document boundary drops what came before it.
    state = x.new_zeros(bsz, nheads, headdim, B.shape[-1]) if initial_state is None else initial_state.float()
    prev_seq = seq[:, 0, 0] if seq_idx is not None else None
    chunk_decay = torch.exp(a_cum[..., -1])  # [b,h,c]
    entering = []
    for c in range(nchunks):
        entering.append(state)
        carry = chunk_decay[:, :, c, None, None]
        if seq_idx is not None:
            carry = carry * (seq[:, c, -1] == prev_seq).view(bsz, 1, 1, 1)
            prev_seq = seq[:, c, -1]
        state = state * carry + chunk_states[:, c]
    entering = torch.stack(entering, dim=1)  # [b,c,h,p,n]

    # 4. What each position reads from the state that entered its chunk.
    from_start = torch.exp(a_cum)  # [b,h,c,l]
    if seq_idx is not None:
        prev_end = torch.cat([seq[:, :1, :1], seq[:, :-1, -1:]], dim=1)  # document owning the entering state
        from_start = from_start * (seq == prev_end).unsqueeze(1)
    y = y + torch.einsum("bclhn,bchpn,bhcl->bclhp", C, entering, from_start)

    y = y.reshape(bsz, -1, nheads, headdim)[:, :seqlen] + D.float()[:, None] * x[:, :seqlen]
    return y, state


def ssd_step(
    state: torch.Tensor,
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor,
    dt_bias: torch.Tensor,
    dt_limit: tuple[float, float] = NO_LIMIT,
) -> torch.Tensor:
    """One decode step. state ``[b,h,p,n]`` (updated in place), x ``[b,h,p]``, dt ``[b,h]``, B/C ``[b,g,n]``."""
    nheads, ngroups = x.shape[1], B.shape[1]
    dt = discretize_dt(dt, dt_bias, dt_limit)  # [b,h]
    Bh = B.float().repeat_interleave(nheads // ngroups, dim=1)  # [b,h,n]
    Ch = C.float().repeat_interleave(nheads // ngroups, dim=1)
    xf = x.float()
    dA = torch.exp(dt * A.float())[..., None, None]
    new = state.float() * dA + (dt[..., None, None] * xf[..., None]) * Bh[:, :, None, :]
    state.copy_(new.to(state.dtype))
    y = torch.einsum("bhpn,bhn->bhp", new, Ch) + D.float()[:, None] * xf
    return y
