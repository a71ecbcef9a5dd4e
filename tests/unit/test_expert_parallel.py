"""The local experts of an expert-parallel rank: one stack, seen by DeepSpeed as its per-expert layout, and
DeepSpeed's private group functions they need (engine/deepspeed_groups.py), each called once here."""

import pytest
import torch
import torch.distributed as dist
from deepspeed.moe.utils import is_moe_param

from megamoe.engine.deepspeed_groups import (
    create_expert_parallel_groups,
    expert_group_name,
    expert_parallel_group,
    expert_parallel_rank,
)
from megamoe.engine.distributed import init_distributed
from megamoe.engine.expert_parallel import ExpertParallelExperts, unshard_expert_state_dict
from megamoe.model.moe_experts import GroupedExperts

NUM_EXPERTS, EP_SIZE = 4, 2


def full_experts(mlp_type: str) -> GroupedExperts:
    experts = GroupedExperts(NUM_EXPERTS, 16, 8, mlp_type=mlp_type, hidden_act="gelu", bias=True)
    for param in experts.parameters():
        torch.nn.init.normal_(param)
    return experts


@pytest.mark.parametrize("mlp_type", ["mlp", "glu"])
def test_the_state_dict_shows_deepspeeds_per_expert_layout_of_the_stacked_local_experts(mlp_type):
    full = full_experts(mlp_type)
    shard = ExpertParallelExperts(full, EP_SIZE, ep_rank=1)  # holds global experts 2 and 3
    state = shard.state_dict()
    names = list(full.state_dict())
    assert sorted(state) == sorted(
        f"deepspeed_moe.experts.deepspeed_experts.{i}.{name}" for i in range(2) for name in names
    )
    for name, value in full.state_dict().items():
        for local in range(2):
            per_expert = state[f"deepspeed_moe.experts.deepspeed_experts.{local}.{name}"]
            assert per_expert.shape == (1, *value.shape[1:])
            torch.testing.assert_close(per_expert, value[2 + local : 3 + local], rtol=0, atol=0)
    # The layout DeepSpeed writes is what it reads back: into another rank-1 shard, stacked again.
    other = ExpertParallelExperts(
        GroupedExperts(NUM_EXPERTS, 16, 8, mlp_type=mlp_type, hidden_act="gelu", bias=True), EP_SIZE, 1
    )
    other.load_state_dict(state)
    for name, value in other.local_experts.state_dict().items():
        torch.testing.assert_close(value, full.state_dict()[name][2:4], rtol=0, atol=0)


def test_a_missing_expert_slice_is_named_by_a_strict_load():
    shard = ExpertParallelExperts(full_experts("mlp"), EP_SIZE, ep_rank=0)
    state = shard.state_dict()
    del state["deepspeed_moe.experts.deepspeed_experts.1.down_proj"]
    with pytest.raises(RuntimeError, match=r"deepspeed_experts\.1\.down_proj"):
        shard.load_state_dict(state)


def test_the_local_experts_are_deepspeed_expert_parameters_of_their_group():
    shard = ExpertParallelExperts(full_experts("glu"), EP_SIZE, ep_rank=0)
    params = list(shard.parameters())
    assert params and all(is_moe_param(p) and p.group_name == "ep_size_2" for p in params)
    assert shard.local_experts.num_experts == 2


def test_per_expert_files_of_every_rank_unshard_into_the_full_experts():
    full = full_experts("glu")
    files = {}
    for rank in range(EP_SIZE):  # global ids, as DeepSpeed's one-file-per-expert save writes them
        for key, value in ExpertParallelExperts(full, EP_SIZE, rank).state_dict().items():
            prefix, rest = key.rsplit("deepspeed_experts.", 1)
            local, name = rest.split(".", 1)
            files[f"layer.experts.{prefix}deepspeed_experts.{rank * 2 + int(local)}.{name}"] = value
    merged = unshard_expert_state_dict(files, empty=lambda shape, dtype: torch.empty(shape, dtype=dtype))
    assert merged.keys() == {f"layer.experts.{name}" for name in full.state_dict()}
    for name, value in full.state_dict().items():
        torch.testing.assert_close(merged[f"layer.experts.{name}"], value, rtol=0, atol=0)


def test_deepspeeds_private_expert_group_functions_still_create_and_find_the_groups():
    init_distributed()
    create_expert_parallel_groups(1)
    create_expert_parallel_groups(1)  # a second layer of the same size finds the groups, creates none
    group = expert_parallel_group(1)
    assert isinstance(group, dist.ProcessGroup) and dist.get_world_size(group) == 1
    assert expert_parallel_rank(1) == 0
    assert expert_group_name(1) == "ep_size_1"
