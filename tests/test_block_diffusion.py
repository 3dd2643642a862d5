"""Block diffusion: the staircase training pattern, block size 1 = the causal LM, the exact block KV cache."""
import pytest
import torch

import dlm
from dlm.attention import block_ids, block_pattern, staircase


@pytest.fixture(params=["llama", "gpt2"])
def family_dlm(request, tiny_llama_dir, tiny_gpt2_dir):
    d = tiny_llama_dir if request.param == "llama" else tiny_gpt2_dir
    return dlm.load(d, device="cpu", dtype="float32")


def _ids(n=12, batch=2, seed=0):
    return torch.randint(100, 1000, (batch, n), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("offset", [0, 1, 3])
@pytest.mark.parametrize("causal", [False, True])
def test_staircase_pattern_matches_its_definition(offset, causal):
    L, bl = 10, 4
    pattern, positions, rows = staircase(L, bl, offset, clean_causal=causal)
    blk = block_ids(L, bl, offset)
    assert int((blk == 0).sum()) == (offset or bl) and torch.equal(positions, torch.arange(L).repeat(2))
    for q in range(2 * L):
        for k in range(2 * L):
            qn, kn = q < L, k < L  # the first half is x_t (noisy), the second x_0 (clean)
            bq, bk = int(blk[q % L]), int(blk[k % L])
            if qn:    # noisy: its own noisy block + the clean blocks before it
                want = (kn and bk == bq) or (not kn and bk < bq)
            elif causal:   # clean, token-causal: clean tokens up to itself
                want = not kn and (k % L) <= (q % L)
            else:          # clean, block-causal: clean blocks up to its own
                want = not kn and bk <= bq
            assert bool(pattern[q, k]) == want, (q, k)
    for j in range(1, L):  # the shift: a block's first token is read from the clean row before it
        start = bool(blk[j] != blk[j - 1])
        assert int(rows[j]) == (L + j - 1 if start else j - 1)


def test_block_size_one_is_the_causal_base_model(family_dlm):
    x = _ids()
    with torch.no_grad():
        ar = family_dlm.base(x).logits                                           # row i predicts token i+1
        masked = x.clone()
        masked[:, 1:] = family_dlm.mask_token_id
        aligned = family_dlm.block_denoise_logits(masked, x, block_length=1)    # every token is its own block
    torch.testing.assert_close(aligned[:, 1:], ar[:, :-1], atol=1e-4, rtol=1e-4)
    assert torch.equal(aligned[:, 1:].argmax(-1), ar[:, :-1].argmax(-1))


def test_noisy_block_sees_only_itself_and_earlier_clean_blocks(family_dlm):
    x = _ids(n=12, batch=1)
    x_t = x.clone()
    x_t[:, 4:8] = family_dlm.mask_token_id          # block 1 of size 4 is noisy
    with torch.no_grad():
        a = family_dlm.block_denoise_logits(x_t, x, 4)
        later = x.clone()
        later[:, 8:] += 1                            # change the clean future (block 2)
        later_t = x_t.clone()
        later_t[:, 8:] += 1
        b = family_dlm.block_denoise_logits(later_t, later, 4)
        inside = x_t.clone()
        inside[:, 6] = 5                              # change a token inside the noisy block
        c = family_dlm.block_denoise_logits(inside, x, 4)
    assert torch.equal(a[:, :9], b[:, :9])           # positions <= 8 never see block 2
    assert (a[:, 5:8] - c[:, 5:8]).abs().amax() > 1e-6   # bidirectional inside the block


def test_ar_weight_adds_the_clean_rows_next_token_loss(tiny_dlm):
    x = _ids(n=16, batch=2)
    none = torch.zeros_like(x, dtype=torch.bool)
    none[:, 6] = True
    base = tiny_dlm.block_diffusion_loss(x, 4, offset=0, maskable=none, t=torch.ones(2, 4), weighting="none")
    both = tiny_dlm.block_diffusion_loss(x, 4, offset=0, maskable=none, t=torch.ones(2, 4), weighting="none",
                                         ar_weight=0.5)
    with torch.no_grad():
        ar = tiny_dlm.base(x).logits[:, :-1]        # clean rows, token-causal = the causal LM itself
    want = torch.nn.functional.cross_entropy(ar.reshape(-1, ar.shape[-1]), x[:, 1:].reshape(-1))
    torch.testing.assert_close(both.loss.detach() - base.loss.detach(), 0.5 * want, atol=1e-4, rtol=1e-4)


def test_distillation_adds_the_teachers_kl_at_masked_tokens_and_clean_rows(tiny_dlm):
    """distill_weight x [KL(teacher || student) at the masked token + mean KL over the clean rows], the teacher's
    row i-1 being its distribution for token i (the shift), as for the student."""
    x = _ids(n=16, batch=2)
    one = torch.zeros_like(x, dtype=torch.bool)
    one[:, 6] = True                                 # t = 1: position 6 is masked for sure, nothing else is
    teacher = torch.randn(2, 16, tiny_dlm.vocab_size, generator=torch.Generator().manual_seed(1))
    teacher[..., tiny_dlm.mask_token_id] = float("-inf")   # as the frozen base's ar_logits: no mass, no nan
    kw = dict(offset=0, maskable=one, t=torch.ones(2, 4), weighting="none")
    plain = tiny_dlm.block_diffusion_loss(x, 4, **kw)
    off = tiny_dlm.block_diffusion_loss(x, 4, **kw, teacher_logits=teacher, distill_weight=0.0)
    both = tiny_dlm.block_diffusion_loss(x, 4, **kw, teacher_logits=teacher, distill_weight=0.5)
    x_t = x.clone()
    x_t[:, 6] = tiny_dlm.mask_token_id
    with torch.no_grad():
        student = tiny_dlm.block_denoise_logits(x_t, x, 4)[:, 6]   # position-aligned: the masked token's row
        clean = tiny_dlm.base(x).logits[:, :-1]                    # token-causal clean rows = the causal LM

    def kl(p_logits, q_logits):
        p = p_logits.softmax(-1)
        terms = torch.where(p > 0, p * (p_logits.log_softmax(-1) - q_logits.log_softmax(-1)), torch.zeros_like(p))
        return terms.sum(-1).mean()
    want = kl(teacher[:, 5], student) + kl(teacher[:, :-1].reshape(-1, teacher.shape[-1]),
                                           clean.reshape(-1, clean.shape[-1]))
    assert float(off.loss.detach()) == float(plain.loss.detach())
    assert torch.isfinite(both.loss) and float(want) > 0
    torch.testing.assert_close(both.loss.detach() - plain.loss.detach(), 0.5 * want, atol=1e-4, rtol=1e-4)
    both.loss.backward()                            # the KL trains the student
    assert any(p.grad is not None and float(p.grad.abs().sum()) > 0 for p in tiny_dlm.base.parameters())


def test_the_distillation_teacher_is_the_frozen_base(tiny_dlm):
    """With LoRA, the teacher is the base with the adapter disabled: the base's own causal logits, whatever the
    adapter has learned; the student (adapter on) differs."""
    from train.config import LoraConfigSection
    from train.modeling import Objective, add_lora
    x = _ids(n=12, batch=2)
    with torch.no_grad():
        before = tiny_dlm.ar_logits(x)
    add_lora(tiny_dlm, LoraConfigSection(enabled=True, r=4, alpha=8))
    with torch.no_grad():
        for name, p in tiny_dlm.base.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)                    # an adapter that changes the model
        adapted = tiny_dlm.ar_logits(x)
    teacher = Objective(tiny_dlm, distill_weight=1.0).teacher_logits(x, None)
    torch.testing.assert_close(teacher, before, atol=1e-5, rtol=1e-5)
    real = torch.isfinite(before)                    # the added mask id is -inf in both
    assert (adapted - before)[real].abs().amax() > 1e-2 and not teacher.requires_grad
    loss, _ = Objective(tiny_dlm, distill_weight=1.0)(x, block_length=4, generator=torch.Generator().manual_seed(0))
    loss.backward()
    assert any(p.grad is not None and float(p.grad.abs().sum()) > 0
               for n, p in tiny_dlm.base.named_parameters() if "lora" in n)


def test_clean_positions_carry_no_loss(tiny_dlm):
    x = _ids(n=16, batch=2)
    none = torch.zeros_like(x, dtype=torch.bool)
    out = tiny_dlm.block_diffusion_loss(x, 4, maskable=none, generator=torch.Generator().manual_seed(0))
    assert float(out.loss.detach()) == 0.0
    # one maskable position: the loss is exactly that token's 1/t-weighted CE, t = 1 masks it for sure
    one = none.clone()
    one[:, 6] = True
    out = tiny_dlm.block_diffusion_loss(x, 4, offset=0, maskable=one, t=torch.ones(2, 4), weighting="none")
    x_t = x.clone()
    x_t[:, 6] = tiny_dlm.mask_token_id
    with torch.no_grad():
        logits = tiny_dlm.block_denoise_logits(x_t, x, 4)
    want = torch.nn.functional.cross_entropy(logits[:, 6], x[:, 6])
    torch.testing.assert_close(out.loss.detach(), want, atol=1e-5, rtol=1e-5)


def test_block_loss_trains_and_is_deterministic(tiny_dlm):
    x = _ids(n=16, batch=2)
    a = tiny_dlm.block_diffusion_loss(x, 4, generator=torch.Generator().manual_seed(3))
    b = tiny_dlm.block_diffusion_loss(x, 4, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a.loss, b.loss) and a.loss.requires_grad and torch.isfinite(a.loss)
    a.loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in tiny_dlm.parameters())


def reference_ids(blocks: list[int], noisy: list[bool], causal: bool) -> torch.Tensor:
    """Per-token ids of the block rule written out by hand: clean tokens their block (or, causal, their position),
    noisy tokens their block (or the position of its first token)."""
    out = []
    for i, (b, n) in enumerate(zip(blocks, noisy)):
        out.append((blocks.index(b) if n else i) if causal else b)
    return torch.tensor(out)


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("clean_attention", ["causal", "block"])
def test_cached_block_forward_equals_one_uncached_forward(family_dlm, impl, clean_attention):
    """Prompt, two finished blocks and a noisy block through the cache in three calls give the logits of one
    forward over everything under the same block pattern."""
    m = family_dlm
    m.base.set_attn_implementation(impl)
    m.config.clean_attention = clean_attention
    prompt, b1, b2 = _ids(5, 1, 1), _ids(4, 1, 2), _ids(4, 1, 3)
    noisy = torch.full((1, 4), m.mask_token_id)
    noisy[0, 2] = 7
    with torch.no_grad():
        cache = m.new_block_cache()
        m.block_commit(cache, prompt)
        m.block_commit(cache, b1)
        cached = m.block_denoise(cache, noisy, clean_ids=b2)
        assert cache.length == 13 and cache.n_blocks == 3
        again = m.block_denoise(cache, noisy)           # the cache holds only clean tokens: same answer again
        # uncached: all 17 tokens in one forward, with the same blocks
        ids = torch.cat([prompt, b1, b2, noisy], 1)
        flags = [False] * 13 + [True] * 4
        noisy_flag = torch.tensor(flags)
        blocks = reference_ids([0] * 5 + [1] * 4 + [2] * 4 + [3] * 4, flags, clean_attention == "causal")
        from dlm.attention import prepared_mask
        mask = prepared_mask(m.base.config, block_pattern(noisy_flag, blocks, noisy_flag, blocks), 1, m.dtype)
        raw = m.base(input_ids=ids, attention_mask=mask, position_ids=torch.arange(17)[None]).logits
        # what the speculative decoder asks for: clean rows from the 3rd on, and the row past the noisy block
        cache = m.new_block_cache()
        m.block_commit(cache, prompt)
        m.block_commit(cache, b1)
        after, clean = m.block_verify(cache, noisy, b2, clean_from=2, predict_after=True)
        with pytest.raises(ValueError, match="clean_from must be in 0..3"):
            m.block_verify(m.new_block_cache(), noisy, b2, clean_from=4)
    want = raw[:, 12:16]                              # shift: noisy token i is read from row 12 + i
    torch.testing.assert_close(cached, want, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(again, want, atol=1e-4, rtol=1e-4)
    assert torch.equal(cached.argmax(-1), want.argmax(-1))
    torch.testing.assert_close(after, raw[:, 12:17], atol=1e-4, rtol=1e-4)   # + the last noisy row's prediction
    torch.testing.assert_close(clean, raw[:, 11:13], atol=1e-4, rtol=1e-4)   # b2's clean rows 2 and 3


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_sibling_noisy_block_equals_its_uncached_definition(family_dlm, impl):
    """`noisy_from=k`: the noisy block sees the cache and only the first k clean tokens of the call, and sits at clean
    token k's position (beside the clean tokens after it). Written out by hand: clean tokens token-causal, the noisy
    tokens one block that sees clean positions < 5 + k and itself, at positions 5 + k ...; the cached call must give
    that forward's rows (row 0 of the aligned logits = clean token k - 1's row), and the clean tokens after k must
    not change what the noisy block predicts."""
    m = family_dlm
    m.base.set_attn_implementation(impl)
    m.config.clean_attention = "causal"
    prompt, clean, k = _ids(5, 1, 1), _ids(4, 1, 2), 2
    noisy = torch.full((1, 3), m.mask_token_id)
    with torch.no_grad():
        cache = m.new_block_cache()
        m.block_commit(cache, prompt)
        aligned, rows = m.block_verify(cache, noisy, clean, clean_from=1, predict_after=True, noisy_from=k)
        assert cache.length == 9                      # the clean tokens are cached, the noisy block is not
        next_row = cache.next_logits.clone()          # still the last clean token's row (the next call reads it)
        cache3 = m.new_block_cache()
        m.block_commit(cache3, prompt)
        plain = m.block_denoise(cache3, noisy, clean_ids=clean, predict_after=True, noisy_from=k)   # no clean rows
        ids = torch.cat([prompt, clean, noisy], 1)
        q_noisy = torch.tensor([False] * 9 + [True] * 3)
        blocks = torch.tensor(list(range(9)) + [5 + k] * 3)
        from dlm.attention import prepared_mask
        mask = prepared_mask(m.base.config, block_pattern(q_noisy, blocks, q_noisy, blocks), 1, m.dtype)
        positions = torch.tensor([list(range(9)) + [5 + k, 6 + k, 7 + k]])
        raw = m.base(input_ids=ids, attention_mask=mask, position_ids=positions).logits
        # other clean tokens after position k: the noisy block's rows do not move
        other = clean.clone()
        other[0, k:] = torch.tensor([11, 12])
        cache2 = m.new_block_cache()
        m.block_commit(cache2, prompt)
        aligned2, _ = m.block_verify(cache2, noisy, other, clean_from=1, predict_after=True, noisy_from=k)
        for bad in (0, 5):
            with pytest.raises(ValueError, match="noisy_from must be in 1..4"):
                m.block_denoise(m.new_block_cache(), noisy, clean_ids=clean, noisy_from=bad)
        with pytest.raises(ValueError, match="clean_from must be <= noisy_from - 1"):
            m.block_verify(cache2, noisy, clean, clean_from=2, noisy_from=1)
    want = torch.cat([raw[:, 5 + k - 1: 5 + k], raw[:, 9:12]], 1)
    torch.testing.assert_close(aligned, want, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(rows, raw[:, 6:9], atol=1e-4, rtol=1e-4)   # clean rows from clean_from = 1 on
    torch.testing.assert_close(aligned2, aligned, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(plain, want, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(next_row, raw[:, 8], atol=1e-4, rtol=1e-4)


def test_packed_gqa_attention_equals_transformers_sdpa(tiny_llama_dir, monkeypatch):
    """A few masked query rows of a grouped-query model (the tiny LLaMA: 4 heads, 2 kv heads) attend through the
    packed path with the same result as transformers' repeat_kv path: on a CPU the row-wise op
    (`packed_linear.row_attention`), else (no kernel, a GPU) SDPA with the heads of a group folded into rows (no
    repeated cache). dlm.load selects it per model under its own name: transformers' "sdpa" stays its own function,
    other models keep it, and training (grad on) falls through to it."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from dlm import attention
    from dlm import packed_linear as pl
    m = dlm.load(tiny_llama_dir, device="cpu", dtype="float32")
    assert m.base.config._attn_implementation == attention.PACKED_SDPA
    assert AttentionInterface._global_mapping["sdpa"] is sdpa_attention_forward      # nothing global replaced
    other = dlm.load(tiny_llama_dir, device="cpu", dtype="float32", attn_implementation="eager")
    assert other.base.config._attn_implementation == "eager"                         # only sdpa models switch
    shapes, row_calls = [], []
    real, real_rows = torch.nn.functional.scaled_dot_product_attention, pl.row_attention
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention",
                        lambda q, *a, **k: shapes.append(tuple(q.shape)) or real(q, *a, **k))
    monkeypatch.setattr(pl, "row_attention", lambda q, *a: row_calls.append(tuple(q.shape)) or real_rows(q, *a))
    prompt = torch.tensor([m.tokenizer("Once upon a time there", add_special_tokens=False)["input_ids"]])

    def step(rows: int):
        cache = m.new_block_cache()
        with torch.no_grad():
            m.block_commit(cache, prompt)
            return m.block_verify(cache, torch.full((1, rows), m.mask_token_id), torch.tensor([[5, 6]]))

    for rows in (1, 3):
        m.base.set_attn_implementation(attention.PACKED_SDPA)
        shapes.clear(), row_calls.clear()
        by_rows = step(rows)
        if pl.available():
            assert (1, 4, rows + 2, 16) in row_calls and not shapes             # the row-wise op, no SDPA
        with monkeypatch.context() as without_kernel:
            without_kernel.setattr(pl, "row_attention", lambda *a: None)
            shapes.clear()
            folded = step(rows)
        assert (1, 2, 2 * (rows + 2), 16) in shapes                   # [B, kv heads, groups x rows, head dim]
        m.base.set_attn_implementation("sdpa")
        shapes.clear()
        plain = step(rows)
        assert (1, 4, rows + 2, 16) in shapes and not any(s[1] == 2 for s in shapes)
        for packed in (by_rows, folded):
            for a, b in zip(packed, plain):
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    # training (grad on) keeps transformers' path
    m.base.set_attn_implementation(attention.PACKED_SDPA)
    shapes.clear()
    ids = torch.cat([prompt, torch.full((1, 3), m.mask_token_id)], 1)
    m.base(ids, attention_mask=torch.ones_like(ids)).logits.sum().backward()
    assert shapes and not any(s[1] == 2 for s in shapes)
    g = m.generate("Once upon a time", max_new_tokens=8, decoder="speculative", block_length=3, suppress_eos=True)
    ar = m.ar_generate("Once upon a time", max_new_tokens=8, suppress_eos=True)
    assert g.token_ids == ar.token_ids
