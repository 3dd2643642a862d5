"""The training loop (paper Algorithm 1 for `pretrain`, the same loop with prompt-masked batches for `sft`).

One accelerate loop for every scale: a CPU process, `accelerate launch` with N processes (gloo on CPU, NCCL on
GPUs), DeepSpeed ZeRO-2/3 or FSDP from an accelerate config file. Per optimizer step:

    ratio = anneal_ratio(step, anneal_steps)                      # causal -> bidirectional (paper §3.2)
    for each of grad_accum micro-batches (this rank's slice of the global batch):
        loss = Eq. 7 on q_sample(x0, t ~ U(eps, 1))                # via DiffusionLM.diffusion_loss
        backward (gradients all-reduced on the last micro-batch)
    clip, AdamW, warmup+cosine LR
then, every N steps: metrics line, held-out eval, atomic checkpoint. At the end: export to OUTPUT_DIR/final.
"""
from __future__ import annotations

import gc
import json
import logging
import math
import time
from pathlib import Path
from typing import Optional, Sequence

import torch
from accelerate.tracking import GeneralTracker

from .checkpoint import (clean_stale_temp, list_checkpoints, load_checkpoint, resolve_candidates,
                         save_checkpoint)
from .config import ConfigError, TrainConfig, validate
from .data import BlockSampler, DataError, PackedBlocks, build_token_cache, expand_sources
from .evaluate import evaluate
from .modeling import Objective, build_model, export, trainable_summary

log = logging.getLogger("train")


# ----- schedules -------------------------------------------------------------------------------------------------------
def anneal_ratio(step: int, anneal_steps: int) -> float:
    """Attention-mask annealing ratio for optimizer step `step` (0-based): min(1, step / anneal_steps).

    Step 0 is exactly causal (the AR model's own attention); from `anneal_steps` on it is fully bidirectional.
    anneal_steps = 0 disables annealing (1.0 from the first step: the paper's "no annealing" ablation).
    """
    if anneal_steps <= 0:
        return 1.0
    return min(1.0, max(0, step) / anneal_steps)


def make_scheduler(optimizer, warmup_steps: int, max_steps: int, schedule: str = "cosine", min_lr_ratio: float = 0.1):
    """transformers' schedules: linear warmup over `warmup_steps`, then cosine from the base LR down to
    `min_lr_ratio` x it at `max_steps` (`get_cosine_with_min_lr_schedule_with_warmup`), or constant."""
    from transformers import get_constant_schedule_with_warmup, get_cosine_with_min_lr_schedule_with_warmup
    if schedule == "constant":
        return get_constant_schedule_with_warmup(optimizer, warmup_steps)
    return get_cosine_with_min_lr_schedule_with_warmup(optimizer, warmup_steps, max_steps, min_lr_rate=min_lr_ratio)


def step_mode(step: int, seed: int, attention: str, block_lengths, block_fraction: float) -> Optional[int]:
    """The attention mode of optimizer step `step`: None = full attention (the paper), else the block length of
    a block-diffusion step. A pure function of (seed, step), so a resumed run makes the same choices."""
    if attention == "full":
        return None
    import random
    rng = random.Random(seed * 1_000_003 + step)
    if attention == "mixture" and rng.random() >= block_fraction:
        return None
    return int(rng.choice(list(block_lengths)))


# ----- small helpers ----------------------------------------------------------------------------------------------------
def cpu_has_native_bf16() -> bool:
    """AMX or AVX512-BF16 in /proc/cpuinfo (Linux). Without them CPU bf16 matmuls are emulated and slower."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def resolve_mixed_precision(value: str) -> str:
    if value != "auto":
        return value
    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "bf16" if cpu_has_native_bf16() else "no"


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


def trainable_checksum(module) -> list[float]:
    """float64 sums of every trainable tensor, in name order: what gradient synchronisation keeps equal across
    ranks (compared once at the end of a multi-process run; one cheap reduction per tensor, no serialisation)."""
    return [float(p.detach().double().sum()) for _, p in sorted(module.named_parameters()) if p.requires_grad]


class JSONLTracker(GeneralTracker):
    """An accelerate tracker (the `GeneralTracker` interface) that appends one JSON line per `log` call to
    `OUTPUT_DIR/metrics.jsonl`: the run's curve, readable without TensorBoard. `truncate(step)` drops lines past a
    resumed step (they came from steps that are about to be recomputed)."""

    name, requires_logging_directory, main_process_only = "jsonl", False, True

    def __init__(self, path: Path):
        super().__init__(_blank=True)
        self.path = path

    @property
    def tracker(self):
        return self.path

    def start(self):
        pass

    def store_init_configuration(self, values: dict):
        pass

    def log(self, values: dict, step: Optional[int] = None, **kwargs):
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, **values}) + "\n")

    def finish(self):
        pass

    def truncate(self, resume_step: Optional[int]) -> None:
        if not self.path.is_file():
            return
        if resume_step is None:
            self.path.unlink()
            return
        kept = [line for line in self.path.read_text().splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= resume_step]
        self.path.write_text("".join(line + "\n" for line in kept))


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


# ----- the loop -----------------------------------------------------------------------------------------------------------
def train(cfg: TrainConfig, task: str = "pretrain", callbacks: Sequence = ()) -> dict:
    """Run (or resume) one training run; returns the run summary (also written to OUTPUT_DIR/run_summary.json).

    task:      "pretrain" (packed blocks, every token maskable) or "sft" (prompt never noised).
    callbacks: objects with an optional `on_step_end(step: int, record: dict)`, called after every optimizer step
               (the transformers TrainerCallback idea: progress bars, early stopping, fault injection).
    Every knob is in `cfg` (see train/config.py); this function only orchestrates.
    """
    if task not in ("pretrain", "sft"):
        raise ConfigError(f"task must be pretrain or sft, got {task!r}")
    validate(cfg, task)
    run, dc = cfg.run, cfg.diffusion
    out = Path(run.output_dir).expanduser()
    expand_sources(list(cfg.data.sources))  # fail fast on missing data, before any model is loaded
    if not run.resume and list_checkpoints(out):
        raise ConfigError(f"run.resume: {out} already has checkpoints; pass --resume auto to continue that run, "
                          "or choose another --output-dir")
    threads_before = torch.get_num_threads()
    if run.threads:
        torch.set_num_threads(run.threads)

    from accelerate.utils import gather_object, is_tensorboard_available, set_seed
    jsonl = JSONLTracker(out / "metrics.jsonl")
    trackers = [jsonl] + (["tensorboard"] if run.tensorboard and is_tensorboard_available() else [])
    accelerator = make_accelerator(cfg, trackers)
    main = accelerator.is_main_process
    if not main:
        log.setLevel(logging.WARNING)
    gas = accelerator.gradient_accumulation_steps
    if gas != run.grad_accum:
        log.warning("the accelerate config sets gradient accumulation to %d (run.grad_accum=%d): using %d",
                    gas, run.grad_accum, gas)
    if main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(cfg.to_yaml())
        clean_stale_temp(out)
    set_seed(run.seed)

    with accelerator.main_process_first():  # rank 0 materialises init models / token caches; the others reuse
        model = build_model(cfg, out / "init-model")
        train_data, eval_data, data_info = build_datasets(cfg, task, model.tokenizer, progress=main,
                                                          max_length=model.max_length)
    log.info("model %s: %s", model.name, trainable_summary(model))
    log.info("data: %s", json.dumps(data_info))

    objective = Objective(model, dc.objective, dc.weighting, dc.eps, dc.ar_weight, dc.distill_weight)
    optimizer = torch.optim.AdamW(_param_groups(objective, cfg.optim.weight_decay), lr=cfg.optim.lr,
                                  betas=(cfg.optim.beta1, cfg.optim.beta2), eps=cfg.optim.adam_eps)
    o = cfg.optim
    scheduler = make_scheduler(optimizer, o.warmup_steps, run.max_steps, o.schedule, o.min_lr_ratio)
    ds = getattr(accelerator.state, "deepspeed_plugin", None)
    if ds is not None:  # no dataloader is prepared, so tell DeepSpeed the micro-batch and clipping ourselves
        ds.deepspeed_config["train_micro_batch_size_per_gpu"] = run.batch_size
        if ds.deepspeed_config.get("gradient_clipping") == "auto":
            ds.deepspeed_config["gradient_clipping"] = o.grad_clip
    objective, optimizer, scheduler = accelerator.prepare(objective, optimizer, scheduler)
    sharded = _is_sharded(accelerator)

    world, rank = accelerator.num_processes, accelerator.process_index
    sampler = BlockSampler(len(train_data), cfg.data.seed, world, rank, start=cfg.data.skip_blocks)
    noise = torch.Generator(device="cpu").manual_seed(run.seed * 1_000_003 + 7919 * rank + 1)
    step, tokens_seen = 0, 0
    window = [0.0, 0.0, 0.0]  # loss / masked CE sums and step count since the last metrics line
    resumed_from = None
    if run.resume:
        candidates = resolve_candidates(run.resume, out)
        loaded = load_checkpoint(accelerator, candidates, warn=log.warning) if candidates else None
        if loaded is not None:
            state, rank_state = loaded
            if int(state.get("world_size", world)) != world:
                raise ConfigError(f"run.resume: {state['loaded_from']} was saved by {state['world_size']} processes, "
                                  f"this launch has {world}; resume with the same number of processes")
            noise.set_state(rank_state["noise_rng"])
            window = rank_state["window"].tolist()
            step, tokens_seen = int(state["step"]), int(state["tokens"])
            sampler.load_state_dict(state["sampler"])
            resumed_from = state["loaded_from"]
            log.info("resumed from step %d (%s)", step, resumed_from)
        elif run.resume != "auto":
            raise RuntimeError(f"--resume {run.resume}: no usable checkpoint")
        elif candidates:
            log.warning("no usable checkpoint in %s: starting from scratch", out)

    seq_len = data_info["seq_len"]
    tokens_per_step = run.batch_size * seq_len * gas * world
    if main:
        jsonl.truncate(step if resumed_from else None)
    accelerator.init_trackers("train")
    eval_block_length = run.eval_block_length or (None if dc.attention == "full" else int(dc.block_lengths[0]))
    can_eval = eval_data is not None and run.eval_batches > 0 and not sharded
    if eval_data is not None and sharded:
        log.warning("held-out evaluation is skipped under ZeRO-3 / FSDP (parameters are sharded)")

    def run_eval() -> Optional[dict]:
        result = None
        if can_eval and main:
            unwrapped = accelerator.unwrap_model(objective).model
            with torch.random.fork_rng(devices=[]), accelerator.autocast():
                result = evaluate(unwrapped, eval_data, n_items=run.eval_batches * run.eval_batch_size,
                                  batch_size=run.eval_batch_size, mask_ratios=run.eval_mask_ratios,
                                  elbo_samples=run.eval_elbo_samples,
                                  block_length=eval_block_length)
            unwrapped.train()
            accelerator.log({"tokens": tokens_seen, **result}, step=step)
            log.info("eval @ step %d: %s", step, ", ".join(f"{k[5:]}={v:.4g}" for k, v in result.items()
                                                           if isinstance(v, float)))
        accelerator.wait_for_everyone()
        return result

    def checkpoint() -> None:
        state = {"step": step, "tokens": tokens_seen, "sampler": sampler.state_dict(), "world_size": world,
                 "task": task, "time": time.time()}
        rank_state = {"noise_rng": noise.get_state(),
                      "window": torch.tensor([window_loss, window_ce, float(window_n)], dtype=torch.float64)}
        path = save_checkpoint(accelerator, out, step, state, rank_state, run.keep_last)
        log.info("checkpoint %s", path)

    last_eval = run_eval() if step == 0 else None
    objective.train()
    bar = None
    if main and run.progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=run.max_steps, initial=step, desc=task, unit="step", dynamic_ncols=True)
    timed_tokens, timed_seconds, first_step_done = 0, 0.0, False
    window_loss, window_ce, window_n = window[0], window[1], int(window[2])
    grad_norm = None
    while step < run.max_steps:
        ratio = anneal_ratio(step, dc.anneal_steps)
        block_length = step_mode(step, run.seed, dc.attention, dc.block_lengths, dc.block_fraction)
        t0 = time.perf_counter()
        step_loss = step_ce = 0.0
        for _ in range(gas):
            batch = _to_device(train_data.batch(sampler.next_indices(run.batch_size)), accelerator.device)
            with accelerator.accumulate(objective):
                loss, ce = objective(**batch, attention_mask_ratio=ratio, generator=noise, block_length=block_length)
                accelerator.backward(loss)
                if accelerator.sync_gradients and o.grad_clip > 0:
                    grad_norm = accelerator.clip_grad_norm_(objective.parameters(), o.grad_clip)
                optimizer.step()
                if accelerator.sync_gradients:
                    scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            step_loss += float(loss.detach()) / gas
            step_ce += float(ce) / gas
        if accelerator.device.type == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        step += 1
        tokens_seen += tokens_per_step
        if first_step_done:  # the first step pays for warm-up / compilation
            timed_tokens += tokens_per_step
            timed_seconds += dt
        first_step_done = True
        window_loss, window_ce, window_n = window_loss + step_loss, window_ce + step_ce, window_n + 1
        tok_s = tokens_per_step / dt
        if bar is not None:
            bar.set_postfix(loss=f"{step_loss:.3f}", tok_s=f"{tok_s:,.0f}", refresh=False)
            bar.update(1)

        if step % run.log_every == 0 or step == run.max_steps:
            mean = accelerator.reduce(torch.tensor([window_loss, window_ce], device=accelerator.device),
                                      reduction="mean") / window_n
            if main:
                gn = float(grad_norm) if grad_norm is not None else None
                accelerator.log({"tokens": tokens_seen, "loss": float(mean[0]),
                               "masked_ce": float(mean[1]), "lr": scheduler.get_last_lr()[0], "grad_norm": gn,
                               "anneal_ratio": ratio, "block_length": block_length, "tokens_per_s": tok_s,
                               "epoch": sampler.epoch,
                               "time": time.time()}, step=step)
            window_loss = window_ce = 0.0
            window_n = 0
        if run.eval_every and step % run.eval_every == 0 and step < run.max_steps:
            last_eval = run_eval()
            objective.train()
        if run.save_every and step % run.save_every == 0:
            checkpoint()
        for cb in callbacks:
            if hasattr(cb, "on_step_end"):
                cb.on_step_end(step, {"loss": step_loss, "masked_ce": step_ce, "tokens": tokens_seen})

    if bar is not None:
        bar.close()
    if not (run.save_every and step % run.save_every == 0) and run.save_every:
        checkpoint()
    last_eval = run_eval() or last_eval

    # ----- export + cross-rank check ------------------------------------------------------------------------------
    unwrapped = accelerator.unwrap_model(objective)
    full_state = accelerator.get_state_dict(objective) if sharded and run.export else None
    final_dir = out / "final"
    info = {"task": task, "steps": step, "tokens_seen": tokens_seen, "world_size": world,
            "objective": cfg.diffusion.objective, "attention": dc.attention, "block_lengths": list(dc.block_lengths),
            "block_fraction": dc.block_fraction, "clean_attention": dc.clean_attention, "ar_weight": dc.ar_weight,
            "distill_weight": dc.distill_weight,
            "anneal_steps": cfg.diffusion.anneal_steps,
            "weighting": cfg.diffusion.weighting, "shift": cfg.model.shift, "lora": cfg.lora.enabled,
            "base": cfg.model.source if not cfg.model.init else "random init", "seq_len": seq_len,
            "data": [str(s) for s in cfg.data.sources], "skip_blocks": cfg.data.skip_blocks,
            "init_from": cfg.lora.init_from if cfg.lora.enabled else ""}
    if main and run.export:
        base_sd = None
        if full_state is not None:
            base_sd = {k[len("model.base."):]: v for k, v in full_state.items() if k.startswith("model.base.")}
        export(unwrapped.model, final_dir, base_model=getattr(unwrapped.model, "source", cfg.model.source),
               training_info=info, state_dict=base_sd)
        log.info("exported %s", final_dir)
    checksums = gather_object([trainable_checksum(unwrapped)]) if world > 1 and not sharded else []
    summary = {**info, "output_dir": str(out), "final_dir": str(final_dir) if run.export else None,
               "resumed_from": resumed_from,
               "tokens_per_s": timed_tokens / timed_seconds if timed_seconds > 0 else None,
               "timed_steps_tokens": timed_tokens, "timed_seconds": timed_seconds,
               "rank_checksums": checksums, "ranks_agree": all(c == checksums[0] for c in checksums),
               "last_eval": last_eval, "data_info": data_info, "mixed_precision": accelerator.mixed_precision,
               "dtype": cfg.model.dtype, "device": str(accelerator.device)}
    if main:
        (out / "run_summary.json").write_text(json.dumps(summary, indent=1))

    # ----- teardown: a barrier and dropping the model before end_training avoids DDP/gloo exit hangs ---------------
    accelerator.wait_for_everyone()
    del objective, unwrapped, model, optimizer, scheduler, full_state
    gc.collect()
    accelerator.end_training()
    if world > 1:
        import torch.distributed as dist
        if dist.is_initialized():
            dist.destroy_process_group()
    torch.set_num_threads(threads_before)  # do not leak the run's setting into a caller's process
    if not summary["ranks_agree"]:
        raise RuntimeError("ranks finished with different weights: gradients were not synchronised "
                           "(a CPU launch needs Accelerator(cpu=True) and distributed_type MULTI_GPU)")
    return summary


__all__ = ["train", "anneal_ratio", "make_scheduler", "DataError"]
