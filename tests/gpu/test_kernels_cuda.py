"""Fast kernels against the plain-PyTorch references (run on a CUDA machine; skipped elsewhere).

    python -m pytest tests/gpu -q
"""
from __future__ import annotations

import pytest
import torch

from nemotron_core.backend import BackendConfig, mamba_triton_ops

from .common import rel

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
needs_mamba = pytest.mark.skipif(mamba_triton_ops() is None, reason="needs mamba-ssm")


def _scan_inputs(b=2, s=300, h=8, p=32, g=2, n=32, seed=0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    r = lambda *shape: torch.randn(*shape, device="cuda", generator=gen)  # noqa: E731
    return dict(x=r(b, s, h, p), dt=r(b, s, h) - 2, A=-torch.rand(h, device="cuda", generator=gen) - 0.5,
                B=r(b, s, g, n), C=r(b, s, g, n), D=torch.rand(h, device="cuda", generator=gen),
                dt_bias=r(h) * 0.1)


@needs_mamba
@pytest.mark.parametrize("packed", [False, True])
def test_triton_chunk_scan_matches_reference(packed: bool) -> None:
    from nemotron_core.ops.ssd import ssd_scan

    t = _scan_inputs()
    seq_idx = None
    if packed:
        seq_idx = torch.zeros(2, 300, dtype=torch.int32, device="cuda")
        seq_idx[:, 70:] = 1
        seq_idx[:, 201:] = 2
    init = None if packed else torch.randn(2, 8, 32, 32, device="cuda")
    ref_y, ref_state = ssd_scan(t["x"], t["dt"], t["A"], t["B"], t["C"], 64, t["D"], t["dt_bias"],
                                seq_idx=seq_idx, initial_state=init)
    y, state = mamba_triton_ops()["chunk_scan"](
        t["x"], t["dt"], t["A"], t["B"], t["C"], 64, D=t["D"], dt_bias=t["dt_bias"], dt_softplus=True,
        seq_idx=seq_idx, initial_states=init, return_final_states=True)
    # Triton's dots run in TF32: 1e-2 relative is its rounding, far below a wrong reset (order 1).
    assert rel(y, ref_y) < 1e-2
    assert rel(state, ref_state) < 1e-2


@needs_mamba
def test_triton_state_update_matches_reference() -> None:
    from nemotron_core.ops.ssd import ssd_step

    b, h, p, g, n = 3, 8, 32, 2, 32
    state = torch.randn(b, h, p, n, device="cuda")
    x, dt = torch.randn(b, h, p, device="cuda"), torch.randn(b, h, device="cuda")
    A, D, bias = -torch.rand(h, device="cuda") - 0.5, torch.rand(h, device="cuda"), torch.randn(h, device="cuda") * 0.1
    B, C = torch.randn(b, g, n, device="cuda"), torch.randn(b, g, n, device="cuda")
    s_ref = state.clone()
    y_ref = ssd_step(s_ref, x, dt, A, B, C, D, bias)
    s_tri = state.clone()
    y = mamba_triton_ops()["state_update"](s_tri, x, dt[..., None].expand(-1, -1, p), A[:, None, None].expand(-1, p, n),
                                           B, C, D=D[:, None].expand(-1, p), dt_bias=bias[:, None].expand(-1, p),
                                           dt_softplus=True)
    assert rel(y, y_ref) < 1e-3
    assert rel(s_tri, s_ref) < 1e-3


def test_grouped_experts_bf16_match_loop() -> None:
    from nemotron_core.ops.experts import grouped_experts, grouped_mm_supported, loop_experts

    torch.manual_seed(0)
    x = torch.randn(257, 64, device="cuda", dtype=torch.bfloat16)
    up = torch.randn(16, 128, 64, device="cuda", dtype=torch.bfloat16) * 0.05
    down = torch.randn(16, 64, 128, device="cuda", dtype=torch.bfloat16) * 0.05
    idx = torch.randint(0, 12, (257, 4), device="cuda")  # experts 12..15 receive nothing
    w = torch.rand(257, 4, device="cuda")
    assert grouped_mm_supported(x, up, down)
    assert rel(grouped_experts(x, idx, w, up, down), loop_experts(x, idx, w, up, down)) < 2e-2


def _tiny_model(mamba: str, dtype=torch.float32):
    from nemotron_core.create import build_config, random_model

    model = random_model(build_config("tiny"), dtype, seed=0, device="cuda").eval()
    backend = BackendConfig(mamba=mamba)  # one object, shared as the model shares its own
    for m in model.modules():
        if hasattr(m, "backend"):
            m.backend = backend
    model.backend = backend
    return model


@needs_mamba
def test_model_triton_path_matches_torch_path() -> None:
    ids = torch.randint(0, 1000, (2, 77), device="cuda")
    with torch.no_grad():
        a = _tiny_model("torch")(ids).logits
        b = _tiny_model("triton")(ids).logits
    assert rel(b, a) < 1e-2


@needs_mamba
def test_packed_equals_separate_on_triton_path() -> None:
    model = _tiny_model("triton")
    seqs = [torch.randint(0, 1000, (n,), device="cuda") for n in (37, 50, 13)]
    cu = torch.tensor([0, 37, 87, 100], dtype=torch.int32, device="cuda")
    with torch.no_grad():
        packed = model(input_ids=torch.cat(seqs)[None], cu_seqlens=cu, qkv_format="thd").logits[0]
        alone = torch.cat([model(s[None]).logits[0] for s in seqs])
    assert rel(packed, alone) < 1e-2


@pytest.mark.parametrize("experts", ["grouped", "loop"])
def test_cuda_graph_decode_matches_eager(experts: str) -> None:
    """The default expert path is capturable; the loop reference has data-dependent shapes, so the
    decoder must fall back to eager decoding with a warning, and give the same tokens either way."""
    from nemotron_core.generation import Decoder, SamplingConfig, generate

    model = _tiny_model("auto", torch.bfloat16)
    model.set_experts_implementation(experts)
    prompts = [torch.randint(3, 1000, (n,)).tolist() for n in (20, 9)]
    cfg = SamplingConfig(max_new_tokens=24, do_sample=False)
    eager = generate(model, prompts, cfg, decoder=Decoder(model, 2, 64, cuda_graph=False))
    if experts == "loop":
        with pytest.warns(UserWarning, match="not capturable"):
            graph = generate(model, prompts, cfg, decoder=Decoder(model, 2, 64, cuda_graph=True))
        assert not graph.cuda_graph
    else:
        graph = generate(model, prompts, cfg, decoder=Decoder(model, 2, 64, cuda_graph=True))
        assert graph.cuda_graph and not eager.cuda_graph
    assert graph.sequences == eager.sequences


@pytest.mark.parametrize("ntok", [1, 8])
def test_triton_gemv_experts_match_loop(ntok: int) -> None:
    from nemotron_core.ops import triton_experts
    from nemotron_core.ops.experts import loop_experts

    torch.manual_seed(0)
    x = torch.randn(ntok, 200, device="cuda", dtype=torch.bfloat16)
    up = torch.randn(16, 136, 200, device="cuda", dtype=torch.bfloat16) * 0.05
    down = torch.randn(16, 200, 136, device="cuda", dtype=torch.bfloat16) * 0.05
    idx = torch.randint(0, 16, (ntok, 6), device="cuda")
    w = torch.rand(ntok, 6, device="cuda")
    assert triton_experts.supported(x, idx, up, down)
    assert rel(triton_experts.gemv_experts(x, idx, w, up, down), loop_experts(x, idx, w, up, down)) < 2e-2


@needs_mamba
def test_triton_gated_norm_matches_reference() -> None:
    from nemotron_core.ops.norms import gated_rms_norm

    y, z = torch.randn(4, 33, 128, device="cuda"), torch.randn(4, 33, 128, device="cuda")
    w = torch.rand(128, device="cuda") + 0.5
    ref = gated_rms_norm(y, z, w, 32, 1e-5)
    out = mamba_triton_ops()["gated_rmsnorm"](y, w, None, z=z, eps=1e-5, group_size=32, norm_before_gate=False)
    assert rel(out, ref) < 1e-4


def test_add_linear_adds_the_residual_in_the_gemm() -> None:
    """``add_linear`` on CUDA: ``residual + x W^T`` as one addmm, rounded once: at least as close to
    the exact (fp32) result as the two-rounding ``residual + F.linear``; adapters, autocast and an
    fp32 residual under autocast take the plain path."""
    from nemotron_core.modeling.linear import Linear, add_linear

    torch.manual_seed(0)
    proj = Linear(1024, 2688, bias=False).cuda().bfloat16()
    x = torch.randn(4096, 1024, device="cuda").bfloat16()
    residual = torch.randn(4096, 2688, device="cuda").bfloat16() * 4
    exact = residual.float() + x.float() @ proj.weight.float().t()
    two_roundings = residual + torch.nn.functional.linear(x, proj.weight)
    fused = add_linear(residual, proj, x)
    assert fused.shape == residual.shape and fused.dtype == torch.bfloat16
    assert (fused.float() - exact).abs().max() <= (two_roundings.float() - exact).abs().max()
    assert rel(fused, exact) < 1e-2
    wrapper = torch.nn.Sequential(proj)  # not a Linear (as a LoRA wrapper is not): residual + proj(x)
    assert torch.equal(add_linear(residual, wrapper, x), residual + proj(x))
    with torch.autocast("cuda", dtype=torch.bfloat16):
        fp32_residual = residual.float()
        out = add_linear(fp32_residual, proj.float(), x)
    assert out.dtype == torch.float32  # the fp32 residual stream was not cast to bf16


def test_rms_norm_without_casts_matches_fp32_reference() -> None:
    """bf16 in, bf16 weight: CUDA's fused kernel accumulates in fp32 and rounds once, like the
    spelled-out fp32 reference; at most one bf16 ulp apart (reduction order)."""
    import torch.nn.functional as F

    from nemotron_core.ops.norms import rms_norm

    gen = torch.Generator(device="cuda").manual_seed(0)
    x = (torch.randn(64, 2688, device="cuda", generator=gen) * 3).bfloat16()
    w = (torch.rand(2688, device="cuda", generator=gen) + 0.5).bfloat16()
    ref = F.rms_norm(x.float(), (2688,), w.float(), 1e-5).bfloat16()
    ulp = torch.finfo(torch.bfloat16).eps * ref.float().abs().clamp_min(1e-3)
    for grad in (False, True):  # mamba-ssm's Triton kernel (inference), torch's fused kernel (autograd)
        with torch.set_grad_enabled(grad):
            out = rms_norm(x.requires_grad_(grad), w, 1e-5)
        assert out.dtype == torch.bfloat16
        assert bool(((out.detach().float() - ref.float()).abs() <= ulp).all())


def test_graph_prefill_matches_eager_prefill() -> None:
    """Short prompts prefill by replaying a CUDA graph captured per 64-token bucket (on the bucket's
    second use): same tokens as the same padded prefill run eagerly (same kernels and shapes, so
    bf16 rounds identically), for two prompt lengths sharing one bucket. (Padded == unpadded is
    checked in fp32 on CPU.)"""
    from nemotron_core.generation import Decoder, SamplingConfig, generate

    model = _tiny_model("auto", torch.bfloat16)
    cfg = SamplingConfig(max_new_tokens=16, do_sample=False)
    graphed = Decoder(model, 2, 128, cuda_graph=True)
    for lengths in ((20, 9), (33, 40)):
        prompts = [torch.randint(3, 1000, (n,)).tolist() for n in lengths]
        eager = generate(model, prompts, cfg, decoder=Decoder(model, 2, 128, cuda_graph=False, bucket_prefill=True))
        if not graphed._static:
            generate(model, prompts, cfg, decoder=graphed)  # first use of the bucket: eager prefill
            assert not graphed._static
        graph = generate(model, prompts, cfg, decoder=graphed)
        assert graph.sequences == eager.sequences
    assert list(graphed._static) == [64] and graphed._static[64].graph is not None


def test_triton_linear_decode_matches_cublas() -> None:
    """BackendConfig(linear="triton"): decode projections as Triton GEMVs (captured in the CUDA graph).
    Both bf16 paths round at the same points, in another order, and over 6 decode steps of a random
    model those differences grow: each is held against the same model in fp32, and the GEMV path may
    be off by at most twice what the cuBLAS path is."""
    import copy

    from nemotron_core.generation import Decoder

    model = _tiny_model("auto", torch.bfloat16)
    reference = copy.deepcopy(model).float()  # the same weights, computed in fp32
    ids = torch.randint(3, 1000, (1, 12), device="cuda")
    tok = torch.randint(3, 1000, (6, 1), device="cuda")
    runs = []
    for net, linear in ((reference, "torch"), (model, "torch"), (model, "triton")):
        net.model.backend.linear = linear
        dec = Decoder(net, 1, 64, cuda_graph=True)
        steps = [dec.prefill(ids, torch.ones_like(ids))] + [dec.step(t) for t in tok]
        assert dec.graph is not None
        runs.append(torch.stack(steps).float())
    model.model.backend.linear = "torch"
    err_cublas, err_gemv = rel(runs[1], runs[0]), rel(runs[2], runs[0])
    print(f"bf16 decode against fp32: cuBLAS path {err_cublas:.2e}, GEMV path {err_gemv:.2e}, "
          f"between them {rel(runs[2], runs[1]):.2e}")
    assert err_gemv <= 2 * err_cublas


def test_inference_forward_fuses_qkv_and_adds_in_place_without_changing_results() -> None:
    """Inference on CUDA fuses q/k/v into one GEMM and adds each block's output into its input
    (``meta.residual_writable``): the logits equal the autograd path's (separate projections, no
    in-place adds) in fp32, the caller's ``inputs_embeds`` stay untouched, and ``output_hidden_states``
    (which keeps every block's input) reports the same final state."""
    from nemotron_core.modeling.attention import Attention

    model = _tiny_model("auto")
    ids = torch.randint(0, 1000, (2, 77), device="cuda")
    with torch.enable_grad():
        ref = model(ids).logits.detach()
    assert all(m._fused_qkv is None for m in model.modules() if isinstance(m, Attention))
    embeds = model.get_input_embeddings()(ids).detach()
    kept = embeds.clone()
    with torch.no_grad():
        by_ids = model(ids).logits
        by_embeds = model(inputs_embeds=embeds).logits
        with_states = model(ids, output_hidden_states=True)
    assert any(m._fused_qkv is not None for m in model.modules() if isinstance(m, Attention))
    assert torch.equal(embeds, kept)
    assert rel(by_ids, ref) < 1e-5
    assert torch.equal(by_embeds, by_ids)
    assert torch.equal(with_states.logits, by_ids)
    assert torch.equal(with_states.hidden_states[0], kept)


def test_decode_folding_norms_into_moe_kernels_keeps_the_tokens(monkeypatch) -> None:
    """At decode the MoE blocks fold their own norm and the next block's into their kernels
    (``MoE.decode_with_norms``): the graph-captured greedy tokens equal those with separate norm
    kernels, and the folded path really ran."""
    from nemotron_core.generation import Decoder, SamplingConfig, generate
    from nemotron_core.modeling import model as model_mod
    from nemotron_core.modeling.moe import MoE

    model = _tiny_model("auto", torch.bfloat16)
    prompts = [torch.randint(3, 1000, (n,)).tolist() for n in (20, 9)]
    cfg = SamplingConfig(max_new_tokens=24, do_sample=False)
    monkeypatch.setattr(model_mod, "FOLD_NORMS", False)
    separate = generate(model, prompts, cfg, decoder=Decoder(model, 2, 64, cuda_graph=True))
    monkeypatch.setattr(model_mod, "FOLD_NORMS", True)
    folded_calls = []
    real = MoE.decode_with_norms
    monkeypatch.setattr(MoE, "decode_with_norms",
                        lambda *a, **kw: (lambda r: folded_calls.append(r is not None) or r)(real(*a, **kw)))
    folded = generate(model, prompts, cfg, decoder=Decoder(model, 2, 64, cuda_graph=True))
    assert any(folded_calls)
    assert folded.cuda_graph and separate.cuda_graph
    assert folded.sequences == separate.sequences


def test_capture_survives_garbage_collection_of_an_old_decoder() -> None:
    """An unreachable decoder (in a reference cycle) whose CUDA graph the garbage collector frees
    must not abort a later capture: with the collector at its most eager (threshold 1, so any
    allocation may run it), the second decoder still captures and decodes the same tokens."""
    import gc
    import warnings

    from nemotron_core.generation import Decoder, SamplingConfig, generate

    model = _tiny_model("auto", torch.bfloat16)
    prompts = [torch.randint(3, 1000, (12,)).tolist()]
    cfg = SamplingConfig(max_new_tokens=8, do_sample=False)
    old = Decoder(model, 1, 32, cuda_graph=True)
    first = generate(model, prompts, cfg, decoder=old)
    old.cycle = old  # reachable only through itself once the name is gone
    del old
    thresholds = gc.get_threshold()
    gc.set_threshold(1, 1, 1)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            second = generate(model, prompts, cfg, decoder=Decoder(model, 1, 32, cuda_graph=True))
    finally:
        gc.set_threshold(*thresholds)
    assert first.cuda_graph and second.cuda_graph
    assert second.sequences == first.sequences
