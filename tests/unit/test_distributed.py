"""The process group's timeout reaches groups created without one (torch's module defaults, which
`set_default_group_timeout` sets: the one place megamoe touches them)."""

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
