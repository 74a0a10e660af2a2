from __future__ import annotations

import math

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from lightning_reg.core.schedules import ConstantSchedule, LinearSchedule
from lightning_reg.dropout import (
    CurriculumDropoutSchedule,
    DropoutAfter,
    DropoutBefore,
    DropoutCallback,
    EarlyDropoutSchedule,
    MCDropoutMixin,
    MCDropoutResult,
    add_dropout,
    add_input_dropout,
    dropout_modules,
    mc_dropout_predict,
    remove_dropout,
    set_dropout_rate,
)
from tests.helpers.models import (
    MLP,
    ClassifierModule,
    SmallCNN,
    list_loader,
    random_classification,
    tiny_trainer,
)
from tests.helpers.models_surgery import zoo_model

BAD_P = [-0.1, 1.0, 1.5, float("nan"), float("inf")]


# ------------------------------------------------------------------------------------ surgery


def test_add_dropout_wraps_activations_and_keeps_eval_output():
    torch.manual_seed(0)
    model = MLP(8, (16, 16), 3)
    x = torch.randn(5, 8)
    ref = model(x)
    keys = list(model.state_dict())
    relus = [m for m in model.modules() if isinstance(m, nn.ReLU)]
    changes = add_dropout(model, 0.3)
    assert [(c.path, c.old_type, c.new_type) for c in changes] == [
        ("1", "ReLU", "DropoutAfter"),
        ("3", "ReLU", "DropoutAfter"),
    ]
    assert list(model.state_dict()) == keys
    assert all(m.dropout.p == 0.3 for m in model.modules() if isinstance(m, DropoutAfter))
    model.eval()
    assert torch.equal(model(x), ref)
    with pytest.raises(RuntimeError, match="already wrapped"):
        add_dropout(model, 0.1)
    removed = remove_dropout(model)
    assert len(removed) == 2
    assert [m for m in model.modules() if isinstance(m, nn.ReLU)] == relus  # same objects back
    assert not dropout_modules(model)


def test_add_dropout_training_zeroes_and_rescales():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Identity(), nn.ReLU())
    add_dropout(model, 0.25)
    x = torch.rand(4000) + 0.5
    y = model(x)
    kept = y != 0
    assert torch.allclose(y[kept], x[kept] / 0.75)
    assert abs(kept.float().mean().item() - 0.75) < 0.03  # 4.4 sigma for n=4000


def test_add_dropout_without_targets_raises():
    with pytest.raises(RuntimeError, match="no module of type"):
        add_dropout(nn.Sequential(nn.Linear(2, 2)), 0.1)


@pytest.mark.parametrize("p", BAD_P)
def test_bad_p_raises(p):
    with pytest.raises(ValueError, match="`p` must be"):
        add_dropout(MLP(), p)
    with pytest.raises(ValueError, match="`p` must be"):
        add_input_dropout(MLP(), p)
    with pytest.raises(ValueError, match="`p` must be"):
        DropoutCallback(p)
    with pytest.raises(ValueError, match="`p` must be"):
        EarlyDropoutSchedule(p, until=3)
    with pytest.raises(ValueError, match="`p` must be"):
        CurriculumDropoutSchedule(p, gamma=0.1)
    with pytest.raises(ValueError, match="`p` must be"):
        set_dropout_rate(nn.Dropout(), p)


def test_kind_dropout2d_drops_whole_channels():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 3), nn.ReLU())
    changes = add_dropout(model, 0.3, kind="dropout2d")
    assert all(isinstance(model.get_submodule(c.path).dropout, nn.Dropout2d) for c in changes)
    assert set_dropout_rate(model, 0.5) == 2
    y = model(torch.rand(2, 3, 12, 12) + 0.1)  # ReLU of the last conv: zero channels are dropped
    dropped = (y == 0).flatten(2).all(-1)
    assert dropped.any() and not dropped.all()


def test_unknown_kind_raises():
    with pytest.raises(ValueError, match=r"`kind` must be one of .*'dropout2d'.*got 'gaussian'"):
        add_input_dropout(nn.Sequential(nn.Linear(2, 2)), 0.1, kind="gaussian")


def test_add_input_dropout_state_dict_both_ways():
    torch.manual_seed(0)
    original = MLP(8, (16,), 3)
    wrapped = MLP(8, (16,), 3)
    add_input_dropout(wrapped, 0.2)
    assert isinstance(wrapped[0], DropoutBefore) and isinstance(wrapped[2], DropoutBefore)
    assert list(wrapped.state_dict()) == list(original.state_dict())
    # original -> wrapped, strict
    wrapped.load_state_dict(original.state_dict())
    x = torch.randn(4, 8)
    wrapped.eval()
    assert torch.equal(wrapped(x), original(x))
    # wrapped -> original, strict, after changing the wrapped weights
    with torch.no_grad():
        wrapped[0].module.weight.add_(1.0)
    original.load_state_dict(wrapped.state_dict())
    assert torch.equal(original[0].weight, wrapped[0].module.weight)
    # both spellings load into the wrapped model
    inner = {k: v for k, v in wrapped.named_parameters()}
    assert "0.module.weight" in inner
    wrapped.load_state_dict({k: v.clone() for k, v in wrapped.named_parameters()})
    remove_dropout(wrapped)
    assert type(wrapped[0]) is nn.Linear


def test_add_input_dropout_drops_the_input():
    torch.manual_seed(0)
    lin = nn.Linear(1000, 1000, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.eye(1000))
    model = nn.Sequential(lin)
    add_input_dropout(model, 0.5)
    x = torch.rand(2, 1000) + 1.0
    y = model(x)
    kept = y != 0
    assert torch.allclose(y[kept], 2 * x[kept])
    assert 0.45 < kept.float().mean().item() < 0.55


# ------------------------------------------------------------------------------------ schedules


@settings(max_examples=50, deadline=None)
@given(
    p=st.floats(0.0, 0.99),
    gamma=st.floats(1e-4, 5.0),
    t=st.integers(0, 10_000),
)
def test_curriculum_matches_paper_keep_probability(p, gamma, t):
    # Morerio et al.: keep prob theta(t) = (1 - theta_bar) exp(-gamma t) + theta_bar.
    theta_bar = 1.0 - p
    theta = (1.0 - theta_bar) * math.exp(-gamma * t) + theta_bar
    assert CurriculumDropoutSchedule(p, gamma).at(t) == pytest.approx(1.0 - theta, abs=1e-12)


@settings(max_examples=50, deadline=None)
@given(p=st.floats(0.0, 0.99), until=st.integers(1, 50), t=st.integers(0, 100))
def test_early_dropout_schedule(p, until, t):
    const = EarlyDropoutSchedule(p, until=until)
    assert const.at(t) == (p if t < until else 0.0)
    lin = EarlyDropoutSchedule(p, until=until, ramp="linear")
    assert lin.at(t) == pytest.approx(max(0.0, p * (until - t) / until))


def test_schedule_bad_args():
    with pytest.raises(ValueError, match="until"):
        EarlyDropoutSchedule(0.1, until=0)
    with pytest.raises(ValueError, match="ramp"):
        EarlyDropoutSchedule(0.1, until=2, ramp="cubic")
    with pytest.raises(ValueError, match="gamma"):
        CurriculumDropoutSchedule(0.1, gamma=float("nan"))
    with pytest.raises(ValueError, match="gamma"):
        CurriculumDropoutSchedule(0.1, gamma=0.0)


# ------------------------------------------------------------------------------------ callback


class _RecordP(pl.Callback):
    def __init__(self):
        self.seen: list[tuple[int, int, float]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        ps = {m.p for _, m in dropout_modules(pl_module)}
        assert len(ps) == 1
        self.seen.append((trainer.current_epoch, trainer.global_step, ps.pop()))


def _dropout_module() -> ClassifierModule:
    model = MLP(8, (16,), 3)
    add_dropout(model, 0.5)
    return ClassifierModule(model)


def test_dropout_callback_args():
    with pytest.raises(ValueError, match="exactly one"):
        DropoutCallback()
    with pytest.raises(ValueError, match="exactly one"):
        DropoutCallback(0.1, schedule=LinearSchedule(0.0, 0.1, 3))
    assert DropoutCallback(0.1, apply_to="model.*").apply_to == ["model.*"]
    assert DropoutCallback(0.1).schedule.at(123) == 0.1


def test_dropout_callback_schedules_every_module(precision):
    x, y = random_classification(32)
    schedule = EarlyDropoutSchedule(0.2, until=2, ramp="linear")
    rec = _RecordP()
    trainer = tiny_trainer(
        max_epochs=3,
        precision=precision,
        callbacks=[DropoutCallback(schedule=schedule), rec],
        log_every_n_steps=1,
    )
    trainer.fit(_dropout_module(), list_loader(x, y, batch_size=16))
    assert [s[2] for s in rec.seen] == [schedule.at(e) for e, _, _ in rec.seen]
    assert sorted({s[0] for s in rec.seen}) == [0, 1, 2]
    assert trainer.logged_metrics["reg/dropout/p"].item() == 0.0


def test_dropout_callback_step_unit_and_apply_to():
    x, y = random_classification(32)
    module = ClassifierModule(nn.Sequential(nn.Dropout(0.5), MLP(8, (16,), 3)))
    add_dropout(module.model, 0.5)
    schedule = CurriculumDropoutSchedule(0.4, gamma=0.5)
    trainer = tiny_trainer(
        max_steps=4, callbacks=[DropoutCallback(schedule=schedule, apply_to=["model.1.*"])]
    )
    trainer.fit(module, list_loader(x, y, batch_size=8))
    # the last batch ran at global_step 3; the un-matched dropout stays at 0.5
    assert module.model[1][1].dropout.p == pytest.approx(schedule.at(3))
    assert module.model[0].p == 0.5


def test_dropout_callback_without_dropout_raises():
    x, y = random_classification(16)
    trainer = tiny_trainer(max_steps=1, callbacks=[DropoutCallback(0.1)])
    with pytest.raises(RuntimeError, match="add_dropout"):
        trainer.fit(ClassifierModule(MLP()), list_loader(x, y))


def test_dropout_callback_insert_once():
    x, y = random_classification(16)
    module = ClassifierModule(MLP(8, (16, 16), 3))
    cb = DropoutCallback(0.1, insert=True)
    trainer = tiny_trainer(max_steps=2, callbacks=[cb])
    trainer.fit(module, list_loader(x, y, batch_size=8), list_loader(x, y, batch_size=8))
    trainer.validate(module, list_loader(x, y, batch_size=8), verbose=False)
    wrappers = [m for m in module.modules() if isinstance(m, DropoutAfter)]
    assert len(wrappers) == 2 and all(w.dropout.p == 0.1 for w in wrappers)


def test_dropout_callback_schedule_out_of_range_raises():
    x, y = random_classification(16)
    trainer = tiny_trainer(
        max_steps=3, callbacks=[DropoutCallback(schedule=LinearSchedule(0.5, 1.5, 1, unit="step"))]
    )
    with pytest.raises(RuntimeError, match=r"must\s+be in \[0, 1\)"):
        trainer.fit(_dropout_module(), list_loader(x, y, batch_size=8))


def test_dropout_callback_resume(tmp_path):
    x, y = random_classification(32)
    schedule = EarlyDropoutSchedule(0.3, until=2)
    ckpt_cb = pl.callbacks.ModelCheckpoint(dirpath=tmp_path, save_last=True)
    trainer = tiny_trainer(
        max_epochs=2,
        enable_checkpointing=True,
        callbacks=[DropoutCallback(schedule=schedule), ckpt_cb],
    )
    trainer.fit(_dropout_module(), list_loader(x, y, batch_size=16))
    # No state: the rate is a function of the restored epoch/step counters.
    state = torch.load(tmp_path / "last.ckpt", weights_only=False)["callbacks"]
    assert not any(v for k, v in state.items() if k.startswith("DropoutCallback"))
    rec = _RecordP()
    cb2 = DropoutCallback(schedule=schedule)
    trainer2 = tiny_trainer(max_epochs=3, callbacks=[cb2, rec])
    trainer2.fit(
        _dropout_module(), list_loader(x, y, batch_size=16), ckpt_path=tmp_path / "last.ckpt"
    )
    assert {s[0] for s in rec.seen} == {2}  # only the resumed epoch ran
    assert all(s[2] == 0.0 for s in rec.seen)


def test_dropout_callback_from_yaml():
    jsonargparse = pytest.importorskip("jsonargparse")
    parser = jsonargparse.ArgumentParser()
    parser.add_argument("--cb", type=DropoutCallback)
    cfg = parser.parse_string(
        """
cb:
  class_path: lightning_reg.dropout.DropoutCallback
  init_args:
    schedule:
      class_path: lightning_reg.dropout.CurriculumDropoutSchedule
      init_args: {p: 0.3, gamma: 0.01}
    apply_to: ["model.*"]
"""
    )
    cb = parser.instantiate_classes(cfg).cb
    assert isinstance(cb, DropoutCallback)
    assert isinstance(cb.schedule, CurriculumDropoutSchedule) and cb.schedule.p == 0.3
    assert cb.apply_to == ["model.*"]


# ------------------------------------------------------------------------------------ MC dropout


def _cnn_with_dropout() -> nn.Module:
    torch.manual_seed(0)
    model = SmallCNN(num_classes=4)
    add_dropout(model, 0.3)
    return model


def test_mc_dropout_samples_vary_bn_untouched_flags_restored():
    model = _cnn_with_dropout()
    model.train()
    model.features[1].eval()  # an odd mix of flags that must come back exactly
    model.head.eval()
    flags = {n: m.training for n, m in model.named_modules()}
    bn_state = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(3, 1, 6, 6)
    res = mc_dropout_predict(model, x, 16, classifier=True, return_samples=True)
    assert {n: m.training for n, m in model.named_modules()} == flags
    for k, v in model.state_dict().items():
        assert torch.equal(v, bn_state[k]), k
    assert isinstance(res, MCDropoutResult)
    assert res.samples.shape == (16, 3, 4)
    assert (res.std > 0).all()
    assert not torch.equal(res.samples[0], res.samples[1])
    # statistics are those of the returned samples
    assert torch.allclose(res.mean, res.samples.mean(0))
    assert torch.allclose(res.std, res.samples.std(0))
    assert torch.allclose(res.samples.sum(-1), torch.ones(16, 3))
    ref_entropy = -(res.mean * res.mean.log()).sum(-1)
    assert torch.allclose(res.entropy, ref_entropy, atol=1e-6)
    per_sample = -(res.samples * res.samples.log()).sum(-1).mean(0)
    assert torch.allclose(res.mutual_info, ref_entropy - per_sample, atol=1e-6)
    # BALD is strictly positive where the samples disagree (entropy is strictly concave)
    assert (res.mutual_info > 0).all()


def test_mc_dropout_uses_batch_stats_free_eval_bn():
    # BN must be in eval mode: with one distinct input repeated, train-mode BN would see a
    # batch of identical rows per sample position and give different outputs.
    model = _cnn_with_dropout()
    model.eval()
    seen = []
    model.features[1].register_forward_hook(lambda m, i, o: seen.append(m.training))
    mc_dropout_predict(model, torch.randn(2, 1, 6, 6), 4)
    assert seen == [False]
    assert all(isinstance(m, nn.Dropout) for _, m in dropout_modules(model))


@settings(max_examples=20, deadline=None)
@given(n=st.integers(2, 40), chunk=st.integers(1, 45), batch=st.integers(1, 5))
def test_mc_dropout_chunking(n, chunk, batch):
    model = nn.Sequential(nn.Linear(3, 4), nn.Dropout(0.5))
    rows = []
    model[0].register_forward_hook(lambda m, i, o: rows.append(i[0].shape[0]))
    res = mc_dropout_predict(model, torch.randn(batch, 3), n, chunk_size=chunk)
    assert rows == [min(chunk, n - i) * batch for i in range(0, n, chunk)]
    assert res.mean.shape == (batch, 4)


def test_mc_dropout_memory_bound_picks_chunk():
    model = nn.Sequential(nn.Linear(10, 4), nn.Dropout(0.5))
    rows = []
    model[0].register_forward_hook(lambda m, i, o: rows.append(i[0].shape[0]))
    mc_dropout_predict(model, torch.randn(2, 10), 30, max_batch_elements=200)  # 10 samples/chunk
    assert rows == [20, 20, 20]
    rows.clear()
    mc_dropout_predict(model, torch.randn(2, 10), 30)
    assert rows == [60]  # one forward


def test_mc_dropout_mean_is_unbiased():
    # E over masks of W·dropout(x) = W·x: the MC mean converges to the eval output.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Dropout(0.2), nn.Linear(16, 2))
    x = torch.randn(2, 16)
    res = mc_dropout_predict(model, x, 4000, return_samples=True)
    model.eval()
    ref = model(x)
    se = res.std / math.sqrt(4000)
    assert ((res.mean - ref).abs() < 5 * se).all()


def test_mc_dropout_errors():
    with pytest.raises(RuntimeError, match="add_dropout"):
        mc_dropout_predict(MLP(), torch.randn(2, 8), 4)
    model = nn.Sequential(nn.Linear(8, 3), nn.Dropout(0.1))
    with pytest.raises(ValueError, match="n_samples"):
        mc_dropout_predict(model, torch.randn(2, 8), 1)
    with pytest.raises(ValueError, match="output"):
        mc_dropout_predict(model, torch.randn(2, 8), 4, output="scores")
    model.train()
    with pytest.raises(ValueError, match="chunk_size"):
        mc_dropout_predict(model, torch.randn(2, 8), 4, chunk_size=0)
    assert model.training  # restored even though it raised before running


def test_mc_dropout_probs_output_and_bf16():
    # output="probs": the samples are the model's own probabilities (no second softmax, which
    # would also sum to 1), promoted to float32, and the entropy is that of their mean.
    model = nn.Sequential(nn.Linear(8, 3), nn.Dropout(0.3), nn.Softmax(-1))
    x = torch.randn(4, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        torch.manual_seed(3)
        res = mc_dropout_predict(model, x, 8, output="probs", return_samples=True)
        torch.manual_seed(3)
        with torch.no_grad():
            ref = model.train()(x.repeat(8, 1)).reshape(8, 4, 3).float()
    assert res.mean.dtype == res.samples.dtype == torch.float32
    assert torch.equal(res.samples, ref)
    torch.testing.assert_close(res.entropy, -torch.special.xlogy(res.mean, res.mean).sum(-1))


def test_mc_dropout_refuses_outputs_it_cannot_average():
    x = torch.randn(3, 4)

    class Pooled(nn.Module):  # averages over the batch: one row for 3 * 2 input rows
        def __init__(self) -> None:
            super().__init__()
            self.drop = nn.Dropout(0.5)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.drop(x).mean(0, keepdim=True)

    with pytest.raises(RuntimeError, match=r"one row per input row; 6 rows gave \(1, 4\)"):
        mc_dropout_predict(Pooled(), x, 2)

    class Dict(Pooled):
        def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
            return {"logits": self.drop(x)}

    with pytest.raises(RuntimeError, match=r"rows gave dict\. Wrap the model"):
        mc_dropout_predict(Dict(), x, 2)
    with pytest.raises(RuntimeError, match="batched input tensor"):
        mc_dropout_predict(Pooled(), torch.tensor(1.0), 2)


class _MCModule(MCDropoutMixin, ClassifierModule):
    mc_classifier = True
    mc_n_samples = 12

    def predict_step(self, batch, batch_idx):
        self.flags_in_predict = {n: m.training for n, m in self.named_modules()}
        return self.mc_predict(batch[0])


def test_mc_predict_in_predict_step(precision):
    torch.manual_seed(0)
    model = SmallCNN(num_classes=3)
    add_dropout(model, 0.4)
    module = _MCModule(model)
    x, y = random_classification(8, image=True)
    trainer = tiny_trainer(max_steps=2, precision=precision)
    trainer.fit(module, list_loader(x, y, batch_size=4))
    bn_before = {k: v.clone() for k, v in module.state_dict().items()}
    out = trainer.predict(module, list_loader(x, y, batch_size=4))
    assert len(out) == 2 and all(isinstance(r, MCDropoutResult) for r in out)
    assert all((r.std > 0).any() and r.entropy.shape == (4,) for r in out)
    assert not any(module.flags_in_predict.values())  # Lightning forced eval; we restored it
    for k, v in module.state_dict().items():
        assert torch.equal(v, bn_before[k]), k
    # a deterministic check that predictions really vary: two calls differ
    module.eval()
    a = module.mc_predict(x[:2], 4, return_samples=True).samples
    assert not torch.equal(a[0], a[1])


def test_mc_mixin_on_plain_class_raises():
    class NotAModule(MCDropoutMixin):
        pass

    with pytest.raises(RuntimeError, match=r"nn\.Module"):
        NotAModule().mc_predict(torch.randn(2, 2), 4)


def test_mc_predict_defaults_and_forwarded_arguments():
    module = _MCModule(nn.Sequential(nn.Linear(8, 3), nn.Dropout(0.5)))
    x = torch.randn(2, 8)
    rows = []
    module.model[0].register_forward_hook(lambda m, i, o: rows.append(i[0].shape[0]))
    res = module.mc_predict(x, chunk_size=5, return_samples=True)  # mc_n_samples = 12
    assert rows == [10, 10, 4] and res.samples.shape == (12, 2, 3)
    assert res.entropy.shape == (2,)  # mc_classifier = True
    assert module.mc_predict(x, 3, classifier=None).entropy is not None
    plain = module.mc_predict(x, 3, classifier=False)
    assert plain.entropy is None and plain.mutual_info is None and plain.samples is None
    with pytest.raises(TypeError, match="chunk"):
        module.mc_predict(x, 3, chunks=2)


def test_functional_dropout_reference_equivalence():
    # DropoutAfter(module) is exactly module followed by F.dropout with the same RNG draws.
    torch.manual_seed(1)
    x = torch.randn(6, 5)
    layer = DropoutAfter(nn.Tanh(), 0.3)
    torch.manual_seed(7)
    ours = layer(x)
    torch.manual_seed(7)
    ref = F.dropout(torch.tanh(x), 0.3, training=True)
    assert torch.equal(ours, ref)


# ------------------------------------------------------------------- real models (issue 10 #2)


def _norm_flags_during(model: nn.Module) -> list[bool]:
    """Record the ``training`` flag of every norm layer each time it runs."""
    seen: list[bool] = []
    for m in model.modules():
        if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d, nn.LayerNorm)):
            m.register_forward_pre_hook(lambda mod, args: seen.append(mod.training))
    return seen


class _MCLayer(MCDropoutMixin, nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.2, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


def test_mc_dropout_samples_torch_transformer_layer_despite_fast_path():
    """In eval mode under no_grad, nn.TransformerEncoderLayer takes a fused path that skips its
    dropout: switching only the nn.Dropout children gave zero variance."""
    torch.manual_seed(0)
    module = _MCLayer().eval()
    seen = _norm_flags_during(module)
    x = torch.randn(3, 5, 16)
    for res in (mc_dropout_predict(module.layer, x, 8), module.mc_predict(x, 8)):
        assert (res.std > 0).all()
    assert seen and not any(seen)  # the LayerNorms stayed in eval mode
    assert not any(m.training for m in module.modules())  # flags restored
    with torch.no_grad():  # and the eval output is deterministic again
        assert torch.equal(module(x), module(x))


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_mc_dropout_samples_hf_functional_attention_dropout(attn):
    """Hugging Face applies attention dropout functionally, only when the attention module is
    in training mode: with only attention dropout, MC dropout gave zero variance."""
    transformers = pytest.importorskip("transformers")
    transformers.utils.logging.set_verbosity_error()
    config = transformers.BertConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        vocab_size=100, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.3,
        attn_implementation=attn,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.BertModel(config).eval()
    model.encoder.layer[1].train()  # an odd mix of flags that must come back exactly
    flags = {n: m.training for n, m in model.named_modules()}
    seen = _norm_flags_during(model)

    class Pooled(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bert = model

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            return self.bert(input_ids=ids).last_hidden_state

    res = mc_dropout_predict(Pooled(), torch.randint(0, 100, (2, 6)), 6)
    assert (res.std > 0).all()
    assert seen and not any(seen)
    assert {n: m.training for n, m in model.named_modules()} == flags


def test_mc_dropout_without_active_dropout_names_the_layers():
    model = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.0))
    with pytest.raises(RuntimeError, match=r"p > 0.*p = 0 in \['1'\]"):
        mc_dropout_predict(model, torch.randn(2, 4), 4)


@pytest.mark.parametrize("name", ["hf_bert", "hf_gpt2", "hf_llama", "timm_convnext"])
def test_add_dropout_default_finds_timm_and_hf_activations(name):
    model, run = zoo_model(name, dropout=0.0)
    model.eval()
    keys = list(model.state_dict())
    with torch.no_grad():
        ref = run(model)
    changes = add_dropout(model, 0.5)
    wrapped = [model.get_submodule(c.path).module for c in changes]
    assert any(type(m).__module__.endswith(".activations") for m in wrapped)
    assert list(model.state_dict()) == keys
    with torch.no_grad():
        assert torch.equal(run(model), ref)
        assert not torch.equal(run(model.train()), ref)


def test_add_dropout_skips_layers_torch_reads_directly() -> None:
    # nn.MultiheadAttention reads out_proj.weight, and TransformerEncoderLayer's fast path reads
    # linear1/linear2 weights, without calling them: wrapping them broke the forward.
    encoder = nn.TransformerEncoder(
        nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, batch_first=True), num_layers=2
    )
    model = nn.Sequential(encoder, nn.Linear(8, 3))
    assert [c.path for c in add_dropout(model, 0.1, after=(nn.Linear,))] == ["1"]
    x = torch.randn(2, 3, 8)
    with torch.no_grad():
        assert model.eval()(x).shape == (2, 3, 3)
    assert model.train()(x).shape == (2, 3, 3)


def test_dropout_callback_refuses_bad_rate_and_globs_at_construction() -> None:
    with pytest.raises(ValueError, match=r"p.*\[0, 1\).*1\.5"):
        DropoutCallback(schedule=ConstantSchedule(1.5))
    with pytest.raises(TypeError, match=r"apply_to.*str globs"):
        DropoutCallback(0.1, apply_to=["model.*", 3])
