"""What changes with the optimizer step: the attention-mask annealing ratio, the learning rate, and whether the
step trains full attention or blocks (and of which length). Pure functions of the step, so a resumed run repeats
the uninterrupted one."""
from __future__ import annotations

from typing import Optional


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
