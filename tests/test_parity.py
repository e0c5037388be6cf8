"""Logit parity with transformers' NemotronHForCausalLM (the numerical reference), both directions.

A: transformers builds and saves, nemotron_core loads.  B: nemotron_core builds and saves,
transformers loads.  Tolerance everywhere: ``max|a - b| <= 1e-5 * max|a|`` in fp32, compared on
the non-padding positions only. Weights are randomly perturbed after init (``tiny.perturb_``) so
norms, D, biases and the router correction bias all take part.
"""
from __future__ import annotations

import json
import math

import pytest
import torch
import transformers

import tiny
from nemotron_core.modeling.model import NemotronHForCausalLM

TOL = 1e-5

CONFIGS = {
    "dense": dict(pattern="M*-M"),
    "moe": dict(pattern="M*E"),
    "latent_moe": dict(pattern="M*E", moe_latent_size=16),
    "group_limited": dict(pattern="ME*E", n_routed_experts=8, num_experts_per_tok=2, n_group=2, topk_group=1),
    "gqa_kv1": dict(pattern="*M*", num_key_value_heads=1),
    "gqa_kv2": dict(pattern="*M*", num_key_value_heads=2),
    "gqa_kv4": dict(pattern="*M*", num_key_value_heads=4),
    "all_blocks": dict(pattern="M*-EM"),
    # biases on (Mamba in/out_proj, MLPs and latent projections), conv bias off, other Mamba shapes,
    # unnormalised top-k weights. (Not attention_bias: transformers 5.x ignores it, FACTS.md and we do not.)
    "biases_shapes": dict(pattern="M*-E", use_bias=True, mlp_bias=True, use_conv_bias=False, conv_kernel=2,
                          n_groups=1, ssm_state_size=16, chunk_size=4, moe_latent_size=8, norm_topk_prob=False),
}
SEQ_LENS = (16, 21)  # a multiple of chunk_size (8) and not one
PAD = 5


def _inputs(seq: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, tiny.TINY["vocab_size"], (2, seq), generator=g)
    return ids, tiny.left_padded_mask(2, seq, PAD)


@torch.no_grad()
def _compare(ref_model, test_model, seed: int) -> None:
    """Reference logits (first model) against the other, unpadded and left-padded, both lengths."""
    for seq in SEQ_LENS:
        ids, mask = _inputs(seq, seed + seq)
        a = ref_model(input_ids=ids).logits
        b = test_model(input_ids=ids).logits
        assert a.shape == b.shape == (2, seq, tiny.TINY["vocab_size"])
        err = tiny.rel_err(a, b)
        assert err <= TOL, f"seq {seq}, no padding: relative error {err:.2e}"

        a = ref_model(input_ids=ids, attention_mask=mask).logits
        b = test_model(input_ids=ids, attention_mask=mask).logits
        keep = mask.bool()
        err = tiny.rel_err(a[keep], b[keep])
        assert err <= TOL, f"seq {seq}, left padding: relative error {err:.2e}"


def _hf_load(path) -> transformers.NemotronHForCausalLM:
    model, info = transformers.NemotronHForCausalLM.from_pretrained(
        str(path), dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"], info["missing_keys"]
    assert not info["unexpected_keys"], info["unexpected_keys"]
    assert not info.get("mismatched_keys"), info["mismatched_keys"]
    return model.eval()


@pytest.mark.parametrize("name", list(CONFIGS))
def test_transformers_to_ours(name, tmp_path):
    """Direction A: transformers saves, we load (fp32); identical logits and identical files back."""
    hf = tiny.hf_model(seed=1, **CONFIGS[name])
    hf.save_pretrained(tmp_path / "hf")
    ours = NemotronHForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32)
    assert ours.dtype == torch.float32
    _compare(hf, ours, seed=11)

    ours.save_pretrained(tmp_path / "ours")
    assert tiny.safetensors_layout(tmp_path / "ours") == tiny.safetensors_layout(tmp_path / "hf")


@pytest.mark.parametrize("name", list(CONFIGS))
def test_ours_to_transformers(name, tmp_path):
    """Direction B: we build and save, transformers loads; identical logits and identical files back."""
    ours = tiny.our_model(seed=2, **CONFIGS[name])
    ours.save_pretrained(tmp_path / "ours")
    hf = _hf_load(tmp_path / "ours")
    _compare(hf, ours, seed=12)

    hf.save_pretrained(tmp_path / "hf")
    assert tiny.safetensors_layout(tmp_path / "hf") == tiny.safetensors_layout(tmp_path / "ours")


def test_dt_clamp_matches_transformers_only_with_explicit_limit(tmp_path):
    """transformers 5.x clamps dt at ``time_step_min`` in its prefill path regardless of
    ``time_step_limit``; we clamp at the configured ``time_step_limit``. With the limit written as
    [time_step_min, inf] the two agree; left at (0, inf) they differ (documents the quirk)."""
    t_min = 1e-2
    hf = tiny.hf_model(seed=3, pattern="M*M", time_step_min=t_min)
    # Put softplus(dt + dt_bias) mostly below time_step_min so the clamp changes the scan materially.
    g = torch.Generator().manual_seed(23)
    with torch.no_grad():
        for pname, p in hf.named_parameters():
            if pname.endswith("dt_bias"):
                p.copy_(tiny.softplus_inv(2e-3) + 0.1 * torch.randn(p.shape, generator=g))
    hf.save_pretrained(tmp_path)
    ids, _ = _inputs(21, seed=13)
    with torch.no_grad():
        ref = hf(input_ids=ids).logits

    cfg_path = tmp_path / "config.json"
    data = json.loads(cfg_path.read_text())
    assert data["time_step_min"] == t_min

    data["time_step_limit"] = [0.0, {"__float__": "Infinity"}]
    cfg_path.write_text(json.dumps(data))
    unclamped = NemotronHForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    assert unclamped.config.dt_limit == (0.0, math.inf)
    with torch.no_grad():
        out = unclamped(input_ids=ids).logits
    assert tiny.rel_err(ref, out) > 1e-4, "the clamp did not bite: the test no longer shows the quirk"

    data["time_step_limit"] = [t_min, {"__float__": "Infinity"}]
    cfg_path.write_text(json.dumps(data))
    clamped = NemotronHForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    assert clamped.config.dt_limit == (t_min, math.inf)
    with torch.no_grad():
        out = clamped(input_ids=ids).logits
    err = tiny.rel_err(ref, out)
    assert err <= TOL, f"relative error {err:.2e}"
