"""The project's training loop vs `transformers.Trainer` with only the loss overridden (dllm's shape), on the same
model, data, batch, optimizer schedule and threads: tokens/s of optimizer steps (the first excluded), in one run.

What Trainer would also have to carry for the project's features is in train/loop.py's docstring (per-step
attention mode, per-rank noise state in checkpoints for exact resume, the resumable packed sampler); this measures
only what its generic loop costs or saves per step.

    python -m bench.trainer_vs_loop                          # tiny-cpu preset, 40 steps each, 3 alternating runs
    python -m bench.trainer_vs_loop --model smollm2-135m --steps 6 --batch-size 4 --seq-len 128
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Optional, Sequence

import torch


def loop_tokens_per_s(cfg) -> float:
    from train.loop import train
    return float(train(cfg, "pretrain")["tokens_per_s"])


def trainer_tokens_per_s(cfg, workdir: Path) -> float:
    """The same objective through transformers.Trainer: a Trainer subclass whose compute_loss is the Objective."""
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from train.loop import setup
    state = setup(cfg, "pretrain")             # the same model, data and objective the loop builds
    objective = state.accelerator.unwrap_model(state.objective)
    data, run, o = state.train_data, cfg.run, cfg.optim
    noise = torch.Generator(device="cpu").manual_seed(run.seed)

    class Blocks(torch.utils.data.Dataset):
        def __len__(self):
            return len(data)

        def __getitem__(self, i):
            return {"input_ids": data.batch([i])["input_ids"][0]}

    class DiffusionTrainer(Trainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            loss, _ = model(**inputs, generator=noise)
            return loss

    class StepTimer(TrainerCallback):
        """Time between consecutive step ends: a step with its batch fetch, as the loop times its own."""

        def __init__(self):
            self.ends = []

        def on_step_end(self, args, st, control, **kw):
            self.ends.append(time.perf_counter())

    timer = StepTimer()
    args = TrainingArguments(output_dir=str(workdir / "trainer"), per_device_train_batch_size=run.batch_size,
                             max_steps=run.max_steps, learning_rate=o.lr, warmup_steps=o.warmup_steps,
                             lr_scheduler_type="cosine", weight_decay=o.weight_decay, max_grad_norm=o.grad_clip,
                             logging_steps=run.max_steps, save_strategy="no", report_to=[], use_cpu=True,
                             dataloader_num_workers=0, remove_unused_columns=False, seed=run.seed,
                             disable_tqdm=True, bf16=state.accelerator.mixed_precision == "bf16")
    DiffusionTrainer(model=objective, args=args, train_dataset=Blocks(), callbacks=[timer]).train()
    tokens_per_step = run.batch_size * state.data_info["seq_len"]
    timed = [b - a for a, b in zip(timer.ends, timer.ends[1:])]   # from the end of step 1: warm-up excluded
    return tokens_per_step * len(timed) / sum(timed)


def main(argv: Optional[Sequence[str]] = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m bench.trainer_vs_loop", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny-cpu")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3, help="alternating runs of each; the best counts")
    args = p.parse_args(argv)
    from bench.train_throughput import _preset_overrides
    from train.config import load_config
    preset, base = _preset_overrides(args.model)
    best = {"loop": 0.0, "trainer": 0.0}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):
            for side in ("loop", "trainer"):
                out = Path(tmp) / f"{side}-{r}"
                cfg = load_config(preset, [*base, f"run.max_steps={args.steps}", f"run.batch_size={args.batch_size}",
                                           f"data.block_size={args.seq_len}", "run.save_every=0",
                                           "run.eval_batches=0", "run.export=false", "run.progress=false",
                                           "run.tensorboard=false", "diffusion.anneal_steps=0",
                                           f"run.log_every={args.steps}", f"run.output_dir={out}"])
                tok_s = loop_tokens_per_s(cfg) if side == "loop" else trainer_tokens_per_s(cfg, out)
                from accelerate.state import AcceleratorState  # each run builds its own Accelerator
                AcceleratorState._reset_state(reset_partial_state=True)
                best[side] = max(best[side], tok_s)
                print(f"run {r} {side}: {tok_s:,.0f} tokens/s", flush=True)
    print(f"| loop tokens/s | Trainer tokens/s | Trainer / loop |\n|---|---|---|\n"
          f"| {best['loop']:,.0f} | {best['trainer']:,.0f} | {best['trainer'] / best['loop']:.2f} |")
    return best


if __name__ == "__main__":
    main()
