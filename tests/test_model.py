"""Invariants of the core DiffusionLM: alignment, bidirectionality, annealing, loss (Eq. 7)."""
import pytest
import torch

import dlm
from dlm.attention import anneal_attention_mask


@pytest.fixture(params=["llama", "gpt2"])
def family_dlm(request, tiny_llama_dir, tiny_gpt2_dir):
    d = tiny_llama_dir if request.param == "llama" else tiny_gpt2_dir
    return dlm.load(d, device="cpu", dtype="float32")


def _ids(model, n=12, batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(100, 1000, (batch, n), generator=g)


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_bidirectional_future_token_changes_past_logits(family_dlm, impl):
    family_dlm.base.set_attn_implementation(impl)
    x = _ids(family_dlm)
    x2 = x.clone()
    x2[:, 9] += 1
    with torch.no_grad():
        a, b = family_dlm.denoise_logits(x), family_dlm.denoise_logits(x2)
        ac, bc = family_dlm.denoise_logits(x, attention_mask_ratio=0.0), family_dlm.denoise_logits(
            x2, attention_mask_ratio=0.0)
    # bidirectional: position i < j sees token j
    assert (a[:, 1:9] - b[:, 1:9]).abs().amax() > 1e-5
    # causal (r=0): rows up to 9 (which predict tokens <= 9 from hidden states < 9) are untouched
    assert torch.equal(ac[:, :10], bc[:, :10])


def test_ratio_zero_is_exactly_the_base_causal_model(family_dlm):
    x = _ids(family_dlm)
    with torch.no_grad():
        base = family_dlm.base(x).logits
        aligned = family_dlm.denoise_logits(x, attention_mask_ratio=0.0)
    assert torch.equal(aligned[:, 1:], base[:, :-1])
    assert torch.all(aligned[:, 0] == 0)


def test_rows_are_position_aligned_with_and_without_shift(tiny_llama_dir):
    shifted = dlm.load(tiny_llama_dir, device="cpu", dtype="float32")
    plain = dlm.load(tiny_llama_dir, device="cpu", dtype="float32", shift=False)
    x = _ids(shifted)
    with torch.no_grad():
        raw = shifted._base_logits(x, None, 1.0)
        assert torch.equal(shifted.denoise_logits(x)[:, 5], raw[:, 4])  # shift: token 5 read from hidden state 4
        assert torch.equal(plain.denoise_logits(x)[:, 5], raw[:, 5])


@pytest.mark.parametrize("shift", [True, False])
def test_logits_of_chosen_rows_only(family_dlm, shift):
    """`rows=`: only those positions go through the output layer; row j is exactly row rows[j] of the full
    call (same hidden states, the head is per row), with and without a prefix cache; bad rows are refused."""
    family_dlm.shift = shift
    x = _ids(family_dlm, n=14)
    rows = torch.tensor([1, 4, 5, 13]) if shift else torch.tensor([0, 4, 5, 13])
    with torch.no_grad():
        full = family_dlm.denoise_logits(x)
        torch.testing.assert_close(family_dlm.denoise_logits(x, rows=rows), full[:, rows], atol=1e-5, rtol=1e-5)
        cache = family_dlm.build_prefix_cache(x, 6)
        late = torch.tensor([6, 9, 13])
        torch.testing.assert_close(family_dlm.denoise_logits(x, prefix_cache=cache, rows=late),
                                   family_dlm.denoise_logits(x, prefix_cache=cache)[:, late - 6], atol=1e-5, rtol=1e-5)
        with pytest.raises(ValueError, match="rows must be"):
            family_dlm.denoise_logits(x, prefix_cache=cache, rows=torch.tensor([5, 9]))   # inside the cached prefix
        if shift:
            with pytest.raises(ValueError, match="rows must be"):
                family_dlm.denoise_logits(x, rows=torch.tensor([0, 3]))                 # nothing predicts token 0


def test_padding_left_matches_unpadded(family_dlm):
    x = _ids(family_dlm, batch=1)
    pad = torch.full((1, 3), family_dlm.tokenizer.pad_token_id or 0)
    xp = torch.cat([pad, x], 1)
    mask = torch.cat([torch.zeros(1, 3, dtype=torch.long), torch.ones_like(x)], 1)
    with torch.no_grad():
        a = family_dlm.denoise_logits(x)
        b = family_dlm.denoise_logits(xp, attention_mask=mask)
        a5 = family_dlm.denoise_logits(x, attention_mask_ratio=0.5, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(a[:, 1:], b[:, 4:], atol=1e-4, rtol=1e-4)
    assert torch.isfinite(b).all() and torch.isfinite(a5).all()


def test_annealed_mask_density_and_limits():
    L = 200
    causal = torch.ones(L, L, dtype=torch.bool).tril()
    assert torch.equal(anneal_attention_mask(L, 0.0), causal)
    assert anneal_attention_mask(L, 1.0).all()
    upper = ~causal
    for r in (0.1, 0.5, 0.9):
        m = anneal_attention_mask(L, r, generator=torch.Generator().manual_seed(0))
        assert m[causal].all()  # the causal part is always kept
        density = m[upper].float().mean().item()
        assert abs(density - r) < 0.02, (r, density)
    with pytest.raises(ValueError):
        anneal_attention_mask(4, 1.5)


def test_annealing_between_causal_and_bidirectional(family_dlm):
    x = _ids(family_dlm)
    with torch.no_grad():
        full = family_dlm.denoise_logits(x, attention_mask_ratio=1.0)
        one = family_dlm.denoise_logits(x, attention_mask_ratio=0.999999, generator=torch.Generator().manual_seed(0))
        causal = family_dlm.denoise_logits(x, attention_mask_ratio=0.0)
        tiny = family_dlm.denoise_logits(x, attention_mask_ratio=1e-9, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(one, full, atol=1e-4, rtol=1e-4)  # 4D-mask path == is_causal=False path
    torch.testing.assert_close(tiny, causal, atol=1e-4, rtol=1e-4)


def test_loss_finite_ignores_unmasked_and_scales_with_inverse_t(tiny_dlm):
    x = _ids(tiny_dlm, n=16, batch=3)
    t = torch.tensor([0.3, 0.3, 0.3])
    g = lambda: torch.Generator().manual_seed(7)  # noqa: E731
    out = tiny_dlm.diffusion_loss(x, t=t, generator=g())
    assert torch.isfinite(out.loss) and out.loss > 0
    # 1/t weighting: with a constant t the weighted loss is exactly masked_ce / t
    torch.testing.assert_close(out.loss, out.masked_ce / 0.3)
    plain = tiny_dlm.diffusion_loss(x, t=t, generator=g(), weighting="none")
    torch.testing.assert_close(plain.loss, out.masked_ce)
    # unmasked positions do not matter: changing a non-maskable token's *target* leaves the loss unchanged
    maskable = torch.ones_like(x, dtype=torch.bool)
    maskable[:, 8:] = False
    x_with_mask_id = x.clone()
    x_with_mask_id[:, 12] = tiny_dlm.mask_token_id  # a genuine occurrence of the mask id in clean text
    b = tiny_dlm.diffusion_loss(x_with_mask_id, t=torch.ones(3), maskable=maskable, generator=g())
    assert torch.isfinite(b.loss)
    # position 0 is never masked under the shift, so a loss with only position 0 maskable is zero
    only0 = torch.zeros_like(maskable)
    only0[:, 0] = True
    z = tiny_dlm.diffusion_loss(x, t=torch.ones(3), maskable=only0)
    assert z.loss.item() == 0.0


def test_loss_counts_masked_positions_from_the_noise_not_the_token_value(tiny_dlm, monkeypatch):
    x = _ids(tiny_dlm, n=10, batch=1)
    x[0, 5] = tiny_dlm.mask_token_id  # clean text that happens to contain the mask id
    maskable = torch.zeros_like(x, dtype=torch.bool)
    maskable[0, 3] = True
    seen = {}
    real = torch.nn.functional.cross_entropy

    def spy(logits, target, **kw):
        seen["n"] = logits.shape[0]
        return real(logits, target, **kw)

    monkeypatch.setattr("dlm.losses.F.cross_entropy", spy)
    tiny_dlm.diffusion_loss(x, t=torch.ones(1), maskable=maskable)
    assert seen["n"] == 1  # only position 3, not the genuine mask id at 5


def test_loss_gradient_flows(tiny_dlm):
    x = _ids(tiny_dlm, n=16, batch=2)
    out = tiny_dlm.diffusion_loss(x, attention_mask_ratio=0.5, generator=torch.Generator().manual_seed(0))
    out.loss.backward()
    grads = [p.grad for p in tiny_dlm.base.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


def test_prefix_cache_matches_full_forward_on_prefix_independent_part(tiny_dlm):
    x = _ids(tiny_dlm, n=14, batch=2)
    with torch.no_grad():
        cache = tiny_dlm.build_prefix_cache(x, 6)
        full = tiny_dlm.denoise_logits(x)
        # right after building, the cached prefix saw exactly this canvas, so the cached call is exact
        cached = tiny_dlm.denoise_logits(x, prefix_cache=cache)
        again = tiny_dlm.denoise_logits(x, prefix_cache=cache)  # the cache is left unchanged by a call
    assert cached.shape == (2, 8, full.shape[-1])
    torch.testing.assert_close(cached, full[:, 6:], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(cache.logits, full[:, 6:], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(again, cached)
