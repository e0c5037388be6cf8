"""LoRA adapters (nemotron_core.lora) against PEFT on transformers' NemotronH, and ``generate --adapter``.

PEFT initialises lora_B to zero, which would make every comparison vacuous, so the reference adapters
get random B matrices (fixed seed) before they are saved. PEFT is the reference only: the tests that
need it are skipped where it is not installed (it is in the ``test`` extra).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

import tiny
from nemotron_core.errors import CheckpointError, InputError
from nemotron_core.lora import (LoRALinear, LoraConfig, apply_lora, load_adapter, lora_modules, merge_and_unload,
                                save_adapter, unload)
from nemotron_core.modeling.model import NemotronHForCausalLM

# PEFT refuses out_proj (and conv1d) on Mamba models; everything else that is an nn.Linear.
PEFT_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "in_proj", "up_proj", "down_proj"]
ALL_TARGETS = PEFT_TARGETS + ["out_proj"]
TOL = 1e-5
# PEFT (0.21) asks transformers for the deprecated is_gradient_checkpointing.
pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory) -> Path:
    """A tiny transformers NemotronH (M * - E: Mamba, attention, MLP, MoE) saved in fp32."""
    d = tmp_path_factory.mktemp("lora") / "base"
    tiny.hf_model(seed=0).save_pretrained(str(d))
    return d


@pytest.fixture(scope="module")
def ids() -> torch.Tensor:
    return torch.randint(0, tiny.TINY["vocab_size"], (2, 12), generator=torch.Generator().manual_seed(5))


def ours(base_dir: Path) -> NemotronHForCausalLM:
    return NemotronHForCausalLM.from_pretrained(str(base_dir))


@torch.no_grad()
def logits(model, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids).logits.float()


@torch.no_grad()
def randomise_lora_(model: torch.nn.Module, seed: int, scale: float = 0.2) -> None:
    """Draw every lora_A/lora_B matrix from N(0, scale^2) in sorted-name order (B starts at zero)."""
    g = torch.Generator().manual_seed(seed)
    for name, p in sorted(model.named_parameters()):
        if "lora_A" in name or "lora_B" in name:
            p.copy_(torch.randn(p.shape, generator=g) * scale)


def peft_adapter(base_dir: Path, out: Path, allow_out_proj: bool = False, monkeypatch=None, **lora_kwargs):
    """transformers model + PEFT LoRA with random A and B, saved to ``out``; returns the PEFT model."""
    peft = pytest.importorskip("peft")
    if allow_out_proj:
        # PEFT forbids out_proj on Mamba models because its CUDA fast path bypasses the module; on CPU
        # transformers calls out_proj as a module, so the reference is exact without the check.
        import peft.tuners.tuners_utils as tu

        monkeypatch.setattr(tu, "_check_lora_target_modules_mamba", lambda *a, **k: None)
    hf = transformers.NemotronHForCausalLM.from_pretrained(str(base_dir)).eval()
    kwargs = dict(r=4, lora_alpha=8, target_modules=PEFT_TARGETS, task_type="CAUSAL_LM")
    kwargs.update(lora_kwargs)
    model = peft.get_peft_model(hf, peft.LoraConfig(**kwargs)).eval()
    randomise_lora_(model, seed=1)
    model.save_pretrained(str(out))
    return model


# ---- against PEFT ---------------------------------------------------------------------------------------------
VARIANTS = {
    "list": {},
    "rslora": {"r": 8, "lora_alpha": 4, "use_rslora": True},
    "regex": {"target_modules": r"model\.layers\.\d+\.mixer\.(q_proj|v_proj|in_proj|shared_experts\.up_proj)"},
    "out_proj": {"target_modules": ALL_TARGETS, "allow_out_proj": True},
    "all-linear": {"target_modules": "all-linear", "allow_out_proj": True},  # PEFT's all-linear includes out_proj
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_load_matches_peft(base_dir, ids, tmp_path, variant, monkeypatch):
    ref_model = peft_adapter(base_dir, tmp_path / "adapter", monkeypatch=monkeypatch, **VARIANTS[variant])
    ref = logits(ref_model, ids)
    with ref_model.disable_adapter():
        hf_base = logits(ref_model, ids)
    base = logits(ours(base_dir), ids)
    assert tiny.rel_err(hf_base, base) < TOL, "base models disagree"
    assert tiny.rel_err(ref, base) > 1e-2, "the adapter barely changes the logits: the test would be vacuous"
    peft_wrapped = sum("lora_A.default" in n for n, _ in ref_model.named_modules())

    model = ours(base_dir)
    info = load_adapter(model, tmp_path / "adapter")
    assert info["modules"] == peft_wrapped == len(lora_modules(model))
    assert info["merged"] is False and info["r"] == ref_model.peft_config["default"].r
    assert tiny.rel_err(ref, logits(model, ids)) < TOL

    merged = ours(base_dir)
    info = load_adapter(merged, tmp_path / "adapter", merge=True)
    assert info["merged"] is True
    assert not lora_modules(merged) and not any(isinstance(m, LoRALinear) for m in merged.modules())
    assert tiny.rel_err(ref, logits(merged, ids)) < TOL


def test_checkpoint_layout_keys(base_dir, ids, tmp_path, monkeypatch):
    """Adapters of the transformers 4 remote-code model name modules ``backbone.layers.N...``."""
    ref = logits(peft_adapter(base_dir, tmp_path / "a", monkeypatch=monkeypatch), ids)
    tensors = load_file(str(tmp_path / "a" / "adapter_model.safetensors"))
    renamed = {k.replace("base_model.model.model.", "base_model.model.backbone."): v for k, v in tensors.items()}
    assert renamed.keys() != tensors.keys()
    save_file(renamed, str(tmp_path / "a" / "adapter_model.safetensors"))
    model = ours(base_dir)
    load_adapter(model, tmp_path / "a")
    assert tiny.rel_err(ref, logits(model, ids)) < TOL


def test_saved_adapter_loads_in_peft(base_dir, ids, tmp_path):
    peft = pytest.importorskip("peft")
    model = ours(base_dir)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=PEFT_TARGETS)
    names = apply_lora(model, config)
    assert "model.layers.1.mixer.q_proj" in names and "model.layers.3.mixer.shared_experts.up_proj" in names
    assert torch.equal(logits(model, ids), logits(ours(base_dir), ids))  # fresh LoRA: B = 0
    randomise_lora_(model, seed=2)
    mine = logits(model, ids)
    info = save_adapter(model, tmp_path / "mine", config)
    assert info["modules"] == len(names)
    saved = json.loads((tmp_path / "mine" / "adapter_config.json").read_text())
    assert saved["peft_type"] == "LORA" and saved["task_type"] == "CAUSAL_LM" and saved["r"] == 4

    hf = transformers.NemotronHForCausalLM.from_pretrained(str(base_dir)).eval()
    ref_model = peft.PeftModel.from_pretrained(hf, str(tmp_path / "mine")).eval()
    assert sum("lora_A.default" in n for n, _ in ref_model.named_modules()) == len(names)
    ref = logits(ref_model, ids)
    assert tiny.rel_err(ref, logits(ours(base_dir), ids)) > 1e-2
    assert tiny.rel_err(ref, mine) < TOL

    again = ours(base_dir)
    load_adapter(again, tmp_path / "mine")
    assert torch.equal(logits(again, ids), mine)


# ---- without PEFT ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def our_adapter(base_dir, tmp_path_factory) -> Path:
    """An adapter written by save_adapter (random A and B), for the error and CLI-free tests."""
    d = tmp_path_factory.mktemp("lora") / "adapter"
    model = ours(base_dir)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=ALL_TARGETS)
    apply_lora(model, config)
    randomise_lora_(model, seed=3)
    save_adapter(model, d, config)
    return d


def test_merge_unmerge_and_unload(base_dir, our_adapter, ids):
    base = ours(base_dir)
    want = logits(base, ids)
    weights = {k: v.clone() for k, v in base.state_dict().items()}
    load_adapter(base, our_adapter)
    adapted = logits(base, ids)
    assert tiny.rel_err(want, adapted) > 1e-2
    for layer in lora_modules(base).values():
        layer.merge()
    assert tiny.rel_err(adapted, logits(base, ids)) < TOL
    for layer in lora_modules(base).values():
        layer.unmerge()
    assert tiny.rel_err(adapted, logits(base, ids)) < TOL
    unload(base)
    assert base.state_dict().keys() == weights.keys()
    assert all(torch.allclose(base.state_dict()[k], v, atol=1e-6) for k, v in weights.items())
    load_adapter(base, our_adapter)
    merge_and_unload(base)
    assert base.state_dict().keys() == weights.keys()  # plain model again: save_pretrained works
    assert tiny.rel_err(adapted, logits(base, ids)) < TOL


def test_activation_checkpointing_and_training(base_dir, our_adapter, ids):
    from nemotron_core.lora import mark_only_lora_trainable

    plain = ours(base_dir)
    load_adapter(plain, our_adapter)
    model = ours(base_dir)
    model.gradient_checkpointing_enable()
    info = load_adapter(model, our_adapter)
    assert info["modules"] == len(lora_modules(plain))
    assert set(lora_modules(model)) == set(lora_modules(plain))
    params = mark_only_lora_trainable(model)
    assert len(params) == 2 * info["modules"]
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    assert all(p.grad is not None for p in params)
    assert all(p.grad is None for n, p in model.named_parameters() if "lora_" not in n)


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _edit_config(d: Path, **changes) -> None:
    p = d / "adapter_config.json"
    data = json.loads(p.read_text())
    data.update(changes)
    p.write_text(json.dumps(data))


def _edit_tensors(d: Path, fn) -> None:
    p = d / "adapter_model.safetensors"
    tensors = load_file(str(p))
    fn(tensors)
    save_file(tensors, str(p))


Q_A = "base_model.model.model.layers.1.mixer.q_proj.lora_A.weight"
Q_B = "base_model.model.model.layers.1.mixer.q_proj.lora_B.weight"


def _rank_mismatch(d):
    _edit_tensors(d, lambda t: t.__setitem__(Q_A, t[Q_A][:3]))


def _unknown_module(d):
    _edit_tensors(d, lambda t: t.__setitem__(Q_A.replace("layers.1", "layers.9"), t.pop(Q_A)))


def _missing_b(d):
    _edit_tensors(d, lambda t: t.pop(Q_B))


def _bin_only(d):
    (d / "adapter_model.safetensors").rename(d / "adapter_model.bin")


def _corrupt(d):
    (d / "adapter_model.safetensors").write_bytes(b"\x00" * 10)


BAD = {
    "rank mismatch": (_rank_mismatch, CheckpointError, Q_A),
    "unknown module": (_unknown_module, CheckpointError, "layers.9.mixer.q_proj"),
    "missing B": (_missing_b, CheckpointError, Q_B),
    "bin only": (_bin_only, InputError, "never unpickles"),
    "corrupt": (_corrupt, CheckpointError, "corrupt"),
    "dora": (lambda d: _edit_config(d, use_dora=True), InputError, "DoRA adapters are not supported"),
    "bias": (lambda d: _edit_config(d, bias="all"), InputError, "bias"),
    "modules_to_save": (lambda d: _edit_config(d, modules_to_save=["lm_head"]), InputError, "modules_to_save"),
    "peft_type": (lambda d: _edit_config(d, peft_type="IA3"), InputError, "IA3"),
    "fan_in_fan_out": (lambda d: _edit_config(d, fan_in_fan_out=True), InputError, "fan_in_fan_out"),
    "rank_pattern": (lambda d: _edit_config(d, rank_pattern={"q_proj": 8}), InputError, "rank_pattern"),
    "not a target": (lambda d: _edit_config(d, target_modules=["in_proj"]), CheckpointError, "target_modules"),
    "experts only": (lambda d: _edit_config(d, target_modules=["experts.up_proj"]), InputError, "routed-expert"),
    "no config": (lambda d: (d / "adapter_config.json").unlink(), InputError, "adapter_config.json"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_adapter_is_one_line(base_dir, our_adapter, tmp_path, case):
    break_it, error, contains = BAD[case]
    d = _copy(our_adapter, tmp_path / "bad")
    break_it(d)
    model = ours(base_dir)
    with pytest.raises(error) as e:
        load_adapter(model, d)
    assert "\n" not in str(e.value) and contains in str(e.value)
    assert not lora_modules(model), "a failed load must leave the model untouched"


def test_missing_dir_and_expert_targets(base_dir, tmp_path):
    with pytest.raises(InputError, match="no such adapter directory"):
        load_adapter(ours(base_dir), tmp_path / "nope")
    with pytest.raises(InputError, match="routed-expert") as e:
        apply_lora(ours(base_dir), LoraConfig(r=2, target_modules=r".*\.experts\.\d+\.down_proj"))
    assert "\n" not in str(e.value)
    with pytest.raises(InputError, match=r"model.embed_tokens \(Embedding\)"):
        apply_lora(ours(base_dir), LoraConfig(r=2, target_modules=["q_proj", "embed_tokens"]))
    with pytest.raises(InputError, match="matches no nn.Linear"):
        apply_lora(ours(base_dir), LoraConfig(r=2, target_modules=["nothing_here"]))
    model = ours(base_dir)
    apply_lora(model, LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(InputError, match="already has a LoRA adapter"):
        apply_lora(model, LoraConfig(r=2, target_modules=["q_proj"]))


# ---- nemotron generate --adapter ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cli_model(tmp_path_factory) -> tuple[Path, Path]:
    """A `nemotron init` tiny model (with tokenizer) and a strong random adapter for it."""
    from nemotron_core.create import create_model_dir

    root = tmp_path_factory.mktemp("lora_cli")
    create_model_dir(root / "model", dtype="fp32")
    model = ours(root / "model")
    config = LoraConfig(r=8, lora_alpha=16, target_modules=ALL_TARGETS + ["lm_head"])
    apply_lora(model, config)
    randomise_lora_(model, seed=4, scale=0.5)
    save_adapter(model, root / "adapter", config)
    return root / "model", root / "adapter"


def invoke(*args: str):
    from nemotron_cli.app import app

    return CliRunner().invoke(app, ["generate", *args])


def test_generate_with_adapter(cli_model):
    model_dir, adapter = cli_model
    common = [str(model_dir), "--prompt", "hi", "--greedy", "--max-new-tokens", "5", "--json"]
    plain = invoke(*common)
    adapted = invoke(*common, "--adapter", str(adapter))
    assert plain.exit_code == 0, plain.stderr
    assert adapted.exit_code == 0, adapted.stderr
    a, b = json.loads(plain.stdout), json.loads(adapted.stdout)
    assert a["completion_tokens"] == b["completion_tokens"] == 5
    assert a["text"] != b["text"]
    # The reference: the library's greedy generate on the base model with the adapter loaded unmerged.
    from nemotron_core.generation import SamplingConfig, generate
    from nemotron_core.tokenizer import load_tokenizer

    tok = load_tokenizer(model_dir)
    model = ours(model_dir)
    load_adapter(model, adapter, merge=False)
    ref = generate(model, [tok("hi")["input_ids"]], SamplingConfig(max_new_tokens=5, do_sample=False,
                                                                    eos_token_ids=[]))
    assert b["text"] == tok.decode(ref.sequences[0], skip_special_tokens=True)


def test_generate_bad_adapter_exits_2(cli_model, tmp_path):
    model_dir, adapter = cli_model
    bin_only = _copy(adapter, tmp_path / "bin")
    _bin_only(bin_only)
    for bad, contains in ((tmp_path / "missing", "no such adapter directory"), (bin_only, "adapter_model.bin")):
        r = invoke(str(model_dir), "--prompt", "hi", "--max-new-tokens", "2", "--adapter", str(bad))
        assert r.exit_code == 2, r.stderr
        lines = r.stderr.splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and contains in lines[0], r.stderr


def test_help_mentions_adapter():
    from nemotron_cli.app import app

    r = CliRunner().invoke(app, ["generate", "--help"])
    assert r.exit_code == 0 and "--adapter" in r.stdout


# ---- nemotron convert --adapter -------------------------------------------------------------------------------
def test_convert_merges_an_adapter(cli_model, tmp_path):
    """The merged directory is a plain model reproducing base + adapter, up to the merge's fp32
    rounding (W + s * B @ A rounded once; measured 8e-7 here, held to 1e-5 as the other merge tests
    are; convert's --verify allows VERIFY_MERGE_RTOL = 1e-3 for real models' deeper stacks) and the
    bf16 rounding when cast; --verify checks it."""
    from nemotron_cli.app import app

    model_dir, _ = cli_model
    # A realistic adapter: a small update to the weights (cli_model's is deliberately huge, which makes
    # the random network chaotic under any rounding).
    model = ours(model_dir)
    config = LoraConfig(r=8, lora_alpha=16, target_modules=ALL_TARGETS)
    apply_lora(model, config)
    randomise_lora_(model, seed=11, scale=0.05)
    adapter = tmp_path / "adapter"
    save_adapter(model, adapter, config)
    ids = torch.randint(0, 1024, (2, 12), generator=torch.Generator().manual_seed(9))
    with_adapter = ours(model_dir)
    load_adapter(with_adapter, adapter)
    want = logits(with_adapter, ids)
    for dtype, tol in (("fp32", 1e-5), ("bf16", 3e-2)):
        out = tmp_path / dtype
        r = CliRunner().invoke(app, ["convert", str(model_dir), str(out), "--adapter", str(adapter),
                                     "--dtype", dtype, "--verify", "--json"])
        assert r.exit_code == 0, r.stderr
        report = json.loads(r.stdout)
        assert report["adapter"] == str(adapter) and report["verify"]["ok"]
        merged = NemotronHForCausalLM.from_pretrained(str(out), dtype="fp32")
        assert not any("lora" in k for k in merged.state_dict())
        got = logits(merged, ids)
        assert float((got - want).abs().max() / want.abs().max()) < tol
    assert float((logits(ours(model_dir), ids) - want).abs().max() / want.abs().max()) > 3e-2  # the adapter matters
    bad = CliRunner().invoke(app, ["convert", str(model_dir), str(tmp_path / "x"), "--adapter", str(tmp_path / "none")])
    assert bad.exit_code == 2 and bad.stderr.count("\n") == 1 and not (tmp_path / "x").exists()
