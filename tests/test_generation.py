"""Generation on a tiny CPU model: parity with transformers' generate(), the native decode loop,
cached vs. uncached logits, sampling controls and the hybrid cache.

The model is built and saved by transformers (every block type: Mamba, MoE, attention, MLP) and
loaded by nemotron_core; fp32 throughout. ``time_step_min`` is tiny (see ``tiny.py``) so that
transformers' prefill-only dt clamp does not bite.
"""
from __future__ import annotations

import pytest
import torch

import tiny
from nemotron_core.cache import NemotronHybridCache
from nemotron_core.config import ATTENTION, MAMBA
from nemotron_core.generation import Decoder, SamplingConfig, generate, sample_next
from nemotron_core.modeling.model import NemotronHForCausalLM

PATTERN = "ME*-M"  # linear_attention, moe, full_attention, mlp, linear_attention
VOCAB = tiny.TINY["vocab_size"]
EOS = 2
PAD = 0
TOL = 1e-5


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """(transformers model, our model loaded from what transformers saved)."""
    hf = tiny.hf_model(seed=0, pattern=PATTERN)
    assert hf.config.layers_block_type == ["linear_attention", "moe", "full_attention", "mlp", "linear_attention"]
    path = tmp_path_factory.mktemp("hf_tiny")
    hf.save_pretrained(path)
    ours = NemotronHForCausalLM.from_pretrained(path, dtype=torch.float32)
    assert ours.dtype == torch.float32
    return hf, ours


def _ids(b: int, s: int, seed: int) -> torch.Tensor:
    # Ids from 3 up: no pad/bos/eos inside prompts.
    return torch.randint(3, VOCAB, (b, s), generator=torch.Generator().manual_seed(seed))


def _hf_kwargs(**extra):
    return dict(do_sample=False, eos_token_id=EOS, pad_token_id=PAD, **extra)


def _new_tokens(seq: list[int]) -> list[int]:
    """transformers keeps padding after EOS: cut a row the way our native loop does (EOS included)."""
    return seq[: seq.index(EOS) + 1] if EOS in seq else seq


def _greedy(n: int) -> SamplingConfig:
    return SamplingConfig(max_new_tokens=n, do_sample=False, eos_token_ids=[EOS])


# ---- parity with transformers ------------------------------------------------------------------------------
@torch.no_grad()
def test_greedy_batch1_matches_transformers(models):
    hf, ours = models
    ids = _ids(1, 11, seed=1)
    want = hf.generate(ids, max_new_tokens=24, **_hf_kwargs())
    got = ours.generate(ids, max_new_tokens=24, **_hf_kwargs())
    assert torch.equal(got, want), (got.tolist(), want.tolist())
    native = generate(ours, ids.tolist(), _greedy(24), pad_id=PAD)
    assert native.sequences == [_new_tokens(want[0, 11:].tolist())]
    assert native.prompt_tokens == [11]


@torch.no_grad()
def test_greedy_left_padded_batch_matches_transformers(models):
    hf, ours = models
    ids = _ids(2, 13, seed=2)
    mask = tiny.left_padded_mask(2, 13, pad=4)
    ids[1, :4] = PAD
    want = hf.generate(ids, attention_mask=mask, max_new_tokens=20, **_hf_kwargs())
    got = ours.generate(ids, attention_mask=mask, max_new_tokens=20, **_hf_kwargs())
    assert torch.equal(got, want), (got.tolist(), want.tolist())
    native = generate(ours, [ids[0].tolist(), ids[1, 4:].tolist()], _greedy(20), pad_id=PAD)
    assert native.sequences == [_new_tokens(row) for row in want[:, 13:].tolist()]
    assert native.prompt_tokens == [13, 9]


@torch.no_grad()
def test_beam_search_matches_transformers(models):
    hf, ours = models
    ids = _ids(2, 9, seed=3)
    mask = tiny.left_padded_mask(2, 9, pad=3)
    ids[1, :3] = PAD
    kw = _hf_kwargs(num_beams=3, max_new_tokens=8)
    want = hf.generate(ids, attention_mask=mask, **kw)
    got = ours.generate(ids, attention_mask=mask, **kw)
    assert torch.equal(got, want), (got.tolist(), want.tolist())


@torch.no_grad()
def test_inputs_embeds_generation(models):
    hf, ours = models
    ids = _ids(1, 10, seed=4)
    from_ids = ours.generate(ids, max_new_tokens=12, **_hf_kwargs())
    embeds = ours.get_input_embeddings()(ids)
    from_embeds = ours.generate(inputs_embeds=embeds, max_new_tokens=12, **_hf_kwargs())
    # With inputs_embeds, generate() returns only the new tokens.
    assert torch.equal(from_embeds, from_ids[:, 10:]), (from_embeds.tolist(), from_ids.tolist())
    assert torch.equal(from_ids, hf.generate(ids, max_new_tokens=12, **_hf_kwargs()))


# ---- the native loop ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("chunk", [None, 5])
@torch.no_grad()
def test_cached_decode_logits_equal_full_forward(models, chunk):
    """Prefill (whole, or chunked by 5) then decode step by step: every step's logits equal the
    uncached forward over the whole sequence, for a plain row and a left-padded one."""
    _, ours = models
    prompt, steps, pad = 19, 10, 3  # prompt longer than chunk_size (8)
    ids = _ids(2, prompt + steps, seed=5)
    ids[1, :pad] = PAD
    mask = tiny.left_padded_mask(2, prompt + steps, pad)
    full = ours(input_ids=ids, attention_mask=mask).logits.float()

    dec = Decoder(ours, batch_size=2, max_length=prompt + steps + 1)
    logits = dec.prefill(ids[:, :prompt], mask[:, :prompt], chunk=chunk)
    got = [logits]
    for i in range(steps):
        got.append(dec.step(ids[:, prompt + i]))
    for i, step_logits in enumerate(got):
        ref = full[:, prompt - 1 + i]
        err = tiny.rel_err(ref, step_logits)
        assert err <= TOL, f"step {i} (chunk={chunk}): relative error {err:.2e}"


@torch.no_grad()
def test_left_padded_batch_equals_each_prompt_alone(models):
    _, ours = models
    prompts = [_ids(1, n, seed=10 + n)[0].tolist() for n in (5, 17, 11)]
    cfg = _greedy(12)
    batch = generate(ours, prompts, cfg, pad_id=PAD)
    alone = [generate(ours, [p], cfg, pad_id=PAD).sequences[0] for p in prompts]
    assert batch.sequences == alone
    assert batch.prompt_tokens == [5, 17, 11]
    assert all(r in ("length", "eos") for r in batch.finish_reasons)


@torch.no_grad()
def test_same_seed_same_sample_different_seed_differs(models):
    _, ours = models
    prompts = [_ids(1, 7, seed=20)[0].tolist(), _ids(1, 4, seed=21)[0].tolist()]

    def run(seed: int) -> list[list[int]]:
        cfg = SamplingConfig(max_new_tokens=16, temperature=1.0, top_k=0, seed=seed, eos_token_ids=[])
        return generate(ours, prompts, cfg, pad_id=PAD).sequences

    a, b, c = run(7), run(7), run(8)
    assert a == b
    assert a != c
    assert all(len(s) == 16 for s in a + c)


@pytest.mark.parametrize("sync_every", [None, 4])
@torch.no_grad()
def test_on_tokens_stop_trims_the_row(models, sync_every):
    """A row that on_tokens stops keeps the tokens it had when stopped (no padding after it);
    the other row runs on."""
    _, ours = models
    prompts = [_ids(1, 6, seed=30)[0].tolist(), _ids(1, 6, seed=31)[0].tolist()]
    calls = []

    def on_tokens(new):
        calls.append(tuple(new.shape))
        return [len(calls) == 2, False]

    cfg = SamplingConfig(max_new_tokens=12, do_sample=False, eos_token_ids=[])
    out = generate(ours, prompts, cfg, pad_id=PAD, on_tokens=on_tokens, sync_every=sync_every)
    step = sync_every or 1  # CPU default: one host sync per step
    assert calls[0] == (2, step)
    assert out.finish_reasons == ["stop", "length"]
    assert [len(s) for s in out.sequences] == [2 * step, 12]
    alone = generate(ours, prompts[:1], cfg, pad_id=PAD).sequences[0]
    assert out.sequences[0] == alone[:2 * step]


@torch.no_grad()
def test_pick_on_device_equals_torch_bookkeeping(models, monkeypatch):
    """The loop's pick and bookkeeping (``ops.triton_pick``, run by Triton's interpreter here) give the
    same tokens and finish reasons as the torch reference with the pick from ``sample_next``: greedy
    with an EOS that finishes one row early (padding after it), with a repetition penalty (``seen``),
    and sampled."""
    from triton_cpu import require_triton

    from nemotron_core import generation
    from nemotron_core.ops import triton_pick

    require_triton()  # without the interpreter ``advance`` is the reference itself: nothing compared
    _, ours = models
    prompts = [_ids(1, 7, seed=40)[0].tolist(), _ids(1, 5, seed=41)[0].tolist(), _ids(1, 9, seed=42)[0].tolist()]
    free = generate(ours, prompts, SamplingConfig(max_new_tokens=14, do_sample=False), pad_id=PAD).sequences
    eos = free[1][4]  # row 1 stops at its fifth token (or earlier, if that token came before)
    cfgs = [SamplingConfig(max_new_tokens=14, do_sample=False, eos_token_ids=[eos, 1]),
            SamplingConfig(max_new_tokens=14, do_sample=False, repetition_penalty=1.5, eos_token_ids=[eos]),
            SamplingConfig(max_new_tokens=14, top_k=20, seed=3, eos_token_ids=[eos])]
    got = [generate(ours, prompts, cfg, pad_id=PAD) for cfg in cfgs]
    assert got[0].finish_reasons[1] == "eos" and len(got[0].sequences[1]) <= 5
    monkeypatch.setattr(generation, "GREEDY_IN_GRAPH", False)
    monkeypatch.setattr(triton_pick, "advance", triton_pick.advance_reference)
    for cfg, out in zip(cfgs, got):
        want = generate(ours, prompts, cfg, pad_id=PAD)
        assert out.sequences == want.sequences
        assert out.finish_reasons == want.finish_reasons


_BREAK_CFGS = {"greedy": SamplingConfig(max_new_tokens=24, do_sample=False),
               "greedy_penalty": SamplingConfig(max_new_tokens=24, do_sample=False, repetition_penalty=1.3),
               "sampled": SamplingConfig(max_new_tokens=24, top_k=40, seed=5)}


def _row_one_breaks(ours, cfg: SamplingConfig):
    """(a copy of ``ours`` whose input embeddings are NaN but for the prompts', row 0's tokens and the
    padding, two prompts, the count of tokens row 1 generates before its logits break)."""
    import copy

    prompts = [_ids(1, 6, seed=50)[0].tolist(), _ids(1, 4, seed=51)[0].tolist()]
    clean = generate(ours, prompts, cfg, pad_id=PAD).sequences
    keep = sorted(set(prompts[0]) | set(prompts[1]) | set(clean[0]) | {PAD})  # (row 1 is left-padded)
    breaks = next(j for j, t in enumerate(clean[1]) if t not in keep) + 1  # the token after it
    assert breaks < cfg.max_new_tokens, "row 1 never feeds back a token outside keep: pick other prompts"
    broken = copy.deepcopy(ours)
    emb = broken.model.embed_tokens.weight
    kept = emb[keep].clone()
    emb.fill_(float("nan"))
    emb[keep] = kept
    return broken, prompts, breaks


@torch.no_grad()
@pytest.mark.parametrize("mode", sorted(_BREAK_CFGS))
def test_logits_that_break_while_decoding_are_an_error(models, mode):
    """Logits that turn NaN after a finite prompt (here: every input embedding NaN but those of the prompts'
    and row 0's tokens, so row 1 breaks at the first other token it feeds back) stop generate with
    NonFiniteLogitsError naming the row and the token count, in every decode path: the greedy pick
    captured with the step (the check rides on its argmax), and the paths that sample or penalise (checked
    before sampling). There is no host sync per token for it: generate reads the record once, at the end."""
    from nemotron_core.generation import NonFiniteLogitsError

    broken, prompts, breaks = _row_one_breaks(models[1], _BREAK_CFGS[mode])
    with pytest.raises(NonFiniteLogitsError, match=rf"became NaN or inf after {breaks} generated tokens? "
                                                    r"\(batch row 1\)"):
        generate(broken, prompts, _BREAK_CFGS[mode], pad_id=PAD)


@torch.no_grad()
def test_interrupt_after_logits_broke_keeps_the_tokens_before(models):
    """Ctrl-C after a row's logits broke: no error (the user stopped), the row keeps the tokens it had
    before, and its finish reason is "interrupted"."""
    cfg = _BREAK_CFGS["greedy"]
    broken, prompts, breaks = _row_one_breaks(models[1], cfg)
    clean = generate(models[1], prompts, cfg, pad_id=PAD).sequences

    def interrupt(new):
        if interrupt.seen > breaks:
            raise KeyboardInterrupt
        interrupt.seen += new.shape[1]

    interrupt.seen = 0
    out = generate(broken, prompts, cfg, pad_id=PAD, on_tokens=interrupt, sync_every=1)
    assert out.finish_reasons == ["interrupted", "interrupted"]
    assert out.sequences[1] == clean[1][:breaks]
    assert out.sequences[0] == clean[0][:len(out.sequences[0])] and len(out.sequences[0]) > breaks


# ---- sample_next ---------------------------------------------------------------------------------------------
def _probs_logits(probs: list[float], rows: int = 4000) -> torch.Tensor:
    return torch.tensor(probs).log().expand(rows, -1).clone()


def _support(logits: torch.Tensor, cfg: SamplingConfig) -> set[int]:
    return set(sample_next(logits, cfg, generator=torch.Generator().manual_seed(0)).tolist())


def test_sample_next_greedy_is_argmax():
    logits = torch.randn(6, 50, generator=torch.Generator().manual_seed(0))
    cfg = SamplingConfig(do_sample=False, top_k=3, top_p=0.5)
    assert torch.equal(sample_next(logits, cfg), logits.argmax(-1))
    assert torch.equal(sample_next(logits, SamplingConfig(temperature=0.0)), logits.argmax(-1))


def test_sample_next_top_k():
    logits = _probs_logits([0.05, 0.3, 0.1, 0.25, 0.2, 0.1])
    assert _support(logits, SamplingConfig(top_k=2)) == {1, 3}
    assert _support(logits, SamplingConfig(top_k=3)) == {1, 3, 4}
    assert _support(logits, SamplingConfig(top_k=1)) == {1}


def test_sample_next_top_p_keeps_smallest_covering_set():
    logits = _probs_logits([0.05, 0.5, 0.15, 0.3])
    assert _support(logits, SamplingConfig(top_p=0.4)) == {1}  # 0.5 >= 0.4
    assert _support(logits, SamplingConfig(top_p=0.75)) == {1, 3}  # 0.5 + 0.3 >= 0.75
    assert _support(logits, SamplingConfig(top_p=0.9)) == {1, 3, 2}  # 0.95 >= 0.9
    assert _support(logits, SamplingConfig(top_p=1.0)) == {0, 1, 2, 3}


def test_sample_next_min_p():
    logits = _probs_logits([0.05, 0.5, 0.15, 0.3])
    assert _support(logits, SamplingConfig(min_p=0.2)) == {1, 2, 3}  # keep p >= 0.1
    assert _support(logits, SamplingConfig(min_p=0.5)) == {1, 3}  # keep p >= 0.25


def test_sample_next_repetition_penalty_lowers_seen_tokens():
    cfg = SamplingConfig(do_sample=False, repetition_penalty=1.5)
    logits = torch.tensor([[2.0, 1.9, -3.0], [-1.0, -1.2, -5.0]])
    seen = torch.tensor([[True, False, False], [True, False, False]])
    assert sample_next(logits, SamplingConfig(do_sample=False), seen).tolist() == [0, 0]
    # positive logits are divided (2.0 -> 1.33), negative ones multiplied (-1.0 -> -1.5)
    assert sample_next(logits, cfg, seen).tolist() == [1, 1]
    assert sample_next(logits, cfg, torch.zeros_like(seen)).tolist() == [0, 0]


# ---- the cache -----------------------------------------------------------------------------------------------
def test_cache_layout_and_memory(models):
    _, ours = models
    cfg = ours.config
    cache = NemotronHybridCache(cfg, batch_size=2, max_length=32, dtype=torch.bfloat16)
    types = cfg.layers_block_type
    assert set(cache.kv) == {i for i, t in enumerate(types) if t == ATTENTION} == {2}
    assert set(cache.mamba) == {i for i, t in enumerate(types) if t == MAMBA} == {0, 4}
    k, v = cache.kv[2]
    assert k.shape == v.shape == (2, cfg.num_key_value_heads, 32, cfg.head_dim)
    assert k.dtype == torch.bfloat16
    st = cache.mamba[0]
    assert st.conv.shape == (2, cfg.mamba_conv_dim, cfg.conv_kernel - 1) and st.conv.dtype == torch.bfloat16
    assert st.ssm.shape == (2, cfg.mamba_num_heads, cfg.mamba_head_dim, cfg.ssm_state_size)
    assert st.ssm.dtype == torch.float32  # the recurrence accumulates: fp32 by default
    mem = cache.memory_bytes()
    assert mem["kv"] == 2 * k.numel() * 2
    assert mem["conv"] == 2 * st.conv.numel() * 2
    assert mem["ssm"] == 2 * st.ssm.numel() * 4
    assert mem["total"] == mem["kv"] + mem["conv"] + mem["ssm"] > 0


def test_cache_reorder_permutes_rows(models):
    _, ours = models
    cache = NemotronHybridCache(ours.config, batch_size=3, max_length=8)
    for r in range(3):
        for k, v in cache.kv.values():
            k[r] = r
            v[r] = 10 + r
        for st in cache.mamba.values():
            st.conv[r] = 20 + r
            st.ssm[r] = 30 + r
    order = torch.tensor([2, 0, 0])
    cache.reorder_cache(order)
    for k, v in cache.kv.values():
        assert [k[r].unique().item() for r in range(3)] == [2, 0, 0]
        assert [v[r].unique().item() for r in range(3)] == [12, 10, 10]
    for st in cache.mamba.values():
        assert [st.conv[r].unique().item() for r in range(3)] == [22, 20, 20]
        assert [st.ssm[r].unique().item() for r in range(3)] == [32, 30, 30]


@torch.no_grad()
def test_bucketed_prefill_equals_plain_prefill(models):
    """The static-buffer prefill that CUDA graphs replay pads prompts to a multiple of 64 on the
    left: its logits and the decode after it equal the plain prefill's (here without a graph)."""
    _, ours = models
    ids = _ids(2, 19, seed=21)
    ids[1, :4] = PAD
    mask = tiny.left_padded_mask(2, 19, 4)
    plain = Decoder(ours, batch_size=2, max_length=19 + 64 + 8, bucket_prefill=False)
    bucketed = Decoder(ours, batch_size=2, max_length=19 + 64 + 8, bucket_prefill=True)
    outs = []
    for dec in (plain, bucketed):
        steps = [dec.prefill(ids, mask, reserve=8)]
        for i in range(6):
            steps.append(dec.step(steps[-1].argmax(-1)))
        outs.append(torch.stack(steps))
    assert bucketed._static and int(bucketed.pos) == 64 + 6 and int(plain.pos) == 19 + 6  # padded path ran
    assert tiny.rel_err(outs[0], outs[1]) <= TOL
    # Reused for another prompt length in the same bucket, and with no room to pad: plain prefill.
    again = bucketed.prefill(ids[:, 3:], mask[:, 3:], reserve=8)
    assert tiny.rel_err(plain.prefill(ids[:, 3:], mask[:, 3:]), again) <= TOL
    tight = Decoder(ours, batch_size=2, max_length=19 + 8, bucket_prefill=True)
    assert tiny.rel_err(outs[0][0], tight.prefill(ids, mask, reserve=8)) <= TOL and not tight._static
