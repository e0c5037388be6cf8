"""The fused cross-entropy (``nemotron_core.ops.triton_ce``) on CUDA, at a training step's shape.

    python -m pytest tests/gpu/test_triton_ce_cuda.py -q -s

``[4096, 131072]`` bf16 is the LM head's output for 4096 training tokens of the Nemotron-H vocabulary
(1 GB). The reference is ``F.cross_entropy(logits.float(), targets, ignore_index=-100,
reduction="sum")`` and its autograd (the gradient flows back through ``.float()`` into bf16).

Tolerances (see also ``tests/test_triton_ce.py``): the loss is the same fp32 computation summed in
another order (and with the GPU's ex2.approx-based exp), checked at 1e-3 relative as the contract
says, with the actual error printed (expected near 1e-6). The gradient is the fp32 ``g * (softmax -
onehot)`` rounded once to bf16 on both sides; the fp32 values differ by a few fp32 ulps, so the bf16
results are equal or one bf16 ulp apart.

``-s`` shows the timings: fused vs reference, forward + backward, in ms, and the peak memory of each.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from .common import triton_ops

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

ROWS, VOCAB = 4096, 131072
IGNORE = -100


def _ops():
    return triton_ops("triton_ce")


def _logits(rows: int, vocab: int, seed: int, dtype: torch.dtype = torch.bfloat16, scale: float = 3.0) -> torch.Tensor:
    g = torch.Generator(device="cuda").manual_seed(seed)
    return (torch.randn(rows, vocab, device="cuda", generator=g) * scale).to(dtype)


def _targets(rows: int, vocab: int, seed: int, ignored_fraction: float = 0.1) -> torch.Tensor:
    g = torch.Generator(device="cuda").manual_seed(seed)
    t = torch.randint(0, vocab, (rows,), device="cuda", generator=g)
    drop = torch.rand(rows, device="cuda", generator=g) < ignored_fraction
    return t.masked_fill(drop, IGNORE)


def _ordered(t: torch.Tensor) -> torch.Tensor:
    """bf16/fp16 bit patterns as integers consecutive in value order (+0 and -0 both 0): a difference
    of n is n ulps. Not for NaNs."""
    i = t.view(torch.int16).int()
    return torch.where(i < 0, -(i & 0x7FFF), i)


def _max_ulps(a: torch.Tensor, b: torch.Tensor, chunk: int = 512) -> int:
    """Over row chunks: the int32 patterns of a whole [4096, 131072] tensor would take 2 GB each."""
    return max(int((_ordered(a[i:i + chunk]) - _ordered(b[i:i + chunk])).abs().max())
               for i in range(0, a.shape[0], chunk))


def _reference(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float(), targets, ignore_index=IGNORE, reduction="sum")


def _with_grad(fn, logits: torch.Tensor, targets: torch.Tensor, g: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    x = logits.detach().requires_grad_(True)
    loss = fn(x, targets)
    loss.backward(torch.tensor(g, device="cuda"))
    return loss.detach(), x.grad


@pytest.fixture(scope="module")
def step():
    """Logits and targets of a training step, 10% of the rows ignored."""
    return _logits(ROWS, VOCAB, 0), _targets(ROWS, VOCAB, 1)


def _check_close(want_loss, want_grad, got_loss, got_grad, logits, label: str) -> None:
    """Loss at 1e-3 relative; gradient within 1 ulp where torch's is a normal number, and within the
    smallest normal of it where torch's is subnormal (softmax probabilities below ~1e-38, which a GPU's
    fast exp may flush to zero: there ulps count meaninglessly many steps between tiny values)."""
    assert got_loss.dtype == torch.float32 and got_loss.dim() == 0
    assert got_grad.dtype == logits.dtype and got_grad.shape == logits.shape
    rel = float((got_loss - want_loss).abs() / want_loss.abs().clamp(min=1e-30))
    tiny = torch.finfo(logits.dtype).tiny
    normal = want_grad.abs() >= tiny
    ulps = _max_ulps(want_grad.masked_fill(~normal, 0), got_grad.masked_fill(~normal, 0))
    sub_err = float((want_grad.float() - got_grad.float()).abs().masked_fill(normal, 0).max())
    differ = int((want_grad != got_grad).sum())
    print(f"\n{label}: loss {float(got_loss):.6f} vs {float(want_loss):.6f} (rel {rel:.2e}), "
          f"gradient: {differ} elements differ, max {ulps} ulp (normals), {sub_err:.1e} (subnormals)")
    assert torch.isfinite(got_loss)
    assert rel <= 1e-3
    assert ulps <= 1
    assert sub_err <= tiny


def test_matches_torch_at_training_shape(step) -> None:
    ops = _ops()
    logits, targets = step
    want_loss, want_grad = _with_grad(_reference, logits, targets, 0.37)
    got_loss, got_grad = _with_grad(ops.cross_entropy_sum, logits, targets, 0.37)
    _check_close(want_loss, want_grad, got_loss, got_grad, logits, f"[{ROWS}, {VOCAB}] bf16")
    ignored = targets == IGNORE
    assert ignored.any()
    assert int(got_grad[ignored].count_nonzero()) == 0  # exactly zero on ignored rows
    del want_grad, got_grad
    torch.cuda.empty_cache()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_other_dtypes(dtype: torch.dtype) -> None:
    """fp32 (loss and gradient at 1e-5 relative) and fp16 (1 ulp), on fewer rows."""
    ops = _ops()
    logits, targets = _logits(512, VOCAB, 2, dtype), _targets(512, VOCAB, 3)
    want_loss, want_grad = _with_grad(_reference, logits, targets)
    got_loss, got_grad = _with_grad(ops.cross_entropy_sum, logits, targets)
    if dtype == torch.float32:
        torch.testing.assert_close(got_loss, want_loss, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got_grad, want_grad, rtol=1e-5, atol=1e-7)
    else:
        _check_close(want_loss, want_grad, got_loss, got_grad, logits, f"[512, {VOCAB}] fp16")


@pytest.mark.parametrize("vocab", [1000, 4096, 4097, 50000])
def test_vocab_sizes(vocab: int) -> None:
    """Below one block (4096), exactly one, one plus a column, and a ragged multi-block vocabulary."""
    ops = _ops()
    logits, targets = _logits(300, vocab, 4), _targets(300, vocab, 5)
    want_loss, want_grad = _with_grad(_reference, logits, targets)
    got_loss, got_grad = _with_grad(ops.cross_entropy_sum, logits, targets)
    _check_close(want_loss, want_grad, got_loss, got_grad, logits, f"[300, {vocab}] bf16")


def test_large_logits_keep_exp_finite() -> None:
    """Logits over +-80, the row max in the first or last block: the online max keeps exp finite."""
    ops = _ops()
    g = torch.Generator(device="cuda").manual_seed(6)
    logits = (torch.rand(64, VOCAB, device="cuda", generator=g) * 2 - 1) * 80
    logits[0::2, 0] = 80.0
    logits[1::2, -1] = 80.0
    logits = logits.bfloat16()
    targets = _targets(64, VOCAB, 7, ignored_fraction=0.0)
    want_loss, want_grad = _with_grad(_reference, logits, targets)
    got_loss, got_grad = _with_grad(ops.cross_entropy_sum, logits, targets)
    assert torch.isfinite(got_grad).all()
    _check_close(want_loss, want_grad, got_loss, got_grad, logits, "+-80 logits")


def test_all_rows_ignored() -> None:
    ops = _ops()
    logits = _logits(128, VOCAB, 8)
    targets = torch.full((128,), IGNORE, device="cuda")
    loss, grad = _with_grad(ops.cross_entropy_sum, logits, targets)
    assert float(loss) == 0.0
    assert int(grad.count_nonzero()) == 0


def test_more_than_2_to_31_elements() -> None:
    """int64 row offsets: rows past element 2**31 (16400 x 131072 bf16 is 4.3 GB, its gradient 4.3 GB
    more), checked against the reference on the last rows."""
    ops = _ops()
    rows = 16400
    assert rows * VOCAB > 2 ** 31
    if torch.cuda.mem_get_info()[0] < 16 * 2 ** 30:
        pytest.skip("needs 16 GB of free GPU memory")
    logits = _logits(rows, VOCAB, 9)
    targets = torch.full((rows,), IGNORE, device="cuda")
    tail = slice(rows - 37, rows)
    targets[tail] = _targets(37, VOCAB, 10, ignored_fraction=0.0)
    got_loss, got_grad = _with_grad(ops.cross_entropy_sum, logits, targets)
    want_loss, want_grad = _with_grad(_reference, logits[tail], targets[tail])
    _check_close(want_loss, want_grad, got_loss, got_grad[tail], logits[tail], "rows past 2**31 elements")
    del logits, got_grad, want_grad
    torch.cuda.empty_cache()


def test_causal_lm_loss_dispatches_to_the_fused_kernel(monkeypatch) -> None:
    ops = _ops()
    from nemotron_core.modeling.model import causal_lm_loss

    calls = []
    real = ops.cross_entropy_sum
    monkeypatch.setattr(ops, "cross_entropy_sum", lambda *a, **k: calls.append(1) or real(*a, **k))
    logits = _logits(2 * 300, 5000, 11).reshape(2, 300, 5000)
    targets = _targets(600, 5000, 12).reshape(2, 300)
    got = causal_lm_loss(logits, targets)
    assert calls, "causal_lm_loss did not use the fused kernel on a CUDA tensor"
    flat_t = targets.reshape(-1)
    want = _reference(logits.reshape(-1, 5000), flat_t) / (flat_t != IGNORE).sum()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=0)


def test_causal_lm_loss_under_torch_compile_uses_the_reference(monkeypatch) -> None:
    """Compiled code keeps torch's ops (no graph break on an opaque kernel)."""
    ops = _ops()
    from nemotron_core.modeling.model import causal_lm_loss

    monkeypatch.setattr(ops, "cross_entropy_sum", lambda *a, **k: pytest.fail("fused CE traced by torch.compile"))
    logits = _logits(64, 5000, 13).reshape(2, 32, 5000)
    targets = _targets(64, 5000, 14).reshape(2, 32)
    compiled = torch.compile(causal_lm_loss, fullgraph=True, dynamic=False)
    want = _reference(logits.reshape(-1, 5000), targets.reshape(-1)) / (targets != IGNORE).sum()
    torch.testing.assert_close(compiled(logits, targets), want, rtol=1e-5, atol=0)


def test_captures_in_a_cuda_graph() -> None:
    """No host sync on the launch path: forward and backward capture and replay."""
    ops = _ops()
    logits, targets = _logits(256, 8192, 15), _targets(256, 8192, 16)
    grad = torch.tensor(1.0, device="cuda")
    losses, lse = ops._forward(logits, targets, IGNORE)  # compile outside the capture
    ops._backward(logits, targets, lse, grad, IGNORE)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        losses, lse = ops._forward(logits, targets, IGNORE)
        dlogits = ops._backward(logits, targets, lse, grad, IGNORE)
    graph.replay()
    torch.cuda.synchronize()
    want_loss, want_grad = _with_grad(_reference, logits, targets)
    _check_close(want_loss, want_grad, losses.sum(), dlogits, logits, "CUDA graph replay")


def _time_ms(fn, iters: int = 10) -> tuple[float, int]:
    """Mean ms of ``fn()`` over iters after warm-up, and its peak memory above the start, in bytes."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters, torch.cuda.max_memory_allocated() - base


def test_timing(step) -> None:
    """Forward + backward, fused vs reference, at the training shape (printed; only sanity-checked)."""
    ops = _ops()
    logits, targets = step

    def run(fn):
        def once():
            x = logits.detach().requires_grad_(True)
            fn(x, targets).backward()
        return once

    ref_ms, ref_mem = _time_ms(run(_reference))
    fused_ms, fused_mem = _time_ms(run(ops.cross_entropy_sum))
    fwd_ms, _ = _time_ms(lambda: ops._forward(logits, targets, IGNORE))
    gib = 2 ** 30
    print(f"\ncross-entropy [{ROWS}, {VOCAB}] bf16, forward + backward: fused {fused_ms:.3f} ms "
          f"(forward alone {fwd_ms:.3f} ms), reference {ref_ms:.3f} ms; peak extra memory fused "
          f"{fused_mem / gib:.2f} GiB, reference {ref_mem / gib:.2f} GiB")
    assert fused_ms < ref_ms
    assert fused_mem < ref_mem
