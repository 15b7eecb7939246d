"""The learning-rate warm-up both backends use (linear, then constant)."""

from __future__ import annotations

import torch


def warmup_schedule(optimizer: torch.optim.Optimizer, warm: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up over optimizer updates, then constant: RL runs are short and every
    step matters, so no decay. Update u (from 0) runs at ``min(1, (u + 1) / warm)`` of the
    rate, so the first update already learns (HF's ``constant_with_warmup`` runs its first
    update at rate 0)."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda u: min(1.0, (u + 1) / warm) if warm > 0 else 1.0)
