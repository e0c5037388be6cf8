"""Fine-tuning data: JSON Lines datasets, loss masks, and batches for ``NemotronHForCausalLM``.

A dataset is a UTF-8 JSON Lines file; each non-blank line is one example in one of three formats
(formats may be mixed in one file, unknown keys are ignored):

* ``{"text": "..."}``: train on every token (the tokenizer's BOS as usual, EOS appended);
* ``{"prompt": "...", "completion": "..."}``: train on the completion and the EOS only;
* ``{"messages": [{"role": "system" | "user" | "assistant", "content": "..."}, ...]}``: rendered with
  the tokenizer's chat template; train on the assistant turns only.

Labels follow the Hugging Face convention: ``labels[t] = input_ids[t]`` where trained and ``-100``
elsewhere, *unshifted* (the model scores position ``t`` against ``labels[t + 1]``).

    examples = load_examples("train.jsonl", tokenizer, max_length=2048)
    for batch in make_batches(examples, batch_size=8, pack=True, seed=epoch):
        loss = model(**batch, num_items_in_batch=count_trained_tokens(batch)).loss

Chat masks come from the template's ``{% generation %}`` markers
(``apply_chat_template(..., return_assistant_tokens_mask=True)``). Templates without markers (or whose
markers mark nothing) fall back to masking by prefix: for each assistant message ``i``, the
conversation ``messages[:i]`` is rendered with ``add_generation_prompt=True`` and ``messages[:i + 1]``
without; the tokens between the two renderings are that reply. (A conversation that opens with an
assistant message has no prefix to render; there the reply's header is what its rendering shares with
that of an empty reply.) Trailing whitespace-only tokens of that span (the newline a template puts
*between* turns, after the end-of-turn token) are not trained, so that for ChatML the fallback trains
exactly what the markers would: the reply and its ``<|im_end|>``. The fallback needs a template that
renders a conversation's prefixes as token prefixes of the whole (true of ChatML and most templates);
when that does not hold it raises InputError rather than guess.
"""
from __future__ import annotations

import os
import random
import re
from dataclasses import dataclass
from typing import Any

import torch

from .errors import InputError
from .jsonl import json_type, parse_json_line
from .packing import IGNORE_INDEX, pack_sequences

__all__ = ["Example", "IGNORE_INDEX", "load_examples", "make_batches", "count_trained_tokens"]

CHAT_ROLES = ("system", "user", "assistant")

# `{% generation %}` / `{%- generation -%}` in a chat template: without it, transformers' assistant
# mask is all zeros (and it logs a warning per call), so we go straight to the prefix fallback.
_GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")


@dataclass
class Example:
    """One tokenized training example.

    Attributes:
        input_ids: the token ids.
        labels: same length as ``input_ids``; ``labels[t] = input_ids[t]`` where the token is trained,
            ``-100`` elsewhere. Unshifted: the model scores position ``t`` against ``labels[t + 1]``.
    """

    input_ids: list[int]
    labels: list[int]


class _LineError(Exception):
    """A problem with one record; ``load_examples`` adds the file name and line number."""


# ---- loading ----------------------------------------------------------------------------------


def load_examples(
    path: str | os.PathLike, tokenizer: Any, max_length: int, truncate: bool = True
) -> list[Example]:
    """Read and tokenize a JSON Lines fine-tuning dataset.

    Args:
        path: the ``.jsonl`` file (UTF-8, one JSON object per non-blank line).
        tokenizer: a Hugging Face tokenizer; ``eos_token_id`` ends text and completion examples, and
            its chat template renders ``messages`` examples.
        max_length: the most tokens one example may have.
        truncate: keep the first ``max_length`` tokens of a longer example; when False, a longer
            example is an error instead.

    Returns:
        The examples in file order.

    Raises:
        InputError: one line naming the file and, for a bad record, its line number.
    """
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1:
        raise InputError(f"max_length must be a positive integer, got {max_length!r}")
    name = os.fspath(path)
    chat_markers = _has_generation_markers(tokenizer)
    examples: list[Example] = []
    try:
        # Binary and split on b"\n" only: JSON strings may hold raw U+2028 and friends, which
        # str.splitlines() would treat as line breaks; decoding per line lets a bad byte name its line.
        with open(name, "rb") as f:
            for lineno, raw in enumerate(f, start=1):
                try:
                    example = _parse_line(raw, lineno, tokenizer, chat_markers, max_length, truncate)
                except _LineError as e:
                    raise InputError(f"{name}:{lineno}: {_one_line(str(e))}") from e
                if example is not None:
                    examples.append(example)
    except FileNotFoundError as e:
        raise InputError(f"{name}: no such file") from e
    except IsADirectoryError as e:
        raise InputError(f"{name}: is a directory, expected a .jsonl file") from e
    except OSError as e:
        raise InputError(f"{name}: cannot read ({e.strerror or e})") from e
    if not examples:
        raise InputError(f"{name}: no examples (the file is empty or holds only blank lines)")
    return examples


def _parse_line(
    raw: bytes, lineno: int, tokenizer: Any, chat_markers: bool, max_length: int, truncate: bool
) -> Example | None:
    """Turn one raw line into an Example (None for a blank line); raises _LineError."""
    try:
        record = parse_json_line(raw, first_line=lineno == 1)
    except ValueError as e:
        raise _LineError(str(e)) from None
    if record is None:
        return None

    # One format a line: a line with two (say "prompt" and "messages") would train on one of them silently.
    formats = [f for f, keys in (('"text"', ("text",)), ('"prompt"/"completion"', ("prompt", "completion")),
                                 ('"messages"', ("messages",))) if any(k in record for k in keys)]
    if len(formats) > 1:
        raise _LineError(f"the line has both {formats[0]} and {formats[1]}; use one format a line")
    if "text" in record:
        input_ids, labels = _text_example(record, tokenizer)
    elif "prompt" in record or "completion" in record:
        input_ids, labels = _prompt_completion_example(record, tokenizer)
    elif "messages" in record:
        input_ids, labels = _chat_example(record["messages"], tokenizer, chat_markers)
    else:
        keys = ", ".join(sorted(map(repr, record))) or "none"
        raise _LineError(
            f'expected "text", "prompt" + "completion", or "messages"; found keys: {keys}'
        )

    if len(input_ids) > max_length:
        if not truncate:
            raise _LineError(f"example has {len(input_ids)} tokens, more than max_length={max_length}")
        input_ids, labels = input_ids[:max_length], labels[:max_length]
    # labels[0] is never a target (the model shifts), so it does not count as a trained token.
    if all(label == IGNORE_INDEX for label in labels[1:]):
        suffix = f" after truncation to max_length={max_length}" if len(labels) == max_length else ""
        raise _LineError(f"example has no trained token{suffix}")
    return Example(input_ids=list(input_ids), labels=list(labels))


def _text_example(record: dict, tokenizer: Any) -> tuple[list[int], list[int]]:
    text = record["text"]
    if not isinstance(text, str):
        raise _LineError(f'"text" must be a string, got {json_type(text)}')
    if not text:
        raise _LineError('"text" is empty')
    ids = _encode(tokenizer, text, add_special_tokens=True) + [_eos_id(tokenizer)]
    return ids, list(ids)


def _prompt_completion_example(record: dict, tokenizer: Any) -> tuple[list[int], list[int]]:
    for key in ("prompt", "completion"):
        if key not in record:
            raise _LineError(f'"prompt" and "completion" go together; "{key}" is missing')
        if not isinstance(record[key], str):
            raise _LineError(f'"{key}" must be a string, got {json_type(record[key])}')
    # Tokenized separately so the boundary is exact: joint tokenization could merge the last prompt
    # bytes with the first completion bytes into one token that is neither prompt nor completion.
    prompt = _encode(tokenizer, record["prompt"], add_special_tokens=True)
    completion = _encode(tokenizer, record["completion"], add_special_tokens=False) + [_eos_id(tokenizer)]
    return prompt + completion, [IGNORE_INDEX] * len(prompt) + completion


def _chat_example(messages: Any, tokenizer: Any, chat_markers: bool) -> tuple[list[int], list[int]]:
    messages = _check_messages(messages)
    if chat_markers:
        rendered = _render(tokenizer, messages, assistant_mask=True)
        ids, mask = list(rendered["input_ids"]), list(rendered["assistant_masks"])
        if any(mask):
            return ids, [t if m else IGNORE_INDEX for t, m in zip(ids, mask)]
        # Markers that mark nothing (e.g. around a part of the template that never renders): fall back.
    ids = list(_render(tokenizer, messages)["input_ids"])
    return ids, _labels_by_prefix(tokenizer, messages, ids)


def _check_messages(messages: Any) -> list[dict[str, str]]:
    """Validate a ``messages`` list; returns it with only role and content (other keys ignored)."""
    if not isinstance(messages, list):
        raise _LineError(f'"messages" must be a list, got {json_type(messages)}')
    if not messages:
        raise _LineError('"messages" is empty')
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise _LineError(f"messages[{i}] must be an object, got {json_type(message)}")
        for key in ("role", "content"):
            if key not in message:
                raise _LineError(f'messages[{i}] has no "{key}"')
        role, content = message["role"], message["content"]
        if role not in CHAT_ROLES:
            raise _LineError(f"messages[{i}] has unknown role {role!r} (expected system, user or assistant)")
        if not isinstance(content, str):
            raise _LineError(f'messages[{i}] "content" must be a string, got {json_type(content)}')
        out.append({"role": role, "content": content})
    return out


def _labels_by_prefix(tokenizer: Any, messages: list[dict[str, str]], ids: list[int]) -> list[int]:
    """Mask a rendered conversation by prefix rendering (for templates without generation markers)."""
    labels = [IGNORE_INDEX] * len(ids)
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        through = list(_render(tokenizer, messages[: i + 1])["input_ids"])
        if i:
            prefix = list(_render(tokenizer, messages[:i], add_generation_prompt=True)["input_ids"])
        else:
            # Nothing precedes the reply and an empty conversation cannot be rendered: the turn's
            # header is what this reply shares with an empty one.
            empty = list(_render(tokenizer, [{"role": "assistant", "content": ""}])["input_ids"])
            prefix = through[: _common_prefix(through, empty)]
        if ids[: len(through)] != through or through[: len(prefix)] != prefix:
            raise _LineError(
                "the chat template does not render a conversation's prefixes as prefixes of the whole, "
                "so assistant tokens cannot be found by prefix; add {% generation %} markers to it"
            )
        start = len(prefix)
        end = len(through)
        # Whitespace after the end-of-turn token separates turns; the model never generates it.
        while end > start and not tokenizer.decode([through[end - 1]]).strip():
            end -= 1
        labels[start:end] = ids[start:end]
    return labels


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def _render(tokenizer: Any, messages: list[dict[str, str]], add_generation_prompt: bool = False,
            assistant_mask: bool = False) -> Any:
    """``apply_chat_template`` to token ids; a template failure becomes a _LineError."""
    try:
        return tokenizer.apply_chat_template(
            messages,
            tokenize=True,
            return_dict=True,
            add_generation_prompt=add_generation_prompt,
            return_assistant_tokens_mask=assistant_mask,
        )
    except Exception as e:  # noqa: BLE001 - the template is user-supplied Jinja: any failure is bad input
        raise _LineError(f"cannot apply the chat template: {e}") from e


def _has_generation_markers(tokenizer: Any) -> bool:
    """Whether the tokenizer's chat template(s) may produce an assistant mask."""
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):  # named templates: any of them might be the one used
        template = "".join(str(t) for t in template.values())
    # Unknown template (None, or a tokenizer that resolves it elsewhere): let transformers decide.
    return True if not isinstance(template, str) else bool(_GENERATION_TAG.search(template))


def _encode(tokenizer: Any, text: str, add_special_tokens: bool) -> list[int]:
    """Token ids of ``text``; with special tokens (BOS) but never a tokenizer-added EOS.

    Some tokenizers (``add_eos_token=True``) append EOS themselves; we add it explicitly where it
    belongs (after the completion), so a second one, or one after the prompt, would be wrong.
    """
    ids = list(tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])
    eos = tokenizer.eos_token_id
    if add_special_tokens and ids and ids[-1] == eos:
        plain = tokenizer(text, add_special_tokens=False)["input_ids"]
        if not plain or plain[-1] != eos:  # the EOS came from the tokenizer, not from the text
            ids.pop()
    return ids


def _eos_id(tokenizer: Any) -> int:
    eos = tokenizer.eos_token_id
    if eos is None:
        raise _LineError("the tokenizer has no eos_token_id, needed to end text and completion examples")
    return int(eos)


def _one_line(message: str) -> str:
    return " ".join(message.split())


# ---- batching ---------------------------------------------------------------------------------


def make_batches(
    examples: list[Example],
    batch_size: int,
    pack: bool = False,
    max_tokens: int | None = None,
    shuffle: bool = True,
    seed: int = 0,
    pad_id: int = 0,
    drop_last: bool = False,
) -> list[dict[str, torch.Tensor | str | int]]:
    """Group examples into batches of forward kwargs for ``NemotronHForCausalLM``.

    Args:
        examples: the examples (e.g. from :func:`load_examples`).
        batch_size: examples per batch (padded layout); with ``pack``, only sets the default
            ``max_tokens``.
        pack: False: padded BSHD batches; True: packed THD rows (one row per batch).
        max_tokens: packed row capacity; default ``batch_size`` times the longest example.
        shuffle: shuffle the example order first, with ``random.Random(seed)``.
        seed: the shuffle seed (same seed, same batches).
        pad_id: the token id written into padding (never scored).
        drop_last: padded: drop a last batch of fewer than ``batch_size`` examples. Packed: drop the
            last row (the remainder of the greedy fill) unless it is filled to ``max_tokens``.

    Returns:
        Padded: ``{"input_ids", "attention_mask", "labels"}``, each ``[B, S]`` long, right-padded to
        the longest example of the batch (labels -100 on padding). Packed:
        ``PackedBatch.as_kwargs(with_labels=False)`` (``input_ids`` ``[1, T]``, ``qkv_format="thd"``,
        ``cu_seqlens``, ``max_seqlen``, ``position_ids``) plus ``labels`` ``[1, T]``: the examples'
        labels back to back.

    Raises:
        InputError: bad arguments, no examples, a malformed example, an example longer than
        ``max_tokens``, or ``drop_last`` leaving no batch at all.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise InputError(f"batch_size must be a positive integer, got {batch_size!r}")
    if not examples:
        raise InputError("no examples to batch")
    for i, ex in enumerate(examples):
        if len(ex.input_ids) == 0 or len(ex.input_ids) != len(ex.labels):
            raise InputError(
                f"example {i} must have as many labels as input ids, and at least one "
                f"(got {len(ex.input_ids)} ids, {len(ex.labels)} labels)"
            )
    order = list(range(len(examples)))
    if shuffle:
        random.Random(seed).shuffle(order)
    if pack:
        batches = _packed_batches(examples, order, batch_size, max_tokens, pad_id, drop_last)
    else:
        batches = _padded_batches(examples, order, batch_size, pad_id, drop_last)
    if not batches:
        raise InputError(
            f"drop_last leaves no batch: {len(examples)} examples do not fill one "
            f"{'packed row' if pack else f'batch of {batch_size}'}"
        )
    return batches


def _padded_batches(examples: list[Example], order: list[int], batch_size: int, pad_id: int,
                    drop_last: bool) -> list[dict[str, Any]]:
    batches = []
    for first in range(0, len(order), batch_size):
        group = [examples[i] for i in order[first : first + batch_size]]
        if drop_last and len(group) < batch_size:
            break
        width = max(len(ex.input_ids) for ex in group)
        input_ids = torch.full((len(group), width), pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(group), width), dtype=torch.long)
        labels = torch.full((len(group), width), IGNORE_INDEX, dtype=torch.long)
        for row, ex in enumerate(group):
            n = len(ex.input_ids)
            input_ids[row, :n] = torch.tensor(ex.input_ids, dtype=torch.long)
            attention_mask[row, :n] = 1
            labels[row, :n] = torch.tensor(ex.labels, dtype=torch.long)
        batches.append({"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels})
    return batches


def _packed_batches(examples: list[Example], order: list[int], batch_size: int, max_tokens: int | None,
                    pad_id: int, drop_last: bool) -> list[dict[str, Any]]:
    if max_tokens is None:
        max_tokens = batch_size * max(len(ex.input_ids) for ex in examples)
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise InputError(f"max_tokens must be a positive integer, got {max_tokens!r}")
    for i, ex in enumerate(examples):
        if len(ex.input_ids) > max_tokens:
            raise InputError(f"example {i} has {len(ex.input_ids)} tokens, more than max_tokens={max_tokens}")

    # Next-fit in the (shuffled) order: keeps the shuffle's randomness and the batches
    # deterministic; a sorting bin-packer would fill rows tighter but group examples by length.
    rows: list[list[Example]] = [[]]
    used = 0
    for i in order:
        n = len(examples[i].input_ids)
        if used + n > max_tokens:
            rows.append([])
            used = 0
        rows[-1].append(examples[i])
        used += n
    if drop_last and used < max_tokens:
        rows.pop()

    batches = []
    for row in rows:
        packed = pack_sequences([ex.input_ids for ex in row], pad_id=pad_id)
        # pack_sequences labels the plain input ids; we carry the examples' loss masks instead,
        # laid out where each document starts (-100 on any padding between documents).
        labels = torch.full_like(packed.input_ids, IGNORE_INDEX)
        for start, ex in zip(packed.starts, row):
            labels[0, start : start + len(ex.labels)] = torch.tensor(ex.labels, dtype=torch.long)
        batch = packed.as_kwargs(with_labels=False)
        batch["labels"] = labels
        batches.append(batch)
    return batches


def count_trained_tokens(batch: dict) -> int:
    """The number of targets the model scores in ``batch``: ``num_items_in_batch`` for the loss.

    That is the labels other than -100 after the model's shift (``labels[t + 1]`` scores position
    ``t``): never the first token of a row (padded) or of a document (packed), and never a target
    whose position ``t`` is padding.
    """
    labels = batch["labels"]
    if labels.dim() == 1:
        labels = labels[None]
    valid = labels[:, 1:] != IGNORE_INDEX
    cu_seqlens = batch.get("cu_seqlens")
    if cu_seqlens is not None:
        # Packed: a document's first token is not a target of the previous document's last token.
        layout = batch.get("cu_seqlens_padded")
        starts = (layout if layout is not None else cu_seqlens)[:-1].long().to(labels.device)
        lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long().to(labels.device)
        is_start = torch.zeros(labels.shape[-1], dtype=torch.bool, device=labels.device)
        is_start[starts] = True
        real = torch.zeros(labels.shape[-1], dtype=torch.bool, device=labels.device)
        for s, n in zip(starts.tolist(), lengths.tolist()):
            real[s : s + n] = True
        valid = valid & ~is_start[1:] & real[:-1]
    elif batch.get("attention_mask") is not None:
        valid = valid & batch["attention_mask"][:, :-1].bool().to(labels.device)
    return int(valid.sum().item())
