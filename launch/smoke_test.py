"""Check a launch before a long run: every rank joins the process group and one all-reduce adds up.

Run it in place of `megamoe train` with any mode of launch/train.sh, e.g.
`launch/train.sh --num-gpus 2 --script launch/smoke_test.py`. Each rank prints one line; rank 0 prints
`smoke test passed: N ranks` when the sum of the ranks reached every rank. Uses NCCL on GPUs, gloo on CPU.
"""

import os
import socket
from datetime import timedelta

import torch
import torch.distributed as dist


def main() -> None:
    rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    world_size = int(os.environ["WORLD_SIZE"])
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        backend, device = "nccl", torch.device("cuda", local_rank)
    else:
        backend, device = "gloo", torch.device("cpu")
    dist.init_process_group(backend, timeout=timedelta(minutes=5))
    total = torch.tensor([float(rank)], device=device)
    dist.all_reduce(total)
    expected = world_size * (world_size - 1) / 2
    print(
        f"rank {rank}/{world_size} local_rank {local_rank} on {socket.gethostname()} "
        f"({backend}, {os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}): all_reduce {total.item():g}",
        flush=True,
    )
    if total.item() != expected:
        raise SystemExit(f"rank {rank}: all_reduce gave {total.item():g}, expected {expected:g}")
    dist.barrier()
    if rank == 0:
        print(f"smoke test passed: {world_size} ranks", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
