"""The attention block's fused q/k/v weight (used for inference on CUDA): the three parameters become
views of one matrix without changing names, values or identity, and nothing can go stale."""
from __future__ import annotations

import torch

import tiny
from nemotron_core.modeling.attention import Attention
from nemotron_core.modeling.model import NemotronHForCausalLM


def _attention(model) -> Attention:
    return next(m for m in model.modules() if isinstance(m, Attention))


def _fuse(attn: Attention) -> torch.Tensor:
    return attn._fused_weight((attn.q_proj, attn.k_proj, attn.v_proj))


def test_fused_weight_is_the_parameters_storage(tmp_path):
    model = tiny.our_model(seed=0, pattern="M*-E")
    attn = _attention(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    params = [attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]
    fused = _fuse(attn)
    assert fused.shape == (sum(p.shape[0] for p in params), params[0].shape[1])
    # Same Parameter objects (an optimizer's references stay valid), now views of the fused rows.
    assert [attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight] == params
    assert params[1].data_ptr() == fused[params[0].shape[0]].data_ptr()
    after = model.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in before)
    assert _fuse(attn) is fused  # nothing changed: no new copy

    # Writes through the parameters (load_state_dict, an optimizer step) land in the fused matrix.
    new = {k: v + 1 if "k_proj" in k else v for k, v in before.items()}
    model.load_state_dict(new)
    assert _fuse(attn) is fused
    assert torch.equal(fused[params[0].shape[0]:][:params[1].shape[0]], new[_name(model, attn.k_proj.weight)])

    # A checkpoint written from the fused model loads back equal.
    model.save_pretrained(tmp_path)
    loaded = NemotronHForCausalLM.from_pretrained(tmp_path)
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in model.state_dict().items())


def test_conversion_undoes_the_views_and_fusion_redoes_them():
    model = tiny.our_model(seed=0, pattern="M*-E")
    attn = _attention(model)
    fused = _fuse(attn)
    model.to(torch.float64)  # each parameter gets its own converted tensor
    assert attn.q_proj.weight.data_ptr() != fused.data_ptr()
    again = _fuse(attn)
    assert again is not fused and again.dtype == torch.float64
    torch.testing.assert_close(again, fused.double(), rtol=0, atol=0)


def test_adapter_wrapped_projection_is_not_fused():
    model = tiny.our_model(seed=0, pattern="M*-E")
    attn = _attention(model)
    attn.v_proj = torch.nn.Sequential(attn.v_proj)  # stands in for a LoRA wrapper
    assert _fuse(attn) is None


def _name(model, param) -> str:
    return next(k for k, v in model.named_parameters() if v is param)
