"""Every shipped in-context example's expected answer is right (slow: the real SmolLM2-135M).

The AR base `smollm2-135m` (greedy) is the witness where it gets the example right; where it does not, the expected
answer is checked against a reviewed one recorded here (so a wrong `expected:` such as "kitten" for "lamb is to
sheep as kitten is to" cannot ship again)."""
from __future__ import annotations

import pytest

from dlm.fewshot import answer_of, load_examples, matches

# Examples the AR base gets wrong, with the answer a person checked (and why the witness is not enough).
REVIEWED = {
    "analogies": "cat",     # lamb : sheep = kitten : cat (the base answers "lamb")
    "translation": "chat",  # English "cat" is French "chat" (the base answers "fel")
}


def test_reviewed_answers_are_the_shipped_ones():
    shipped = {e.name: e.expected for e in load_examples()}
    for name, answer in REVIEWED.items():
        assert shipped[name] == answer, f"{name}: expected {shipped[name]!r}, reviewed {answer!r}"


@pytest.mark.slow
def test_every_expected_answer_is_witnessed_or_reviewed(smollm2):
    checked = 0
    for e in load_examples():
        if not e.expected:
            continue
        out = smollm2.ar_generate(e.prompt, max_new_tokens=e.max_new_tokens, temperature=0.0).text
        if e.name in REVIEWED:
            assert e.expected == REVIEWED[e.name]
            assert not matches(e.expected, out), f"{e.name}: the base is now right ({answer_of(out)!r}); drop " \
                                                 f"the reviewed entry"
        else:
            assert matches(e.expected, out), (f"{e.name}: expected {e.expected!r}, but the AR base answers "
                                              f"{answer_of(out)!r}: fix the example or review it into REVIEWED")
        checked += 1
    assert checked >= 5
