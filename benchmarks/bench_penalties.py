"""Weight penalties and max-norm on a transformer encoder with >= 100 parameter tensors (CPU).

Rows:
* coupled L2: the added work per step of our foreach gradient term against the common
  alternative, ``loss + λ/2·Σ p.pow(2).sum()`` in ``training_step`` (its forward and backward);
* the whole training step with the L2 term against a plain step (overhead, target <= 1.05x);
* max-norm projection: foreach/stacked against a per-parameter Python loop, and the whole step
  with projection against a plain step (overhead, target <= 1.05x);
* issue 12's configuration: ``MaxNormCallback`` itself (its optimizer post-hook, including the
  per-step check of what is trainable) on a 10-layer ``nn.TransformerEncoder`` (d=64, batch
  8×16 tokens) against a plain step (overhead, target <= 1.05x).

The step is a raw loop (forward, backward, hook, ``Adam.step``) so Lightning's own per-step
overhead does not dilute the ratios.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
from torch import nn

from benchmarks.common import Row, format_table, interleaved_ms
from lightning_reg.core.params import ParamSelection
from lightning_reg.max_norm import MaxNormCallback, max_norm_
from lightning_reg.penalties import add_penalty_grad_


class Encoder(nn.Module):
    def __init__(self, layers: int = 9, width: int = 128) -> None:
        super().__init__()
        layer = nn.TransformerEncoderLayer(width, 4, 2 * width, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(width, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x).mean(1))


def _setup(quick: bool):
    torch.manual_seed(0)
    model = Encoder(layers=9)
    n_tensors = len(list(model.parameters()))
    assert n_tensors >= 100, n_tensors
    x = torch.randn(16 if quick else 32, 16, 128)
    y = torch.randint(0, 10, (x.shape[0],))
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    return model, x, y, opt, n_tensors


def run(quick: bool = False) -> list[Row]:
    model, x, y, opt, n_tensors = _setup(quick)
    lam = 1e-4
    all_params = list(model.parameters())
    weights = ParamSelection("weights").parameters(model)
    repeats = 10 if quick else 30

    def step(extra=None, hook=None, after=None):
        opt.zero_grad(set_to_none=True)
        loss = nn.functional.cross_entropy(model(x), y)
        if extra is not None:
            loss = loss + extra()
        loss.backward()
        if hook is not None:
            hook()
        opt.step()
        if after is not None:
            after()

    def alt_term():
        return lam / 2 * sum(p.pow(2).sum() for p in all_params)

    def ours_hook():
        add_penalty_grad_(all_params, l2=lam)

    # Isolated added work: our gradient term vs the loss term's forward + backward.
    loss = nn.functional.cross_entropy(model(x), y)
    loss.backward()

    def ours_added():
        add_penalty_grad_(all_params, l2=lam)

    def alt_added():
        alt_term().backward()

    added = interleaved_ms({"ours": ours_added, "alt": alt_added}, repeats=repeats * 3)
    rows = [
        Row(
            f"L2 added time/step ({n_tensors} tensors)",
            "foreach grad += λw",
            "loss += λ/2·Σp² (fwd+bwd)",
            added["ours"],
            added["alt"],
            target=">= 10x",
        )
    ]

    radius = 1.0
    for p in weights:  # start with some units outside the ball
        with torch.no_grad():
            p.mul_(3.0)

    def loop_projection():
        with torch.no_grad():
            for p in weights:
                norms = p.flatten(1).norm(dim=1).view(-1, *([1] * (p.ndim - 1)))
                p.mul_(torch.clamp(radius / norms, max=1.0))

    def ours_projection():
        max_norm_(weights, radius)

    proj = interleaved_ms({"ours": ours_projection, "loop": loop_projection}, repeats=repeats * 3)
    rows.append(
        Row(
            f"max-norm projection ({len(weights)} weights)",
            "batched norms + foreach",
            "per-parameter loop",
            proj["ours"],
            proj["loop"],
            target="> 1x",
        )
    )

    steps = interleaved_ms(
        {
            "plain": lambda: step(),
            "l2": lambda: step(hook=ours_hook),
            "alt": lambda: step(extra=alt_term),
            "max_norm": lambda: step(after=ours_projection),
        },
        repeats=repeats,
    )
    rows += [
        Row(
            "L2Callback whole step",
            "step + foreach L2",
            "plain step",
            steps["l2"],
            steps["plain"],
            kind="overhead",
            target="<= 1.05x",
        ),
        Row(
            "loss-term L2 whole step",
            "step + λ/2·Σp² in loss",
            "plain step",
            steps["alt"],
            steps["plain"],
            kind="overhead",
            target="(reference)",
        ),
        Row(
            "MaxNormCallback whole step",
            "step + projection",
            "plain step",
            steps["max_norm"],
            steps["plain"],
            kind="overhead",
            target="<= 1.05x",
        ),
    ]
    rows.append(_callback_row(repeats))
    return rows


def _callback_row(repeats: int) -> Row:
    """The real callback's hook on issue 12's model: 10 layers, d=64, batch 8×16 tokens."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(64, 4, 128, dropout=0.0, batch_first=True)
    model = nn.TransformerEncoder(layer, 10, enable_nested_tensor=False)
    x = torch.randn(8, 16, 64)
    plain_opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    hooked_opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    callback = MaxNormCallback(1.0)
    callback.on_fit_start(SimpleNamespace(strategy=None, optimizers=[hooked_opt]), model)

    def step(opt: torch.optim.Optimizer) -> None:
        opt.zero_grad(set_to_none=True)
        model(x).square().mean().backward()
        opt.step()

    steps = interleaved_ms(
        {"plain": lambda: step(plain_opt), "hooked": lambda: step(hooked_opt)},
        repeats=repeats * 2,
    )
    callback.teardown(None, model, "fit")  # type: ignore[arg-type]
    return Row(
        "MaxNormCallback whole step (10-layer d=64 encoder, 8×16 tokens)",
        "step + callback hook",
        "plain step",
        steps["hooked"],
        steps["plain"],
        kind="overhead",
        target="<= 1.05x",
    )


if __name__ == "__main__":
    torch.set_num_threads(2)
    print(format_table(run()))
