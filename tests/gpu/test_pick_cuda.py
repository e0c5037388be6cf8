"""The decode loop's pick and bookkeeping on the GPU (``nemotron_core.ops.triton_pick``): the compiled
argmax gives torch.argmax's indices on a full-size vocabulary, and greedy generation with the pick
captured in the step's CUDA graph gives the same tokens as the loop that picks with torch between
replays of the plain step's graph."""
from __future__ import annotations

import pytest
import torch

from .common import triton_ops

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_argmax_matches_torch_on_a_full_vocabulary(dtype: torch.dtype) -> None:
    triton_pick = triton_ops("triton_pick")
    g = torch.Generator(device="cuda").manual_seed(0)
    logits = torch.randn(8, 131072, device="cuda", generator=g).to(dtype)
    logits[0, [5, 131000]] = 20.0  # a tie across blocks
    logits[1, [4096, 4097]] = 20.0  # a tie inside a block
    logits[2, [9, 70000]] = float("nan")
    logits[3] = float("-inf")
    bsz = logits.shape[0]
    out = torch.zeros(bsz, 4, dtype=torch.long, device="cuda")
    index = torch.tensor([1], device="cuda")
    tokens = torch.zeros(bsz, 1, dtype=torch.long, device="cuda")
    done = torch.zeros(bsz, dtype=torch.bool, device="cuda")
    hit = torch.zeros_like(done)
    eos = torch.tensor([-1], device="cuda")
    pad = torch.tensor([0], device="cuda")
    triton_pick.advance(out, index, tokens, done, hit, eos, pad, logits=logits)
    want = logits.float().argmax(-1)
    assert torch.equal(out[:, 1], want) and torch.equal(tokens[:, 0], want)
    assert want[:4].tolist() == [5, 4096, 9, 0]
    assert index.item() == 2 and not done.any()


@pytest.mark.parametrize("batch", [1, 3])
def test_greedy_graph_gives_the_same_tokens(monkeypatch, batch: int) -> None:
    triton_ops("triton_pick")
    from nemotron_core import generation
    from nemotron_core.create import build_config, random_model
    from nemotron_core.generation import Decoder, SamplingConfig, generate

    model = random_model(build_config("tiny"), torch.bfloat16, seed=0, device="cuda").eval()
    g = torch.Generator().manual_seed(batch)
    prompts = [torch.randint(3, 1000, (n,), generator=g).tolist() for n in (20, 13, 7)[:batch]]
    free = generate(model, prompts, SamplingConfig(max_new_tokens=24, do_sample=False)).sequences
    cfg = SamplingConfig(max_new_tokens=24, do_sample=False, eos_token_ids=[free[-1][6]])  # the last row stops
    runs = {}
    for fused in (True, False):
        monkeypatch.setattr(generation, "GREEDY_IN_GRAPH", fused)
        dec = Decoder(model, batch, 96)
        runs[fused] = [generate(model, prompts, cfg, decoder=dec, sync_every=s) for s in (5, 24)]
        assert (dec.greedy_graph is not None) == fused and (dec.graph is not None) != fused
    for a, b in zip(runs[True], runs[False]):
        assert a.cuda_graph and b.cuda_graph
        assert a.sequences == b.sequences and a.finish_reasons == b.finish_reasons
    assert runs[True][0].finish_reasons[-1] == "eos"


@pytest.mark.parametrize("fused", [True, False])
def test_logits_that_break_while_decoding_stop_the_graph_loop(monkeypatch, fused: bool) -> None:
    """A row whose logits turn NaN after the prompt (every input embedding NaN but the prompts' and row 0's
    tokens) is caught by the argmax captured in the greedy graph (fused) or by the check before the pick
    between replays of the plain step's graph: NonFiniteLogitsError naming row 1 and the token count."""
    triton_ops("triton_pick")
    from nemotron_core import generation
    from nemotron_core.create import build_config, random_model
    from nemotron_core.generation import Decoder, NonFiniteLogitsError, SamplingConfig, generate

    monkeypatch.setattr(generation, "GREEDY_IN_GRAPH", fused)
    model = random_model(build_config("tiny"), torch.bfloat16, seed=0, device="cuda").eval()
    g = torch.Generator().manual_seed(7)
    prompts = [torch.randint(3, 1000, (n,), generator=g).tolist() for n in (12, 9)]
    cfg = SamplingConfig(max_new_tokens=24, do_sample=False, repetition_penalty=1.0 if fused else 1.2)
    clean = generate(model, prompts, cfg, decoder=Decoder(model, 2, 64)).sequences
    keep = sorted(set(prompts[0]) | set(prompts[1]) | set(clean[0]) | {0})  # (0: row 1's left padding)
    breaks = next(j for j, t in enumerate(clean[1]) if t not in keep) + 1
    with torch.no_grad():
        emb = model.model.embed_tokens.weight
        kept = emb[keep].clone()
        emb.fill_(float("nan"))
        emb[keep] = kept
    dec = Decoder(model, 2, 64)
    with pytest.raises(NonFiniteLogitsError, match=rf"after {breaks} generated tokens? \(batch row 1\)"):
        generate(model, prompts, cfg, decoder=dec, sync_every=4)
    assert (dec.greedy_graph if fused else dec.graph) is not None
