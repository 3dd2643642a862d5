"""train: adapt a causal LM into a diffusion LM (continual pre-training, diffusion SFT) with accelerate.

    python -m train pretrain --config tiny-cpu --output-dir runs/tiny
    python -m train sft --config gsm8k-sft --output-dir runs/sft model.source=runs/tiny/final
    accelerate launch --config_file train/accelerate/cpu-2proc.yaml -m train pretrain --config tiny-cpu ...

See docs/training.md. `train` imports `dlm`; `dlm` never imports `train`.
"""
from .config import ConfigError, TrainConfig, load_config

__all__ = ["ConfigError", "TrainConfig", "load_config", "train"]


def train(cfg: TrainConfig, task: str = "pretrain") -> dict:
    """Run one training run (see `train.loop.train`)."""
    from .loop import train as _train
    return _train(cfg, task)
