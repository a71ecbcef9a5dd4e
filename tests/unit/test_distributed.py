"""The process group's timeout reaches groups created without one (torch's module defaults, which
`set_default_group_timeout` sets: the one place megamoe touches them)."""

import os
from datetime import timedelta

import pytest
from torch.distributed import Backend, distributed_c10d

from megamoe.engine.distributed import set_default_group_timeout


@pytest.fixture
def restore_torch_defaults(monkeypatch):
    for name in ("default_pg_timeout", "default_pg_nccl_timeout"):
        monkeypatch.setattr(distributed_c10d, name, getattr(distributed_c10d, name))


@pytest.mark.parametrize("backend", [Backend.GLOO, Backend.NCCL])
def test_new_group_without_a_timeout_gets_the_run_timeout(restore_torch_defaults, backend):
    """What `torch.distributed.new_group(ranks)` (DeepSpeed's EP / EDP groups) falls back to, per backend.
    Fails when torch stops reading these globals: the timeout would then need another route."""
    assert distributed_c10d._get_default_timeout(backend) != timedelta(minutes=7)
    set_default_group_timeout(timedelta(minutes=7))
    assert distributed_c10d._get_default_timeout(backend) == timedelta(minutes=7)


def test_joining_a_cpu_group_builds_no_deepspeed_shared_memory_op(tmp_path):
    """DeepSpeed's shm all-reduce op (only its tensor-parallel inference uses it) is neither compiled (~55 s on
    a fresh machine) nor started (a 64 MiB /dev/shm workspace per rank). Fails when DeepSpeed stops reading
    the op table megamoe marks it incompatible in, or renames the op."""
    import subprocess
    import sys

    program = (
        "from deepspeed.comm import comm; from megamoe.engine.distributed import init_distributed; "
        "init_distributed(); print('shm op:', comm.cdb.shm_comm_op)"
    )
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(tmp_path / "extensions")}
    env.pop("RANK", None)
    done = subprocess.run(
        [sys.executable, "-c", program], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "shm op: None" in done.stdout
    assert not list(tmp_path.glob("extensions/**/deepspeed_shm_comm*")), "nothing was compiled"
    import deepspeed.ops.op_builder.cpu.comm as builders

    assert builders.ShareMemCommBuilder.NAME == "deepspeed_shm_comm"
