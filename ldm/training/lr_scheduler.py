"""Learning-rate schedules named by the original training configs (CV ``ldm/lr_scheduler.py``).

Each scheduler is a callable ``step -> multiplier`` of the base learning rate, used through
``torch.optim.lr_scheduler.LambdaLR`` (called once per optimizer step, ``interval: step``).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from ldm.errors import SdgenError


class LambdaLinearScheduler:
    """Linear warm-up then linear decay, in cycles (CV ``LambdaLinearScheduler``; SD 1.x used one cycle).

    Args:
        warm_up_steps: steps of each cycle's warm-up from ``f_start`` to ``f_max``.
        f_min, f_max, f_start: multipliers of the base learning rate (one per cycle).
        cycle_lengths: steps per cycle; after warm-up the multiplier goes linearly from ``f_max`` to ``f_min``
            at the end of the cycle. Steps past the last cycle keep the last cycle's end value.
        verbosity_interval: ignored (the original printed the multiplier every that many steps).
    """

    def __init__(
        self,
        warm_up_steps: Sequence[int],
        f_min: Sequence[float],
        f_max: Sequence[float],
        f_start: Sequence[float],
        cycle_lengths: Sequence[int],
        verbosity_interval: int = 0,
    ) -> None:
        lists = [list(v) for v in (warm_up_steps, f_min, f_max, f_start, cycle_lengths)]
        if len({len(v) for v in lists}) != 1 or not lists[0]:
            raise SdgenError("LambdaLinearScheduler: warm_up_steps, f_min, f_max, f_start and cycle_lengths "
                             "must be non-empty lists of the same length")
        self.warm_up_steps, self.f_min, self.f_max, self.f_start, self.cycle_lengths = lists
        self.cum_cycles = np.cumsum([0] + self.cycle_lengths)

    def find_in_interval(self, n: int) -> int:
        """Index of the cycle that step ``n`` falls in (the last one past the end)."""
        for cycle, end in enumerate(self.cum_cycles[1:]):
            if n < end:
                return cycle
        return len(self.cycle_lengths) - 1

    def __call__(self, n: int) -> float:
        cycle = self.find_in_interval(n)
        n = min(n - int(self.cum_cycles[cycle]), self.cycle_lengths[cycle])
        warm = self.warm_up_steps[cycle]
        if n < warm:
            return float(self.f_start[cycle] + (self.f_max[cycle] - self.f_start[cycle]) / max(warm, 1) * n)
        span = max(self.cycle_lengths[cycle] - warm, 1)
        return float(self.f_min[cycle] + (self.f_max[cycle] - self.f_min[cycle]) * (self.cycle_lengths[cycle] - n) / span)


class LambdaWarmUpCosineScheduler:
    """Linear warm-up to ``lr_max`` then cosine decay to ``lr_min`` at ``max_decay_steps`` (CV, one cycle).

    Returns multipliers of the base learning rate, so ``lr_*`` are multipliers too (as in the original).
    """

    def __init__(self, warm_up_steps: int, lr_min: float, lr_max: float, lr_start: float, max_decay_steps: int,
                 verbosity_interval: int = 0) -> None:
        self.warm_up_steps = int(warm_up_steps)
        self.lr_min, self.lr_max, self.lr_start = float(lr_min), float(lr_max), float(lr_start)
        self.max_decay_steps = int(max_decay_steps)

    def __call__(self, n: int) -> float:
        if n < self.warm_up_steps:
            return self.lr_start + (self.lr_max - self.lr_start) / max(self.warm_up_steps, 1) * n
        t = min((n - self.warm_up_steps) / max(self.max_decay_steps - self.warm_up_steps, 1), 1.0)
        return self.lr_min + 0.5 * (self.lr_max - self.lr_min) * (1 + np.cos(t * np.pi))
