"""Evaluation: perplexity over JSON Lines data, and an lm-evaluation-harness model adapter.

Perplexity scores exactly the tokens fine-tuning trains (``nemotron_core.data``: every token of a
``text`` example, the completion and EOS of a ``prompt`` + ``completion`` one, the assistant turns of
``messages``), summing each token's negative log-likelihood in fp32 and the sums in fp64::

    examples = load_examples("dev.jsonl", tokenizer, max_length=4096)
    report = perplexity(model, examples)     # {"loss", "perplexity", "tokens", "examples", "bits_per_token"}

lm-evaluation-harness (``pip install 'nemotron[eval]'``; never needed by anything else here):

    results = run_lm_eval("./model", ["hellaswag"], num_fewshot=0, limit=100)   # simple_evaluate's dict
    results = run_lm_eval("./model", ["my_task"], include_path="./tasks")       # local task YAMLs

``NemotronEvalModel`` answers the harness's three request types (``loglikelihood``,
``loglikelihood_rolling``, ``generate_until``) without importing lm_eval, from anything with an
``args`` tuple (an ``lm_eval.api.instance.Instance``) or from plain tuples. ``NemotronLM`` is the same
class on top of ``lm_eval.api.model.LM``; it is built on first use (``make_lm_eval_model``,
``run_lm_eval``, ``register_lm_eval`` or ``from nemotron_core.evaluation import NemotronLM``), and is
then registered as model ``"nemotron"``, so ``lm_eval.simple_evaluate(model="nemotron",
model_args="pretrained=./model")`` works in the same process.

Conventions follow the harness's Hugging Face model (HFLM) so that scores are comparable:
a context is encoded with the tokenizer's special tokens (its BOS, as in training and ``nemotron
generate``), the continuation is the encoding of ``context + continuation`` past the context's
tokens (trailing spaces of the context move to the continuation), an empty context is the BOS (or
EOS when there is none), and rolling log-likelihoods use disjoint windows of ``max_length`` tokens
each conditioned on as much preceding text as fits. One deliberate difference: a rolling document is
encoded without special tokens and conditioned on the BOS, so its score is that of its own tokens
(HFLM 0.4.x encodes it with the tokenizer's BOS and prepends the BOS again, scoring BOS after BOS).
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from .errors import InputError

__all__ = [
    "perplexity",
    "load_for_eval",
    "NemotronEvalModel",
    "rolling_windows",
    "make_lm_eval_model",
    "register_lm_eval",
    "run_lm_eval",
    "LM_EVAL_HINT",
]

LM_EVAL_HINT = "pip install 'nemotron[eval]'"


# ---- perplexity -----------------------------------------------------------------------------------------------
@torch.no_grad()
def perplexity(model: torch.nn.Module, examples: Sequence[Any], batch_size: int = 8, pack: bool = False,
               max_tokens: int | None = None, pad_id: int = 0,
               on_batch: Callable[[int, int], None] | None = None) -> dict[str, float | int]:
    """Token-weighted mean negative log-likelihood over the trained tokens of ``examples``.

    Args:
        model: a ``NemotronHForCausalLM`` (any dtype; the loss is computed in fp32).
        examples: ``nemotron_core.data.Example`` objects (e.g. from ``load_examples``); their labels
            say which tokens count.
        batch_size: examples per padded batch (with ``pack``: only sets the default ``max_tokens``).
        pack: pack examples into THD rows instead of padding (the same numbers, less padding).
        max_tokens: packed row capacity (default ``batch_size`` x the longest example).
        pad_id: token id written into padding (never scored).
        on_batch: called as ``on_batch(done, total)`` after each batch (progress).

    Returns:
        ``{"loss": mean NLL (nats/token), "perplexity": exp(loss), "tokens": scored tokens,
        "examples": len(examples), "bits_per_token": loss / ln 2}``.

    Runs under ``torch.no_grad()`` with the model in eval mode (its mode is restored afterwards).
    For a model with an MTP head this is the next-token loss alone.
    """
    from .data import count_trained_tokens, make_batches

    if not examples:
        raise InputError("no examples to evaluate")
    batches = make_batches(list(examples), batch_size, pack=pack, max_tokens=max_tokens, shuffle=False,
                           pad_id=pad_id)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total = torch.zeros((), dtype=torch.float64, device=device)
    tokens = 0
    try:
        for done, batch in enumerate(batches, 1):
            n = count_trained_tokens(batch)
            if n:
                kwargs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
                # num_items_in_batch=1: the loss is the fp32 *sum* of the scored tokens' NLL.
                total += model(**kwargs, num_items_in_batch=1).loss.double()
                tokens += n
            if on_batch is not None:
                on_batch(done, len(batches))
    finally:
        model.train(was_training)
    if tokens == 0:
        raise InputError("the examples have no scored token")
    loss = float(total) / tokens
    return {"loss": loss, "perplexity": math.exp(loss) if loss < 700 else math.inf, "tokens": tokens,
            "examples": len(examples), "bits_per_token": loss / math.log(2)}


# ---- loading --------------------------------------------------------------------------------------------------
def load_for_eval(model_dir: str | os.PathLike, adapter: str | os.PathLike | None = None,
                  device: str | torch.device | None = None, dtype: str | torch.dtype | None = None,
                  tokenizer: Any = None) -> tuple[torch.nn.Module, Any]:
    """Load a local model directory (and merge a PEFT LoRA ``adapter``) with its tokenizer, in eval mode.

    ``device`` defaults to CUDA when available, else CPU; ``dtype`` to bf16 on CUDA, fp32 on CPU.
    A ``tokenizer`` already loaded is returned as it is."""
    from transformers import AutoTokenizer

    from .modeling.model import NemotronHForCausalLM

    dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if dtype is None:
        dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    model = NemotronHForCausalLM.from_pretrained(model_dir, dtype=dtype, device=dev)
    if adapter is not None:
        from .lora import load_adapter

        load_adapter(model, adapter, merge=True)
    if tokenizer is None:
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True, trust_remote_code=False)
        except (OSError, ValueError, KeyError) as e:
            raise InputError(f"{model_dir}: cannot load the tokenizer ({' '.join(str(e).split())})") from None
    model.eval()
    return model, tokenizer


# ---- the harness's request types, without lm_eval -----------------------------------------------------------------
def rolling_windows(tokens: list[int], prefix_token: int, max_length: int) -> list[tuple[list[int], list[int]]]:
    """Disjoint ``(context, continuation)`` windows that score every token of ``tokens`` once.

    The same windows as lm_eval's ``get_rolling_token_windows(tokens, prefix_token, max_length,
    context_len=1)`` followed by ``make_disjoint_window``: the first window predicts up to
    ``max_length`` tokens after ``prefix_token``; each later one predicts the next ``max_length`` tokens
    (fewer at the end) conditioned on the ``max_length`` tokens before its last one."""
    if max_length < 1:
        raise InputError(f"max_length must be at least 1, got {max_length}")
    if not tokens:
        return []
    first = min(max_length, len(tokens))
    windows = [([prefix_token], tokens[:first])]
    done = first
    while done < len(tokens):
        n = min(len(tokens) - done, max_length)
        end = done + n
        window = tokens[end - max_length - 1:end - 1]
        windows.append((window[:len(window) - (n - 1)], tokens[end - n:end]))
        done = end
    return windows


def _request_args(request: Any) -> tuple:
    """``Instance.args`` for harness requests; plain tuples (or a bare string) are taken as they are."""
    args = getattr(request, "args", request)
    return args if isinstance(args, tuple) else (args,)


def _id_list(value: Any) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, (list, tuple)) else [int(value)]


class NemotronEvalModel:
    """The lm-evaluation-harness request types on a ``NemotronHForCausalLM`` and its tokenizer.

    Independent of lm_eval: requests are anything with an ``args`` tuple (``Instance``) or plain
    tuples. ``NemotronLM`` adds ``lm_eval.api.model.LM`` on top.

    Args:
        model: the model (put in eval mode).
        tokenizer: its Hugging Face tokenizer.
        batch_size: sequences per forward pass (scoring) or per ``generate`` call.
        max_length: the longest window, in tokens (default: ``max_position_embeddings``).
        max_gen_toks: default ``max_gen_toks`` of ``generate_until`` requests (capped at ``max_length - 1``).
    """

    def __init__(self, model: torch.nn.Module, tokenizer: Any, batch_size: int = 8, max_length: int | None = None,
                 max_gen_toks: int = 256) -> None:
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise InputError(f"batch_size must be a positive integer, got {batch_size!r}")
        limit = getattr(model.config, "max_position_embeddings", None)
        if max_length is None:
            max_length = limit or 4096
        if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 2:
            raise InputError(f"max_length must be an integer of at least 2, got {max_length!r}")
        if limit and max_length > limit:
            raise InputError(f"max_length {max_length} exceeds the model's limit of {limit} positions")
        if isinstance(max_gen_toks, bool) or not isinstance(max_gen_toks, int) or max_gen_toks < 1:
            raise InputError(f"max_gen_toks must be a positive integer, got {max_gen_toks!r}")
        model.eval()
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.max_length = max_length
        self.max_gen_toks = max_gen_toks
        gen = getattr(model, "generation_config", None)
        eos = _id_list(getattr(gen, "eos_token_id", None))
        if tokenizer.eos_token_id is not None and int(tokenizer.eos_token_id) not in eos:
            eos.append(int(tokenizer.eos_token_id))
        self.eos_token_ids = eos
        self.pad_token_id = next((int(v) for v in (getattr(gen, "pad_token_id", None), tokenizer.pad_token_id)
                                  if v is not None), 0)

    # ---- tokens ----
    @property
    def eot_token_id(self) -> int:
        """End of text: the tokenizer's EOS (else the first of the model's EOS ids)."""
        if self.tokenizer.eos_token_id is not None:
            return int(self.tokenizer.eos_token_id)
        if not self.eos_token_ids:
            raise InputError("the tokenizer has no EOS token and the generation config names none")
        return self.eos_token_ids[0]

    @property
    def prefix_token_id(self) -> int:
        """What an empty context (and a rolling document) is conditioned on: BOS, else EOS."""
        bos = self.tokenizer.bos_token_id
        return int(bos) if bos is not None else self.eot_token_id

    def tok_encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text``, with the tokenizer's BOS when ``add_special_tokens`` (never a
        tokenizer-added EOS)."""
        from .data import _encode

        return _encode(self.tokenizer, text, add_special_tokens=add_special_tokens)

    def tok_decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """``(context_ids, continuation_ids)`` as the harness's HFLM splits them."""
        if context == "":
            cont = self.tok_encode(continuation, add_special_tokens=False)
            prefix = self.prefix_token_id
            return ([prefix], cont) if not cont or cont[0] != prefix else (cont[:1], cont[1:])
        spaces = len(context) - len(context.rstrip())
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        whole = self.tok_encode(context + continuation)
        ctx = self.tok_encode(context)
        return ctx, whole[len(ctx):]

    # ---- loglikelihood ----
    @torch.no_grad()
    def loglikelihood_tokens(self, pairs: Sequence[tuple[Sequence[int], Sequence[int]]]) -> list[tuple[float, bool]]:
        """``(sum log p(continuation | context), is_greedy)`` per ``(context_ids, continuation_ids)``.

        Log-probabilities come from an fp32 log-softmax of the logits and are summed in fp64.
        ``is_greedy``: every continuation token is the argmax at its position. The input is cut from
        the left to ``max_length`` tokens; an empty context is conditioned on ``prefix_token_id``."""
        results: list[tuple[float, bool] | None] = [None] * len(pairs)
        rows: list[tuple[int, list[int], list[int]]] = []
        for i, (ctx, cont) in enumerate(pairs):
            ctx, cont = [int(t) for t in ctx], [int(t) for t in cont]
            if not cont:
                results[i] = (0.0, True)
                continue
            if len(cont) > self.max_length:
                raise InputError(f"a continuation of {len(cont)} tokens does not fit max_length {self.max_length}")
            full = ((ctx or [self.prefix_token_id]) + cont)[-(self.max_length + 1):]
            rows.append((i, full[:-1], cont))
        rows.sort(key=lambda r: -len(r[1]))  # similar lengths together: little padding
        device = self.model.device
        for start in range(0, len(rows), self.batch_size):
            chunk = rows[start:start + self.batch_size]
            width = max(len(inp) for _, inp, _ in chunk)
            ids = torch.full((len(chunk), width), self.pad_token_id, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for r, (_, inp, _) in enumerate(chunk):
                ids[r, :len(inp)] = torch.tensor(inp, dtype=torch.long)
                mask[r, :len(inp)] = 1
            padded = bool((mask == 0).any())
            logits = self.model(input_ids=ids.to(device), attention_mask=mask.to(device) if padded else None).logits
            for r, (i, inp, cont) in enumerate(chunk):
                n, k = len(inp), len(cont)
                logp = logits[r, n - k:n].float().log_softmax(-1)
                target = torch.tensor(cont, dtype=torch.long, device=logp.device)
                score = logp.gather(-1, target[:, None]).double().sum()
                results[i] = (float(score), bool((logp.argmax(-1) == target).all()))
        return results  # type: ignore[return-value]

    def loglikelihood(self, requests: Sequence[Any], disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        """Requests ``(context, continuation)`` -> ``(log p(continuation | context), is_greedy)``."""
        args = [_request_args(r) for r in requests]
        results = self.loglikelihood_tokens([self.encode_pair(ctx, cont) for ctx, cont in args])
        for a, res in zip(args, results):
            self._cache("loglikelihood", a, res)
        return results

    def loglikelihood_rolling(self, requests: Sequence[Any], disable_tqdm: bool = False) -> list[float]:
        """Requests ``(text,)`` -> the log-likelihood of the whole text (every token scored once,
        conditioned on ``prefix_token_id`` and then on up to ``max_length`` preceding tokens)."""
        out = []
        for req in requests:
            (text,) = _request_args(req)[:1]
            windows = rolling_windows(self.tok_encode(text, add_special_tokens=False), self.prefix_token_id,
                                      self.max_length)
            total = math.fsum(lp for lp, _ in self.loglikelihood_tokens(windows))
            self._cache("loglikelihood_rolling", (text,), total)
            out.append(total)
        return out

    # ---- generation ----
    def _sampling(self, gen_kwargs: dict[str, Any]) -> tuple[list[str], Any]:
        from .generation import SamplingConfig

        kw = dict(gen_kwargs or {})
        until = kw.pop("until", None)
        until = [until] if isinstance(until, str) else list(until or [])
        if any(not isinstance(u, str) for u in until):
            raise InputError(f"until must be a string or a list of strings, got {until!r}")
        until = [u for u in until if u]
        max_new = int(kw.pop("max_gen_toks", kw.pop("max_new_tokens", self.max_gen_toks)))
        # As with transformers' generate: sampling only when asked for (do_sample=True).
        do_sample = bool(kw.get("do_sample", False))
        temperature = float(kw.get("temperature", 1.0 if do_sample else 0.0))
        cfg = SamplingConfig(
            max_new_tokens=max(1, min(max_new, self.max_length - 1)), temperature=temperature,
            top_k=int(kw.get("top_k") or 0), top_p=float(kw.get("top_p") or 1.0), min_p=float(kw.get("min_p") or 0.0),
            repetition_penalty=float(kw.get("repetition_penalty") or 1.0), do_sample=do_sample and temperature > 0,
            seed=None if kw.get("seed") is None else int(kw["seed"]), eos_token_ids=list(self.eos_token_ids))
        cfg.validate()
        return until, cfg

    def generate_until(self, requests: Sequence[Any], disable_tqdm: bool = False) -> list[str]:
        """Requests ``(context, gen_kwargs)`` -> the generated text, cut before the first ``until`` string.

        ``gen_kwargs``: ``until`` (str or list), ``max_gen_toks`` (default ``self.max_gen_toks``),
        ``do_sample`` (default False: greedy), ``temperature``, ``top_k``, ``top_p``, ``min_p``,
        ``repetition_penalty``, ``seed``; other keys are ignored. Generation also stops at EOS. The
        context keeps its last ``max_length - max_gen_toks`` tokens."""
        from .generation import generate

        args = [_request_args(r) for r in requests]
        results: list[str | None] = [None] * len(args)
        groups: dict[str, list[int]] = {}
        for i, a in enumerate(args):
            gen_kwargs = a[1] if len(a) > 1 else {}
            groups.setdefault(json.dumps(gen_kwargs, sort_keys=True, default=str), []).append(i)
        for idxs in groups.values():
            a0 = args[idxs[0]]
            until, cfg = self._sampling(a0[1] if len(a0) > 1 else {})
            keep = self.max_length - cfg.max_new_tokens
            prompts = {i: (self.tok_encode(args[i][0]) or [self.prefix_token_id])[-keep:] for i in idxs}
            order = sorted(idxs, key=lambda i: -len(prompts[i]))
            for start in range(0, len(order), self.batch_size):
                chunk = order[start:start + self.batch_size]
                texts = self._generate_chunk(generate, [prompts[i] for i in chunk], cfg, until)
                for i, text in zip(chunk, texts):
                    results[i] = text
                    self._cache("generate_until", args[i], text)
        return results  # type: ignore[return-value]

    def _generate_chunk(self, generate: Callable[..., Any], prompts: list[list[int]], cfg: Any,
                        until: list[str]) -> list[str]:
        eos = set(self.eos_token_ids)
        ids: list[list[int]] = [[] for _ in prompts]
        ended = [False] * len(prompts)  # EOS seen or an until string produced

        def text_of(row: list[int]) -> str:
            return self.tok_decode(row)

        def on_tokens(new_ids: torch.Tensor) -> list[bool] | None:
            stop = [False] * len(prompts)
            for r, new in enumerate(new_ids.tolist()):
                if ended[r]:
                    continue
                for t in new:
                    if t in eos:
                        ended[r] = True
                        break
                    ids[r].append(t)
                if not ended[r]:
                    text = text_of(ids[r])
                    if any(u in text for u in until):
                        ended[r] = stop[r] = True
            return stop if any(stop) else None

        out = generate(self.model, prompts, cfg, pad_id=self.pad_token_id, on_tokens=on_tokens if until else None)
        texts = []
        for seq in out.sequences:
            cut = next((j for j, t in enumerate(seq) if t in eos), len(seq))
            text = text_of(seq[:cut])
            hits = [p for p in (text.find(u) for u in until) if p >= 0]
            texts.append(text[:min(hits)] if hits else text)
        return texts

    def _cache(self, kind: str, args: tuple, result: Any) -> None:
        hook = getattr(self, "cache_hook", None)  # lm_eval's CachingLM sets one on LM subclasses
        if hook is not None:
            hook.add_partial(kind, args, result)

    # ---- chat ----
    @property
    def tokenizer_name(self) -> str:
        return str(getattr(self.tokenizer, "name_or_path", "") or "nemotron").replace("/", "__")

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        if chat_template is False or chat_template is None:
            return None
        template = getattr(self.tokenizer, "chat_template", None)
        if isinstance(template, dict):
            name = chat_template if isinstance(chat_template, str) else "default"
            if name not in template:
                raise InputError(f"no chat template named {name!r}; the tokenizer has {sorted(template)}")
            return template[name]
        return template

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        return self.tokenizer.apply_chat_template(chat_history, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt,
                                                  continue_final_message=not add_generation_prompt)


# ---- lm_eval ----------------------------------------------------------------------------------------------------
_LM_CLASS: type | None = None


def _no_downloads() -> None:
    """Keep lm-eval's ``datasets`` from reaching the Hub: this toolkit never fetches at run time.

    Built-in tasks then run only from datasets already in the local cache; local task YAMLs
    (``dataset_path: json`` + ``data_files``) always work. ``datasets`` reads the variables when it
    is imported, so they are set first, and patched in case it was imported earlier."""
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    os.environ["HF_HUB_OFFLINE"] = "1"
    config = sys.modules.get("datasets.config")
    if config is not None:
        for name in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"):
            if hasattr(config, name):
                setattr(config, name, True)


def _import_lm_eval() -> Any:
    _no_downloads()
    try:
        import lm_eval
        import lm_eval.api.model  # noqa: F401
        import lm_eval.api.registry  # noqa: F401
    except ImportError as e:
        raise ImportError(f"lm-evaluation-harness is not installed ({e}); {LM_EVAL_HINT}") from e
    return lm_eval


def _batch_size(value: Any) -> int:
    """lm_eval hands batch sizes as ints or strings ("8", "auto", "auto:4"); auto means our default."""
    if isinstance(value, str):
        value = value.strip().lower()
        if value.startswith("auto") or value == "":
            return 8
        try:
            value = int(value)
        except ValueError:
            raise InputError(f"batch_size must be a positive integer or auto, got {value!r}") from None
    return 8 if value is None else value


def register_lm_eval() -> type:
    """Build ``NemotronLM`` (an ``lm_eval.api.model.LM``) and register it as lm_eval model ``"nemotron"``.

    Idempotent; raises ImportError with the install hint when lm_eval is missing."""
    global _LM_CLASS
    if _LM_CLASS is not None:
        return _LM_CLASS
    lm_eval = _import_lm_eval()
    LM = lm_eval.api.model.LM

    class NemotronLM(NemotronEvalModel, LM):
        """lm-evaluation-harness model for Nemotron-H directories (registered as ``"nemotron"``).

        ``NemotronLM(pretrained="./model", adapter=None, batch_size=8, max_length=None, max_gen_toks=256,
        device=None, dtype=None)`` loads a directory; ``NemotronLM(model=m, tokenizer=t)`` wraps a loaded
        model. ``model_args`` strings (``pretrained=./model,dtype=bf16``) map to the same keywords."""

        def __init__(self, pretrained: str | os.PathLike | None = None, model: torch.nn.Module | None = None,
                     tokenizer: Any = None, adapter: str | os.PathLike | None = None, batch_size: int | str = 8,
                     max_length: int | None = None, max_gen_toks: int = 256, device: str | None = None,
                     dtype: str | torch.dtype | None = None, **_ignored: Any) -> None:
            LM.__init__(self)
            if model is None:
                if pretrained is None:
                    raise InputError("NemotronLM needs pretrained=MODEL_DIR or model= and tokenizer=")
                model, tokenizer = load_for_eval(pretrained, adapter=adapter, device=device or None,
                                                 dtype=dtype or None)
            elif tokenizer is None:
                raise InputError("NemotronLM(model=...) needs the tokenizer too")
            NemotronEvalModel.__init__(self, model, tokenizer, batch_size=_batch_size(batch_size),
                                       max_length=None if max_length is None else int(max_length),
                                       max_gen_toks=int(max_gen_toks))
            self._device = model.device
            self.pretrained = None if pretrained is None else str(pretrained)

        def get_model_info(self) -> dict[str, Any]:
            return {"model_name": self.pretrained or "nemotron", "model_dtype": str(self.model.dtype),
                    "max_length": self.max_length}

    NemotronLM.__module__ = __name__
    NemotronLM.__qualname__ = "NemotronLM"
    lm_eval.api.registry.register_model("nemotron")(NemotronLM)
    _LM_CLASS = NemotronLM
    return NemotronLM


def __getattr__(name: str) -> Any:
    # `from nemotron_core.evaluation import NemotronLM` builds the class (importing lm_eval) on demand.
    if name == "NemotronLM":
        return register_lm_eval()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def make_lm_eval_model(model_dir: str | os.PathLike | None = None, *, model: torch.nn.Module | None = None,
                       tokenizer: Any = None, **kwargs: Any) -> Any:
    """A ``NemotronLM`` for ``lm_eval.simple_evaluate``: from a directory, or around a loaded model.

    Keywords as ``NemotronLM``: ``adapter``, ``batch_size``, ``max_length``, ``max_gen_toks``,
    ``device``, ``dtype``."""
    return register_lm_eval()(pretrained=model_dir, model=model, tokenizer=tokenizer, **kwargs)


def _first_broken_yaml(folder: Path) -> str | None:
    """``"FILE does not parse (PROBLEM)"`` for the first task YAML under ``folder`` that is not valid YAML,
    else None. lm-eval's tags (``!function ...``) are accepted: only the syntax is checked."""
    import yaml

    class _AnyTag(yaml.SafeLoader):
        pass

    _AnyTag.add_multi_constructor("!", lambda loader, tag, node: None)
    for path in sorted(folder.rglob("*.y*ml")):
        try:
            yaml.load(path.read_text(encoding="utf-8"), Loader=_AnyTag)
        except (yaml.YAMLError, UnicodeDecodeError, OSError) as e:
            where = getattr(e, "problem_mark", None)
            at = f"line {where.line + 1}: " if where is not None else ""
            return f"{path} does not parse ({at}{getattr(e, 'problem', None) or e})"
    return None


def resolve_tasks(tasks: Sequence[str], include_path: str | os.PathLike | None = None) -> tuple[list[str], Any]:
    """Check task names (glob patterns allowed, or paths to task YAMLs) and build the TaskManager.

    With ``include_path``, the built-in task index is read only when a name is not found there
    (indexing lm_eval's thousands of task files takes seconds). Raises InputError naming unknown tasks."""
    _import_lm_eval()
    from lm_eval.tasks import TaskManager

    names = [t.strip() for t in tasks if t and t.strip()]
    if not names:
        raise InputError("no tasks given")
    include = None
    if include_path is not None:
        p = Path(include_path)
        if not p.is_dir():
            raise InputError(f"--include-path {p}: no such directory" if not p.exists() else f"--include-path {p}: not a directory")
        include = str(p)

    def missing(tm: Any) -> list[str]:
        return [t for t in names if not (t.endswith((".yaml", ".yml")) and Path(t).is_file()) and not tm.match_tasks([t])]

    manager = None
    if include is not None:
        manager = TaskManager(include_path=include, include_defaults=False)
        if missing(manager):
            manager = None
    if manager is None:
        manager = TaskManager(include_path=include)
    unknown = missing(manager)
    if unknown:
        broken = _first_broken_yaml(Path(include)) if include else None
        if broken:  # lm-eval skips a task file it cannot parse, so the task looks unknown: say why
            raise InputError(f"unknown task{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}: {broken}")
        where = f"in {include} or " if include else ""
        raise InputError(f"unknown task{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}: not found {where}among "
                         "lm-eval's tasks (`lm-eval ls tasks` lists them; --include-path adds a folder of task YAMLs)")
    resolved: list[str] = []
    for t in names:
        found = [t] if (t.endswith((".yaml", ".yml")) and Path(t).is_file()) else manager.match_tasks([t])
        resolved += [f for f in found if f not in resolved]
    return resolved, manager


@contextlib.contextmanager
def _quiet_git_hash() -> Iterator[None]:
    """simple_evaluate records ``git describe`` of the working directory, and git prints "fatal: not a git
    repository" on stderr outside one. Record the hash without that line for the duration."""
    import lm_eval.evaluator as evaluator

    original = getattr(evaluator, "get_git_commit_hash", None)
    if original is None:
        yield
        return

    def quiet() -> str | None:
        import subprocess

        try:
            return subprocess.check_output(["git", "describe", "--always"], stderr=subprocess.DEVNULL).strip().decode()
        except (subprocess.CalledProcessError, OSError):
            return None

    evaluator.get_git_commit_hash = quiet
    try:
        yield
    finally:
        evaluator.get_git_commit_hash = original


def run_lm_eval(model_dir: str | os.PathLike | Any, tasks: Sequence[str] | str, num_fewshot: int | None = None,
                limit: int | float | None = None, include_path: str | os.PathLike | None = None,
                log_samples: bool = False, task_manager: Any = None, **kwargs: Any) -> dict[str, Any]:
    """Run lm-evaluation-harness tasks on a model directory; returns ``simple_evaluate``'s results dict.

    Args:
        model_dir: a model directory, or a ``NemotronLM`` already built (``make_lm_eval_model``).
        tasks: task names or glob patterns (a list, or one comma-separated string), or task YAML paths.
        num_fewshot: few-shot examples per prompt (default: each task's own).
        limit: at most this many documents per task (a float < 1: that fraction).
        include_path: a folder of task YAMLs (e.g. ``dataset_path: json`` with local ``data_files``).
        log_samples: keep per-document samples in ``results["samples"]``.
        task_manager: an ``lm_eval.tasks.TaskManager`` that knows ``tasks`` (from ``resolve_tasks``); then
            the names are used as they are and ``include_path`` is ignored.
        kwargs: ``NemotronLM`` keywords (``adapter``, ``batch_size``, ``max_length``, ``max_gen_toks``,
            ``device``, ``dtype``) when ``model_dir`` is a path; any other keyword goes to
            ``simple_evaluate`` (e.g. ``bootstrap_iters``, ``random_seed``, ``gen_kwargs``).

    Raises ImportError (with the install hint) when lm_eval is missing, InputError for unknown tasks.
    """
    lm_eval = _import_lm_eval()
    if isinstance(tasks, str):
        tasks = tasks.split(",")
    if task_manager is not None:
        names, manager = [t.strip() for t in tasks if t.strip()], task_manager
    else:
        names, manager = resolve_tasks(list(tasks), include_path)
    lm_keys = {"adapter", "batch_size", "max_length", "max_gen_toks", "device", "dtype"}
    lm_kwargs = {k: kwargs.pop(k) for k in list(kwargs) if k in lm_keys}
    cls = register_lm_eval()
    if isinstance(model_dir, cls):
        if lm_kwargs:
            raise InputError(f"{', '.join(sorted(lm_kwargs))}: pass these when building the NemotronLM")
        lm = model_dir
    else:
        lm = make_lm_eval_model(model_dir, **lm_kwargs)
    with _quiet_git_hash():
        try:
            results = lm_eval.simple_evaluate(model=lm, tasks=names, num_fewshot=num_fewshot, limit=limit,
                                              task_manager=manager, log_samples=log_samples, **kwargs)
        except ConnectionError as e:  # datasets, offline (HF_HUB_OFFLINE=1) and the task's data not cached
            raise InputError(f"a task's dataset is not available offline ({' '.join(str(e).split())}); put it in "
                             "the Hugging Face datasets cache first, or use local data files through a task "
                             "YAML in --include-path") from None
    if results is None:  # non-zero ranks of a distributed run
        return {}
    return results
