"""A small, offline, deterministic byte-level BPE tokenizer for freshly created model directories.

A model created with random weights still needs a tokenizer so that the usual Hugging Face tooling
(``AutoTokenizer``, ``generate``, chat templates, lm-eval) works on it end to end. Downloading a
real Nemotron tokenizer is not an option (no network, and its 131k vocabulary would dwarf a tiny
test model), so we train a tiny BPE vocabulary on a few KB of text embedded below.

Layout of the vocabulary (ids are fixed, so configs can hard-code them):

* ``0 .. 6``   the entries of :data:`SPECIAL_TOKENS`;
* ``7 .. 262`` the 256 byte-level symbols, in byte order (id ``7 + b`` is byte ``b``), so that any
  UTF-8 text is encodable and ``decode(encode(text)) == text`` exactly;
* ``263 ..``   BPE merges, in the order the trainer learned them.

This module must stay cheap to import: the CLI imports it at start-up, so ``tokenizers`` and
``transformers`` (which may pull in torch) are imported inside the functions only.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nemotron_core.errors import ConfigError

if TYPE_CHECKING:  # pragma: no cover - for type checkers only, never imported at run time
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

__all__ = [
    "SPECIAL_TOKENS",
    "BOS_TOKEN",
    "EOS_TOKEN",
    "UNK_TOKEN",
    "PAD_TOKEN",
    "IM_START_TOKEN",
    "IM_END_TOKEN",
    "THINK_START_TOKEN",
    "THINK_END_TOKEN",
    "MIN_VOCAB_SIZE",
    "MAX_MERGES",
    "CHAT_TEMPLATE",
    "build_tokenizer",
    "save_tokenizer",
    "load_tokenizer",
]

UNK_TOKEN = "<unk>"
BOS_TOKEN = "<s>"
EOS_TOKEN = "</s>"
IM_START_TOKEN = "<|im_start|>"
IM_END_TOKEN = "<|im_end|>"
THINK_START_TOKEN = "<think>"
THINK_END_TOKEN = "</think>"
# The model config uses pad_token_id=0, so padding reuses <unk> (a byte-level BPE never emits it).
PAD_TOKEN = UNK_TOKEN

#: Special tokens in id order: ``SPECIAL_TOKENS[i]`` has id ``i``.
SPECIAL_TOKENS: list[str] = [
    UNK_TOKEN,  # 0, also the pad token
    BOS_TOKEN,  # 1
    EOS_TOKEN,  # 2
    IM_START_TOKEN,  # 3
    IM_END_TOKEN,  # 4
    THINK_START_TOKEN,  # 5
    THINK_END_TOKEN,  # 6
]

# <think>/</think> are ordinary added tokens (never split, but special=False) so that
# decode(..., skip_special_tokens=True) keeps the reasoning markers, as Qwen3-style reasoning
# tokenizers do; the other entries are true special tokens that skip_special_tokens removes.
_NON_SKIPPED_TOKENS = frozenset({THINK_START_TOKEN, THINK_END_TOKEN})

_NUM_BYTES = 256
#: Smallest accepted vocab_size: every special token plus every byte must get an id.
MIN_VOCAB_SIZE = len(SPECIAL_TOKENS) + _NUM_BYTES
#: Cap on learned merges: the embedded corpus is tiny, and a large vocabulary of near-random merges
#: would only slow tokenization down without making the random-weight model any more useful.
MAX_MERGES = 1024

# ChatML. No bos_token here on purpose: apply_chat_template(tokenize=True) encodes the rendered
# text with add_special_tokens=False, so the conversation starts with <|im_start|> (id 3); and
# tokenizer(rendered_text) adds exactly one <s> through the post-processor instead of a second
# one. {% generation %} marks the assistant's own tokens (content and closing <|im_end|>) for
# apply_chat_template(return_assistant_tokens_mask=True), which fine-tuning uses for loss masks.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] not in ['system', 'user', 'assistant'] -%}"
    "{{- raise_exception('Unsupported chat role: ' + message['role'] "
    "+ ' (expected system, user or assistant)') -}}"
    "{%- endif -%}"
    "{%- if message['content'] is not string -%}"
    "{{- raise_exception('Chat message content must be a string') -}}"
    "{%- endif -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    "{%- if message['role'] == 'assistant' -%}"
    "{%- generation -%}{{- message['content'] + '<|im_end|>' -}}{%- endgeneration -%}"
    "{{- '\\n' -}}"
    "{%- else -%}"
    "{{- message['content'] + '<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)

# Training text for the merges: plain English and some Python/shell/JSON, so that common words,
# indentation and punctuation become single tokens. Kept ASCII (bytes outside ASCII are covered by
# the 256 byte symbols anyway). Changing this text changes every created tokenizer.
_CORPUS = '''\
The quick brown fox jumps over the lazy dog. A language model reads text as a sequence of tokens
and predicts the next token from the tokens before it. This tokenizer is deliberately small: it
exists so that a freshly created model can be loaded, run and tested with the same tools that are
used for a real checkpoint. The model itself has random weights, so whatever it writes is noise,
but the shapes, the special tokens and the chat template behave exactly like the real thing.

Nemotron-H is a hybrid model. Most of its layers are Mamba-2 state space layers, which read the
sequence in linear time and keep a fixed-size state; a few layers are ordinary self-attention
layers, and the rest are feed-forward layers. Some variants replace the dense feed-forward layers
with a mixture of experts, where a router sends each token to a small number of experts. The
hybrid pattern is written as a string with one character per layer.

When you train a model, you feed it batches of examples and update the weights to reduce the loss.
When you evaluate a model, you measure how well it does on a task that it has not seen before.
When you convert a checkpoint, you rename and reshape the tensors so that another library can load
them. When you plan a run, you estimate how much memory and time it needs on the hardware you have.

Please answer the question below. Think step by step, and then give the final answer.
Question: What is the capital of France? Answer: The capital of France is Paris.
Question: How many days are there in a week? Answer: There are seven days in a week.
User: Hello! Can you help me write a short poem about the sea?
Assistant: Of course. Here is a short poem about the sea: The waves come in, the waves go out,
the gulls are calling all about; the sea is wide, the sea is deep,
and sings the sailors off to sleep.
User: Thank you, that is lovely. What does the word "hybrid" mean?
Assistant: A hybrid is something made by combining two different things, like a car that has both
an engine and an electric motor, or a model that combines attention with state space layers.

import json
import os
from pathlib import Path


def load_config(path: str) -> dict:
    """Read a JSON config file and return it as a dictionary."""
    with open(path, "r", encoding="utf-8") as f:
        config = json.load(f)
    if "hidden_size" not in config:
        raise ValueError(f"missing hidden_size in {path}")
    return config


class Counter:
    def __init__(self, start: int = 0) -> None:
        self.value = start

    def increment(self, step: int = 1) -> int:
        self.value += step
        return self.value


def main() -> None:
    config = load_config(os.path.join("model", "config.json"))
    for key, value in sorted(config.items()):
        print(f"{key} = {value}")
    numbers = [x * x for x in range(10) if x % 2 == 0]
    total = sum(numbers)
    print("total:", total)
    counter = Counter()
    while counter.value < 3:
        counter.increment()
    if total > 100 and counter.value == 3:
        return None
    else:
        return None


if __name__ == "__main__":
    main()

{"architectures": ["NemotronHForCausalLM"], "hidden_size": 1024, "num_hidden_layers": 8,
 "vocab_size": 131072, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0,
 "hybrid_override_pattern": "M-M*M-M-", "torch_dtype": "bfloat16", "use_cache": true}

$ pip install --upgrade pip
$ python -m pytest tests -q
$ nemotron create --output ./tiny-model --hidden-size 256 --layers 4
$ nemotron generate ./tiny-model --prompt "Hello, world" --max-new-tokens 32
$ ls -la ./tiny-model && cat ./tiny-model/config.json

for i in range(len(items)):
    item = items[i]
    if item is None:
        continue
    result.append(item.strip().lower())
return result

The numbers 0 1 2 3 4 5 6 7 8 9 10 16 32 64 100 128 256 512 1000 1024 2048 4096 8192 are common.
In the beginning of the project, the team wrote the tests first, and then the code that makes the
tests pass. Every function has a short docstring that says what it does and why it is there.
'''


def _bytes_to_unicode() -> list[str]:
    """The GPT-2 byte-to-symbol table: entry ``b`` is the printable character for byte ``b``.

    This is the mapping that the ``tokenizers`` ByteLevel pre-tokenizer and decoder use; we need it
    in byte order to give the byte symbols fixed ids (``tokenizers`` lists the alphabet unordered).
    """
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("\xa1"), ord("\xac") + 1))
        + list(range(ord("\xae"), ord("\xff") + 1))
    )
    table: dict[int, str] = {b: chr(b) for b in printable}
    shift = 0
    for b in range(_NUM_BYTES):
        if b not in table:
            table[b] = chr(_NUM_BYTES + shift)
            shift += 1
    return [table[b] for b in range(_NUM_BYTES)]


def _check_vocab_size(vocab_size: int) -> None:
    """Reject vocab sizes that cannot hold the fixed special-token and byte ids."""
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int):
        raise ConfigError(f"vocab_size must be an integer, got {vocab_size!r}")
    if vocab_size < MIN_VOCAB_SIZE:
        raise ConfigError(
            f"vocab_size {vocab_size} is too small for the built-in tokenizer: need at least "
            f"{MIN_VOCAB_SIZE} ({len(SPECIAL_TOKENS)} special tokens + {_NUM_BYTES} byte symbols)"
        )


def _train_merges(num_merges: int) -> list[tuple[str, str]]:
    """Learn BPE merges on the embedded corpus with the ``tokenizers`` trainer, in learned order.

    At most ``num_merges`` new tokens result (a few merges may produce the same token string).
    """
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    if num_merges <= 0:
        return []
    byte_symbols = _bytes_to_unicode()
    trainer_tok = Tokenizer(models.BPE())
    trainer_tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    trainer = trainers.BpeTrainer(
        # The trainer's vocab_size counts the alphabet too; special tokens are added afterwards.
        vocab_size=_NUM_BYTES + num_merges,
        min_frequency=2,  # a pair seen once is not a pattern, just corpus trivia
        show_progress=False,
        special_tokens=[],
        initial_alphabet=byte_symbols,
        limit_alphabet=_NUM_BYTES,
    )
    trainer_tok.train_from_iterator(_CORPUS.splitlines(keepends=True), trainer=trainer)
    # The BPE model has no merges accessor; its JSON form lists them in learned order, as
    # ["a", "b"] pairs (current releases) or "a b" strings (older releases).
    raw = json.loads(trainer_tok.to_str())["model"]["merges"]
    pairs = [m.split(" ", 1) if isinstance(m, str) else m for m in raw]
    return [(str(a), str(b)) for a, b in pairs]


def _build_backend(vocab_size: int) -> Tokenizer:
    """Build the ``tokenizers.Tokenizer`` with the fixed id layout described in the module doc."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    _check_vocab_size(vocab_size)
    target = min(vocab_size, MIN_VOCAB_SIZE + MAX_MERGES)
    merges = _train_merges(target - MIN_VOCAB_SIZE)

    # Rebuild the vocabulary ourselves rather than keep the trainer's ids: the trainer numbers the
    # alphabet in an order of its own choosing; we want fixed, documented ids for specials/bytes.
    vocab: dict[str, int] = {}
    for token in SPECIAL_TOKENS + _bytes_to_unicode():
        vocab[token] = len(vocab)
    for left, right in merges:
        # Two merges may build the same string ("a"+"bc", "ab"+"c"): keep both merges, one id.
        vocab.setdefault(left + right, len(vocab))
    assert len(vocab) <= target, (len(vocab), target)

    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=None, fuse_unk=False))
    # No normalizer at all: text must reach the byte-level pre-tokenizer unchanged to round-trip.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    # Same template that transformers' update_post_processor() builds for add_bos_token=True, so the
    # saved tokenizer.json does not depend on whether transformers rebuilds it.
    bos_id = SPECIAL_TOKENS.index(BOS_TOKEN)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN}:0 $A:0",
        pair=f"{BOS_TOKEN}:0 $A:0 {BOS_TOKEN}:1 $B:1",
        special_tokens=[(BOS_TOKEN, bos_id)],
    )
    # Register the specials as added tokens (they keep their vocabulary ids 0..6) so that their text
    # in the input is matched whole instead of being split into bytes.
    # (add_special_tokens() forces special=True, hence add_tokens() for the <think> pair.)
    tok.add_special_tokens(
        [
            AddedToken(t, special=True, normalized=False)
            for t in SPECIAL_TOKENS
            if t not in _NON_SKIPPED_TOKENS
        ]
    )
    tok.add_tokens(
        [
            AddedToken(t, special=False, normalized=False)
            for t in SPECIAL_TOKENS
            if t in _NON_SKIPPED_TOKENS
        ]
    )
    for i, t in enumerate(SPECIAL_TOKENS):
        assert tok.token_to_id(t) == i, f"{t!r} got id {tok.token_to_id(t)}, expected {i}"
    return tok


def build_tokenizer(vocab_size: int) -> PreTrainedTokenizerFast:
    """Build the tokenizer for a model whose embedding has ``vocab_size`` rows.

    The result holds at most ``min(vocab_size, MIN_VOCAB_SIZE + MAX_MERGES)`` tokens; the model may
    have more rows than that (the extra rows are never produced). Deterministic: the same
    ``vocab_size`` always gives the same tokenizer. Raises ConfigError if ``vocab_size`` is below
    :data:`MIN_VOCAB_SIZE`.
    """
    _check_vocab_size(vocab_size)  # before the heavy import, so bad input fails fast
    from tokenizers import AddedToken
    from transformers import PreTrainedTokenizerFast

    backend = _build_backend(vocab_size)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        unk_token=UNK_TOKEN,
        pad_token=PAD_TOKEN,
        extra_special_tokens=[
            AddedToken(t, special=True, normalized=False) for t in (IM_START_TOKEN, IM_END_TOKEN)
        ],
        add_bos_token=True,
        add_eos_token=False,
        # Clean-up would turn " ." into "." and so on, which breaks exact round trips.
        clean_up_tokenization_spaces=False,
        chat_template=CHAT_TEMPLATE,
        padding_side="right",
    )


def save_tokenizer(out_dir: str | os.PathLike, vocab_size: int) -> dict[str, Any]:
    """Build the tokenizer for ``vocab_size`` and save it into ``out_dir`` (created if needed).

    Writes the files ``save_pretrained`` writes (tokenizer.json, tokenizer_config.json, ...), with
    the chat template inside tokenizer_config.json. Returns the ids the caller should put into
    generation_config.json / config.json::

        {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0,
         "chat_eos_token_ids": [2, 4], "vocab_size": <tokens in this tokenizer>}
    """
    tokenizer = build_tokenizer(vocab_size)
    os.makedirs(out_dir, exist_ok=True)
    # save_jinja_files=False keeps the chat template in tokenizer_config.json (one file, read by
    # every transformers version) instead of a separate chat_template.jinja.
    tokenizer.save_pretrained(os.fspath(out_dir), save_jinja_files=False)
    return {
        "bos_token_id": SPECIAL_TOKENS.index(BOS_TOKEN),
        "eos_token_id": SPECIAL_TOKENS.index(EOS_TOKEN),
        "pad_token_id": SPECIAL_TOKENS.index(PAD_TOKEN),
        # A chat reply ends with <|im_end|>; </s> still ends plain-text generation.
        "chat_eos_token_ids": [SPECIAL_TOKENS.index(EOS_TOKEN), SPECIAL_TOKENS.index(IM_END_TOKEN)],
        "vocab_size": len(tokenizer),
    }


def load_tokenizer(model_dir: str | os.PathLike):
    """A model directory's tokenizer: local files only, never remote code; one-line InputError."""
    from transformers import AutoTokenizer

    from nemotron_core.errors import InputError

    d = Path(model_dir)
    # The files a fast tokenizer can be built from; transformers' own message for none of them talks of
    # sentencepiece and tiktoken instead of the missing file.
    sources = ("tokenizer.json", "tokenizer.model", "vocab.json")
    if d.is_dir() and not any((d / name).is_file() for name in sources):
        odd = next((name for name in sources if (d / name).exists()), None)
        raise InputError(f"{model_dir}: {odd} is not a file" if odd else f"{model_dir}: no tokenizer (tokenizer.json is missing)")
    try:
        return AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True, trust_remote_code=False)
    except (OSError, ValueError, KeyError) as e:
        raise InputError(f"{model_dir}: cannot load the tokenizer ({' '.join(str(e).split())})") from None
