"""A ZeRO-3 load on 2 ranks, twice: through `partitioned_loading`'s scatter into the partitions (fused experts
converted one rank's slice at a time) and through DeepSpeed's public `GatheredParameters` of wholly converted
tensors (what it replaced). Each rank's partitions must be equal bit for bit,
the padding zeros, and the parameters the checkpoint's values; run by test_partitioned_loading.py. Exits
non-zero on any mismatch."""

import argparse

import deepspeed
import torch
import torch.distributed as dist
from transformers import AutoModel

from megamoe.config import ParallelSection, TrainSection
from megamoe.engine import partitioned_loading
from megamoe.engine.deepspeed_engine import deepspeed_config, partitioned_construction
from megamoe.engine.distributed import init_distributed


def gathered_copy(param: torch.nn.Parameter, value: torch.Tensor) -> None:
    with deepspeed.zero.GatheredParameters([param], modifier_rank=0), torch.no_grad():
        if dist.get_rank() == 0:
            param.data.copy_(value)


def load(checkpoint: str) -> torch.nn.Module:
    config = deepspeed_config(TrainSection(max_steps=2, micro_batch_size=2), ParallelSection(zero_stage=3))
    with partitioned_construction(config):
        # fp32 from a bf16 checkpoint: the cast is part of the copy
        return partitioned_loading.load_pretrained(checkpoint, torch.float32)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--checkpoint", required=True)
    args = parser.parse_args()
    init_distributed(timeout_minutes=2.0)
    rank, world_size = dist.get_rank(), dist.get_world_size()
    scattered = load(args.checkpoint)
    # The reference: every parameter converted whole and copied through GatheredParameters.
    partitioned_loading._scatter_into_partition = gathered_copy  # type: ignore[assignment]
    partitioned_loading._load_fused_experts_by_slices = lambda *args: False  # type: ignore[assignment]
    gathered = load(args.checkpoint)

    reference = dict(gathered.named_parameters())
    uneven = []
    for name, param in scattered.named_parameters():
        other = reference[name]
        numel = param.partition_numel()
        assert numel == other.partition_numel() and param.ds_tensor.numel() == numel, name
        # What DeepSpeed reads of this rank's partition; the rest is padding (uninitialized in DeepSpeed's).
        valid = max(0, min(numel, param.ds_numel - rank * numel))
        assert torch.equal(param.ds_tensor[:valid], other.ds_tensor[:valid]), f"{name} on rank {rank}"
        assert not param.ds_tensor[valid:].any(), f"{name}'s padding on rank {rank}"
        if param.ds_numel % world_size:
            uneven.append(name)
    assert uneven, "no parameter whose size the ranks do not divide: the padding is not tested"

    expected = AutoModel.from_pretrained(args.checkpoint, dtype=torch.float32).state_dict()
    parameters = list(scattered.parameters())
    with deepspeed.zero.GatheredParameters(parameters):
        state = scattered.state_dict()
        assert state.keys() == expected.keys()
        for name, value in expected.items():
            assert torch.equal(state[name], value), name
    dist.barrier()
    if rank == 0:
        print(f"PARTITIONED-LOAD-OK {len(uneven)} uneven of {len(parameters)}")


if __name__ == "__main__":
    main()
