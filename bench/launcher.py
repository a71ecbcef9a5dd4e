"""The deepspeed launcher command the benchmarks start their ranks with."""

import socket
import sys
from pathlib import Path


def deepspeed_launcher(num_ranks: int) -> list[str]:
    """``deepspeed --num_gpus N --master_port P --no_local_rank``, P a port free now: without it every job
    takes 29500, and a second one on the host (a soak beside another bench) fails with EADDRINUSE."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    deepspeed = str(Path(sys.executable).parent / "deepspeed")
    return [deepspeed, "--num_gpus", str(num_ranks), "--master_port", str(port), "--no_local_rank"]
