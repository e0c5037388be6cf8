"""The multi-token-prediction (MTP) head, checked against direct computations.

FACTS.md: depth k (1..D) predicts the token k+1 ahead; its first sublayer computes
``eh_proj(cat[enorm(embed(tokens shifted k)), hnorm(h_{k-1})])`` (h_0 = backbone output after the
final norm), its last ends in ``final_layernorm``; the shared lm_head scores it;
``mtp_loss = scaling / D * sum_k CE_k`` (each CE_k a mean over its own valid targets), added to the
main loss; targets past the end or across a packed boundary are ignored.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import tiny
from nemotron_core.batch import make_batch_meta
from nemotron_core.create import build_config, random_model
from nemotron_core.modeling.model import NemotronHForCausalLM
from nemotron_core.packing import pack_sequences

VOCAB = 1024
IGNORE = -100


def perturbed(model: NemotronHForCausalLM, seed: int = 0) -> NemotronHForCausalLM:
    return tiny.perturb_(model, seed + 1000).train()


def make_model(seed: int = 0, **kwargs) -> NemotronHForCausalLM:
    """tiny-mtp (D = 2, MTP pattern ``*E``), perturbed, fp32, train mode; kwargs go to the constructor."""
    config = build_config("tiny-mtp")
    if not kwargs:
        return perturbed(random_model(config, torch.float32, seed), seed)
    model = NemotronHForCausalLM(config, **kwargs)
    torch.manual_seed(seed)
    model.initialize_weights(dtype=torch.float32)
    return perturbed(model, seed)


@pytest.fixture(scope="module")
def model():
    return make_model()


def ids(b: int = 2, s: int = 13, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (b, s), generator=torch.Generator().manual_seed(seed))


def targets_ahead(labels: torch.Tensor, n: int) -> torch.Tensor:
    """``out[:, t] = labels[:, t + n]``; IGNORE where ``t + n`` is past the end. Written as a loop on purpose."""
    b, s = labels.shape
    out = torch.full_like(labels, IGNORE)
    for t in range(s - n):
        out[:, t] = labels[:, t + n]
    return out


def ce(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1), ignore_index=IGNORE)


def close(a: torch.Tensor | float, b: torch.Tensor | float, tol: float = 1e-6) -> bool:
    return math.isclose(float(a), float(b), rel_tol=tol, abs_tol=1e-9)


# ---- the loss --------------------------------------------------------------------------------------
@torch.no_grad()
def test_mtp_loss_equals_direct_computation(model):
    x = ids()
    labels = x.clone()
    labels[0, :3] = IGNORE
    labels[1, 9] = IGNORE
    out = model(input_ids=x, labels=labels)
    D = model.config.num_nextn_predict_layers
    assert D == 2 and len(out.mtp_per_depth_h) == D
    assert all(h.shape == (2, 13, model.config.hidden_size) for h in out.mtp_per_depth_h)
    assert out.mtp_loss_scaling_factor == 0.1

    main = ce(out.logits, targets_ahead(labels, 1))
    depth_losses = [ce(model.lm_head(out.mtp_per_depth_h[k - 1]), targets_ahead(labels, k + 1))
                    for k in range(1, D + 1)]
    mtp_loss = 0.1 / D * sum(depth_losses)
    assert close(out.loss, main + mtp_loss)
    assert not close(out.loss, main, 1e-4)  # the MTP term is really there


@torch.no_grad()
def test_mtp_hidden_states_follow_the_formula(model):
    """Rebuild each depth from its sublayers by hand. Depth k at position t reads tokens up to t + k;
    positions t >= S - k read past the end and are never scored, so they are not compared."""
    x = ids(2, 11, seed=3)
    out = model(input_ids=x, output_hidden_states=True)
    meta = make_batch_meta(2, 11, torch.device("cpu"))
    embed = model.get_input_embeddings()
    n = len(model.config.mtp_pattern)
    h = out.hidden_states[-1]  # h_0: the backbone output after its final norm
    for k in range(1, model.config.num_nextn_predict_layers + 1):
        shifted = torch.cat([x[:, k:], torch.zeros_like(x[:, :k])], dim=1)  # tokens k ahead
        sub = [model.mtp.layers[str((k - 1) * n + j)] for j in range(n)]
        y = sub[0].eh_proj(torch.cat([sub[0].enorm(embed(shifted)), sub[0].hnorm(h)], dim=-1))
        for layer in sub:
            y = y + layer.mixer(layer.norm(y), meta)
        h = sub[-1].final_layernorm(y)
        got = out.mtp_per_depth_h[k - 1]
        torch.testing.assert_close(got[:, : 11 - k], h[:, : 11 - k], rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_mtp_runs_in_training_and_in_eval_only_when_asked():
    model = make_model()
    x = ids()
    train = model.train()(input_ids=x, labels=x)
    assert train.mtp_per_depth_h is not None and len(train.mtp_per_depth_h) == 2
    model.eval()
    plain = model(input_ids=x, labels=x)
    assert plain.mtp_per_depth_h is None
    assert close(plain.loss, ce(plain.logits, targets_ahead(x, 1)))  # main loss only
    asked = model(input_ids=x, labels=x, return_mtp=True)
    assert asked.mtp_per_depth_h is not None and len(asked.mtp_per_depth_h) == 2
    assert torch.equal(asked.loss, train.loss)  # no dropout: eval with MTP equals train
    assert all(torch.equal(a, b) for a, b in zip(asked.mtp_per_depth_h, train.mtp_per_depth_h))
    # As the reference: without per-depth states there is no MTP loss, so no factor either.
    assert plain.mtp_loss_scaling_factor is None
    assert asked.mtp_loss_scaling_factor == train.mtp_loss_scaling_factor == 0.1


@torch.no_grad()
def test_model_without_mtp_reports_none():
    model = random_model(build_config("tiny"), torch.float32, 0).train()
    out = model(input_ids=ids(1, 8), labels=ids(1, 8))
    assert model.mtp is None and out.mtp_per_depth_h is None and out.mtp_loss_scaling_factor is None


# ---- constructor arguments -----------------------------------------------------------------------
@torch.no_grad()
def test_constructor_overrides_num_nextn_predict_layers():
    config = build_config("tiny-mtp")
    deeper = NemotronHForCausalLM(config, num_nextn_predict_layers=3)
    assert deeper.config.num_nextn_predict_layers == 3 and deeper.mtp.depths == 3
    assert sorted(deeper.mtp.layers, key=int) == [str(i) for i in range(6)]
    assert config.num_nextn_predict_layers == 2  # the caller's config is not changed
    assert NemotronHForCausalLM(config, num_nextn_predict_layers=0).mtp is None
    # A config without MTP gains a head (transformers' default MTP pattern, *E).
    added = NemotronHForCausalLM(build_config("tiny"), num_nextn_predict_layers=1)
    assert added.mtp is not None and added.mtp.depths == 1
    deeper.initialize_weights(dtype=torch.float32)
    out = deeper.train()(input_ids=ids(1, 9))
    assert len(out.mtp_per_depth_h) == 3


@torch.no_grad()
def test_constructor_overrides_mtp_loss_scaling_factor():
    model = make_model(mtp_loss_scaling_factor=0.5)
    x = ids()
    out = model(input_ids=x, labels=x)
    assert out.mtp_loss_scaling_factor == 0.5
    depth_losses = [ce(model.lm_head(h), targets_ahead(x, k + 2)) for k, h in enumerate(out.mtp_per_depth_h)]
    assert close(out.loss, ce(out.logits, targets_ahead(x, 1)) + 0.5 / 2 * sum(depth_losses))


@torch.no_grad()
def test_repeated_layer_has_one_physical_depth():
    model = make_model(mtp_use_repeated_layer=True)
    assert model.config.mtp_use_repeated_layer and model.mtp.repeated
    n = len(model.config.mtp_pattern)
    assert sorted(model.mtp.layers, key=int) == [str(j) for j in range(n)]
    mtp_keys = {k.split(".")[2] for k in model.state_dict() if k.startswith("mtp.")}
    assert mtp_keys == {str(j) for j in range(n)}
    assert all(a is b for a, b in zip(model.mtp.depth_layers(0), model.mtp.depth_layers(1)))
    x = ids()
    out = model(input_ids=x, labels=x)
    assert len(out.mtp_per_depth_h) == 2
    assert not torch.equal(out.mtp_per_depth_h[0], out.mtp_per_depth_h[1])
    depth_losses = [ce(model.lm_head(h), targets_ahead(x, k + 2)) for k, h in enumerate(out.mtp_per_depth_h)]
    assert close(out.loss, ce(out.logits, targets_ahead(x, 1)) + 0.1 / 2 * sum(depth_losses))


def test_repeated_layer_does_not_change_the_callers_config():
    config = build_config("tiny-mtp")
    NemotronHForCausalLM(config, mtp_use_repeated_layer=True)
    assert not config.mtp_use_repeated_layer
    assert not NemotronHForCausalLM(config).mtp.repeated


# ---- checkpoints --------------------------------------------------------------------------------------
@pytest.mark.parametrize("repeated", [False, True])
@torch.no_grad()
def test_checkpoint_round_trip_of_mtp_is_exact(repeated, tmp_path):
    model = make_model(mtp_use_repeated_layer=True) if repeated else make_model()
    model.save_pretrained(tmp_path)
    layout = tiny.safetensors_layout(tmp_path)
    n = len(model.config.mtp_pattern)
    physical = 1 if repeated else 2
    assert {int(k.split(".")[2]) for k in layout if k.startswith("mtp.")} == set(range(physical * n))
    loaded = NemotronHForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    assert loaded.mtp.repeated == repeated and loaded.mtp.depths == 2
    want = {k: v for k, v in model.state_dict().items() if k.startswith("mtp.")}
    got = {k: v for k, v in loaded.state_dict().items() if k.startswith("mtp.")}
    assert want and list(got) == list(want)
    assert all(got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]) for k in want)
    x = ids()
    a, b = model.eval()(input_ids=x, return_mtp=True), loaded(input_ids=x, return_mtp=True)
    assert all(torch.equal(p, q) for p, q in zip(a.mtp_per_depth_h, b.mtp_per_depth_h))


# ---- packed batches -------------------------------------------------------------------------------------
@torch.no_grad()
def test_packed_mtp_ignores_targets_across_documents(model):
    """Two packed documents: the last k+1 positions of the first would, at depth k, take targets from
    the second. The model ignores them; counting them gives a different loss."""
    docs = [ids(1, 9, seed=5)[0], ids(1, 12, seed=6)[0]]
    batch = pack_sequences(docs)
    out = model(**batch.as_kwargs())
    labels = batch.labels
    boundary = docs[0].numel()

    def loss_with(cross: bool) -> torch.Tensor:
        main = targets_ahead(labels, 1)
        main[:, boundary - 1] = IGNORE  # the main loss never crosses (tested in test_packed.py)
        total = ce(out.logits, main)
        for k in range(1, model.mtp.depths + 1):
            targets = targets_ahead(labels, k + 1)
            if not cross:
                targets[:, boundary - k - 1 : boundary] = IGNORE
            total = total + model.mtp_loss_scaling_factor / model.mtp.depths * ce(
                model.lm_head(out.mtp_per_depth_h[k - 1]), targets)
        return total

    assert close(out.loss, loss_with(cross=False))
    assert not close(out.loss, loss_with(cross=True), 1e-4)
