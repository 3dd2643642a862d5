"""lm-evaluation-harness adapter: any `dlm.load`-able model as an lm-eval `LM`, registered as `dlm`.

    python -m evals.lm_eval_model run --model dlm \\
        --model_args pretrained=smollm2-135m-dlm,n_samples=32 --device cpu --tasks piqa --limit 100
    # or from Python: lm_eval.simple_evaluate(model=DLMHarnessLM(model=loaded_model), tasks=[...])

- loglikelihood:         DLM: `model.score` (ELBO Monte-Carlo, or the paper's estimator); AR: exact causal score.
                         `is_greedy` is computed for AR only; for a DLM it is reported as False (checking it would
                         need a generation per request: use `python -m evals --tasks lambada` for that metric).
- loglikelihood_rolling: DLM: the ELBO bound on the NLL; AR: exact; texts longer than the context are split into
                         consecutive windows, each scored after the start token.
- generate_until:        the diffusion sampler (DLM) or HF greedy generation (AR) for `max_gen_toks` tokens, cut
                         at the first `until` string.
Needs `pip install lm-eval` (optional; the rest of evals does not import this module).
"""
from __future__ import annotations

import zlib
from typing import Optional

from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from tqdm.auto import tqdm

from .eval_model import EvalModel, EvalSettings, default_kind


@register_model("dlm", "dlm-studio")
class DLMHarnessLM(LM):
    """lm-eval model class over `evals.eval_model.EvalModel`.

    pretrained:    registry name / path / hub id for `dlm.load` (or pass a loaded `model=` from Python).
    kind:          "dlm" / "ar"; default from the checkpoint (adapted -> dlm).
    n_samples, score_method, seed: as in `evals.eval_model.EvalSettings`; any other key that is a dlm.SamplerConfig
                   field (steps, block_length, remasking, threshold, decoder, ...) overrides the model's
                   recommended generation config (lm-eval passes --model_args values as strings: coerced).
    max_gen_toks:  default generation length when a task gives none (128).
    device, dtype: passed to `dlm.load` (device comes from lm-eval's own --device, not --model_args).
    Other lm-eval arguments (batch_size, ...) are accepted and ignored.
    """

    def __init__(self, pretrained: Optional[str] = None, model=None, kind: Optional[str] = None,
                 n_samples=32, score_method: str = "elbo", seed=0, max_gen_toks=128, device="auto",
                 dtype="auto", **other):
        super().__init__()
        if model is None:
            if not pretrained:
                raise ValueError("DLMHarnessLM needs pretrained=NAME_OR_PATH (or model= a loaded DiffusionLM)")
            import dlm
            model = dlm.load(pretrained, device=device or "auto", dtype=dtype or "auto")
        kind = kind or default_kind(model, pretrained or "")
        from dlm import SamplerConfig
        fields = {f["name"] for f in SamplerConfig.describe()}
        sampler = {k: v for k, v in other.items() if k in fields and v not in (None, "", "None")}
        self.settings = EvalSettings(kind=kind, n_samples=int(n_samples), score_method=score_method,
                                     sampler=sampler, seed=int(seed))
        self.backend = EvalModel(model, self.settings)
        self.max_gen_toks = int(max_gen_toks)

    def _seed(self, text: str) -> int:
        """Deterministic per-context seed: the choices of one question share masks (common random numbers)."""
        return (self.settings.seed * 1_000_003 + zlib.crc32(text.encode("utf-8"))) % (2 ** 31 - 1)

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        out = []
        for req in tqdm(requests, desc="loglikelihood", disable=disable_tqdm or None):
            context, continuation = req.args
            ll = self.backend.loglikelihoods([(context, continuation)], self._seed(context))[0]
            out.append((ll.logprob, bool(ll.greedy)))
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        window = self.backend.model.max_length - 1
        out = []
        for req in tqdm(requests, desc="loglikelihood_rolling", disable=disable_tqdm or None):
            (text,) = req.args
            ids = self.backend.tokenizer(text, add_special_tokens=False)["input_ids"]
            total = sum(self.backend.nll(ids[i:i + window], self._seed(text) + i)
                        for i in range(0, len(ids), window))
            out.append(-total)
        return out

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        out = []
        for req in tqdm(requests, desc="generate_until", disable=disable_tqdm or None):
            context, gen_kwargs = req.args
            gen_kwargs = dict(gen_kwargs or {})
            until = gen_kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            n = int(gen_kwargs.get("max_gen_toks", self.max_gen_toks))
            text = self.backend.complete(context, n, self._seed(context)).text
            for stop in until:
                if stop and stop in text:
                    text = text[: text.index(stop)]
            out.append(text)
        return out


def main(argv=None) -> None:
    """`python -m evals.lm_eval_model ARGS`: lm-eval's own CLI with the `dlm` model registered."""
    import sys

    from lm_eval.__main__ import cli_evaluate
    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    cli_evaluate()


if __name__ == "__main__":
    main()
