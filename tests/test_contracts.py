"""The contracts every registered decoder and reveal rule keeps (docs/ARCHITECTURE.md), parametrized over the
registries themselves: a new decoder file or `@reveal_rule` is tested here with no edit to this file.

A decoder: declares a description and only per-decoder settings it reads; fills the new tokens with no mask left,
never changes the prompt, counts one NFE per model call, streams the same frames it returns, is deterministic
greedy; one that declares `fixed_positions` keeps an infilling template's context. A reveal rule: drives the
paper's sampler to a finished text, with the threshold when it declares `uses_threshold`. (Every base family:
`tests/test_families.py`, parametrized over `dlm.loading.SUPPORTED_FAMILIES`.)"""
from __future__ import annotations

from dataclasses import fields

import pytest

from dlm.decoders.registry import DECODERS, REVEAL_RULES
from dlm.sampler_config import SamplerConfig
from dlm.types import Generation

PER_DECODER = {f.name for f in fields(SamplerConfig) if f.metadata.get("per_decoder")}
PROMPT = "Once upon a time"


def config_for(name: str, **changes) -> SamplerConfig:
    spec = DECODERS[name]
    values = dict(decoder=name, max_new_tokens=8, temperature=0.0, seed=0)
    if spec.block_mode or "block_length" in spec.uses:
        values["block_length"] = 4
    values.update(changes)
    return SamplerConfig(**values)


@pytest.mark.parametrize("name", list(DECODERS))
def test_decoder_declaration(name):
    spec = DECODERS[name]
    assert spec.description and set(spec.uses) <= PER_DECODER, spec
    assert callable(spec.load())


@pytest.mark.parametrize("name", list(DECODERS))
def test_decoder_writes_after_the_prompt_and_streams_what_it_returns(name, tiny_dlm):
    cfg = config_for(name)
    prompt_ids = tiny_dlm.tokenizer(PROMPT)["input_ids"]
    g = tiny_dlm.generate(PROMPT, cfg, frames=True)
    assert isinstance(g, Generation) and g.nfe >= 1 and g.frames
    assert 0 < len(g.token_ids) <= cfg.max_new_tokens and tiny_dlm.mask_token_id not in g.token_ids
    for f in g.frames:  # the prompt never changes, in any frame
        assert f.tokens[:f.start][-len(prompt_ids):] == prompt_ids[-f.start:][-len(prompt_ids):]
    streamed = list(tiny_dlm.stream(PROMPT, cfg))
    assert isinstance(streamed[-1], Generation) and streamed[-1].token_ids == g.token_ids
    assert len(streamed) - 1 == len(g.frames)
    assert tiny_dlm.generate(PROMPT, cfg).token_ids == g.token_ids   # greedy is deterministic


@pytest.mark.parametrize("name", [n for n, s in DECODERS.items() if s.fixed_positions])
def test_decoder_with_fixed_positions_keeps_the_context(name, tiny_dlm):
    g = tiny_dlm.fill("The quick [MASK:3] fox jumps over the lazy dog.", decoder=name, seed=0)
    assert g.text.startswith("The quick") and g.text.endswith("fox jumps over the lazy dog.")
    assert len(g.spans) == 1 and tiny_dlm.mask_token_id not in g.token_ids


@pytest.mark.parametrize("rule", list(REVEAL_RULES))
def test_reveal_rule_finishes_the_text(rule, tiny_dlm):
    spec = REVEAL_RULES[rule]
    assert spec.description
    cfg = SamplerConfig(max_new_tokens=8, steps=4, remasking=rule, seed=0,
                        threshold=0.5 if spec.uses_threshold else None)
    g = tiny_dlm.generate(PROMPT, cfg, frames=True)
    assert len(g.token_ids) == 8 and tiny_dlm.mask_token_id not in g.token_ids
    assert g.nfe <= 4 and sum(len(f.revealed) for f in g.frames) == 8
