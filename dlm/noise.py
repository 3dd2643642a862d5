"""The forward (noising) process: absorbing-state [MASK] diffusion with a linear schedule.

At time t in (0, 1] every maskable token of x0 is independently replaced by [MASK] with probability t
(paper Eq. 4 with alpha_t = 1 - t). There is no time embedding: the model infers t from the number of masks.
"""
from __future__ import annotations

from typing import Optional

import torch


def sample_t(batch_size: int, eps: float = 1e-3, *, generator: Optional[torch.Generator] = None,
             device=None) -> torch.Tensor:
    """t ~ U(eps, 1) per sequence -> [B]. `eps` keeps 1/t bounded (paper Algorithm 1)."""
    u = torch.rand(batch_size, generator=generator, device=generator.device if generator is not None else device)
    return (eps + (1.0 - eps) * u).to(device) if device is not None else eps + (1.0 - eps) * u


def q_sample(x0: torch.Tensor, t: torch.Tensor, mask_token_id: int, maskable: Optional[torch.Tensor] = None,
             *, generator: Optional[torch.Generator] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Corrupt clean tokens: each maskable token becomes `mask_token_id` with probability t.

    x0:       [B, L] clean token ids.
    t:        [B] (or scalar) masking probability per sequence, or [B, L] per token (block diffusion: one t per
              block), in [0, 1].
    maskable: [B, L] bool, positions that may be masked (None = all). Prompts / padding / the start token are not.
    Returns (x_t [B, L], masked [B, L] bool). `masked` is the ground truth of which positions were noised: callers
    must use it, never `x_t == mask_token_id`, because the mask id can occur in clean text (DiffuLLaMA issue #11).
    """
    t = torch.as_tensor(t, dtype=torch.float32, device=x0.device)
    if t.dim() == 0:
        t = t.expand(x0.shape[0])
    gen_device = generator.device if generator is not None else x0.device
    u = torch.rand(x0.shape, generator=generator, device=gen_device).to(x0.device)
    masked = u < (t[:, None] if t.dim() == 1 else t)
    if maskable is not None:
        masked &= maskable.bool()
    x_t = torch.where(masked, torch.full_like(x0, mask_token_id), x0)
    return x_t, masked


def seeded_generator(seed: Optional[int], device="cpu") -> torch.Generator:
    """A torch.Generator on `device` seeded with `seed` (fresh OS entropy when None). Scores use a CPU generator,
    so a seed gives the same masks on any device; samplers use the model's device."""
    gen = torch.Generator(device=torch.device(device))
    if seed is None:
        gen.seed()
    else:
        gen.manual_seed(int(seed))
    return gen
