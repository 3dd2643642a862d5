"""One interface for the two kinds of rows in the table: a model evaluated as an AR LM or as a diffusion LM.

Tasks never branch on the kind; they call
- `loglikelihoods(pairs, seed)`: log p(continuation | context) per pair (AR: exact, summed over tokens, plus whether
  greedy decoding reproduces it; DLM: `model.score`, ELBO Monte-Carlo or the paper's estimator);
- `complete(prompt, max_new_tokens, seed)`: a continuation (AR: HF greedy `generate`; DLM: the diffusion sampler);
- `infill(prefix, suffix, length, seed)`: the middle (DLM: `model.infill`; AR: sees the prefix only, as in the
  paper's Table 1);
- `nll(ids, seed)`: the NLL of a token sequence (AR exact; DLM the ELBO bound).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

KINDS = ("ar", "dlm")
SCORE_METHODS = ("elbo", "paper")


@dataclass
class EvalSettings:
    """Every knob that changes a prediction (stored in the run's config.json; resuming needs them unchanged).

    kind:            "ar" (causal, same weights) or "dlm" (diffusion); default from the model (`default_kind`).
    n_samples:       DLM likelihood: Monte-Carlo samples (elbo) or noise levels (paper). Default 32.
    score_method:    "elbo" (stratified MC ELBO) or "paper" (DiffuLLaMA's unweighted grid estimate). Default elbo.
    sampler:         DLM generation: SamplerConfig fields overriding the model's recommended writing config
                     (`model.sampler_config`), e.g. {"steps": 16}; {} = the model's own decoding.
    infill_sampler:  the same for infilling tasks, over `model.infill_config` (always the full-attention decoder).
    oracle_length:   generate exactly as many tokens as the reference answer (the paper's setting). Default True.
    max_new_tokens:  answer budget when not oracle; None = each task's default.
    seed:            base seed; example i of a task uses a seed derived from (seed, i) so reruns are identical.
    gen_length:      tokens per sample for the generation-quality task `genppl` (`genpplN` overrides). Default 64.
    gen_temperature / gen_top_p: sampling for `genppl` (defaults 1.0 / 1.0: plain ancestral sampling).
    gen_prompt_words: `genppl` prompts = first N words of held-out paragraphs; 0 (default) = unconditional.
    judge:           AR model scoring gen-PPL (registry name / path / hub id). Default smollm2-135m (offline);
                     the paper uses gpt2-large.
    ppl_max_tokens:  `elbo_ppl`: tokens per held-out paragraph (longer ones are cut). Default 128.
    heldout_book:    Gutenberg file (under gutenberg/) for `elbo_ppl` / `genppl`; None = data.HELDOUT_BOOKS[0].
    chat:            GSM8K: wrap the question in the tokenizer's chat template (for SFT'd / instruct models).
    gsm8k_format:    GSM8K solutions (few-shot examples, oracle length): "full" (the dataset's worked text) or
                     "symbolic" (only the `<<...>>` equations, then `#### answer`: the paper's SFT form, what a
                     model fine-tuned by the gsm8k-sft presets writes). Default full.
    shots:           TriviaQA / GSM8K: solved examples before each question (k-shot in-context learning; TriviaQA
                     draws them from the other questions of its file, GSM8K from its train split). Default 0.
    samples:         TriviaQA / GSM8K self-consistency: answers sampled per question (at `sample_temperature`,
                     top-p 0.95); the most frequent normalised answer counts. 1 (default) = one greedy answer.
    exec_timeout:    seconds per HumanEval program. Default 10.
    """

    kind: str = "dlm"
    n_samples: int = 32
    score_method: str = "elbo"
    sampler: dict = field(default_factory=dict)
    infill_sampler: dict = field(default_factory=dict)
    oracle_length: bool = True
    max_new_tokens: Optional[int] = None
    seed: int = 0
    gen_length: int = 64
    gen_temperature: float = 1.0
    gen_top_p: float = 1.0
    gen_prompt_words: int = 0
    judge: str = "smollm2-135m"
    ppl_max_tokens: int = 128
    heldout_book: Optional[str] = None
    chat: bool = False
    gsm8k_format: str = "full"
    exec_timeout: float = 10.0
    shots: int = 0
    samples: int = 1
    sample_temperature: float = 0.7

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {', '.join(KINDS)}, got {self.kind!r}")
        if self.score_method not in SCORE_METHODS:
            raise ValueError(f"score_method must be one of {', '.join(SCORE_METHODS)}, got {self.score_method!r}")
        if self.n_samples < 1:
            raise ValueError(f"n_samples must be >= 1, got {self.n_samples}")
        from .metrics import GSM8K_FORMATS
        if self.gsm8k_format not in GSM8K_FORMATS:
            raise ValueError(f"gsm8k_format must be one of {', '.join(GSM8K_FORMATS)}, got {self.gsm8k_format!r}")
        if self.shots < 0 or self.samples < 1:
            raise ValueError(f"shots must be >= 0 and samples >= 1, got {self.shots} and {self.samples}")
        from dlm import SamplerConfig
        SamplerConfig().replace(**self.sampler)          # unknown or bad fields fail before any example runs
        SamplerConfig().replace(**self.infill_sampler)


def example_seed(seed: int, example_id: int) -> int:
    """A per-example seed that does not depend on the order examples are run in (resumable, reproducible)."""
    return (int(seed) * 1_000_003 + int(example_id)) % (2 ** 31 - 1)


def default_kind(model, source: str = "") -> str:
    """'dlm' for a diffusion-adapted checkpoint, 'ar' for a plain causal LM.

    `model.config.adapted` decides; a model without it counts as a DLM when it was loaded from a directory that
    holds a `dlm_config.json`."""
    adapted = getattr(getattr(model, "config", None), "adapted", None)
    if isinstance(adapted, bool):
        return "dlm" if adapted else "ar"
    return "dlm" if source and (Path(source) / "dlm_config.json").is_file() else "ar"


@dataclass
class LogLik:
    logprob: float                 # nats (DLM "paper": minus the mean masked-token CE, a per-token figure)
    n_tokens: int
    greedy: Optional[bool] = None  # AR only: does greedy decoding reproduce the continuation?
    stderr: float = 0.0            # DLM: Monte-Carlo standard error of the estimate


class EvalModel:
    """Wraps a loaded `dlm.DiffusionLM` with the settings of one evaluation run."""

    def __init__(self, model, settings: EvalSettings):
        self.model = model
        self.s = settings
        self._judge = None

    @property
    def kind(self) -> str:
        return self.s.kind

    @property
    def tokenizer(self):
        return self.model.tokenizer

    # ----- tokens ----------------------------------------------------------------------------------------------
    def n_tokens(self, text: str) -> int:
        """Tokens of `text` on its own (oracle answer lengths)."""
        return max(1, len(self.tokenizer(text, add_special_tokens=False)["input_ids"]))

    def start_token(self) -> int:
        start = self.model.start_token_id
        if start is None:
            raise ValueError(f"{self.model.name}: the tokenizer has neither BOS nor EOS to start a text with")
        return start

    # ----- likelihood --------------------------------------------------------------------------------------------
    def loglikelihoods(self, pairs: Sequence[tuple[str, str]], seed: int) -> list[LogLik]:
        """log p(continuation | context) for each (context, continuation) pair. The DLM uses the same seed for
        every pair (common random numbers: the choices of one question are compared under the same masks)."""
        if self.kind == "ar":
            return self._ar_loglikelihoods(pairs)
        out = []
        for context, continuation in pairs:
            sc = self.model.score(context, continuation, n_samples=self.s.n_samples, method=self.s.score_method,
                                  seed=seed)
            out.append(LogLik(float(sc.logprob), int(sc.n_tokens), None, float(sc.stderr)))
        return out

    @torch.no_grad()
    def _ar_loglikelihoods(self, pairs: Sequence[tuple[str, str]]) -> list[LogLik]:
        """Exact causal scores of several pairs in one right-padded batch (the tokenization is dlm's, so the AR
        and DLM rows score the very same tokens)."""
        from dlm.likelihood import encode_pair
        encoded = [encode_pair(self.model, c, k) for c, k in pairs]
        for (ctx, cont), (c, k) in zip(encoded, pairs):
            if not cont:
                raise ValueError(f"empty continuation for context {c[-60:]!r}")
        lengths = [len(a) + len(b) for a, b in encoded]
        L = max(lengths)
        if L > self.model.max_length:
            raise ValueError(f"{L} tokens exceed the model's context of {self.model.max_length}")
        pad = self.start_token()
        ids = torch.full((len(pairs), L), pad, dtype=torch.long)                     # [B, L]
        mask = torch.zeros((len(pairs), L), dtype=torch.long)
        for b, (ctx, cont) in enumerate(encoded):
            ids[b, :lengths[b]] = torch.tensor(ctx + cont)
            mask[b, :lengths[b]] = 1
        was_training = self.model.training
        self.model.eval()
        try:
            logits = self.model.ar_logits(ids.to(self.model.device), attention_mask=mask.to(self.model.device))
        finally:
            self.model.train(was_training)
        out = []
        for b, (ctx, cont) in enumerate(encoded):
            P = len(ctx)
            rows = logits[b, P - 1:P - 1 + len(cont)].float()                            # [n, V] predict cont
            target = torch.tensor(cont, device=rows.device)
            logp = -F.cross_entropy(rows, target, reduction="sum")
            greedy = bool((rows.argmax(-1) == target).all())
            out.append(LogLik(float(logp), len(cont), greedy))
        return out

    @torch.no_grad()
    def nll(self, text_ids: list[int], seed: int) -> float:
        """NLL (nats) of `text_ids` after the start token: AR exact, DLM the ELBO upper bound (n_samples masks)."""
        ids = torch.tensor([[self.start_token()] + list(text_ids)], dtype=torch.long)  # [1, 1 + n]
        if self.kind == "dlm":
            from dlm.likelihood import elbo_nll
            maskable = torch.ones_like(ids, dtype=torch.bool)
            maskable[:, 0] = False
            return float(elbo_nll(self.model, ids, maskable=maskable, n_samples=self.s.n_samples, seed=seed)[0])
        self.model.eval()
        logits = self.model.ar_logits(ids.to(self.model.device))                         # [1, 1 + n, V]
        return float(F.cross_entropy(logits[0, :-1].float(), ids[0, 1:].to(logits.device), reduction="sum"))

    # ----- generation --------------------------------------------------------------------------------------------
    def _config(self, base, overrides: dict, length: int):
        """The SamplerConfig for a generation of `length` tokens: the model's recommendation + the run's overrides,
        with steps raised to one per block (answer lengths vary per example, so a fixed --steps must fit every
        one of them; more steps than tokens are capped by the config itself)."""
        cfg = base.replace(**overrides).replace(max_new_tokens=length)
        if cfg.steps is not None and cfg.block_length:
            cfg = cfg.replace(steps=max(min(cfg.steps, length), -(-length // cfg.block_length)))
        return cfg

    def complete(self, prompt, max_new_tokens: int, seed: int, temperature: float = 0.0, top_p: float = 1.0,
                 messages=None):
        """Continue `prompt` (text, or token ids) by `max_new_tokens` tokens -> `Generation` (text cut at EOS)."""
        cfg = self._config(self.model.sampler_config, self.s.sampler, max_new_tokens).replace(
            temperature=temperature, top_p=top_p, seed=seed)
        if self.kind == "ar":
            return self.model.ar_generate(prompt, cfg, messages=messages)
        return self.model.generate(prompt, cfg, messages=messages)

    def infill(self, prefix: str, suffix: str, length: int, seed: int) -> str:
        """The text between prefix and suffix. AR: a greedy continuation of the prefix alone."""
        if self.kind == "ar":
            return self.complete(prefix, length, seed).text
        cfg = self._config(self.model.infill_config, self.s.infill_sampler, length).replace(seed=seed)
        g = self.model.infill(prefix, suffix, length, cfg)
        return g.spans[0] if g.spans else ""

    # ----- gen-PPL judge -----------------------------------------------------------------------------------------
    def judge(self):
        """The AR model that scores generations (loaded once; the evaluated model itself when it is the judge)."""
        if self._judge is None:
            source = getattr(self.model, "source", None) or self.model.name
            if self.s.judge in (source, self.model.name) and not getattr(self.model.config, "adapted", False):
                self._judge = self.model
            else:
                import dlm
                self._judge = dlm.load(self.s.judge, device=self.model.device, quantization=None)
        return self._judge
