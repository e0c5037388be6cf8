"""Activation checkpointing applied from outside the model (as torchtitan and FSDP2 recipes do).

Every backbone block (``model.model.layers``) and every MTP sublayer (``model.mtp.layers``) is wrapped
in torch's non-reentrant checkpoint wrapper: the block's inner activations are dropped after the
forward and recomputed during the backward. The wrapper forwards attribute access (``layer.first``)
and keyword arguments (``layer(h, meta, embeds=...)``) to the block, and its state-dict hooks strip
``_checkpoint_wrapped_module.`` so state-dict keys do not change while wrapped.

Apply it before FSDP2's ``fully_shard`` (the torchtitan order). Both directions are idempotent. ``NemotronHForCausalLM.gradient_checkpointing_enable/disable`` and
``is_gradient_checkpointing`` delegate here.
"""
from __future__ import annotations

from collections.abc import Iterator

from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
    CheckpointImpl,
    CheckpointWrapper,
    checkpoint_wrapper,
)


def _layer_dicts(model: nn.Module) -> Iterator[nn.ModuleDict]:
    """The ModuleDicts whose entries get wrapped: backbone blocks, then MTP sublayers (when present).

    Accepts the causal-LM model (``model.model.layers``) or a bare backbone (``model.layers``)."""
    backbone = getattr(model, "model", None)
    if isinstance(backbone, nn.Module) and isinstance(getattr(backbone, "layers", None), nn.ModuleDict):
        yield backbone.layers
    elif isinstance(getattr(model, "layers", None), nn.ModuleDict):
        yield model.layers
    mtp = getattr(model, "mtp", None)
    if isinstance(mtp, nn.Module) and isinstance(getattr(mtp, "layers", None), nn.ModuleDict):
        yield mtp.layers


def apply_activation_checkpointing(model: nn.Module) -> nn.Module:
    """Wrap every backbone block and MTP sublayer with a non-reentrant checkpoint wrapper.

    Blocks already wrapped are left alone, so a second call changes nothing. Returns ``model``."""
    for layers in _layer_dicts(model):
        for key, layer in list(layers.items()):
            if not isinstance(layer, CheckpointWrapper):
                layers[key] = checkpoint_wrapper(layer, checkpoint_impl=CheckpointImpl.NO_REENTRANT)
    return model


def remove_activation_checkpointing(model: nn.Module) -> nn.Module:
    """Replace every checkpoint-wrapped block by the block itself (inverse of
    :func:`apply_activation_checkpointing`); a no-op on an unwrapped model. Returns ``model``."""
    for layers in _layer_dicts(model):
        for key, layer in list(layers.items()):
            while isinstance(layer, CheckpointWrapper):
                layer = layer._checkpoint_wrapped_module
            layers[key] = layer
    return model


def is_checkpointed(model: nn.Module) -> bool:
    """True when the model has blocks and every one of them is checkpoint-wrapped."""
    layers = [layer for d in _layer_dicts(model) for layer in d.values()]
    return bool(layers) and all(isinstance(layer, CheckpointWrapper) for layer in layers)
