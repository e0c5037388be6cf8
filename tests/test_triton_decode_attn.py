"""The flash-decoding kernels (``nemotron_core.ops.triton_decode_attn``) against their plain-PyTorch
reference, on CPU through Triton's interpreter (switched on by ``conftest.py``; see ``triton_cpu.py``).

Everything is fp32. Kernel and reference do the same products and differ only in the order of the
fp32 sums (blocked online softmax vs. one softmax) and in exp2 vs. exp: a few ulps, so outputs must
agree to 1e-5 of the largest output (a wrong position, head or weight shows as O(1) errors). The
caches after a call must equal the reference's bit for bit: the new row at pos, nothing else touched.

Shapes are tiny (the interpreter runs every program as numpy code): a 150-position cache in chunks
of 32 (5 splits, the last one partial) walked in blocks of 16, so every chunk has two blocks.
"""
from __future__ import annotations

import pytest
import torch

from triton_cpu import DEVICE, require_triton

require_triton()

import tiny  # noqa: E402
from nemotron_core.ops import triton_decode_attn  # noqa: E402
from nemotron_core.ops.triton_decode_attn import (  # noqa: E402
    decode_attention,
    decode_attention_reference,
    split_plan,
    supported,
)

TOL = 1e-5
L, CHUNK, BLOCK = 150, 32, 16
# pos in the first chunk, the last of chunk 1, the first of chunk 2 (a boundary), a middle chunk, L-1
# (in the partial last chunk).
POSITIONS = (5, 31, 32, 77, L - 1)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """``max|a - b| / max|b|`` (b is the reference)."""
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30)).item()


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit for bit (NaNs included)."""
    return torch.equal(a.view(torch.int32), b.view(torch.int32))


def _inputs(b: int, hq: int, hkv: int, d: int, pos: int, starts: tuple[int, ...], seed: int, length: int = L):
    """q/k_new/v_new as the model makes them (transposed views of [B, 1, H, D]), random caches, and a
    left-padded mask: row r valid from ``starts[r]`` up to pos (pos itself always), False after."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, 1, hq, d, generator=g).transpose(1, 2)
    k_new = torch.randn(b, 1, hkv, d, generator=g).transpose(1, 2)
    v_new = torch.randn(b, 1, hkv, d, generator=g).transpose(1, 2)
    k_cache = torch.randn(b, hkv, length, d, generator=g)
    v_cache = torch.randn(b, hkv, length, d, generator=g)
    valid = torch.zeros(b, length, dtype=torch.bool)
    for r, start in enumerate(starts):
        valid[r, start:pos + 1] = True
        valid[r, pos] = True
    dev = [t.to(DEVICE) for t in (q, k_new, v_new, k_cache, v_cache, valid)]
    return (*dev, torch.tensor([pos], device=DEVICE))


def _check(q, k_new, v_new, k_cache, v_cache, valid, pos, **kw) -> torch.Tensor:
    """Kernel and reference on copies of the same caches: outputs within TOL, caches identical."""
    kc, vc = k_cache.clone(), v_cache.clone()
    scale = q.shape[-1] ** -0.5
    want = decode_attention_reference(q, k_new, v_new, k_cache, v_cache, pos, valid, scale)
    got = decode_attention(q, k_new, v_new, kc, vc, pos, valid, scale, **kw)
    assert got.shape == q.shape and got.dtype == q.dtype
    assert torch.isfinite(got).all()
    err = rel(got, want)
    assert err <= TOL, f"relative error {err:.2e}"
    assert _same(kc, k_cache) and _same(vc, v_cache)
    return got


@pytest.mark.parametrize("pos", POSITIONS)
@pytest.mark.parametrize("b, hq, hkv, d, starts", [
    (1, 4, 2, 16, (0,)),
    (3, 4, 2, 32, (0, 3, 40)),  # left padding; for pos < 40 the last row sees only pos itself
    (3, 8, 1, 16, (7, 0, 33)),
    (3, 2, 2, 32, (1, 20, 0)),
])
def test_matches_reference(b: int, hq: int, hkv: int, d: int, starts: tuple[int, ...], pos: int) -> None:
    inputs = _inputs(b, hq, hkv, d, pos, starts, seed=pos * 10 + hq)
    assert -(-L // CHUNK) == 5
    _check(*inputs, chunk=CHUNK, block_l=BLOCK)


@pytest.mark.parametrize("pos", [20, 290])
def test_many_splits(pos: int) -> None:
    """19 splits of 16 positions: the combine merges them in two blocks of splits (16 at a time), the
    second of which is all empty for the small pos. For the large pos, position 280 (second block)
    gets the top score, so the first block's running sums must be rescaled."""
    q, k_new, v_new, k_cache, v_cache, valid, pos_t = _inputs(2, 4, 2, 16, pos, (0, 9), seed=pos, length=300)
    if pos > 280:
        k_cache[:, :, 280] = 2 * q[:, :, 0].reshape(2, 2, 2, 16).sum(2)  # the sum of each group's queries
    _check(q, k_new, v_new, k_cache, v_cache, valid, pos_t, chunk=16, block_l=16)


def test_new_row_written_at_pos_only() -> None:
    q, k_new, v_new, k_cache, v_cache, valid, pos = _inputs(3, 4, 2, 16, 40, (0, 3, 9), seed=1)
    kc, vc = k_cache.clone(), v_cache.clone()
    decode_attention(q, k_new, v_new, kc, vc, pos, valid, 0.25, chunk=CHUNK, block_l=BLOCK)
    assert torch.equal(kc[:, :, 40], k_new[:, :, 0]) and torch.equal(vc[:, :, 40], v_new[:, :, 0])
    others = torch.arange(L, device=DEVICE) != 40
    assert torch.equal(kc[:, :, others], k_cache[:, :, others])
    assert torch.equal(vc[:, :, others], v_cache[:, :, others])


@pytest.mark.parametrize("pos", [31, 77])
def test_positions_after_pos_are_never_read(pos: int) -> None:
    """NaN and huge values after pos, marked valid: the result is bit-identical to a clean cache's and
    matches the reference, which only looks at 0..pos. The stale row at pos is not read either (the
    kernel takes k_new/v_new for it)."""
    q, k_new, v_new, k_cache, v_cache, valid, pos_t = _inputs(3, 8, 2, 16, pos, (0, 5, 11), seed=3)
    clean = decode_attention(q, k_new, v_new, k_cache.clone(), v_cache.clone(), pos_t, valid, 0.25,
                             chunk=CHUNK, block_l=BLOCK)
    dirty_k, dirty_v, dirty_valid = k_cache.clone(), v_cache.clone(), valid.clone()
    dirty_k[:, :, pos:] = float("nan")
    dirty_v[:, :, pos:] = 1e30
    dirty_v[:, :, pos + 1::2] = float("nan")
    dirty_valid[:, pos + 1:] = True
    got = _check(q, k_new, v_new, dirty_k, dirty_v, dirty_valid, pos_t, chunk=CHUNK, block_l=BLOCK)
    assert torch.equal(got, clean)


def test_masked_padding_is_never_read() -> None:
    """NaN in left-padding positions (valid False, before pos) does not reach the output."""
    q, k_new, v_new, k_cache, v_cache, valid, pos = _inputs(2, 4, 2, 16, 60, (0, 37), seed=4)
    clean = decode_attention(q, k_new, v_new, k_cache.clone(), v_cache.clone(), pos, valid, 0.25,
                             chunk=CHUNK, block_l=BLOCK)
    k_cache[1, :, :37] = float("nan")
    v_cache[1, :, :37] = float("nan")
    got = decode_attention(q, k_new, v_new, k_cache, v_cache, pos, valid, 0.25, chunk=CHUNK, block_l=BLOCK)
    assert torch.equal(got, clean)


def test_row_with_nothing_visible_gives_zeros() -> None:
    """Never the case in the Decoder (it marks pos valid first); kernel and reference agree on zeros."""
    q, k_new, v_new, k_cache, v_cache, valid, pos = _inputs(2, 4, 2, 16, 50, (0, 0), seed=5)
    valid[1] = False
    got = _check(q, k_new, v_new, k_cache, v_cache, valid, pos, chunk=CHUNK, block_l=BLOCK)
    assert torch.equal(got[1], torch.zeros_like(got[1]))


def test_default_split_plan() -> None:
    """The host's CHUNK/SPLITS rule, and a call that uses it (6 rows x 150 positions: 3 chunks of 64)."""
    assert split_plan(4096, 2, 132) == (64, 64)  # B=1, Hkv=2: chunks of the minimum size
    assert split_plan(4096, 16, 132) == (256, 16)  # B=8, Hkv=2: ~2 programs per SM at full length
    assert split_plan(262144, 2, 132) == (2048, 128)
    assert split_plan(4096, 512, 132) == (4096, 1)  # rows alone fill the GPU: one program per row
    assert split_plan(L, 6) == (64, 3)
    _check(*_inputs(3, 4, 2, 16, 130, (0, 2, 70), seed=6))


def test_supported() -> None:
    q = torch.zeros(2, 8, 1, 32, device=DEVICE)
    cache = torch.zeros(2, 2, 64, 32, device=DEVICE)
    assert supported(q, cache)
    assert not supported(torch.zeros(2, 8, 2, 32, device=DEVICE), cache)  # two query positions
    assert not supported(q.double(), cache.double())
    assert not supported(q.half(), cache)  # dtypes differ
    assert not supported(torch.zeros(2, 6, 1, 32, device=DEVICE), torch.zeros(2, 4, 64, 32, device=DEVICE))
    for d in (8, 48, 512):
        assert not supported(torch.zeros(2, 8, 1, d, device=DEVICE), torch.zeros(2, 2, 64, d, device=DEVICE))
    with pytest.raises(ValueError):
        decode_attention(q, q[:, :2], q[:, :2], cache, cache.clone(), torch.tensor([3], device=DEVICE),
                         torch.ones(2, 63, dtype=torch.bool, device=DEVICE), 1.0)


def test_decoder_steps_through_the_kernel(monkeypatch) -> None:
    """The model's decode branch with the kernel (forced on for CPU tensors, which the model never does
    by itself) gives the logits of the SDPA path, for a plain and a left-padded row."""
    from nemotron_core.generation import Decoder
    from nemotron_core.modeling import attention

    model = tiny.our_model(seed=2, pattern="M*", head_dim=16)
    prompt, steps = 9, 4
    ids = torch.randint(3, tiny.TINY["vocab_size"], (2, prompt + steps), generator=torch.Generator().manual_seed(7))
    mask = tiny.left_padded_mask(2, prompt, 3)

    def run() -> list[torch.Tensor]:
        dec = Decoder(model, batch_size=2, max_length=prompt + steps + 3)
        with torch.no_grad():
            dec.prefill(ids[:, :prompt], mask)
            return [dec.step(ids[:, prompt + i]).clone() for i in range(steps)]

    want = run()
    calls = []
    real = triton_decode_attn.decode_attention

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(attention.Attention, "_flash_decode_valid",
                        lambda self, x, q, meta, k_cache: attention.decode_valid(q, meta, k_cache))
    monkeypatch.setattr(triton_decode_attn, "decode_attention", counted)
    got = run()
    assert len(calls) == steps
    for i, (g, w) in enumerate(zip(got, want)):
        assert tiny.rel_err(w, g) <= TOL, f"step {i}"
