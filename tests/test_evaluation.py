"""nemotron_core.evaluation: perplexity, and the lm-evaluation-harness adapter (with and without lm_eval).

Oracles are hand computations from the logits of one unpadded forward per sequence: an fp32
log-softmax, gathered at the targets, summed in fp64.
"""
from __future__ import annotations

import copy
import json
import math
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from cli_helpers import REPO_ROOT, cli_env
from nemotron_core.data import Example, load_examples
from nemotron_core.errors import InputError
from nemotron_core.evaluation import NemotronEvalModel, load_for_eval, perplexity, rolling_windows

IGNORE = -100

LINES = [
    {"text": "the cat sat on the mat. the cat sat on the mat."},
    {"prompt": "Q: what sat on the mat?\nA:", "completion": " the cat"},
    {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"},
                  {"role": "assistant", "content": "hello there"}]},
]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    from nemotron_core.create import create_model_dir

    d = tmp_path_factory.mktemp("eval") / "tiny"
    create_model_dir(d, dtype="fp32", seed=0)
    return d


@pytest.fixture(scope="module")
def loaded(model_dir):
    return load_for_eval(model_dir, device="cpu", dtype=torch.float32)


@pytest.fixture(scope="module")
def examples(loaded, tmp_path_factory) -> list[Example]:
    _, tok = loaded
    path = tmp_path_factory.mktemp("eval-data") / "dev.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in LINES) + "\n")
    return load_examples(path, tok, max_length=256)


@torch.no_grad()
def token_logprobs(model, ids: list[int]) -> torch.Tensor:
    """``[len(ids) - 1]`` fp64: log p(ids[t] | ids[:t]) for t >= 1, from one unpadded forward."""
    logits = model(input_ids=torch.tensor([ids])).logits[0].float()
    logp = logits.log_softmax(-1)[:-1]
    return logp.gather(-1, torch.tensor(ids[1:])[:, None])[:, 0].double()


def hand_nll(model, examples: list[Example]) -> tuple[float, int]:
    total, tokens = 0.0, 0
    for ex in examples:
        lp = token_logprobs(model, ex.input_ids)
        scored = torch.tensor(ex.labels[1:]) != IGNORE
        total -= float(lp[scored].sum())
        tokens += int(scored.sum())
    return total, tokens


# ---- perplexity ------------------------------------------------------------------------------------------------
def test_perplexity_equals_hand_computation_on_mixed_formats(loaded, examples):
    model, tok = loaded
    # The three formats score different spans: all, the completion + EOS, the assistant turn.
    scored = [sum(1 for label in ex.labels[1:] if label != IGNORE) for ex in examples]
    assert scored[0] == len(examples[0].input_ids) - 1
    assert 0 < scored[1] < len(examples[1].input_ids) - 1 and 0 < scored[2] < len(examples[2].input_ids) - 1
    assert scored[1] == len(tok(" the cat", add_special_tokens=False)["input_ids"]) + 1

    report = perplexity(model, examples, batch_size=8)
    total, tokens = hand_nll(model, examples)
    assert set(report) == {"loss", "perplexity", "tokens", "examples", "bits_per_token"}
    assert report["tokens"] == tokens == sum(scored) and report["examples"] == 3
    assert report["loss"] == pytest.approx(total / tokens, rel=1e-6)
    assert report["perplexity"] == pytest.approx(math.exp(report["loss"]), rel=1e-12)
    assert report["bits_per_token"] == pytest.approx(report["loss"] / math.log(2), rel=1e-12)


def test_packed_equals_padded(loaded, examples):
    model, _ = loaded
    padded = perplexity(model, examples, batch_size=2)  # two batches, the first one padded
    packed = perplexity(model, examples, batch_size=2, pack=True)
    rows = perplexity(model, examples, pack=True, max_tokens=max(len(e.input_ids) for e in examples))  # 1 per row
    assert padded["tokens"] == packed["tokens"] == rows["tokens"]
    assert packed["loss"] == pytest.approx(padded["loss"], rel=1e-6)
    assert rows["loss"] == pytest.approx(padded["loss"], rel=1e-6)


def test_uniform_model_has_perplexity_vocab_size(loaded, examples):
    model, _ = loaded
    uniform = copy.deepcopy(model)
    with torch.no_grad():
        uniform.lm_head.weight.zero_()  # every logit 0: p = 1 / V for every token
    report = perplexity(uniform, examples)
    vocab = uniform.config.vocab_size
    # fp32 log-softmax of equal logits is -log(V) up to a few ulps; exp() of the mean keeps that.
    assert report["perplexity"] == pytest.approx(vocab, rel=1e-6)
    assert report["bits_per_token"] == pytest.approx(math.log2(vocab), rel=1e-6)


def test_perplexity_restores_training_mode_and_rejects_nothing(loaded, examples):
    model, _ = loaded
    model.train()
    try:
        perplexity(model, examples[:1])
        assert model.training
    finally:
        model.eval()
    with pytest.raises(InputError):
        perplexity(model, [])


# ---- the lm-eval adapter, without lm_eval -------------------------------------------------------------------------
def hand_loglikelihood(model, ctx: list[int], cont: list[int]) -> tuple[float, bool]:
    ids = ctx + cont
    with torch.no_grad():
        logp = model(input_ids=torch.tensor([ids[:-1]])).logits[0].float().log_softmax(-1)[-len(cont):]
    target = torch.tensor(cont)
    return float(logp.gather(-1, target[:, None]).double().sum()), bool((logp.argmax(-1) == target).all())


def test_loglikelihood_equals_hand_computation(loaded):
    model, tok = loaded
    ev = NemotronEvalModel(model, tok, batch_size=3)  # 4 requests: two batches, padded
    requests = [SimpleNamespace(args=("The cat sat on the", " mat")), ("Two plus two is", " four, not five"),
                ("", "hello"), ("Hello ", "world")]
    results = ev.loglikelihood(requests)
    bos = tok.bos_token_id
    ctx = tok("Hello")["input_ids"]
    # The harness's split: trailing spaces move to the continuation; an empty context is BOS.
    assert ev.encode_pair("Hello ", "world") == (ctx, tok("Hello world")["input_ids"][len(ctx):])
    assert ev.encode_pair("", "hello") == ([bos], tok("hello", add_special_tokens=False)["input_ids"])
    for req, (logprob, greedy) in zip(requests, results):
        context, continuation = getattr(req, "args", req)
        want, want_greedy = hand_loglikelihood(model, *ev.encode_pair(context, continuation))
        assert logprob == pytest.approx(want, rel=1e-5, abs=1e-5)
        assert greedy == want_greedy
    assert ev.loglikelihood([("abc", "")]) == [(0.0, True)]


def test_is_greedy_for_the_models_own_tokens(loaded):
    model, tok = loaded
    ev = NemotronEvalModel(model, tok)
    ctx = ev.tok_encode("Once upon a time")
    greedy = []
    with torch.no_grad():
        for _ in range(5):
            greedy.append(int(model(input_ids=torch.tensor([ctx + greedy])).logits[0, -1].argmax()))
    other = (greedy[-1] + 1) % model.config.vocab_size
    (lp_greedy, is_greedy), (lp_other, not_greedy) = ev.loglikelihood_tokens([(ctx, greedy), (ctx, greedy[:-1] + [other])])
    assert is_greedy and not not_greedy
    assert lp_greedy > lp_other
    assert lp_greedy == pytest.approx(hand_loglikelihood(model, ctx, greedy)[0], rel=1e-5)


def test_loglikelihood_rolling_equals_the_perplexity_sum(loaded):
    model, tok = loaded
    ev = NemotronEvalModel(model, tok)
    text = "the cat sat on the mat, and then the dog sat on the cat."
    ids = tok(text, add_special_tokens=False)["input_ids"]
    # The rolling document is conditioned on BOS: the perplexity of BOS + text (no EOS), summed.
    doc = [tok.bos_token_id] + ids
    report = perplexity(model, [Example(input_ids=doc, labels=doc)])
    (rolling,) = ev.loglikelihood_rolling([SimpleNamespace(args=(text,))])
    assert report["tokens"] == len(ids)
    assert -rolling == pytest.approx(report["loss"] * report["tokens"], rel=1e-6)
    assert ev.loglikelihood_rolling([("",)]) == [0.0]


def test_loglikelihood_rolling_windows(loaded):
    model, tok = loaded
    ev = NemotronEvalModel(model, tok, max_length=8)
    text = "the cat sat on the mat, and then the dog sat on the cat."
    ids = ev.tok_encode(text, add_special_tokens=False)
    windows = rolling_windows(ids, tok.bos_token_id, 8)
    assert len(ids) > 16 and len(windows) == math.ceil(len(ids) / 8)
    assert [t for _, cont in windows for t in cont] == ids  # every token predicted once
    assert all(len(ctx) + len(cont) - 1 == 8 for ctx, cont in windows[1:])  # full windows of context
    want = sum(hand_loglikelihood(model, ctx, cont)[0] for ctx, cont in windows)
    assert ev.loglikelihood_rolling([(text,)])[0] == pytest.approx(want, rel=1e-6)


def test_rolling_windows_match_lm_eval():
    utils = pytest.importorskip("lm_eval.utils")
    for n in range(0, 30):
        for max_len in (1, 2, 5, 8):
            tokens = list(range(100, 100 + n))
            want = [utils.make_disjoint_window(w) for w in utils.get_rolling_token_windows(tokens, 7, max_len, 1)]
            assert rolling_windows(tokens, 7, max_len) == [(list(a), list(b)) for a, b in want]


def test_generate_until_stops_at_until_strings(loaded):
    model, tok = loaded
    ev = NemotronEvalModel(model, tok, batch_size=2)
    prompt = "The cat sat on the"
    (full,) = ev.generate_until([(prompt, {"max_gen_toks": 24})])  # greedy by default
    # An ASCII stop string from the middle of the greedy text, at its first occurrence.
    start = next(i for i in range(len(full) // 3, len(full) - 1) if full[i:i + 2].isascii() and full[i:i + 2].strip())
    stop = full[start:start + 2]
    cut = full.find(stop)
    results = ev.generate_until([
        (prompt, {"until": [stop, "never appears \x00"], "max_gen_toks": 24}),
        SimpleNamespace(args=(prompt, {"until": stop, "max_gen_toks": 24, "do_sample": False})),
        ("Hello", {"until": [], "max_gen_toks": 3}),
    ])
    assert results[0] == results[1] == full[:cut]
    three = ev.generate_until([("Hello", {"max_gen_toks": 24})])[0]
    assert three.startswith(results[2]) and len(results[2]) < len(three)


def test_core_works_without_lm_eval(loaded, monkeypatch):
    import nemotron_core.evaluation as evaluation

    model, tok = loaded
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # `import lm_eval` now fails
    monkeypatch.setattr(evaluation, "_LM_CLASS", None)
    ev = NemotronEvalModel(model, tok)
    assert len(ev.loglikelihood([("a", " b")])) == 1
    with pytest.raises(ImportError, match=r"pip install 'nemotron\[eval\]'"):
        evaluation.register_lm_eval()
    with pytest.raises(ImportError):
        from nemotron_core.evaluation import NemotronLM  # noqa: F401


def test_importing_evaluation_does_not_import_lm_eval():
    code = "import sys, nemotron_core.evaluation; print('lm_eval' in sys.modules)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=cli_env(),
                          cwd=REPO_ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "False"


# ---- with lm_eval ----------------------------------------------------------------------------------------------
TASK_DATA = [
    {"question": "The cat sat on the", "choices": ["mat", "moon", "sky"], "label": 0},
    {"question": "Two plus two is", "choices": ["four", "five", "six"], "label": 0},
    {"question": "The sky is", "choices": ["green", "blue", "loud"], "label": 1},
    {"question": "Water is", "choices": ["dry", "wet"], "label": 1},
]


def write_tasks(root: Path) -> Path:
    """A multiple-choice and a rolling-perplexity task on local JSON Lines (no network)."""
    tasks = root / "tasks"
    tasks.mkdir()
    data = root / "mc.jsonl"
    data.write_text("\n".join(json.dumps(d) for d in TASK_DATA) + "\n")
    docs = root / "docs.jsonl"
    docs.write_text("\n".join(json.dumps({"page": f"the cat sat on mat number {i}."}) for i in range(3)) + "\n")
    cache = root / "hf-cache"
    (tasks / "tiny_mc.yaml").write_text(textwrap.dedent(f"""\
        task: tiny_mc
        dataset_path: json
        dataset_kwargs:
          data_files: {{test: "{data}"}}
          cache_dir: "{cache}"
        test_split: test
        output_type: multiple_choice
        doc_to_text: "{{{{question}}}}"
        doc_to_choice: "{{{{choices}}}}"
        doc_to_target: label
        metric_list:
          - metric: acc
            aggregation: mean
            higher_is_better: true
        """))
    (tasks / "tiny_ppl.yaml").write_text(textwrap.dedent(f"""\
        task: tiny_ppl
        dataset_path: json
        dataset_kwargs:
          data_files: {{test: "{docs}"}}
          cache_dir: "{cache}"
        test_split: test
        output_type: loglikelihood_rolling
        doc_to_text: ""
        doc_to_target: "{{{{page}}}}"
        should_decontaminate: false
        metric_list:
          - metric: word_perplexity
          - metric: byte_perplexity
          - metric: bits_per_byte
        """))
    return tasks


def test_nemotron_lm_is_a_registered_lm_eval_model(loaded):
    pytest.importorskip("lm_eval")
    from lm_eval.api.instance import Instance
    from lm_eval.api.model import LM
    from lm_eval.api.registry import get_model

    from nemotron_core.evaluation import NemotronLM, make_lm_eval_model

    model, tok = loaded
    lm = make_lm_eval_model(model=model, tokenizer=tok)
    assert isinstance(lm, LM) and isinstance(lm, NemotronLM) and get_model("nemotron") is NemotronLM
    reqs = [Instance("loglikelihood", {}, ("The sky is", " blue"), 0), Instance("loglikelihood", {}, ("", "hi"), 1)]
    assert lm.loglikelihood(reqs) == NemotronEvalModel(model, tok).loglikelihood(reqs)
    roll = [Instance("loglikelihood_rolling", {}, ("the cat sat",), 0)]
    assert lm.loglikelihood_rolling(roll) == NemotronEvalModel(model, tok).loglikelihood_rolling(roll)
    gen = [Instance("generate_until", {}, ("Hello", {"until": ["\n"], "max_gen_toks": 4}), 0)]
    assert lm.generate_until(gen) == NemotronEvalModel(model, tok).generate_until(gen)


def test_local_tasks_end_to_end(loaded, model_dir, tmp_path, fast_lm_eval):
    from nemotron_core.evaluation import make_lm_eval_model, run_lm_eval

    model, tok = loaded
    tasks = write_tasks(tmp_path)
    lm = make_lm_eval_model(model=model, tokenizer=tok)
    results = run_lm_eval(lm, "tiny_mc,tiny_ppl", include_path=tasks, bootstrap_iters=0)
    ev = NemotronEvalModel(model, tok)
    correct = []
    for doc in TASK_DATA:  # multiple_choice: context = question, continuation = " " + choice
        scores = [lp for lp, _ in ev.loglikelihood([(doc["question"], " " + c) for c in doc["choices"]])]
        correct.append(scores.index(max(scores)) == doc["label"])
    assert results["results"]["tiny_mc"]["acc,none"] == pytest.approx(sum(correct) / len(correct))
    pages = [f"the cat sat on mat number {i}." for i in range(3)]
    logprobs = ev.loglikelihood_rolling([(p,) for p in pages])
    words = sum(len(p.split()) for p in pages)
    assert results["results"]["tiny_ppl"]["word_perplexity,none"] == pytest.approx(math.exp(-sum(logprobs) / words),
                                                                                   rel=1e-6)
    # By name through lm_eval's registry, loading the directory itself; --limit.
    import lm_eval
    from lm_eval.tasks import TaskManager

    by_name = lm_eval.simple_evaluate(model="nemotron", model_args=f"pretrained={model_dir},dtype=float32",
                                      tasks=["tiny_mc"], limit=2, task_manager=TaskManager(include_path=str(tasks)),
                                      bootstrap_iters=0)
    assert by_name["n-samples"]["tiny_mc"]["effective"] == 2
    with pytest.raises(InputError, match="unknown task nope"):
        run_lm_eval(lm, ["nope"], include_path=tasks)
