"""One seeded, resumable, rank-aware per-step random stream for callbacks.

Step ``n`` on rank ``r`` draws from a ``torch.Generator`` seeded with ``splitmix(seed, salt, r,
n)``: reproducible under ``seed_everything``, different on every rank (or the same on every rank
with ``per_rank=False``), and resumed exactly because only ``(seed, counter)`` is state.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import lightning.pytorch as pl
import torch

from lightning_reg.core.validation import check_int

_MASK64 = (1 << 64) - 1


def mix_seed(*values: int) -> int:
    """splitmix64 over ``values``: a fixed, platform-independent 63-bit seed."""
    h = 0
    for v in values:
        h = ((h ^ (v & _MASK64)) + 0x9E3779B97F4A7C15) & _MASK64
        h = ((h ^ (h >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        h = ((h ^ (h >> 27)) * 0x94D049BB133111EB) & _MASK64
        h ^= h >> 31
    return h & ((1 << 63) - 1)


@contextlib.contextmanager
def seeded_global_rng(seed: int, device: torch.device) -> Iterator[None]:
    """Run the body with the global torch RNG (CPU and ``device``) seeded, then restore it."""
    module = torch.get_device_module(device)
    index = device.index if device.index is not None else module.current_device()
    devices = [] if device.type == "cpu" else [index]
    with torch.random.fork_rng(devices=devices, device_type=device.type):
        torch.random.default_generator.manual_seed(seed)
        for index in devices:
            with module.device(index):
                module.manual_seed(seed)
        yield


class CallbackRNG:
    """A callback's own random stream: per step, per DDP rank, reproducible and resumable.

    Step ``n`` on rank ``r`` draws from a ``torch.Generator`` on the batch's device seeded with
    ``hash(seed, r, n)``. ``seed`` defaults to ``torch.initial_seed()`` at ``setup`` (so
    ``seed_everything`` makes runs reproducible), the rank makes ranks differ, and the counter
    ``n`` is checkpointed, so a resumed run continues with exactly the draws the uninterrupted
    run would have made. Re-seeding costs microseconds and no device sync.

    With ``per_rank=False`` every rank draws the same stream (rank 0's seed is broadcast at
    ``setup``): use it for decisions all ranks must share, such as dropping a whole block.
    """

    def __init__(self, seed: int | None = None, salt: int = 0, *, per_rank: bool = True) -> None:
        self.user_seed = None if seed is None else check_int("seed", seed)
        self.salt = salt
        self.per_rank = per_rank
        self.seed: int | None = self.user_seed
        self.counter = 0
        self.rank = 0
        self._generator: torch.Generator | None = None

    def setup(self, trainer: pl.Trainer) -> None:
        """Start a fresh stream for this run (a later checkpoint restore overrides it)."""
        seed = torch.initial_seed() if self.user_seed is None else self.user_seed
        self.seed = seed if self.per_rank else int(trainer.strategy.broadcast(seed, src=0))
        self.rank = int(trainer.global_rank) if self.per_rank else 0
        self.counter = 0

    def next(self, device: torch.device) -> tuple[torch.Generator, int]:
        """The generator for the next step (on ``device``) and its integer seed."""
        if self.seed is None:
            self.seed = torch.initial_seed()
        step_seed = mix_seed(self.seed, self.salt, self.rank, self.counter)
        self.counter += 1
        if self._generator is None or self._generator.device != device:
            self._generator = torch.Generator(device=device)
        return self._generator.manual_seed(step_seed), step_seed

    def state_dict(self) -> dict[str, Any]:
        return {"seed": self.seed, "counter": self.counter}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.seed = state["seed"]
        self.counter = int(state["counter"])
