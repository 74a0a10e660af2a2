"""EarlyStoppingCallback: Lightning's EarlyStopping behaviours with ours swapped in (written after
Lightning's own tests/tests_pytorch/callbacks/test_early_stopping.py), Keras' start/baseline
semantics, Prechelt's rules, best-weight restoring and the issue-10 regressions."""

from __future__ import annotations

import logging
import math
import pickle
from unittest import mock

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import Callback, EarlyStopping, ModelCheckpoint
from lightning.pytorch.callbacks.early_stopping import EarlyStoppingReason
from lightning.pytorch.demos.boring_classes import BoringModel
from lightning.pytorch.loggers import Logger
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from lightning_reg.early_stopping import (
    BestWeights,
    EarlyStoppingCallback,
    generalization_loss,
    progress_quotient,
    training_progress,
)
from tests.distributed.scenarios_early_stopping import fit_ddp_scripted
from tests.helpers.models import list_loader, random_classification, tiny_trainer
from tests.helpers.models_early_stopping import CaptureWeights, ScriptedModule, state_hash

ES_LOG = "lightning.pytorch.callbacks.early_stopping"

# --------------------------------------------------------------------------- drivers


def bare_trainer() -> Trainer:
    """A real Trainer with no model attached, as in Lightning's own squeeze test."""
    return Trainer(
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )


def drive(callback, stream, train_stream=None, trainer=None) -> int | None:
    """Feed ``stream`` to ``callback._run_early_stopping_check`` on a real Trainer, one check per
    epoch; return the stop epoch or None."""
    trainer = trainer or bare_trainer()
    trainer.should_stop = False
    for epoch, value in enumerate(stream):
        trainer.fit_loop.epoch_progress.current.completed = epoch
        trainer.callback_metrics.clear()
        trainer.callback_metrics["val"] = torch.tensor(value, dtype=torch.float32)
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


class StreamModel(BoringModel):
    """Logs ``streams[key][epoch]`` for each key, at validation end or at training-epoch end."""

    def __init__(self, streams: dict[str, list[float]], on_train: bool = False):
        super().__init__()
        self.streams, self.on_train = streams, on_train

    def _log_streams(self):
        for key, stream in self.streams.items():
            self.log(key, torch.tensor(float(stream[min(self.current_epoch, len(stream) - 1)])))

    def on_validation_epoch_end(self):
        if not self.on_train:
            self._log_streams()

    def on_train_epoch_end(self):
        if self.on_train:
            self._log_streams()


def boring_fit(callbacks, streams, on_train=False, ckpt_path=None, **kwargs) -> Trainer:
    defaults = dict(max_epochs=10, limit_train_batches=2, limit_val_batches=1)
    trainer = tiny_trainer(callbacks=callbacks, **{**defaults, **kwargs})
    trainer.fit(StreamModel(streams, on_train), ckpt_path=ckpt_path)
    return trainer


def summary(es, trainer):
    return (
        trainer.current_epoch,
        es.stopped_epoch,
        es.stopping_reason,
        es.stopping_reason_message,
        es.wait_count,
    )


values = st.integers(0, 30).map(lambda i: i / 10)

# --------------------------------------------------------------------------- parity with Lightning


@settings(max_examples=150, deadline=None)
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
    trainer = bare_trainer()
    assert drive(ours, stream, trainer=trainer) == drive(theirs, stream, trainer=trainer)
    assert ours.stopping_reason == theirs.stopping_reason
    assert ours.stopping_reason_message == theirs.stopping_reason_message
    assert ours.stopped_epoch == theirs.stopped_epoch
    if threshold is None and divergence is None:
        # on a threshold stop Lightning skips the best-score update; we keep it (restore)
        assert ours.wait_count == theirs.wait_count
        assert torch.equal(ours.best_score, theirs.best_score.to(ours.best_score.dtype))


@pytest.mark.parametrize("on_train", [False, True], ids=["on_val_end", "on_train_epoch_end"])
@pytest.mark.parametrize(
    "stream,kwargs",
    [
        # Lightning's patience cases: the stop epoch is 4, 3, 4
        ([6, 5, 5, 5, 5, 5], dict(patience=3)),
        ([6, 5, 4, 4, 3, 3], dict(patience=1)),
        ([6, 5, 6, 5, 5, 5], dict(patience=3)),
        # min_delta: 0.05 steps are no improvement
        ([1.0, 0.95, 0.9, 0.85, 0.8, 0.75], dict(patience=2, min_delta=0.1)),
        # thresholds and a non-finite metric
        ([9, 8, 7, 6, 5, 6, 4, 3, 2, 1], dict(stopping_threshold=2.9)),
        ([9, 4, 2, 16, 32, 64], dict(divergence_threshold=15.9)),
        ([4, 3, math.inf, 2, 1], dict()),
        ([4, 3, math.nan, 2, 1], dict()),
        ([0.1, 0.3, 0.3, 0.2, 0.4, 0.39], dict(mode="max", patience=2)),
    ],
)
def test_same_result_as_lightning_in_a_fit(stream, kwargs, on_train):
    results = []
    for cls in (EarlyStopping, EarlyStoppingCallback):
        es = cls("abc", check_on_train_epoch_end=on_train, **kwargs)
        trainer = boring_fit([es], {"abc": stream}, on_train=on_train)
        results.append(summary(es, trainer))
    assert results[0] == results[1]
    assert results[1][1] > 0  # it did stop early


def test_patience_on_training_metric_without_validation_step():
    results = []
    for cls in (EarlyStopping, EarlyStoppingCallback):
        model = StreamModel({"train_loss": [6, 5, 4, 4, 3, 3]}, on_train=True)
        model.validation_step = None
        es = cls("train_loss", patience=1, check_on_train_epoch_end=True)
        trainer = tiny_trainer(callbacks=[es], max_epochs=10, limit_train_batches=2)
        trainer.fit(model)
        results.append(summary(es, trainer))
    assert results[0] == results[1]
    assert results[1][:2] == (4, 3)


@pytest.mark.parametrize(
    "model_stream,kwargs,reason,words",
    [
        ([10.0] * 10, dict(patience=2, verbose=True), "PATIENCE_EXHAUSTED", "did not improve"),
        ([5, 3, 1, 0.5, 0.1], dict(stopping_threshold=0.6), "STOPPING_THRESHOLD", "threshold"),
        ([1, 2, 5, 10, 15], dict(divergence_threshold=8.0), "DIVERGENCE_THRESHOLD", "Divergence"),
        ([1.0, 0.5, math.nan], dict(), "NON_FINITE_METRIC", "is not finite"),
        ([5, 4, 3], dict(patience=3), "NOT_STOPPED", None),
    ],
)
def test_stopping_reason_and_message(model_stream, kwargs, reason, words):
    es = EarlyStoppingCallback("val_loss", **kwargs)
    boring_fit([es], {"val_loss": model_stream}, max_epochs=len(model_stream))
    assert es.stopping_reason == EarlyStoppingReason[reason]
    if words is None:
        assert es.stopping_reason_message is None and es.stopped_epoch == 0
    else:
        assert words in es.stopping_reason_message and es.stopped_epoch > 0


def test_verbose_messages_match_lightning_word_for_word(caplog):
    messages = []
    for cls in (EarlyStopping, EarlyStoppingCallback):
        caplog.clear()
        with caplog.at_level(logging.INFO, logger=ES_LOG):
            boring_fit([cls("abc", patience=2, verbose=True)], {"abc": [3, 2, 2.5, 1, 1.5, 1.2]})
        messages.append([r.getMessage() for r in caplog.records if r.name == ES_LOG])
    ours_without_restore = [m for m in messages[1] if not m.startswith("Restored the weights")]
    assert ours_without_restore == messages[0]
    assert any("improved by 1.000 >= min_delta = 0.0" in m for m in messages[0])
    assert messages[1][-1] == "Restored the weights of epoch 3, where abc = 1.000."


@pytest.mark.parametrize(
    "log_rank_zero_only,world_size,global_rank,expected",
    [
        (False, 1, 0, "bar"),
        (False, 2, 1, "[rank: 1] bar"),
        (True, 2, 0, "[rank: 0] bar"),
        (True, 2, 1, None),
    ],
)
def test_log_info_follows_log_rank_zero_only(log_rank_zero_only, world_size, global_rank, expected):
    trainer = mock.Mock(global_rank=global_rank, world_size=world_size)
    with mock.patch(f"{ES_LOG}.log.info") as info:
        EarlyStoppingCallback._log_info(trainer, "bar", log_rank_zero_only)
    if expected is None:
        info.assert_not_called()
    else:
        info.assert_called_once_with(expected)


@pytest.mark.parametrize("order", ["abc_first", "cba_first"])
@pytest.mark.parametrize("on_train", [False, True])
def test_multiple_callbacks_stop_when_any_says_so(order, on_train):
    callbacks = [
        EarlyStoppingCallback("abc", check_on_train_epoch_end=on_train),
        EarlyStoppingCallback("cba", patience=3, check_on_train_epoch_end=on_train),
    ]
    if order == "cba_first":
        callbacks.reverse()
    streams = {"abc": [8, 4, 2, 3, 4, 5, 8, 10], "cba": [0] * 8}
    trainer = boring_fit(callbacks, streams, on_train=on_train, max_epochs=20)
    assert trainer.current_epoch - 1 == 3  # "cba" runs out of patience first
    assert {es.state_key for es in callbacks} == {
        "EarlyStoppingCallback{'monitor': 'abc', 'mode': 'min'}",
        "EarlyStoppingCallback{'monitor': 'cba', 'mode': 'min'}",
    }


def test_one_check_per_epoch_and_trainer_finds_it():
    es = EarlyStoppingCallback("abc", restore_best_weights=False)
    with mock.patch.object(es, "_run_early_stopping_check") as check:
        trainer = boring_fit([es], {"abc": [1.0]}, max_epochs=4)
    assert check.call_count == 4
    assert trainer.early_stopping_callback is es
    assert trainer.early_stopping_callbacks == [es]


@pytest.mark.parametrize(
    "limit_train_batches,min_epochs,min_steps,stop_step",
    [(3, 0, 10, 10), (3, 2, 0, 6), (5, 3, 10, 15)],
)
def test_min_epochs_and_min_steps_delay_the_stop(
    limit_train_batches, min_epochs, min_steps, stop_step
):
    es = EarlyStoppingCallback("abc", restore_best_weights=False)
    expected_epochs = max(math.ceil(min_steps / limit_train_batches), min_epochs)
    stops = [(True, "")] * expected_epochs
    with mock.patch.object(es, "_evaluate_stopping_criteria", side_effect=stops):
        trainer = boring_fit(
            [es],
            {"abc": [1.0]},
            on_train=True,
            limit_val_batches=0,
            limit_train_batches=limit_train_batches,
            min_epochs=min_epochs,
            min_steps=min_steps,
            max_epochs=None,
        )
    assert trainer.should_stop
    assert trainer.current_epoch == expected_epochs
    assert trainer.global_step == stop_step


@pytest.mark.parametrize(
    "trainer_kwargs",
    [
        dict(val_check_interval=0.3, limit_train_batches=10, max_epochs=10),
        dict(check_val_every_n_epoch=2, max_epochs=5),
    ],
    ids=["val_check_interval", "check_val_every_n_epoch"],
)
def test_checks_after_validation_when_validation_is_not_once_per_epoch(trainer_kwargs):
    es = EarlyStoppingCallback("abc", restore_best_weights=False)
    with mock.patch.object(
        EarlyStoppingCallback,
        "_evaluate_stopping_criteria",
        side_effect=[(False, "A"), (True, "B")],
    ) as evaluate:
        trainer = boring_fit([es], {"abc": [1.0]}, **{"limit_train_batches": 2, **trainer_kwargs})
    assert es._check_on_train_epoch_end is False
    assert evaluate.call_count == 2
    if "val_check_interval" in trainer_kwargs:
        assert trainer.global_step == 2 * 3  # two checks, every 3 of the 10 batches
    else:
        assert trainer.current_epoch == 2 * 2


def test_squeezes_the_metric_on_a_trainer_without_a_model():
    es = EarlyStoppingCallback("foo")
    trainer = bare_trainer()
    trainer.callback_metrics["foo"] = torch.tensor([[[0.5]]])
    with mock.patch.object(es, "_evaluate_stopping_criteria", return_value=(False, "")) as evaluate:
        es._run_early_stopping_check(trainer)
    evaluate.assert_called_once_with(torch.tensor(0.5))
    # and the real check runs there too: an improvement with no module to copy
    es._run_early_stopping_check(trainer)
    assert float(es.best_score) == 0.5 and es.best_weights.state is None


def test_evaluate_stopping_criteria_called_directly_is_one_counted_check():
    # Lightning's signature and semantics without a Trainer: all criteria, no weights, no logging
    for cls in (EarlyStopping, EarlyStoppingCallback):
        es = cls("foo", patience=1)
        assert es._evaluate_stopping_criteria(torch.tensor(0.5)) == (
            False,
            "Metric foo improved. New best score: 0.500",
        )
        assert es._evaluate_stopping_criteria(torch.tensor(0.6)) == (
            True,
            "Monitored metric foo did not improve in the last 1 records. Best score: 0.500. "
            "Signaling Trainer to stop.",
        )
    gl = EarlyStoppingCallback("foo", criterion="gl", gl_alpha=10.0)
    assert gl._evaluate_stopping_criteria(torch.tensor(0.5))[0] is False
    stop, reason = gl._evaluate_stopping_criteria(torch.tensor(0.6))
    assert stop and "generalization loss GL = 20.000 > 10" in reason


def test_bad_mode_is_lightnings_exception_and_a_value_error():
    for kind in (MisconfigurationException, ValueError):
        with pytest.raises(kind, match=r"`mode` can be .* got unknown_option"):
            EarlyStoppingCallback("foo", mode="unknown_option")


def test_pickles_to_an_equal_callback():
    es = EarlyStoppingCallback("foo", criterion="pq", train_monitor="train")
    assert vars(pickle.loads(pickle.dumps(es))) == vars(es)


# --------------------------------------------------------------------------- state


class RecordStates(EarlyStoppingCallback):
    """Records its state_dict at each training-epoch end; checks a loaded state at train start."""

    def __init__(self, expected=None, **kwargs):
        super().__init__(**kwargs)
        self.expected, self.saved = expected, []

    def on_train_start(self, trainer, pl_module):
        if self.expected is not None:
            assert self.state_dict() == self.expected

    def on_train_epoch_end(self, trainer, pl_module):
        super().on_train_epoch_end(trainer, pl_module)
        self.saved.append(dict(self.state_dict()))


def test_state_is_checkpointed_and_restored_like_lightnings(tmp_path):
    es = RecordStates(monitor="abc", restore_best_weights=False)
    ckpt = ModelCheckpoint(dirpath=tmp_path, filename="{epoch}", save_top_k=-1)
    stream = [5, 4, 4.5, 4.2]
    boring_fit([es, ckpt], {"abc": stream}, on_train=True, max_epochs=4, enable_checkpointing=True)
    assert len(es.saved) == 4
    checkpoint = torch.load(tmp_path / "epoch=2.ckpt", weights_only=True)
    state = checkpoint["callbacks"][es.state_key]
    assert state == es.saved[2]
    lightning_keys = set(EarlyStopping("abc").state_dict())
    assert set(state) == lightning_keys | {
        "best_epoch",
        "num_checks",
        "train_strip",
        "best_weights",
    }
    assert (state["wait_count"], state["best_epoch"]) == (1, 1)

    resumed = RecordStates(expected=es.saved[2], monitor="abc", restore_best_weights=False)
    with pytest.raises(MisconfigurationException, match="You restored a checkpoint with"):
        boring_fit(
            [resumed],
            {"abc": stream},
            on_train=True,
            max_epochs=1,
            ckpt_path=tmp_path / "epoch=2.ckpt",
        )


def test_loads_lightnings_own_state_and_old_state():
    es = EarlyStoppingCallback("val_loss", patience=3)
    es.load_state_dict(
        {"wait_count": 2, "stopped_epoch": 5, "best_score": torch.tensor(0.5), "patience": 3}
    )
    assert (es.wait_count, es.stopped_epoch, es.stopping_reason) == (
        2,
        5,
        EarlyStoppingReason.NOT_STOPPED,
    )
    assert es.best_epoch == -1 and es.best_weights.state is None
    lightning = EarlyStopping("val_loss")
    lightning.stopping_reason = EarlyStoppingReason.PATIENCE_EXHAUSTED
    lightning.stopping_reason_message = "Test message"
    es.load_state_dict(lightning.state_dict())
    assert es.stopping_reason == EarlyStoppingReason.PATIENCE_EXHAUSTED
    assert es.stopping_reason_message == "Test message"


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


@settings(max_examples=100, deadline=None)
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


def test_non_finite_stops_even_before_start_from_epoch():
    es = EarlyStoppingCallback("val", start_from_epoch=5)
    assert drive(es, [1.0, 0.5, math.nan]) == 2
    assert es.stopping_reason == EarlyStoppingReason.NON_FINITE_METRIC
    assert es.best_epoch == -1 and math.isinf(float(es.best_score))


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
    es = EarlyStoppingCallback("val", criterion="gl", gl_alpha=5.0, patience=0)
    assert drive(es, [1.0, 0.8, 0.7, 0.72, 0.75, 0.76]) == 4
    assert es.stopping_reason == EarlyStoppingReason.PATIENCE_EXHAUSTED
    assert "generalization loss GL = 7.143 > 5" in es.stopping_reason_message


def test_progress_quotient_stops_where_hand_computation_says():
    val = [1.0, 0.9, 0.85, 0.86, 0.87, 0.9, 0.95, 1.0]
    train = [1.0, 0.9, 0.8, 0.79, 0.785, 0.784, 0.78, 0.78]
    # strips of 2: ends at epochs 1, 3, 5.  epoch 3: GL=1.18, P=6.33, PQ=0.19 <= 0.5
    # epoch 5: GL=100*(0.9/0.85-1)=5.88, P=1000*(1.569/1.568-1)=0.64, PQ=9.2 > 0.5 -> stop at 5
    # (GL alone would already exceed 2 at epoch 4, which is not a strip end)
    es = EarlyStoppingCallback(
        "val", criterion="pq", pq_alpha=0.5, strip_length=2, train_monitor="train"
    )
    assert drive(es, val, train) == 5
    assert "progress quotient GL/P_2" in es.stopping_reason_message


def prechelt_reference(val, train, criterion, alpha, k):
    e_opt = math.inf
    for t, e_va in enumerate(val):
        e_opt = min(e_opt, e_va)
        gl = 100 * (e_va / e_opt - 1)
        if criterion == "gl" and gl > alpha:
            return t
        if criterion == "pq" and (t + 1) % k == 0:
            strip = train[t + 1 - k : t + 1]
            p = 1000 * (sum(strip) / (k * min(strip)) - 1)
            if (gl / p > alpha) if p > 0 else gl > 0:
                return t
    return None


@settings(max_examples=100, deadline=None)
@given(
    data=st.lists(
        st.tuples(st.floats(0.0625, 3.0, width=32), st.floats(0.0625, 3.0, width=32)),
        min_size=1,
        max_size=20,
    ),
    criterion=st.sampled_from(["gl", "pq"]),
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


def test_old_criterion_names_still_work_with_a_deprecation_warning():
    with pytest.warns(DeprecationWarning, match="criterion='gl'"):
        es = EarlyStoppingCallback("val", criterion="generalization_loss")
    assert es.criterion == "gl"
    with pytest.warns(DeprecationWarning, match="criterion='pq'"):
        es = EarlyStoppingCallback("val", criterion="progress_quotient", train_monitor="t")
    assert es.criterion == "pq"


def test_prechelt_rejects_non_positive_errors():
    es = EarlyStoppingCallback("val", criterion="gl")
    with pytest.raises(RuntimeError, match="positive error"):
        drive(es, [0.0, 0.1])


def test_progress_quotient_in_a_fit_needs_the_training_metric():
    es = EarlyStoppingCallback("val_loss", criterion="pq", train_monitor="nope", strip_length=2)
    with pytest.raises(RuntimeError, match=r"nope.*val_loss"):
        fit(ScriptedModule([1.0] * 3), [es], max_epochs=3)
    es = EarlyStoppingCallback(
        "val_loss", criterion="pq", train_monitor="train_err", strip_length=2
    )
    val = [1.0, 0.9, 0.85, 0.86, 0.87, 0.9, 0.95, 1.0]
    train = [1.0, 0.9, 0.8, 0.79, 0.785, 0.784, 0.78, 0.78]
    trainer = fit(ScriptedModule(val, train_stream=train), [es], max_epochs=8)
    assert es.stopped_epoch == 5 and trainer.current_epoch == 6


# --------------------------------------------------------------------------- restoring weights


STREAM = [1.0, 0.8, 0.5, 0.9, 0.7, 0.6, 0.65, 0.55, 0.8, 0.9]  # best at epoch 2


def assert_state_equal(module, state):
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
    assert es.stopped_epoch == 5 and es.best_epoch == 2 and trainer.current_epoch == 6
    assert_state_equal(module, capture.by_epoch[2])
    assert state_hash(capture.by_epoch[2]) != state_hash(capture.by_epoch[5])
    assert all(v.device.type == "cpu" for v in es.best_weights.state.values())
    assert es.best_weights.saves == 3  # epochs 0, 1 and 2 improve


def test_restores_on_max_epochs_and_not_when_disabled():
    for restore in (True, False):
        torch.manual_seed(0)
        capture = CaptureWeights()
        es = EarlyStoppingCallback("val_loss", patience=100, restore_best_weights=restore)
        module = ScriptedModule(STREAM[:5], lr=0.2)
        fit(module, [es, capture], max_epochs=5)
        assert es.stopped_epoch == 0
        assert_state_equal(module, capture.by_epoch[2 if restore else 4])
    assert state_hash(capture.by_epoch[2]) != state_hash(capture.by_epoch[4])


def test_an_improvement_that_reaches_the_stopping_threshold_is_restored():
    # min_epochs keeps training one epoch past the stop signal, so the final weights differ
    torch.manual_seed(0)
    capture = CaptureWeights()
    es = EarlyStoppingCallback("val_loss", stopping_threshold=0.45)
    module = ScriptedModule([1.0, 0.8, 0.4, 0.5], lr=0.2)
    fit(module, [es, capture], max_epochs=4, min_epochs=4)
    assert es.stopping_reason == EarlyStoppingReason.STOPPING_THRESHOLD and es.stopped_epoch == 2
    assert es.best_epoch == 2 and float(es.best_score) == pytest.approx(0.4)
    assert_state_equal(module, capture.by_epoch[2])
    assert state_hash(capture.by_epoch[2]) != state_hash(capture.by_epoch[3])


def test_a_non_finite_value_is_never_the_best():
    # in max mode +inf compares as an improvement; with check_finite it stops and is not kept
    es = EarlyStoppingCallback("val", mode="max")
    assert drive(es, [0.5, 0.7, math.inf]) == 2
    assert es.stopping_reason == EarlyStoppingReason.NON_FINITE_METRIC
    assert float(es.best_score) == pytest.approx(0.7)
    es = EarlyStoppingCallback("val", mode="max", check_finite=False)
    assert drive(es, [0.5, 0.7, math.inf]) is None
    assert float(es.best_score) == math.inf  # as Lightning's, when non-finite values are allowed


def test_restored_weights_survive_a_resume(tmp_path):
    torch.manual_seed(0)
    capture = CaptureWeights()
    ckpt = ModelCheckpoint(dirpath=tmp_path, filename="{epoch}", save_top_k=-1)
    es = EarlyStoppingCallback("val_loss", patience=100)
    fit(
        ScriptedModule(STREAM, lr=0.2), [es, ckpt, capture], max_epochs=5, enable_checkpointing=True
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
    assert resumed.best_epoch == 2
    assert_state_equal(module, best)
    assert state_hash(best) != state_hash(capture2.by_epoch[7])


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
    assert es.best_weights.saves == 4
    # Lightning copies no weights; we copy each tensor once per improvement, nothing else
    assert counts == [0, 4 * n_tensors]


def test_best_weights_reuse_their_buffers():
    module = nn.Linear(3, 2)
    best = BestWeights()
    best.save(module)
    ptrs = [b.data_ptr() for b in best.state.values()]
    with torch.no_grad():
        module.weight.add_(1.0)
    best.save(module)
    assert [b.data_ptr() for b in best.state.values()] == ptrs
    assert torch.equal(best.state["weight"], module.weight)
    assert best.state["weight"].data_ptr() != module.weight.data_ptr()


class WrapFirstLayerAt(Callback):
    """Mid-fit surgery: wraps the first Linear of the MLP in a Sequential (keys change)."""

    def __init__(self, epoch: int):
        self.epoch = epoch

    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch == self.epoch:
            pl_module.model[0] = nn.Sequential(pl_module.model[0])


def test_restore_after_mid_fit_surgery_explains_what_happened():
    # issue 10: this used to fail with a raw "Missing key(s) in state_dict"
    es = EarlyStoppingCallback("val_loss", patience=100)
    module = ScriptedModule([1.0, 0.5, 0.9, 0.9], lr=0.2)
    with pytest.raises(RuntimeError, match=r"model changed after they were saved.*`setup`"):
        fit(module, [es, WrapFirstLayerAt(2)], max_epochs=4)
    assert "model.0.0.weight" in module.state_dict()  # nothing was half-loaded


def test_surgery_before_the_first_save_restores_fine():
    torch.manual_seed(0)
    capture = CaptureWeights()
    es = EarlyStoppingCallback("val_loss", patience=100)
    module = ScriptedModule([1.0, 0.5, 0.9, 0.9], lr=0.2)
    fit(module, [WrapFirstLayerAt(0), es, capture], max_epochs=4)
    assert_state_equal(module, capture.by_epoch[1])
    assert state_hash(capture.by_epoch[1]) != state_hash(capture.by_epoch[3])


# --------------------------------------------------------------------------- arguments


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(patience=-1), "patience"),
        (dict(criterion="magic"), "criterion"),
        (dict(start_from_epoch=-1), "start_from_epoch"),
        (dict(min_delta=math.nan), "min_delta"),
        (dict(min_delta=-0.1), "min_delta"),
        (dict(baseline=math.nan), "baseline"),
        (dict(stopping_threshold=math.nan), "stopping_threshold"),
        (dict(gl_alpha=0.0), "gl_alpha"),
        (dict(strip_length=0), "strip_length"),
        (dict(criterion="pq"), "train_monitor"),
        (dict(criterion="gl", mode="max"), "mode='min'"),
        (dict(monitor=""), "monitor"),
    ],
)
def test_bad_arguments_raise_value_error(kwargs, match):
    kwargs = {"monitor": "val_loss", **kwargs}
    with pytest.raises(ValueError, match=match):
        EarlyStoppingCallback(**kwargs)


@pytest.mark.parametrize(
    "name", ["stopping_threshold", "divergence_threshold", "min_delta", "baseline"]
)
@pytest.mark.parametrize("value", ["1", True, [1.0]])
def test_non_numbers_are_rejected_at_construction(name, value):
    # issue 10: stopping_threshold="1" / True were accepted and failed later, mid-fit
    with pytest.raises((TypeError, ValueError), match=name):
        EarlyStoppingCallback("val", **{name: value})


def test_numpy_scalars_are_accepted():
    es = EarlyStoppingCallback(
        "val",
        patience=np.int64(1),
        min_delta=np.float32(0.0),
        stopping_threshold=np.float64(0.1),
        baseline=np.float32(2.0),
        start_from_epoch=np.int64(1),
    )
    assert type(es.patience) is int and type(es.stopping_threshold) is float
    assert drive(es, [1.0, 0.9, 0.95, 1.0]) == 2


# --------------------------------------------------------------------------- logging


class MemoryLogger(Logger):
    def __init__(self):
        super().__init__()
        self.metrics: list[tuple[int | None, dict]] = []

    @property
    def name(self):
        return "memory"

    @property
    def version(self):
        return 0

    def log_hyperparams(self, params, *args, **kwargs):
        pass

    def log_metrics(self, metrics, step=None):
        self.metrics.append((step, dict(metrics)))


@pytest.mark.parametrize("on_train_epoch_end", [True, False])
def test_logs_wait_and_best_score_to_the_loggers(on_train_epoch_end):
    logger = MemoryLogger()
    es = EarlyStoppingCallback("val_loss", patience=1, check_on_train_epoch_end=on_train_epoch_end)
    fit(ScriptedModule([1.0, 0.5, 0.7, 0.9]), [es], max_epochs=4, logger=logger)
    ours = [(s, m) for s, m in logger.metrics if "reg/early_stopping/wait" in m]
    assert [m["reg/early_stopping/wait"] for _, m in ours] == [0.0, 0.0, 1.0]
    assert [m["reg/early_stopping/best_score"] for _, m in ours] == [1.0, 0.5, 0.5]
    # at the step of the epoch's own metrics (two optimizer steps per epoch)
    assert [s for s, _ in ours] == [s for s, m in logger.metrics if "val_loss" in m] == [1, 3, 5]


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
        "es:\n  monitor: val_loss\n  criterion: pq\n  train_monitor: train_loss_epoch\n"
        "  baseline: 0.5\n  min_delta: 0.1\n  mode: min\n  check_on_train_epoch_end: false\n"
    )
    es = parser.instantiate_classes(cfg).es
    assert isinstance(es, EarlyStoppingCallback)
    assert (es.criterion, es.train_monitor, es.baseline) == ("pq", "train_loss_epoch", 0.5)
    # Lightning's own arguments reach the parent through **kwargs, and unknown ones are refused
    assert (es.min_delta, es.mode, es._check_on_train_epoch_end) == (-0.1, "min", False)
    cfg = parser.parse_string("es:\n  monitor: val_loss\n  patience: 7\n  verbose: true\n")
    es = parser.instantiate_classes(cfg).es
    assert (es.patience, es.verbose, es.strict) == (7, True, True)
    with pytest.raises(SystemExit):
        parser.parse_string("es:\n  monitor: val_loss\n  patients: 7\n")
