from __future__ import annotations

import logging
import math
from types import SimpleNamespace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
from lightning.pytorch.loggers import Logger
from torch.utils._python_dispatch import TorchDispatchMode

from lightning_reg.early_stopping import (
    EarlyStoppingCallback,
    generalization_loss,
    progress_quotient,
    snapshot_state_dict_,
    training_progress,
)
from tests.distributed.scenarios_early_stopping import (
    CaptureWeights,
    ScriptedModule,
    fit_ddp_scripted,
    state_hash,
)
from tests.helpers.models import list_loader, random_classification, tiny_trainer

# --------------------------------------------------------------------------- drivers


class _Strategy:
    @staticmethod
    def reduce_boolean_decision(decision: bool, all: bool = True) -> bool:
        return decision


def _fake_trainer(module: torch.nn.Module) -> SimpleNamespace:
    return SimpleNamespace(
        callback_metrics={},
        fast_dev_run=False,
        world_size=1,
        global_rank=0,
        is_global_zero=True,
        should_stop=False,
        current_epoch=0,
        strategy=_Strategy(),
        lightning_module=module,
        loggers=[],
    )


def drive(callback, stream, train_stream=None, module=None) -> int | None:
    """Feed ``stream`` to ``callback`` one check per epoch; return the stop epoch or None."""
    trainer = _fake_trainer(module if module is not None else torch.nn.Linear(2, 2))
    for epoch, value in enumerate(stream):
        trainer.current_epoch = epoch
        trainer.callback_metrics = {"val": torch.tensor(value, dtype=torch.float32)}
        if train_stream is not None:
            trainer.callback_metrics["train"] = torch.tensor(train_stream[epoch])
        callback._run_early_stopping_check(trainer)
        if trainer.should_stop:
            return epoch
    return None


def fit(module, callbacks, max_epochs, **kwargs):
    x, y = random_classification(32, seed=3)
    trainer = tiny_trainer(max_epochs=max_epochs, callbacks=callbacks, **kwargs)
    trainer.fit(module, list_loader(x, y, 16), list_loader(x[:16], y[:16], 16))
    return trainer


values = st.integers(0, 30).map(lambda i: i / 10)

# --------------------------------------------------------------------------- parity with Lightning


@settings(max_examples=300, deadline=None)
@given(
    stream=st.lists(values | st.just(math.nan), min_size=1, max_size=25),
    patience=st.integers(0, 5),
    min_delta=st.sampled_from([0.0, 0.1, 0.25, 1.0]),
    mode=st.sampled_from(["min", "max"]),
    check_finite=st.booleans(),
    threshold=st.sampled_from([None, 0.5, 2.5]),
    divergence=st.sampled_from([None, 0.2, 2.9]),
)
def test_same_stop_epoch_as_lightning(
    stream, patience, min_delta, mode, check_finite, threshold, divergence
):
    kwargs = dict(
        min_delta=min_delta,
        patience=patience,
        mode=mode,
        check_finite=check_finite,
        stopping_threshold=threshold,
        divergence_threshold=divergence,
    )
    ours = EarlyStoppingCallback("val", **kwargs)
    theirs = EarlyStopping("val", **kwargs)
    stop = drive(ours, stream)
    assert stop == drive(theirs, stream)
    assert ours.stopping_reason == theirs.stopping_reason
    if threshold is None and divergence is None:
        # with the thresholds Lightning skips the best-score update on the stopping check
        assert ours.wait_count == theirs.wait_count
        assert torch.equal(ours.best_score, theirs.best_score.to(ours.best_score.dtype))


@pytest.mark.parametrize(
    "stream,mode,patience",
    [
        ([1.0, 0.8, 0.9, 0.7, 0.75, 0.71, 0.72, 0.6, 0.6], "min", 2),
        ([0.1, 0.3, 0.3, 0.2, 0.4, 0.39, 0.38, 0.37, 0.5], "max", 3),
    ],
)
def test_same_stop_epoch_as_lightning_in_a_trainer(stream, mode, patience):
    epochs = []
    for cls in (EarlyStopping, EarlyStoppingCallback):
        torch.manual_seed(0)
        es = cls("val_loss", mode=mode, patience=patience)
        trainer = fit(ScriptedModule(stream), [es], max_epochs=len(stream))
        epochs.append((es.stopped_epoch, trainer.current_epoch, es.wait_count))
    assert epochs[0] == epochs[1]
    assert epochs[0][0] > 0  # it did stop early


# --------------------------------------------------------------------------- Keras semantics


def keras_reference(stream, patience, min_delta, start_from_epoch, baseline):
    """Keras' EarlyStopping.on_epoch_end (mode min, so Keras negates min_delta), from its source."""
    best, wait = torch.tensor(math.inf), 0
    for epoch, value in enumerate(stream):
        current = torch.tensor(value, dtype=torch.float32)
        if epoch < start_from_epoch:
            continue
        wait += 1
        if bool(current + min_delta < best):
            best = current
            if baseline is None or bool(current + min_delta < torch.tensor(baseline)):
                wait = 0
            continue
        if wait >= patience and epoch > 0:
            return epoch
    return None


@settings(max_examples=200, deadline=None)
@given(
    stream=st.lists(values, min_size=1, max_size=25),
    patience=st.integers(0, 4),
    min_delta=st.sampled_from([0.0, 0.1]),
    start_from_epoch=st.integers(0, 6),
    baseline=st.sampled_from([None, 0.5, 1.5]),
)
def test_start_from_epoch_and_baseline_follow_keras(
    stream, patience, min_delta, start_from_epoch, baseline
):
    es = EarlyStoppingCallback(
        "val",
        patience=patience,
        min_delta=min_delta,
        start_from_epoch=start_from_epoch,
        baseline=baseline,
    )
    expected = keras_reference(stream, patience, min_delta, start_from_epoch, baseline)
    assert drive(es, stream) == expected


def test_baseline_never_beaten_stops_after_patience():
    es = EarlyStoppingCallback("val", patience=2, baseline=0.5)
    assert drive(es, [1.0, 0.9, 0.9, 0.95, 0.4]) == 2  # 1.0, 0.9 improve but stay above
    assert es.stop_criterion == "baseline"


# --------------------------------------------------------------------------- Prechelt


def test_prechelt_formulas_by_hand():
    assert generalization_loss(0.75, 0.7) == pytest.approx(100 * (0.75 / 0.7 - 1))
    assert training_progress([0.8, 0.79]) == pytest.approx(1000 * (1.59 / 1.58 - 1))
    assert progress_quotient(2.0, 4.0) == 0.5
    assert progress_quotient(1.0, 0.0) == math.inf
    assert progress_quotient(0.0, 0.0) == 0.0
    with pytest.raises(ValueError, match="positive"):
        generalization_loss(1.0, 0.0)
    with pytest.raises(ValueError, match="positive"):
        training_progress([1.0, -1.0])


def test_generalization_loss_stops_where_hand_computation_says():
    # GL: 0, 0, 0, 100*(0.72/0.7-1)=2.86, 100*(0.75/0.7-1)=7.14 > 5 -> stop at epoch 4
    es = EarlyStoppingCallback("val", criterion="generalization_loss", gl_alpha=5.0, patience=0)
    assert drive(es, [1.0, 0.8, 0.7, 0.72, 0.75, 0.76]) == 4
    assert es.stop_criterion == "generalization_loss"


def test_progress_quotient_stops_where_hand_computation_says():
    val = [1.0, 0.9, 0.85, 0.86, 0.87, 0.9, 0.95, 1.0]
    train = [1.0, 0.9, 0.8, 0.79, 0.785, 0.784, 0.78, 0.78]
    # strips of 2: ends at epochs 1, 3, 5.  epoch 3: GL=1.18, P=6.33, PQ=0.19 <= 0.5
    # epoch 5: GL=100*(0.9/0.85-1)=5.88, P=1000*(1.569/1.568-1)=0.64, PQ=9.2 > 0.5 -> stop at 5
    # (GL alone would already exceed 2 at epoch 4, which is not a strip end)
    es = EarlyStoppingCallback(
        "val", criterion="progress_quotient", pq_alpha=0.5, strip_length=2, train_monitor="train"
    )
    assert drive(es, val, train) == 5
    assert es.stop_criterion == "progress_quotient"


def prechelt_reference(val, train, criterion, alpha, k):
    e_opt = math.inf
    for t, e_va in enumerate(val):
        e_opt = min(e_opt, e_va)
        gl = 100 * (e_va / e_opt - 1)
        if criterion == "generalization_loss" and gl > alpha:
            return t
        if criterion == "progress_quotient" and (t + 1) % k == 0:
            strip = train[t + 1 - k : t + 1]
            p = 1000 * (sum(strip) / (k * min(strip)) - 1)
            if (gl / p > alpha) if p > 0 else gl > 0:
                return t
    return None


@settings(max_examples=150, deadline=None)
@given(
    data=st.lists(
        st.tuples(st.floats(0.0625, 3.0, width=32), st.floats(0.0625, 3.0, width=32)),
        min_size=1,
        max_size=20,
    ),
    criterion=st.sampled_from(["generalization_loss", "progress_quotient"]),
    alpha=st.sampled_from([0.5, 2.0, 10.0]),
    k=st.integers(1, 5),
)
def test_prechelt_rules_match_reference(data, criterion, alpha, k):
    val = [v for v, _ in data]
    train = [t for _, t in data]
    es = EarlyStoppingCallback(
        "val",
        criterion=criterion,
        gl_alpha=alpha,
        pq_alpha=alpha,
        strip_length=k,
        train_monitor="train",
    )
    assert drive(es, val, train) == prechelt_reference(val, train, criterion, alpha, k)


def test_prechelt_rejects_non_positive_errors():
    es = EarlyStoppingCallback("val", criterion="generalization_loss")
    with pytest.raises(RuntimeError, match="positive error"):
        drive(es, [0.0, 0.1])


def test_progress_quotient_in_a_trainer_needs_the_training_metric():
    es = EarlyStoppingCallback(
        "val_loss", criterion="progress_quotient", train_monitor="nope", strip_length=2
    )
    with pytest.raises(RuntimeError, match=r"nope.*val_loss"):
        fit(ScriptedModule([1.0] * 3), [es], max_epochs=3)
    es = EarlyStoppingCallback(
        "val_loss", criterion="progress_quotient", train_monitor="train_err", strip_length=2
    )
    val = [1.0, 0.9, 0.85, 0.86, 0.87, 0.9, 0.95, 1.0]
    train = [1.0, 0.9, 0.8, 0.79, 0.785, 0.784, 0.78, 0.78]
    trainer = fit(ScriptedModule(val, train_stream=train), [es], max_epochs=8)
    assert es.stopped_epoch == 5 and trainer.current_epoch == 6


# --------------------------------------------------------------------------- smoothing


def ema(stream, beta):
    out, s = [], None
    for x in stream:
        s = x if s is None else beta * s + (1 - beta) * x
        out.append(s)
    return out


@settings(max_examples=100, deadline=None)
@given(
    stream=st.lists(st.floats(0.0, 3.0, width=32), min_size=1, max_size=20),
    beta=st.sampled_from([0.3, 0.7, 0.9]),
    patience=st.integers(0, 3),
)
def test_smoothing_equals_lightning_on_the_ema_stream(stream, beta, patience):
    ours = EarlyStoppingCallback("val", patience=patience, smoothing=beta)
    theirs = EarlyStopping("val", patience=patience)
    # the reference EMA runs in float32 tensors, as the callback's does
    reference = [float(v) for v in ema([torch.tensor(x) for x in stream], beta)]
    assert drive(ours, stream) == drive(theirs, reference)


def test_nan_is_not_smoothed_away():
    es = EarlyStoppingCallback("val", smoothing=0.9)
    assert drive(es, [1.0, 0.9, math.nan, 0.5]) == 2
    assert es.stop_criterion == "non_finite"


# --------------------------------------------------------------------------- restoring weights


STREAM = [1.0, 0.8, 0.5, 0.9, 0.7, 0.6, 0.65, 0.55, 0.8, 0.9]  # best at epoch 2


def _assert_state_equal(module, state):
    current = module.state_dict()
    assert current.keys() == state.keys()
    for k in state:
        assert torch.equal(current[k].cpu(), state[k].cpu()), k


def test_restores_best_weights_after_patience(precision):
    torch.manual_seed(0)
    capture = CaptureWeights()
    es = EarlyStoppingCallback("val_loss", patience=3)
    module = ScriptedModule(STREAM, lr=0.2)
    trainer = fit(module, [es, capture], max_epochs=10, precision=precision)
    assert es.stopped_epoch == 5 and es.best_epoch == 2 and es.restored_epoch == 2
    assert trainer.current_epoch == 6
    _assert_state_equal(module, capture.by_epoch[2])
    assert state_hash(capture.by_epoch[2]) != state_hash(capture.by_epoch[5])
    assert all(v.device.type == "cpu" for v in es.best_weights.values())
    assert es.num_snapshots == 3  # epochs 0, 1 and 2 improve


def test_restores_on_max_epochs_and_not_when_disabled():
    for restore in (True, False):
        torch.manual_seed(0)
        capture = CaptureWeights()
        es = EarlyStoppingCallback("val_loss", patience=100, restore_best_weights=restore)
        module = ScriptedModule(STREAM[:5], lr=0.2)
        fit(module, [es, capture], max_epochs=5)
        assert es.stopped_epoch == 0
        _assert_state_equal(module, capture.by_epoch[2 if restore else 4])


def test_restored_weights_survive_a_resume(tmp_path):
    torch.manual_seed(0)
    capture = CaptureWeights()
    ckpt = ModelCheckpoint(dirpath=tmp_path, filename="{epoch}", save_top_k=-1)
    es = EarlyStoppingCallback("val_loss", patience=100)
    fit(
        ScriptedModule(STREAM, lr=0.2),
        [es, ckpt, capture],
        max_epochs=5,
        enable_checkpointing=True,
    )
    best = capture.by_epoch[2]

    # resume after the best epoch, from the checkpoint of epoch 3
    torch.manual_seed(1)
    resumed = EarlyStoppingCallback("val_loss", patience=100)
    capture2 = CaptureWeights()
    module = ScriptedModule(STREAM, lr=0.2)
    x, y = random_classification(32, seed=3)
    trainer = tiny_trainer(max_epochs=8, callbacks=[resumed, capture2])
    trainer.fit(
        module,
        list_loader(x, y, 16),
        list_loader(x[:16], y[:16], 16),
        ckpt_path=str(tmp_path / "epoch=3.ckpt"),
    )
    assert min(capture2.by_epoch) == 4  # the resumed run really started after the best epoch
    assert resumed.best_epoch == 2 and resumed.restored_epoch == 2
    _assert_state_equal(module, best)
    assert state_hash(best) != state_hash(capture2.by_epoch[7])


def test_resume_without_restore_keeps_lightning_state():
    es = EarlyStoppingCallback("val", patience=4, restore_best_weights=False, smoothing=0.5)
    drive(es, [1.0, 0.9, 1.1])
    state = es.state_dict()
    assert state["best_weights"] is None
    other = EarlyStoppingCallback("val", patience=4, restore_best_weights=False, smoothing=0.5)
    other.load_state_dict(state)
    assert other.wait_count == es.wait_count and other.best_epoch == es.best_epoch
    assert torch.equal(other._ema, es._ema)
    # a checkpoint from Lightning's EarlyStopping (fewer keys) loads too
    other.load_state_dict(EarlyStopping("val").state_dict())
    assert other.best_epoch == -1 and other.best_weights is None


class _CountWeightCopies(TorchDispatchMode):
    """Counts copies whose source is one of ``module``'s parameters or buffers."""

    def __init__(self, module):
        super().__init__()
        self.sources = {t.data_ptr() for t in module.state_dict().values()}
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        src = None
        if name == "copy_":
            src = args[1]
        elif name in ("_to_copy", "clone"):
            src = args[0]
        if isinstance(src, torch.Tensor) and src.data_ptr() in self.sources:
            self.count += 1
        return func(*args, **(kwargs or {}))


def test_one_copy_per_improvement_and_no_new_device_memory():
    stream = [1.0, 0.8, 0.9, 0.5, 0.6, 0.7, 0.4, 0.9]  # improvements at epochs 0, 1, 3, 6
    counts = []
    for cls in (EarlyStopping, EarlyStoppingCallback):
        torch.manual_seed(0)
        es = cls("val_loss", patience=100)
        module = ScriptedModule(stream, lr=0.2)
        x, y = random_classification(32, seed=3)
        trainer = tiny_trainer(max_epochs=len(stream), callbacks=[es])
        with _CountWeightCopies(module) as counter:
            trainer.fit(module, list_loader(x, y, 16), list_loader(x[:16], y[:16], 16))
        counts.append(counter.count)
    n_tensors = len(module.state_dict())
    assert es.num_snapshots == 4
    # Lightning copies no weights; we copy each tensor once per improvement, nothing else
    assert counts == [0, 4 * n_tensors]
    assert all(v.device.type == "cpu" for v in es.best_weights.values())


def test_snapshot_reuses_buffers():
    module = torch.nn.Linear(3, 2)
    buffers, asynchronous = snapshot_state_dict_(None, module.state_dict())
    assert not asynchronous
    ptrs = [b.data_ptr() for b in buffers.values()]
    with torch.no_grad():
        module.weight.add_(1.0)
    again, _ = snapshot_state_dict_(buffers, module.state_dict())
    assert [b.data_ptr() for b in again.values()] == ptrs
    assert torch.equal(again["weight"], module.weight)
    assert again["weight"].data_ptr() != module.weight.data_ptr()


# --------------------------------------------------------------------------- errors, logs, messages


def test_missing_metric_names_the_existing_ones():
    es = EarlyStoppingCallback("val_acc")
    with pytest.raises(RuntimeError, match=r"val_acc.*val_loss"):
        fit(ScriptedModule([1.0, 1.0]), [es], max_epochs=2)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(patience=-1), "patience"),
        (dict(criterion="magic"), "criterion"),
        (dict(start_from_epoch=-1), "start_from_epoch"),
        (dict(min_delta=math.nan), "min_delta"),
        (dict(min_delta=-0.1), "min_delta"),
        (dict(mode="up"), "mode"),
        (dict(smoothing=1.0), "smoothing"),
        (dict(baseline=math.nan), "baseline"),
        (dict(gl_alpha=0.0), "gl_alpha"),
        (dict(strip_length=0), "strip_length"),
        (dict(criterion="progress_quotient"), "train_monitor"),
        (dict(criterion="generalization_loss", mode="max"), "mode"),
    ],
)
def test_bad_arguments_raise_value_error(kwargs, match):
    with pytest.raises(ValueError, match=match):
        EarlyStoppingCallback("val_loss", **kwargs)


class _MemoryLogger(Logger):
    def __init__(self):
        super().__init__()
        self.metrics: list[dict] = []

    @property
    def name(self):
        return "memory"

    @property
    def version(self):
        return 0

    def log_hyperparams(self, params, *args, **kwargs):
        pass

    def log_metrics(self, metrics, step=None):
        self.metrics.append(dict(metrics))


@pytest.mark.parametrize("on_train_epoch_end", [True, False])
def test_logs_wait_and_best_score_and_explains_the_stop(on_train_epoch_end, caplog):
    logger = _MemoryLogger()
    es = EarlyStoppingCallback("val_loss", patience=1, check_on_train_epoch_end=on_train_epoch_end)
    with caplog.at_level(logging.INFO):
        fit(ScriptedModule([1.0, 0.5, 0.7, 0.9]), [es], max_epochs=4, logger=logger)
    waits = [m["reg/early_stopping/wait"] for m in logger.metrics if "reg/early_stopping/wait" in m]
    bests = [
        m["reg/early_stopping/best_score"]
        for m in logger.metrics
        if "reg/early_stopping/best_score" in m
    ]
    assert waits == [0.0, 0.0, 1.0]
    assert bests == [1.0, 0.5, 0.5]
    stops = [r.getMessage() for r in caplog.records if "stop at epoch 2" in r.getMessage()]
    assert len(stops) == 1 and "\n" not in stops[0] and "restoring epoch 1" in stops[0]


def test_trainer_finds_it_as_its_early_stopping_callback():
    es = EarlyStoppingCallback("val_loss")
    trainer = tiny_trainer(callbacks=[es])
    assert trainer.early_stopping_callback is es


# --------------------------------------------------------------------------- DDP


@pytest.mark.ddp
def test_ddp_ranks_stop_together_with_identical_restored_weights(ddp_pool):
    stream = [1.0, 0.8, 0.5, 0.9, 0.7, 0.6, 0.65, 0.55]
    out = ddp_pool.run(fit_ddp_scripted, stream, 2, 8)
    assert out[0] == out[1]
    assert out[0]["stopped_epoch"] == 4 and out[0]["best_epoch"] == 2
    assert out[0]["final"] == out[0]["best_snapshot"] != out[0]["last_snapshot"]


def test_loads_from_a_cli_config():
    jsonargparse = pytest.importorskip("jsonargparse")
    parser = jsonargparse.ArgumentParser()
    parser.add_class_arguments(EarlyStoppingCallback, "es")
    cfg = parser.parse_string(
        "es:\n  monitor: val_loss\n  criterion: progress_quotient\n"
        "  train_monitor: train_loss_epoch\n  baseline: 0.5\n  smoothing: 0.3\n"
    )
    es = parser.instantiate_classes(cfg).es
    assert isinstance(es, EarlyStoppingCallback)
    assert (es.criterion, es.train_monitor, es.baseline, es.smoothing) == (
        "progress_quotient",
        "train_loss_epoch",
        0.5,
        0.3,
    )
