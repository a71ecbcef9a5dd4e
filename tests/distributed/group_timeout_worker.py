"""Build an engine with expert parallelism (EP=2) and write the timeout of every process group this rank is in:
the world group, and the expert-parallel / expert-data-parallel groups DeepSpeed creates without a timeout
argument (run by test_expert_parallel.py)."""

import argparse
import json
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed import distributed_c10d

from megamoe.config import ParallelSection, TrainSection
from megamoe.engine.deepspeed_engine import Engine, deepspeed_config
from tests.distributed.ep_worker import tiny_model


def group_timeout_seconds(group: dist.ProcessGroup) -> float:
    backend = group._get_backend(torch.device("cpu"))
    return backend.options._timeout.total_seconds()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--backbone", help="an HF MoE model_type: AutoEP creates the groups")
    args = parser.parse_args()
    Engine(
        tiny_model(4, args.backbone),
        deepspeed_config(
            TrainSection(max_steps=2, micro_batch_size=4), ParallelSection(expert_parallel_size=2)
        ),
        expert_parallel_size=2,
        timeout_minutes=7.0,
    )
    groups = [
        group for group in distributed_c10d._world.pg_map if not distributed_c10d._rank_not_in_group(group)
    ]
    timeouts = {distributed_c10d._world.pg_names[group]: group_timeout_seconds(group) for group in groups}
    (args.out / f"timeouts_rank{dist.get_rank()}.json").write_text(json.dumps(timeouts))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
