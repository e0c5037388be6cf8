"""Pipeline-stage splitting: stages chained by hand reproduce the whole model exactly."""
from __future__ import annotations

import pytest
import torch

from nemotron_core.create import build_config, random_model
from nemotron_core.errors import InputError
from nemotron_core.pipeline import balanced_layer_split, split_model, stage_module_names

import tiny


def _model(preset: str):
    return tiny.perturb_(random_model(build_config(preset), torch.float32, seed=0), 7).eval()


def _chain(stages, ids):
    out = stages[0](ids)
    for stage in stages[1:]:
        args = out if isinstance(out, tuple) else (out,)
        out = stage(*args)
    return out


@pytest.mark.parametrize("num_stages", [2, 3])
def test_chained_stages_equal_the_full_model(num_stages: int) -> None:
    model = _model("tiny")
    ids = torch.randint(0, 1024, (2, 19), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = model(ids).logits
        logits = _chain(split_model(model, num_stages), ids)
    assert torch.equal(logits, full)


def test_mtp_embeddings_travel_to_the_last_stage() -> None:
    model = _model("tiny-mtp")
    depths = model.config.num_nextn_predict_layers
    ids = torch.randint(0, 1024, (1, 23), generator=torch.Generator().manual_seed(1))
    stages = split_model(model, 3)
    with torch.no_grad():
        first = stages[0](ids)
        assert isinstance(first, tuple) and len(first) == 1 + depths  # hidden + D future-token embeddings
        out = _chain(stages, ids)
        ref = model(ids, return_mtp=True)
    assert torch.equal(out[0], ref.logits)
    for k in range(depths):
        assert torch.equal(out[1 + k], model.lm_head(ref.mtp_per_depth_h[k]))


def test_stage_names_partition_the_state_dict_and_pin_mtp_last() -> None:
    model = _model("tiny-mtp")
    names = stage_module_names(model, 3)
    assert names[0][0] == "model.embed_tokens" and names[-1][-1] == "mtp"
    stages = split_model(model, 3)
    keys = [set(s.state_dict()) for s in stages]
    assert set.union(*keys) == set(model.state_dict())
    assert sum(len(k) for k in keys) == len(model.state_dict())  # disjoint
    assert not model._is_pipeline_parallel_stage()
    assert all(s._is_pipeline_parallel_stage() for s in stages)


@pytest.mark.parametrize("preset", ["tiny", "tiny-mtp"])
@pytest.mark.parametrize("num_stages", [2, 3])
def test_stage_metas_describe_real_outputs(preset: str, num_stages: int) -> None:
    """Every stage's metas list exactly the tensors it receives and returns (shape and dtype): the
    last stage of an MTP model returns the logits and the D MTP depths' logits."""
    model = _model(preset)
    stages = split_model(model, num_stages)
    ids = torch.randint(0, 1024, (2, 11))
    received = (ids,)
    with torch.no_grad():
        for i, stage in enumerate(stages):
            out = stage(*received)
            out = out if isinstance(out, tuple) else (out,)
            ins, outs = stage.get_pipeline_stage_metas(i == 0, 2, 11, torch.float32)
            assert [(t.shape, t.dtype) for t in ins] == [(t.shape, t.dtype) for t in received], i
            assert [(t.shape, t.dtype) for t in outs] == [(t.shape, t.dtype) for t in out], i
            received = out
    depths = model.config.num_nextn_predict_layers
    assert len(received) == 1 + depths and all(t.shape == (2, 11, 1024) for t in received)


def test_mtp_embeddings_are_built_on_the_first_stage_only() -> None:
    stages = split_model(_model("tiny-mtp"), 2)
    ids = torch.randint(0, 1024, (1, 7))
    assert len(stages[0]._build_mtp_embed_inputs_for_pp(ids)) == 2
    with pytest.raises(ValueError, match="first pipeline stage"):
        stages[1]._build_mtp_embed_inputs_for_pp(ids)


def test_customize_pipeline_stage_modules_leaves_the_callers_lists_alone() -> None:
    model = _model("tiny-mtp")
    names = [["model.embed_tokens", "model.layers.0"], ["model.layers.1", "model.norm", "lm_head"]]
    before = [list(stage) for stage in names]
    out = model.customize_pipeline_stage_modules(names, "model.")
    assert names == before
    assert out[:-1] == before[:-1] and out[-1] == before[-1] + ["mtp"]
    assert model.customize_pipeline_stage_modules(out, "model.") == out  # idempotent


def test_trimmed_stage_initializes_and_bad_splits_are_refused() -> None:
    stages = split_model(_model("tiny"), 2)
    with torch.no_grad():
        for p in stages[1].parameters():
            p.fill_(float("nan"))
    stages[1].initialize_weights(dtype=torch.float32)  # no embeddings on this stage: guarded
    assert stages[1].model.embed_tokens is None
    assert all(torch.isfinite(p).all() for p in stages[1].parameters())  # every kept weight drawn
    with pytest.raises(InputError):
        balanced_layer_split(8, 9)
    assert [len(r) for r in balanced_layer_split(8, 3)] == [3, 3, 2]


# ---- nemotron inspect-pp -----------------------------------------------------------------------------
def test_cost_balanced_split_is_optimal_on_a_small_case() -> None:
    from itertools import combinations

    from nemotron_core.pipeline import cost_balanced_split

    costs = [5, 1, 1, 8, 2, 2, 7, 1]
    got = cost_balanced_split(costs, 3, first_extra=3, last_extra=4)

    def worst(cuts):
        bounds = [0, *cuts, len(costs)]
        loads = [sum(costs[a:b]) for a, b in zip(bounds, bounds[1:])]
        loads[0] += 3
        loads[-1] += 4
        return max(loads)

    best = min(worst(c) for c in combinations(range(1, len(costs)), 2))
    assert worst([r.start for r in got[1:]]) == best
    assert [r.start for r in got] == [0, got[1].start, got[2].start] and got[-1].stop == len(costs)


def test_inspect_pp_cli_plans_real_shapes(tmp_path) -> None:
    import json

    from typer.testing import CliRunner

    from nemotron_cli.app import app
    from nemotron_core.params import count_parameters

    result = CliRunner().invoke(app, ["inspect-pp", "nemotron-3-nano-30b-a3b", "--stages", "4", "--json"])
    assert result.exit_code == 0, result.output
    plan = json.loads(result.stdout)
    total = count_parameters(build_config("nemotron-3-nano-30b-a3b"))["total"]
    assert plan["total_parameters"] == total == sum(s["parameters"] for s in plan["stages"])
    assert [s["layers"] for s in plan["stages"]][0][0] == 0 and plan["stages"][-1]["layers"][1] == 51
    assert plan["stages"][0]["sends"] == [[1, 4096, 2688]]
    by_layers = json.loads(CliRunner().invoke(app, ["inspect-pp", "nemotron-3-nano-30b-a3b", "--stages", "4",
                                                    "--balance", "layers", "--json"]).stdout)
    assert plan["imbalance"] <= by_layers["imbalance"]
    # A model directory works too (config only), and an MTP model sends 1 + D tensors.
    made = CliRunner().invoke(app, ["init", str(tmp_path / "m"), "--preset", "tiny-mtp", "--no-weights", "--quiet"])
    assert made.exit_code == 0
    mtp = json.loads(CliRunner().invoke(app, ["inspect-pp", str(tmp_path / "m"), "--stages", "2", "--json"]).stdout)
    assert len(mtp["stages"][0]["sends"]) == 3 and "mtp" in mtp["stages"][-1]["owns"]
    assert mtp["stages"][-1]["sends"] == [] and mtp["stages"][-1]["send_bytes"] == 0  # its outputs go to the loss


@pytest.mark.parametrize("args", [["nope"], ["tiny", "--stages", "20"], ["tiny", "--stages", "0"],
                                  ["tiny", "--balance", "weird"]])
def test_inspect_pp_bad_input_is_one_line(args) -> None:
    from cli_helpers import run_nemotron

    proc = run_nemotron("inspect-pp", *args)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error:") and proc.stderr.count("\n") == 1


def test_schedules_bubble_and_memory_and_completion() -> None:
    from cli_helpers import complete_bash

    from nemotron_cli.commands.inspect_pp import SCHEDULES as CLI_SCHEDULES
    from nemotron_core.pipeline import SCHEDULES, schedule_profile

    assert CLI_SCHEDULES == SCHEDULES
    g = schedule_profile("gpipe", 4, 8)
    o = schedule_profile("1f1b", 4, 8)
    assert g["bubble_fraction"] == o["bubble_fraction"] == 3 / 11
    assert g["in_flight_microbatches"] == [8, 8, 8, 8] and o["in_flight_microbatches"] == [4, 3, 2, 1]
    with pytest.raises(InputError):
        schedule_profile("zero-bubble", 4, 8)
    assert complete_bash(["nemotron", "inspect-pp", "tiny", "--schedule", ""]) == list(SCHEDULES)
