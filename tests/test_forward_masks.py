"""The masks ``forward`` takes besides ``attention_mask``: ``causal_mask_mapping`` and ``padding_mask``.

* ``causal_mask_mapping={"full_attention": mask}``: a precomputed 4D mask ``[B or 1, 1 or heads, q, kv]``
  for the attention layers, boolean (True = may attend) or additive float (0 = attend, -inf or a large
  negative value = blocked). It replaces the mask the attention layers would build; Mamba layers never
  read it (their padding comes from the 2D mask).
* ``padding_mask``: ``[B, S]`` with True on *padding* (NeMo AutoModel's
  ``attention_mask.bool().logical_not()``), the opposite polarity of ``attention_mask``.

Models are the ``tiny`` preset (every block type) with perturbed random weights, fp32 on the CPU.
"""
from __future__ import annotations

import pytest
import torch

import tiny
from nemotron_core.cache import NemotronHybridCache
from nemotron_core.create import build_config, random_model
from nemotron_core.errors import InputError
from nemotron_core.modeling import attention as attention_mod
from nemotron_core.modeling.model import NemotronHForCausalLM

VOCAB = 1024  # the tiny presets' vocabulary
S = 12
TOL = 1e-5


def make_model(preset: str = "tiny", overrides: list[str] | None = None, seed: int = 0):
    model = random_model(build_config(preset, overrides), torch.float32, seed)
    return tiny.perturb_(model, seed + 1000).eval()


def rel(ref: torch.Tensor, got: torch.Tensor) -> float:
    return float((ref.double() - got.double()).abs().max() / ref.abs().max().clamp(min=1e-30))


@pytest.fixture(scope="module")
def model():
    return make_model()


@pytest.fixture(scope="module")
def ids():
    return torch.randint(3, VOCAB, (2, S), generator=torch.Generator().manual_seed(0))


def causal_bool(q: int, kv: int) -> torch.Tensor:
    return torch.ones(q, kv, dtype=torch.bool).tril(kv - q)[None, None]


def additive(mask: torch.Tensor, blocked: float = float("-inf")) -> torch.Tensor:
    return torch.zeros(mask.shape).masked_fill(~mask, blocked)


# ---- causal_mask_mapping -----------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["bool", "additive_inf", "additive_min", "reference_builder", "per_head"])
@torch.no_grad()
def test_default_causal_mask_given_explicitly_changes_nothing(kind, model, ids):
    causal = causal_bool(S, S)
    mask = {
        "bool": causal,
        "additive_inf": additive(causal),
        "additive_min": additive(causal, torch.finfo(torch.float32).min),
        # What NeMo AutoModel's forward is handed: its own _make_causal_mask (here: ours).
        "reference_builder": NemotronHForCausalLM._make_causal_mask(S, S, 2, torch.float32, torch.device("cpu")),
        "per_head": causal.expand(2, model.config.num_attention_heads, S, S),
    }[kind]
    want = model(input_ids=ids).logits
    got = model(input_ids=ids, causal_mask_mapping={"full_attention": mask}).logits
    assert rel(want, got) < TOL


@pytest.mark.parametrize("as_float", [False, True])
@torch.no_grad()
def test_diagonal_mask_is_used_by_attention_only(as_float, model, ids, monkeypatch):
    """A diagonal-only mask (each token sees itself) changes the logits, and equals the same model
    whose attention is forced to that mask inside the attention op: so the mask reaches every attention
    layer and nothing else (the Mamba layers still mix tokens)."""
    diag = torch.eye(S, dtype=torch.bool)[None, None]
    mask = additive(diag) if as_float else diag
    plain = model(input_ids=ids).logits
    got = model(input_ids=ids, causal_mask_mapping={"full_attention": mask}).logits
    assert rel(plain, got) > 1e-3

    real = attention_mod.sdpa_attention

    def forced(q, k, v, mask, scale):
        return real(q, k, v, torch.eye(S, dtype=torch.bool), scale)

    monkeypatch.setattr(attention_mod, "sdpa_attention", forced)
    want = model(input_ids=ids).logits
    assert rel(want, got) < TOL


@torch.no_grad()
def test_per_row_masks_and_eager_backend(ids):
    """Row 0 diagonal, row 1 causal: each row equals running it alone with its own mask; the eager
    reference backend agrees with SDPA for a boolean mask and for a general additive bias."""
    model = make_model()
    diag, causal = torch.eye(S, dtype=torch.bool)[None, None], causal_bool(S, S)
    both = torch.cat([diag, causal])
    got = model(input_ids=ids, causal_mask_mapping={"full_attention": both}).logits
    row0 = model(input_ids=ids[:1], causal_mask_mapping={"full_attention": diag}).logits
    row1 = model(input_ids=ids[1:]).logits
    assert rel(row0[0], got[0]) < TOL and rel(row1[0], got[1]) < TOL

    bias = additive(causal) + torch.randn(1, 1, S, S, generator=torch.Generator().manual_seed(1))
    sdpa = model(input_ids=ids, causal_mask_mapping={"full_attention": bias}).logits
    assert rel(model(input_ids=ids).logits, sdpa) > 1e-3  # the bias is applied, not rounded to a bool mask
    model.backend.attn = "eager"  # shared by every layer; this model is the test's own
    assert rel(got, model(input_ids=ids, causal_mask_mapping={"full_attention": both}).logits) < TOL
    assert rel(sdpa, model(input_ids=ids, causal_mask_mapping={"full_attention": bias}).logits) < TOL


@torch.no_grad()
def test_4d_mask_with_2d_padding(model, ids):
    """Right padding described twice, as transformers-style callers do: the 2D mask (for Mamba and the
    loss) and a 4D mask with the padded keys blocked. Real positions match the 2D mask alone."""
    am = torch.ones(2, S, dtype=torch.long)
    am[1, -4:] = 0
    mask4d = causal_bool(S, S) & am.bool()[:, None, None, :]
    want = model(input_ids=ids, attention_mask=am).logits
    got = model(input_ids=ids, attention_mask=am, causal_mask_mapping={"full_attention": mask4d}).logits
    assert rel(want[0], got[0]) < TOL and rel(want[1, :-4], got[1, :-4]) < TOL


@pytest.mark.parametrize("attn", ["auto", "eager"])
@torch.no_grad()
def test_fully_blocked_rows_stay_finite(attn, ids):
    """A query row with no visible key (left padding in a 4D mask) sees itself rather than producing
    NaN (the eager softmax over nothing does), which the Mamba layers after it would carry into every
    later token."""
    model = make_model()
    model.backend.attn = attn
    mask = causal_bool(S, S).clone().expand(2, 1, S, S).clone()
    mask[1, :, :, :3] = False  # row 1: first three keys are padding; queries 0..2 see nothing
    am = torch.ones(2, S, dtype=torch.long)
    am[1, :3] = 0
    out = model(input_ids=ids, attention_mask=am, causal_mask_mapping={"full_attention": mask}).logits
    assert torch.isfinite(out).all()
    want = model(input_ids=ids, attention_mask=am).logits
    assert rel(want[1, 3:], out[1, 3:]) < TOL


@torch.no_grad()
def test_4d_mask_with_cache(model, ids):
    """Continuing from a cache, kv covers the cached tokens too: ``[B, 1, q, past + q]``."""
    outs = []
    for mask in (None, NemotronHForCausalLM._make_causal_mask(4, S, 2, torch.float32, torch.device("cpu"))):
        cache = NemotronHybridCache(model.config, 2, S + 1, dtype=torch.float32, device="cpu")
        model(input_ids=ids[:, :8], past_key_values=cache, use_cache=True)
        mapping = None if mask is None else {"full_attention": mask}
        outs.append(model(input_ids=ids[:, 8:], past_key_values=cache, use_cache=True,
                          causal_mask_mapping=mapping).logits)
    assert rel(outs[0], outs[1]) < TOL


@torch.no_grad()
def test_other_keys_are_ignored_and_backbone_takes_the_mapping(model, ids):
    want = model(input_ids=ids).logits
    assert rel(want, model(input_ids=ids, causal_mask_mapping={"sliding_attention": torch.zeros(1)}).logits) < TOL
    diag = torch.eye(S, dtype=torch.bool)[None, None]
    full = model(input_ids=ids, causal_mask_mapping={"full_attention": diag}).logits
    hidden = model.model(input_ids=ids, causal_mask_mapping={"full_attention": diag})
    assert rel(full, model.lm_head(hidden)) < TOL


@pytest.mark.parametrize("mapping, match", [
    ({"full_attention": torch.ones(S, S, dtype=torch.bool)}, "4-D"),
    ({"full_attention": torch.ones(3, 1, S, S, dtype=torch.bool)}, "causal_mask_mapping"),
    ({"full_attention": torch.ones(1, 3, S, S, dtype=torch.bool)}, "causal_mask_mapping"),
    ({"full_attention": torch.ones(1, 1, S - 1, S, dtype=torch.bool)}, "causal_mask_mapping"),
    ({"full_attention": torch.ones(1, 1, S, S + 1, dtype=torch.bool)}, "causal_mask_mapping"),
    ({"full_attention": torch.ones(1, 1, S, S, dtype=torch.long)}, "bool or floating"),
    ([torch.ones(1, 1, S, S, dtype=torch.bool)], "dict"),
])
@torch.no_grad()
def test_bad_causal_mask_mapping(mapping, match, model, ids):
    with pytest.raises(InputError, match=match):
        model(input_ids=ids, causal_mask_mapping=mapping)


# ---- padding_mask polarity ---------------------------------------------------------------------------
@pytest.mark.parametrize("side", ["right", "left"])
@torch.no_grad()
def test_padding_mask_true_on_padding_equals_attention_mask(side, model, ids):
    am = torch.ones(2, S, dtype=torch.long)
    pad = slice(-5, None) if side == "right" else slice(0, 5)
    am[1, pad] = 0
    real = am.bool()
    want = model(input_ids=ids, attention_mask=am, labels=ids)
    got = model(input_ids=ids, padding_mask=~real, labels=ids)
    assert rel(want.logits[real], got.logits[real]) < TOL
    assert rel(want.loss, got.loss) < TOL
    # Without any mask the padded row's real positions (left padding) or loss (right) differ.
    none = model(input_ids=ids, labels=ids)
    assert rel(want.loss, none.loss) > 1e-4


@torch.no_grad()
def test_padding_mask_and_attention_mask_combine(model, ids):
    """Both given: a token is real only where both say so (neither silently overrides the other)."""
    am = torch.ones(2, S, dtype=torch.long)
    am[1, -3:] = 0
    pm = torch.zeros(2, S, dtype=torch.bool)
    pm[0, -2:] = True
    keep = am.bool() & ~pm
    want = model(input_ids=ids, attention_mask=keep.long()).logits
    got = model(input_ids=ids, attention_mask=am, padding_mask=pm).logits
    assert rel(want[keep], got[keep]) < TOL
    # An all-False padding_mask is "no padding".
    no_padding = torch.zeros(2, S, dtype=torch.bool)
    assert rel(model(input_ids=ids).logits, model(input_ids=ids, padding_mask=no_padding).logits) < TOL


@torch.no_grad()
def test_bad_padding_mask_shape(model, ids):
    with pytest.raises(InputError, match="padding"):
        model(input_ids=ids, padding_mask=torch.zeros(2, S + 3, dtype=torch.bool))
