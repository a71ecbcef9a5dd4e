"""Expert parallelism on DeepSpeed's own machinery: its process groups, its MoE contract.

`shard_experts` swaps the ``experts`` of every MoE layer for an `ExpertParallelExperts`: this rank's
L = E / ep_size experts behind the same ``(x_ND, tokens_per_expert_E) -> y_ND`` interface, so routing, dispatch,
capacity, padding masking, task-aware routing and the router losses stay exactly MegaMoE's.

The local experts are one `GroupedExperts` of L stacked experts: one grouped GEMM per projection, as without
EP. To DeepSpeed the module is a ``deepspeed.moe.layer.MoE`` whose parameters are tagged ``allreduce=False``
with the expert group name: ZeRO-1/2 then reduce and partition expert gradients and optimizer states over the
expert-data-parallel group. Its checkpoint contract, one file per global expert, reads the MoE module's
state dict, where DeepSpeed's native layout is ``deepspeed_moe.experts.deepspeed_experts.<local id>.<name>``:
the state dict shows the stacked tensors in that layout, as ``[1, ...]`` slices (torch's public state-dict
hooks), and loading stacks them back. Checkpoints and exports keep the per-expert files they had with
L 1-expert modules. DeepSpeed refuses ZeRO-3 for this contract (``_validate_zero3_moe_compatibility``); ZeRO-3
with EP exists only for AutoEP layers, which bring their own router and SwiGLU-without-bias experts, so
`check_topology` refuses ZeRO-3 with EP for MegaMoE experts (HF MoE backbones get AutoEP: `autoep.py`).

Token exchange (shape legend: N rows sorted by global expert, E experts, L local experts, R = rows this rank
receives), with one host sync, the split sizes the variable all-to-all needs:
  1. all-to-all of the per-expert row counts, so every rank knows what it will receive;
  2. all-to-all of the rows themselves (torch's autograd all-to-all, variable splits); rows arrive grouped
     by (source rank, local expert) and are sorted by local expert;
  3. the local experts run on their rows as one grouped GEMM per projection; an expert with no rows still
     gets a (zero) gradient, so the ZeRO reduction hooks fire in lockstep on every rank (no hang);
  4. the reverse all-to-all brings the outputs home, in the order they left.
"""

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist
from deepspeed.moe.layer import MoE
from torch import nn
from torch.distributed.nn.functional import all_to_all_single

from ..model.moe_experts import GroupedExperts
from ..model.moe_layer import MoEFeedForward
from .deepspeed_groups import (
    create_expert_parallel_groups,
    expert_group_name,
    expert_parallel_group,
    expert_parallel_rank,
)

# Where DeepSpeed's checkpointing finds local expert i in an MoE module's state dict.
_PER_EXPERT = "deepspeed_moe.experts.deepspeed_experts."


class ExpertParallelExperts(MoE):
    """This rank's share of one layer's experts, fed by all-to-all over DeepSpeed's expert-parallel group.

    Built from the full `GroupedExperts` of the layer (every rank builds the same model, then keeps its
    slice): local expert ``i`` on EP rank ``r`` is global expert ``r * L + i``.
    """

    def __init__(self, experts: GroupedExperts, ep_size: int, ep_rank: int):
        # Not MoE.__init__: that would build DeepSpeed's own gate and capacity-padded experts. The engine
        # only reads the attributes set here and calls `set_deepspeed_parallelism`.
        nn.Module.__init__(self)
        if experts.num_experts % ep_size:
            raise ValueError(
                f"num_experts={experts.num_experts} is not divisible by expert_parallel_size={ep_size}"
            )
        self.ep_size = ep_size
        self.ep_rank = ep_rank
        self.num_experts = experts.num_experts
        self.num_local_experts = experts.num_experts // ep_size
        self.expert_group_name = expert_group_name(ep_size)
        self.enable_expert_tensor_parallelism = False
        self.use_residual = False
        self.local_experts = _expert_slice(experts, ep_rank * self.num_local_experts, self.num_local_experts)
        for param in self.local_experts.parameters():
            param.allreduce = False  # type: ignore[attr-defined]  # DeepSpeed's expert-parameter tags
            param.group_name = self.expert_group_name  # type: ignore[attr-defined]
        self.ep_group: dist.ProcessGroup | None = None
        self.register_state_dict_post_hook(_per_expert_state_dict)
        self.register_load_state_dict_pre_hook(_stacked_state_dict)

    def forward(self, x_ND: torch.Tensor, tokens_per_expert_E: torch.Tensor) -> torch.Tensor:
        group = self.ep_group
        num_local = self.num_local_experts
        # 1. Row counts: sent[r, i] rows go to local expert i of rank r; received[s, i] come from rank s.
        sent_RL = tokens_per_expert_E.view(self.ep_size, num_local).contiguous()
        received_RL = torch.empty_like(sent_RL)
        dist.all_to_all_single(received_RL, sent_RL, group=group)
        # The one host sync: the all-to-all needs its split sizes on the host.
        splits = torch.cat([sent_RL.sum(1), received_RL.sum(1)]).tolist()
        send_splits, receive_splits = splits[: self.ep_size], splits[self.ep_size :]
        # 2. Rows out; the rows past the groups are the dispatch plan's tail, which no expert computes: they
        #    stay home. Arrivals are grouped by (source rank, local expert); sorted by local expert they are
        #    the groups of the grouped GEMM.
        num_rows, hidden = x_ND.shape
        x_RD = all_to_all_single(
            x_ND.new_empty(sum(receive_splits), hidden),
            x_ND[: sum(send_splits)],
            receive_splits,
            send_splits,
            group=group,
        )
        local_id = torch.arange(num_local, device=x_ND.device).repeat(self.ep_size)
        order = torch.argsort(local_id.repeat_interleave(received_RL.reshape(-1)), stable=True)
        # 3. All local experts at once; every row belongs to a group, so none is left uncomputed.
        y_sorted = self.local_experts(x_RD.index_select(0, order), received_RL.sum(0))
        # 4. Back to arrival order, then home, where the tail is zeros.
        y_RD = torch.empty_like(y_sorted).index_copy_(0, order, y_sorted)
        y_ND = all_to_all_single(
            y_RD.new_empty(sum(send_splits), hidden), y_RD, send_splits, receive_splits, group=group
        )
        return torch.cat([y_ND, y_ND.new_zeros(num_rows - y_ND.shape[0], hidden)])

    def set_deepspeed_parallelism(self, use_data_before_expert_parallel_: bool = False) -> None:
        if use_data_before_expert_parallel_:
            raise ValueError("megamoe builds expert-parallel groups over consecutive ranks (E + D topology)")
        create_expert_parallel_groups(self.ep_size)
        self.ep_group = expert_parallel_group(self.ep_size)


def _per_expert_state_dict(
    module: ExpertParallelExperts, state_dict: dict[str, Any], prefix: str, _metadata: Any
) -> None:
    """``<prefix>local_experts.<name> [L, ...]`` as DeepSpeed's ``<prefix>deepspeed_moe.experts.deepspeed_experts.
    <i>.<name> [1, ...]`` (views, not copies), the layout its one-file-per-expert checkpointing parses."""
    for name in list(module.local_experts.state_dict()):
        stacked = state_dict.pop(f"{prefix}local_experts.{name}")
        for i in range(module.num_local_experts):
            state_dict[f"{prefix}{_PER_EXPERT}{i}.{name}"] = stacked[i : i + 1]


def _stacked_state_dict(
    module: ExpertParallelExperts,
    state_dict: dict[str, Any],
    prefix: str,
    _metadata: Any,
    _strict: bool,
    _missing_keys: list[str],
    _unexpected_keys: list[str],
    error_msgs: list[str],
) -> None:
    """The inverse of `_per_expert_state_dict`, before loading: per-expert slices stacked back. With some
    slices of a weight absent, the load fails naming them."""
    for name in list(module.local_experts.state_dict()):
        keys = [f"{prefix}{_PER_EXPERT}{i}.{name}" for i in range(module.num_local_experts)]
        present = [key for key in keys if key in state_dict]
        if len(present) == len(keys):
            state_dict[f"{prefix}local_experts.{name}"] = torch.cat([state_dict.pop(key) for key in keys])
        elif present:
            absent = sorted(set(keys) - set(present))
            error_msgs.append(f"missing the expert slice(s) {absent} of {prefix}local_experts.{name}")


def _expert_slice(experts: GroupedExperts, first: int, count: int) -> GroupedExperts:
    """Experts ``first .. first + count - 1`` of a stack, as a `GroupedExperts` with its own copy of the weights."""
    local = GroupedExperts(
        count,
        experts.down_proj.shape[1],
        experts.down_proj.shape[2],
        mlp_type="glu" if experts.is_glu else "mlp",
        hidden_act=experts.hidden_act,
        bias=experts.down_proj_bias is not None,
    )
    local.load_state_dict({k: v[first : first + count].clone() for k, v in experts.state_dict().items()})
    return local


def shard_experts(model: nn.Module, ep_size: int) -> int:
    """Keep only this rank's experts in every MoE layer of ``model``; returns the number of layers sharded."""
    create_expert_parallel_groups(ep_size)
    ep_rank = expert_parallel_rank(ep_size)
    layers = [m for m in model.modules() if isinstance(m, MoEFeedForward)]
    for layer in layers:
        layer.experts = ExpertParallelExperts(layer.experts, ep_size, ep_rank)
    return len(layers)


def unshard_expert_state_dict(
    state_dict: dict[str, torch.Tensor],
    empty: Callable[[Sequence[int], torch.dtype], torch.Tensor],
) -> dict[str, torch.Tensor]:
    """Map per-expert keys (``<layer>.experts.deepspeed_moe.experts.deepspeed_experts.<g>.<w>`` holding
    ``[1, ...]`` slices, global ids ``g``) back to the stacked ``<layer>.experts.<w>`` of the unsharded model,
    each stacked into a tensor from ``empty(shape, dtype)``."""
    marker = f".{_PER_EXPERT}"
    stacked: dict[str, dict[int, torch.Tensor]] = {}
    merged: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        if marker not in key:
            merged[key] = value
            continue
        prefix, rest = key.split(marker)
        expert_id, weight_name = rest.split(".", 1)
        stacked.setdefault(f"{prefix}.{weight_name}", {})[int(expert_id)] = value
    for key, by_id in stacked.items():
        ids = sorted(by_id)
        if ids != list(range(len(ids))):
            raise ValueError(f"{key}: experts {ids} found, expected 0..{ids[-1]}; is a shard missing?")
        parts = [by_id[i] for i in ids]
        stacked_shape = (sum(part.shape[0] for part in parts), *parts[0].shape[1:])
        merged[key] = torch.cat(parts, out=empty(stacked_shape, parts[0].dtype))
    return merged
