"""The process group: joined first (with the run's timeout, which every later group inherits), and the
once-per-node work done by each node's local rank 0 while its peers wait.

`megamoe train` joins before it prepares data or builds the model, as torchtitan and OLMo-core do: ZeRO-3
builds the model partitioned (`deepspeed.zero.Init`), which needs the group, and N ranks racing to prepare
the same builtin dataset or model in one cache directory would each download and write it.
"""

import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta

import deepspeed
import torch
import torch.distributed as dist
from torch.distributed import distributed_c10d


def init_distributed(timeout_minutes: float = 30.0) -> None:
    """Join the process group the launcher set up; a plain `python` run becomes a 1-rank group.

    A second call (the engine's, after `megamoe train` joined first) does nothing.
    """
    if dist.is_initialized():
        return
    if "RANK" not in os.environ:
        # Not under deepspeed / torchrun / accelerate: a single process with a private port.
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        os.environ.update(
            MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", LOCAL_RANK="0", WORLD_SIZE="1"
        )
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":  # before any collective: each rank's tensors on its own GPU, not all on cuda:0
        torch.cuda.set_device(local_rank() % torch.cuda.device_count())
    timeout = timedelta(minutes=timeout_minutes)
    set_default_group_timeout(timeout)
    if backend == "gloo":  # only DeepSpeed's CPU accelerator has the shm all-reduce
        _skip_deepspeed_shared_memory_op()
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, verbose=False, timeout=timeout)


def set_default_group_timeout(timeout: timedelta) -> None:
    """Make ``timeout`` what `torch.distributed.new_group` gives a group created without one, on NCCL and gloo.

    DeepSpeed creates its expert-parallel and expert-data-parallel groups (`deepspeed.utils.groups`, AutoEP's
    layers) with ``new_group(ranks)`` and no timeout argument, so they get torch's module defaults, not the
    world group's: 30 min on gloo, 10 min on NCCL (`default_pg_nccl_timeout`, a separate global that patching
    `default_pg_timeout` alone misses). No public argument reaches those calls; these two globals are what
    `new_group` reads (`_get_default_timeout`), and tests/unit/test_distributed.py fails if torch stops
    reading them.
    """
    distributed_c10d.default_pg_timeout = timeout
    distributed_c10d.default_pg_nccl_timeout = timeout


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def local_world_size() -> int:
    """How many ranks this node runs: torchrun's ``LOCAL_WORLD_SIZE``, the deepspeed launcher's ``LOCAL_SIZE``;
    1 when neither says (then each rank counts as a node of its own)."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("LOCAL_SIZE", "1")))


def collective_device() -> torch.device:
    """Where a tensor for a world-group collective lives: this rank's GPU under NCCL (which takes no CPU
    tensor), the CPU under gloo or without a process group."""
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


@contextmanager
def local_main_first() -> Iterator[None]:
    """Each node's local rank 0 runs the block first, the node's other ranks after it (from its cache).

    As `accelerate.PartialState().local_main_process_first()` / transformers' `main_process_first`: one
    world barrier, entered before the block by the waiting ranks and after it by the local mains. A local main
    that fails exits, and the launcher takes the waiting ranks down with it.
    """
    if local_rank() != 0:
        dist.barrier()
    yield
    if local_rank() == 0:
        dist.barrier()


def _skip_deepspeed_shared_memory_op() -> None:
    """Keep DeepSpeed's CPU backend from compiling and starting its shared-memory all-reduce op.

    DeepSpeed builds ``deepspeed_shm_comm`` with the C++ compiler when it joins a CPU process group (~55 s on a
    fresh 2-core machine, cached after) and maps a 64 MiB ``/dev/shm`` workspace per rank that it never removes
    (a day of CPU runs piled up 22 GiB in RAM-backed /dev/shm on a 24 GiB host). Only its
    ``inference_all_reduce`` (tensor-parallel inference kernels) uses the op; training collectives go through
    torch.distributed's gloo. DeepSpeed builds it only if its op table marks it compatible, and that table is
    the only switch (private: tests/unit/test_distributed.py fails when it changes).
    """
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
