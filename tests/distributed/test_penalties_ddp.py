import pytest

from tests.distributed.scenarios_penalties import CALLBACKS, fit_each_callback


@pytest.mark.ddp
@pytest.mark.parametrize("precision, accumulate", [("32-true", 1), ("bf16-mixed", 2)])
def test_weight_regularizers_keep_ddp_replicas_identical(ddp_pool, precision, accumulate):
    rank0, rank1 = ddp_pool.run(fit_each_callback, precision, accumulate)
    for name in CALLBACKS:
        assert rank0[name][0] == rank1[name][0], f"{name}: replicas diverged"
    # every callback changed the result relative to no regularization
    for name in CALLBACKS:
        if name != "none":
            assert rank0[name][0] != rank0["none"][0], f"{name} did nothing"
    assert rank0["max_norm"][1] <= 0.5 * (1 + 1e-6)
