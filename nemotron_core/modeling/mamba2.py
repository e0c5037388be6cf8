"""The Mamba2 block (``M``).

in_proj -> [z | xBC | dt]; xBC -> causal depthwise conv + SiLU -> [x | B | C]; SSD scan with
dt = softplus(dt + dt_bias) and A = -exp(A_log); y += D x; y = RMSNormGated(y, z); out_proj.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from ..backend import BackendConfig, mamba_triton_ops, resolve_mamba
from ..ops import triton_conv, triton_mamba_step
from ..ops.conv import causal_conv1d, causal_conv1d_step
from ..ops.ssd import ssd_scan, ssd_step
from ..ops.triton_conv import causal_conv1d_triton, causal_conv1d_update_triton
from .linear import Linear, add_linear
from .norms import GatedRMSNorm


def _zero_padding(x: torch.Tensor, padding_mask: torch.Tensor | None) -> torch.Tensor:
    # Padding must not feed the recurrence: zero it before the projection and after the conv.
    return x if padding_mask is None else x * padding_mask[..., None].to(x.dtype)


# mamba-ssm's scan kernels autotune once per process per (chunk size, head dim, state size, dtypes),
# not per length, so the first call's length decides for every later one. At a 128-token prompt the
# candidates time within noise; on the H200 the config picked there ran the 8,192-token prefill's
# chunk scan 1.5x slower (7.5 against 5.1 ms per forward of the Nano model). So the first scan of
# each kind that is shorter than this runs once more beforehand, on zeros of this many tokens, where
# the choice matters (about 30 MB and one autotune search, once per process).
SCAN_TUNE_TOKENS = 4096
_scan_tuned: set[tuple] = set()


def _tune_scan_at_length(scan, x, dt, A, B, C, chunk_size: int, **kwargs) -> None:
    key = (x.device, x.dtype, dt.dtype, B.dtype, tuple(x.shape[2:]), tuple(B.shape[2:]), chunk_size,
           kwargs.get("D") is not None, kwargs.get("seq_idx") is not None)
    capturing = x.is_cuda and torch.cuda.is_current_stream_capturing()
    if key in _scan_tuned or capturing or torch.compiler.is_compiling():
        return
    _scan_tuned.add(key)
    if x.shape[1] >= SCAN_TUNE_TOKENS:  # this call tunes at a long length itself
        return
    n = SCAN_TUNE_TOKENS
    seq_idx = None if kwargs.pop("seq_idx", None) is None else torch.zeros(1, n, dtype=torch.int32, device=x.device)
    kwargs.pop("initial_states", None)
    scan(x.new_zeros(1, n, *x.shape[2:]), dt.new_zeros(1, n, *dt.shape[2:]), A, B.new_zeros(1, n, *B.shape[2:]),
         C.new_zeros(1, n, *C.shape[2:]), chunk_size, seq_idx=seq_idx, **kwargs)


class Mamba2(nn.Module):
    def __init__(self, config, layer_idx: int, backend: BackendConfig) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.backend = backend
        self.num_heads = config.mamba_num_heads
        self.head_dim = config.mamba_head_dim
        self.n_groups = config.n_groups
        self.state_size = config.ssm_state_size
        self.chunk_size = config.chunk_size
        self.d_inner = config.mamba_d_inner
        self.conv_dim = config.mamba_conv_dim
        self.dt_limit = config.dt_limit
        self.time_step = (config.time_step_min, config.time_step_max, config.time_step_floor)
        h = config.hidden_size
        self.in_proj = Linear(h, self.d_inner + self.conv_dim + self.num_heads, bias=config.use_bias)
        self.conv1d = nn.Conv1d(self.conv_dim, self.conv_dim, config.conv_kernel, groups=self.conv_dim,
                                padding=config.conv_kernel - 1, bias=config.use_conv_bias)
        self.dt_bias = nn.Parameter(torch.ones(self.num_heads))
        self.A_log = nn.Parameter(torch.zeros(self.num_heads))
        self.D = nn.Parameter(torch.ones(self.num_heads))
        self.norm = GatedRMSNorm(self.d_inner, self.d_inner // self.n_groups, config.layer_norm_epsilon)
        self.out_proj = Linear(self.d_inner, h, bias=config.use_bias)

    def forward(self, hidden: torch.Tensor, meta, cache=None, residual: torch.Tensor | None = None) -> torch.Tensor:
        """The block's output; with ``residual``, ``residual + output``."""
        b, s, _ = hidden.shape
        zxbcdt = self.in_proj(_zero_padding(hidden, meta.padding_mask))
        A = self._A()
        conv_w = self.conv1d.weight.squeeze(1)
        state = cache.mamba_state(self.layer_idx) if cache is not None else None
        continuing = state is not None and meta.past_len > 0
        if continuing and s == 1 and self._fused_step(rows := zxbcdt.view(b, -1), state, conv_w):
            # decode: conv, state update and gated norm as one kernel
            y = triton_mamba_step.mamba_step(rows, state.conv, conv_w, self.conv1d.bias, state.ssm, A,
                                             self.D, self.dt_bias, self.dt_limit, self.norm.weight, self.norm.eps,
                                             self.n_groups)
            return add_linear(residual, self.out_proj, y.view(b, 1, self.d_inner), meta)
        z, xbc, dt = zxbcdt.split([self.d_inner, self.conv_dim, self.num_heads], dim=-1)

        if continuing and s == 1:  # decode: O(1) state update
            conv_step = causal_conv1d_update_triton if self._triton_conv(xbc) else causal_conv1d_step
            xbc = conv_step(xbc[:, 0], state.conv, conv_w, self.conv1d.bias)
            x, B, C = self._split_xbc(xbc)
            y = self._step(state.ssm, x.view(b, self.num_heads, self.head_dim), dt[:, 0], A,
                           B.view(b, self.n_groups, -1), C.view(b, self.n_groups, -1))
            y = y.view(b, 1, self.d_inner)
        else:
            conv = causal_conv1d_triton if self._triton_conv(xbc) else causal_conv1d
            xbc, conv_final = conv(xbc, conv_w, self.conv1d.bias, meta.seq_idx, state.conv if continuing else None)
            x, B, C = self._split_xbc(_zero_padding(xbc, meta.padding_mask))
            y, ssm_final = self._scan(
                x.view(b, s, self.num_heads, self.head_dim), dt, A,
                B.view(b, s, self.n_groups, -1), C.view(b, s, self.n_groups, -1),
                meta.seq_idx, state.ssm if continuing else None)
            if state is not None:
                state.conv.copy_(conv_final)
                state.ssm.copy_(ssm_final)
            y = y.reshape(b, s, self.d_inner)
        y = self._gated_norm(y, z)
        if not torch.is_autocast_enabled(y.device.type):
            # Under autocast the projection casts for itself; a cast to the (fp32) residual dtype
            # here would cost two full passes over y forward and two more backward.
            y = y.to(self.out_proj.weight.dtype)
        return add_linear(residual, self.out_proj, y, meta)

    def _A(self) -> torch.Tensor:
        """``A = -exp(A_log)``; without autograd it is cached until ``A_log`` changes (two kernels
        per layer and token at decode time otherwise)."""
        if (torch.is_grad_enabled() and self.A_log.requires_grad) or torch.compiler.is_compiling():
            return -torch.exp(self.A_log.float())  # (compiled code fuses it anyway)
        key = (self.A_log.data_ptr(), self.A_log._version, self.A_log.device)
        if getattr(self, "_A_cache_key", None) != key:
            self._A_cache = -torch.exp(self.A_log.detach().float())
            self._A_cache_key = key
        return self._A_cache

    def _triton_conv(self, x: torch.Tensor) -> bool:
        # Our own kernels (they need Triton, not mamba-ssm); backend mamba="torch" keeps the reference.
        # Under torch.compile the reference conv: Inductor would re-compile our kernel without the
        # helpers it calls, and fuses the reference's element-wise work anyway.
        return (self.backend.mamba != "torch" and x.is_cuda and not torch.compiler.is_compiling()
                and triton_conv.supported(x, self.conv1d.weight))

    def _fused_step(self, zxbcdt: torch.Tensor, state, conv_w: torch.Tensor) -> bool:
        # Inference on CUDA with our kernels (backend mamba="torch" keeps the reference ops), where
        # the output dtype is out_proj's (no autocast) and the shapes (``zxbcdt [B, d_in_proj]``) fit
        # the kernel; by default where it pays (see triton_mamba_step.ENABLED).
        if not (zxbcdt.is_cuda and self.backend.mamba != "torch" and not torch.is_grad_enabled()
                and not torch.compiler.is_compiling() and not torch.is_autocast_enabled("cuda")
                and zxbcdt.dtype == self.out_proj.weight.dtype
                and triton_mamba_step.supported(zxbcdt, state.conv, state.ssm, conv_w, self.n_groups)):
            return False
        if triton_mamba_step.ENABLED is None:
            return triton_mamba_step.default_on(zxbcdt, resolve_mamba(self.backend, "cuda") == "triton")
        return triton_mamba_step.ENABLED

    def _gated_norm(self, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        if resolve_mamba(self.backend, y.device.type) == "triton":
            return mamba_triton_ops()["gated_rmsnorm"](y, self.norm.weight, None, z=z, eps=self.norm.eps,
                                                       group_size=self.norm.group_size, norm_before_gate=False)
        return self.norm(y, z)

    def _split_xbc(self, xbc: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        gn = self.n_groups * self.state_size
        return xbc.split([self.d_inner, gn, gn], dim=-1)

    def _scan(self, x, dt, A, B, C, seq_idx, initial_state):
        if resolve_mamba(self.backend, x.device.type) == "triton":
            scan = mamba_triton_ops()["chunk_scan"]
            kwargs = dict(D=self.D, dt_bias=self.dt_bias, dt_softplus=True, dt_limit=self.dt_limit, seq_idx=seq_idx,
                          initial_states=initial_state, return_final_states=True)
            if x.is_cuda:
                with torch.no_grad():
                    _tune_scan_at_length(scan, x, dt, A, B, C, self.chunk_size, **kwargs)
            return scan(x, dt, A, B, C, self.chunk_size, **kwargs)
        return ssd_scan(x, dt, A, B, C, self.chunk_size, self.D, self.dt_bias, self.dt_limit, seq_idx, initial_state)

    def _step(self, ssm_state, x, dt, A, B, C):
        if resolve_mamba(self.backend, x.device.type) == "triton" and self.dt_limit == (0.0, float("inf")):
            p, n = self.head_dim, self.state_size
            return mamba_triton_ops()["state_update"](
                ssm_state, x, dt[..., None].expand(-1, -1, p), A[:, None, None].expand(-1, p, n), B, C,
                D=self.D[:, None].expand(-1, p), dt_bias=self.dt_bias[:, None].expand(-1, p), dt_softplus=True)
        return ssd_step(ssm_state, x, dt, A, B, C, self.D, self.dt_bias, self.dt_limit)

    @torch.no_grad()
    def reset_parameters(self, num_layers: int, std: float, rescale: bool) -> None:
        """FACTS.md init: A_log = log(1..H), D = 1, dt_bias = softplus^-1(dt), dt log-uniform."""
        device = self.A_log.device
        self.A_log.copy_(torch.log(torch.arange(1, self.num_heads + 1, dtype=torch.float32, device=device)))
        self.D.fill_(1.0)
        lo, hi, floor = self.time_step
        dt = torch.exp(torch.rand(self.num_heads, device=device) * (math.log(hi) - math.log(lo)) + math.log(lo))
        dt = dt.clamp(min=floor)
        self.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse softplus
        self.conv1d.reset_parameters()
        nn.init.normal_(self.in_proj.weight, std=std)
        for lin in (self.in_proj, self.out_proj):
            if lin.bias is not None:
                nn.init.zeros_(lin.bias)
        if rescale:
            # GPT-2 scheme: residual output projections scaled by 1/sqrt(depth).
            nn.init.kaiming_uniform_(self.out_proj.weight, a=math.sqrt(5))
            self.out_proj.weight.div_(math.sqrt(num_layers))
        else:
            nn.init.normal_(self.out_proj.weight, std=std)
        self.norm.reset_parameters()
