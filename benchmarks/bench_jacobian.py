"""Jacobian regularization: the cost of a training step, against a plain step and other codes.

Two small MLP classifiers with 10 classes, SGD, one full training step each: a digits-sized one
(64 -> 256 -> 256 -> 10, batch 128), where fixed per-op costs dominate, and an MNIST-sized one
(784 -> 512 -> 512 -> 10, batch 256), where the matrix products dominate:

* plain: cross-entropy only;
* ours, one projection: ``CE + λ·jacobian_penalty(x, logits)``;
* ours, exact: ``n_projections="exact"`` (one vjp per class: 10 here);
* Hoffman et al.'s reference ``JacobianReg`` (facebookresearch/jacobian_regularizer), the algorithm
  other code uses for random projections, written out below;
* exact with ``torch.func.vmap(torch.func.jacrev(model))``, the usual exact alternative.

Memory: the bytes of the tensors autograd saves for backward (unique storages, parameters
excluded), all alive when the backward starts, which is the peak of a step's activation memory
on CPU: the double-backward graph of the penalty adds to the forward's.

Why one projection costs more than 2x a plain step: a plain step never differentiates w.r.t. the
input, so it skips the product through the first (widest) layer; the penalty needs that product
and its double backward (three first-layer-sized products instead of two), plus one backward
through the vjp graph of every other layer. Measured with one thread (the machine is shared).

Run: ``python -m benchmarks.bench_jacobian``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.common import Row, format_table, interleaved_ms
from lightning_reg.jacobian import jacobian_penalty

WEIGHT = 0.01


CONFIGS = {"digits": (128, 64, 256), "mnist": (256, 784, 512)}  # batch, inputs, hidden


def _model(d_in: int = 64, hidden: int = 256) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(d_in, hidden),
        nn.ReLU(),
        nn.Linear(hidden, hidden),
        nn.ReLU(),
        nn.Linear(hidden, 10),
    )


def hoffman_jacobian_reg(x: torch.Tensor, y: torch.Tensor, n_proj: int = 1) -> torch.Tensor:
    """``JacobianReg.forward`` of facebookresearch/jacobian_regularizer (returns ½·‖J‖_F²)."""
    batch, classes = y.shape
    j2 = 0.0
    for _ in range(n_proj):
        v = torch.normal(0.0, 1.0, size=(batch, classes))
        v = v / v.norm(dim=1, keepdim=True)
        (jv,) = torch.autograd.grad(y, x, v, retain_graph=True, create_graph=True)
        j2 = j2 + classes * jv.norm() ** 2 / (n_proj * batch)
    return 0.5 * j2


def _penalty_fns(model: nn.Module):
    def plain(x, y):
        return F.cross_entropy(model(x), y)

    def ours(n):
        def loss(x, y):
            x = x.detach().requires_grad_(True)
            logits = model(x)
            return F.cross_entropy(logits, y) + WEIGHT * jacobian_penalty(
                x, logits, n_projections=n
            )

        return loss

    def hoffman(x, y):
        x = x.detach().requires_grad_(True)
        logits = model(x)
        return F.cross_entropy(logits, y) + WEIGHT * 2 * hoffman_jacobian_reg(x, logits)

    def functorch_exact(x, y):
        jac = torch.func.vmap(torch.func.jacrev(model))(x)
        return F.cross_entropy(model(x), y) + WEIGHT * jac.pow(2).sum() / x.shape[0]

    return {
        "plain": plain,
        "one": ours(1),
        "exact": ours("exact"),
        "hoffman": hoffman,
        "functorch": functorch_exact,
    }


def _step_fn(model, opt, loss_fn, x, y):
    def step():
        opt.zero_grad(set_to_none=True)
        loss_fn(x, y).backward()
        opt.step()

    return step


def saved_tensor_bytes(model: nn.Module, loss_fn, x, y) -> int:
    """Bytes of the unique storages autograd saves for backward (parameters excluded)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = loss_fn(x, y)
    total = sum(seen.values())
    loss.backward()
    model.zero_grad(set_to_none=True)
    return total


def run(quick: bool = False) -> list[Row]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _run(quick)
    finally:
        torch.set_num_threads(threads)


def _run(quick: bool) -> list[Row]:
    rows: list[Row] = []
    for name, (batch, d_in, hidden) in CONFIGS.items():
        rows += _run_config(name, batch, d_in, hidden, quick)
    return rows


def _run_config(name: str, batch: int, d_in: int, hidden: int, quick: bool) -> list[Row]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, d_in, generator=g)
    y = torch.randint(0, 10, (batch,), generator=g)
    model = _model(d_in, hidden)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    fns = _penalty_fns(model)
    steps = {key: _step_fn(model, opt, fn, x, y) for key, fn in fns.items()}
    repeats = 3 if quick else (30 if name == "digits" else 10)
    ms = interleaved_ms(steps, repeats=repeats, warmup=1 if quick else 2)
    mem = {key: saved_tensor_bytes(model, fns[key], x, y) / 1024 for key in ("plain", "one")}
    tag = f"jacobian/{name} {d_in}-{hidden}-{hidden}-10 B={batch}"
    return [
        Row(tag, "1 projection", "plain step", ms["one"], ms["plain"], "overhead", "<= 2.5x"),
        Row(tag, "exact (10 vjps)", "1 projection", ms["exact"], ms["one"], "overhead", ">= 4x"),
        Row(tag, "1 projection", "Hoffman JacobianReg", ms["one"], ms["hoffman"], "speedup", "~1x"),
        Row(tag, "exact (10 vjps)", "vmap(jacrev)", ms["exact"], ms["functorch"], "speedup", ""),
        Row(
            tag,
            "1 projection (KiB saved)",
            "plain step (KiB saved)",
            mem["one"],
            mem["plain"],
            kind="memory",
            target="<= 2.5x",
            note="bytes autograd saves for backward, parameters excluded",
        ),
    ]


if __name__ == "__main__":
    print(format_table(run()))
