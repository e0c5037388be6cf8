"""Native generation: static-shape decode with the hybrid cache, sampling on device.

Prefill runs the chunked scan over the prompt (optionally in pieces: chunked prefill) and leaves the
final conv/SSM states and KV rows in the cache. Each decode step then feeds one token per row:
Mamba layers update their state in O(1), attention layers write one KV row at a device-side
position and attend over the whole preallocated buffer under a validity mask. Every shape is fixed,
so on CUDA the step is captured once in a CUDA graph and replayed; the host only looks at the
tokens every ``sync_every`` steps (to stream them and to stop early). Between steps the token is
picked and recorded on the device (``ops.triton_pick``); for greedy decoding that pick is captured
with the step, so a token costs one graph replay and no other launch.
"""
from __future__ import annotations

import gc
import math
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable

import torch

from .batch import BatchMeta
from .cache import NemotronHybridCache
from .errors import InputError, NemotronError, check_seed
from .ops import triton_pick

# Short prompts prefill through a CUDA graph: there the forward is bound by host-side launch cost
# (on an H200, a 128-token prefill of the 30B MoE model took 54 ms of wall time for 23 ms of GPU work;
# mamba-ssm's scan wrapper alone costs ~0.75 ms of CPU per layer). Above this many tokens (batch x
# padded length) the GPU work hides the launches and eager prefill is as fast.
PREFILL_GRAPH_TOKENS = 2048
# Prompts are left-padded to a multiple of this, so one captured graph serves many prompt lengths.
# Left padding is exact here: Mamba zeroes padded positions and attention masks them.
PREFILL_BUCKET = 64
# Greedy decoding without a repetition penalty captures the pick and the bookkeeping in the decode
# step's CUDA graph (``Decoder.greedy_graph``). Outside the graph they cost 53 us a step on the H200 at
# batch 1 (2.3% of the Nano model's step; ``benchmarks/gpu_step_gap.py``). A switch for benchmarks.
GREEDY_IN_GRAPH = True
# EOS ids the captured greedy step checks (a call with more decodes without that graph).
MAX_EOS = 16
# Whether the decode loop checks each token's logits for NaN/inf (``Decoder.bad_at``; the prompt's are
# always checked). A switch for benchmarks (``gpu_ab.py --switch check_logits``).
CHECK_DECODE_LOGITS = True


@dataclass
class _StaticPrefill:
    """The fixed buffers of one padded prompt length (and its CUDA graph once captured)."""

    ids: torch.Tensor  # [B, L] token ids, left-padded
    pad: torch.Tensor  # [B, L] bool, True at real tokens
    attn: torch.Tensor  # [B, 1, L, L] bool attention mask built from ``pad``
    graph: "torch.cuda.CUDAGraph | None" = None
    logits: torch.Tensor | None = None


@dataclass
class SamplingConfig:
    """Decoding controls. ``temperature == 0`` (or ``do_sample=False``) means greedy."""

    max_new_tokens: int = 64
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    do_sample: bool = True
    seed: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)

    def validate(self) -> None:
        if self.max_new_tokens < 1:
            raise InputError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if not 0 <= self.temperature < math.inf:
            raise InputError(f"temperature must be a finite number >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise InputError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise InputError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 <= self.min_p < 1:
            raise InputError(f"min_p must be in [0, 1), got {self.min_p}")
        if not 0 < self.repetition_penalty < math.inf:
            raise InputError(f"repetition_penalty must be a finite number > 0, got {self.repetition_penalty}")
        check_seed(self.seed)

    @property
    def greedy(self) -> bool:
        return not self.do_sample or self.temperature == 0


def sample_next(logits: torch.Tensor, cfg: SamplingConfig, seen: torch.Tensor | None = None,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """Pick the next token per row from ``[B, V]`` logits; everything stays on the device."""
    logits = logits.float()
    if cfg.repetition_penalty != 1.0 and seen is not None:
        # CTRL-style penalty: shrink the logits of tokens already present (divide positives, multiply negatives).
        penalized = torch.where(logits > 0, logits / cfg.repetition_penalty, logits * cfg.repetition_penalty)
        logits = torch.where(seen, penalized, logits)
    if cfg.greedy:
        return logits.argmax(-1)
    logits = logits / cfg.temperature
    if cfg.top_k > 0:
        kth = logits.topk(min(cfg.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if cfg.top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # Drop a token when the tokens ranked above it already cover top_p (the best one always stays).
        drop = probs.cumsum(-1) - probs >= cfg.top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    if cfg.min_p > 0:
        probs = logits.softmax(-1)
        logits = logits.masked_fill(probs < cfg.min_p * probs.max(-1, keepdim=True).values, float("-inf"))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)


class NonFiniteLogitsError(NemotronError):
    """The model's logits are NaN/inf (a runtime failure, exit code 1): broken or overflowing weights.
    ``row`` (the batch row) and ``after`` (its tokens generated before) when it happened while decoding,
    else None."""

    def __init__(self, message: str, row: int | None = None, after: int | None = None) -> None:
        super().__init__(message)
        self.row, self.after = row, after


def broken_logits_message(after: int, where: str = "") -> str:
    """``NonFiniteLogitsError``'s message for logits that broke while decoding, ``after`` tokens into a
    row; ``where`` names the row (e.g. " (batch row 1)")."""
    return (f"the model's logits became NaN or inf after {after} generated token{'' if after == 1 else 's'}"
            f"{where}; are its weights finite?")


@dataclass
class GenerationOutput:
    sequences: list[list[int]]  # generated ids per row (prompt excluded, stopping token included)
    finish_reasons: list[str]  # "eos", "length", "stop" or "interrupted"
    prompt_tokens: list[int]
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    decode_steps: int = 0
    peak_memory_bytes: int | None = None
    cuda_graph: bool = False

    @property
    def generated_tokens(self) -> int:
        return sum(len(s) for s in self.sequences)


def _capture_graph(fn: Callable[[], torch.Tensor], what: str, warmup: int,
                   pool=None) -> tuple["torch.cuda.CUDAGraph", torch.Tensor] | None:
    """Run ``fn`` ``warmup`` times on a side stream (autotuning and lazy initialisation stay outside
    the capture), then record one call: (graph, its output buffer). None, with a warning, when the
    call cannot be captured (e.g. a path that sizes its work on the host)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    # An unreachable earlier decoder's graph freed by the garbage collector in the middle of this
    # capture would abort it ("operation not permitted when stream is capturing"): collect now, and
    # not during the capture.
    gc.collect()
    collecting = gc.isenabled()
    gc.disable()
    try:
        with torch.cuda.graph(graph, pool=pool):
            out = fn()
    except RuntimeError as e:
        warnings.warn(f"{what} not capturable as a CUDA graph, running eagerly ({str(e).splitlines()[0]})")
        torch.cuda.synchronize()
        return None
    finally:
        if collecting:
            gc.enable()
    return graph, out


class Decoder:
    """Owns the cache and the static buffers of one batch shape; reusable across prompts."""

    def __init__(self, model, batch_size: int, max_length: int, cuda_graph: bool | None = None,
                 compile: bool = False, bucket_prefill: bool | None = None) -> None:
        self.model = model
        self.batch_size = batch_size
        self.max_length = max_length
        device = model.device
        self.cache = NemotronHybridCache(model.config, batch_size, max_length, dtype=model.dtype, device=device)
        self.tokens = torch.zeros(batch_size, 1, dtype=torch.long, device=device)
        self.pos = torch.zeros(1, dtype=torch.long, device=device)
        self.kv_valid = torch.zeros(batch_size, max_length, dtype=torch.bool, device=device)
        # The loop's record (``ops.triton_pick.advance``): tokens so far, the next one's index, which rows
        # are done and which of those met an EOS; the EOS ids and the padding id of the call.
        self.out = torch.zeros(batch_size, max_length, dtype=torch.long, device=device)
        self.index = torch.zeros(1, dtype=torch.long, device=device)
        self.done = torch.zeros(batch_size, dtype=torch.bool, device=device)
        self.hit_eos = torch.zeros(batch_size, dtype=torch.bool, device=device)
        self.eos = torch.full((MAX_EOS,), -1, dtype=torch.long, device=device)
        self.pad = torch.zeros(1, dtype=torch.long, device=device)
        # Per row, the index of the first token whose logits had a NaN or infinite maximum (the row is
        # done from there), -1 while they are finite: read once by generate, after its loop.
        self.bad_at = torch.full((batch_size,), -1, dtype=torch.long, device=device)
        self._call_eos = self.eos
        self.logits = None
        self.use_graph = device.type == "cuda" if cuda_graph is None else (cuda_graph and device.type == "cuda")
        self.graph = None
        # The step followed by the greedy pick and the bookkeeping, captured together.
        self.greedy_graph = None
        # Padded-length prefill on static buffers: graph-captured on CUDA; without graphs it only
        # exists so tests can check the padded path against the plain one.
        self.bucket_prefill = self.use_graph if bucket_prefill is None else bucket_prefill
        self._static: dict[int, _StaticPrefill] = {}
        self._seen_buckets: set[int] = set()
        self._prefill_pool = None
        # torch.compile fuses the many small ops of a step (routing, norms, the state update) into
        # few kernels; the CUDA graph then removes the launch cost of what is left.
        self._step = torch.compile(self._step_impl, dynamic=False) if compile else self._step_impl

    def _meta(self) -> BatchMeta:
        meta = BatchMeta(batch_size=self.batch_size, seq_len=1, past_len=1, decode_pos=self.pos)
        meta._attn_mask = self.kv_valid[:, None, None, :]
        meta._attn_mask_built = True
        return meta

    @torch.no_grad()
    def _step_impl(self, as_float: bool = True) -> torch.Tensor:
        """The step on ``self.tokens`` at ``self.pos``, which it then advances (capturable)."""
        self.kv_valid.index_fill_(1, self.pos, True)
        logits = self._last_logits(self.tokens, self._meta(), as_float)
        self.pos.add_(1)
        return logits

    def _greedy_impl(self) -> torch.Tensor:
        """The step, then its argmax recorded as the next token (capturable)."""
        logits = self._step(as_float=False)  # (argmax needs no fp32 copy)
        self.advance(logits=logits)
        return logits

    def _last_logits(self, ids: torch.Tensor, meta: BatchMeta, as_float: bool = True) -> torch.Tensor:
        """The blocks over ``ids`` into the cache, without validation or host syncs (capturable):
        logits of the last position, fp32 unless ``as_float`` is off."""
        m = self.model
        hidden = m.model.run_layers(m.model.embed_tokens(ids), meta, self.cache, owned=True)
        logits = m.lm_head(hidden[:, -1])
        return logits.float() if as_float else logits

    def _uncapturable(self, tokens: int) -> str | None:
        from .modeling.moe import MoE

        device = self.model.device
        for m in self.model.modules():
            if isinstance(m, MoE) and not m.experts.capturable(tokens * m.gate.top_k, self.model.dtype, device):
                return "the loop-over-experts path sizes its work on the host"
        return None

    def _capture(self, greedy: bool) -> None:
        """Capture the decode step (``graph``), or the step with the greedy pick (``greedy_graph``)."""
        reason = self._uncapturable(self.batch_size)
        if reason is not None:
            warnings.warn(f"decode step not capturable as a CUDA graph, running eagerly ({reason})")
            self.use_graph = False
            return
        # The warm-up steps write into the cache and the loop's record, so those are zeroed
        # afterwards; the graph keeps pointing at its buffers.
        self.start([], 0)
        captured = _capture_graph(self._greedy_impl if greedy else self._step, "decode step", warmup=3)
        if captured is None:
            self.use_graph = False
        elif greedy:
            self.greedy_graph = captured[0]
        else:
            self.graph, self.logits = captured
        self.cache.reset()
        self.kv_valid.zero_()

    @torch.no_grad()
    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, chunk: int | None = None,
                reserve: int = 1, greedy: bool = False) -> torch.Tensor:
        """Run the prompt (left-padded ``[B, S]``) into a fresh cache; returns last-position logits.

        ``reserve``: positions the caller will decode after the prompt (a prompt padded to a bucket
        must still leave that much room in the cache). ``greedy``: the caller decodes with
        ``greedy_step`` (CUDA graphs: captures that graph rather than the plain step's)."""
        if self.use_graph and (self.greedy_graph if greedy else self.graph) is None:
            self._capture(greedy)
        self.cache.reset()
        self.kv_valid.zero_()
        seqlen = input_ids.shape[1]
        if seqlen >= self.max_length:
            raise InputError(f"prompt of {seqlen} tokens leaves no room in max_length {self.max_length}")
        bucket = -(-seqlen // PREFILL_BUCKET) * PREFILL_BUCKET
        if (self.bucket_prefill and chunk is None and bucket * self.batch_size <= PREFILL_GRAPH_TOKENS
                and bucket + reserve <= self.max_length):
            logits = self._bucket_prefill(input_ids, attention_mask, bucket)
            if logits is not None:
                return logits
        step = chunk or seqlen
        logits = None
        for start in range(0, seqlen, step):
            end = min(start + step, seqlen)
            out = self.model(input_ids=input_ids[:, start:end], attention_mask=attention_mask[:, :end],
                             past_key_values=self.cache, use_cache=True, logits_to_keep=1)
            logits = out.logits[:, -1].float()
        self.kv_valid[:, :seqlen] = attention_mask.bool()
        self.pos.fill_(seqlen)
        return logits

    def _bucket_prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, bucket: int) -> torch.Tensor | None:
        """Prefill padded to ``bucket`` positions through static buffers (replaying a CUDA graph when
        graphs are on). None when the caller should prefill eagerly: the bucket's first use with
        graphs, or a graph that could not be captured."""
        from .modeling.model import check_token_ids

        st = self._static.get(bucket)
        if st is None and self.use_graph and bucket not in self._seen_buckets:
            # A capture costs two warm-up prefills plus the capture itself: only worth it for a bucket
            # that comes back (more prompts, a reused Decoder). The first prompt prefills eagerly.
            self._seen_buckets.add(bucket)
            return None
        check_token_ids(input_ids, self.model.config.vocab_size)  # eagerly: the graph cannot raise
        if st is None:
            st = self._static_buffers(bucket)
            if self.use_graph and not self._capture_prefill(st):
                self.bucket_prefill = False
                return None
            self._static[bucket] = st
        off = bucket - input_ids.shape[1]
        st.ids.zero_()
        st.ids[:, off:] = input_ids
        st.pad.zero_()
        st.pad[:, off:] = attention_mask.bool()
        st.attn.copy_(BatchMeta(batch_size=self.batch_size, seq_len=bucket, kv_padding_mask=st.pad).attn_mask)
        if st.graph is not None:
            st.graph.replay()
            logits = st.logits.clone()  # the graph's output buffer is overwritten by its next replay
        else:
            logits = self._run_static(st)
        self.kv_valid[:, :bucket] = st.pad
        self.pos.fill_(bucket)
        self.cache.seq_len = bucket
        return logits

    def _static_buffers(self, bucket: int) -> _StaticPrefill:
        device = self.model.device
        pad = torch.ones(self.batch_size, bucket, dtype=torch.bool, device=device)
        attn = BatchMeta(batch_size=self.batch_size, seq_len=bucket, kv_padding_mask=pad).attn_mask.clone()
        return _StaticPrefill(ids=torch.zeros(self.batch_size, bucket, dtype=torch.long, device=device), pad=pad,
                              attn=attn)

    def _run_static(self, st: _StaticPrefill) -> torch.Tensor:
        """The prefill forward on the static buffers: no validation, no host sync (capturable)."""
        meta = BatchMeta(batch_size=self.batch_size, seq_len=st.ids.shape[1], padding_mask=st.pad,
                         kv_padding_mask=st.pad, _attn_mask=st.attn, _attn_mask_built=True)
        return self._last_logits(st.ids, meta)

    def _capture_prefill(self, st: _StaticPrefill) -> bool:
        reason = self._uncapturable(self.batch_size * st.ids.shape[1])
        if reason is not None:
            return False
        # One memory pool for every prompt length: prefills never overlap, and each graph's output
        # stays referenced, so sharing only saves memory.
        captured = _capture_graph(lambda: self._run_static(st), "prefill", warmup=2, pool=self._prefill_pool)
        if captured is None:
            return False
        graph, st.logits = captured
        if self._prefill_pool is None:
            self._prefill_pool = graph.pool()
        st.graph = graph
        return True

    @torch.no_grad()
    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Feed one token per row (``[B]``); returns next-token logits ``[B, V]`` (fp32)."""
        self.tokens.copy_(tokens.view(-1, 1))
        return self.step_recorded()

    @torch.no_grad()
    def step_recorded(self) -> torch.Tensor:
        """``step`` on the tokens ``advance`` recorded last."""
        if self.graph is not None:
            self.graph.replay()
            logits = self.logits
        else:
            logits = self._step()
        self.cache.seq_len += 1
        return logits

    @torch.no_grad()
    def greedy_step(self) -> None:
        """Step on the tokens recorded last and record each row's argmax as its next token (one graph
        replay when ``prefill(..., greedy=True)`` captured it)."""
        if self.greedy_graph is not None:
            self.greedy_graph.replay()
        else:
            self._greedy_impl()
        self.cache.seq_len += 1

    def start(self, eos_ids: list[int], pad_id: int) -> None:
        """A fresh record for a generate call: nothing generated, no row done."""
        self.index.zero_()
        self.done.zero_()
        self.hit_eos.zero_()
        self.bad_at.fill_(-1)
        self.pad.fill_(pad_id)
        self.eos.fill_(-1)
        if len(eos_ids) > MAX_EOS:  # (a graph checks only MAX_EOS ids: generate then avoids it)
            self._call_eos = torch.tensor(eos_ids, dtype=torch.long, device=self.eos.device)
        else:
            self.eos[: len(eos_ids)] = torch.tensor(eos_ids, dtype=torch.long)
            self._call_eos = self.eos

    def advance(self, picked: torch.Tensor | None = None, logits: torch.Tensor | None = None,
                seen: torch.Tensor | None = None) -> None:
        """Record the next token per row: ``picked`` (``[B]``), or the argmax of ``logits`` (a row whose
        largest logit is NaN or infinite gets padding and is done, its index in ``bad_at``); see
        ``ops.triton_pick.advance``."""
        triton_pick.advance(self.out, self.index, self.tokens, self.done, self.hit_eos, self._call_eos, self.pad,
                            picked=picked, logits=logits, seen=seen,
                            bad_at=self.bad_at if CHECK_DECODE_LOGITS else None)

    def screen(self, logits: torch.Tensor) -> torch.Tensor:
        """Before sampling from ``logits`` (``[B, V]``): what ``advance`` does for the argmax, on the
        device (no sync). A live row whose largest logit is NaN or infinite is done from here (its token
        will be padding) and its index goes into ``bad_at``; its logits come back as zeros, so that
        sampling still draws a token for it."""
        if not CHECK_DECODE_LOGITS:
            return logits
        finite = triton_pick.mark_broken(logits, self.done, self.bad_at, self.index)
        return torch.where(finite[:, None], logits, torch.zeros((), dtype=logits.dtype, device=logits.device))


def left_pad(prompts: list[list[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros(len(prompts), width, dtype=torch.long)
    for i, p in enumerate(prompts):
        if p:
            ids[i, width - len(p):] = torch.tensor(p)
            mask[i, width - len(p):] = 1
    return ids.to(device), mask.to(device)


@torch.no_grad()
def generate(model, prompts: list[list[int]], cfg: SamplingConfig, pad_id: int = 0,
             on_tokens: Callable[[torch.Tensor], bool | None] | None = None, sync_every: int | None = None,
             prefill_chunk: int | None = None, decoder: Decoder | None = None,
             max_length: int | None = None) -> GenerationOutput:
    """Generate for a batch of token-id prompts (left-padded internally).

    ``on_tokens(new_ids_cpu [B, k])`` is called at every host sync with the tokens produced since the
    last one; it may return a list of B booleans marking rows to stop (stop strings). ``KeyboardInterrupt`` stops
    cleanly: what was generated so far is returned with finish reason "interrupted". Logits that are NaN or
    infinite (any of the prompt's, or a later token's largest) raise ``NonFiniteLogitsError``."""
    cfg.validate()
    if not prompts or any(len(p) == 0 for p in prompts):
        raise InputError("every prompt needs at least one token")
    limit = getattr(model.config, "max_position_embeddings", None)
    longest = max(len(p) for p in prompts)
    if limit and longest + cfg.max_new_tokens > limit:
        raise InputError(f"prompt ({longest} tokens) + max_new_tokens ({cfg.max_new_tokens}) exceeds the model's "
                         f"limit of {limit} positions")
    device = model.device
    bsz = len(prompts)
    total = longest + cfg.max_new_tokens
    if decoder is None or decoder.batch_size != bsz or decoder.max_length < total:
        # Room to pad the prompt to a prefill bucket (CUDA graphs) without cutting max_new_tokens.
        slack = PREFILL_BUCKET if device.type == "cuda" else 0
        decoder = Decoder(model, bsz, max_length or total + slack)
    sync_every = sync_every or (8 if device.type == "cuda" else 1)
    # Sampling always draws from a generator of its own (seeded from torch's CPU RNG when no seed is
    # given, so torch.manual_seed still makes runs repeatable): the default CUDA generator takes part
    # in every CUDA-graph capture, and a capture that fails leaves it unusable.
    seed = cfg.seed if cfg.seed is not None else int(torch.randint(0, 2**62, (1,)))
    generator = torch.Generator(device=device).manual_seed(seed)
    ids, mask = left_pad(prompts, pad_id, device)
    # Greedy without a penalty: the pick is captured with the step (see Decoder.greedy_step).
    greedy_fused = (GREEDY_IN_GRAPH and cfg.greedy and cfg.repetition_penalty == 1.0
                    and len(cfg.eos_token_ids) <= MAX_EOS)
    seen = None
    if cfg.repetition_penalty != 1.0:
        seen = torch.zeros(bsz, model.config.vocab_size, dtype=torch.bool, device=device)
        seen.scatter_(1, ids, mask.bool())
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    logits = decoder.prefill(ids, mask, prefill_chunk, reserve=cfg.max_new_tokens, greedy=greedy_fused)
    decoder.start(cfg.eos_token_ids, pad_id)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t1 = time.perf_counter()
    # Once per call, on the prompt's last logits (the device just synchronised): non-finite weights would
    # otherwise decode to arbitrary tokens under greedy (argmax of NaN) without a word.
    if not bool(torch.isfinite(logits).all()):
        raise NonFiniteLogitsError("the model's logits after the prompt are NaN or inf; are its weights finite?")

    out, done = decoder.out, decoder.done
    steps = 0
    flushed = 0
    stopped = [False] * bsz
    stop_step = [0] * bsz  # tokens a stopped row had when on_tokens stopped it
    interrupted = False
    try:
        for i in range(cfg.max_new_tokens):
            # Token i: from the prompt's logits first, then from a step on token i - 1.
            if i > 0 and greedy_fused:
                decoder.greedy_step()
            else:
                if i > 0:
                    logits = decoder.screen(decoder.step_recorded())
                decoder.advance(sample_next(logits, cfg, seen, generator), seen=seen)
            steps = i + 1
            last = i + 1 == cfg.max_new_tokens
            if steps % sync_every == 0 or last:
                if on_tokens is not None:
                    stop_rows = on_tokens(out[:, flushed:steps].cpu())
                    flushed = steps
                    if stop_rows:
                        for r, b in enumerate(stop_rows):
                            if b and not stopped[r]:
                                stopped[r], stop_step[r] = True, steps
                        done |= torch.tensor(stopped, device=device)
                if bool(done.all()) or last:
                    break
    except KeyboardInterrupt:
        interrupted = True
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t2 = time.perf_counter()

    # Logits that broke during decoding (the prompt's were checked above) stopped their rows; once per
    # call, here, where the device has synchronised anyway.
    bad_at = decoder.bad_at.tolist()
    broken = [r for r, at in enumerate(bad_at) if at >= 0]
    if broken and not interrupted:
        r = broken[0]
        raise NonFiniteLogitsError(broken_logits_message(bad_at[r], f" (batch row {r})" if bsz > 1 else ""),
                                   row=r, after=bad_at[r])
    rows = out[:, :steps].tolist()
    hit = decoder.hit_eos.tolist()
    sequences = []
    reasons = []
    eos_set = set(cfg.eos_token_ids)
    for r, row in enumerate(rows):
        # An interrupt can land between writing a step's token and counting it: look for the EOS
        # in what was counted rather than trusting hit_eos alone.
        cut = next((j for j, t in enumerate(row) if t in eos_set), None) if hit[r] else None
        if cut is not None:
            row, reason = row[: cut + 1], "eos"
        elif bad_at[r] >= 0:  # (interrupted, else raised above) padding from where its logits broke
            row, reason = row[: bad_at[r]], "interrupted"
        elif stopped[r]:
            # Steps after the stop hold padding (or, with sync_every > 1, tokens past the stop).
            row, reason = row[: stop_step[r]], "stop"
        else:
            reason = "interrupted" if interrupted else "length"
        sequences.append(row)
        reasons.append(reason)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    return GenerationOutput(sequences=sequences, finish_reasons=reasons, prompt_tokens=[len(p) for p in prompts],
                            prefill_seconds=t1 - t0, decode_seconds=t2 - t1, decode_steps=steps,
                            peak_memory_bytes=peak,
                            cuda_graph=(decoder.greedy_graph if greedy_fused else decoder.graph) is not None)
