"""A NaN loss on one rank skips the step on every rank, through the real deepspeed launcher (2 CPU ranks,
expert parallelism): the ranks hold different experts, so a rank deciding alone would desynchronize them."""

import json

import pytest

from tests.distributed.launcher import deepspeed_launch

pytestmark = pytest.mark.slow


@pytest.mark.parametrize(
    "zero_stage", [0, 2], ids=["no ZeRO, fp32: megamoe's own check", "ZeRO-2: DeepSpeed's check"]
)
def test_a_nan_loss_on_one_rank_skips_that_step_on_every_rank(tmp_path, zero_stage):
    deepspeed_launch(
        "tests/distributed/nan_worker.py", "--out", str(tmp_path), "--zero-stage", str(zero_stage)
    )
    for rank in (0, 1):
        result = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert result["skipped_steps"] == [4], (rank, result)
        # Step 3 is the first with a learning rate above 0 (DeepSpeed's WarmupDecayLR); 4 is the poisoned one.
        assert result["changed"] == {"2": False, "3": True, "4": False, "5": True, "6": True}, (rank, result)
        assert result["finite"], rank
