"""Decoders: the loops that turn a canvas of masks into text, one file each.

A decoder is a generator function `decoder(run: DecodeRun) -> Iterator[Step]` (`dlm.decoders.run`). It fills the
non-fixed positions of `run.canvas` in place, calling the model only through `run.call` (which counts evaluations
and model time), and yields one `Step` (plain tensors: what was revealed, with what confidence) after each
evaluation. It never builds display records: the caller turns steps into `Frame`s only when it streams or asks.

Reading order: registry.py (what a decoder declares), run.py (the state and the step they share), full.py (the
paper's sampler, the simplest loop), blocks.py (the same over an exact cache), speculative.py (blocks that draft for
themselves). Around them: `dlm.reveal` (which proposals a step keeps), `dlm.token_sampling` (logits -> tokens),
`dlm.generation` (prompt -> canvas -> a decoder -> Generation: the front end `model.generate` calls).

    full.py         the paper's sampler (Algorithm 2 and its certainty-ordered variants) over the whole canvas with
                    full attention: any order, any fixed positions (infilling), LLaDA-style semi-autoregressive
                    blocks, Fast-dLLM's approximate prefix cache.
    blocks.py       block diffusion (Fast-dLLM v2, BD3-LM): block by block over an exact KV cache, stops at EOS.
    speculative.py  block diffusion drafting for itself, verified by the same weights' clean (AR) rows: exact
                    speculative sampling, 1..block_length tokens per forward.
    registry.py     what each decoder (and reveal rule) declares: the settings it reads, what it can do; torch-free.
    run.py          DecodeRun, Step and the proposal/reveal step the decoders share.

A new decoder is one file here (or anywhere you import) with one function under `@decoder("name", ...)`;
`SamplerConfig.decoder` then accepts it, and the CLI, the app and the config notes follow its declaration.
This package's `__init__` imports only the registry, so `dlm.sampler_config` can read it without torch.
"""
from .registry import DECODERS, REVEAL_RULES, DecoderSpec, decoder

__all__ = ["DECODERS", "REVEAL_RULES", "DecoderSpec", "decoder"]
