"""Evaluation of diffusion and AR language models: the paper's Table 1, generation quality, held-out perplexity.

`python -m evals --model NAME --tasks piqa,lambada,... --out DIR` (see `evals.cli`). The package reads task data
from `--data-dir` (default `../shared/data`); `dlm` itself holds no task data and does not import this package.

Modules: data (task files -> examples), metrics (pure scoring functions), execution (sandboxed pass@1),
backends (AR vs DLM calls), tasks (per-task evaluation + aggregation), store (resumable output directory),
report (Table-1 Markdown), runner (run tasks into a directory), cli, lm_eval_model (lm-evaluation-harness adapter).
"""
from .eval_model import EvalModel, EvalSettings, default_kind
from .runner import evaluate, run_task
from .tasks import TASKS, get_task

__all__ = ["EvalModel", "EvalSettings", "default_kind", "evaluate", "run_task", "TASKS", "get_task"]
