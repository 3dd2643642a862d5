"""Command line: `python -m train {pretrain,sft,tokenize} --config CONFIG [options] [key=value ...]`.

    --config NAME|PATH   a preset in train/configs (tiny-cpu, smollm2-135m, diffugpt-s, ...) or a YAML file
    --output-dir DIR     run.output_dir          --max-steps N   run.max_steps
    --save-every N       run.save_every          --resume auto|PATH   run.resume
    --print-config       print the resolved config and exit
    key=value            any config field: `optim.lr=1e-4`, `lora.enabled=true`, or `lr=1e-4` when unambiguous

`tokenize` builds the token cache only (do it once before a multi-process launch of a big corpus).
Exit status 2 on a configuration or data error (the message names the key or file).
"""
from __future__ import annotations

import argparse
import logging
import os
import sys

from .config import ConfigError, load_config, validate
from .data import DataError


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m train", description="Adapt a causal LM into a diffusion LM.")
    p.add_argument("task", choices=["pretrain", "sft", "tokenize"], help="what to run")
    p.add_argument("--config", default=None, help="preset name (train/configs) or YAML path")
    p.add_argument("--output-dir", default=None)
    p.add_argument("--max-steps", type=int, default=None)
    p.add_argument("--save-every", type=int, default=None)
    p.add_argument("--resume", default=None, help="auto, or a checkpoint / output directory")
    p.add_argument("--print-config", action="store_true")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    return p.parse_intermixed_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[%(name)s] %(message)s")
    for noisy in ("httpx", "urllib3", "accelerate", "transformers"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # accelerate warns about the tied input/output embedding on every checkpoint; reloading handles it
    logging.getLogger("accelerate.utils.other").setLevel(logging.ERROR)
    overrides = list(args.overrides)
    for flag, key in (("output_dir", "run.output_dir"), ("max_steps", "run.max_steps"),
                      ("save_every", "run.save_every"), ("resume", "run.resume")):
        value = getattr(args, flag)
        if value is not None:
            overrides.append(f"{key}={value}")
    try:
        cfg = load_config(args.config, overrides)
        if args.print_config:
            print(cfg.to_yaml(), end="")
            return 0
        if args.task == "tokenize":
            return _tokenize(cfg)
        validate(cfg, args.task)
        from .loop import train
        summary = train(cfg, args.task)
    except (ConfigError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if summary.get("final_dir") and os.environ.get("RANK", "0") == "0":
        print(f"done: {summary['steps']} steps, {summary['tokens_seen']:,} tokens -> {summary['final_dir']}")
    return 0


def _tokenize(cfg) -> int:
    """Build the token cache with exactly the tokenizer training will use (the model's, mask token included)."""
    from pathlib import Path

    from .data import build_token_cache
    from .modeling import build_model
    model = build_model(cfg, Path(cfg.run.output_dir) / "init-model")
    cache = build_token_cache(cfg.data, model.tokenizer, progress=True)
    print(f"{cache.directory}: {cache.n_tokens:,} tokens ({cache.n_tokens - cache.split:,} held out), "
          f"{cache.n_documents} documents, {'built' if cache.built else 'reused'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
