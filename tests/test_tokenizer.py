"""Tests for nemotron_core.tokenizer: the offline byte-level BPE tokenizer of created models."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from nemotron_core.errors import ConfigError
from nemotron_core.tokenizer import (
    CHAT_TEMPLATE,
    MAX_MERGES,
    MIN_VOCAB_SIZE,
    SPECIAL_TOKENS,
    build_tokenizer,
    save_tokenizer,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
MODEL_VOCAB = 131072  # a realistic model vocab: far larger than the tokenizer, which is fine

MIXED_TEXT = (
    "Hello, world! The quick brown fox.\n"
    "Accents: café, naïve, Ångström, über, señor, œuvre\n"
    "Emoji: 😀 🚀 👩‍💻 🇫🇷 ❤️\n"
    "CJK: 你好，世界。日本語のテキスト。한국어 문장.\n"
    "\ttab\tseparated\tvalues\r\n"
    "  leading spaces, trailing spaces   \n"
    "def f(x: int) -> int:\n    return x ** 2  # square\n"
    'json = {"a": [1, 2.5e-3, null], "b": "\\u00e9"}\n'
    "Specials inline: <s> </s> <|im_start|> <think>why</think>\n"
    "\x00 control \x07 chars \u200b zero-width, and the end"
)


def _load(path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("tok")
    info = save_tokenizer(out, MODEL_VOCAB)
    return out, info


@pytest.fixture()
def tok(saved, monkeypatch):
    return _load(saved[0], monkeypatch)


def test_save_returns_generation_ids(saved, tok):
    out, info = saved
    assert info == {
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 0,
        "chat_eos_token_ids": [2, 4],
        "vocab_size": len(tok),
    }
    assert MIN_VOCAB_SIZE < info["vocab_size"] <= MIN_VOCAB_SIZE + MAX_MERGES
    assert (out / "tokenizer.json").is_file()
    assert (out / "tokenizer_config.json").is_file()
    # The chat template lives in tokenizer_config.json, not in a separate jinja file.
    assert not (out / "chat_template.jinja").exists()


def test_special_token_ids(tok):
    assert SPECIAL_TOKENS == [
        "<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"
    ]
    for i, token in enumerate(SPECIAL_TOKENS):
        assert tok.convert_tokens_to_ids(token) == i
        # Written in the text, each one is a single token, never split into bytes.
        assert tok(token, add_special_tokens=False).input_ids == [i]
    assert (tok.unk_token_id, tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (0, 1, 2, 0)


def test_byte_symbols_have_fixed_ids(tok):
    # Byte b has id 7 + b: "A" (0x41) and the ByteLevel space symbol "Ġ" (0x20).
    assert tok.convert_tokens_to_ids("A") == 7 + 0x41
    assert tok.convert_tokens_to_ids("Ġ") == 7 + 0x20
    assert tok("\x00", add_special_tokens=False).input_ids == [7]


def test_exact_round_trip(tok):
    ids = tok(MIXED_TEXT, add_special_tokens=False).input_ids
    assert tok.decode(ids) == MIXED_TEXT
    assert 0 not in ids  # byte-level BPE never needs <unk>
    # With the default bos, skipping special tokens gives the text back too.
    assert tok.decode(tok(MIXED_TEXT).input_ids, skip_special_tokens=True).endswith("the end")
    plain = "plain text only"
    assert tok.decode(tok(plain).input_ids, skip_special_tokens=True) == plain


def test_merges_compress_text(tok):
    text = "The model reads the tokens and predicts the next token."
    assert len(tok(text, add_special_tokens=False).input_ids) < len(text.encode("utf-8")) // 2


def test_bos_added_by_default_only(tok):
    assert tok("hi").input_ids[0] == 1
    assert tok("hi").input_ids.count(1) == 1
    assert 1 not in tok("hi", add_special_tokens=False).input_ids
    assert tok("hi").input_ids[1:] == tok("hi", add_special_tokens=False).input_ids
    assert tok("hi").input_ids[-1] != 2  # no eos appended to plain text


def test_think_tags_survive_skip_special_tokens(tok):
    ids = tok("<think>hmm</think>ok<|im_end|>").input_ids
    assert tok.decode(ids, skip_special_tokens=True) == "<think>hmm</think>ok"


def test_chat_template_string(tok):
    conversation = [
        {"role": "system", "content": "You are helpful."},
        {"role": "user", "content": "Hi there!"},
    ]
    text = tok.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
    assert text == (
        "<|im_start|>system\nYou are helpful.<|im_end|>\n"
        "<|im_start|>user\nHi there!<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert tok.chat_template == CHAT_TEMPLATE
    without_prompt = tok.apply_chat_template(conversation, tokenize=False)
    assert without_prompt == text[: -len("<|im_start|>assistant\n")]


def test_chat_template_tokenized_has_no_bos(tok):
    # Decision: the template emits no <s>; apply_chat_template encodes with
    # add_special_tokens=False, so the ids start with exactly one <|im_start|> (3) and contain
    # no bos at all.
    conversation = [
        {"role": "system", "content": "You are helpful."},
        {"role": "user", "content": "Hi there!"},
    ]
    out = tok.apply_chat_template(
        conversation, tokenize=True, add_generation_prompt=True, return_dict=True
    )
    ids = out["input_ids"]
    assert ids[0] == 3 and ids[1] != 3
    assert 1 not in ids
    text = tok.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
    assert ids == tok(text, add_special_tokens=False).input_ids
    # Encoding the rendered text the plain way adds one bos, never two.
    assert tok(text).input_ids == [1] + ids


def test_chat_template_assistant_mask_and_roles(tok):
    conversation = [
        {"role": "user", "content": "Q"},
        {"role": "assistant", "content": "A"},
    ]
    out = tok.apply_chat_template(conversation, return_dict=True, return_assistant_tokens_mask=True)
    ids, mask = out["input_ids"], out["assistant_masks"]
    trained = [i for i, m in zip(ids, mask) if m]
    assert tok.decode(trained) == "A<|im_end|>"
    with pytest.raises(Exception, match="Unsupported chat role"):
        tok.apply_chat_template([{"role": "robot", "content": "x"}], tokenize=False)


def test_small_vocab_sizes():
    assert len(build_tokenizer(MIN_VOCAB_SIZE)) == MIN_VOCAB_SIZE  # specials + bytes, no merges
    assert len(build_tokenizer(MIN_VOCAB_SIZE + 20)) == MIN_VOCAB_SIZE + 20
    tok = build_tokenizer(MIN_VOCAB_SIZE)
    assert tok.decode(tok(MIXED_TEXT, add_special_tokens=False).input_ids) == MIXED_TEXT


@pytest.mark.parametrize("bad", [0, 100, MIN_VOCAB_SIZE - 1, True, 300.0, "1000"])
def test_bad_vocab_size_raises(tmp_path, bad):
    out = tmp_path / "never"
    with pytest.raises(ConfigError) as excinfo:
        save_tokenizer(out, bad)
    assert "\n" not in str(excinfo.value)
    assert not out.exists()


def _digest_dir(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(path.iterdir())}


def test_deterministic(saved, tmp_path):
    first = _digest_dir(saved[0])
    again = tmp_path / "again"
    save_tokenizer(again, MODEL_VOCAB)
    assert _digest_dir(again) == first
    # A fresh process too: hash seeds and thread scheduling differ, the files must not.
    other = tmp_path / "other"
    code = (
        "from nemotron_core.tokenizer import save_tokenizer; "
        f"save_tokenizer({str(other)!r}, {MODEL_VOCAB})"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO_ROOT)}
    env["PYTHONHASHSEED"] = "random"
    subprocess.run([sys.executable, "-c", code], check=True, env=env, cwd=REPO_ROOT, timeout=120)
    assert _digest_dir(other) == first


def test_import_is_light():
    code = (
        "import sys, nemotron_core.tokenizer\n"
        "heavy = sorted(m for m in ('torch', 'transformers', 'tokenizers') if m in sys.modules)\n"
        "print(','.join(heavy))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO_ROOT,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == ""
