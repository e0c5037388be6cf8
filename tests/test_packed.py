"""Packed (THD) batches: running documents packed into one row equals running each alone.

Models are the ``tiny`` / ``tiny-mtp`` presets (every block type, Mamba ``chunk_size`` 16) with
perturbed random weights, in fp32. Documents are 21, 16 and 37 tokens: two longer than a chunk, one
exactly a chunk, and the packed boundaries (21, 37) fall inside chunks.

Loss normalisation (so that packed and separate sides are comparable exactly):
* main loss: both sides pass ``num_items_in_batch`` = the number of scored targets of the whole
  packed batch, so the loss is a sum over tokens divided by the same constant on both sides, and the
  packed loss equals the sum of the per-document losses.
* MTP loss: each depth is a mean over *its own* valid targets of the batch. The separate side is
  therefore assembled by hand from each document's ``mtp_per_depth_h``: per depth, the summed
  cross-entropy over all documents divided by the total count over all documents, which is exactly
  what the packed model computes (:func:`expected_loss_from_separate`).
"""
from __future__ import annotations

import inspect

import pytest
import torch
import torch.nn.functional as F

import tiny
from nemotron_core.batch import make_batch_meta
from nemotron_core.create import build_config, random_model
from nemotron_core.errors import InputError
from nemotron_core.modeling import mamba2 as mamba2_mod
from nemotron_core.packing import PackedBatch, pack_sequences, unpack

LENGTHS = (21, 16, 37)
VOCAB = 1024  # the tiny presets' vocabulary
TOL = 1e-5


def make_model(preset: str = "tiny", overrides: list[str] | None = None, seed: int = 0):
    model = random_model(build_config(preset, overrides), torch.float32, seed)
    return tiny.perturb_(model, seed + 1000).train()  # train mode: the MTP head runs


def make_docs(lengths=LENGTHS, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, VOCAB, (n,), generator=g) for n in lengths]


def rel(ref: torch.Tensor, got: torch.Tensor, scale: torch.Tensor | float | None = None) -> float:
    scale = ref.abs().max() if scale is None else scale
    return float((ref.double() - got.double()).abs().max() / max(float(scale), 1e-30))


@pytest.fixture(scope="module")
def hybrid():
    return make_model("tiny")


@pytest.fixture(scope="module")
def hybrid_mtp():
    return make_model("tiny-mtp")


@pytest.fixture(scope="module")
def docs():
    return make_docs()


def separate_outputs(model, docs):
    return [model(input_ids=d[None]) for d in docs]


def check_logits_match(model, docs, batch: PackedBatch) -> None:
    packed = model(**batch.as_kwargs(with_labels=False))
    alone = separate_outputs(model, docs)
    scale = max(o.logits.abs().max() for o in alone)
    for ref, got in zip(alone, unpack(packed.logits, batch)):
        assert rel(ref.logits[0], got, scale) < TOL
    if model.mtp is not None:
        # Depth k at position t reads tokens up to t + k: compare where that stays inside the document.
        for k in range(1, model.mtp.depths + 1):
            h_scale = max(o.mtp_per_depth_h[k - 1].abs().max() for o in alone)
            for d, ref, got in zip(docs, alone, unpack(packed.mtp_per_depth_h[k - 1], batch)):
                n = d.numel() - k
                assert rel(ref.mtp_per_depth_h[k - 1][0, :n], got[:n], h_scale) < TOL


# ---- logits -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("which", ["hybrid", "hybrid_mtp"])
def test_packed_logits_match_separate(which, docs, request):
    model = request.getfixturevalue(which)
    with torch.no_grad():
        check_logits_match(model, docs, pack_sequences(docs))


def test_attention_only_packed_matches_separate(docs):
    model = make_model("tiny", ["hybrid_override_pattern=**"])
    batch = pack_sequences(docs)
    with torch.no_grad():
        check_logits_match(model, docs, batch)
        # Without the document mask the later documents attend to the earlier ones.
        leaky = model(input_ids=batch.input_ids).logits
        first, *rest = unpack(leaky, batch)
        alone = separate_outputs(model, docs)
        scale = max(o.logits.abs().max() for o in alone)
        assert rel(alone[0].logits[0], first, scale) < TOL  # the first document has nothing before it
        assert all(rel(o.logits[0], r, scale) > 1e-3 for o, r in zip(alone[1:], rest))


def _drop_seq_idx(fn):
    sig = inspect.signature(fn)

    def wrapper(*args, **kwargs):
        bound = sig.bind(*args, **kwargs)
        bound.arguments["seq_idx"] = None
        return fn(*bound.args, **bound.kwargs)

    return wrapper


@pytest.mark.parametrize("dropped", ["conv", "scan", "both"])
@torch.no_grad()
def test_dropping_seq_idx_breaks_packing(dropped, hybrid, docs, monkeypatch):
    """The Mamba state reset is what makes packing exact: without seq_idx in the causal conv or the
    SSD scan, state leaks from one document into the next and the logits change. The names are
    patched where Mamba2 looks them up (``nemotron_core.modeling.mamba2`` imports them by name)."""
    batch = pack_sequences(docs)
    alone = separate_outputs(hybrid, docs)
    if dropped in ("conv", "both"):
        monkeypatch.setattr(mamba2_mod, "causal_conv1d", _drop_seq_idx(mamba2_mod.causal_conv1d))
    if dropped in ("scan", "both"):
        monkeypatch.setattr(mamba2_mod, "ssd_scan", _drop_seq_idx(mamba2_mod.ssd_scan))
    packed = unpack(hybrid(**batch.as_kwargs(with_labels=False)).logits, batch)
    scale = max(o.logits.abs().max() for o in alone)
    assert rel(alone[0].logits[0], packed[0], scale) < TOL  # nothing to leak into the first document
    for ref, got in zip(alone[1:], packed[1:]):
        assert rel(ref.logits[0], got, scale) > 1e-3


# ---- the BSHD spellings of packing: _packed_seq_ids and seq_idx ---------------------------------------
@pytest.mark.parametrize("multiple", [None, 8])
@pytest.mark.parametrize("which", ["hybrid", "hybrid_mtp"])
def test_packed_seq_ids_match_thd(which, multiple, docs, request):
    """NeMo's BSHD description of a packed row, ``_packed_seq_ids`` ``[B, S]`` (document i + 1 on its
    tokens, 0 on padding), gives what the THD path gives for the same row: logits, MTP hidden states
    and the loss (padding between documents included)."""
    model = request.getfixturevalue(which)
    batch = pack_sequences(docs, pad_to_multiple_of=multiple)
    num_items = sum(d.numel() - 1 for d in docs)
    with torch.no_grad():
        thd = model(**batch.as_kwargs(), num_items_in_batch=num_items)
        bshd = model(input_ids=batch.input_ids, labels=batch.labels, _packed_seq_ids=batch.packed_seq_ids,
                     num_items_in_batch=num_items)
    scale = thd.logits.abs().max()
    for ref, got in zip(unpack(thd.logits, batch), unpack(bshd.logits, batch)):
        assert rel(ref, got, scale) < TOL
    for ref_h, got_h in zip(thd.mtp_per_depth_h or [], bshd.mtp_per_depth_h or []):
        for ref, got in zip(unpack(ref_h, batch), unpack(got_h, batch)):
            assert rel(ref, got, ref_h.abs().max()) < TOL
    assert rel(thd.loss, bshd.loss) < TOL


@torch.no_grad()
def test_packed_seq_ids_rows_with_padding(hybrid):
    """Two rows (B = 2), each its own packing, the second ending in padding (id 0): every document
    equals running it alone. Ids only need to change at a boundary: each contiguous run of one id is
    a document, so a reused id (5, 7, 5) is three documents."""
    a, b, c, d, e = make_docs((21, 16, 11, 19, 22), seed=1)
    row0, row1 = torch.cat([a, b, c]), torch.cat([d, e, torch.zeros(7, dtype=torch.long)])
    ids = torch.stack([torch.cat([torch.full((21,), 5), torch.full((16,), 7), torch.full((11,), 5)]),
                       torch.cat([torch.full((19,), 1), torch.full((22,), 2), torch.zeros(7, dtype=torch.long)])])
    out = hybrid(input_ids=torch.stack([row0, row1]), _packed_seq_ids=ids).logits
    alone = separate_outputs(hybrid, [a, b, c, d, e])
    scale = max(o.logits.abs().max() for o in alone)
    got = [out[0, :21], out[0, 21:37], out[0, 37:], out[1, :19], out[1, 19:41]]
    for ref, g in zip(alone, got):
        assert rel(ref.logits[0], g, scale) < TOL


@torch.no_grad()
def test_seq_idx_without_thd_resets_at_boundaries(hybrid, docs):
    """``seq_idx`` ``[B, S]`` given without ``qkv_format="thd"``: a one-row batch equals the THD path,
    and in a two-row batch every document equals running it alone."""
    batch = pack_sequences(docs)
    seq_idx = torch.repeat_interleave(torch.arange(len(docs)), torch.tensor(LENGTHS))[None]
    thd = hybrid(**batch.as_kwargs(with_labels=False)).logits
    assert rel(thd, hybrid(input_ids=batch.input_ids, seq_idx=seq_idx).logits) < TOL

    a, b, c, d = make_docs((21, 27, 32, 16), seed=2)
    rows = torch.stack([torch.cat([a, b]), torch.cat([c, d])])
    seq_idx = torch.tensor([[0] * 21 + [1] * 27, [0] * 32 + [1] * 16], dtype=torch.int32)
    out = hybrid(input_ids=rows, seq_idx=seq_idx).logits
    alone = separate_outputs(hybrid, [a, b, c, d])
    scale = max(o.logits.abs().max() for o in alone)
    for ref, got in zip(alone, [out[0, :21], out[0, 21:], out[1, :32], out[1, 32:]]):
        assert rel(ref.logits[0], got, scale) < TOL


@pytest.mark.parametrize("name, value, match", [
    ("_packed_seq_ids", torch.ones(1, 9, dtype=torch.long), "must be \\[batch, seq\\]"),
    ("_packed_seq_ids", torch.ones(8, dtype=torch.long), "must be \\[batch, seq\\]"),
    ("_packed_seq_ids", torch.ones(1, 8), "integer"),
    ("_packed_seq_ids", torch.tensor([[1, 1, -1, 2, 2, 2, 2, 2]]), ">= 0"),
    ("seq_idx", torch.ones(2, 8, dtype=torch.int32), "must be \\[batch, seq\\]"),
])
@torch.no_grad()
def test_bad_packed_seq_ids(name, value, match, hybrid):
    with pytest.raises(InputError, match=match):
        hybrid(input_ids=torch.randint(0, VOCAB, (1, 8)), **{name: value})


@torch.no_grad()
def test_packed_seq_ids_cannot_continue_from_a_cache(hybrid):
    from nemotron_core.cache import NemotronHybridCache

    cache = NemotronHybridCache(hybrid.config, 1, 16, dtype=torch.float32, device="cpu")
    hybrid(input_ids=torch.randint(0, VOCAB, (1, 4)), past_key_values=cache)
    with pytest.raises(InputError, match="cache"):
        hybrid(input_ids=torch.randint(0, VOCAB, (1, 4)), past_key_values=cache,
               _packed_seq_ids=torch.tensor([[1, 1, 2, 2]]))


# ---- loss and gradients -------------------------------------------------------------------------
def expected_loss_from_separate(model, docs, num_items: int) -> torch.Tensor:
    """The packed batch's loss, assembled from per-document forwards (see the module docstring)."""
    main = 0.0
    outs = separate_outputs(model, docs)
    for d, o in zip(docs, outs):
        main = main + F.cross_entropy(o.logits[0, :-1], d[1:], reduction="sum")
    loss = main / num_items
    if model.mtp is not None:
        depth_losses = []
        for k in range(1, model.mtp.depths + 1):
            total, count = 0.0, 0
            for d, o in zip(docs, outs):
                n = d.numel() - k - 1  # positions whose target (k + 1 ahead) exists in the document
                if n > 0:
                    logits = model.lm_head(o.mtp_per_depth_h[k - 1][0, :n])
                    total = total + F.cross_entropy(logits, d[k + 1:], reduction="sum")
                    count += n
            depth_losses.append(total / count)
        loss = loss + model.mtp_loss_scaling_factor / model.mtp.depths * sum(depth_losses)
    return loss


def grads(model) -> dict[str, torch.Tensor]:
    out = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out


def assert_grads_match(ref: dict[str, torch.Tensor], got: dict[str, torch.Tensor]) -> None:
    """Each parameter's gradient within TOL relative to its own largest entry (all-zero ones, e.g. of an
    expert no token chose, must stay exactly zero)."""
    assert ref.keys() == got.keys()
    bad = {}
    for n in ref:
        scale = ref[n].abs().max()
        err = rel(ref[n], got[n], scale) if scale > 0 else float(got[n].abs().max())
        if err >= TOL:
            bad[n] = err
    assert not bad, bad


@pytest.mark.parametrize("which", ["hybrid", "hybrid_mtp"])
def test_packed_loss_and_gradients_match_separate(which, docs, request):
    model = request.getfixturevalue(which)
    batch = pack_sequences(docs)
    num_items = sum(d.numel() - 1 for d in docs)
    model.zero_grad(set_to_none=True)
    packed = model(**batch.as_kwargs(), num_items_in_batch=num_items).loss
    packed.backward()
    g_packed = grads(model)

    if model.mtp is None:
        # The model's own loss on each document, normalised by the same batch-wide count.
        separate = sum(model(input_ids=d[None], labels=d[None], num_items_in_batch=num_items).loss for d in docs)
    else:
        separate = expected_loss_from_separate(model, docs, num_items)
    separate.backward()
    g_separate = grads(model)
    assert rel(separate.detach(), packed.detach()) < TOL
    assert_grads_match(g_separate, g_packed)


def test_padded_packing_matches_separate(hybrid_mtp, docs):
    """cu_seqlens_padded: every document padded to a multiple of 8, so padding sits *between*
    documents. Real positions match running alone; the loss ignores padding whatever it holds."""
    batch = pack_sequences(docs, pad_to_multiple_of=8)
    assert batch.cu_seqlens_padded is not None and batch.input_ids.shape[1] == 24 + 16 + 40
    num_items = sum(d.numel() - 1 for d in docs)
    with torch.no_grad():
        check_logits_match(hybrid_mtp, docs, batch)
        want = expected_loss_from_separate(hybrid_mtp, docs, num_items)
        losses = []
        for pad_id in (0, 5, VOCAB - 1):
            other = pack_sequences(docs, pad_to_multiple_of=8, pad_id=pad_id)
            losses.append(hybrid_mtp(**other.as_kwargs(), num_items_in_batch=num_items).loss)
    for loss in losses:
        assert rel(want, loss) < TOL
    assert losses[0] == losses[1] == losses[2]  # the pad token's value is never read by a real position


# ---- position ids, packing helpers ----------------------------------------------------------------
@pytest.mark.parametrize("multiple", [None, 8])
def test_position_ids_restart_per_sequence(multiple, docs):
    batch = pack_sequences(docs, pad_to_multiple_of=multiple)
    for pos, n in zip(unpack(batch.position_ids, batch), LENGTHS):
        assert pos.tolist() == list(range(n))
    # The model derives the same ids from cu_seqlens when none are given.
    kw = batch.as_kwargs(with_labels=False)
    meta = make_batch_meta(1, batch.input_ids.shape[1], torch.device("cpu"), qkv_format="thd",
                           cu_seqlens=kw["cu_seqlens"], cu_seqlens_padded=kw.get("cu_seqlens_padded"))
    assert torch.equal(meta.position_ids, batch.position_ids)
    assert int(batch.position_ids.max()) == batch.max_seqlen - 1


def test_pack_sequences_layout():
    batch = pack_sequences([[5, 6, 7], torch.tensor([8, 9]), [10]])
    assert batch.input_ids.tolist() == [[5, 6, 7, 8, 9, 10]]
    assert batch.cu_seqlens.dtype == torch.int32 and batch.cu_seqlens.tolist() == [0, 3, 5, 6]
    assert batch.cu_seqlens_padded is None and batch.max_seqlen == 3
    assert batch.position_ids.tolist() == [[0, 1, 2, 0, 1, 0]]
    assert batch.labels.tolist() == batch.input_ids.tolist()
    kw = batch.as_kwargs()
    assert kw["qkv_format"] == "thd" and kw["labels"] is batch.labels and "cu_seqlens_padded" not in kw

    padded = pack_sequences([[5, 6, 7], [8, 9], [10]], pad_to_multiple_of=2, pad_id=1)
    assert padded.input_ids.tolist() == [[5, 6, 7, 1, 8, 9, 10, 1]]
    assert padded.cu_seqlens.tolist() == [0, 3, 5, 6]  # true lengths
    assert padded.cu_seqlens_padded.dtype == torch.int32 and padded.cu_seqlens_padded.tolist() == [0, 4, 6, 8]
    assert padded.labels.tolist() == [[5, 6, 7, -100, 8, 9, 10, -100]]
    assert padded.position_ids.tolist() == [[0, 1, 2, 3, 0, 1, 0, 1]]
    assert padded.padding_mask.tolist() == [[True, True, True, False, True, True, True, False]]
    assert padded.packed_seq_ids.tolist() == [[1, 1, 1, 0, 2, 2, 3, 0]]  # NeMo's: 0 = padding
    assert padded.as_kwargs()["cu_seqlens_padded"] is padded.cu_seqlens_padded
    # A multiple every length already meets needs no padded layout.
    assert pack_sequences([[1, 2], [3, 4]], pad_to_multiple_of=2).cu_seqlens_padded is None

    values = torch.arange(8.0)
    assert [t.tolist() for t in unpack(values, padded)] == [[0, 1, 2], [4, 5], [6]]
    feats = torch.arange(16.0).view(1, 8, 2)
    assert [t.shape for t in unpack(feats, padded)] == [(3, 2), (2, 2), (1, 2)]
    assert unpack(feats, padded)[1].tolist() == [[8, 9], [10, 11]]


@pytest.mark.parametrize("seqs, kwargs, match", [
    ([], {}, "at least one"),
    ([[1, 2], []], {}, "sequence 1 is empty"),
    ([[[1, 2]]], {}, "1-D"),
    ([torch.tensor([1.0, 2.0])], {}, "integer"),
    ([[1, 2]], {"pad_to_multiple_of": 0}, "positive"),
    ([["a", "b"]], {}, "list of token ids"),
])
def test_pack_sequences_bad_input(seqs, kwargs, match):
    with pytest.raises(InputError, match=match):
        pack_sequences(seqs, **kwargs)


def test_unpack_bad_shape():
    batch = pack_sequences([[1, 2], [3]])
    with pytest.raises(InputError, match="unpack expects"):
        unpack(torch.zeros(1, 4, 2), batch)


# ---- bad input to the model --------------------------------------------------------------------------
@pytest.mark.parametrize("cu, match", [
    ([0, 5, 3, 8], "strictly increasing"),
    ([0, 4, 4, 8], "strictly increasing"),
    ([1, 4, 8], "start at 0"),
    ([0, 4, 7], "end at the number of packed tokens"),
    ([0, 4, 9], "end at the number of packed tokens"),
    ([[0, 4, 8]], "1-D"),
])
@torch.no_grad()
def test_bad_cu_seqlens(cu, match, hybrid):
    ids = torch.randint(0, VOCAB, (1, 8))
    with pytest.raises(InputError, match=match):
        hybrid(input_ids=ids, qkv_format="thd", cu_seqlens=torch.tensor(cu, dtype=torch.int32))


@pytest.mark.parametrize("cu, padded, match", [
    ([0, 5, 6], [0, 4, 8], "fit in the padded lengths"),   # first document longer than its slot
    ([0, 3], [0, 4, 8], "must both be"),                    # different number of documents
    ([1, 3, 5], [0, 4, 8], "start at 0"),
    ([0, 3, 6], [0, 4, 7], "end at the number of packed tokens"),
])
@torch.no_grad()
def test_bad_cu_seqlens_padded(cu, padded, match, hybrid):
    ids = torch.randint(0, VOCAB, (1, 8))
    with pytest.raises(InputError, match=match):
        hybrid(input_ids=ids, qkv_format="thd", cu_seqlens=torch.tensor(cu, dtype=torch.int32),
               cu_seqlens_padded=torch.tensor(padded, dtype=torch.int32))


@pytest.mark.parametrize("bad", [VOCAB, -1])
@pytest.mark.parametrize("packed", [False, True])
@torch.no_grad()
def test_token_ids_out_of_vocabulary(bad, packed, hybrid):
    batch = pack_sequences([[1, 2, 3], [4, bad]])
    kwargs = batch.as_kwargs(with_labels=False) if packed else {"input_ids": batch.input_ids}
    with pytest.raises(InputError, match="outside the vocabulary"):
        hybrid(**kwargs)


@torch.no_grad()
def test_thd_needs_batch_size_one(hybrid):
    ids = torch.randint(0, VOCAB, (2, 8))
    with pytest.raises(InputError, match="batch size 2"):
        hybrid(input_ids=ids, qkv_format="thd", cu_seqlens=torch.tensor([0, 3, 8], dtype=torch.int32))


@pytest.mark.parametrize("shape", [(1, 7), (2, 8)])
@torch.no_grad()
def test_labels_shape_mismatch_bshd(shape, hybrid):
    with pytest.raises(InputError, match="labels shape"):
        hybrid(input_ids=torch.randint(0, VOCAB, (1, 8)), labels=torch.zeros(shape, dtype=torch.long))


@pytest.mark.parametrize("shape", [
    (1, 9),
    (9,),
    (2, 8),
])
@torch.no_grad()
def test_labels_shape_mismatch_thd(shape, hybrid):
    batch = pack_sequences([[1, 2, 3], [4, 5, 6, 7, 8]])
    with pytest.raises(InputError, match="labels shape"):
        hybrid(**batch.as_kwargs(with_labels=False), labels=torch.zeros(shape, dtype=torch.long))
