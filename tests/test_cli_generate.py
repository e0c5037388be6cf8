"""``nemotron generate`` end to end on a tiny model made by ``nemotron init``.

The main paths run the installed command in a subprocess; most option and error checks use Typer's
CliRunner in-process (the model loads in milliseconds once torch is imported). Subprocesses get
OMP_NUM_THREADS=1: tiny matrices, and a shared CPU makes OpenMP spin-waiting very slow.
"""
from __future__ import annotations

import json
import re
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from typer.testing import CliRunner

import tiny
from cli_helpers import interrupt_when, run_nemotron

JSON_KEYS = {"index", "prompt", "text", "prompt_tokens", "completion_tokens", "finish_reason", "timings"}
TIMING_KEYS = {"prefill_s", "decode_s", "tokens_per_s"}
FAST = {"OMP_NUM_THREADS": "1"}


def gen(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return run_nemotron("generate", *args, timeout=timeout, **FAST)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("gen") / "tiny"
    proc = run_nemotron("init", str(d), "--quiet", **FAST)
    assert proc.returncode == 0, proc.stderr
    return d


@pytest.fixture(scope="module")
def runner():
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield CliRunner()
    torch.set_num_threads(before)


def invoke(runner: CliRunner, *args: str, input: str | None = None):
    from nemotron_cli.app import app

    return runner.invoke(app, ["generate", *args], input=input)


def json_lines(stdout: str) -> list[dict]:
    return [json.loads(line) for line in stdout.splitlines()]


def tweaked_copy(model_dir: Path, dest: Path, file: str = "config.json", **fields) -> Path:
    """A copy of the model directory with ``fields`` set in one of its JSON files."""
    shutil.copytree(model_dir, dest)
    cfg = json.loads((dest / file).read_text())
    cfg.update(fields)
    (dest / file).write_text(json.dumps(cfg))
    return dest


def assert_timings(row: dict) -> None:
    """``tokens_per_s`` is completion_tokens / decode_s, up to the JSON's rounding (decode_s to 6 decimals,
    tokens_per_s to 3: half a unit of each, plus a hair for float error)."""
    t = row["timings"]
    assert set(t) == TIMING_KEYS and t["prefill_s"] > 0 and t["decode_s"] > 0, t
    n, d = row["completion_tokens"], t["decode_s"]
    assert n / (d + 5.1e-7) - 5.1e-4 <= t["tokens_per_s"] <= n / (d - 5.1e-7) + 5.1e-4, row


def assert_one_error_line(stderr: str, contains: str = "") -> None:
    lines = stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    assert "Traceback" not in stderr
    assert contains.lower() in lines[0].lower(), lines[0]


# ---- end to end (subprocess) ------------------------------------------------------------------------------------
def test_prompt_prints_text_and_speeds(model_dir):
    proc = gen(str(model_dir), "--prompt", "Hello", "--max-new-tokens", "8", "--greedy")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() and proc.stdout.endswith("\n")
    assert "Traceback" not in proc.stderr
    assert "prefill:" in proc.stderr and "decode:" in proc.stderr and "tok/s" in proc.stderr
    assert "peak memory" in proc.stderr


def test_json_prompt_file_round_trip(model_dir, tmp_path):
    """3 prompts (one a chat `messages` record) in two batches -> JSON Lines in input order;
    the same seed gives the same output twice."""
    records = [
        {"prompt": "Hello"},
        {"messages": [{"role": "user", "content": "What is a hybrid model?"}]},
        {"prompt": "Once upon a time"},
    ]
    pfile = tmp_path / "prompts.jsonl"
    pfile.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    args = (str(model_dir), "--prompt-file", str(pfile), "--json", "--seed", "3", "--max-new-tokens", "6",
            "--batch-size", "2", "--top-k", "50")
    first = gen(*args)
    assert first.returncode == 0, first.stderr
    assert first.stderr == ""  # --json: nothing for humans
    rows = json_lines(first.stdout)
    assert [r["index"] for r in rows] == [0, 1, 2]
    for row, rec in zip(rows, records):
        assert set(row) == JSON_KEYS
        assert_timings(row)
        assert row["prompt"] == rec.get("prompt", rec.get("messages"))
        assert isinstance(row["text"], str)
        assert 1 <= row["completion_tokens"] <= 6
        # Fewer tokens than asked only through an EOS (an EOS as 6th token would also be "eos": this seed draws none).
        assert row["finish_reason"] == ("eos" if row["completion_tokens"] < 6 else "length")
        assert row["prompt_tokens"] > 0
    assert rows[0]["timings"] == rows[1]["timings"]  # the timings of the batch a row ran in
    # The chat record went through the template: <|im_start|>user\n...<|im_end|>\n<|im_start|>assistant\n
    assert rows[1]["prompt_tokens"] > rows[0]["prompt_tokens"]

    second = gen(*args)
    assert second.returncode == 0, second.stderr
    strip = lambda rs: [{k: v for k, v in r.items() if k != "timings"} for r in rs]  # noqa: E731
    assert strip(json_lines(second.stdout)) == strip(rows)


def test_sigint_keeps_text_and_exits_130(model_dir, tmp_path):
    # A copy with a very long position limit, so the run cannot finish before the interrupt.
    long_dir = tweaked_copy(model_dir, tmp_path / "long", max_position_embeddings=200_000)
    code, first, rest, err = interrupt_when(
        ["generate", str(long_dir), "--prompt", "Once upon a time", "--max-new-tokens", "100000", "--greedy"],
        ready=bool, deadline_s=90, settle_s=0.3, **FAST)  # the first streamed text
    stdout = (first + rest).decode("utf-8", errors="replace")
    stderr = err.decode("utf-8", errors="replace")
    assert code == 130, stderr
    assert stdout.startswith(first.decode("utf-8", errors="replace").rstrip("\ufffd"))
    assert len(stdout.strip()) >= len(first.strip()) > 0
    assert stdout.endswith("\n")
    assert "interrupted" in stderr and "Traceback" not in stderr


def test_sigint_in_json_mode_prints_the_batch_so_far(model_dir, runner, tmp_path):
    """Ctrl-C while the second of four one-prompt batches decodes: the finished row, the interrupted row with
    what it had, no later batches, exit code 130."""
    from transformers import AutoTokenizer

    # --max-new-tokens is capped per batch to the model's limit: a limit 8 tokens past the long first prompt
    # makes its batch short, while the short prompts after it may run for thousands of tokens, however fast
    # the machine. The interrupt comes 0.2 s after the first row, in the second batch's decoding.
    long_prompt = "word " * 1000
    limit = len(AutoTokenizer.from_pretrained(str(model_dir))(long_prompt)["input_ids"]) + 8
    capped = tweaked_copy(model_dir, tmp_path / "capped", max_position_embeddings=limit)
    pfile = tmp_path / "prompts.txt"
    pfile.write_text(f"{long_prompt}\nOnce upon a time\nThe capital of France\nx y\n")
    code, first, rest, err = interrupt_when(
        ["generate", str(capped), "-f", str(pfile), "-b", "1", "--json", "--greedy", "-n", "5000"],
        ready=lambda out: b"\n" in out, settle_s=0.2, **FAST)
    assert code == 130, err
    assert err.decode().splitlines()[-1] == "interrupted" and b"Traceback" not in err
    rows = json_lines((first + rest).decode())
    assert [r["index"] for r in rows] == [0, 1]  # the batches after the interrupted one never ran
    assert rows[0]["finish_reason"] == "length" and rows[0]["completion_tokens"] == 8
    assert rows[1]["finish_reason"] == "interrupted"
    assert 0 < rows[1]["completion_tokens"] < limit - rows[1]["prompt_tokens"]
    assert_timings(rows[1])
    # "what was generated so far": greedy decoding asked for exactly that many tokens gives the same text
    alone = invoke(runner, str(capped), "--prompt", "Once upon a time", "--greedy", "--json",
                   "-n", str(rows[1]["completion_tokens"]))
    assert json_lines(alone.stdout)[0]["text"] == rows[1]["text"]


# ---- options (in-process) -----------------------------------------------------------------------------------------
def test_help_documents_json_and_examples():
    proc = run_nemotron("generate", "--help")
    assert proc.returncode == 0
    for word in ("--prompt-file", "--stop", "finish_reason", "tokens_per_s", "Example"):
        assert word in proc.stdout
    assert "generate" in run_nemotron("--help").stdout


def test_chat_and_system(model_dir, runner):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    base = (str(model_dir), "--prompt", "Hi", "--greedy", "-n", "4", "--json")
    plain = json_lines(invoke(runner, *base).stdout)[0]
    chat = invoke(runner, *base, "--chat")
    system = invoke(runner, *base, "--chat", "--system", "Be brief.")
    implied = invoke(runner, *base, "--system", "Be brief.")
    assert chat.exit_code == system.exit_code == implied.exit_code == 0, system.stderr
    chat, system, implied = (json_lines(r.stdout)[0] for r in (chat, system, implied))

    def n(messages):
        return len(tok(tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False),
                       add_special_tokens=False)["input_ids"])

    assert plain["prompt_tokens"] == len(tok("Hi")["input_ids"])
    assert chat["prompt_tokens"] == n([{"role": "user", "content": "Hi"}])
    assert system["prompt_tokens"] == n([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}])
    assert implied == {**system, "timings": implied["timings"]}


def test_stop_string_cuts_text(model_dir, runner):
    prompt = (str(model_dir), "--prompt", "The capital of France", "--greedy")
    base = (*prompt, "-n", "24")
    full = json_lines(invoke(runner, *base, "--json").stdout)[0]
    text = full["text"]
    stop = next(text[i:i + 2] for i in range(len(text) // 3, len(text) - 2)
                if text[i:i + 2].strip() and "\ufffd" not in text[i:i + 2])
    want = text[:text.find(stop)]

    cut = invoke(runner, *base, "--json", "--stop", stop, "--stop", "no such text")
    assert cut.exit_code == 0, cut.stderr
    row = json_lines(cut.stdout)[0]
    assert row["text"] == want
    assert row["finish_reason"] == "stop"
    assert row["completion_tokens"] < full["completion_tokens"]
    # completion_tokens runs through the token that completed the stop string. Greedy decoding with -n k
    # gives the first k tokens of the full run: the text of one token fewer must not hold the stop string yet.
    upto = lambda k: json_lines(invoke(runner, *prompt, "-n", str(k), "--json").stdout)[0]["text"]  # noqa: E731
    assert stop not in upto(row["completion_tokens"] - 1)
    assert stop in upto(row["completion_tokens"])

    streamed = invoke(runner, *base, "--quiet", "--stop", stop)  # one prompt, human mode: streamed
    assert streamed.exit_code == 0, streamed.stderr
    assert streamed.stdout == want + ("" if want.endswith("\n") else "\n")


def greedy_ids(model_dir: Path, prompt: str, n: int) -> list[int]:
    """Token ids of a greedy run without EOS ids (--json shows only the text): the core decode loop."""
    import torch
    from transformers import AutoTokenizer

    from nemotron_core.generation import SamplingConfig, generate
    from nemotron_core.modeling.model import NemotronHForCausalLM

    lm = NemotronHForCausalLM.from_pretrained(model_dir, dtype=torch.float32, device=torch.device("cpu"))
    ids = AutoTokenizer.from_pretrained(str(model_dir))(prompt)["input_ids"]
    return generate(lm, [ids], SamplingConfig(max_new_tokens=n, do_sample=False)).sequences[0]


@pytest.mark.parametrize("form", ["int", "list"])
def test_eos_from_generation_config(model_dir, runner, tmp_path, form):
    """generation_config.json's eos_token_id (an int or a list) ends a row at its first EOS: finish_reason
    "eos", the EOS counted in completion_tokens, the text that of the tokens before it."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    args = ("--prompt", "Hello", "--greedy", "--json")
    full = json_lines(invoke(runner, str(model_dir), *args, "-n", "16").stdout)[0]
    ids = greedy_ids(model_dir, "Hello", 16)
    assert full["finish_reason"] == "length" and tok.decode(ids, skip_special_tokens=True) == full["text"]
    # Positions > 0 holding a token's first occurrence (an earlier copy of the token would end the row there).
    firsts = [i for i in range(1, len(ids)) if ids[i] not in ids[:i]]
    at, later = firsts[len(firsts) // 3], firsts[-1]
    eos = ids[at] if form == "int" else [ids[later], ids[at]]  # a list: any of its ids ends the row
    copy = tweaked_copy(model_dir, tmp_path / "eos", "generation_config.json", eos_token_id=eos)

    r = invoke(runner, str(copy), *args, "-n", "16")
    assert r.exit_code == 0, r.stderr
    row = json_lines(r.stdout)[0]
    assert row["finish_reason"] == "eos"
    assert row["completion_tokens"] == at + 1  # the EOS counts
    before = json_lines(invoke(runner, str(model_dir), *args, "-n", str(at)).stdout)[0]  # the tokens before it
    assert row["text"] == before["text"]
    assert_timings(row)


def test_batches_match_single_prompts(model_dir, runner, tmp_path):
    """Greedy rows of left-padded batches (3, then 2 prompts of different lengths) are each prompt's output
    alone, in input order."""
    prompts = ["Hi", "Once upon a time there was", "The capital of France is", "x y", "Hello"]
    pfile = tmp_path / "prompts.txt"
    pfile.write_text("\n".join(prompts) + "\n")
    base = ("--greedy", "-n", "8", "--json")
    r = invoke(runner, str(model_dir), "-f", str(pfile), "-b", "3", *base)
    assert r.exit_code == 0, r.stderr
    rows = json_lines(r.stdout)
    alone = [json_lines(invoke(runner, str(model_dir), "--prompt", p, *base).stdout)[0] for p in prompts]
    assert len({a["prompt_tokens"] for a in alone[:3]}) == 3  # the first batch is padded
    assert len({a["text"] for a in alone}) == len(prompts)  # so a row in the wrong place shows
    strip = lambda row: {k: v for k, v in row.items() if k not in ("index", "timings")}  # noqa: E731
    assert [row["index"] for row in rows] == list(range(len(prompts)))
    assert [strip(row) for row in rows] == [strip(a) for a in alone]


@pytest.mark.parametrize("fields", [{"temperature": 0}, {"top_k": 1}], ids=["temperature_0", "top_k_1"])
def test_sampling_defaults_from_generation_config(model_dir, runner, tmp_path, fields):
    """An option left out takes generation_config.json's value: temperature 0 is greedy, and so is sampling
    among the top 1 token. An option given wins over the file."""
    copy = tweaked_copy(model_dir, tmp_path / "cfg", "generation_config.json", **fields)
    base = ("--prompt", "Hello", "-n", "16", "--json", "--seed", "0")
    greedy = json_lines(invoke(runner, str(model_dir), *base, "--greedy").stdout)[0]
    r = invoke(runner, str(copy), *base)
    assert r.exit_code == 0, r.stderr
    row = json_lines(r.stdout)[0]
    assert row == {**greedy, "timings": row["timings"]}
    sampled = json_lines(invoke(runner, str(copy), *base, "--temperature", "1", "--top-k", "0").stdout)[0]
    assert sampled["text"] != greedy["text"]


def test_max_new_tokens_capped_at_the_model_limit(model_dir, runner, tmp_path):
    short = tweaked_copy(model_dir, tmp_path / "short", max_position_embeddings=16)
    args = (str(short), "--prompt", "Hello", "--greedy", "--json")
    r = invoke(runner, *args, "-n", "100")
    assert r.exit_code == 0, r.stderr
    row = json_lines(r.stdout)[0]
    room = 16 - row["prompt_tokens"]
    assert r.stderr == f"warning: --max-new-tokens 100 capped at {room}: the model's limit is 16 positions\n"
    assert row["completion_tokens"] == room and row["finish_reason"] == "length"
    exact = invoke(runner, *args, "-n", str(room))  # fits: no warning, the same completion
    assert exact.exit_code == 0 and exact.stderr == ""
    assert json_lines(exact.stdout)[0]["text"] == row["text"]


def test_do_sample_false_in_generation_config_means_greedy(model_dir, runner, tmp_path):
    """As in transformers' generate: the file's do_sample false is greedy decoding (whatever temperature it
    also sets, and without its warning about that on stderr), unless a sampling option is given."""
    copy = tweaked_copy(model_dir, tmp_path / "cfg", "generation_config.json", do_sample=False, temperature=0.7)
    base = ("--prompt", "Hello", "-n", "16", "--json", "--seed", "0")
    greedy = json_lines(invoke(runner, str(model_dir), *base, "--greedy").stdout)[0]
    r = invoke(runner, str(copy), *base)
    assert r.exit_code == 0 and r.stderr == "", r.stderr
    assert json_lines(r.stdout)[0]["text"] == greedy["text"]
    sampled = json_lines(invoke(runner, str(copy), *base, "--temperature", "1").stdout)[0]
    assert sampled["text"] != greedy["text"]


@pytest.mark.parametrize("mode", [[], ["--greedy"]], ids=["sampled", "greedy"])
def test_non_finite_weights_are_named(model_dir, runner, tmp_path, mode):
    """NaN logits are an error (exit 1) whether sampled or greedy (argmax of NaN would give arbitrary
    tokens without a word)."""
    broken = tiny.nan_lm_head_copy(model_dir, tmp_path / "nan")
    r = invoke(runner, str(broken), "--prompt", "Hello", "-n", "4", "--seed", "0", *mode)
    assert r.exit_code == 1 and r.stdout == ""
    assert r.stderr.splitlines()[-1] == f"error: {broken}: the model's logits after the prompt are NaN or inf; " \
                                        "are its weights finite?"


@pytest.mark.parametrize("mode", [[], ["--greedy"]], ids=["sampled", "greedy"])
def test_logits_that_break_while_decoding_are_named(model_dir, runner, tmp_path, mode):
    """Weights that give finite logits for the prompt and NaN once a generated token is fed back (every
    input embedding NaN but the prompt's and the special tokens'): exit 1 with one line naming the model
    and when it broke, not arbitrary tokens (greedy) or a traceback (sampled)."""
    from nemotron_core.tokenizer import load_tokenizer

    tok = load_tokenizer(model_dir)
    keep = sorted(set(tok("Hello")["input_ids"]) | {i for i in (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id)
                                                    if i is not None})
    broken = tiny.nan_embeddings_copy(model_dir, tmp_path / "nan", keep)
    r = invoke(runner, str(broken), "--prompt", "Hello", "-n", "8", "--seed", "0", "--json", *mode)
    assert r.exit_code == 1 and r.stdout == "", r.stderr
    assert re.fullmatch(rf"error: {re.escape(str(broken))}: the model's logits became NaN or inf after \d+ generated "
                        r"tokens?; are its weights finite\?", r.stderr.splitlines()[-1]), r.stderr


def test_logits_that_break_in_a_batch_name_the_prompt(model_dir, runner, monkeypatch):
    """With several prompts, logits that break while decoding name the prompt by its place in the input (as
    --json's "index"), not by its row in the batch; the batches before it are written."""
    from nemotron_core import generation

    real = generation.generate
    calls = []

    def second_batch_breaks(model, prompts, cfg, **kwargs):
        calls.append(len(prompts))
        if len(calls) == 2:
            raise generation.NonFiniteLogitsError("broken", row=1, after=3)
        return real(model, prompts, cfg, **kwargs)

    monkeypatch.setattr(generation, "generate", second_batch_breaks)
    jsonl = "".join(json.dumps({"prompt": p}) + "\n" for p in "abcd")
    r = invoke(runner, str(model_dir), "--greedy", "-n", "4", "--json", "--batch-size", "2", input=jsonl)
    assert r.exit_code == 1 and calls == [2, 2]
    assert [row["index"] for row in json_lines(r.stdout)] == [0, 1]
    assert r.stderr.splitlines()[-1] == (f"error: {model_dir}: the model's logits became NaN or inf after 3 generated "
                                         "tokens (prompt 3); are its weights finite?")


def test_huge_max_new_tokens_sizes_the_cache_for_the_cap(model_dir, runner, tmp_path):
    """-n far beyond the model's limit is capped, and so is the cache: sized for the asked number it would
    need terabytes (this failed to allocate before the fix)."""
    short = tweaked_copy(model_dir, tmp_path / "short", max_position_embeddings=48)
    r = invoke(runner, str(short), "--prompt", "Hello", "--greedy", "--json", "-n", str(10**11))
    assert r.exit_code == 0, r.stderr
    row = json_lines(r.stdout)[0]
    assert row["completion_tokens"] == 48 - row["prompt_tokens"] and row["finish_reason"] == "length"


def test_stdin_prompt_and_several_prompts(model_dir, runner, tmp_path):
    one = invoke(runner, str(model_dir), "--greedy", "-n", "4", "--json", input="Hello\n")
    assert one.exit_code == 0, one.stderr
    assert json_lines(one.stdout)[0]["prompt"] == "Hello"

    jsonl = '{"prompt": "a"}\n\n{"messages": [{"role": "user", "content": "b"}]}\n'
    two = invoke(runner, str(model_dir), "--greedy", "-n", "4", "--json", input=jsonl)
    assert two.exit_code == 0, two.stderr
    assert [r["index"] for r in json_lines(two.stdout)] == [0, 1]

    pfile = tmp_path / "prompts.txt"
    pfile.write_text("first prompt\n\nsecond prompt\n")
    human = invoke(runner, str(model_dir), "-f", str(pfile), "--greedy", "-n", "4")
    assert human.exit_code == 0, human.stderr
    assert "[1/2] first prompt" in human.stderr and "[2/2] second prompt" in human.stderr
    assert "tok/s" in human.stderr
    assert human.stdout.count("\n") >= 2


# ---- bad input: exit 2, one `error:` line ------------------------------------------------------------------------
def _write(tmp_path: Path, name: str, text: str | bytes, mode: int | None = None) -> str:
    p = tmp_path / name
    if isinstance(text, bytes):
        p.write_bytes(text)
    else:
        p.write_text(text)
    if mode is not None:
        p.chmod(mode)
    return str(p)


@pytest.mark.parametrize("case", ["empty", "top_p_0", "top_p_big", "temperature", "missing_file", "bad_json",
                                  "no_prompt_key", "both", "device", "not_utf8", "directory", "unreadable",
                                  "temperature_nan", "temperature_inf", "penalty_inf", "seed_big", "seed_negative",
                                  "prompt_and_messages"])
def test_bad_input_before_loading(model_dir, tmp_path, case):
    """Checked before torch is imported, so the real command answers fast."""
    args, needle = {
        "empty": (["--prompt", "   "], "empty"),
        "top_p_0": (["--prompt", "x", "--top-p", "0"], "--top-p"),
        "top_p_big": (["--prompt", "x", "--top-p", "1.5"], "--top-p"),
        "temperature": (["--prompt", "x", "--temperature", "-1"], "--temperature"),
        "missing_file": (["--prompt-file", str(tmp_path / "nope.txt")], "nope.txt"),
        "bad_json": (["--prompt-file", _write(tmp_path, "p.jsonl", '{"prompt": "ok"}\n{"prompt": oops}\n')],
                     "line 2"),
        "no_prompt_key": (["--prompt-file", _write(tmp_path, "q.jsonl", '{"text": "hi"}\n')], "line 1"),
        "both": (["--prompt", "x", "--prompt-file", _write(tmp_path, "p.txt", "x\n")], "--prompt-file"),
        "device": (["--prompt", "x", "--device", "tpu"], "--device"),
        "not_utf8": (["--prompt-file", _write(tmp_path, "latin.txt", b"\xff\xfe\xfa")], "not UTF-8"),
        "directory": (["--prompt-file", str(tmp_path)], "is a directory"),
        "unreadable": (["--prompt-file", _write(tmp_path, "secret.txt", "x\n", mode=0)], "not readable"),
        "temperature_nan": (["--prompt", "x", "--temperature", "nan"], "--temperature"),
        "temperature_inf": (["--prompt", "x", "--temperature", "inf"], "--temperature"),
        "penalty_inf": (["--prompt", "x", "--repetition-penalty", "inf"], "--repetition-penalty"),
        "seed_big": (["--prompt", "x", "--seed", str(2**64)], "--seed"),
        "seed_negative": (["--prompt", "x", "--seed", "-3"], "--seed"),
        "prompt_and_messages": (["--prompt-file", _write(tmp_path, "pm.jsonl", '{"prompt": "a", "messages": '
                                                  '[{"role": "user", "content": "b"}]}\n')], "line 1"),
    }[case]
    if case == "unreadable" and os.access(args[1], os.R_OK):
        pytest.skip("this user can read a mode-000 file (root)")
    proc = gen(str(model_dir), *args, timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert proc.stdout == ""
    assert_one_error_line(proc.stderr, needle)


def test_bad_input_after_loading(model_dir, runner, tmp_path):
    # model directory missing / not a model
    r = invoke(runner, str(tmp_path / "no-model"), "--prompt", "x")
    assert r.exit_code == 2
    assert_one_error_line(r.stderr, "no such model directory")
    (tmp_path / "empty").mkdir()
    r = invoke(runner, str(tmp_path / "empty"), "--prompt", "x")
    assert r.exit_code == 2
    assert_one_error_line(r.stderr, "config.json")

    # prompt longer than the model's limit
    short = tweaked_copy(model_dir, tmp_path / "short", max_position_embeddings=16)
    r = invoke(runner, str(short), "--prompt", "word " * 40)
    assert r.exit_code == 2 and r.stdout == ""
    assert_one_error_line(r.stderr, "limit is 16")

    # generation_config.json with values that cannot be used: the file is named
    for fields, needle in (({"temperature": "hot"}, "temperature must be a number"),
                           ({"temperature": -1}, "generation_config.json sets temperature"),
                           ({"eos_token_id": [2, 10**6]}, "eos_token_id 1000000 is outside the vocabulary")):
        bad = tweaked_copy(model_dir, tmp_path / f"gc{len(list(tmp_path.iterdir()))}", "generation_config.json", **fields)
        r = invoke(runner, str(bad), "--prompt", "x", "-n", "2")
        assert r.exit_code == 2 and r.stdout == ""
        assert_one_error_line(r.stderr, needle)
        assert "generation_config.json" in r.stderr

    # no tokenizer
    no_tok = tmp_path / "no-tok"
    shutil.copytree(model_dir, no_tok)
    (no_tok / "tokenizer.json").unlink()
    r = invoke(runner, str(no_tok), "--prompt", "x")
    assert r.exit_code == 2
    assert_one_error_line(r.stderr, "tokenizer.json is missing")

    # empty prompt on stdin, bad chat role in a messages record
    r = invoke(runner, str(model_dir), input="  \n")
    assert r.exit_code == 2
    assert_one_error_line(r.stderr, "empty")
    r = invoke(runner, str(model_dir), "--quiet", input='{"messages": [{"role": "robot", "content": "hi"}]}\n')
    assert r.exit_code == 2
    assert_one_error_line(r.stderr, "stdin line 1")


# ---- streaming helpers ----------------------------------------------------------------------------------------------
def test_incremental_decoding_keeps_multibyte_characters_whole(model_dir):
    from transformers import AutoTokenizer

    from nemotron_cli.commands.generate import RowText

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    text = "Grüße, 日本語 and €100 🙂 done"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert len(ids) > len(text.split())  # multi-byte characters span several byte tokens
    row = RowText(tok, eos_ids={2, 4})
    seen = []
    for t in ids:
        row.add([t])
        assert "\ufffd" not in row.text
        assert text.startswith(row.text)
        seen.append(row.text)
    assert row.text == text
    assert len(set(seen)) < len(seen)  # some steps held a partial character back
    row.add([2, 50, 60])  # EOS ends the row; what follows is padding
    assert row.finished and row.text == text


def test_stop_helpers():
    from nemotron_cli.commands.generate import _held_back, find_stop

    assert find_stop("abc\n\nxyz END", ["END", "\n\n"]) == 3
    assert find_stop("abc", ["x"]) == -1
    assert _held_back("hello wor", ["world"]) == 3  # "wor" may become "world": not printed yet
    assert _held_back("hello", ["world", "lo!"]) == 2
    assert _held_back("hello", ["xyz"]) == 0
