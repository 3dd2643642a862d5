"""Helpers shared by test modules (imported as `helpers`; pytest puts tests/ on sys.path)."""
from __future__ import annotations

import contextlib
import time


@contextlib.contextmanager
def slow_model(backend, seconds_per_layer: float):
    """Make every transformer layer of the backend's loaded model sleep: a request then runs long enough to be
    cancelled or to hit a time limit."""
    import torch
    layers = [m for lst in backend.model.base.modules() if isinstance(lst, torch.nn.ModuleList) for m in lst]
    handles = [m.register_forward_pre_hook(lambda *a: time.sleep(seconds_per_layer)) for m in layers]
    try:
        yield
    finally:
        for h in handles:
            h.remove()
