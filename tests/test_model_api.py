"""The public model API (NeMo AutoModel's nemotron_v3 page) on tiny CPU models."""
from __future__ import annotations

import dataclasses
import inspect
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import tiny
from nemotron_core.backend import BackendConfig
from nemotron_core.dtypes import keeps_fp32
from nemotron_core.errors import InputError
from nemotron_core.modeling import model as model_mod
from nemotron_core.modeling.model import NemotronHCausalLMOutputWithPast, NemotronHForCausalLM, NemotronV3Model
from nemotron_core.ops.experts import grouped_experts, grouped_mm_supported, loop_experts

VOCAB = tiny.TINY["vocab_size"]
FP32_ONLY = ("A_log", "D", "dt_bias", "gate.weight", "gate.e_score_correction_bias")


@pytest.fixture(scope="module")
def model():
    """Every block type, perturbed weights, fp32."""
    return tiny.our_model(seed=0, pattern="M*-EM")


def _ids(b: int = 2, s: int = 13, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (b, s), generator=torch.Generator().manual_seed(seed))


# ---- signatures -------------------------------------------------------------------------------------
def _params(fn) -> list[tuple[str, object]]:
    sig = inspect.signature(fn)
    return [(n, p.default) for n, p in sig.parameters.items() if n != "self"]


def test_model_signature():
    assert _params(NemotronV3Model.__init__) == [
        ("config", inspect.Parameter.empty), ("backend", None), ("moe_config", None), ("moe_overrides", None)]


def test_causal_lm_signature():
    params = _params(NemotronHForCausalLM.__init__)
    assert params[:5] == [("config", inspect.Parameter.empty), ("backend", None), ("mtp_loss_scaling_factor", 0.1),
                          ("num_nextn_predict_layers", None), ("mtp_use_repeated_layer", False)]
    assert len(params) == 6
    kw = inspect.signature(NemotronHForCausalLM.__init__).parameters[params[5][0]]
    assert kw.name == "kwargs" and kw.kind is inspect.Parameter.VAR_KEYWORD


def test_model_class_and_output_fields():
    assert model_mod.ModelClass is NemotronHForCausalLM
    assert dataclasses.is_dataclass(NemotronHCausalLMOutputWithPast)
    fields = {f.name: f.default for f in dataclasses.fields(NemotronHCausalLMOutputWithPast)}
    assert fields["mtp_per_depth_h"] is None and fields["mtp_loss_scaling_factor"] is None
    assert {"loss", "logits", "hidden_states"} <= set(fields)


# ---- forward ------------------------------------------------------------------------------------------
@torch.no_grad()
def test_loss_is_shifted_fp32_cross_entropy(model):
    ids = _ids()
    labels = ids.clone()
    labels[0, :4] = -100
    labels[1, 7] = -100
    out = model(input_ids=ids, labels=labels)
    logits = out.logits.float()
    want = F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), labels[:, 1:].reshape(-1), ignore_index=-100)
    assert out.loss.dtype == torch.float32
    assert math.isclose(out.loss.item(), want.item(), rel_tol=1e-6)


@torch.no_grad()
def test_bf16_loss_is_fp32():
    m = tiny.our_model(seed=0, pattern="M*E", dtype=torch.bfloat16)
    ids = _ids()
    out = m(input_ids=ids, labels=ids)
    assert out.logits.dtype == torch.bfloat16 and out.loss.dtype == torch.float32
    want = F.cross_entropy(out.logits[:, :-1].float().reshape(-1, VOCAB), ids[:, 1:].reshape(-1))
    assert math.isclose(out.loss.item(), want.item(), rel_tol=1e-6)


@torch.no_grad()
def test_logits_to_keep(model):
    ids = _ids()
    full = model(input_ids=ids).logits
    last = model(input_ids=ids, logits_to_keep=3).logits
    assert last.shape == (2, 3, VOCAB)
    torch.testing.assert_close(last, full[:, -3:], rtol=0, atol=1e-6)
    index = torch.tensor([0, 5, 12])
    picked = model(input_ids=ids, logits_to_keep=index).logits
    assert picked.shape == (2, 3, VOCAB)
    torch.testing.assert_close(picked, full[:, index], rtol=0, atol=1e-6)


@torch.no_grad()
def test_inputs_embeds_equals_input_ids(model):
    ids = _ids()
    a = model(input_ids=ids).logits
    b = model(inputs_embeds=model.get_input_embeddings()(ids)).logits
    assert tiny.rel_err(a, b) <= 1e-6


@torch.no_grad()
def test_flat_thd_shapes(model):
    """The page: NemotronV3Model returns [T, H] for flat THD input ([T] ids or [T, H] embeddings); the
    causal LM returns [1, T, V] logits either way. Values equal the [1, T] batch's."""
    ids = _ids(1, 11)[0]
    cu = torch.tensor([0, 4, 11], dtype=torch.int32)
    want = model.model(input_ids=ids[None], qkv_format="thd", cu_seqlens=cu)
    flat = model.model(input_ids=ids, qkv_format="thd", cu_seqlens=cu)
    assert want.shape == (1, 11, model.config.hidden_size) and flat.shape == want.shape[1:]
    assert torch.equal(flat, want[0])
    embeds = model.get_input_embeddings()(ids)
    assert torch.equal(model.model(inputs_embeds=embeds, qkv_format="thd", cu_seqlens=cu), flat)
    logits = model(inputs_embeds=embeds, qkv_format="thd", cu_seqlens=cu).logits
    assert logits.shape == (1, 11, VOCAB)
    assert torch.equal(logits, model(input_ids=ids, qkv_format="thd", cu_seqlens=cu).logits)


@torch.no_grad()
def test_output_hidden_states(model):
    ids = _ids()
    out = model(input_ids=ids, output_hidden_states=True)
    hs = out.hidden_states
    assert isinstance(hs, tuple)
    assert len(hs) == model.config.num_hidden_layers + 1 == 6
    assert all(h.shape == (2, 13, 32) for h in hs)
    torch.testing.assert_close(hs[0], model.get_input_embeddings()(ids), rtol=0, atol=0)
    final = model.model(input_ids=ids)  # the backbone returns the final-norm output
    torch.testing.assert_close(hs[-1], final, rtol=0, atol=0)
    torch.testing.assert_close(model.lm_head(hs[-1]), out.logits, rtol=0, atol=1e-6)
    assert model(input_ids=ids).hidden_states is None


def test_embedding_accessors_device_dtype():
    m = tiny.our_model(seed=0, perturb=False, pattern="M*")
    assert m.get_input_embeddings() is m.model.embed_tokens
    assert m.get_output_embeddings() is m.lm_head
    emb = nn.Embedding(VOCAB, 32)
    head = nn.Linear(32, VOCAB, bias=False)
    m.set_input_embeddings(emb)
    m.set_output_embeddings(head)
    assert m.get_input_embeddings() is emb and m.model.embed_tokens is emb
    assert m.get_output_embeddings() is head and m.lm_head is head
    assert m.device == torch.device("cpu")
    assert m.dtype == torch.float32
    bf = tiny.our_model(seed=0, perturb=False, pattern="M*", dtype=torch.bfloat16)
    assert bf.dtype == torch.bfloat16


# ---- masks ----------------------------------------------------------------------------------------------
def test_make_causal_mask():
    make = NemotronHForCausalLM._make_causal_mask
    neg = torch.finfo(torch.float32).min

    m = make(4, 4, 3, torch.float32, torch.device("cpu"))
    assert m.shape == (3, 1, 4, 4) and m.dtype == torch.float32
    visible = m == 0
    assert torch.equal(visible[0, 0], torch.ones(4, 4, dtype=torch.bool).tril())
    assert torch.all(m[~visible] == neg)
    assert torch.equal(visible, visible[:1].expand_as(visible))

    d = make(1, 6, 2, torch.float32, torch.device("cpu"))
    assert d.shape == (2, 1, 1, 6) and torch.all(d == 0)

    c = make(3, 7, 1, torch.bfloat16, torch.device("cpu"))  # chunked prefill: 4 cached + 3 new
    assert c.shape == (1, 1, 3, 7) and c.dtype == torch.bfloat16
    want = torch.tensor([[1, 1, 1, 1, 1, 0, 0],
                         [1, 1, 1, 1, 1, 1, 0],
                         [1, 1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    assert torch.equal(c[0, 0] == 0, want)


# ---- experts ----------------------------------------------------------------------------------------------
def test_grouped_experts_equal_loop_experts():
    g = torch.Generator().manual_seed(0)
    n_tok, n_exp, k, d_in, inter = 37, 6, 2, 16, 24
    x = torch.randn(n_tok, d_in, generator=g)
    up = torch.randn(n_exp, inter, d_in, generator=g) / 4
    down = torch.randn(n_exp, d_in, inter, generator=g) / 4
    used = torch.tensor([0, 2, 3, 5])  # experts 1 and 4 receive no token
    idx = used[torch.rand(n_tok, len(used), generator=g).argsort(-1)[:, :k]]
    w = torch.rand(n_tok, k, generator=g)
    assert grouped_mm_supported(x, up, down)  # the grouped path really runs, no silent fallback
    a = loop_experts(x, idx, w, up, down)
    b = grouped_experts(x, idx, w, up, down)
    assert b.shape == a.shape == (n_tok, d_in) and b.dtype == torch.float32
    assert tiny.rel_err(a, b) <= 1e-6
    # direct per-token reference
    ref = torch.stack([
        sum(w[t, j] * (F.relu(x[t] @ up[idx[t, j]].T).square() @ down[idx[t, j]].T) for j in range(k))
        for t in range(n_tok)])
    assert tiny.rel_err(ref, a) <= 1e-6


@pytest.mark.parametrize("n_exp", [128, 300, 70000])
def test_grouped_experts_sort_narrow_keys_in_the_same_order(n_exp: int):
    """The grouped path sorts expert ids as uint8/int16/int32 (fewer radix passes): the stable order
    must be the int64 ids' own."""
    from nemotron_core.ops.experts import _sort_key

    ids = torch.randint(0, n_exp, (4096,), generator=torch.Generator().manual_seed(n_exp))
    ids[:3] = n_exp - 1  # the largest id fits too
    key = _sort_key(ids, n_exp)
    assert key.element_size() < ids.element_size()
    assert torch.equal(key.argsort(stable=True), ids.argsort(stable=True))


@torch.no_grad()
def test_loop_backend_equals_grouped_backend():
    grouped = tiny.our_model(seed=4, pattern="E*E", backend=BackendConfig(experts="grouped"))
    loop = tiny.our_model(seed=4, pattern="E*E", backend=BackendConfig(experts="loop"))
    assert grouped.model.layers["0"].mixer.experts.impl == "grouped"
    assert loop.model.layers["0"].mixer.experts.impl == "loop"
    ids = _ids(s=21)
    a = grouped(input_ids=ids).logits
    b = loop(input_ids=ids).logits
    assert tiny.rel_err(b, a) <= 1e-6


# ---- initialisation ----------------------------------------------------------------------------------------
def _config(**kw):
    return tiny.our_config(pattern="M*-EM", time_step_min=1e-3, time_step_max=0.1, time_step_floor=1e-4, **kw)


def _init(seed: int, dtype=torch.float32, meta: bool = False):
    cfg = _config()
    if meta:
        with torch.device("meta"):
            m = NemotronHForCausalLM(cfg)
        assert all(p.is_meta for p in m.parameters())
    else:
        m = NemotronHForCausalLM(cfg)
    torch.manual_seed(seed)
    m.initialize_weights(buffer_device="cpu" if meta else None, dtype=dtype)
    return m


def test_initialize_weights_values():
    m = _init(0)
    cfg = m.config
    mambas = [b.mixer for b in m.model.layers.values() if b.block_type == "linear_attention"]
    moes = [b.mixer for b in m.model.layers.values() if b.block_type == "moe"]
    assert len(mambas) == 2 and len(moes) == 1
    heads = cfg.mamba_num_heads
    for mx in mambas:
        torch.testing.assert_close(mx.A_log, torch.log(torch.arange(1, heads + 1, dtype=torch.float32)), rtol=0, atol=0)
        assert torch.all(mx.D == 1)
        dt = F.softplus(mx.dt_bias.double())
        assert torch.all(dt >= cfg.time_step_floor * (1 - 1e-5)) and torch.all(dt <= cfg.time_step_max * (1 + 1e-5)), dt
    for mx in moes:
        assert torch.all(mx.gate.e_score_correction_bias == 0)
        assert mx.gate.weight.std() > 0


def test_initialize_weights_bf16_keeps_fp32_tensors():
    m = _init(0, dtype=torch.bfloat16)
    seen = set()
    tensors = list(m.named_parameters()) + list(m.named_buffers())
    for name, t in tensors:
        if ("." + name).endswith(tuple("." + n for n in FP32_ONLY)):
            assert t.dtype == torch.float32, name
            assert keeps_fp32(name)
            seen.add(name.rsplit(".", 1)[-1] if "gate" not in name else "gate." + name.rsplit(".", 1)[-1])
        else:
            assert t.dtype == torch.bfloat16, name
    assert seen == set(FP32_ONLY)
    # the bf16 weights are the fp32 draw rounded: a seed means the same model in any dtype
    ref = _init(0).state_dict()
    for name, t in m.state_dict().items():
        torch.testing.assert_close(t, ref[name].to(t.dtype), rtol=0, atol=0, msg=name)


def test_initialize_weights_on_meta_device_and_seeds():
    meta = _init(7, meta=True)
    assert not any(p.is_meta for p in meta.parameters())
    assert not any(b.is_meta for b in meta.buffers())
    assert meta.device == torch.device("cpu")
    same = _init(7)
    other = _init(8)
    a, b, c = meta.state_dict(), same.state_dict(), other.state_dict()
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert any(not torch.equal(a[n], c[n]) for n in a)
    with torch.no_grad():
        assert torch.isfinite(meta(input_ids=_ids()).logits).all()


@torch.no_grad()
def test_bf16_forward_close_to_fp32():
    fp32 = _init(3)
    bf16 = _init(3, dtype=torch.bfloat16)
    ids = _ids(s=21)
    a = fp32(input_ids=ids).logits
    b = bf16(input_ids=ids).logits
    assert b.dtype == torch.bfloat16 and torch.isfinite(b.float()).all()
    err = tiny.rel_err(a, b.float())
    assert err <= 5e-2, f"bf16 vs fp32 relative error {err:.3f}"

    # perturbed weights (norms, D, router bias all away from their init), cast to bf16
    fp32 = tiny.our_model(seed=5, pattern="M*-EM")
    bf16 = tiny.our_model(seed=5, pattern="M*-EM", dtype=torch.bfloat16)
    assert bf16.model.layers["3"].mixer.gate.weight.dtype == torch.float32
    a = fp32(input_ids=ids).logits
    b = bf16(input_ids=ids).logits
    err = tiny.rel_err(a, b.float())
    assert err <= 5e-2, f"bf16 vs fp32 relative error {err:.3f}"


# ---- bad input ----------------------------------------------------------------------------------------------
@torch.no_grad()
def test_bad_token_ids(model):
    ids = _ids()
    ids[1, 3] = VOCAB
    with pytest.raises(InputError, match="vocabulary"):
        model(input_ids=ids)
    ids[1, 3] = -1
    with pytest.raises(InputError):
        model(input_ids=ids)


@torch.no_grad()
def test_bad_labels_shape(model):
    ids = _ids()
    with pytest.raises(InputError, match="labels"):
        model(input_ids=ids, labels=ids[:, :-1])
    with pytest.raises(InputError, match="labels"):
        model(input_ids=ids, labels=ids[:1])
    with pytest.raises(InputError, match="labels"):
        model(input_ids=ids, labels=ids[..., None])


# ---- loading ------------------------------------------------------------------------------------------------
def test_from_pretrained_dtype_auto_loads_as_stored(tmp_path):
    tiny.our_model(seed=0, perturb=False, pattern="M*", dtype=torch.bfloat16).save_pretrained(tmp_path)
    assert NemotronHForCausalLM.from_pretrained(tmp_path).dtype == torch.bfloat16  # default: as stored
    assert NemotronHForCausalLM.from_pretrained(tmp_path, torch_dtype="auto").dtype == torch.bfloat16
    assert NemotronHForCausalLM.from_pretrained(tmp_path, dtype="auto").dtype == torch.bfloat16


def test_experts_follow_autocast_on_the_grouped_path(monkeypatch):
    """Autocast does not cover grouped GEMMs; the experts compute in its dtype (as a Linear would)
    instead of falling back to the loop, and stay close to the fp32 result."""
    from nemotron_core.create import build_config, random_model
    from nemotron_core.ops import experts as experts_ops

    model = random_model(build_config("tiny"), torch.float32, seed=0).eval()
    ids = torch.randint(0, 1024, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = model(ids).logits
        monkeypatch.setattr(experts_ops, "loop_experts", lambda *a: (_ for _ in ()).throw(AssertionError("loop")))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = model(ids).logits
    assert float((got.float() - want).abs().max() / want.abs().max()) < 5e-2


# ---- constructor: moe_overrides / moe_config ------------------------------------------------------------------
def _moe_shapes(module: nn.Module) -> set[tuple[int, ...]]:
    from nemotron_core.modeling.moe import MoE

    return {tuple(m.gate.e_score_correction_bias.shape) for m in module.modules() if isinstance(m, MoE)}


@torch.no_grad()
def test_moe_overrides_reach_config_backbone_and_mtp_and_round_trip(tmp_path):
    from nemotron_core.create import build_config

    config = build_config("tiny-mtp")  # the MTP pattern (*E) holds an MoE block too
    assert config.n_routed_experts == 8
    model = NemotronHForCausalLM(config, moe_overrides={"n_routed_experts": 4, "moe_intermediate_size": 16})
    assert config.n_routed_experts == 8 and config.moe_intermediate_size == 32  # the caller's config is untouched
    assert model.config.n_routed_experts == 4 and model.config.moe_intermediate_size == 16
    assert model.model.config is model.config and model.mtp.config is model.config
    assert _moe_shapes(model.model) == _moe_shapes(model.mtp) == {(4,)}
    torch.manual_seed(0)
    model.initialize_weights(dtype=torch.float32)
    model.save_pretrained(tmp_path)
    back = NemotronHForCausalLM.from_pretrained(tmp_path)
    assert back.config.n_routed_experts == 4
    want, got = model.state_dict(), back.state_dict()
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)


def test_moe_overrides_on_the_backbone_alone():
    from nemotron_core.create import build_config

    config = build_config("tiny")
    backbone = NemotronV3Model(config, moe_overrides={"n_routed_experts": 4})
    assert backbone.config.n_routed_experts == 4 and config.n_routed_experts == 8
    assert _moe_shapes(backbone) == {(4,)}


def test_moe_overrides_refuse_unknown_keys_and_moe_config():
    from nemotron_core.create import build_config
    from nemotron_core.errors import ConfigError

    config = build_config("tiny")
    for bad in ("bogus", "route_scale", "n_activated_experts", "hidden_size", "n_shared_experts"):
        with pytest.raises(InputError, match=bad):
            NemotronHForCausalLM(config, moe_overrides={bad: 4})
    with pytest.raises(ConfigError, match="n_routed_experts"):  # values are validated like config.json's
        NemotronHForCausalLM(config, moe_overrides={"n_routed_experts": 1})
    with pytest.raises(ValueError):  # as the reference: one or the other
        NemotronHForCausalLM(config, moe_config=object(), moe_overrides={"n_routed_experts": 4})
    with pytest.raises(InputError, match="moe_config"):
        NemotronHForCausalLM(config, moe_config=object())
    with pytest.raises(InputError, match="moe_config"):
        NemotronV3Model(config, moe_config=object())


def _cache_of(out) -> object:
    """The output's cache (transformers 5.2x renamed the field; the old name warns)."""
    return getattr(out, model_mod._CACHE_FIELD)


# ---- generation entry points called directly ---------------------------------------------------------------------
@torch.no_grad()
def test_prepare_inputs_for_generation_outside_generate():
    """transformers 5 leaves max_new_tokens and max_length unset: the cache then holds the prompt plus
    transformers' default of 20 new tokens, and a greedy loop of that length runs on it."""
    from nemotron_core.cache import NemotronHybridCache

    model = tiny.our_model(seed=0, pattern="M*-E")
    assert model.generation_config.max_new_tokens is None and model.generation_config.max_length is None
    ids = _ids(1, 5)
    inputs = model.prepare_inputs_for_generation(ids)
    cache = inputs["past_key_values"]
    assert isinstance(cache, NemotronHybridCache) and cache.max_length == 5 + 20
    seq = ids
    for _ in range(20):
        out = model(**inputs)
        seq = torch.cat([seq, out.logits[:, -1:].argmax(-1)], dim=1)
        inputs = model.prepare_inputs_for_generation(seq, past_key_values=_cache_of(out))
    ref = model.generate(ids, max_new_tokens=20, do_sample=False)
    assert torch.equal(seq[:, : ref.shape[1]], ref)  # generate() may stop early at EOS
    model.generate(ids, max_new_tokens=2, do_sample=False)  # its length does not stick to later direct calls
    assert model.prepare_inputs_for_generation(ids)["past_key_values"].max_length == 5 + 20
    model.generation_config.max_new_tokens = 7
    assert model.prepare_inputs_for_generation(ids)["past_key_values"].max_length == 5 + 7


def test_from_pretrained_forwards_positional_args_to_from_config(tmp_path):
    tiny.our_model(seed=0, perturb=False, pattern="M*E").save_pretrained(tmp_path)
    loaded = NemotronHForCausalLM.from_pretrained(tmp_path, BackendConfig(experts="loop"))
    assert loaded.backend.experts == "loop"
    assert loaded.model.layers["2"].mixer.experts.impl == "loop"
    with pytest.raises(TypeError):  # from_config(config, backend=None, **kwargs) takes one positional
        NemotronHForCausalLM.from_pretrained(tmp_path, BackendConfig(), 0.5)
    with pytest.raises(TypeError):  # backend twice
        NemotronHForCausalLM.from_pretrained(tmp_path, BackendConfig(), backend=BackendConfig())


# ---- forward flags ---------------------------------------------------------------------------------------------
@torch.no_grad()
def test_use_cache_false_returns_no_cache(model):
    from nemotron_core.cache import NemotronHybridCache

    ids = _ids(1, 6)
    cache = NemotronHybridCache(model.config, 1, 16)
    assert _cache_of(model(input_ids=ids, past_key_values=cache, use_cache=False)) is None
    cache = NemotronHybridCache(model.config, 1, 16)
    assert _cache_of(model(input_ids=ids, past_key_values=cache, use_cache=True)) is cache
    cache = NemotronHybridCache(model.config, 1, 16)
    assert _cache_of(model(input_ids=ids, past_key_values=cache)) is cache  # default: return it


@torch.no_grad()
def test_output_hidden_states_defaults_to_the_config():
    m = tiny.our_model(seed=0, pattern="M*")
    ids = _ids(1, 6)
    assert m(input_ids=ids).hidden_states is None
    m.config.output_hidden_states = True
    assert len(m(input_ids=ids).hidden_states) == 3
    assert m(input_ids=ids, output_hidden_states=False).hidden_states is None  # an explicit False wins
