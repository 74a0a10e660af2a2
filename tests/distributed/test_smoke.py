import pytest

from tests.distributed.scenarios_smoke import fit_plain


@pytest.mark.ddp
def test_pool_runs_two_trainers(ddp_pool):
    for _ in range(2):
        out = ddp_pool.run(fit_plain)
        assert [o[:2] for o in out] == [(2, 0), (2, 1)]
        assert out[0][2] == out[1][2]
