"""The fused MoE kernels on CUDA at the Nemotron-3 Nano 30B shape (hidden 2688, 128 experts, top-6,
expert width 1856), bf16 activations, against the torch references.

    python -m pytest tests/gpu/test_triton_moe_cuda.py -q

Routing must pick exactly the experts the torch router picks (the kernel uses an IEEE exp and
divide, as torch's sigmoid does); its fp32 weights agree to fp32 rounding. Expert outputs are bf16
and round at the same points as the references (h and y in bf16, sums in fp32), so they agree to a
few bf16 ulps: 1e-2 of the largest value.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from .common import rel, triton_ops

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

HIDDEN, N_EXP, TOP_K, INTER = 2688, 128, 6, 1856
BF16_TOL = 1e-2


def _need_triton():
    return triton_ops("triton_moe")


@pytest.fixture(scope="module")
def experts():
    """Nano-shaped expert weights (2.5 GB in bf16: built once)."""
    g = torch.Generator(device="cuda").manual_seed(0)
    up = (torch.randn(N_EXP, INTER, HIDDEN, device="cuda", generator=g) * 0.02).bfloat16()
    down = (torch.randn(N_EXP, HIDDEN, INTER, device="cuda", generator=g) * 0.02).bfloat16()
    return up, down


def _tokens(n: int, seed: int):
    """x (bf16), router ids (distinct per token) and weights, and a shared-expert output."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(n, HIDDEN, device="cuda", generator=g).bfloat16()
    idx = torch.rand(n, N_EXP, device="cuda", generator=g).argsort(-1)[:, :TOP_K]
    w = torch.rand(n, TOP_K, device="cuda", generator=g)
    shared = torch.randn(n, HIDDEN, device="cuda", generator=g).bfloat16()
    return x, idx, w, shared


def _by_id(idx: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    ids, order = idx.sort(-1)
    return ids, weights.gather(1, order)


# ---- routing ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("norm", [True, False])
@pytest.mark.parametrize("n", [1, 8, 512])
def test_route_matches_router(n: int, norm: bool) -> None:
    triton_moe = _need_triton()
    from nemotron_core.modeling.moe import Router

    torch.manual_seed(n)
    router = Router(HIDDEN, N_EXP, TOP_K, n_group=1, topk_group=1, norm_topk_prob=norm, scaling=2.5).cuda()
    router.reset_parameters(std=0.02)  # logits of std ~1, as in the trained model
    router.e_score_correction_bias.normal_(0, 0.05)
    x = torch.randn(n, HIDDEN, device="cuda").bfloat16()
    want_idx, want_w = router(x.requires_grad_(True))  # autograd needed: the torch router
    x = x.detach()
    logits = F.linear(x.float(), router.weight.detach())  # the router's own x @ W^T
    idx, w = triton_moe.route_triton(logits, router.e_score_correction_bias, TOP_K, 2.5, norm)
    assert idx.dtype == torch.int64 and w.dtype == torch.float32 and idx.shape == (n, TOP_K)
    want_idx, want_w = _by_id(want_idx, want_w)
    idx, w = _by_id(idx, w)
    assert torch.equal(idx, want_idx)
    assert rel(w, want_w) < 1e-6


@pytest.mark.parametrize("n", [1, 8, 64, 512, 4096])
def test_router_logits_as_accurate_as_cublas_fp32(n: int) -> None:
    """The router GEMMs against an fp64 reference: at most twice the error of cuBLAS's IEEE fp32 GEMM
    (a GEMV at 1 and 8 rows), and no more changed expert choices than it. For prefills the
    tensor-core kernel (bf16 x, fp32 W cut into three exact bf16 parts, K chunks summed in IEEE fp32;
    the model uses it from ``MIN_ROWS`` rows); for a decode step (``DECODE_ROWS``) the partial sums
    over K that the route kernel adds up."""
    _need_triton()
    from nemotron_core.modeling.moe import Router
    from nemotron_core.ops import triton_router

    torch.manual_seed(1000 + n)
    router = Router(HIDDEN, N_EXP, TOP_K, n_group=1, topk_group=1, norm_topk_prob=True, scaling=2.5).cuda()
    router.reset_parameters(std=0.02)  # logits of std ~1, as in the trained model
    router.e_score_correction_bias.normal_(0, 0.05)
    x = torch.randn(n, HIDDEN, device="cuda").bfloat16()
    w, bias = router.weight.detach(), router.e_score_correction_bias
    exact = x.double() @ w.double().t()
    if n >= triton_router.DECODE_ROWS:
        ours = triton_router.router_logits(x, w)
    else:
        ours = triton_router.router_partials(x, w).sum(0)  # the slices in order, as the route kernel adds them
    cublas = F.linear(x.float(), w)
    assert ours.dtype == torch.float32 and ours.shape == (n, N_EXP)
    err_ours, err_cublas = ((t.double() - exact).abs().max().item() for t in (ours, cublas))
    assert err_ours <= 2 * err_cublas, (err_ours, err_cublas)

    def choice(logits: torch.Tensor) -> torch.Tensor:
        return (logits.double().sigmoid() + bias.double()).topk(TOP_K, dim=-1).indices.sort(-1).values

    flips = [(choice(t) != choice(exact)).any(-1).sum().item() for t in (ours, cublas)]
    assert flips[0] <= flips[1], flips
    if n < triton_router.DECODE_ROWS or n >= triton_router.MIN_ROWS:
        with torch.no_grad():  # the model's router takes it on CUDA at inference (its fp32 top-k as torch's)
            idx, _ = router(x)
        assert torch.equal(idx.sort(-1).values, (ours.sigmoid() + bias).topk(TOP_K, dim=-1).indices.sort(-1).values)


# ---- combine ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("with_shared", [False, True])
@pytest.mark.parametrize("n", [1, 8, 512])
def test_combine_matches_torch(n: int, with_shared: bool) -> None:
    triton_moe = _need_triton()
    g = torch.Generator(device="cuda").manual_seed(n)
    y = torch.randn(n * TOP_K, HIDDEN, device="cuda", generator=g).bfloat16()
    pos = torch.randperm(n * TOP_K, device="cuda", generator=g).view(n, TOP_K)
    w = torch.rand(n, TOP_K, device="cuda", generator=g)
    shared = torch.randn(n, HIDDEN, device="cuda", generator=g).bfloat16() if with_shared else None
    want = (y[pos].float() * w[..., None]).sum(1)
    if shared is not None:
        want = want + shared.float()
    got = triton_moe.combine_triton(y, pos, w, shared)
    assert got.dtype == torch.bfloat16 and got.shape == (n, HIDDEN)
    assert rel(got, want) < BF16_TOL
    assert torch.equal(got, triton_moe.combine_triton(y, pos, w, shared))  # deterministic
    slot_order = triton_moe.combine_triton(y, None, w, shared)  # pos[t, j] = t * k + j
    want = (y.view(n, TOP_K, -1).float() * w[..., None]).sum(1) + (0 if shared is None else shared.float())
    assert rel(slot_order, want) < BF16_TOL


# ---- experts ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("with_shared", [False, True])
@pytest.mark.parametrize("n", [1, 8, 512])
def test_gemv_experts_match_loop(experts, n: int, with_shared: bool) -> None:
    _need_triton()
    from nemotron_core.ops import triton_experts
    from nemotron_core.ops.experts import loop_experts

    up, down = experts
    x, idx, w, shared = _tokens(n, seed=n)
    shared = shared if with_shared else None
    if n * TOP_K <= triton_experts.MAX_SLOTS:
        assert triton_experts.supported(x, idx, up, down)
    got = triton_experts.gemv_experts(x, idx, w, up, down, shared)  # int64 ids, straight from the router
    want = loop_experts(x, idx, w, up, down, shared)
    assert got.dtype == torch.bfloat16 and got.shape == want.shape
    assert rel(got, want) < BF16_TOL


@pytest.mark.parametrize("n", [1, 8])
def test_gemv_experts_with_shared_expert_match_loop(experts, n: int) -> None:
    """The Nano shared expert (3712 = 2 x 1856 wide) as two more experts per token, plus the residual."""
    _need_triton()
    from nemotron_core.ops import triton_experts
    from nemotron_core.ops.experts import loop_experts

    up, down = experts
    x, idx, w, residual = _tokens(n, seed=50 + n)
    g = torch.Generator(device="cuda").manual_seed(n)
    s_up = (torch.randn(2 * INTER, HIDDEN, device="cuda", generator=g) * 0.02).bfloat16()
    s_down = (torch.randn(HIDDEN, 2 * INTER, device="cuda", generator=g) * 0.02).bfloat16()
    assert triton_experts.shared_parts(up, down, s_up, s_down) == 2
    got = triton_experts.gemv_experts(x, idx, w, up, down, residual, shared_mlp=(s_up, s_down))
    shared_out = F.linear(F.relu(F.linear(x, s_up)).square(), s_down)  # bf16, as the MLP computes it
    want = loop_experts(x, idx, w, up, down, (residual.float() + shared_out.float()).bfloat16())
    assert got.dtype == torch.bfloat16 and got.shape == want.shape
    assert rel(got, want) < BF16_TOL


@pytest.mark.parametrize("with_shared", [False, True])
@pytest.mark.parametrize("n", [1, 8, 512])
def test_grouped_experts_fast_path_matches_loop(experts, n: int, with_shared: bool, monkeypatch) -> None:
    triton_moe = _need_triton()
    from nemotron_core.ops.experts import grouped_experts, grouped_mm_supported, loop_experts

    up, down = experts
    x, idx, w, shared = _tokens(n, seed=100 + n)
    shared = shared if with_shared else None
    assert grouped_mm_supported(x, up, down)
    calls = []
    real = triton_moe.combine_triton
    monkeypatch.setattr(triton_moe, "combine_triton", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    with torch.no_grad():
        got = grouped_experts(x, idx, w, up, down, shared)
    assert calls, "the Triton combine did not run"
    want = loop_experts(x, idx, w, up, down, shared)
    assert got.dtype == torch.bfloat16 and got.shape == want.shape
    assert rel(got, want) < BF16_TOL


def test_decode_step_captures_in_a_cuda_graph(experts) -> None:
    """Router + experts of one decode token replay in a CUDA graph (no host syncs, no allocation
    that depends on data) and give the eager result."""
    triton_moe = _need_triton()
    from nemotron_core.ops import triton_experts

    up, down = experts
    g = torch.Generator(device="cuda").manual_seed(7)
    weight = torch.randn(N_EXP, HIDDEN, device="cuda", generator=g) * 0.02
    bias = torch.randn(N_EXP, device="cuda", generator=g) * 0.05
    x = torch.randn(1, HIDDEN, device="cuda", generator=g).bfloat16()
    shared = torch.randn(1, HIDDEN, device="cuda", generator=g).bfloat16()

    def step() -> torch.Tensor:
        idx, w = triton_moe.route_triton(F.linear(x.float(), weight), bias, TOP_K, 2.5, True)
        return triton_experts.gemv_experts(x, idx, w, up, down, shared)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # compile and autotune outside the capture
        for _ in range(2):
            eager = step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()
    x.copy_(torch.randn(1, HIDDEN, device="cuda", generator=g).bfloat16())  # new token, same buffers
    graph.replay()
    want = step()
    assert not torch.equal(want, eager)
    assert torch.equal(out, want)


@pytest.mark.parametrize("skewed", [False, True])
@pytest.mark.parametrize("n", [128, 1024])
def test_sorted_experts_match_loop_at_prompt_sizes(experts, n: int, skewed: bool) -> None:
    """A prompt's experts (128 tokens: ~6 a expert, one 16-row tile; 1024: ~48, 64-row tiles) through
    the expert-sorted kernel, against the loop reference and as close as torch's grouped GEMM; also
    with uneven routing (a third of the slots on four experts: many tiles for those, none for some)."""
    _need_triton()
    from nemotron_core.ops import triton_sorted_experts
    from nemotron_core.ops.experts import grouped_experts, loop_experts

    up, down = experts
    x, idx, w, shared = _tokens(n, seed=90 + n)
    if skewed:  # each token's first two experts from 0-3 (n / 2 slots each), the rest from 4-127
        g = torch.Generator(device="cuda").manual_seed(7)
        first = torch.arange(n, device="cuda") % 4
        rest = 4 + torch.rand(n, N_EXP - 4, device="cuda", generator=g).argsort(-1)[:, :TOP_K - 2]
        idx = torch.cat([first[:, None], ((first + 1) % 4)[:, None], rest], dim=1)
    with torch.no_grad():
        assert triton_sorted_experts.supported(x, idx, up, down)
        got = triton_sorted_experts.sorted_experts(x, idx, w, up, down, shared)
        want = loop_experts(x, idx, w, up, down, shared)
        grouped = grouped_experts(x, idx, w, up, down, shared)
    assert got.dtype == torch.bfloat16 and got.shape == want.shape
    assert rel(got, want) <= max(2 * rel(grouped, want), BF16_TOL / 4)
