"""dlm.likelihood: ELBO / paper-grid / exact AR scores, held-out NLL bound and masked-token accuracy."""
from __future__ import annotations

import math
import random

import pytest
import torch

from dlm import likelihood as lk

CONTEXT = "The cat sat on the"
CONT = " mat and purred quietly."


@pytest.fixture(scope="module")
def model(tiny_llama_dir):
    import dlm
    return dlm.load(tiny_llama_dir, device="cpu", dtype="float32")


class Recorder:
    """Wraps denoise_logits: records every input canvas, optionally replaces the logits."""

    def __init__(self, model, logits_fn=None):
        self.inner = model.denoise_logits
        self.logits_fn = logits_fn
        self.inputs: list[torch.Tensor] = []

    def __call__(self, input_ids, *args, **kwargs):
        self.inputs.append(input_ids.detach().clone())
        if self.logits_fn is not None:
            return self.logits_fn(input_ids)
        return self.inner(input_ids, *args, **kwargs)


def oracle_logits(model, clean: torch.Tensor, p_true: float):
    """Logits giving probability p_true to the clean token at every position (rows are batch copies of clean)."""
    V = model.vocab_size
    a = math.log(p_true * (V - 1) / (1 - p_true))  # softmax([a, 0, ..., 0])[0] = p_true

    def fn(input_ids):
        out = torch.zeros(*input_ids.shape, V)
        target = clean.expand(input_ids.shape[0], -1) if clean.shape[0] == 1 else clean[: input_ids.shape[0]]
        out.scatter_(-1, target[..., None], a)
        return out
    return fn


def lse_atol(vocab_size: int) -> float:
    """Absolute error to allow in one fp32 log-softmax over `vocab_size` logits. Its log-sum-exp adds V rounded
    terms; a recursive sum of n terms is accurate to gamma_n = n * u relative (Higham, Accuracy and Stability of
    Numerical Algorithms, §4.2; u = eps/2), and the log turns that relative error into an absolute one. Vectorised
    kernels (AVX-512, AVX2) add in blocks and land far inside it; the scalar kernel (ATEN_CPU_CAPABILITY=default)
    adds one term at a time and uses a visible part of it (~1.4e-4 of 2.9e-3 for V = 49k, measured)."""
    return vocab_size * torch.finfo(torch.float32).eps / 2


def pair_ids(model, context=CONTEXT, continuation=CONT):
    ctx, cont = lk.encode_pair(model, context, continuation)
    return ctx, cont, torch.tensor([ctx + cont])


# ----- tokenization --------------------------------------------------------------------------------------------------
def test_encode_pair_is_faithful(model):
    tok = model.tokenizer
    for context, cont in [(CONTEXT, CONT), ("Answer: ", "yes"), ("x", "y z"), ("", "Hello world")]:
        ctx, cid = lk.encode_pair(model, context, cont)
        assert cid, (context, cont)
        start = model.start_token_id
        body = ctx[1:] if ctx and ctx[0] == start and not context.strip() else ctx
        assert tok.decode(body + cid) == context + cont
    # the trailing space of a context moves to the continuation, where BPE puts it
    ctx, cid = lk.encode_pair(model, "Answer: ", "yes")
    assert tok.decode(cid) == " yes" and tok.decode(ctx) == "Answer:"
    # an empty context gets a start token so the first continuation token has a predictor
    ctx, _ = lk.encode_pair(model, "", "Hello")
    assert ctx == [model.start_token_id]


# ----- ELBO ----------------------------------------------------------------------------------------------------------
def test_elbo_deterministic_for_a_seed_and_independent_of_batch_size(model):
    a = lk.score(model, CONTEXT, CONT, n_samples=8, seed=3)
    b = lk.score(model, CONTEXT, CONT, n_samples=8, seed=3, batch_size=3)
    c = lk.score(model, CONTEXT, CONT, n_samples=8, seed=4)
    assert a.logprob == pytest.approx(b.logprob, abs=1e-4) and a.stderr == pytest.approx(b.stderr, abs=1e-4)
    assert a.logprob != c.logprob
    assert a.n_tokens == len(lk.encode_pair(model, CONTEXT, CONT)[1])
    assert a.logprob < 0 and a.stderr > 0


def test_context_is_never_masked_and_each_sample_masks_some_continuation(model, monkeypatch):
    ctx, cont, x0 = pair_ids(model)
    for method in ("elbo", "paper"):
        rec = Recorder(model)
        monkeypatch.setattr(model, "denoise_logits", rec)
        lk.score(model, CONTEXT, CONT, n_samples=12, method=method, seed=0, batch_size=5)
        monkeypatch.undo()
        canvas = torch.cat(rec.inputs)                                   # [rows, L]
        assert canvas.shape[1] == x0.shape[1]
        assert torch.equal(canvas[:, :len(ctx)], x0[:, :len(ctx)].expand(canvas.shape[0], -1)), method
        masked = canvas == model.mask_token_id
        # unmasked continuation tokens are the clean ones
        assert torch.equal(canvas[~masked], x0.expand_as(canvas)[~masked])
        if method == "elbo":
            assert canvas.shape[0] == 12
            counts = masked.sum(1)
            assert counts.min() >= 1 and counts.max() <= len(cont)
            # stratified: both ends of the noise range are covered by 12 samples over 6 tokens
            assert counts.min() == 1 and counts.max() == len(cont)
        else:  # the paper's grid: one forward per level (a batch whose levels all drew empty masks is skipped);
            # the first level (rate T/T) masks the whole continuation
            assert 1 <= canvas.shape[0] <= 12
            assert int(masked[0].sum()) == len(cont)


def test_elbo_single_token_is_the_exact_masked_log_probability(model):
    ctx, cont = lk.encode_pair(model, CONTEXT, " and")
    assert len(cont) == 1
    x = torch.tensor([ctx + [model.mask_token_id]])
    with torch.no_grad():
        logp = torch.log_softmax(model.denoise_logits(x)[0, -1].float(), -1)[cont[0]]
    s = lk.score(model, CONTEXT, " and", n_samples=4, seed=0)
    assert s.logprob == pytest.approx(float(logp), abs=1e-4)
    assert s.stderr == pytest.approx(0.0, abs=1e-6)  # m = l = 1: every sample is the same


def test_elbo_matches_exact_enumeration_for_two_tokens(model):
    """m = 2: ELBO = 1/2 * [2 * mean_i log p(x_i | x_i masked)] + 1/2 * [log p(x_1, x_2 | both masked)]."""
    continuation = " the sea"
    ctx, cont = lk.encode_pair(model, CONTEXT, continuation)
    assert len(cont) == 2
    P, M = len(ctx), model.mask_token_id
    with torch.no_grad():
        def logps(masked_positions):
            ids = ctx + cont
            x = torch.tensor([[M if i in masked_positions else t for i, t in enumerate(ids)]])
            lp = torch.log_softmax(model.denoise_logits(x)[0].float(), -1)
            return sum(float(lp[i, ids[i]]) for i in masked_positions)
        exact = 0.5 * (2 * 0.5 * (logps({P}) + logps({P + 1}))) + 0.5 * logps({P, P + 1})
    s = lk.score(model, CONTEXT, continuation, n_samples=64, seed=0)
    assert abs(s.logprob - exact) <= 4 * s.stderr + 1e-4, (s, exact)


def test_oracle_model_gives_exact_elbo_with_zero_variance(model, monkeypatch):
    """A denoiser that gives probability p to the true token: every sample's estimate is exactly m * log p."""
    ctx, cont, x0 = pair_ids(model)
    p = 0.3
    monkeypatch.setattr(model, "denoise_logits", Recorder(model, oracle_logits(model, x0, p)))
    s = lk.score(model, CONTEXT, CONT, n_samples=10, seed=1)
    tol = lse_atol(model.vocab_size)                       # per token; an estimate sums m of them
    assert s.logprob == pytest.approx(len(cont) * math.log(p), abs=len(cont) * tol)
    assert s.stderr == pytest.approx(0.0, abs=len(cont) * tol)
    # the paper's grid is a per-token mean: -log p at each level (every level masks >= 1 token here, T = 1)
    paper = lk.score(model, CONTEXT, CONT, n_samples=1, method="paper", seed=1)
    assert paper.logprob == pytest.approx(math.log(p), abs=tol)


def test_stderr_shrinks_with_more_samples(model):
    few = lk.score(model, CONTEXT, CONT, n_samples=4, seed=0)
    many = lk.score(model, CONTEXT, CONT, n_samples=64, seed=0)
    assert many.stderr < few.stderr
    assert abs(many.logprob - few.logprob) < 4 * math.hypot(few.stderr, many.stderr)


# ----- the paper's grid estimator -----------------------------------------------------------------------------------
def test_paper_method_deterministic_and_full_mask_level(model):
    a = lk.score(model, CONTEXT, CONT, n_samples=6, method="paper", seed=5)
    b = lk.score(model, CONTEXT, CONT, n_samples=6, method="paper", seed=5, batch_size=4)
    assert a.logprob == pytest.approx(b.logprob, abs=1e-5) and math.isfinite(a.stderr)
    # T = 1: one level at rate 1 -> the whole continuation masked -> minus the mean CE over its tokens
    ctx, cont = lk.encode_pair(model, CONTEXT, CONT)
    x = torch.tensor([ctx + [model.mask_token_id] * len(cont)])
    with torch.no_grad():
        lp = torch.log_softmax(model.denoise_logits(x)[0].float(), -1)
    mean_logp = sum(float(lp[len(ctx) + i, t]) for i, t in enumerate(cont)) / len(cont)
    one = lk.score(model, CONTEXT, CONT, n_samples=1, method="paper", seed=0)
    assert one.logprob == pytest.approx(mean_logp, abs=1e-4)


# ----- exact AR score ------------------------------------------------------------------------------------------------
def test_ar_score_obeys_the_chain_rule(model):
    whole = lk.ar_score(model, "The cat", " sat on the mat")
    first = lk.ar_score(model, "The cat", " sat on")
    second = lk.ar_score(model, "The cat sat on", " the mat")
    assert whole.stderr == 0.0
    assert whole.n_tokens == first.n_tokens + second.n_tokens
    assert whole.logprob == pytest.approx(first.logprob + second.logprob, abs=1e-3)


def test_ar_score_prefers_the_true_continuation_on_smollm2(smollm2):
    examples = [("The capital of France is", " Paris, a city known for the Eiffel Tower."),
                ("She opened the door and", " walked into the room without saying a word."),
                ("Water boils at one hundred degrees", " Celsius at sea level, as every student learns.")]
    rng = random.Random(0)
    for context, true in examples:
        words = true.split()
        while words == true.split():
            rng.shuffle(words)
        shuffled = " " + " ".join(words)
        good, bad = smollm2.ar_score(context, true), smollm2.ar_score(context, shuffled)
        assert good.logprob > bad.logprob + 10, (context, good, bad)  # measured margins: 50-75 nats


# ----- validation ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, message", [
    (dict(continuation=""), "continuation is empty"),
    (dict(n_samples=0), "n_samples"),
    (dict(method="bogus"), "method must be one of"),
    (dict(batch_size=0), "batch_size"),
])
def test_score_rejects_bad_input(model, kwargs, message):
    args = dict(context=CONTEXT, continuation=CONT)
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        lk.score(model, args.pop("context"), args.pop("continuation"), **args)


def test_too_long_input_names_the_lengths(model):
    long = " word" * (model.max_length + 10)
    with pytest.raises(ValueError, match=rf"context \(\d+ tokens\) \+ continuation \(\d+ tokens\).*{model.max_length}"):
        lk.score(model, CONTEXT, long)
    with pytest.raises(ValueError, match="continuation is empty"):
        lk.ar_score(model, CONTEXT, "")


# ----- held-out metrics ----------------------------------------------------------------------------------------------
def test_elbo_nll_oracle_and_maskable(model, monkeypatch):
    x0 = torch.randint(5, 1000, (3, 12))
    maskable = torch.ones_like(x0, dtype=torch.bool)
    maskable[2] = False                                   # nothing to score in row 2
    maskable[1, :6] = False                               # row 1: only the second half
    p = 0.5
    monkeypatch.setattr(model, "denoise_logits", Recorder(model, oracle_logits(model, x0.repeat_interleave(4, 0), p)))
    nll = lk.elbo_nll(model, x0, maskable=maskable, n_samples=4, seed=0, batch_size=12)
    assert nll.shape == (3,)
    m = torch.tensor([11, 6, 0])                          # row 0: position 0 is never maskable under the shift
    tol = lse_atol(model.vocab_size)                      # per scored token (float32 softmax over 49k tokens)
    assert torch.allclose(nll, -m * math.log(p), rtol=0, atol=float(m.max()) * tol)


def test_elbo_nll_real_model_deterministic(model):
    x0 = torch.randint(5, 1000, (2, 10))
    a = lk.elbo_nll(model, x0, n_samples=3, seed=7)
    b = lk.elbo_nll(model, x0, n_samples=3, seed=7, batch_size=2)
    assert torch.allclose(a, b, atol=1e-4) and bool((a > 0).all())
    with pytest.raises(ValueError, match="n_samples"):
        lk.elbo_nll(model, x0, n_samples=0)


def test_masked_token_accuracy_counts_masked_positions_only(model, monkeypatch):
    x0 = torch.randint(5, 1000, (2, 11))
    rec = Recorder(model, oracle_logits(model, x0, 0.9))
    monkeypatch.setattr(model, "denoise_logits", rec)
    assert lk.masked_token_accuracy(model, x0, 0.5, seed=0) == 1.0
    canvas = rec.inputs[0]
    assert (canvas == model.mask_token_id).sum(1).tolist() == [5, 5]  # round(0.5 * 10 maskable)
    assert not bool((canvas[:, 0] == model.mask_token_id).any())
    # a denoiser that always predicts a wrong token scores 0
    monkeypatch.setattr(model, "denoise_logits", Recorder(model, oracle_logits(model, (x0 + 1) % 1000, 0.9)))
    assert lk.masked_token_accuracy(model, x0, 0.3, seed=0) == 0.0
    with pytest.raises(ValueError, match="mask_ratio"):
        lk.masked_token_accuracy(model, x0, 0.0)
