"""Diffusion sampling (`dlm.generation`, `dlm.token_sampling`, `dlm.reveal`): schedule, reveal rules, the core
loop, generate / stream / batch / AR.

Pure pieces are tested on synthetic tensors; the loop's bookkeeping on `FakeDLM` (a denoiser whose logits we
choose, so orders and probabilities are known exactly); end-to-end behaviour on the tiny random LLaMA.
"""
from __future__ import annotations

import math
import re

import pytest
import torch

import dlm
from dlm import REVEAL_RULES, generation
from dlm.reveal import (
    block_sizes,
    confidence_certainty,
    entropy_certainty,
    margin_certainty,
    reveal_random,
    reveal_schedule,
    reveal_top_k,
    split_steps,
)
from dlm.token_sampling import sample_tokens

PROMPT = "The quick brown fox"


@pytest.fixture(scope="module")
def model(tiny_llama_dir):
    import dlm
    return dlm.load(tiny_llama_dir, device="cpu", dtype="float32")


class FakeDLM:
    """Duck-typed DiffusionLM over a 64-token vocabulary whose logits are a fixed table [L, V] per position
    (plus an optional bias). Lets tests know the exact probabilities the sampler saw."""

    V, MASK, EOS = 64, 63, 2

    def __init__(self, tokenizer, table: torch.Tensor, shift: bool = True):
        self.tokenizer, self.table, self.shift = tokenizer, table, shift
        self.first_predictable = 1 if shift else 0
        self.mask_token_id, self.eos_token_ids = self.MASK, [self.EOS]
        self.device, self.max_length, self.calls = torch.device("cpu"), 512, 0

    def denoise_logits(self, input_ids, attention_mask=None, prefix_cache=None, rows=None):
        self.calls += 1
        B, L = input_ids.shape
        table = self.table[:L] if rows is None else self.table[rows]
        return table.expand(B, *table.shape).clone()


def fake(tokenizer, L=32, seed=0, **kw) -> FakeDLM:
    g = torch.Generator().manual_seed(seed)
    return FakeDLM(tokenizer, torch.randn(L, FakeDLM.V, generator=g) * 3, **kw)


def mask_free(gen, mask_id):
    assert mask_id not in gen.token_ids
    assert all(mask_id not in f.tokens[f.start:] for f in gen.frames[-1:])


def check_frames(gen, prompt_ids, mask_id):
    """Frames are consistent: each revealed position was masked before, is set after, and never changes again;
    the prompt never changes; the last frame is the final canvas."""
    prev = list(prompt_ids) + [mask_id] * len(gen.token_ids)
    seen = set()
    for f in gen.frames:
        assert f.tokens[: f.start] == list(prompt_ids)
        assert len(f.revealed) == len(f.confidence)
        for p in f.revealed:
            assert p >= f.start and p not in seen and prev[p] == mask_id and f.tokens[p] != mask_id
            seen.add(p)
        changed = {i for i, (a, b) in enumerate(zip(prev, f.tokens)) if a != b}
        assert changed == set(f.revealed)
        prev = f.tokens
    assert prev[len(prompt_ids):] == gen.token_ids
    assert seen == set(range(len(prompt_ids), len(prompt_ids) + len(gen.token_ids)))


# ----------------------------------------------------------------------------------------------- schedule

@pytest.mark.parametrize("n,steps", [(1, 1), (8, 8), (10, 4), (64, 7), (5, 3), (100, 1)])
def test_reveal_schedule_is_llada_even_split(n, steps):
    base, rem = divmod(n, steps)
    assert reveal_schedule(n, steps) == [base + 1] * rem + [base] * (steps - rem)


def test_block_sizes_and_step_split():
    assert block_sizes(12, None) == [12]
    assert block_sizes(12, 4) == [4, 4, 4]
    assert block_sizes(10, 4) == [4, 4, 2]  # short last block
    assert block_sizes(3, 8) == [3]
    assert split_steps(12, [4, 4, 4]) == [4, 4, 4]
    assert split_steps(6, [4, 4, 4]) == [2, 2, 2]
    assert split_steps(7, [4, 4, 4]) == [3, 2, 2]  # remainder to the earliest block
    assert split_steps(5, [4, 4, 2]) == [2, 2, 1]  # in proportion to size
    assert split_steps(10, [4, 4, 2]) == [4, 4, 2]
    for steps in range(3, 11):
        alloc = split_steps(steps, [4, 4, 2])
        assert sum(alloc) == steps and all(1 <= a <= s for a, s in zip(alloc, [4, 4, 2]))
    with pytest.raises(ValueError):
        split_steps(2, [4, 4, 2])


# -------------------------------------------------------------------------------- proposals and certainty

def test_certainties_on_synthetic_probs():
    probs = torch.tensor([[0.7, 0.2, 0.1, 0.0], [0.4, 0.35, 0.25, 0.0], [0.25, 0.25, 0.25, 0.25]])
    x0 = torch.tensor([1, 0, 3])
    assert torch.allclose(confidence_certainty(probs, x0), torch.tensor([0.2, 0.4, 0.25]))
    assert torch.allclose(margin_certainty(probs, x0), torch.tensor([0.5, 0.05, 0.0]))
    ent = entropy_certainty(probs, x0)
    assert ent[0] > ent[1] > ent[2] and torch.isclose(ent[2], -torch.log(torch.tensor(4.0)))


def test_top_k_and_top_p_filter_the_sampling_distribution():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).expand(4000, 4)
    def support(**kw):
        return set(sample_tokens(logits, 1.0, generator=torch.Generator().manual_seed(0), **kw).tolist())
    assert support(top_k=2) == {0, 1}
    assert support(top_p=0.79) == {0, 1}
    assert support(top_p=0.81) == {0, 1, 2}
    assert support(top_p=0.1) == {0}
    assert support() == {0, 1, 2, 3}


def test_sample_tokens_greedy_seeded_and_filtered():
    logits = torch.randn(50, 10, generator=torch.Generator().manual_seed(1))
    assert torch.equal(sample_tokens(logits), logits.argmax(-1))
    a = sample_tokens(logits, 1.0, generator=torch.Generator().manual_seed(3))
    b = sample_tokens(logits, 1.0, generator=torch.Generator().manual_seed(3))
    c = sample_tokens(logits, 1.0, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)
    top1 = sample_tokens(logits, 5.0, top_k=1, generator=torch.Generator().manual_seed(3))
    assert torch.equal(top1, logits.argmax(-1))


@pytest.mark.parametrize("top_p", [0.3, 0.9, 0.95, 0.999])
@pytest.mark.parametrize("min_keep", [1, 3])
def test_nucleus_warper_keeps_exactly_what_transformers_top_p_keeps(top_p, min_keep):
    """The candidates' shortcut decides the same kept set as the full sort: peaked rows, flat rows, banned (-inf)
    tokens, a small vocabulary (all decided from the tokens above a threshold), and rows whose nucleus reaches into
    a tail of tokens below every threshold (the full sort)."""
    from transformers import TopPLogitsWarper

    from dlm.token_sampling import nucleus_warper
    g = torch.Generator().manual_seed(int(top_p * 1000) + min_keep)
    peaked = torch.randn(48, 5000, generator=g) * torch.linspace(0.5, 8.0, 48)[:, None]
    flat = torch.randn(4, 5000, generator=g) * 0.01
    banned = torch.randn(4, 5000, generator=g) * 4
    banned[:, ::3] = float("-inf")
    small = torch.randn(6, 100, generator=g) * 3
    # 99.6% on one token, the rest spread over 4,999 tokens of < 1e-6 each: top-p 0.999 reaches into that tail
    tail = (torch.full((3, 5000), 0.004 / 4999) * (1 + 0.01 * torch.rand(3, 5000, generator=g))).log()
    tail[:, 0] = math.log(0.996)
    full_sorts = []
    parent = TopPLogitsWarper.__call__
    ours = nucleus_warper(top_p)
    ours.min_tokens_to_keep = min_keep
    type(ours).__bases__[0].__call__ = lambda self, i, sc: full_sorts.append(len(batches)) or parent(self, i, sc)
    try:
        batches = []
        for scores in [*peaked.split(1), peaked, flat, banned, small, tail]:   # one row per call, then batches
            batches.append(scores)
            ref = parent(TopPLogitsWarper(top_p, min_tokens_to_keep=min_keep), None, scores.clone())
            got = ours(None, scores.clone())
            assert torch.equal(got[~torch.isinf(got)], scores[~torch.isinf(got)])   # kept scores untouched
            differ = torch.isinf(got) != torch.isinf(ref)
            # only where float32 rounding of the parent's cumulative sum (over up to 5,000 tokens) decides: the
            # token's mass-from-here is within 5e-4 of 1 - top_p
            if differ.any():
                p = scores.double().softmax(-1)
                rows, cols = differ.nonzero(as_tuple=True)
                for r, c in zip(rows.tolist(), cols.tolist()):
                    mass = float(p[r][p[r] <= p[r, c]].sum())
                    assert abs(mass - (1 - top_p)) < 5e-4, (r, c, mass)
                assert differ.sum() <= differ.shape[0]
    finally:
        TopPLogitsWarper.__call__ = parent
    # only the tail's rows, and only when the nucleus reaches past its head (top-p above 0.996, or more than one
    # token to keep), took the full sort
    from dlm.packed_linear import available
    if available():   # (without the compiled kernel every row takes the full sort)
        assert full_sorts == ([len(batches)] * tail.shape[0] if top_p > 0.996 or min_keep > 1 else [])


def test_ar_generate_samples_from_the_nucleus_of_the_tempered_distribution(model):
    """top-p comes after the temperature in `ar_generate` (as in transformers): at T = 0.4 the tempered nucleus is
    smaller than the untempered one, and every draw lies in it."""
    from dlm.token_sampling import sampling_probs
    ids = model.tokenizer(PROMPT, add_special_tokens=False)["input_ids"]
    logits = model.ar_logits(torch.tensor([ids]))[0, -1:].float()
    logits[:, [model.mask_token_id, *model.eos_token_ids]] = float("-inf")     # what generate suppresses
    allowed = sampling_probs(logits, 0.4, 0, 0.5)[0] > 0
    untempered = sampling_probs(logits, 1.0, 0, 0.5)[0] > 0
    assert allowed.sum() < untempered.sum()
    drawn = {model.ar_generate(PROMPT, max_new_tokens=1, temperature=0.4, top_p=0.5, seed=s,
                               suppress_eos=True).token_ids[0] for s in range(120)}
    assert len(drawn) > 1 and all(bool(allowed[t]) for t in drawn)


def test_draw_tokens_follows_the_distribution_and_never_draws_a_zero():
    from dlm.token_sampling import draw_tokens
    probs = torch.tensor([[0.5, 0.0, 0.3, 0.2, 0.0], [0.0, 0.0, 0.0, 2.0, 2.0]])   # rows need not sum to 1
    g = torch.Generator().manual_seed(0)
    draws = torch.stack([draw_tokens(probs, g) for _ in range(4000)])            # [4000, 2]
    for row, target in ((0, probs[0]), (1, probs[1] / probs[1].sum())):
        freq = torch.bincount(draws[:, row], minlength=5).float() / len(draws)
        assert float((freq - target).abs().sum()) / 2 < 0.03                     # TV; n=4000: sd ~0.008
        assert (freq[target == 0] == 0).all()
    again = torch.stack([draw_tokens(probs, torch.Generator().manual_seed(0)) for _ in range(3)])
    assert torch.equal(again[0], again[1])


def test_reveal_top_k_per_row_within_eligible():
    score = torch.tensor([[0.9, 0.1, 0.8, 0.7, 0.95], [0.2, 0.3, 0.1, 0.6, 0.5]])
    eligible = torch.tensor([[False, True, True, True, True], [True, True, True, True, False]])
    reveal = reveal_top_k(score, eligible, torch.tensor([2, 1]))
    assert reveal.tolist() == [[False, False, True, False, True], [False, False, False, True, False]]
    none = reveal_top_k(score, eligible, torch.tensor([0, 0]))
    assert not none.any()


def test_reveal_random_probability_is_one_over_steps_left():
    eligible = torch.ones(200, 50, dtype=torch.bool)
    eligible[:, :10] = False
    gen = torch.Generator().manual_seed(0)
    for s in (1, 2, 4):
        reveal = reveal_random(eligible, s, gen)
        assert not (reveal & ~eligible).any()
        assert abs(reveal.float().sum().item() / eligible.sum().item() - 1 / s) < 0.02


# -------------------------------------------------------------------------------- core loop (FakeDLM)

def test_steps_and_schedule_are_respected(tiny_tokenizer):
    m = fake(tiny_tokenizer)
    prompt = [5, 6, 7]
    g = generation.generate(m, prompt, frames=True, max_new_tokens=10, steps=4)
    assert g.nfe == m.calls == 4 and len(g.frames) == 4
    assert [len(f.revealed) for f in g.frames] == reveal_schedule(10, 4)
    assert [f.step for f in g.frames] == [1, 2, 3, 4] and all(f.total_steps == 4 for f in g.frames)
    check_frames(g, prompt, m.MASK)


@pytest.mark.parametrize("rule,temperature", [("confidence", 0.0), ("confidence", 3.0), ("margin", 3.0),
                                              ("entropy", 3.0)])
def test_certainty_rules_reveal_most_certain_first_from_untempered_probs(tiny_tokenizer, rule, temperature):
    m = fake(tiny_tokenizer, seed=1)
    prompt = [5, 6]
    g = generation.generate(m, prompt, frames=True, max_new_tokens=12, steps=6, remasking=rule,
                          temperature=temperature, seed=0)
    probs = m.table.clone()
    probs[:, m.MASK] = float("-inf")
    probs = probs.softmax(-1)  # untempered
    tokens = g.frames[-1].tokens
    score = {"confidence": lambda p: probs[p, tokens[p]].item(),
             "margin": lambda p: (lambda t: (t[0] - t[1]).item())(probs[p].topk(2).values),
             "entropy": lambda p: torch.special.xlogy(probs[p], probs[p]).sum().item()}[rule]
    remaining = set(range(2, 14))
    for f in g.frames:
        # the reported confidence is the untempered probability of the chosen token
        assert f.confidence == pytest.approx([probs[p, tokens[p]].item() for p in f.revealed], rel=1e-5)
        if rule != "confidence" or temperature == 0:  # else the score depends on tokens resampled each step
            worst_revealed = min(score(p) for p in f.revealed)
            remaining -= set(f.revealed)
            assert all(score(p) <= worst_revealed + 1e-6 for p in remaining)


def test_mask_and_pad_are_never_predicted(tiny_tokenizer):
    m = fake(tiny_tokenizer)
    m.table[:, m.MASK] = 100.0  # the model "wants" the mask token everywhere
    g = generation.generate(m, [5], frames=True, max_new_tokens=8, steps=8)
    assert m.MASK not in g.token_ids
    g = generation.generate(m, [5], frames=True, max_new_tokens=8, steps=2, temperature=2.0, seed=0)
    assert m.MASK not in g.token_ids


def test_text_is_cut_at_first_eos_and_eos_can_be_suppressed(tiny_tokenizer):
    m = fake(tiny_tokenizer)
    m.table[4, FakeDLM.EOS] = 100.0  # EOS at the 3rd generated position (prompt = 2 tokens)
    g = generation.generate(m, [5, 6], frames=True, max_new_tokens=6, steps=6)
    assert g.token_ids[2] == FakeDLM.EOS and len(g.token_ids) == 6
    assert g.text == tiny_tokenizer.decode(g.token_ids[:2], skip_special_tokens=True)
    g = generation.generate(m, [5, 6], frames=True, max_new_tokens=6, steps=6, suppress_eos=True)
    assert FakeDLM.EOS not in g.token_ids


def test_random_sampler_reveal_counts_match_algorithm_2_in_expectation(tiny_tokenizer):
    """Algorithm 2: with s steps left each masked position is revealed w.p. 1/s, so E[revealed at step j] =
    n/T for the linear schedule, and revealed/remaining averages 1/s at every step."""
    m = fake(tiny_tokenizer)
    n, T, runs = 12, 4, 200
    counts = torch.zeros(runs, T)  # a step never run (everything already revealed) reveals 0
    ratios: list[list[float]] = [[] for _ in range(T)]  # revealed / still masked, when something was masked
    for r in range(runs):
        g = generation.generate(m, [5], frames=True, max_new_tokens=n, steps=T, remasking="random", seed=r)
        remaining = n
        for j, f in enumerate(g.frames):
            counts[r, j] = len(f.revealed)
            ratios[j].append(len(f.revealed) / remaining)
            remaining -= len(f.revealed)
        # the loop stops once nothing is masked: an evaluation then could not change anything
        assert remaining == 0 and g.nfe == len(g.frames) <= T
    mean = counts.mean(0)
    se = counts.std(0) / runs ** 0.5
    assert ((mean - n / T).abs() < 4 * se + 0.05).all(), (mean, se)
    for j in range(T):
        assert abs(sum(ratios[j]) / len(ratios[j]) - 1 / (T - j)) < 0.05, (j, ratios[j])
    assert counts.std(0)[0] > 0  # really random, not a fixed schedule


def test_threshold_reveals_confident_positions_in_parallel(tiny_tokenizer):
    m = fake(tiny_tokenizer)
    m.table[3:7] = -10.0
    m.table[3:7, 10] = 10.0  # positions 3..6 are near-certain, the rest are not
    g = generation.generate(m, [5, 6, 7], frames=True, max_new_tokens=10, steps=10, threshold=0.9)
    assert set(g.frames[0].revealed) >= {3, 4, 5, 6}
    assert g.nfe == len(g.frames) < 10
    assert all(len(f.revealed) >= 1 for f in g.frames)
    check_frames(g, [5, 6, 7], m.MASK)


# ------------------------------------------------------------------------------------ tiny random LLaMA

def test_generate_plain_decoding(model):
    g = model.generate(PROMPT, frames=True, max_new_tokens=12, steps=6)
    prompt_ids = model.tokenizer(PROMPT)["input_ids"]
    assert g.nfe == 6 and len(g.frames) == 6 and len(g.token_ids) == 12
    assert all(len(f.revealed) == 2 for f in g.frames)
    mask_free(g, model.mask_token_id)
    check_frames(g, prompt_ids, model.mask_token_id)
    assert 0 < g.seconds and g.prompt == PROMPT and isinstance(g.text, str)


@pytest.mark.parametrize("rule", sorted(REVEAL_RULES))
def test_every_remasking_rule_fills_the_canvas(model, rule):
    g = model.generate(PROMPT, frames=True, max_new_tokens=8, steps=4, remasking=rule, temperature=0.7, top_p=0.9,
                       top_k=50, seed=1)
    check_frames(g, model.tokenizer(PROMPT)["input_ids"], model.mask_token_id)
    # random (Algorithm 2) may reveal everything before the last step and then stop early
    assert g.nfe == len(g.frames) == 4 if rule != "random" else 1 <= g.nfe == len(g.frames) <= 4


def test_threshold_lowers_nfe(model):
    low = model.generate(PROMPT, frames=True, max_new_tokens=12, threshold=1e-9)  # any token clears it: one step
    assert low.nfe == 1 and len(low.frames[0].revealed) == 12
    blocks = model.generate(PROMPT, frames=True, max_new_tokens=12, block_length=4, threshold=1e-9)
    assert blocks.nfe == 3
    high = model.generate(PROMPT, frames=True, max_new_tokens=12, threshold=1.0)  # a random model is never that sure
    assert high.nfe == 12 and all(len(f.revealed) == 1 for f in high.frames)
    mask_free(low, model.mask_token_id)


def test_seeds_reproduce_and_differ(model):
    kw = dict(max_new_tokens=10, steps=5, temperature=1.0, remasking="random")
    a, b, c = (model.generate(PROMPT, seed=s, frames=True, **kw) for s in (7, 7, 8))
    assert a.token_ids == b.token_ids and [f.revealed for f in a.frames] == [f.revealed for f in b.frames]
    assert a.token_ids != c.token_ids


def test_greedy_is_deterministic_without_seed(model):
    a = model.generate(PROMPT, frames=True, max_new_tokens=8, steps=4)
    b = model.generate(PROMPT, max_new_tokens=8, steps=4)
    assert a.token_ids == b.token_ids


def test_block_decoding_never_reveals_a_later_block_early(model):
    n, bl = 10, 4  # blocks of 4, 4 and a short last block of 2
    g = model.generate(PROMPT, frames=True, max_new_tokens=n, steps=5, block_length=bl, temperature=0.8, seed=0)
    start, mask = g.frames[0].start, model.mask_token_id
    assert g.nfe == 5
    for f in g.frames:
        region = f.tokens[start:]
        blocks = {(p - start) // bl for p in f.revealed}
        assert len(blocks) == 1
        b = blocks.pop()
        assert mask not in region[: b * bl]  # earlier blocks complete
        assert all(t == mask for t in region[(b + 1) * bl:])  # later blocks untouched
    mask_free(g, mask)


def test_stream_yields_the_same_frames_live(model):
    kw = dict(max_new_tokens=8, steps=4, temperature=1.0, seed=3)
    seen = []
    items = []
    for item in model.stream(PROMPT, on_step=seen.append, **kw):
        items.append(item)
        if len(items) == 1:
            assert len(seen) == 1  # the first frame arrives before the remaining steps run
    *frames, result = items
    g = model.generate(PROMPT, frames=True, **kw)
    assert frames == g.frames == result.frames == seen
    assert result.token_ids == g.token_ids and result.text == g.text


def test_batch_equals_single_generation_with_left_padding(model):
    prompts = ["Hi", PROMPT + " jumps over the lazy dog", "One two"]
    assert len(model.generate_batch(prompts, max_new_tokens=6, steps=3)) == 3
    batch = model.generate_batch(prompts, max_new_tokens=6, steps=3, frames=True)
    for p, g in zip(prompts, batch):
        single = model.generate(p, max_new_tokens=6, steps=3, frames=True)
        assert g.token_ids == single.token_ids and g.text == single.text and g.nfe == 3
        # token ids exactly; probabilities to float rounding (batched and single matmuls round differently)
        assert [(f.step, f.tokens, f.revealed, f.start) for f in g.frames] == \
            [(f.step, f.tokens, f.revealed, f.start) for f in single.frames]
        for a, b in zip(g.frames, single.frames):
            assert a.confidence == pytest.approx(b.confidence, rel=1e-4, abs=1e-6)


def test_use_cache_runs_and_reveals_the_same_tokens(model):
    g = model.generate(PROMPT, frames=True, max_new_tokens=12, steps=6, block_length=4, use_cache=True)
    ref = model.generate(PROMPT, frames=True, max_new_tokens=12, steps=6, block_length=4)
    assert g.nfe == ref.nfe == 6
    assert [len(f.revealed) for f in g.frames] == [len(f.revealed) for f in ref.frames]
    check_frames(g, model.tokenizer(PROMPT)["input_ids"], model.mask_token_id)
    # the first step of the first block sees exactly the uncached canvas
    assert g.frames[0].tokens == ref.frames[0].tokens
    prompts = ["Hi", PROMPT]  # left padding through the cache too
    for p, b in zip(prompts, model.generate_batch(prompts, max_new_tokens=8, steps=4, block_length=4,
                                                  use_cache=True, frames=True)):
        check_frames(b, model.tokenizer(p)["input_ids"], model.mask_token_id)
        assert b.nfe == 4


def test_chat_messages_use_the_template(model):
    messages = [{"role": "user", "content": "Say hi"}]
    g = model.generate(frames=True, messages=messages, max_new_tokens=4, steps=2)
    text = model.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert g.prompt == text
    assert g.frames[0].tokens[: g.frames[0].start] == model.tokenizer(text, add_special_tokens=False)["input_ids"]


def test_ar_generate_greedy_seeded_and_timed(model):
    ids = model.tokenizer(PROMPT)["input_ids"]
    g = model.ar_generate(PROMPT, max_new_tokens=5)
    assert 1 <= g.nfe == len(g.token_ids) <= 5 and g.frames == [] and g.seconds > 0
    with torch.no_grad():
        logits = model.ar_logits(torch.tensor([ids]))[0, -1]
    logits[model.mask_token_id] = float("-inf")
    assert g.token_ids[0] == int(logits.argmax())  # greedy, causal, mask suppressed
    kw = dict(max_new_tokens=6, temperature=1.0, seed=5)
    a, b = model.ar_generate(PROMPT, **kw), model.ar_generate(PROMPT, **kw)
    assert a.token_ids == b.token_ids and model.mask_token_id not in a.token_ids
    state = torch.random.get_rng_state()
    model.ar_generate(PROMPT, **kw)
    assert torch.equal(state, torch.random.get_rng_state())  # the seed does not leak into global RNG


# ----------------------------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("kwargs,pattern", [
    (dict(prompt=""), "prompt: it is empty"),
    (dict(prompt=None), "prompt: it is empty"),
    (dict(steps=0), r"steps: must be an integer >= 1 \(or None\), got 0"),
    (dict(max_new_tokens=0), "max_new_tokens: must be an integer >= 1, got 0"),
    (dict(max_new_tokens=600), "max_new_tokens: .*600.*512"),
    (dict(remasking="lowest"), "remasking: must be one of .*confidence.*random.*, got 'lowest'"),
    (dict(block_length=0), "block_length: must be an integer >= 1"),
    (dict(block_length=2, steps=3), "steps=3 is fewer than the 4 blocks"),
    (dict(threshold=1.5), r"threshold: must be in \(0, 1\]"),
    (dict(threshold=0.9, remasking="random"), "threshold: needs a certainty-based remasking"),
    (dict(temperature=-1.0), "temperature: must be 0 \\(greedy\\) or between"),
    (dict(temperature=float("nan")), "temperature: must be a finite number"),
    (dict(top_p=0.0), r"top_p: must be in \(0, 1\]"),
    (dict(top_k=-1), "top_k: must be an integer >= 0"),
    (dict(seed=10**30), "seed: must be an integer between 0 and"),
    (dict(seed="abc"), "seed: must be an integer, got 'abc'"),
    (dict(stepz=3), "unknown sampler setting 'stepz' .did you mean steps"),
    (dict(decoder="blocks"), "block_length: the blocks decoder needs a block size"),
    (dict(messages=[{"role": "user", "content": "x"}]), "either prompt or messages"),
])
def test_bad_input_raises_clear_value_error(model, kwargs, pattern):
    args = dict(prompt=PROMPT, max_new_tokens=8)
    args.update(kwargs)
    with pytest.raises(ValueError, match=pattern):
        model.generate(args.pop("prompt"), **args)


def test_batch_and_ar_bad_input(model):
    with pytest.raises(ValueError, match="prompts: it is empty"):
        model.generate_batch([])
    with pytest.raises(ValueError, match="prompt: it is empty"):
        model.generate_batch(["ok", ""])
    with pytest.raises(ValueError, match=re.escape("max_new_tokens=600")):
        model.ar_generate(PROMPT, max_new_tokens=600)


def test_steps_beyond_the_length_are_an_error_naming_the_length(model):
    with pytest.raises(ValueError, match="steps: must be between 1 and the generation length 8, got 50"):
        model.generate(PROMPT, max_new_tokens=8, steps=50)
    with pytest.raises(ValueError, match="steps: must be between 1 and the generation length 3"):
        model.fill("a [MASK:3] b", steps=4)


def test_frames_are_recorded_only_on_request(model):
    plain = model.generate(PROMPT, max_new_tokens=6, steps=3)
    kept = model.generate(PROMPT, max_new_tokens=6, steps=3, frames=True)
    assert plain.frames == [] and len(kept.frames) == 3 and plain.token_ids == kept.token_ids


def test_a_whole_config_and_overrides(model):
    cfg = dlm.SamplerConfig(max_new_tokens=6, steps=3, remasking="margin")
    a = model.generate(PROMPT, cfg)
    b = model.generate(PROMPT, max_new_tokens=6, steps=3, remasking="margin")
    c = model.generate(PROMPT, cfg, steps=6)                  # override one field of a whole config
    assert a.token_ids == b.token_ids and a.nfe == 3 and c.nfe == 6
    model.sampler_config = cfg                                 # the model's recommended config is the default
    try:
        assert model.generate(PROMPT).nfe == 3
    finally:
        model.sampler_config = dlm.SamplerConfig()


# ------------------------------------------------------------------------------------ the blocks decoder

def test_blocks_decoder_fills_block_by_block_with_the_exact_cache(model):
    g = model.generate(PROMPT, max_new_tokens=12, decoder="blocks", block_length=4, steps=12, frames=True,
                       suppress_eos=True)
    start = g.frames[0].start
    assert g.nfe == 12 and len(g.token_ids) == 12 and model.mask_token_id not in g.token_ids
    for f in g.frames:  # each step reveals inside one block; earlier blocks done; the canvas grows by blocks
        blocks = {(p - start) // 4 for p in f.revealed}
        assert len(blocks) == 1
        b = blocks.pop()
        assert len(f.tokens) == start + 4 * (b + 1)
        assert model.mask_token_id not in f.tokens[start: start + 4 * b]


def test_blocks_decoder_equals_uncached_block_decoding(model):
    """Greedy block decoding through the cache picks the same tokens as recomputing every block's logits from
    scratch with one uncached staircase forward over [x_t; x_0]."""
    cfg = dlm.SamplerConfig(decoder="blocks", block_length=4, max_new_tokens=8, steps=8, suppress_eos=True)
    g = model.generate(PROMPT, cfg)
    ids = model.tokenizer(PROMPT)["input_ids"]
    P = len(ids)
    canvas = torch.tensor([ids + [model.mask_token_id] * 8])
    banned = sorted({model.mask_token_id, *model.eos_token_ids} | ({model.tokenizer.pad_token_id}
                                                                   if model.tokenizer.pad_token_id is not None
                                                                   else set()))
    for b in range(2):
        for _ in range(4):  # one token per step, most confident first, as the config asks
            x0 = canvas.clone()
            with torch.no_grad():
                logits = model.block_denoise_logits(canvas, x0, 4, offset=P % 4)[0].float()
            logits[:, banned] = float("-inf")
            window = range(P + 4 * b, P + 4 * b + 4)
            probs = logits.softmax(-1)
            best = max((p for p in window if canvas[0, p] == model.mask_token_id),
                       key=lambda p: float(probs[p].max()))
            canvas[0, best] = int(probs[best].argmax())
    assert g.token_ids == canvas[0, P:].tolist()


def test_blocks_decoder_stops_at_eos_at_block_granularity(model):
    eos = model.eos_token_ids[0]
    model.base.lm_head.bias = None
    with torch.no_grad():  # make EOS by far the likeliest token everywhere
        saved = model.base.lm_head.weight[eos].clone()
        model.base.lm_head.weight[eos] = model.base.model.norm.weight * 50
    try:
        g = model.generate(PROMPT, max_new_tokens=16, decoder="blocks", block_length=4, steps=16)
        full = model.generate(PROMPT, max_new_tokens=16, decoder="blocks", block_length=4, steps=16,
                              stop_at_eos=False)
    finally:
        with torch.no_grad():
            model.base.lm_head.weight[eos] = saved
    assert eos in g.token_ids[:4] and len(g.token_ids) == 4 and g.nfe == 4 and g.text == ""
    assert len(full.token_ids) == 16


def test_blocks_decoder_batch_equals_single(model):
    prompts = ["Hi", PROMPT + " jumps"]
    cfg = dlm.SamplerConfig(decoder="blocks", block_length=4, max_new_tokens=8, steps=4, suppress_eos=True)
    batch = model.generate_batch(prompts, cfg)
    for p, g in zip(prompts, batch):
        assert g.token_ids == model.generate(p, cfg).token_ids


def test_blocks_decoder_refuses_infilling(model):
    with pytest.raises(ValueError, match="decoder: infilling needs the full-attention decoder"):
        model.fill("The [MASK:2] dog", decoder="blocks", block_length=2)


def test_pinned_words_stay_where_they_were_put(model):
    g = model.generate(PROMPT, max_new_tokens=10, steps=5, pins={3: " dog", 8: 1234}, frames=True)
    dog = model.tokenizer(" dog", add_special_tokens=False)["input_ids"]
    assert g.token_ids[3:3 + len(dog)] == dog and g.token_ids[8] == 1234
    start = g.frames[0].start
    assert all(not ({start + 3, start + 8} & set(f.revealed)) for f in g.frames)   # never rewritten
    with pytest.raises(ValueError, match="pins: .* does not fit"):
        model.generate(PROMPT, max_new_tokens=4, pins={3: " a b c d"})
    with pytest.raises(ValueError, match="pins: pinned words need the full-attention decoder"):
        model.generate(PROMPT, max_new_tokens=4, pins={1: 5}, decoder="blocks", block_length=2)


def test_redenoise_changes_only_the_edited_span(model):
    g = model.generate(PROMPT, max_new_tokens=10, steps=10, temperature=1.0, seed=0)
    ids = model.tokenizer(PROMPT)["input_ids"]
    tokens, fixed = ids + g.token_ids, [True] * len(ids) + [False] * 10
    a, b = len(ids) + 3, len(ids) + 6
    for new_len in (None, 5):
        e = model.redenoise(tokens, fixed, [(a, b, new_len)], temperature=1.0, seed=1)
        n = new_len or 3
        assert e.token_ids[:a] == tokens[:a] and e.token_ids[a + n:] == tokens[b:]  # everything else identical
        assert len(e.token_ids) == len(tokens) - 3 + n and model.mask_token_id not in e.token_ids
    with pytest.raises(ValueError, match="edits: span .* touches fixed text"):
        model.redenoise(tokens, fixed, [(0, 2, None)])


def test_ar_stream_matches_ar_generate_greedy(model):
    *frames, g = model.ar_stream(PROMPT, max_new_tokens=6)
    ref = model.ar_generate(PROMPT, max_new_tokens=6)
    assert g.token_ids == ref.token_ids and len(frames) == len(g.token_ids) and g.seconds > 0
    assert all(f.revealed == [f.start + k] for k, f in enumerate(frames))


# ------------------------------------------------------------------------------------ the speculative decoder

def test_speculative_greedy_equals_greedy_left_to_right_decoding(model):
    """Drafts are verified by the clean (causal) rows of the same weights, so greedy speculative decoding must
    write exactly what greedy AR decoding with those weights writes, whatever the drafts were."""
    for width in (2, 4):
        g = model.generate(PROMPT, max_new_tokens=12, decoder="speculative", block_length=width, suppress_eos=True,
                           frames=True)
        ar = model.ar_generate(PROMPT, max_new_tokens=12, suppress_eos=True)
        assert g.token_ids == ar.token_ids and g.text == ar.text
        assert 1 <= g.nfe <= 12 and len(g.frames) == g.nfe
        revealed = [p for f in g.frames for p in f.revealed]
        start = g.frames[0].start
        assert revealed == list(range(start, start + 12))            # final tokens left to right, each once


def test_speculative_sampling_is_seeded_and_stops_at_eos(model):
    kw = dict(max_new_tokens=10, decoder="speculative", block_length=4, temperature=1.0, seed=3)
    a, b = model.generate(PROMPT, **kw), model.generate(PROMPT, **kw)
    assert a.token_ids == b.token_ids and model.mask_token_id not in a.token_ids
    eos = model.eos_token_ids[0]
    with torch.no_grad():
        saved = model.base.lm_head.weight[eos].clone()
        model.base.lm_head.weight[eos] = model.base.model.norm.weight * 50
    try:
        g = model.generate(PROMPT, max_new_tokens=10, decoder="speculative", block_length=4)
    finally:
        with torch.no_grad():
            model.base.lm_head.weight[eos] = saved
    assert g.token_ids[0] == eos and g.text == "" and g.nfe == 1


def test_speculative_batch_equals_single_and_needs_causal_clean_attention(model):
    prompts = ["Hi", PROMPT]
    cfg = dlm.SamplerConfig(decoder="speculative", block_length=3, max_new_tokens=6, suppress_eos=True)
    for p, g in zip(prompts, model.generate_batch(prompts, cfg)):
        assert g.token_ids == model.generate(p, cfg).token_ids
    for g in model.generate_batch(prompts, cfg.replace(suppress_eos=False, temperature=1.0, seed=0)):
        assert model.mask_token_id not in g.token_ids          # a row that stopped early is padded with EOS
    model.config.clean_attention = "block"
    try:
        with pytest.raises(ValueError, match="token-causal clean attention"):
            model.generate(PROMPT, cfg)
    finally:
        model.config.clean_attention = "causal"


@pytest.mark.parametrize("below", [0.0, 1.0])
def test_speculative_noisy_block_goes_beside_pending_drafts_below_the_acceptance_cut(model, monkeypatch, below):
    """Where the noisy block goes is a real choice: with SIBLING_BELOW = 1 every forward with pending drafts asks
    block_verify for a sibling of the first one (`noisy_from` = the committed tokens), with 0 never; and greedy
    output is the same left-to-right decoding either way."""
    from dlm.decoders import speculative
    monkeypatch.setattr(speculative, "SIBLING_BELOW", below)
    calls, real = [], model.block_verify

    def spy(cache, noisy, clean_ids, **kw):
        calls.append((clean_ids.shape[1], kw.get("noisy_from"), noisy is not None))
        return real(cache, noisy, clean_ids, **kw)

    monkeypatch.setattr(model, "block_verify", spy)
    g = model.generate(PROMPT, max_new_tokens=12, decoder="speculative", block_length=3, suppress_eos=True)
    monkeypatch.undo()
    want = model.generate(PROMPT, max_new_tokens=12, decoder="speculative", block_length=1, suppress_eos=True)
    assert g.token_ids == want.token_ids
    with_drafts = [(w, nf) for w, nf, has_noisy in calls[1:] if w > 1 and has_noisy]
    assert with_drafts, calls                                   # some forward verified drafts
    assert all(nf == (1 if below else None) for _, nf in with_drafts), calls


@pytest.mark.parametrize("layout,threshold", [("adaptive", None), ("after", None), ("sibling", None),
                                              ("sibling", 0.6)])
def test_speculative_sampling_is_distributed_as_left_to_right_sampling(model, monkeypatch, layout, threshold):
    """Exactness of the speculative decoder under sampling, leftover drafts included (block_length 3: two drafts per
    noisy block, so a rejected first draft leaves the second one pending for the next forward), for each place of
    the noisy block (after the pending drafts, beside them, or chosen by the running acceptance) and with a draft
    cut by `threshold` (which drafts exist must not depend on their values). Every token id but
    two is banned, so 3-token continuations have 8 possible values, drafts and verifier share a support but not
    their probabilities, and the exact probabilities under left-to-right sampling from the clean (causal) path are
    computed here; the decoder's empirical distribution must match them."""
    from itertools import product

    from dlm.decoders import run, speculative
    allowed = [90, 1001]
    banned = [i for i in range(model.vocab_size) if i not in allowed]
    monkeypatch.setattr(run, "banned_token_ids", lambda m, suppress_eos=False: banned)   # what DecodeRun bans
    monkeypatch.setattr(speculative, "SIBLING_BELOW", {"adaptive": 0.5, "after": 0.0, "sibling": 1.0}[layout])
    cfg = dlm.SamplerConfig(decoder="speculative", block_length=3, max_new_tokens=3, suppress_eos=True,
                            temperature=1.0, threshold=threshold)
    prompt = model.tokenizer(PROMPT, return_tensors="pt").input_ids[0].tolist()

    def next_probs(ids: list[int]) -> torch.Tensor:
        with torch.inference_mode():
            logits = model.ar_logits(torch.tensor([prompt + ids]))[0, -1, allowed].float()
            return logits.softmax(-1)

    exact = {}
    for a, b, c in product(range(2), repeat=3):
        ids = [allowed[a], allowed[b], allowed[c]]
        exact[tuple(ids)] = float(next_probs([])[a] * next_probs(ids[:1])[b] * next_probs(ids[:2])[c])
    assert abs(sum(exact.values()) - 1) < 1e-5
    n, counts, forwards = 3000, {}, 0
    for seed in range(n):
        g = model.generate(PROMPT, cfg.replace(seed=seed))
        key = tuple(g.token_ids)
        counts[key] = counts.get(key, 0) + 1
        forwards += g.nfe
    assert set(counts) <= set(exact), counts
    tv = 0.5 * sum(abs(counts.get(k, 0) / n - p) for k, p in exact.items())
    assert tv < 0.06, (tv, counts, exact)      # sampling noise alone: E[TV] ~ 0.02 at n = 3000 over 8 cells
    assert forwards < 2.5 * n, forwards        # drafts were accepted (else every token costs a forward)
