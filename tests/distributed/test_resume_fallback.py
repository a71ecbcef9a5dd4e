"""Two ranks through the deepspeed launcher agree on the checkpoint to resume from when only one of them can
see that the newest is damaged: the node's ranks split the CRC reading, so the other never reads that file."""

import json

import pytest
import torch

from megamoe.checkpoint.resume import LATEST, RUN_INFO, tag_for
from tests.conftest import flip_bytes_inside
from tests.distributed.launcher import deepspeed_launch

pytestmark = pytest.mark.slow


def write_checkpoint(checkpoints, step: int) -> list:
    """A complete checkpoint of 2 ranks as far as resuming can tell, with 4 weight files."""
    tag_dir = checkpoints / tag_for(step)
    tag_dir.mkdir(parents=True)
    files = [tag_dir / f"file_{i}.pt" for i in range(4)]
    for file in files:
        torch.save({"weight": torch.full((1000,), float(step))}, file)
    for rank in (0, 1):
        torch.save({}, tag_dir / f"megamoe_rank{rank:05d}.pt")
    topology = {"world_size": 2, "expert_parallel_size": 1, "zero_stage": 2}
    (tag_dir / RUN_INFO).write_text(json.dumps({"step": step, "format": 2, "topology": topology}))
    (checkpoints / LATEST).write_text(tag_dir.name)
    return files


def test_the_ranks_agree_to_fall_back_when_one_finds_damage_inside_a_file(tmp_path):
    checkpoints = tmp_path / "run" / "checkpoints"
    write_checkpoint(checkpoints, 1)
    files = write_checkpoint(checkpoints, 2)
    # Sorted, the tag's files are file_0..3 then the two rank files: index 1 is local rank 1's to read.
    record = flip_bytes_inside(files[1])
    result = deepspeed_launch(
        "tests/distributed/whole_checkpoint_worker.py",
        "--run-dir",
        str(tmp_path / "run"),
        "--out",
        str(tmp_path),
    )
    assert [(tmp_path / f"chosen_rank{rank}.txt").read_text() for rank in (0, 1)] == [tag_for(1)] * 2
    assert f"rank 1: {files[1]} is damaged (Bad CRC-32 for file '{record}')" in result.stdout
    assert (
        f"{checkpoints / tag_for(2)} has a damaged file (named by another rank above). Resuming from the "
        f"previous complete checkpoint, {checkpoints / tag_for(1)}"
    ) in result.stdout
