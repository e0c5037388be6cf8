"""Activation checkpointing applied from outside the model (nemotron_core.activation_checkpointing)."""
from __future__ import annotations

import pytest
import torch
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointImpl, CheckpointWrapper

import tiny
from nemotron_core.activation_checkpointing import (
    apply_activation_checkpointing,
    is_checkpointed,
    remove_activation_checkpointing,
)
from nemotron_core.create import build_config, random_model
from nemotron_core.modeling.model import Block, NemotronHForCausalLM
from nemotron_core.packing import pack_sequences

VOCAB = 1024


def make_model(preset: str = "tiny-mtp", seed: int = 0) -> NemotronHForCausalLM:
    model = random_model(build_config(preset), torch.float32, seed)
    return tiny.perturb_(model, seed + 1000).train()


def ids(b: int = 2, s: int = 21, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (b, s), generator=torch.Generator().manual_seed(seed))


def structure(model: torch.nn.Module) -> list[tuple[str, type]]:
    return [(name, type(m)) for name, m in model.named_modules()]


def loss_and_grads(model: NemotronHForCausalLM, **inputs) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    loss = model(**inputs).loss
    loss.backward()
    grads = {k.replace("._checkpoint_wrapped_module", ""): p.grad.clone()
             for k, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads


def wrapped_layers(model: NemotronHForCausalLM) -> list[torch.nn.Module]:
    layers = list(model.model.layers.values())
    if model.mtp is not None:
        layers += list(model.mtp.layers.values())
    return layers


# ---- numerics ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("packed", [False, True])
def test_on_off_same_loss_and_gradients(packed):
    """fp32, MTP on (train mode): checkpointing recomputes the same values, bit for bit."""
    model = make_model("tiny-mtp")
    if packed:
        inputs = pack_sequences([ids(1, n, seed=n)[0] for n in (21, 16, 37)]).as_kwargs()
    else:
        x = ids()
        inputs = {"input_ids": x, "labels": x}
    loss_off, grads_off = loss_and_grads(model, **inputs)
    model.gradient_checkpointing_enable()
    assert model.is_gradient_checkpointing
    loss_on, grads_on = loss_and_grads(model, **inputs)
    assert grads_on.keys() == grads_off.keys() and len(grads_off) == len(list(model.parameters()))
    assert torch.equal(loss_on, loss_off)
    unequal = [name for name, g in grads_off.items() if not torch.equal(grads_on[name], g)]
    assert not unequal, unequal


@torch.no_grad()
def test_wrapped_model_runs_without_grad():
    """Inference (eval, no_grad: generation) through the wrapped blocks gives the same logits."""
    model = make_model("tiny-mtp").eval()
    x = ids()
    want = model(input_ids=x, return_mtp=True)
    apply_activation_checkpointing(model)
    got = model(input_ids=x, return_mtp=True)
    assert torch.equal(want.logits, got.logits)
    assert all(torch.equal(a, b) for a, b in zip(want.mtp_per_depth_h, got.mtp_per_depth_h))


def test_blocks_are_recomputed_in_backward():
    """With checkpointing a block's mixer runs twice per training step (forward, then again in the
    backward); without it, once. Checked on a backbone block and an MTP sublayer. Counted with a
    forward *pre*-hook: torch's non-reentrant recompute stops early once it has rebuilt every saved
    tensor, which can be before the mixer returns (so a post-forward hook may not fire)."""
    model = make_model("tiny-mtp")
    backbone_mixer = model.model.layers["0"].mixer
    mtp_mixer = model.mtp.layers["1"].mixer
    calls = {"backbone": 0, "mtp": 0}
    backbone_mixer.register_forward_pre_hook(lambda *_: calls.__setitem__("backbone", calls["backbone"] + 1))
    mtp_mixer.register_forward_pre_hook(lambda *_: calls.__setitem__("mtp", calls["mtp"] + 1))
    x = ids(1, 16)

    def step() -> dict[str, int]:
        calls.update(backbone=0, mtp=0)
        loss = model(input_ids=x, labels=x).loss
        after_forward = dict(calls)
        loss.backward()
        return {"forward": after_forward, "step": dict(calls)}

    assert step() == {"forward": {"backbone": 1, "mtp": 1}, "step": {"backbone": 1, "mtp": 1}}
    model.gradient_checkpointing_enable()
    assert step() == {"forward": {"backbone": 1, "mtp": 1}, "step": {"backbone": 2, "mtp": 2}}
    model.gradient_checkpointing_disable()
    assert step() == {"forward": {"backbone": 1, "mtp": 1}, "step": {"backbone": 1, "mtp": 1}}


# ---- structure ------------------------------------------------------------------------------------
def test_enable_disable_idempotent():
    model = make_model("tiny-mtp")
    original = structure(model)
    layers_before = wrapped_layers(model)
    assert not model.is_gradient_checkpointing and not is_checkpointed(model)

    model.gradient_checkpointing_enable()
    once = structure(model)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    apply_activation_checkpointing(model)
    assert structure(model) == once != original
    assert model.is_gradient_checkpointing and is_checkpointed(model)
    wrapped = wrapped_layers(model)
    assert len(wrapped) == len(model.config.layers_block_type) + 2 * len(model.config.mtp_pattern)
    for w, inner in zip(wrapped, layers_before):
        assert isinstance(w, CheckpointWrapper) and w.checkpoint_impl == CheckpointImpl.NO_REENTRANT
        assert w._checkpoint_wrapped_module is inner  # wrapped exactly once, around the original block
    # Attribute access passes through the wrapper (the MTP head reads these).
    first, last = model.mtp.layers["0"], model.mtp.layers["1"]
    assert first.first and not first.last and last.last and not last.first
    assert first.eh_proj is layers_before[len(model.model.layers)].eh_proj
    assert isinstance(first._checkpoint_wrapped_module, Block)

    model.gradient_checkpointing_disable()
    assert structure(model) == original
    model.gradient_checkpointing_disable()
    remove_activation_checkpointing(model)
    assert structure(model) == original
    assert all(a is b for a, b in zip(wrapped_layers(model), layers_before))
    assert not model.is_gradient_checkpointing


def test_model_without_mtp():
    model = make_model("tiny")
    apply_activation_checkpointing(model)
    assert model.mtp is None and is_checkpointed(model)
    assert all(isinstance(layer, CheckpointWrapper) for layer in model.model.layers.values())
    remove_activation_checkpointing(model)
    assert not any(isinstance(m, CheckpointWrapper) for m in model.modules())


# ---- state dict and checkpoints ---------------------------------------------------------------------
def test_state_dict_keys_unchanged_while_wrapped():
    model = make_model("tiny-mtp")
    before = model.state_dict()
    model.gradient_checkpointing_enable()
    during = model.state_dict()
    assert list(during) == list(before)
    assert all(torch.equal(during[k], before[k]) for k in before)
    assert not any("_checkpoint_wrapped_module" in k for k in during)
    # An unwrapped state dict loads strictly into the wrapped model.
    other = make_model("tiny-mtp", seed=1)
    other.gradient_checkpointing_enable()
    other.load_state_dict(before, strict=True)
    assert all(torch.equal(other.state_dict()[k], before[k]) for k in before)
    model.gradient_checkpointing_disable()
    assert list(model.state_dict()) == list(before)


def test_save_pretrained_while_wrapped(tmp_path):
    model = make_model("tiny-mtp")
    model.save_pretrained(tmp_path / "plain")
    model.gradient_checkpointing_enable()
    model.save_pretrained(tmp_path / "wrapped")
    plain, wrapped = tiny.safetensors_layout(tmp_path / "plain"), tiny.safetensors_layout(tmp_path / "wrapped")
    assert wrapped == plain
    assert any(k.startswith("mtp.layers.") for k in wrapped)
    assert not any("_checkpoint_wrapped_module" in k for k in wrapped)
    loaded = NemotronHForCausalLM.from_pretrained(tmp_path / "wrapped")
    model.gradient_checkpointing_disable()
    want = model.state_dict()
    got = loaded.state_dict()
    assert list(got) == list(want) and all(torch.equal(got[k], want[k]) for k in want)
