"""The fused MoE kernels (``nemotron_core.ops.triton_moe`` and the decode GEMVs of ``triton_experts``)
against the torch references, on CPU through Triton's interpreter.

Everything here is fp32. The kernels do the same multiplications as the references and differ only
in the order of the fp32 additions (tree vs. sequential sums, FMA) and in the last ulp of the
sigmoid (numpy's exp vs. torch's), i.e. a few ulps (~1e-7 relative); so 1e-6 relative is a tight
bound that still catches any wrong index or weight (which shows up as O(1) errors).

The tensors are tiny: the interpreter runs each Triton program as numpy code.

On the CPU the interpreter runs them (switched on by ``conftest.py``; see ``triton_cpu.py``).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from triton_cpu import CUDA, DEVICE, require_triton

require_triton()

import tiny  # noqa: E402
from nemotron_core.modeling.moe import Router  # noqa: E402
from nemotron_core.ops import experts as experts_ops  # noqa: E402
from nemotron_core.ops import triton_experts, triton_gemv, triton_moe  # noqa: E402
from nemotron_core.ops.experts import grouped_experts, grouped_mm_supported, loop_experts  # noqa: E402

TOL = 1e-6


def _fp32_dot_bound(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """The textbook error bound of fp32 dot products of length K, ``x @ w.T``: K * 2^-24 * sum |x_i w_i|."""
    return x.shape[-1] * 2.0 ** -24 * (x.double().abs() @ w.double().abs().t())


def _by_id(idx: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sort each token's experts by id (and their weights along), to compare as sets."""
    ids, order = idx.sort(-1)
    return ids, weights.gather(1, order)


def _experts(n_tok: int, n_exp: int, k: int, d_in: int, inter: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n_tok, d_in, generator=g)
    up = torch.randn(n_exp, inter, d_in, generator=g) / 4
    down = torch.randn(n_exp, d_in, inter, generator=g) / 4
    idx = torch.rand(n_tok, n_exp, generator=g).argsort(-1)[:, :k]  # distinct experts per token
    w = torch.rand(n_tok, k, generator=g)
    shared = torch.randn(n_tok, d_in, generator=g)
    return [t.to(DEVICE) for t in (x, idx, w, up, down, shared)]


# ---- routing ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("norm", [True, False])
@pytest.mark.parametrize("k", [1, 2, 6])
@pytest.mark.parametrize("n_exp", [8, 128])
@pytest.mark.parametrize("n", [13, 100])  # a decode step's rows one a program; a prompt's packed
def test_route_matches_router(n: int, n_exp: int, k: int, norm: bool) -> None:
    torch.manual_seed(n_exp * 100 + k * 10 + norm)
    router = Router(32, n_exp, k, n_group=1, topk_group=1, norm_topk_prob=norm, scaling=2.5).to(DEVICE)
    router.reset_parameters(std=0.3)
    router.e_score_correction_bias.normal_(0, 0.05)
    x = torch.randn(n, 32, device=DEVICE)
    with torch.no_grad():
        want_idx, want_w = router(x)
        logits = F.linear(x, router.weight)  # x @ W^T, as the router computes it
    idx, w = triton_moe.route_triton(logits, router.e_score_correction_bias, k, 2.5, norm)
    assert idx.dtype == torch.int64 and w.dtype == torch.float32 and idx.shape == w.shape == (n, k)
    want_idx, want_w = _by_id(want_idx, want_w)
    idx, w = _by_id(idx, w)
    assert torch.equal(idx, want_idx)
    assert tiny.rel_err(want_w, w) <= TOL


def test_route_ties_take_the_lower_id_and_ids_stay_valid() -> None:
    bias = torch.zeros(8, device=DEVICE)
    logits = torch.zeros(3, 8, device=DEVICE)
    logits[1, 5] = 1.0  # one clear winner, the rest tied
    logits[2] = float("nan")  # a broken row must still give distinct in-range ids
    idx, w = triton_moe.route_triton(logits, bias, 3, 1.0, True)
    assert idx[0].tolist() == [0, 1, 2]
    assert idx[1].tolist() == [5, 0, 1]
    assert sorted(idx[2].tolist()) == [0, 1, 2]
    assert torch.allclose(w[0], torch.full((3,), 1 / 3, device=DEVICE))


@pytest.mark.parametrize("n", [1, 40])  # one row a program (decode), rows packed (prompt)
def test_route_orders_picks_by_choice_then_lower_id(n: int) -> None:
    """The picks come in descending order of ``sigmoid(logit) + bias``, the lower id first among equal
    choices, for choices of either sign, exactly zero, and -inf or NaN (least preferred); the weights are
    the picks' unbiased scores, normalised."""
    g = torch.Generator().manual_seed(n)
    n_exp, k = 16, 9
    logits = torch.randn(n, n_exp, generator=g) * 3
    bias = torch.randn(n_exp, generator=g)  # about half the choices negative
    logits[:, 8:12], bias[8:12] = logits[:, 0:4], bias[0:4]  # ties between ids i and i + 8
    logits[:, 12:14], bias[12:14] = 0.0, -0.5  # sigmoid(0) - 0.5: choices of exactly 0
    logits[::3, 14] = float("nan")
    logits[:, 15], bias[15] = float("-inf"), float("-inf")
    score = 1 / (1 + torch.exp(-logits))
    choice = torch.nan_to_num(score + bias, nan=float("-inf"))
    want = torch.sort(choice, dim=1, descending=True, stable=True).indices[:, :k]
    idx, w = triton_moe.route_triton(logits.to(DEVICE), bias.to(DEVICE), k, 1.0, True)
    assert torch.equal(idx.cpu(), want)
    picked = score.gather(1, want)
    assert tiny.rel_err(torch.nan_to_num(picked / picked.sum(1, keepdim=True)), torch.nan_to_num(w.cpu())) <= TOL


# ---- combine ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("with_shared", [False, True])
@pytest.mark.parametrize("implicit_pos", [False, True])
def test_combine_matches_torch(with_shared: bool, implicit_pos: bool) -> None:
    g = torch.Generator().manual_seed(1)
    n, k, h = 13, 3, 300  # 300 > one 256-wide block, 13 tokens: both grid axes are masked
    y = torch.randn(n * k, h, generator=g).to(DEVICE)
    pos = torch.randperm(n * k, generator=g).view(n, k).to(DEVICE)
    w = torch.rand(n, k, generator=g).to(DEVICE)
    shared = torch.randn(n, h, generator=g).to(DEVICE) if with_shared else None
    if implicit_pos:
        pos = None
    rows = torch.arange(n * k, device=DEVICE).view(n, k) if pos is None else pos
    want = (y[rows] * w[..., None]).sum(1)
    if shared is not None:
        want = want + shared
    got = triton_moe.combine_triton(y, pos, w, shared)
    assert got.shape == (n, h) and got.dtype == torch.float32
    assert tiny.rel_err(want, got) <= TOL
    assert torch.equal(got, triton_moe.combine_triton(y, pos, w, shared))  # deterministic


def test_combine_int32_pos_with_repeats_and_out_dtype() -> None:
    g = torch.Generator().manual_seed(2)
    y = torch.randn(8, 40, generator=g).to(DEVICE)
    pos = torch.tensor([[3, 1], [0, 7], [2, 2], [6, 5]], dtype=torch.int32, device=DEVICE)  # int32, repeats
    w = torch.rand(4, 2, generator=g).to(DEVICE)
    shared = torch.randn(4, 40, generator=g).to(DEVICE)
    want = ((y[pos.long()] * w[..., None]).sum(1) + shared).to(torch.float16)
    got = triton_moe.combine_triton(y, pos, w, shared, out_dtype=torch.float16)
    assert got.dtype == torch.float16
    assert tiny.rel_err(want.float(), got.float()) <= 1e-3  # at most one fp16 rounding step apart


@pytest.mark.parametrize("n", [1, 37])
def test_router_logits_match_fp64(n: int) -> None:
    """The router GEMM's tiling, masking and exact three-part split of the fp32 weight (the
    interpreter does the tensor cores' work in fp32, so only the GPU test measures their accumulation)."""
    from nemotron_core.ops import triton_router

    g = torch.Generator().manual_seed(n)
    x = torch.randn(n, 200, generator=g).bfloat16().to(DEVICE)  # K = 200: a partial last chunk
    w = (torch.randn(24, 200, generator=g) * 0.05).to(DEVICE)  # 24 experts: a partial tile
    exact = x.double() @ w.double().t()
    got = triton_router.router_logits(x, w)
    assert got.dtype == torch.float32 and got.shape == (n, 24)
    assert bool(((got.double() - exact).abs() <= _fp32_dot_bound(x, w)).all())
    assert not triton_router.supported(x.float(), w) and not triton_router.supported(x, w.bfloat16())


@pytest.mark.parametrize("n", [1, 3, 9])
def test_router_partials_add_up_to_the_logits(n: int) -> None:
    """The decode router GEMM: partial sums over K slices (the last one partial), which the route
    kernel adds up: same experts and weights as routing the summed logits."""
    from nemotron_core.ops import triton_router

    g = torch.Generator().manual_seed(n)
    x = torch.randn(n, 600, generator=g).bfloat16().to(DEVICE)  # 3 slices of 256, the last partial
    w = (torch.randn(20, 600, generator=g) * 0.05).to(DEVICE)  # 20 experts: a partial block of 8
    parts = triton_router.router_partials(x, w)
    assert parts.shape == (3, n, 20) and parts.dtype == torch.float32
    exact = x.double() @ w.double().t()
    assert bool(((parts.double().sum(0) - exact).abs() <= _fp32_dot_bound(x, w)).all())
    bias = torch.randn(20, generator=g).to(DEVICE) * 0.05
    idx, wts = triton_moe.route_triton(parts, bias, 4, 2.5, True)
    want_idx, want_w = triton_moe.route_triton(parts[0] + parts[1] + parts[2], bias, 4, 2.5, True)
    assert torch.equal(idx, want_idx) and tiny.rel_err(want_w, wts) <= TOL


# ---- experts ----------------------------------------------------------------------------------------------
@pytest.fixture(params=["per_slot", "grouped"])
def gemv_variant(request, monkeypatch):
    """The GEMV variants the autotuner chooses between (the interpreter runs one config)."""
    configs = triton_experts._CONFIGS
    index = next(i for i, c in enumerate(configs) if c[3] == (request.param == "grouped"))
    monkeypatch.setattr(triton_experts, "INTERPRETER_CONFIG", index)
    triton_experts._kernel.cache_clear()
    yield
    triton_experts._kernel.cache_clear()


@pytest.mark.parametrize("with_shared", [False, True])
def test_gemv_experts_match_loop(with_shared: bool, gemv_variant) -> None:
    x, idx, w, up, down, shared = _experts(n_tok=3, n_exp=8, k=2, d_in=40, inter=24)
    assert idx.unique().numel() < idx.numel()  # some expert serves several tokens (a group)
    shared = shared if with_shared else None
    want = loop_experts(x, idx, w, up, down, shared)
    got = triton_experts.gemv_experts(x, idx, w, up, down, shared)  # int64 ids, as the router gives
    assert got.shape == want.shape and got.dtype == want.dtype
    assert tiny.rel_err(want, got) <= TOL
    assert tiny.rel_err(want, triton_experts.gemv_experts(x, idx.int(), w, up, down, shared)) <= TOL  # int32 ids


@torch.no_grad()
def test_grouped_gemv_experts_in_bf16_match_loop(monkeypatch) -> None:
    """The grouped tiles multiply 16-bit tiles with tl.dot (the GPU's pinned decode config). Triton
    3.6's interpreter multiplied bf16 tiles as their raw bits (values around 1e10 here) until
    ``triton_moe.dot_t`` took them through fp32 there; bf16 agrees with the loop to a few roundings
    (the interpreter rounds casts toward zero)."""
    index = next(i for i, c in enumerate(triton_experts._CONFIGS) if c[3])
    monkeypatch.setattr(triton_experts, "INTERPRETER_CONFIG", index)
    triton_experts._kernel.cache_clear()
    try:
        x, idx, w, up, down, shared = (t if t.dtype == torch.long else t.bfloat16()
                                       for t in _experts(n_tok=3, n_exp=8, k=2, d_in=40, inter=24))
        want = loop_experts(x, idx, w.float(), up, down, shared)
        got = triton_experts.gemv_experts(x, idx, w.float(), up, down, shared)
    finally:
        triton_experts._kernel.cache_clear()
    assert got.dtype == torch.bfloat16 and tiny.rel_err(want.float(), got.float()) <= 2e-2


@pytest.mark.skipif(CUDA, reason="torch's grouped GEMM is bf16-only on CUDA: tests/gpu covers this")
@pytest.mark.parametrize("with_shared", [False, True])
def test_grouped_experts_fast_path_matches_loop(with_shared: bool, monkeypatch) -> None:
    x, idx, w, up, down, shared = _experts(n_tok=11, n_exp=6, k=2, d_in=16, inter=24)
    shared = shared if with_shared else None
    assert grouped_mm_supported(x, up, down) and triton_moe.usable(x)
    calls = []
    real = triton_moe.combine_triton
    monkeypatch.setattr(triton_moe, "combine_triton", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    # The model takes the fused combine on CUDA only; here the interpreter stands in for the GPU.
    monkeypatch.setattr(experts_ops, "_fused_combine", lambda y, w, s: True)
    want = loop_experts(x, idx, w, up, down, shared)
    got = grouped_experts(x, idx, w, up, down, shared)
    assert calls, "the Triton combine did not run"
    assert got.shape == want.shape and got.dtype == want.dtype
    assert tiny.rel_err(want, got) <= TOL


def test_grouped_experts_keep_torch_combine_for_autograd(monkeypatch) -> None:
    """The Triton combine has no backward: with autograd on, the torch path runs and gradients flow."""
    x, idx, w, up, down, shared = _experts(n_tok=5, n_exp=4, k=2, d_in=16, inter=8)
    w.requires_grad_(True)
    monkeypatch.setattr(triton_moe, "combine_triton", lambda *a, **kw: pytest.fail("Triton combine under autograd"))
    got = grouped_experts(x, idx, w, up, down, shared)
    got.sum().backward()
    assert w.grad is not None
    with torch.no_grad():
        assert tiny.rel_err(loop_experts(x, idx, w, up, down, shared), got) <= TOL


def test_loop_experts_add_shared_in_fp32() -> None:
    x, idx, w, up, down, shared = _experts(n_tok=4, n_exp=4, k=2, d_in=16, inter=8)
    assert torch.equal(loop_experts(x, idx, w, up, down, shared), loop_experts(x, idx, w, up, down) + shared)


@torch.no_grad()
def test_model_decode_with_triton_linear_matches_torch_linear() -> None:
    """The whole decode path with every projection on the GEMV: same logits as F.linear (fp32)."""
    from nemotron_core.create import build_config, random_model
    from nemotron_core.generation import Decoder
    from nemotron_core.modeling.linear import Linear

    model = random_model(build_config("tiny"), torch.float32, seed=0, device=DEVICE).eval()
    ids = torch.randint(3, 1000, (1, 7), generator=torch.Generator().manual_seed(0)).to(DEVICE)
    runs = []
    for linear in ("torch", "triton"):
        model.model.backend.linear = linear  # shared by every Linear
        calls = []
        gemv = triton_gemv.gemv
        triton_gemv.gemv = lambda *a, **kw: calls.append(1) or gemv(*a, **kw)
        try:
            dec = Decoder(model, 1, 16, cuda_graph=False)
            steps = [dec.prefill(ids, torch.ones_like(ids))]
            for _ in range(3):
                steps.append(dec.step(steps[-1].argmax(-1)))
        finally:
            triton_gemv.gemv = gemv
        runs.append(torch.stack(steps))
        assert bool(calls) == (linear == "triton")
    model.model.backend.linear = "torch"
    assert any(isinstance(m, Linear) for m in model.modules())
    assert tiny.rel_err(runs[0], runs[1]) <= TOL


def test_gemv_experts_batch_of_eight(gemv_variant) -> None:
    """Batch-8 decode: 24 slots on 12 experts, so most experts serve several tokens."""
    x, idx, w, up, down, shared = _experts(n_tok=8, n_exp=12, k=3, d_in=40, inter=24, seed=5)
    want = loop_experts(x, idx, w, up, down, shared)
    assert tiny.rel_err(want, triton_experts.gemv_experts(x, idx, w, up, down, shared)) <= TOL


@pytest.mark.parametrize("n_tok,top_k", [(1, 2), (3, 1), (8, 3)])
def test_gemv_experts_run_the_shared_expert_as_parts(n_tok: int, top_k: int, gemv_variant) -> None:
    """The shared expert (twice an expert's width) as two more experts per token, in the same launches:
    the routed sum plus relu2(x Su^T) Sd^T plus the added tensor (the block's residual)."""
    x, idx, w, up, down, residual = _experts(n_tok=n_tok, n_exp=8, k=top_k, d_in=40, inter=24, seed=n_tok)
    g = torch.Generator().manual_seed(11)
    s_up = (torch.randn(48, 40, generator=g) / 4).to(DEVICE)
    s_down = (torch.randn(40, 48, generator=g) / 4).to(DEVICE)
    assert triton_experts.shared_parts(up, down, s_up, s_down) == 2
    shared_out = F.linear(F.relu(F.linear(x, s_up)).square(), s_down)
    want = loop_experts(x, idx, w, up, down, residual + shared_out)
    got = triton_experts.gemv_experts(x, idx, w, up, down, residual, shared_mlp=(s_up, s_down))
    assert got.shape == want.shape and tiny.rel_err(want, got) <= TOL
    no_residual = triton_experts.gemv_experts(x, idx, w, up, down, shared_mlp=(s_up, s_down))
    assert tiny.rel_err(loop_experts(x, idx, w, up, down, shared_out), no_residual) <= TOL


def test_shared_parts_refuse_what_does_not_cut() -> None:
    _, _, _, up, down, _ = _experts(n_tok=1, n_exp=4, k=1, d_in=40, inter=24)
    s_up, s_down = torch.zeros(36, 40, device=DEVICE), torch.zeros(40, 36, device=DEVICE)  # 1.5 experts wide
    assert triton_experts.shared_parts(up, down, s_up, s_down) == 0
    assert triton_experts.shared_parts(up, down, s_up[:24].double(), s_down[:, :24]) == 0  # another dtype
    with pytest.raises(ValueError, match="does not cut"):
        triton_experts.gemv_experts(torch.zeros(1, 40, device=DEVICE), torch.zeros(1, 1, dtype=torch.long, device=DEVICE),
                                    torch.ones(1, 1, device=DEVICE), up, down, shared_mlp=(s_up, s_down))


def test_decode_expert_config_is_pinned_per_architecture(monkeypatch) -> None:
    # On an H100/H200 (sm_90) the decode calls take the config measured inside the model, whatever
    # another process's autotuning left on disk; elsewhere, on CPU and with PIN off, the autotuner's.
    monkeypatch.setattr(triton_moe, "interpreting", lambda: False)
    cuda = torch.device("cuda", 0)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert triton_experts.pinned_config(cuda) == triton_experts.PINNED[(9, 0)]
    assert triton_experts.pinned_config(cuda)["GROUPED"]
    assert triton_experts.pinned_config(torch.device("cpu")) is None
    monkeypatch.setattr(triton_experts, "PIN", False)
    assert triton_experts.pinned_config(cuda) is None
    monkeypatch.setattr(triton_experts, "PIN", True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    assert triton_experts.pinned_config(cuda) is None


@pytest.mark.skipif(CUDA, reason="tests/gpu covers the CUDA model path")
@torch.no_grad()
def test_moe_block_runs_shared_expert_inside_the_decode_gemv(monkeypatch) -> None:
    """The MoE block at decode: routed and shared experts in the GEMV's launches (the shared expert as
    two parts), the residual added in the combine; same output as the block's torch path (fp32)."""
    from nemotron_core.create import build_config, random_model
    from nemotron_core.lora import LoRALinear
    from nemotron_core.modeling import moe

    model = random_model(build_config("tiny"), torch.float32, seed=0)
    block = next(m for m in model.modules() if isinstance(m, moe.MoE))
    g = torch.Generator().manual_seed(4)
    for n_tok in (1, 3):
        x = torch.randn(n_tok, 1, block.experts.up_proj.shape[2], generator=g)
        residual = torch.randn(x.shape, generator=g)
        want = block(x, residual=residual)  # the CPU path: torch router, shared MLP, grouped experts
        calls = []
        real = triton_experts.gemv_experts
        with monkeypatch.context() as m:
            # The interpreter stands in for the GPU (the model takes the GEMV on CUDA only).
            m.setattr(moe, "_decode_gemv", lambda x, idx, up, down: triton_experts.supported(x, idx, up, down)
                      if x.is_cuda else idx.numel() <= triton_experts.MAX_SLOTS)
            m.setattr(triton_experts, "gemv_experts",
                      lambda *a, **kw: calls.append(len(a) > 6 or "shared_mlp" in kw) or real(*a, **kw))
            got = block(x, residual=residual)
            assert calls == [True], "the shared expert did not run inside the GEMV"
            # An adapter on the shared expert keeps it out of the GEMV (its LoRA path would be skipped).
            lora = LoRALinear(block.shared_experts.up_proj, r=2, scaling=1.0)
            with torch.no_grad():  # a trained-looking adapter (B starts at zero: no change at all)
                lora.lora_B.weight.copy_(torch.randn(lora.lora_B.weight.shape, generator=g))
            assert moe._plain_weights(block.shared_experts) is not None
            m.setattr(block.shared_experts, "up_proj", lora)
            assert moe._plain_weights(block.shared_experts) is None
            calls.clear()
            with_adapter = block(x, residual=residual)
            assert calls == [False]  # routed experts only
            # The reference with the same adapter: the torch path throughout.
            m.setattr(moe, "_decode_gemv", lambda *a: False)
            want_adapter = block(x, residual=residual)
        assert got.shape == want.shape and tiny.rel_err(want, got) <= TOL
        assert tiny.rel_err(want_adapter, want) > 1e-3  # the adapter matters
        assert tiny.rel_err(want_adapter, with_adapter) <= TOL


# ---- norms folded into the decode kernels ------------------------------------------------------------------
def _bf16_ulps(got: torch.Tensor, want: torch.Tensor) -> float:
    """Largest difference in units of bf16's spacing at the reference value."""
    spacing = torch.finfo(torch.bfloat16).eps * want.float().abs().clamp_min(1e-6)
    return ((got.float() - want.float()).abs() / spacing).max().item()


@pytest.mark.parametrize("n", [1, 9])
def test_router_partials_fold_the_rms_norm(n: int) -> None:
    """With ``norm``, the partial logits are those of the normalised rows, and the normalised rows
    come back as the norm would return them (within one bf16 rounding: the mean square is summed in
    another order)."""
    from nemotron_core.ops import triton_router

    g = torch.Generator().manual_seed(n)
    x = (torch.randn(n, 600, generator=g) * 3).bfloat16().to(DEVICE)
    w = (torch.randn(20, 600, generator=g) * 0.05).to(DEVICE)
    gain = (torch.rand(600, generator=g) + 0.5).bfloat16().to(DEVICE)
    want_xn = F.rms_norm(x.float(), (600,), gain.float(), 1e-5).bfloat16()
    parts, xn = triton_router.router_partials(x, w, norm=(gain, 1e-5))
    assert xn.shape == x.shape and xn.dtype == x.dtype
    assert _bf16_ulps(xn, want_xn) <= 1.0
    # The logits are exactly the plain kernel's on the normalised rows it returned.
    assert torch.equal(parts, triton_router.router_partials(xn, w))


@pytest.mark.parametrize("n", [1, 5])
def test_combine_returns_the_next_norm_of_its_output(n: int) -> None:
    g = torch.Generator().manual_seed(n)
    k, h = 3, 300  # whole rows in one program: BLOCK_H = 512, masked past 300
    y = torch.randn(n * (k + 2), h, generator=g).bfloat16().to(DEVICE)
    w = torch.rand(n, k, generator=g).to(DEVICE)
    shared = torch.randn(n, h, generator=g).bfloat16().to(DEVICE)
    gain = (torch.rand(h, generator=g) + 0.5).bfloat16().to(DEVICE)
    plain = triton_moe.combine_triton(y, None, w, shared, shared_parts=2)
    out, normed = triton_moe.combine_triton(y, None, w, shared, shared_parts=2, next_norm=(gain, 1e-5))
    assert torch.equal(out, plain)
    want = F.rms_norm(plain.float(), (h,), gain.float(), 1e-5).bfloat16()
    assert normed.dtype == torch.bfloat16 and _bf16_ulps(normed, want) <= 1.0


@pytest.mark.skipif(CUDA, reason="tests/gpu covers the CUDA model path")
@torch.no_grad()
def test_moe_decode_with_norms_equals_the_block_with_its_norms(monkeypatch) -> None:
    """``MoE.decode_with_norms``: ``x + moe(norm(x))`` and the next block's ``norm`` of it, with both
    norms inside the MoE kernels, equal the block run with separate norms (bf16: within a bf16 rounding
    or two, as the folded mean squares are summed in another order); also when the previous block
    passes the normalised input in."""
    from nemotron_core.create import build_config, random_model
    from nemotron_core.modeling import moe
    from nemotron_core.modeling.model import Block

    model = random_model(build_config("tiny"), torch.bfloat16, seed=0)
    layers = list(model.model.layers.values())
    i = next(j for j, b in enumerate(layers) if isinstance(b.mixer, moe.MoE))
    block, after = layers[i], layers[i + 1].norm
    # The interpreter stands in for the GPU (the model folds norms on CUDA only).
    monkeypatch.setattr(moe.Router, "folds_norm", lambda self, x: x.dtype == torch.bfloat16)
    monkeypatch.setattr(triton_experts, "takes", lambda device, slots: slots <= triton_experts.MAX_SLOTS)
    monkeypatch.setattr(moe, "_decode_gemv", lambda x, idx, up, down: idx.numel() <= triton_experts.MAX_SLOTS)
    g = torch.Generator().manual_seed(5)
    for n_tok in (1, 3):
        x = (torch.randn(n_tok, 1, 64, generator=g) * 2).bfloat16()
        want = block.mixer(block.norm(x), residual=x)  # the same GEMV kernels, norms separate
        want_next = after(want)
        for normed in (None, block.norm(x)):
            out, nxt = block.mixer.decode_with_norms(x, block.norm, normed, after)
            assert out.shape == x.shape and nxt.shape == x.shape
            assert tiny.rel_err(want.float(), out.float()) <= 1e-2
            assert tiny.rel_err(want_next.float(), nxt.float()) <= 1e-2
        out, nxt = block.mixer.decode_with_norms(x, block.norm, None, None)
        assert nxt is None and tiny.rel_err(want.float(), out.float()) <= 1e-2
        assert isinstance(block, Block)


# ---- a short prompt's experts, tokens sorted by expert ----------------------------------------------------
@pytest.mark.parametrize("n_tok,n_exp,k", [(37, 8, 2), (50, 4, 3), (45, 8, 2)])
@pytest.mark.parametrize("with_shared", [False, True])
@torch.no_grad()
def test_sorted_experts_match_loop(n_tok: int, n_exp: int, k: int, with_shared: bool) -> None:
    """The prompt path: every expert's slots in chunks of MG rows (50 tokens on 4 experts: about 38 slots
    an expert, 64-row chunks; 37 tokens on 8 experts: 16-row chunks, some experts empty or nearly; 45
    tokens on 8 experts, skewed: every token picks expert 5, so that expert has three 16-row chunks
    and four others none), both projections (each chunk its own program), against the loop reference
    (fp32)."""
    from nemotron_core.ops import triton_sorted_experts

    x, idx, w, up, down, shared = _experts(n_tok=n_tok, n_exp=n_exp, k=k, d_in=40, inter=24, seed=n_tok)
    if n_tok == 45:
        idx[:, 0] = 5
        idx[:, 1] = torch.where(idx[:, 1] == 5, 6, idx[:, 1]) % 3  # experts 0-2 beside it; 3, 4, 6, 7 none
    shared = shared if with_shared else None
    assert triton_sorted_experts.supported(x, idx, up, down)
    want = loop_experts(x, idx, w, up, down, shared)
    got = triton_sorted_experts.sorted_experts(x, idx, w, up, down, shared)
    assert got.shape == want.shape and tiny.rel_err(want, got) <= TOL


@torch.no_grad()
def test_sorted_experts_leave_long_prompts_to_the_grouped_gemm() -> None:
    from nemotron_core.ops import triton_sorted_experts

    x, idx, _, up, down, _ = _experts(n_tok=4, n_exp=8, k=2, d_in=16, inter=8)
    assert triton_sorted_experts.supported(x, idx, up, down)
    many = torch.zeros(triton_sorted_experts.MAX_SLOTS + 1, 1, dtype=torch.long, device=DEVICE)
    assert not triton_sorted_experts.supported(x, many, up, down)
    with torch.enable_grad():
        assert not triton_sorted_experts.supported(x, idx, up, down)  # no backward
