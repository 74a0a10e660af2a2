"""A persistent 2-rank CPU (gloo) process group for DDP tests.

Spawning processes and importing torch + Lightning costs seconds per rank, so the pool starts
its worker processes once per test session and runs many scenarios on them. Each scenario is an
importable function ``fn(rank, *args) -> picklable``; it typically builds a
``Trainer(accelerator="cpu", devices=2, strategy="ddp")``. The workers look like torchelastic
workers to Lightning (the env vars below), so Lightning joins the existing process group instead
of launching new processes.
"""

from __future__ import annotations

import importlib
import os
import queue
import socket
import traceback
from typing import Any

import torch.multiprocessing as mp

WORLD_SIZE = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, tasks: Any, results: Any) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        GROUP_RANK="0",
        NODE_RANK="0",
        WORLD_SIZE=str(world_size),
        LOCAL_WORLD_SIZE=str(world_size),
        TORCHELASTIC_RUN_ID="lightning_reg_tests",
        PL_DISABLE_FORK="1",
        WANDB_MODE="offline",
    )
    import warnings

    warnings.filterwarnings("ignore")
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    while True:
        task = tasks.get()
        if task is None:
            break
        module_name, fn_name, args, kwargs = task
        try:
            fn = getattr(importlib.import_module(module_name), fn_name)
            results.put((rank, True, fn(rank, *args, **kwargs)))
        except BaseException:
            results.put((rank, False, traceback.format_exc()))
    dist.destroy_process_group()


class DDPPool:
    """Two CPU worker processes sharing one gloo process group."""

    def __init__(self, world_size: int = WORLD_SIZE) -> None:
        ctx = mp.get_context("spawn")
        self.world_size = world_size
        self.task_queues = [ctx.Queue() for _ in range(world_size)]
        self.results = ctx.Queue()
        port = _free_port()
        self.procs = [
            ctx.Process(
                target=_worker,
                args=(r, world_size, port, self.task_queues[r], self.results),
                daemon=True,
            )
            for r in range(world_size)
        ]
        for p in self.procs:
            p.start()

    def run(self, fn: Any, *args: Any, timeout: float = 300, **kwargs: Any) -> list[Any]:
        """Run ``fn(rank, *args, **kwargs)`` on every rank; return the results by rank."""
        for q in self.task_queues:
            q.put((fn.__module__, fn.__name__, args, kwargs))
        out: dict[int, Any] = {}
        errors = []
        for _ in range(self.world_size):
            try:
                # After one rank fails, the others are usually stuck in a collective.
                rank, ok, value = self.results.get(timeout=30 if errors else timeout)
            except queue.Empty:
                self._restart()
                waiting = sorted(set(range(self.world_size)) - set(out))
                errors.append(f"ranks {waiting}: no answer (hung), pool restarted")
                break
            if ok:
                out[rank] = value
            else:
                errors.append(f"rank {rank}:\n{value}")
        if errors:
            raise RuntimeError("DDP scenario failed\n" + "\n".join(errors))
        return [out[r] for r in range(self.world_size)]

    def _restart(self) -> None:
        for p in self.procs:
            p.kill()
        self.__init__(self.world_size)

    def close(self) -> None:
        for q in self.task_queues:
            q.put(None)
        for p in self.procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()


def ddp_trainer_kwargs() -> dict[str, Any]:
    """Trainer settings for a scenario running inside the pool."""
    return dict(accelerator="cpu", devices=WORLD_SIZE, strategy="ddp")
