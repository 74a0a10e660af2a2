from __future__ import annotations

import math
from types import SimpleNamespace

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.func import jacrev, vmap

from lightning_reg.jacobian import (
    InputGradientPenaltyMixin,
    JacobianPenaltyMixin,
    input_gradient_penalty,
    jacobian_penalty,
)
from tests.distributed.scenarios_jacobian import fit_ddp_jacobian
from tests.helpers.models import (
    MLP,
    ClassifierModule,
    JacobianClassifier,
    list_loader,
    random_classification,
    tiny_trainer,
)


def _net(d_in: int, c: int, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(d_in, 12), torch.nn.Tanh(), torch.nn.Linear(12, c)
    ).double()


def _exact_reference(model, x):
    jac = vmap(jacrev(model))(x.detach())  # (B, C, *input_shape)
    return jac.pow(2).sum().detach() / x.shape[0]


# --------------------------------------------------------------------------- the function


@settings(max_examples=25, deadline=None)
@given(
    batch=st.integers(1, 6),
    c=st.integers(1, 7),
    shape=st.sampled_from([(5,), (2, 3)]),
    seed=st.integers(0, 10_000),
)
def test_exact_equals_functorch_jacrev(batch, c, shape, seed):
    d_in = math.prod(shape)
    lin = _net(d_in, c, seed)

    def model(x):  # per-sample input of shape `shape` (under vmap) or a batch of them
        return lin(x.reshape(*x.shape[: x.ndim - len(shape)], -1))

    x = torch.randn(batch, *shape, dtype=torch.float64).requires_grad_(True)
    ours = jacobian_penalty(x, model(x), n_projections="exact")
    assert torch.allclose(ours, _exact_reference(model, x), rtol=1e-10, atol=1e-12)


def test_random_projection_is_unbiased():
    model = _net(6, 10, 0)
    x = torch.randn(16, 6, dtype=torch.float64).requires_grad_(True)
    out = model(x)
    exact = float(_exact_reference(model, x))
    g = torch.Generator().manual_seed(0)
    singles = torch.stack(
        [jacobian_penalty(x, out, generator=g, create_graph=False) for _ in range(400)]
    )
    assert abs(float(singles.mean()) / exact - 1) < 0.03
    # a single estimate is genuinely random (the test above could not pass by accident)
    assert float(singles.std()) > 0.01 * exact
    # and n projections average n independent singles
    many = jacobian_penalty(x, out, n_projections=400, generator=g, create_graph=False)
    assert abs(float(many) / exact - 1) < 0.03


def test_penalty_is_trainable_and_its_gradient_matches_functorch():
    model = _net(4, 3, 1)
    x = torch.randn(5, 4, dtype=torch.float64).requires_grad_(True)
    ours = jacobian_penalty(x, model(x), n_projections="exact")
    grads = torch.autograd.grad(ours, list(model.parameters()), allow_unused=True)
    params = dict(model.named_parameters())

    def ref(p):
        def f(inp):
            return torch.func.functional_call(model, p, (inp,))

        return vmap(jacrev(f))(x.detach()).pow(2).sum() / x.shape[0]

    expected = torch.func.grad(ref)(params)
    assert grads[-1] is None  # the last bias does not enter the Jacobian
    assert torch.count_nonzero(expected["2.bias"]) == 0
    for g, name in zip(grads[:-1], params):
        assert torch.allclose(g, expected[name], rtol=1e-9, atol=1e-12)


def test_grad_scale_prevents_fp16_underflow():
    # f(x) = 1e-4 · (1e-4 · x) in fp16: the unscaled vjp underflows to zero
    w = torch.tensor(1e-4, dtype=torch.float16)

    def f(x):
        return (x * w) * w

    x = torch.ones(4, 3, dtype=torch.float16).requires_grad_(True)
    exact = 1e-16  # ‖J_b‖_F² = 3 outputs · (1e-8)², per sample... per output dim: (1e-8)²
    expected = 3 * float(w.double() ** 4)
    unscaled = jacobian_penalty(x, f(x), n_projections="exact")
    scaled = jacobian_penalty(x, f(x), n_projections="exact", grad_scale=2.0**14)
    assert float(unscaled) == 0.0 and exact > 0
    assert float(scaled) == pytest.approx(expected, rel=0.02)
    tensor_scale = jacobian_penalty(
        x, f(x), n_projections="exact", grad_scale=torch.tensor(2.0**14)
    )
    assert float(tensor_scale) == pytest.approx(expected, rel=0.02)


def test_input_gradient_penalty_matches_reference():
    model = _net(4, 3, 2)
    x = torch.randn(6, 4, dtype=torch.float64).requires_grad_(True)
    y = torch.randint(0, 3, (6,))
    loss = F.cross_entropy(model(x), y)
    ref = torch.func.grad(lambda inp: F.cross_entropy(model(inp), y))(x.detach())
    assert torch.allclose(input_gradient_penalty(x, loss), ref.pow(2).sum())


def test_bad_input_raises():
    model = torch.nn.Linear(3, 2)
    x = torch.randn(4, 3)
    with pytest.raises(RuntimeError, match=r"requires_grad_\(True\)"):
        jacobian_penalty(x, model(x))
    with pytest.raises(RuntimeError, match="requires_grad_"):
        input_gradient_penalty(x, model(x).sum())
    xr = x.clone().requires_grad_(True)
    with pytest.raises(ValueError, match="n_projections"):
        jacobian_penalty(xr, model(xr), n_projections=0)
    with pytest.raises(ValueError, match="n_projections"):
        jacobian_penalty(xr, model(xr), n_projections="approx")
    with pytest.raises(RuntimeError, match="not computed from `inputs`"):
        other = torch.randn(4, 3).requires_grad_(True)
        jacobian_penalty(other, model(xr))
    with torch.no_grad(), pytest.raises(RuntimeError, match="enable_grad"):
        jacobian_penalty(xr, model(xr))
    with pytest.raises(ValueError, match="batch size"):
        jacobian_penalty(xr, model(xr)[:2])


def test_integer_inputs_point_at_the_embedding_output():
    # issue 10: token ids used to get "does not require grad" / a torch dtype error
    embed = torch.nn.Embedding(10, 4)
    ids = torch.randint(0, 10, (3, 5))
    how = (
        r"integers \(torch.int64\), e.g. token ids; gradients w.r.t. them do not exist.*"
        r"x = self.embed\(ids\); x = self.jacobian_inputs\(x\)"
    )
    with pytest.raises(TypeError, match=how):
        jacobian_penalty(ids, embed(ids).sum(1))
    with pytest.raises(TypeError, match=how):
        input_gradient_penalty(ids, embed(ids).sum())
    with pytest.raises(TypeError, match=how):
        JacobianPenaltyMixin.jacobian_inputs(ids)
    with pytest.raises(TypeError, match=how):
        InputGradientPenaltyMixin.input_gradient_inputs(ids)
    x = JacobianPenaltyMixin.jacobian_inputs(embed(ids))  # the fix the message gives works
    assert float(jacobian_penalty(x, x.sum(1), n_projections="exact")) == pytest.approx(5 * 4)


# --------------------------------------------------------------------------- the mixins


def test_mixin_attributes_are_validated():
    module = JacobianClassifier(0.1)
    with pytest.raises(ValueError, match="jacobian_weight"):
        module.jacobian_weight = -1.0
    with pytest.raises(ValueError, match="jacobian_weight"):
        module.jacobian_weight = math.nan
    with pytest.raises(ValueError, match="n_projections"):
        module.jacobian_projections = 0
    assert module.jacobian_weight == 0.1 and module.jacobian_projections == 1


def test_mixin_returns_weighted_estimate_and_finds_the_fp16_scaler():
    module = JacobianClassifier(0.5, "exact", model=MLP(4, (8,), 3))
    x = module.jacobian_inputs(torch.randn(5, 4))
    out = module(x)
    plain = jacobian_penalty(x, out, n_projections="exact")
    assert torch.allclose(module.jacobian_penalty(x, out), 0.5 * plain)
    assert float(module.jacobian_penalty(x, out, weight=0.0)) == 0.0

    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    seen = []
    module._trainer = SimpleNamespace(precision_plugin=SimpleNamespace(scaler=scaler))
    import lightning_reg.jacobian as jac_mod

    original = jac_mod.jacobian_penalty

    def spy(*args, **kwargs):
        seen.append(kwargs.get("grad_scale"))
        return original(*args, **kwargs)

    jac_mod.jacobian_penalty = spy
    try:
        scaled = module.jacobian_penalty(x, out)
    finally:
        jac_mod.jacobian_penalty = original
        module._trainer = None
    assert seen == [2.0**10]
    assert torch.allclose(scaled, 0.5 * plain, rtol=1e-5)


class _DigitsData:
    def __init__(self):
        from sklearn.datasets import load_digits

        d = load_digits()
        x = torch.tensor(d.data, dtype=torch.float32)
        y = torch.tensor(d.target)
        perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
        self.train, self.test = perm[:1200], perm[1200:]
        self.mu, self.sd = x[self.train].mean(0), x[self.train].std(0)
        self.x, self.y = x, y

    def z(self, x):
        return (x - self.mu) / self.sd.clamp_min(1e-6)

    def noisy_accuracy(self, model, sigma_frac=0.5, draws=20):
        g = torch.Generator().manual_seed(1)
        xt, yt = self.x[self.test], self.y[self.test]
        accs = []
        with torch.no_grad():
            for _ in range(draws):
                noisy = xt + sigma_frac * self.sd * torch.randn(xt.shape, generator=g)
                accs.append((model(self.z(noisy)).argmax(1) == yt).float().mean())
        return float(torch.stack(accs).mean())


def test_penalty_lowers_jacobian_and_helps_under_input_noise_on_digits():
    """The mixin's penalty in a plain Adam loop (a Trainer adds only overhead here; the
    Trainer path is covered by the bf16 and DDP tests): 20 epochs of 12 batches."""
    data = _DigitsData()
    xs = data.z(data.x[data.train]).split(100)
    ys = data.y[data.train].split(100)
    results = {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: one thread is faster, and robust to a busy machine
    try:
        for weight in (0.0, 0.01):
            results[weight] = _train_digits(data, xs, ys, weight)
    finally:
        torch.set_num_threads(threads)
    (jac0, acc0), (jac1, acc1) = results[0.0], results[0.01]
    print(f"digits: ||J||_F^2 {jac0:.1f} -> {jac1:.1f}; noisy accuracy {acc0:.4f} -> {acc1:.4f}")
    assert jac1 < 0.25 * jac0
    assert acc1 > acc0 + 0.005


def _train_digits(data, xs, ys, weight):
    torch.manual_seed(0)
    module = JacobianClassifier(weight, model=MLP(64, (64,), 10))
    opt = torch.optim.Adam(module.parameters(), lr=1e-2)
    for _ in range(20):
        for xb, yb in zip(xs, ys):
            xb = module.jacobian_inputs(xb)
            logits = module(xb)
            loss = F.cross_entropy(logits, yb) + module.jacobian_penalty(xb, logits)
            opt.zero_grad()
            loss.backward()
            opt.step()
    module.eval()
    xt = data.z(data.x[data.test]).requires_grad_(True)
    jac = float(jacobian_penalty(xt, module(xt), n_projections="exact", create_graph=False))
    return jac, data.noisy_accuracy(module)


def test_mixin_logs_and_trains_under_bf16(precision):
    x, y = random_classification(32, seed=2)
    module = JacobianClassifier(0.1, model=MLP(8, (16,), 3))
    logged = []

    class Grab(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, *args):
            value = trainer.callback_metrics.get("reg/jacobian/frobenius_sq")
            if value is not None:
                logged.append(float(value))

    before = {k: v.clone() for k, v in module.state_dict().items()}
    trainer = tiny_trainer(
        max_steps=4, precision=precision, log_every_n_steps=1, callbacks=[Grab()]
    )
    trainer.fit(module, list_loader(x, y, 8))
    assert len(logged) == 4 and all(math.isfinite(v) and v > 0 for v in logged)
    assert any(not torch.equal(before[k], v) for k, v in module.state_dict().items())


def test_input_gradient_mixin_in_training():
    class Net(InputGradientPenaltyMixin, ClassifierModule):
        def training_step(self, batch, batch_idx):
            x, y = self._unpack(batch)
            x = self.input_gradient_inputs(x)
            loss = F.cross_entropy(self(x), y)
            return loss + self.input_gradient_penalty(x, loss)

    x, y = random_classification(32, seed=2)
    module = Net(model=MLP(8, (16,), 3))
    module.input_gradient_weight = 1.0
    with pytest.raises(ValueError, match="input_gradient_weight"):
        module.input_gradient_weight = -0.5
    tiny_trainer(max_steps=3).fit(module, list_loader(x, y, 8))


def test_jacobian_mixin_is_a_plain_mixin():
    assert not issubclass(JacobianPenaltyMixin, torch.nn.Module)
    assert issubclass(JacobianClassifier, JacobianPenaltyMixin)


@pytest.mark.ddp
def test_ddp_averages_penalty_gradients_like_a_loss_term(ddp_pool):
    out = ddp_pool.run(fit_ddp_jacobian, 0.5, 0.1)
    assert out[0]["hash"] == out[1]["hash"]
    for o in out:
        assert o["max_diff_to_reference"] < 1e-6, o
        assert o["diff_if_penalty_summed"] > 1e-3 and o["diff_if_penalty_dropped"] > 1e-3, o
        assert o["penalty"] > 0


def test_non_tensor_arguments_get_a_type_error_naming_them() -> None:
    x = torch.randn(2, 3, requires_grad=True)
    with pytest.raises(TypeError, match=r"`inputs` and `outputs` must be tensors"):
        jacobian_penalty(x, [1.0, 2.0])
    with pytest.raises(TypeError, match=r"must be tensors"):
        input_gradient_penalty([[1.0]], x.sum())
