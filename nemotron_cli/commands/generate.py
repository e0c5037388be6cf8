"""``nemotron generate``: text generation with the native decode loop (streaming, batches, JSON Lines).

Prompts come from ``--prompt`` (one), ``--prompt-file`` or stdin (when neither is given):

* a prompt file named ``*.jsonl`` / ``*.ndjson`` is JSON Lines: one object per line with a
  ``"prompt"`` string or a ``"messages"`` list of ``{"role", "content"}`` objects (blank lines are
  skipped); any other prompt file is UTF-8 text with one prompt per line (blank lines skipped);
* stdin is read whole: it is JSON Lines (same records) when its first non-blank character is
  ``{``, otherwise the whole text is ONE prompt (a trailing newline is dropped).

``--chat`` renders plain prompts with the tokenizer's chat template (``add_generation_prompt``);
``--system TEXT`` adds a system message and implies ``--chat``; ``messages`` records always use
the chat template (``--system`` is prepended when they have no system message). Plain prompts are
tokenized as usual (with the tokenizer's BOS).

Sampling. Tokens are sampled (temperature 1, no top-k/top-p/min-p) unless ``--greedy`` or
``--temperature 0``; an option left out takes the value generation_config.json sets, if any, and
that file's ``"do_sample": false`` means greedy unless a sampling option is given.
Generation ends at an EOS (generation_config.json's ``eos_token_id``, int or list, plus the
tokenizer's), a ``--stop`` string, or ``--max-new-tokens`` (capped, with a warning, so that prompt
plus completion fit ``max_position_embeddings``). ``--seed`` makes sampling reproducible for the
same inputs and options (batch k uses seed + k). The default dtype is fp32 on CPU, bf16 on CUDA.

Output. Human mode: a single prompt streams its text to stdout as it is produced; several prompts
are generated ``--batch-size`` at a time and printed in input order, each after a header line
``[i/n] <prompt>`` on stderr. Every completion ends with a newline. Speeds (prefill and decode
tokens/s) and peak memory go to stderr unless ``--quiet``.

``--json`` prints one JSON object per prompt (JSON Lines, input order) on stdout, nothing else::

    {"index": 0,                    # position in the input, from 0
     "prompt": "Hello",             # the prompt as given: a string, or the messages list
     "text": "...",                 # the completion (without EOS, cut before a stop string)
     "prompt_tokens": 3,            # tokens in the encoded prompt
     "completion_tokens": 8,        # tokens generated (an EOS counts; stop: through the token
                                    #   that completed the stop string)
     "finish_reason": "length",     # "eos" | "length" | "stop" | "interrupted"
     "timings": {"prefill_s": 0.01,     # prefill time of the batch this prompt ran in
                 "decode_s": 0.2,       # decode time of that batch
                 "tokens_per_s": 40.0}} # completion_tokens / decode_s

Ctrl-C stops cleanly: what was generated so far is printed (``finish_reason`` "interrupted"),
later batches are skipped, and the exit code is 130.

``--adapter DIR`` loads a PEFT-format LoRA adapter (adapter_config.json + adapter_model.safetensors)
and merges it into the base weights before generating, so decoding runs at base speed. A missing,
pickled-only (adapter_model.bin) or mismatched adapter is one ``error:`` line and exit code 2.
"""
from __future__ import annotations

import dataclasses
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from nemotron_cli.common import EXIT_INTERRUPTED, DType, DeviceOpt, Output, QuietOpt, cli_command, example_epilog
from nemotron_core.backend import resolve_device
from nemotron_core.errors import InputError, NemotronError, check_seed
from nemotron_core.tokenizer import load_tokenizer
from nemotron_core.jsonl import parse_json_line

JSONL_SUFFIXES = (".jsonl", ".ndjson")


@dataclass
class PromptRecord:
    """One input: a plain ``text`` prompt or chat ``messages``; ``source`` is what the JSON echoes."""

    text: str | None = None
    messages: list[dict[str, str]] | None = None
    where: str = "prompt"  # for error messages: "--prompt", "FILE line 3", ...

    @property
    def source(self) -> Any:
        return self.messages if self.messages is not None else self.text


# ---- reading prompts ------------------------------------------------------------------------------------------
def _parse_jsonl(text: str, origin: str) -> list[PromptRecord]:
    records = []
    for n, line in enumerate(text.splitlines(), 1):
        where = f"{origin} line {n}"
        try:
            obj = parse_json_line(line, first_line=n == 1)
        except ValueError as e:
            raise InputError(f"{where}: {e}") from None
        if obj is None:
            continue
        if "messages" in obj and "prompt" in obj:
            raise InputError(f"{where}: both \"prompt\" and \"messages\"; use one")
        if "messages" in obj:
            msgs = obj["messages"]
            if (not isinstance(msgs, list) or not msgs or not all(
                    isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                    for m in msgs)):
                raise InputError(f"{where}: \"messages\" must be a non-empty list of "
                                 "{\"role\": str, \"content\": str} objects")
            records.append(PromptRecord(messages=[{"role": m["role"], "content": m["content"]} for m in msgs],
                                        where=where))
        elif "prompt" in obj:
            if not isinstance(obj["prompt"], str):
                raise InputError(f"{where}: \"prompt\" must be a string")
            records.append(PromptRecord(text=obj["prompt"], where=where))
        else:
            raise InputError(f"{where}: expected a \"prompt\" string or a \"messages\" list")
    return records


def read_prompts(prompt: str | None, prompt_file: Path | None) -> list[PromptRecord]:
    """The prompts from --prompt, --prompt-file or stdin (see the module docstring for formats)."""
    if prompt is not None and prompt_file is not None:
        raise InputError("--prompt and --prompt-file cannot be used together")
    if prompt is not None:
        records = [PromptRecord(text=prompt, where="--prompt")]
    elif prompt_file is not None:
        try:
            raw = prompt_file.read_bytes()
        except OSError as e:
            raise InputError(f"cannot read --prompt-file {prompt_file}: {e.strerror or e}") from None
        try:
            text = raw.decode("utf-8-sig")
        except UnicodeDecodeError:
            raise InputError(f"--prompt-file {prompt_file}: not UTF-8 text") from None
        if prompt_file.suffix.lower() in JSONL_SUFFIXES:
            records = _parse_jsonl(text, str(prompt_file))
        else:
            records = [PromptRecord(text=line, where=f"{prompt_file} line {n}")
                       for n, line in enumerate(text.splitlines(), 1) if line.strip()]
        if not records:
            raise InputError(f"--prompt-file {prompt_file}: no prompts in the file")
    else:
        if sys.stdin is None or sys.stdin.isatty():
            raise InputError("no prompt: pass --prompt TEXT or --prompt-file FILE, or pipe text on stdin")
        text = sys.stdin.read()
        if text.lstrip().startswith("{"):
            records = _parse_jsonl(text, "stdin")
        else:
            records = [PromptRecord(text=text.rstrip("\r\n"), where="stdin")]
    for r in records:
        if r.text is not None and not r.text.strip():
            raise InputError(f"{r.where}: the prompt is empty")
    return records


# ---- tokenization ---------------------------------------------------------------------------------------------
def encode(tok, record: PromptRecord, chat: bool, system: str | None) -> list[int]:
    """Token ids for one prompt: chat-templated (messages, or --chat) or plain text with BOS."""
    if record.messages is None and not chat:
        return list(tok(record.text)["input_ids"])
    messages = list(record.messages) if record.messages is not None else [{"role": "user", "content": record.text}]
    if system is not None and not any(m["role"] == "system" for m in messages):
        messages.insert(0, {"role": "system", "content": system})
    if not getattr(tok, "chat_template", None):
        raise InputError(f"{record.where}: the tokenizer has no chat template (needed for --chat/--system/messages)")
    try:
        rendered = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    except Exception as e:  # jinja2 TemplateError from raise_exception(), bad roles, ...
        raise InputError(f"{record.where}: chat template failed: {e}") from None
    # As apply_chat_template(tokenize=True) does: the template itself decides about BOS.
    return list(tok(rendered, add_special_tokens=False)["input_ids"])


class RowText:
    """Incremental detokenization of one row: keep the ids, decode a sliding window and append
    only complete characters (a trailing U+FFFD means a multi-byte character is still partial)."""

    def __init__(self, tok, eos_ids: set[int]) -> None:
        self.tok = tok
        self.eos_ids = eos_ids
        self.ids: list[int] = []
        self.text = ""
        self.finished = False  # an EOS arrived: later ids are padding
        self._prefix = 0
        self._read = 0

    def _decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True)

    def add(self, new_ids: list[int]) -> None:
        for t in new_ids:
            if self.finished:
                break
            if t in self.eos_ids:
                self.finished = True
                break
            self.ids.append(t)
        if len(self.ids) == self._read:
            return
        prefix_text = self._decode(self.ids[self._prefix:self._read])
        new_text = self._decode(self.ids[self._prefix:])
        if len(new_text) > len(prefix_text) and not new_text.endswith("\ufffd"):
            self.text += new_text[len(prefix_text):]
            self._prefix, self._read = self._read, len(self.ids)


def find_stop(text: str, stops: list[str]) -> int:
    """Index of the earliest stop string in ``text``, or -1."""
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(hits) if hits else -1


def _held_back(text: str, stops: list[str]) -> int:
    """Length of the longest suffix of ``text`` that could be the start of a stop string."""
    best = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:n]):
                best = n
                break
    return best


def _tokens_until_stop(tok, ids: list[int], stops: list[str]) -> int:
    """Fewest leading tokens of ``ids`` whose text contains a stop string (binary search: a
    prefix that contains one stays containing it as tokens are added)."""
    lo, hi = 1, len(ids)
    while lo < hi:
        mid = (lo + hi) // 2
        if find_stop(tok.decode(ids[:mid], skip_special_tokens=True), stops) >= 0:
            hi = mid
        else:
            lo = mid + 1
    return hi


# ---- the command ----------------------------------------------------------------------------------------------
def _validate(max_new_tokens: int, temperature: float | None, top_k: int | None, top_p: float | None,
              min_p: float | None, repetition_penalty: float | None, batch_size: int, stops: list[str],
              device: str, seed: int | None) -> None:
    if max_new_tokens < 1:
        raise InputError(f"--max-new-tokens must be at least 1, got {max_new_tokens}")
    if temperature is not None and not 0 <= temperature < math.inf:
        raise InputError(f"--temperature must be a finite number >= 0, got {temperature}")
    if top_k is not None and top_k < 0:
        raise InputError(f"--top-k must be >= 0 (0 = off), got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise InputError(f"--top-p must be in (0, 1], got {top_p}")
    if min_p is not None and not 0 <= min_p < 1:
        raise InputError(f"--min-p must be in [0, 1), got {min_p}")
    if repetition_penalty is not None and not 0 < repetition_penalty < math.inf:
        raise InputError(f"--repetition-penalty must be a finite number > 0, got {repetition_penalty}")
    if batch_size < 1:
        raise InputError(f"--batch-size must be at least 1, got {batch_size}")
    if any(s == "" for s in stops):
        raise InputError("--stop must not be empty")
    check_seed(seed, "--seed")
    d = device.strip().lower()
    if d not in ("auto", "cpu", "cuda") and not (d.startswith("cuda:") and d[5:].isdigit()):
        raise InputError(f"--device must be auto, cpu, cuda or cuda:N, got {device!r}")


def _id_list(value: Any) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, (list, tuple)) else [int(value)]


def _human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def _peak_memory(device, cuda_peak: int | None) -> str:
    if device.type == "cuda" and cuda_peak is not None:
        return f"{_human_bytes(cuda_peak)} ({device})"
    try:
        import resource

        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return f"{_human_bytes(rss if sys.platform == 'darwin' else rss * 1024)} (process RSS)"
    except (ImportError, OSError):
        return "unknown"


def generate(
    model: Annotated[Path, typer.Argument(help="Model directory (Hugging Face layout, with a tokenizer).",
                                          show_default=False)],
    prompt: Annotated[Optional[str], typer.Option("--prompt", "-p", help="The prompt (one).")] = None,
    prompt_file: Annotated[Optional[Path], typer.Option(
        "--prompt-file", "-f", help="Prompts: text (one per line) or .jsonl ({\"prompt\": ...} or {\"messages\": [...]} per line).")] = None,
    chat: Annotated[bool, typer.Option("--chat", help="Apply the tokenizer's chat template to plain prompts.")] = False,
    system: Annotated[Optional[str], typer.Option("--system", help="System message (implies --chat).")] = None,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", "-n", help="Most tokens to generate per prompt.")] = 256,
    temperature: Annotated[Optional[float], typer.Option(
        "--temperature", "-t", help="Sampling temperature; 0 = greedy. [default: generation_config.json, else 1.0]")] = None,
    top_k: Annotated[Optional[int], typer.Option("--top-k", help="Keep the k most likely tokens; 0 = off. [default: generation_config.json, else 0]")] = None,
    top_p: Annotated[Optional[float], typer.Option("--top-p", help="Nucleus sampling, in (0, 1]. [default: generation_config.json, else 1.0]")] = None,
    min_p: Annotated[Optional[float], typer.Option("--min-p", help="Drop tokens below min_p x the top probability. [default: generation_config.json, else 0]")] = None,
    repetition_penalty: Annotated[Optional[float], typer.Option(
        "--repetition-penalty", help="Penalize tokens already present (> 1 discourages). [default: generation_config.json, else 1.0]")] = None,
    seed: Annotated[Optional[int], typer.Option("--seed", help="Random seed: the same seed, inputs and options give the same output.")] = None,
    greedy: Annotated[bool, typer.Option("--greedy", help="Always pick the most likely token (no sampling).")] = False,
    stop: Annotated[Optional[list[str]], typer.Option("--stop", help="Stop when this text appears; it is cut from the output (repeatable).")] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", "-b", help="Prompts generated together.")] = 8,
    adapter: Annotated[Optional[Path], typer.Option(
        "--adapter", help="PEFT LoRA adapter directory (adapter_config.json + adapter_model.safetensors), merged "
                          "into the model before generating.")] = None,
    device: DeviceOpt = "auto",
    dtype: Annotated[Optional[DType], typer.Option("--dtype", case_sensitive=False,
                                                   help="Compute dtype. [default: fp32 on CPU, bf16 on CUDA]")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print one JSON object per prompt (JSON Lines) on stdout; see above.")] = False,
    quiet: QuietOpt = False,
) -> None:
    """Generate text from a prompt, a prompt file or stdin.

    One prompt streams its text to stdout; several are generated `--batch-size` at a time and
    printed in input order (a header per prompt on stderr). Speeds and peak memory go to stderr.

    `--prompt-file`: `*.jsonl` is JSON Lines with `{"prompt": str}` or `{"messages": [{"role", "content"}]}`
    per line; other files hold one prompt per line. Stdin (when neither option is given) is one
    prompt, or JSON Lines when it starts with `{`.

    `--json` prints one object per prompt: `index`, `prompt`, `text`, `prompt_tokens`,
    `completion_tokens`, `finish_reason` (eos, length, stop, interrupted) and `timings`
    (`prefill_s`, `decode_s`, `tokens_per_s`). Ctrl-C prints what was generated and exits 130.

    `--adapter DIR` merges a PEFT-format LoRA adapter into the weights first (decoding runs at base speed).
    """
    stops = list(stop or [])
    _validate(max_new_tokens, temperature, top_k, top_p, min_p, repetition_penalty, batch_size, stops, device, seed)
    records = read_prompts(prompt, prompt_file)
    chat = chat or system is not None
    out = Output(json_mode=json_out, quiet=quiet or json_out)  # --json: stdout only, warnings aside

    import time

    from rich.markup import escape

    from nemotron_core.generation import (PREFILL_BUCKET, Decoder, NonFiniteLogitsError, SamplingConfig,
                                          broken_logits_message)
    from nemotron_core.generation import generate as core_generate
    from nemotron_core.modeling.model import NemotronHForCausalLM

    dev = resolve_device(device)
    if dtype is None:
        dtype = DType.bf16 if dev.type == "cuda" else DType.fp32
    t0 = time.perf_counter()
    with out.working(f"loading {model} ..."):
        lm = NemotronHForCausalLM.from_pretrained(model, dtype=dtype.to_torch(), device=dev)
        if adapter is not None:
            from nemotron_core.lora import load_adapter

            lora = load_adapter(lm, adapter, merge=True)
        tok = load_tokenizer(model)
    load_s = time.perf_counter() - t0

    gen_cfg = lm.generation_config
    gen_file = Path(model) / "generation_config.json"
    from_file: list[str] = []

    def pick(value, key: str, default, kind):
        """The option if given, else what generation_config.json sets (transformers 5 leaves unset
        fields None), else our default."""
        if value is not None:
            return value
        v = getattr(gen_cfg, key, None)
        if v is None:
            return default
        try:
            v = kind(v)
        except (TypeError, ValueError):
            raise InputError(f"{gen_file}: {key} must be a number, got {v!r}") from None
        from_file.append(key)
        return v

    vocab = lm.config.vocab_size
    try:
        eos_ids = _id_list(getattr(gen_cfg, "eos_token_id", None))
    except (TypeError, ValueError):
        raise InputError(f"{gen_file}: eos_token_id must be a token id or a list of them") from None
    bad = next((i for i in eos_ids if not 0 <= i < vocab), None)
    if bad is not None:
        raise InputError(f"{gen_file}: eos_token_id {bad} is outside the vocabulary [0, {vocab})")
    if tok.eos_token_id is not None and tok.eos_token_id not in eos_ids:
        eos_ids.append(int(tok.eos_token_id))
    pad_id = next((int(v) for v in (getattr(gen_cfg, "pad_token_id", None), tok.pad_token_id) if v is not None), 0)
    temp = pick(temperature, "temperature", 1.0, float)
    sampling_options = (temperature, top_k, top_p, min_p)
    # The file's do_sample: false means greedy (as in transformers' generate), unless a sampling option
    # is given on the command line, which asks for sampling outright.
    file_greedy = getattr(gen_cfg, "do_sample", None) is False and all(o is None for o in sampling_options)
    cfg = SamplingConfig(
        max_new_tokens=max_new_tokens, temperature=temp, top_k=pick(top_k, "top_k", 0, int),
        top_p=pick(top_p, "top_p", 1.0, float), min_p=pick(min_p, "min_p", 0.0, float),
        repetition_penalty=pick(repetition_penalty, "repetition_penalty", 1.0, float),
        do_sample=not greedy and not file_greedy and temp > 0, seed=seed, eos_token_ids=eos_ids)
    try:
        cfg.validate()
    except InputError as e:
        if not from_file:
            raise
        raise InputError(f"{e} ({gen_file} sets {', '.join(from_file)})") from None

    encoded = [encode(tok, r, chat, system) for r in records]
    limit = getattr(lm.config, "max_position_embeddings", None)
    for r, ids in zip(records, encoded):
        if not ids:
            raise InputError(f"{r.where}: the prompt encodes to no tokens")
        if limit and len(ids) >= limit:
            raise InputError(f"{r.where}: the prompt has {len(ids)} tokens; the model's limit is {limit} positions")

    # Only now, so that a bad prompt still fails with exactly one line on stderr.
    out.info(escape(f"loaded {model} on {dev} in {dtype} ({load_s:.1f} s)"))
    if adapter is not None:
        out.info(escape(f"merged LoRA adapter {adapter} (r={lora['r']}, alpha={lora['alpha']:g}, "
                        f"{lora['modules']} modules)"))
    eos_set = set(eos_ids)
    stream = len(records) == 1 and not json_out
    totals = {"prompt": 0, "prefill_s": 0.0, "completion": 0, "decode_s": 0.0}
    peak_cuda: int | None = None
    capped_warned = False
    interrupted = False

    # One decoder per batch size, reused across batches: its cache and captured CUDA graphs (decode
    # step, prefill buckets) then serve every batch instead of being rebuilt for each.
    decoders: dict[int, Decoder] = {}
    # Sized for the capped completion (below): a huge --max-new-tokens must not size a huge cache.
    room = max(len(p) for p in encoded) + max_new_tokens + PREFILL_BUCKET
    if limit:
        room = min(room, limit + PREFILL_BUCKET)
    for start in range(0, len(records), batch_size):
        batch = encoded[start:start + batch_size]
        longest = max(len(p) for p in batch)
        bcfg = cfg
        if limit and longest + max_new_tokens > limit:
            bcfg = dataclasses.replace(cfg, max_new_tokens=limit - longest)
            if not capped_warned:
                out.warn(f"--max-new-tokens {max_new_tokens} capped at {limit - longest}: the model's limit "
                         f"is {limit} positions")
                capped_warned = True
        if seed is not None:
            bcfg = dataclasses.replace(bcfg, seed=seed + start // batch_size)
        rows = [RowText(tok, eos_set) for _ in batch]
        printed = ""

        def on_tokens(new_ids) -> list[bool] | None:
            nonlocal printed
            stop_rows = [False] * len(rows)
            for r, row in enumerate(rows):
                if row.finished:
                    continue
                before = len(row.text)
                row.add(new_ids[r].tolist())
                if stops:
                    tail = row.text[max(0, before - max(len(s) for s in stops) + 1):]
                    if find_stop(tail, stops) >= 0:
                        stop_rows[r] = row.finished = True  # the core pads the row from here on
            if stream:
                show = rows[0].text
                if stops:
                    cut = find_stop(show, stops)
                    # Never print what may turn out to be (the start of) a stop string.
                    show = show[:cut] if cut >= 0 else show[:len(show) - _held_back(show, stops)]
                if len(show) > len(printed):
                    piece = show[len(printed):]
                    printed = show
                    out.write(piece)
            return stop_rows if any(stop_rows) else None

        need_cb = stream or bool(stops)
        decoder = decoders.get(len(batch))
        if decoder is None:
            decoder = decoders[len(batch)] = Decoder(lm, len(batch), room)
        try:
            result = core_generate(lm, batch, bcfg, pad_id=pad_id, on_tokens=on_tokens if need_cb else None,
                                   decoder=decoder)
        except NonFiniteLogitsError as e:  # on the prompt's logits, or a later token's
            if e.row is None or len(records) == 1:
                raise NemotronError(f"{model}: {e}") from None
            # Name the prompt by its place in the input (as --json's "index"), not by its batch row.
            raise NemotronError(f"{model}: {broken_logits_message(e.after, f' (prompt {start + e.row})')}") from None
        except RuntimeError as e:  # torch.multinomial on NaN/inf probabilities (an overflowing transform)
            if "probability tensor contains" not in str(e):
                raise
            raise NemotronError(f"{model}: the model's next-token probabilities are NaN or inf; "
                                "are its weights finite?") from None
        if result.peak_memory_bytes is not None:
            peak_cuda = max(peak_cuda or 0, result.peak_memory_bytes)
        totals["prompt"] += sum(result.prompt_tokens)
        totals["prefill_s"] += result.prefill_seconds
        totals["decode_s"] += result.decode_seconds

        for j, (seq, reason) in enumerate(zip(result.sequences, result.finish_reasons)):
            idx = start + j
            body = seq[:-1] if reason == "eos" and seq and seq[-1] in eos_set else seq
            text = tok.decode(body, skip_special_tokens=True)
            n_tokens = len(seq)
            cut = find_stop(text, stops) if stops else -1
            if cut >= 0:
                text = text[:cut]
                if reason != "interrupted":
                    reason = "stop"
                n_tokens = _tokens_until_stop(tok, body, stops)
            totals["completion"] += n_tokens
            decode_s = result.decode_seconds
            if json_out:
                out.emit_line({
                    "index": idx, "prompt": records[idx].source, "text": text,
                    "prompt_tokens": result.prompt_tokens[j], "completion_tokens": n_tokens,
                    "finish_reason": reason,
                    "timings": {"prefill_s": round(result.prefill_seconds, 6), "decode_s": round(decode_s, 6),
                                "tokens_per_s": round(n_tokens / decode_s, 3) if decode_s > 0 else None},
                })
            elif stream:
                rest = text[len(printed):]
                out.write(rest + ("" if (printed + rest).endswith("\n") else "\n"))
            else:
                rec = records[idx]
                preview = (rec.text if rec.messages is None else rec.messages[-1]["content"]).replace("\n", " ")
                preview = preview if len(preview) <= 60 else preview[:57] + "..."
                out.info(escape(f"[{idx + 1}/{len(records)}] {preview}"))
                out.write(text + ("" if text.endswith("\n") else "\n"))
        if "interrupted" in result.finish_reasons:
            interrupted = True
            break

    if not json_out:
        pre_s, dec_s = totals["prefill_s"], totals["decode_s"]
        pre_rate = f"{totals['prompt'] / pre_s:,.1f} tok/s" if pre_s > 0 else "-"
        dec_rate = f"{totals['completion'] / dec_s:,.1f} tok/s" if dec_s > 0 else "-"
        out.info(f"prefill: {totals['prompt']} tokens in {pre_s:.2f} s ({pre_rate}) | "
                 f"decode: {totals['completion']} tokens in {dec_s:.2f} s ({dec_rate}) | "
                 f"peak memory: {_peak_memory(dev, peak_cuda)}")
    if interrupted:
        sys.stderr.write("interrupted\n")
        sys.stderr.flush()
        raise typer.Exit(EXIT_INTERRUPTED)


def register(app: typer.Typer) -> None:
    app.command("generate", epilog=example_epilog(
        "nemotron generate ./tiny-model --prompt 'Hello' --max-new-tokens 32 --greedy",
        "nemotron generate ./model --chat --system 'Be brief.' -p 'What is a hybrid model?' --temperature 0.7 --top-p 0.9",
        "nemotron generate ./model --prompt-file prompts.jsonl --json --seed 0 > out.jsonl",
        "nemotron generate ./model --adapter ./my-lora -p 'Hello' --greedy",
        "echo 'Once upon a time' | nemotron generate ./model --stop $'\\n\\n' --quiet",
    ))(cli_command(generate))
