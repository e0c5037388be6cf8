"""Tests for nemotron_core.data: JSONL fine-tuning datasets, loss masks and batches."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

from nemotron_core.data import Example, count_trained_tokens, load_examples, make_batches
from nemotron_core.errors import InputError
from nemotron_core.tokenizer import CHAT_TEMPLATE, build_tokenizer

CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "Paris."},
    {"role": "user", "content": "And of Italy?"},
    {"role": "assistant", "content": "Rome, of course."},
]
GOOD = [
    {"text": "The quick brown fox."},
    {"prompt": "Question: How many days are there in a week?\nAnswer:", "completion": " Seven."},
    {"messages": CHAT},
]


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer(1024)


@pytest.fixture(scope="module")
def tok_no_markers(tok):
    """The same tokenizer with the {% generation %} markers taken out of its chat template."""
    plain = copy.deepcopy(tok)
    plain.chat_template = CHAT_TEMPLATE.replace("{%- generation -%}", "").replace("{%- endgeneration -%}", "")
    mask = plain.apply_chat_template(CHAT, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    assert not any(mask["assistant_masks"])  # so the prefix fallback is what runs
    return plain


def with_template(tok, template: str):
    out = copy.deepcopy(tok)
    out.chat_template = template
    return out


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records), encoding="utf-8")
    return path


def trained_text(tok, ex: Example) -> str:
    return tok.decode([t for t, label in zip(ex.input_ids, ex.labels) if label != -100])


def load_one(tok, tmp_path: Path, record, max_length: int = 512, **kw) -> Example:
    (ex,) = load_examples(write_jsonl(tmp_path / "one.jsonl", [record]), tok, max_length, **kw)
    return ex


# ---- masking ----------------------------------------------------------------------------------


def test_text_trains_on_everything(tok, tmp_path):
    ex = load_one(tok, tmp_path, {"text": "The quick brown fox."})
    assert ex.labels == ex.input_ids
    assert ex.input_ids[0] == tok.bos_token_id and ex.input_ids[-1] == tok.eos_token_id
    assert trained_text(tok, ex) == "<s>The quick brown fox.</s>"


def test_prompt_completion_trains_on_completion_and_eos(tok, tmp_path):
    prompt, completion = GOOD[1]["prompt"], GOOD[1]["completion"]
    ex = load_one(tok, tmp_path, GOOD[1])
    assert tok.decode(ex.input_ids) == "<s>" + prompt + completion + "</s>"
    assert trained_text(tok, ex) == completion + "</s>"
    n_prompt = len(tok(prompt)["input_ids"])
    assert ex.labels[:n_prompt] == [-100] * n_prompt
    assert ex.labels[n_prompt:] == ex.input_ids[n_prompt:]


def test_messages_train_on_assistant_replies(tok, tmp_path):
    ex = load_one(tok, tmp_path, {"messages": CHAT, "id": 7})  # unknown keys are ignored
    assert ex.input_ids == list(tok.apply_chat_template(CHAT, tokenize=True, return_dict=True)["input_ids"])
    assert trained_text(tok, ex) == "Paris.<|im_end|>Rome, of course.<|im_end|>"
    # Exactly two contiguous trained spans, each ending on <|im_end|>.
    trained = [label != -100 for label in ex.labels]
    starts = [i for i in range(len(trained)) if trained[i] and (i == 0 or not trained[i - 1])]
    assert len(starts) == 2
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    ends = [i for i in range(len(trained)) if trained[i] and (i + 1 == len(trained) or not trained[i + 1])]
    assert [ex.input_ids[i] for i in ends] == [im_end, im_end]


@pytest.mark.parametrize(
    "messages",
    [
        CHAT,
        CHAT[1:3],  # one turn, no system prompt
        [{"role": "assistant", "content": "I speak first."}, {"role": "user", "content": "ok"}],
    ],
    ids=["two-turns", "one-turn", "assistant-first"],
)
def test_prefix_fallback_matches_generation_markers(tok, tok_no_markers, tmp_path, messages):
    marked = load_one(tok, tmp_path, {"messages": messages})
    fallback = load_one(tok_no_markers, tmp_path, {"messages": messages})
    assert fallback == marked


def test_markers_that_mark_nothing_fall_back_to_prefix(tok, tok_no_markers, tmp_path):
    dead = "{%- if false -%}{%- generation -%}{%- endgeneration -%}{%- endif -%}"
    odd = with_template(tok, tok_no_markers.chat_template + dead)
    assert load_one(odd, tmp_path, {"messages": CHAT}) == load_one(tok, tmp_path, {"messages": CHAT})


def test_prefix_fallback_refuses_inconsistent_templates(tok_no_markers, tmp_path):
    # A trailer only on complete conversations: the first reply's rendering is not a prefix of the whole.
    trailer = "{%- if not add_generation_prompt -%}END{%- endif -%}"
    odd = with_template(tok_no_markers, tok_no_markers.chat_template + trailer)
    path = write_jsonl(tmp_path / "odd.jsonl", [{"text": "fine"}, {"messages": CHAT}])
    with pytest.raises(InputError, match=rf"^{path}:2: the chat template does not render .* add {{% generation %}}"):
        load_examples(path, odd, 512)


def test_mixed_formats_and_blank_lines(tok, tmp_path):
    path = write_jsonl(tmp_path / "mixed.jsonl", [GOOD[0], "", "   ", GOOD[1], GOOD[2]])
    examples = load_examples(path, tok, 512)
    assert [trained_text(tok, ex) for ex in examples] == [
        "<s>The quick brown fox.</s>",
        " Seven.</s>",
        "Paris.<|im_end|>Rome, of course.<|im_end|>",
    ]


def test_truncation_keeps_the_start(tok, tmp_path):
    full = load_one(tok, tmp_path, {"text": "The quick brown fox jumps over the lazy dog."})
    cut = load_one(tok, tmp_path, {"text": "The quick brown fox jumps over the lazy dog."}, max_length=5)
    assert cut.input_ids == full.input_ids[:5] and cut.labels == full.labels[:5]
    same = load_one(tok, tmp_path, {"text": "The quick"}, max_length=len(tok("The quick")["input_ids"]) + 1)
    assert same.input_ids[-1] == tok.eos_token_id  # exactly max_length: nothing cut


def test_too_long_without_truncation_names_the_line(tok, tmp_path):
    path = write_jsonl(tmp_path / "long.jsonl", [{"text": "a"}, {"text": "The quick brown fox jumps."}])
    with pytest.raises(InputError, match=rf"^{path}:2: example has \d+ tokens, more than max_length=5$"):
        load_examples(path, tok, 5, truncate=False)


def test_truncation_that_leaves_no_trained_token(tok, tmp_path):
    path = write_jsonl(tmp_path / "cut.jsonl", [GOOD[0], GOOD[1]])
    with pytest.raises(InputError, match=rf"^{path}:2: example has no trained token after truncation"):
        load_examples(path, tok, 6)


# ---- errors -----------------------------------------------------------------------------------

BAD_RECORDS = {
    "malformed-json": ('{"text": "unterminated', "malformed JSON"),
    "not-an-object": ('["text", "a list"]', "expected a JSON object, got an array"),
    "no-known-keys": ({"txt": "typo"}, '"text", "prompt" + "completion", or "messages"'),
    "text-not-string": ({"text": 5}, '"text" must be a string, got a number'),
    "empty-text": ({"text": ""}, '"text" is empty'),
    "prompt-without-completion": ({"prompt": "hi"}, '"completion" is missing'),
    "completion-not-string": ({"prompt": "hi", "completion": None}, '"completion" must be a string, got null'),
    "messages-not-list": ({"messages": "hi"}, '"messages" must be a list, got a string'),
    "messages-empty": ({"messages": []}, '"messages" is empty'),
    "message-not-object": ({"messages": ["hi"]}, "messages[0] must be an object"),
    "message-without-role": ({"messages": [{"content": "hi"}]}, 'messages[0] has no "role"'),
    "message-without-content": ({"messages": [{"role": "user"}]}, 'messages[0] has no "content"'),
    "unknown-role": ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0] has unknown role 'tool'"),
    "content-not-string": (
        {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": ["b"]}]},
        'messages[1] "content" must be a string, got an array',
    ),
    "no-assistant-reply": ({"messages": [{"role": "user", "content": "hello"}]}, "example has no trained token"),
    "two-formats": ({"prompt": "a", "completion": "b", "messages": [{"role": "user", "content": "x"}]},
                    'both "prompt"/"completion" and "messages"'),
    "text-and-prompt": ({"text": "a", "prompt": "b", "completion": "c"}, 'both "text" and "prompt"/"completion"'),
}


@pytest.mark.parametrize("record,expected", BAD_RECORDS.values(), ids=BAD_RECORDS.keys())
def test_bad_record_names_file_and_line(tok, tmp_path, record, expected):
    # Two good lines and a blank one first: the bad record is on line 4.
    path = write_jsonl(tmp_path / "bad.jsonl", [GOOD[0], "", GOOD[1], record, GOOD[2]])
    with pytest.raises(InputError) as info:
        load_examples(path, tok, 512)
    message = str(info.value)
    assert message.startswith(f"{path}:4: ") and expected in message
    assert "\n" not in message


def test_not_utf8_names_the_line(tok, tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(InputError, match=rf"^{path}:2: not valid UTF-8"):
        load_examples(path, tok, 512)


def test_missing_and_empty_files(tok, tmp_path):
    with pytest.raises(InputError, match=r"nope\.jsonl: no such file"):
        load_examples(tmp_path / "nope.jsonl", tok, 512)
    with pytest.raises(InputError, match="is a directory"):
        load_examples(tmp_path, tok, 512)
    for content in ("", "\n  \n\n"):
        (tmp_path / "empty.jsonl").write_text(content)
        with pytest.raises(InputError, match=r"empty\.jsonl: no examples"):
            load_examples(tmp_path / "empty.jsonl", tok, 512)


# ---- batching ---------------------------------------------------------------------------------


def synthetic(lengths: list[int]) -> list[Example]:
    """Examples with distinct ids (example i holds 1000*i + position) and the first half masked."""
    out = []
    for i, n in enumerate(lengths):
        ids = [1000 * i + p for p in range(n)]
        out.append(Example(ids, [-100 if p < n // 2 else t for p, t in enumerate(ids)]))
    return out


LENGTHS = [5, 3, 8, 2, 7, 4, 6, 1, 9, 3]


def test_padded_batches(tmp_path):
    examples = synthetic(LENGTHS)
    batches = make_batches(examples, 4, shuffle=False, pad_id=-1)
    assert [b["input_ids"].shape for b in batches] == [(4, 8), (4, 7), (2, 9)]
    assert set(batches[0]) == {"input_ids", "attention_mask", "labels"}
    for b, group in zip(batches, [examples[0:4], examples[4:8], examples[8:]]):
        for key in b:
            assert b[key].dtype == torch.long and b[key].shape == b["input_ids"].shape
        for row, ex in enumerate(group):
            n = len(ex.input_ids)
            assert b["input_ids"][row, :n].tolist() == ex.input_ids
            assert b["labels"][row, :n].tolist() == ex.labels
            assert b["attention_mask"][row].tolist() == [1] * n + [0] * (b["input_ids"].shape[1] - n)
            assert (b["input_ids"][row, n:] == -1).all() and (b["labels"][row, n:] == -100).all()
    assert len(make_batches(examples, 4, shuffle=False, drop_last=True)) == 2
    assert count_trained_tokens(batches[0]) == sum(
        sum(label != -100 for label in ex.labels[1:]) for ex in examples[0:4]
    )


def test_packed_batches(tmp_path):
    examples = synthetic(LENGTHS)
    by_first_id = {ex.input_ids[0]: ex for ex in examples}
    batches = make_batches(examples, 2, pack=True, max_tokens=12, shuffle=True, seed=3)
    seen = []
    for b in batches:
        assert b["qkv_format"] == "thd" and "cu_seqlens_padded" not in b
        total = b["input_ids"].shape[1]
        assert b["input_ids"].shape == b["labels"].shape == b["position_ids"].shape == (1, total)
        assert total <= 12
        cu = b["cu_seqlens"].tolist()
        assert b["cu_seqlens"].dtype == torch.int32 and cu[0] == 0 and cu[-1] == total
        assert b["max_seqlen"] == max(e - s for s, e in zip(cu, cu[1:]))
        for s, e in zip(cu, cu[1:]):
            ex = by_first_id[b["input_ids"][0, s].item()]
            assert b["input_ids"][0, s:e].tolist() == ex.input_ids  # whole documents
            assert b["labels"][0, s:e].tolist() == ex.labels  # the examples' labels, not the ids
            assert b["position_ids"][0, s:e].tolist() == list(range(e - s))
            seen.append(ex.input_ids[0])
        assert count_trained_tokens(b) == sum(
            sum(label != -100 for label in by_first_id[b["input_ids"][0, s].item()].labels[1:]) for s in cu[:-1]
        )
    assert sorted(seen) == sorted(by_first_id)  # every example exactly once
    # Greedy: a new row starts only when the next example does not fit.
    for b, nxt in zip(batches, batches[1:]):
        first_next = nxt["cu_seqlens"][1].item()
        assert b["input_ids"].shape[1] + first_next > 12


def test_packed_default_max_tokens_and_too_long():
    examples = synthetic(LENGTHS)
    (only,) = make_batches(examples, 10, pack=True, shuffle=False)  # 10 * 9 >= sum(LENGTHS)
    assert only["cu_seqlens"].tolist() == [0] + torch.tensor(LENGTHS).cumsum(0).tolist()
    with pytest.raises(InputError, match="example 8 has 9 tokens, more than max_tokens=8"):
        make_batches(examples, 1, pack=True, max_tokens=8)


def order_of(batches: list[dict]) -> list[int]:
    """First ids of the documents/rows in batch order (each example's ids start at 1000 * index)."""
    firsts = []
    for b in batches:
        if "cu_seqlens" in b:
            firsts += [b["input_ids"][0, s].item() for s in b["cu_seqlens"][:-1].tolist()]
        else:
            firsts += b["input_ids"][:, 0].tolist()
    return firsts


@pytest.mark.parametrize("pack", [False, True], ids=["padded", "packed"])
def test_shuffle_is_deterministic(pack):
    examples = synthetic([3 + i % 5 for i in range(24)])
    run = lambda seed: order_of(make_batches(examples, 4, pack=pack, seed=seed))  # noqa: E731
    assert run(0) == run(0)
    assert run(0) != run(1)
    assert sorted(run(1)) == sorted(order_of(make_batches(examples, 4, pack=pack, shuffle=False)))
    assert order_of(make_batches(examples, 4, pack=pack, shuffle=False)) == [1000 * i for i in range(24)]


def test_batching_errors():
    examples = synthetic([3, 4])
    with pytest.raises(InputError, match="batch_size"):
        make_batches(examples, 0)
    with pytest.raises(InputError, match="no examples"):
        make_batches([], 2)
    with pytest.raises(InputError, match="as many labels as input ids"):
        make_batches([Example([1, 2], [1])], 2)
    with pytest.raises(InputError, match="drop_last leaves no batch"):
        make_batches(examples, 3, drop_last=True)


# ---- end to end with the model ----------------------------------------------------------------


def test_model_accepts_both_layouts_with_equal_loss(tok, tmp_path):
    from nemotron_core.create import build_config, random_model

    path = write_jsonl(tmp_path / "train.jsonl", GOOD + [{"text": "Hello there, general."}])
    examples = load_examples(path, tok, 64)
    padded = make_batches(examples, len(examples), shuffle=False, pad_id=tok.pad_token_id)
    packed = make_batches(examples, len(examples), pack=True, shuffle=False, pad_id=tok.pad_token_id)
    assert len(padded) == len(packed) == 1
    padded, packed = padded[0], packed[0]
    n = count_trained_tokens(padded)
    assert n == count_trained_tokens(packed) == sum(sum(lb != -100 for lb in ex.labels[1:]) for ex in examples)

    model = random_model(build_config("tiny"), torch.float32, 0).eval()
    with torch.no_grad():
        loss_padded = model(**padded, num_items_in_batch=n).loss
        loss_packed = model(**packed, num_items_in_batch=n).loss
        # count_trained_tokens agrees with the model's own count of scored targets.
        assert torch.allclose(model(**padded).loss, loss_padded, rtol=1e-6)
        assert torch.allclose(model(**packed).loss, loss_packed, rtol=1e-6)
    assert torch.isfinite(loss_padded)
    torch.testing.assert_close(loss_packed, loss_padded, rtol=1e-5, atol=0)
