"""DeepSpeed's expert-parallel process groups, the one place megamoe calls their private functions.

DeepSpeed has no public API to create or look up the expert-parallel (EP) and expert-data-parallel (EDP)
groups its MoE engine keys on: its own ``deepspeed.moe.layer.MoE`` calls these same ``groups._…`` functions.
tests/unit/test_deepspeed_groups.py calls each one and fails when DeepSpeed renames or changes it.
"""

import torch.distributed as dist
from deepspeed.utils import groups


def expert_group_name(ep_size: int) -> str:
    """DeepSpeed's name for the expert-parallel group of this size (``MoE.expert_group_name``)."""
    return f"ep_size_{ep_size}"


def create_expert_parallel_groups(ep_size: int) -> None:
    """DeepSpeed's EP groups (consecutive ranks) and EDP groups (strided), once per size."""
    if expert_group_name(ep_size) not in groups._get_expert_parallel_group_dict():
        groups._create_expert_and_data_parallel(ep_size)


def expert_parallel_group(ep_size: int) -> dist.ProcessGroup:
    """This rank's expert-parallel group: the ranks that share one layer's experts between them."""
    return groups._get_expert_parallel_group(expert_group_name(ep_size))


def expert_parallel_rank(ep_size: int) -> int:
    """This rank's index in its expert-parallel group: which slice of the experts it holds."""
    return groups._get_expert_parallel_rank(expert_group_name(ep_size))
