"""Exponential moving average of model weights (Polyak averaging), as used by every stage's sampler.

ADM and unCLIP sample from EMA weights; with ``warmup`` the decay grows as (1 + n) / (10 + n) until it reaches
``decay``, so the average is not dominated by the random initialisation in short runs.
"""

from __future__ import annotations

import torch


class EMA:
    """Float32 shadow copies of a module's floating-point parameters and buffers."""

    def __init__(self, module: torch.nn.Module, decay: float, warmup: bool = True) -> None:
        self.decay = decay
        self.warmup = warmup
        self.num_updates = 0
        self.shadow = {
            k: v.detach().float().clone() for k, v in module.state_dict().items() if v.is_floating_point()
        }

    def current_decay(self) -> float:
        """The decay used by the next update."""
        if not self.warmup:
            return self.decay
        return min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))

    @torch.no_grad()
    def update(self, module: torch.nn.Module) -> None:
        """shadow <- d * shadow + (1 - d) * weights."""
        d = self.current_decay()
        state = module.state_dict()
        for key, shadow in self.shadow.items():
            shadow.lerp_(state[key].detach().float(), 1.0 - d)
        self.num_updates += 1

    @torch.no_grad()
    def copy_to(self, module: torch.nn.Module) -> None:
        """Write the averaged weights into ``module`` (same architecture)."""
        state = module.state_dict()
        for key, shadow in self.shadow.items():
            state[key].copy_(shadow.to(state[key].dtype))

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The shadow weights (the step count lives in the trainer's state)."""
        return dict(self.shadow)

    def load_state_dict(self, state: dict[str, torch.Tensor], num_updates: int) -> None:
        """Restore shadow weights saved by :meth:`state_dict`."""
        if set(state) != set(self.shadow):
            raise KeyError(f"EMA keys differ: {sorted(set(state) ^ set(self.shadow))[:5]}")
        for key, value in state.items():
            self.shadow[key].copy_(value)
        self.num_updates = num_updates
