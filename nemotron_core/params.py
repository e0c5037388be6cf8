"""Parameter counts (total and active per token), computed on the meta device: no memory is used."""
from __future__ import annotations

import torch

from .config import NemotronHConfig


def build_meta_model(config: NemotronHConfig):
    from .modeling.model import NemotronHForCausalLM

    with torch.device("meta"):
        return NemotronHForCausalLM(config)


def count_parameters(config: NemotronHConfig, include_mtp: bool = True) -> dict[str, int]:
    """``total``: every parameter. ``active``: what one token's forward touches: the top-k routed
    experts of each MoE layer and one row of the embedding table (a lookup, not a matmul), which is
    how the published "A3B" figures are counted (Nano-30B-A3B: 31.6B total, about 3.2B active).

    Buffers (the router's correction bias) are not parameters and are not counted."""
    model = build_meta_model(config)
    total = routed = 0
    for name, p in model.named_parameters():
        if not include_mtp and name.startswith("mtp."):
            continue
        total += p.numel()
        if ".mixer.experts." in name:
            routed += p.numel()
    embed = config.vocab_size * config.hidden_size
    active = total - routed - embed + config.hidden_size
    if config.n_routed_experts:
        active += routed * config.num_experts_per_tok // config.n_routed_experts
    return {"total": total, "active": active, "routed_experts": routed}
