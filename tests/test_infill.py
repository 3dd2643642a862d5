"""Infilling (dlm.infill): template parsing with the real SmolLM2 tokenizer, then infill / fill on tiny models."""
from __future__ import annotations

import pytest

from dlm.infill import parse_template, split_template


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def model(request, tiny_llama_dir, tiny_gpt2_dir):
    import dlm
    directory = tiny_llama_dir if request.param == "llama" else tiny_gpt2_dir
    return dlm.load(directory, device="cpu", dtype="float32")


def literal_ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def assert_fixed_unchanged(gen, canvas, mask_id):
    """Every fixed token of the final canvas equals the input id; every masked position was filled."""
    assert len(gen.token_ids) == len(canvas.input_ids)
    for tid, orig, fixed in zip(gen.token_ids, canvas.input_ids, canvas.fixed):
        if fixed:
            assert tid == orig
        else:
            assert tid != mask_id
    for f in gen.frames:  # ... at every step, not only at the end
        assert all(f.tokens[i] == canvas.input_ids[i] for i, fx in enumerate(canvas.fixed) if fx)


# ----------------------------------------------------------------------------------------------- parsing

def test_split_template_pieces():
    assert split_template("The [MASK:2] sat on the [MASK].") == [(0, "The "), (4, 2), (12, " sat on the "),
                                                                 (24, 1), (30, ".")]
    assert split_template("[MASK][MASK:3]") == [(0, 1), (6, 3)]
    assert split_template("a [MASKED] b [MASK: 4 ]") == [(0, "a [MASKED] b "), (13, 4)]


def test_parse_template_tokenizes_each_piece_faithfully(tiny_tokenizer):
    tok = tiny_tokenizer
    template = "  Two  spaces [MASK:3]\nünïcödé 日本 [MASK] end."
    c = parse_template(template, tok)
    assert c.n_added == 0  # SmolLM2's tokenizer adds no BOS, and the template starts with text
    a, b = c.spans
    assert b[1] - b[0] == 1 and a[1] - a[0] == 3
    # the space right before each marker belongs to its span (the model writes " word"), the rest is verbatim
    pieces = ["  Two  spaces", "\nünïcödé 日本", " end."]
    expected = literal_ids(tok, pieces[0]) + [None] * 3 + literal_ids(tok, pieces[1]) + [None] + \
        literal_ids(tok, pieces[2])
    assert [i if f else None for i, f in zip(c.input_ids, c.fixed)] == expected
    decoded = [tok.decode(c.input_ids[s:e]) for s, e in [(0, a[0]), (a[1], b[0]), (b[1], len(c.input_ids))]]
    assert decoded == pieces and c.lead_space == [True, True]
    # the template's space survives in the text whether or not the generated span starts with one
    assert c.span_text(0, " sea") == " sea" and c.span_text(0, "sea") == " sea"
    assert parse_template("The[MASK] sat", tok).lead_space == [False]
    assert parse_template("The[MASK] sat", tok).span_text(0, "re") == "re"


def test_template_starting_with_a_mask_gets_a_start_token(tiny_tokenizer):
    c = parse_template("[MASK:2] and more", tiny_tokenizer)
    assert c.n_added == 1 and c.input_ids[0] == tiny_tokenizer.bos_token_id
    assert c.fixed[:3] == [True, False, False] and c.spans == [(1, 3)]
    assert parse_template("[MASK:2] x", tiny_tokenizer, shift=False).n_added == 0


@pytest.mark.parametrize("template,pattern", [
    ("abc [MASK:3", r"unclosed mask marker at position 4"),
    ("abc [MASK:3 then [MASK]", r"unclosed mask marker at position 4"),
    ("ab [MASK", r"unclosed mask marker at position 3"),
    ("x [MASK:0]", r"span length must be >= 1, got 0 in the mask marker at position 2"),
    ("x [MASK] y [MASK:-2]", r"span length must be >= 1, got -2 in the mask marker at position 11"),
    ("x [MASK:abc]", r"invalid span length 'abc' in the mask marker at position 2"),
    ("x [MASK:2.5]", r"invalid span length '2.5' in the mask marker at position 2"),
    ("no marker here", r"no masked span"),
    ("", r"no masked span"),
])
def test_malformed_templates_name_the_position(tiny_tokenizer, template, pattern):
    with pytest.raises(ValueError, match=pattern):
        parse_template(template, tiny_tokenizer)


def test_template_beyond_context_names_the_position(tiny_tokenizer):
    n = len(literal_ids(tiny_tokenizer, "Hello"))   # the space before the marker belongs to the span
    with pytest.raises(ValueError, match=rf"position 6 reaches token {n + 100}, beyond the model's context of 100"):
        parse_template("Hello [MASK:100] world", tiny_tokenizer, max_length=100)
    with pytest.raises(ValueError, match=r"the text starting at position 9 .* context of 10 tokens"):
        parse_template("Hi [MASK] " + "word " * 20, tiny_tokenizer, max_length=10)
    assert len(parse_template(f"Hello [MASK:{100 - n}]", tiny_tokenizer, max_length=100).input_ids) == 100


# --------------------------------------------------------------------------------------------- sampling

def test_infill_preserves_prefix_and_suffix_exactly(model):
    tok = model.tokenizer
    prefix, suffix = "def add(a, b):\n    return", "\n\nprint(add(1, 2))"
    g = model.infill(prefix, suffix, 6, steps=3, frames=True)
    assert g.text.startswith(prefix) and g.text.endswith(suffix)
    assert g.text == prefix + g.spans[0] + suffix and len(g.spans) == 1
    ids = tok(prefix, add_special_tokens=False)["input_ids"]
    sids = tok(suffix, add_special_tokens=False)["input_ids"]
    assert g.token_ids[: len(ids)] == ids and g.token_ids[-len(sids):] == sids
    assert len(g.token_ids) == len(ids) + 6 + len(sids)
    assert model.mask_token_id not in g.token_ids
    assert g.nfe == 3 and len(g.frames) == 3 and [len(f.revealed) for f in g.frames] == [2, 2, 2]
    assert all(ids_ == g.token_ids for ids_ in [g.frames[-1].tokens])
    assert g.frames[0].start == len(ids)


def test_infill_with_empty_prefix_starts_with_a_fixed_token(model):
    g = model.infill("", " the end.", 3, frames=True)
    assert g.text.endswith(" the end.") and g.text == g.spans[0] + " the end."
    assert g.frames[0].start == 1  # position 0 holds the start token, never generated
    assert model.mask_token_id not in g.token_ids and g.nfe == 3


def test_fill_many_spans_keeps_every_unmasked_token(model):
    template = "The [MASK:2] sat on the [MASK]. It was [MASK:3] and [MASK]!"
    canvas = parse_template(template, model.tokenizer, model.max_length, model.shift)
    g = model.fill(template, steps=4, temperature=0.9, seed=0, frames=True)
    assert_fixed_unchanged(g, canvas, model.mask_token_id)
    assert len(g.spans) == 4
    it = iter(g.spans)
    assert g.text == "".join(p if isinstance(p, str) else next(it) for p in canvas.pieces)
    for k, (s, (a, b)) in enumerate(zip(g.spans, canvas.spans)):   # the decoded tokens, the template's space kept
        assert s == canvas.span_text(k, model.tokenizer.decode(g.token_ids[a:b], skip_special_tokens=True,
                                                               clean_up_tokenization_spaces=False))
        assert s.startswith(" ") == canvas.lead_space[k]
    assert g.text.startswith("The ") and " sat on the " in g.text and ". It was " in g.text and " and " in g.text
    assert g.nfe == 4 and sum(len(f.revealed) for f in g.frames) == 7
    assert model.mask_token_id not in g.token_ids and g.prompt == template


def test_fill_blocks_follow_span_order_and_cache_runs(model):
    template = "A [MASK:3] B [MASK:3] C"
    canvas = parse_template(template, model.tokenizer, model.max_length, model.shift)
    (a0, a1), (b0, b1) = canvas.spans
    for use_cache in (False, True):
        g = model.fill(template, block_length=3, steps=4, use_cache=use_cache, frames=True)
        assert_fixed_unchanged(g, canvas, model.mask_token_id)
        first = [set(f.revealed) <= set(range(a0, a1)) for f in g.frames]
        assert first == [True, True, False, False]  # block 1 (first span) completes before block 2 starts
        assert g.nfe == 4


def test_fill_is_seeded_and_stream_fill_matches(model):
    template = "Once upon a [MASK:4] there was a [MASK:2]."
    a = model.fill(template, temperature=1.0, seed=11, remasking="random", steps=3, frames=True)
    *frames, b = model.stream_fill(template, temperature=1.0, seed=11, remasking="random", steps=3)
    assert a.token_ids == b.token_ids and a.frames == frames == b.frames
    c = model.fill(template, temperature=1.0, seed=12, remasking="random", steps=3, frames=True)
    assert c.token_ids != a.token_ids


def test_fill_and_infill_bad_input(model):
    with pytest.raises(ValueError, match="unclosed mask marker at position 6"):
        model.fill("Hello [MASK:4 world", frames=True)
    with pytest.raises(ValueError, match="beyond the model's context of 512"):
        model.fill("Hello [MASK:600]", frames=True)
    with pytest.raises(ValueError, match="length: must be a positive integer"):
        model.infill("a", "b", 0)
    with pytest.raises(ValueError, match="steps: must be an integer >= 1"):
        model.fill("a [MASK:3] b", steps=0)
    with pytest.raises(ValueError, match="remasking: must be one of"):
        model.infill("a", "b", 2, remasking="best")
