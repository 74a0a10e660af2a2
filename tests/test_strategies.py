"""Sharded strategies: the combinations that cannot work raise a clear error naming the strategy."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy, ModelParallelStrategy

from lightning_reg import (
    EarlyStoppingCallback,
    GhostBatchNormCallback,
    L2Callback,
    MaxNormCallback,
    PreciseBatchNormCallback,
    StochasticDepthCallback,
    WeightConstraintCallback,
)
from lightning_reg.core.strategies import refuse_strategies
from tests.helpers.matrix import MatrixBlock, MatrixModule


def _trainer(strategy):
    return SimpleNamespace(
        strategy=strategy, optimizers=[], val_check_interval=1.0, check_val_every_n_epoch=1
    )


SETUP_REFUSALS = [
    (lambda: GhostBatchNormCallback(4), "GhostBatchNormCallback"),
    (lambda: PreciseBatchNormCallback(2), "PreciseBatchNormCallback"),
    (lambda: StochasticDepthCallback(0.5, block_types=(MatrixBlock,)), "StochasticDepthCallback"),
    (lambda: EarlyStoppingCallback("val_loss"), r"EarlyStoppingCallback\(restore_best"),
]


@pytest.mark.parametrize("strategy", [FSDPStrategy, ModelParallelStrategy])
@pytest.mark.parametrize("factory, who", SETUP_REFUSALS)
def test_untested_sharded_combinations_fail_at_setup_naming_the_strategy(strategy, factory, who):
    with pytest.raises(RuntimeError, match=rf"{who}.*does not support {strategy.__name__}"):
        factory().setup(_trainer(strategy()), MatrixModule(), "fit")


@pytest.mark.parametrize(
    "factory", [lambda: L2Callback(0.1), lambda: MaxNormCallback(1.0)], ids=["l2", "max_norm"]
)
def test_parameter_callbacks_refuse_flattened_fsdp1_parameters(factory):
    """FSDP1 flattens parameters; ModelParallelStrategy (FSDP2) keeps them per tensor."""
    with pytest.raises(RuntimeError, match=r"does not support FSDPStrategy.*flattens"):
        factory().on_fit_start(_trainer(FSDPStrategy()), MatrixModule())


def test_whole_tensor_max_norm_refuses_fsdp2_but_unit_norms_are_allowed():
    with pytest.raises(RuntimeError, match=r"dim=None.*ModelParallelStrategy.*span shards"):
        MaxNormCallback(1.0, dim=None).on_fit_start(
            _trainer(ModelParallelStrategy()), MatrixModule()
        )
    # per-unit norms and per-element constraints pass the strategy check (FSDP2 shards dim 0)
    for callback in (MaxNormCallback(1.0), WeightConstraintCallback("non_neg", dim=None)):
        try:
            callback.on_fit_start(_trainer(ModelParallelStrategy()), MatrixModule())
        except RuntimeError as err:
            assert "does not support" not in str(err)


def test_monitor_refuses_sharded_strategies():
    from lightning_reg import RegularizationMonitorCallback

    with pytest.raises(RuntimeError, match="does not support ModelParallelStrategy"):
        RegularizationMonitorCallback().on_fit_start(
            _trainer(ModelParallelStrategy()), MatrixModule()
        )


def test_ddp_and_subclasses_pass_early_stopping_can_opt_out():
    refuse_strategies(_trainer(DDPStrategy()), "x", ("FSDPStrategy",), "why")

    class MyFSDP(FSDPStrategy):
        pass

    with pytest.raises(RuntimeError, match="does not support MyFSDP"):
        refuse_strategies(_trainer(MyFSDP()), "x", ("FSDPStrategy",), "why")
    callback = EarlyStoppingCallback("val_loss", restore_best_weights=False)
    callback.setup(_trainer(FSDPStrategy()), MatrixModule(), "fit")
