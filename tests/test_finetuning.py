"""Fine-tuning: parameters that become trainable mid-fit are regularized from that step on.

Lightning's own ``BackboneFinetuning(unfreeze_backbone_at_epoch=1)`` freezes ``backbone`` at
setup, then at epoch 1 sets ``requires_grad`` and adds a param group (``add_param_group``). A
spy replays every step of the backbone on an independent reference: a fresh torch optimizer
(``SGD(weight_decay=λ)``, ``AdamW(weight_decay=λ)``) fed the raw gradients, followed by the
proximal step or the max-norm projection written out by hand.
"""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch.callbacks import BackboneFinetuning, Callback
from torch import nn

from lightning_reg import (
    ElasticNetCallback,
    L1Callback,
    L2Callback,
    MaxNormCallback,
    RegularizationMonitorCallback,
)
from tests.helpers.models import ClassifierModule, list_loader, random_classification, tiny_trainer

L1, L2, RADIUS = 0.05, 0.5, 0.8


class BackboneModel(ClassifierModule):
    """A classifier with a ``backbone`` (what ``BackboneFinetuning`` looks for) and a head."""

    def __init__(self, optimizer: str) -> None:
        torch.manual_seed(0)
        super().__init__(nn.Sequential(), lr=0.5, optimizer=optimizer)
        self.backbone = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh())
        self.head = nn.Linear(16, 3)
        with torch.no_grad():  # units well outside the max-norm ball
            for p in self.backbone.parameters():
                p.mul_(4.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))

    def configure_optimizers(self):
        trainable = [p for p in self.parameters() if p.requires_grad]
        if self.optimizer_name == "adam":
            return torch.optim.Adam(trainable, lr=self.lr)
        return torch.optim.SGD(trainable, lr=self.lr)


def _soft_threshold(w: torch.Tensor, t: float) -> torch.Tensor:
    return torch.sign(w) * torch.clamp(w.abs() - t, min=0.0)


def _project(w: torch.Tensor) -> torch.Tensor:
    if w.ndim < 2:
        return w
    norms = w.norm(dim=1, keepdim=True)
    return torch.where(norms > RADIUS, w * (RADIUS / norms), w)


# name: (callback, module optimizer, reference optimizer class and kwargs, grad term, post-step)
CASES = {
    "l2": (lambda: L2Callback(L2), "sgd", (torch.optim.SGD, {"weight_decay": L2}), None, None),
    "l2_decoupled": (
        lambda: L2Callback(L2, decoupled=True),
        "adam",
        (torch.optim.AdamW, {"weight_decay": L2}),
        None,
        None,
    ),
    "l1": (lambda: L1Callback(L1), "sgd", (torch.optim.SGD, {}), lambda w: L1 * w.sign(), None),
    "l1_proximal": (
        lambda: L1Callback(L1, proximal=True),
        "sgd",
        (torch.optim.SGD, {}),
        None,
        lambda w, lr: _soft_threshold(w, lr * L1),
    ),
    "elastic_net": (
        lambda: ElasticNetCallback(L1, L2),
        "sgd",
        (torch.optim.SGD, {"weight_decay": L2}),
        lambda w: L1 * w.sign(),
        None,
    ),
    "max_norm": (
        lambda: MaxNormCallback(RADIUS),
        "sgd",
        (torch.optim.SGD, {}),
        None,
        lambda w, lr: _project(w),
    ),
}


class ReplayBackbone(Callback):
    """Replays each real step of the backbone's weights (ndim >= 2) on a reference optimizer."""

    def __init__(self, reference, grad_term, post) -> None:
        self.reference, self.grad_term, self.post = reference, grad_term, post
        self.shadow: list[torch.Tensor] | None = None
        self.opt: torch.optim.Optimizer | None = None
        self.checked_steps = 0
        self.frozen_steps = 0

    def _weights(self, pl_module):
        return [p for p in pl_module.backbone.parameters() if p.ndim >= 2]

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.before = [p.detach().clone() for p in self._weights(pl_module)]

    def on_after_backward(self, trainer, pl_module):
        self.grads = [None if p.grad is None else p.grad.clone() for p in self._weights(pl_module)]

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        weights = self._weights(pl_module)
        if not weights[0].requires_grad:
            self.frozen_steps += 1
            for p, b in zip(weights, self.before):
                assert torch.equal(p, b), "a frozen backbone weight changed"
            return
        (optimizer,) = trainer.optimizers
        (lr,) = {
            g["lr"] for g in optimizer.param_groups if any(p is weights[0] for p in g["params"])
        }
        if self.shadow is None:  # the step the backbone is unfrozen: a fresh reference
            self.shadow = [b.clone().requires_grad_() for b in self.before]
            cls, kwargs = self.reference
            self.opt = cls(self.shadow, lr=lr, **kwargs)
        with torch.no_grad():
            for s, b, g in zip(self.shadow, self.before, self.grads):
                s.copy_(b)
                s.grad = g + (self.grad_term(b) if self.grad_term else 0.0)
        self.opt.param_groups[0]["lr"] = lr
        self.opt.step()
        for s, p in zip(self.shadow, weights):
            expected = self.post(s.detach(), lr) if self.post else s.detach()
            torch.testing.assert_close(p.detach(), expected, rtol=1e-5, atol=1e-6)
        self.checked_steps += 1


def _fit(callbacks, optimizer):
    model = BackboneModel(optimizer)
    x, y = random_classification(32, seed=1)
    trainer = tiny_trainer(
        max_epochs=2,
        callbacks=[BackboneFinetuning(unfreeze_backbone_at_epoch=1), *callbacks],
    )
    trainer.fit(model, list_loader(x, y, batch_size=8))
    return model


@pytest.mark.parametrize("case", list(CASES))
def test_each_regularizer_acts_on_the_backbone_from_the_step_it_is_unfrozen(case):
    make, optimizer, reference, grad_term, post = CASES[case]
    replay = ReplayBackbone(reference, grad_term, post)
    model = _fit([make(), replay], optimizer)
    assert replay.frozen_steps == 4 and replay.checked_steps == 4
    if case == "max_norm":
        norms = torch.cat([p.detach().norm(dim=1) for p in replay._weights(model)])
        assert norms.max() <= RADIUS * (1 + 1e-6)


def test_monitor_reports_the_backbone_once_it_is_trainable(tmp_path):
    from lightning.pytorch.loggers import CSVLogger

    seen: list[set[str]] = []

    class Record(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            seen.append(set(monitor.last_metrics))

    monitor = RegularizationMonitorCallback(every_n_steps=1, gap_metrics=())
    model = BackboneModel("sgd")
    x, y = random_classification(32, seed=1)
    tiny_trainer(
        max_epochs=2,
        logger=CSVLogger(tmp_path),
        callbacks=[BackboneFinetuning(unfreeze_backbone_at_epoch=1), monitor, Record()],
    ).fit(model, list_loader(x, y, batch_size=8))
    key = "reg/monitor/norm/backbone.0"
    assert not any(key in keys for keys in seen[:4])  # frozen: not selected
    assert all(key in keys for keys in seen[5:])
    expected = model.backbone[0].weight.detach().norm().item()
    assert monitor.last_metrics[key] == pytest.approx(expected, rel=1e-6)


def test_param_group_added_by_hand_is_regularized_from_the_next_step():
    """A module and its param group added mid-fit (``add_param_group``) are soft-thresholded."""
    extra = nn.Linear(4, 4)

    class AddGroup(Callback):
        def on_train_epoch_start(self, trainer, pl_module):
            if trainer.current_epoch == 1:
                pl_module.extra = extra
                trainer.optimizers[0].add_param_group({"params": [extra.weight], "lr": 0.1})

    before = extra.weight.detach().clone()
    model = ClassifierModule(nn.Sequential(nn.Linear(8, 3)), lr=0.1)
    x, y = random_classification(16, seed=2)
    tiny_trainer(max_epochs=2, callbacks=[AddGroup(), L1Callback(0.5, proximal=True)]).fit(
        model, list_loader(x, y, batch_size=8)
    )
    # no gradient reaches `extra`: only the proximal step moves it, lr·λ = 0.05 per step, twice
    torch.testing.assert_close(extra.weight.detach(), _soft_threshold(before, 2 * 0.05))
