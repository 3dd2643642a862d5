"""The training loop (paper Algorithm 1 for `pretrain`, the same loop with prompt-masked batches for `sft`).

One accelerate loop for every scale: a CPU process, `accelerate launch` with N processes (gloo on CPU, NCCL on
GPUs), DeepSpeed ZeRO-2/3 or FSDP from an accelerate config file. Per optimizer step:

    ratio = anneal_ratio(step, anneal_steps)                      # causal -> bidirectional (paper §3.2)
    for each of grad_accum micro-batches (this rank's slice of the global batch):
        loss = Eq. 7 on q_sample(x0, t ~ U(eps, 1))                # via DiffusionLM.diffusion_loss
        backward (gradients all-reduced on the last micro-batch)
    clip, AdamW, warmup+cosine LR
then, every N steps: metrics line, held-out eval, atomic checkpoint. At the end: export to OUTPUT_DIR/final.

In code: `train` = `setup` (config, accelerate, model, data, optimizer) -> `resume` (checkpoint, trackers) ->
`loop` (`train_step`, `log_metrics`, `run_eval`, `checkpoint`) -> `finish` (export, rank check, summary), over one
`RunState`. Why a loop of our own and not `transformers.Trainer` with a loss override (dllm's shape): each optimizer
step picks its attention mode (full / block, `step_mode`) and anneals the mask by step; the noise generator is
per-rank state that a checkpoint must restore for a resumed run to equal an uninterrupted one bit for bit; and
sequences come from a resumable sampler over packed token caches, not a DataLoader. Trainer would need a callback
or subclass for each of these, and its checkpoint format does not carry the noise state. Measured
(`python -m bench.trainer_vs_loop`: the same objective through a Trainer subclass that only overrides the loss, same
model, data, batch and threads): equal speed, tiny-cpu 11,383 vs 11,333 tokens/s (best of 3 alternating runs), so
there is nothing to gain per step either.
"""
from __future__ import annotations

import gc
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from .checkpoint import clean_stale_temp, list_checkpoints, load_checkpoint, resolve_candidates, save_checkpoint
from .config import ConfigError, TrainConfig, validate
from .data import BlockSampler, DataError, PackedBlocks, build_token_cache, expand_sources
from .evaluate import evaluate
from .modeling import Objective, build_model, export, trainable_summary
from .schedules import anneal_ratio, make_scheduler, step_mode
from .tracker import JSONLTracker

log = logging.getLogger("train")


# ----- small helpers --------------------------------------------------------------------------------------------------
def resolve_mixed_precision(value: str) -> str:
    if value != "auto":
        return value
    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    from dlm.cpu_kernel import native_bf16
    return "bf16" if native_bf16() else "no"


def make_accelerator(cfg: TrainConfig, trackers: Sequence = ()):
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration
    # cpu=True is what makes a multi-process CPU launch use gloo and synchronise gradients; without it two CPU
    # processes silently train two independent models (measured with accelerate 1.15).
    cpu = not torch.cuda.is_available()
    mixed = resolve_mixed_precision(cfg.run.mixed_precision)
    if cpu and mixed == "fp16":
        raise ConfigError("run.mixed_precision: fp16 needs a GPU; use bf16 on CPU")
    out = str(Path(cfg.run.output_dir).expanduser())
    return Accelerator(cpu=cpu, mixed_precision=mixed, gradient_accumulation_steps=cfg.run.grad_accum,
                       step_scheduler_with_optimizer=False, log_with=list(trackers) or None,
                       project_config=ProjectConfiguration(project_dir=out, logging_dir=out))


def _is_sharded(accelerator) -> bool:
    """ZeRO-3 / FSDP: parameters are split across ranks, so the unwrapped module cannot run on its own."""
    from accelerate.utils import DistributedType
    if accelerator.distributed_type == DistributedType.FSDP:
        return True
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    return plugin is not None and int(plugin.zero_stage or 0) == 3


def _param_groups(module, weight_decay: float):
    """Weight decay on matrices only (not on biases, norms, or single embedding rows)."""
    decay, no_decay = [], []
    for p in module.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _out_of_time(accelerator, deadline: float) -> bool:
    """Every rank stops at the same step: the decision is the max over ranks of "past the deadline"."""
    late = torch.tensor([float(time.monotonic() > deadline)], device=accelerator.device)
    return bool(accelerator.reduce(late, reduction="sum").item() > 0)


def trainable_checksum(module) -> list[float]:
    """float64 sums of every trainable tensor, in name order: what gradient synchronisation keeps equal across
    ranks (compared once at the end of a multi-process run; one cheap reduction per tensor, no serialisation)."""
    return [float(p.detach().double().sum()) for _, p in sorted(module.named_parameters()) if p.requires_grad]


def _to_device(batch: dict, device) -> dict:
    return {k: (v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}


# ----- data -----------------------------------------------------------------------------------------------------------
def build_datasets(cfg: TrainConfig, task: str, tokenizer, progress: bool, max_length: int):
    """-> (train data, held-out data or None, info dict). Both have `len()` and `.batch(indices)`."""
    if task == "sft":
        from .sft import build_sft_cache, split_sft
        if cfg.sft.max_length > max_length:
            raise ConfigError(f"sft.max_length {cfg.sft.max_length} exceeds the model's context {max_length}")
        arrays = build_sft_cache(cfg.data, cfg.sft, tokenizer)
        train, held = split_sft(arrays, cfg.data.eval_fraction, cfg.data.seed, cfg.sft.padding)
        return train, held, {"cache": str(arrays.directory), "built": arrays.built, "records": len(arrays.ids),
                             "seq_len": cfg.sft.max_length}
    if cfg.data.block_size > max_length:
        raise ConfigError(f"data.block_size {cfg.data.block_size} exceeds the model's context {max_length}")
    cache = build_token_cache(cfg.data, tokenizer, progress=progress)
    train = PackedBlocks(cache.train_tokens(), cfg.data.block_size, "train")
    held = None
    if cache.n_tokens - cache.split >= cfg.data.block_size:
        held = PackedBlocks(cache.eval_tokens(), cfg.data.block_size, "eval")
    elif cfg.data.eval_fraction > 0 or cfg.data.eval_sources:
        log.warning("held-out split has fewer tokens than one block: evaluation disabled")
    return train, held, {"cache": str(cache.directory), "built": cache.built, "tokens": cache.n_tokens,
                         "train_tokens": cache.split, "seq_len": cfg.data.block_size}


# ----- the loop: set-up, resume, step, finish (nanoGPT's shape) -------------------------------------------------------
@dataclass
class RunState:
    """One training run: what `setup` builds, `resume` restores, `train_step` advances, `checkpoint` saves and
    `finish` exports. The loop's counters live here, not in closures, so every stage reads the same values."""

    cfg: TrainConfig
    task: str
    out: Path
    accelerator: Any
    model: Any
    objective: Any
    optimizer: Any
    scheduler: Any
    train_data: Any
    eval_data: Any
    data_info: dict
    sampler: BlockSampler
    noise: torch.Generator
    sharded: bool
    threads_before: int
    step: int = 0
    tokens_seen: int = 0
    window: list = field(default_factory=lambda: [0.0, 0.0, 0])   # loss sum, masked-CE sum, steps since last log
    resumed_from: Optional[str] = None
    last_eval: Optional[dict] = None
    grad_norm: Any = None
    timed_tokens: int = 0     # tokens / seconds of every step but the first (which pays for warm-up)
    timed_seconds: float = 0.0

    @property
    def main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def world(self) -> int:
        return self.accelerator.num_processes

    @property
    def tokens_per_step(self) -> int:
        return self.cfg.run.batch_size * self.data_info["seq_len"] * self.accelerator.gradient_accumulation_steps \
            * self.world


def train(cfg: TrainConfig, task: str = "pretrain", callbacks: Sequence = ()) -> dict:
    """Run (or resume) one training run; returns the run summary (also written to OUTPUT_DIR/run_summary.json).

    task:      "pretrain" (packed blocks, every token maskable) or "sft" (prompt never noised).
    callbacks: objects with an optional `on_step_end(step: int, record: dict)`, called after every optimizer step
               (the transformers TrainerCallback idea: progress bars, early stopping, fault injection).
    Every knob is in `cfg` (see train/config.py); this function only orchestrates.
    """
    state = setup(cfg, task)
    resume(state)
    if state.step == 0:
        state.last_eval = run_eval(state)
    loop(state, callbacks)
    return finish(state)


def setup(cfg: TrainConfig, task: str) -> RunState:
    """Check the config and the output dir, then build accelerate, the model, the data and the optimizer."""
    if task not in ("pretrain", "sft"):
        raise ConfigError(f"task must be pretrain or sft, got {task!r}")
    validate(cfg, task)
    run = cfg.run
    out = Path(run.output_dir).expanduser()
    expand_sources(list(cfg.data.sources))  # fail fast on missing data, before any model is loaded
    if not run.resume and list_checkpoints(out):
        raise ConfigError(f"run.resume: {out} already has checkpoints; pass --resume auto to continue that run, "
                          "or choose another --output-dir")
    threads_before = torch.get_num_threads()
    if run.threads:
        torch.set_num_threads(run.threads)
    from accelerate.utils import is_tensorboard_available, set_seed
    trackers = [JSONLTracker(out / "metrics.jsonl")] + (["tensorboard"] if run.tensorboard
                                                         and is_tensorboard_available() else [])
    accelerator = make_accelerator(cfg, trackers)
    if not accelerator.is_main_process:
        log.setLevel(logging.WARNING)
    if accelerator.gradient_accumulation_steps != run.grad_accum:
        log.warning("the accelerate config sets gradient accumulation to %d (run.grad_accum=%d): using %d",
                    accelerator.gradient_accumulation_steps, run.grad_accum, accelerator.gradient_accumulation_steps)
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(cfg.to_yaml())
        clean_stale_temp(out)
    set_seed(run.seed)

    with accelerator.main_process_first():  # rank 0 materialises init models / token caches; the others reuse
        model = build_model(cfg, out / "init-model")
        train_data, eval_data, data_info = build_datasets(cfg, task, model.tokenizer,
                                                          progress=accelerator.is_main_process,
                                                          max_length=model.max_length)
    log.info("model %s: %s", model.name, trainable_summary(model))
    log.info("data: %s", json.dumps(data_info))
    objective, optimizer, scheduler = _prepare_optimization(cfg, accelerator, model)
    rank = accelerator.process_index
    return RunState(cfg=cfg, task=task, out=out, accelerator=accelerator, model=model, objective=objective,
                    optimizer=optimizer, scheduler=scheduler, train_data=train_data, eval_data=eval_data,
                    data_info=data_info, sharded=_is_sharded(accelerator), threads_before=threads_before,
                    sampler=BlockSampler(len(train_data), cfg.data.seed, accelerator.num_processes, rank,
                                         start=cfg.data.skip_blocks),
                    noise=torch.Generator(device="cpu").manual_seed(run.seed * 1_000_003 + 7919 * rank + 1))


def _prepare_optimization(cfg: TrainConfig, accelerator, model):
    """The loss module, AdamW (decay on matrices only) and the LR schedule, prepared by accelerate."""
    dc, o, run = cfg.diffusion, cfg.optim, cfg.run
    objective = Objective(model, dc.objective, dc.weighting, dc.eps, dc.ar_weight, dc.distill_weight,
                          draft=dict(draft_loss=dc.draft_loss, reach=dc.reach, full_mask=dc.full_mask,
                                     accept_temperature=dc.accept_temperature))
    optimizer = torch.optim.AdamW(_param_groups(objective, o.weight_decay), lr=o.lr, betas=(o.beta1, o.beta2),
                                  eps=o.adam_eps)
    scheduler = make_scheduler(optimizer, o.warmup_steps, run.max_steps, o.schedule, o.min_lr_ratio)
    ds = getattr(accelerator.state, "deepspeed_plugin", None)
    if ds is not None:  # no dataloader is prepared, so tell DeepSpeed the micro-batch and clipping ourselves
        ds.deepspeed_config["train_micro_batch_size_per_gpu"] = run.batch_size
        if ds.deepspeed_config.get("gradient_clipping") == "auto":
            ds.deepspeed_config["gradient_clipping"] = o.grad_clip
    return accelerator.prepare(objective, optimizer, scheduler)


def resume(state: RunState) -> None:
    """Restore the newest usable checkpoint (run.resume), then start the trackers where it left off."""
    run = state.cfg.run
    if run.resume:
        candidates = resolve_candidates(run.resume, state.out)
        loaded = load_checkpoint(state.accelerator, candidates, warn=log.warning) if candidates else None
        if loaded is not None:
            saved, rank_state = loaded
            if int(saved.get("world_size", state.world)) != state.world:
                raise ConfigError(f"run.resume: {saved['loaded_from']} was saved by {saved['world_size']} "
                                  f"processes, this launch has {state.world}; resume with the same number of "
                                  "processes")
            state.noise.set_state(rank_state["noise_rng"])
            loss, ce, n = rank_state["window"].tolist()
            state.window = [loss, ce, int(n)]
            state.step, state.tokens_seen = int(saved["step"]), int(saved["tokens"])
            state.sampler.load_state_dict(saved["sampler"])
            state.resumed_from = saved["loaded_from"]
            log.info("resumed from step %d (%s)", state.step, state.resumed_from)
        elif run.resume != "auto":
            raise RuntimeError(f"--resume {run.resume}: no usable checkpoint")
        elif candidates:
            log.warning("no usable checkpoint in %s: starting from scratch", state.out)
    if state.main:
        # lines past the resumed step came from steps about to be recomputed
        JSONLTracker(state.out / "metrics.jsonl").truncate(state.step if state.resumed_from else None)
    state.accelerator.init_trackers("train")
    if state.eval_data is not None and state.sharded:
        log.warning("held-out evaluation is skipped under ZeRO-3 / FSDP (parameters are sharded)")


def loop(state: RunState, callbacks: Sequence = ()) -> None:
    """Optimizer steps until run.max_steps (or run.max_minutes): log, evaluate and checkpoint on schedule."""
    run = state.cfg.run
    state.objective.train()
    bar = None
    if state.main and run.progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=run.max_steps, initial=state.step, desc=state.task, unit="step", dynamic_ncols=True)
    deadline = time.monotonic() + 60 * run.max_minutes if run.max_minutes else None
    first = True
    while state.step < run.max_steps:
        if deadline is not None and _out_of_time(state.accelerator, deadline):
            log.info("run.max_minutes (%g) reached at step %d", run.max_minutes, state.step)
            break
        record = train_step(state, timed=not first)
        first = False
        if bar is not None:
            bar.set_postfix(loss=f"{record['loss']:.3f}", tok_s=f"{record['tokens_per_s']:,.0f}", refresh=False)
            bar.update(1)
        if state.step % run.log_every == 0 or state.step == run.max_steps:
            log_metrics(state, record)
        if run.eval_every and state.step % run.eval_every == 0 and state.step < run.max_steps:
            state.last_eval = run_eval(state)
            state.objective.train()
        if run.save_every and state.step % run.save_every == 0:
            checkpoint(state)
        if run.export_every and state.step % run.export_every == 0:
            snapshot(state)
        for cb in callbacks:
            if hasattr(cb, "on_step_end"):
                cb.on_step_end(state.step, {"loss": record["loss"], "masked_ce": record["masked_ce"],
                                            "tokens": state.tokens_seen})
    if bar is not None:
        bar.close()
    if run.save_every and state.step % run.save_every != 0:
        checkpoint(state)
    state.last_eval = run_eval(state) or state.last_eval


def train_step(state: RunState, timed: bool = True) -> dict:
    """One optimizer step over run.grad_accum micro-batches of this rank's slice of the global batch."""
    run, dc, acc = state.cfg.run, state.cfg.diffusion, state.accelerator
    gas = acc.gradient_accumulation_steps
    ratio = anneal_ratio(state.step, dc.anneal_steps)
    block_length = step_mode(state.step, run.seed, dc.attention, dc.block_lengths, dc.block_fraction)
    t0 = time.perf_counter()
    step_loss = step_ce = 0.0
    for _ in range(gas):
        batch = _to_device(state.train_data.batch(state.sampler.next_indices(run.batch_size)), acc.device)
        with acc.accumulate(state.objective):
            loss, ce = state.objective(**batch, attention_mask_ratio=ratio, generator=state.noise,
                                       block_length=block_length)
            acc.backward(loss)
            if acc.sync_gradients and state.cfg.optim.grad_clip > 0:
                state.grad_norm = acc.clip_grad_norm_(state.objective.parameters(), state.cfg.optim.grad_clip)
            state.optimizer.step()
            if acc.sync_gradients:
                state.scheduler.step()
            state.optimizer.zero_grad(set_to_none=True)
        step_loss += float(loss.detach()) / gas
        step_ce += float(ce) / gas
    if acc.device.type == "cuda":
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    state.step += 1
    state.tokens_seen += state.tokens_per_step
    if timed:
        state.timed_tokens += state.tokens_per_step
        state.timed_seconds += dt
    state.window = [state.window[0] + step_loss, state.window[1] + step_ce, state.window[2] + 1]
    return {"loss": step_loss, "masked_ce": step_ce, "tokens_per_s": state.tokens_per_step / dt,
            "anneal_ratio": ratio, "block_length": block_length}


def log_metrics(state: RunState, record: dict) -> None:
    """One metrics line: the loss and masked CE averaged over the steps since the last line and over ranks."""
    acc = state.accelerator
    mean = acc.reduce(torch.tensor(state.window[:2], device=acc.device), reduction="mean") / state.window[2]
    if state.main:
        gn = float(state.grad_norm) if state.grad_norm is not None else None
        acc.log({"tokens": state.tokens_seen, "loss": float(mean[0]), "masked_ce": float(mean[1]),
                 "lr": state.scheduler.get_last_lr()[0], "grad_norm": gn, "anneal_ratio": record["anneal_ratio"],
                 "block_length": record["block_length"], "tokens_per_s": record["tokens_per_s"],
                 "epoch": state.sampler.epoch, "time": time.time()}, step=state.step)
    state.window = [0.0, 0.0, 0]


def run_eval(state: RunState) -> Optional[dict]:
    """The held-out evaluation on rank 0 (in a forked RNG, so it never changes the training's draws)."""
    run, dc = state.cfg.run, state.cfg.diffusion
    result = None
    if state.eval_data is not None and run.eval_batches > 0 and not state.sharded and state.main:
        block_length = run.eval_block_length or (None if dc.attention == "full" else int(dc.block_lengths[0]))
        unwrapped = state.accelerator.unwrap_model(state.objective).model
        with torch.random.fork_rng(devices=[]), state.accelerator.autocast():
            result = evaluate(unwrapped, state.eval_data, n_items=run.eval_batches * run.eval_batch_size,
                              batch_size=run.eval_batch_size, mask_ratios=run.eval_mask_ratios,
                              elbo_samples=run.eval_elbo_samples, block_length=block_length)
        unwrapped.train()
        state.accelerator.log({"tokens": state.tokens_seen, **result}, step=state.step)
        log.info("eval @ step %d: %s", state.step, ", ".join(f"{k[5:]}={v:.4g}" for k, v in result.items()
                                                             if isinstance(v, float)))
    state.accelerator.wait_for_everyone()
    return result


def checkpoint(state: RunState) -> None:
    saved = {"step": state.step, "tokens": state.tokens_seen, "sampler": state.sampler.state_dict(),
             "world_size": state.world, "task": state.task, "time": time.time()}
    rank_state = {"noise_rng": state.noise.get_state(),
                  "window": torch.tensor([state.window[0], state.window[1], float(state.window[2])],
                                         dtype=torch.float64)}
    path = save_checkpoint(state.accelerator, state.out, state.step, saved, rank_state, state.cfg.run.keep_last)
    log.info("checkpoint %s", path)


def snapshot(state: RunState) -> None:
    """OUTPUT_DIR/exports/step-N: the model as `finish` exports it, mid-run (run.export_every)."""
    if state.sharded:
        log.warning("run.export_every is skipped under ZeRO-3 / FSDP")
    elif state.main:
        model = state.accelerator.unwrap_model(state.objective).model
        path = state.out / "exports" / f"step-{state.step}"
        export(model, path, base_model=getattr(model, "source", state.cfg.model.source),
               training_info=_training_record(state))
        model.train()
        log.info("exported %s", path)
    state.accelerator.wait_for_everyone()


def finish(state: RunState) -> dict:
    """Export OUTPUT_DIR/final, compare the ranks' weights, write run_summary.json, tear accelerate down."""
    from accelerate.utils import gather_object
    acc, run = state.accelerator, state.cfg.run
    unwrapped = acc.unwrap_model(state.objective)
    full_state = acc.get_state_dict(state.objective) if state.sharded and run.export else None
    final_dir = state.out / "final"
    info = _training_record(state)
    if state.main and run.export:
        base_sd = None
        if full_state is not None:
            base_sd = {k[len("model.base."):]: v for k, v in full_state.items() if k.startswith("model.base.")}
        export(unwrapped.model, final_dir, base_model=getattr(unwrapped.model, "source", state.cfg.model.source),
               training_info=info, state_dict=base_sd)
        log.info("exported %s", final_dir)
    checksums = gather_object([trainable_checksum(unwrapped)]) if state.world > 1 and not state.sharded else []
    summary = {**info, "output_dir": str(state.out), "final_dir": str(final_dir) if run.export else None,
               "resumed_from": state.resumed_from,
               "tokens_per_s": state.timed_tokens / state.timed_seconds if state.timed_seconds > 0 else None,
               "timed_steps_tokens": state.timed_tokens, "timed_seconds": state.timed_seconds,
               "rank_checksums": checksums, "ranks_agree": all(c == checksums[0] for c in checksums),
               "last_eval": state.last_eval, "data_info": state.data_info, "mixed_precision": acc.mixed_precision,
               "dtype": state.cfg.model.dtype, "device": str(acc.device)}
    if state.main:
        (state.out / "run_summary.json").write_text(json.dumps(summary, indent=1))
    del unwrapped, full_state
    _teardown(state)
    if not summary["ranks_agree"]:
        raise RuntimeError("ranks finished with different weights: gradients were not synchronised "
                           "(a CPU launch needs Accelerator(cpu=True) and distributed_type MULTI_GPU)")
    return summary


def _training_record(state: RunState) -> dict:
    """How the weights were made: saved in the exported dlm_config.json and the run summary."""
    cfg, dc = state.cfg, state.cfg.diffusion
    return {"task": state.task, "steps": state.step, "tokens_seen": state.tokens_seen, "world_size": state.world,
            "objective": dc.objective, "attention": dc.attention, "block_lengths": list(dc.block_lengths),
            "block_fraction": dc.block_fraction, "clean_attention": dc.clean_attention, "ar_weight": dc.ar_weight,
            "distill_weight": dc.distill_weight, "draft_loss": dc.draft_loss, "reach": dc.reach,
            "full_mask": dc.full_mask, "row_gate": cfg.lora.row_gate, "anneal_steps": dc.anneal_steps,
            "weighting": dc.weighting,
            "shift": cfg.model.shift, "lora": cfg.lora.enabled,
            "base": cfg.model.source if not cfg.model.init else "random init", "seq_len": state.data_info["seq_len"],
            "data": [str(s) for s in cfg.data.sources], "skip_blocks": cfg.data.skip_blocks,
            "init_from": cfg.lora.init_from if cfg.lora.enabled else ""}


def _teardown(state: RunState) -> None:
    """A barrier and dropping the model before end_training avoids DDP/gloo exit hangs."""
    state.accelerator.wait_for_everyone()
    state.objective = state.model = state.optimizer = state.scheduler = None
    gc.collect()
    state.accelerator.end_training()
    if state.world > 1:
        import torch.distributed as dist
        if dist.is_initialized():
            dist.destroy_process_group()
    torch.set_num_threads(state.threads_before)  # do not leak the run's setting into a caller's process


__all__ = ["train", "setup", "resume", "loop", "train_step", "finish", "RunState", "anneal_ratio",
           "make_scheduler", "DataError"]
