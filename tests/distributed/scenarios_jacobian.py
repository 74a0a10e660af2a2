"""The 2-rank DDP scenario for ``JacobianPenaltyMixin`` (model: ``tests.helpers.models``)."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

from lightning_reg.jacobian import jacobian_penalty
from tests.helpers.ddp import ddp_trainer_kwargs
from tests.helpers.models import (
    MLP,
    JacobianClassifier,
    list_loader,
    param_hash,
    random_classification,
    tiny_trainer,
)


def fit_ddp_jacobian(rank: int, weight: float, lr: float):
    """One SGD step under 2-rank DDP with the exact penalty; also the single-process reference.

    The reference averages, over the batches that the two ranks trained on, the gradient of
    ``CE + weight·‖J‖_F²`` computed with ``torch.func`` on a copy of the initial model, and
    takes the same SGD step. Two wrong references (penalty gradient summed over ranks, or
    missing) show that the comparison can tell them apart.
    """
    torch.manual_seed(0)
    x, y = random_classification(32, seed=4)
    module = JacobianClassifier(weight, "exact", model=MLP(8, (16,), 3), lr=lr)
    initial = copy.deepcopy(module.model)
    trainer = tiny_trainer(max_steps=1, **ddp_trainer_kwargs())
    trainer.fit(module, list_loader(x, y, 8))

    # the batch each rank really trained on, from every rank
    batches: list = [None, None]
    torch.distributed.all_gather_object(batches, module.seen_batches[0])
    final = {n: p.detach() for n, p in module.model.named_parameters()}
    return {
        "hash": param_hash(module),
        "max_diff_to_reference": _diff_to_reference(initial, final, batches, weight, lr),
        "diff_if_penalty_summed": _diff_to_reference(initial, final, batches, weight, lr, 2.0),
        "diff_if_penalty_dropped": _diff_to_reference(initial, final, batches, weight, lr, 0.0),
        "penalty": _penalty(module.model, x[:8]),
    }


def _penalty(model, x):
    xt = x.clone().requires_grad_(True)
    return float(jacobian_penalty(xt, model(xt), n_projections="exact", create_graph=False))


def _diff_to_reference(initial, final, batches, weight, lr, penalty_factor=1.0) -> float:
    model = copy.deepcopy(initial)
    params = dict(model.named_parameters())
    grads = {n: torch.zeros_like(p) for n, p in params.items()}
    for xb, yb in batches:

        def objective(p, xb=xb, yb=yb):
            def f(inp):
                return torch.func.functional_call(model, p, (inp,))

            jac = torch.func.vmap(torch.func.jacrev(f))(xb)
            ce = F.cross_entropy(f(xb), yb)
            return ce + penalty_factor * weight * jac.pow(2).sum() / xb.shape[0]

        g = torch.func.grad(objective)({n: p.detach() for n, p in params.items()})
        for name in grads:
            grads[name] += g[name] / 2
    return max(
        float((final[n] - (p.detach() - lr * grads[n])).abs().max()) for n, p in params.items()
    )
