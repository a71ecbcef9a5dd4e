"""Expert parallelism on DeepSpeed's own machinery: its process groups, its all-to-all, its MoE contract.

`shard_experts` swaps the ``experts`` of every MoE layer for an `ExpertParallelExperts`: this rank's
E / ep_size experts behind the same ``(x_ND, tokens_per_expert_E) -> y_ND`` interface, so routing, dispatch,
capacity, padding masking, task-aware routing and the router losses stay exactly MegaMoE's.

The module is a ``deepspeed.moe.layer.MoE`` and lays its experts out the way DeepSpeed's native MoE does
(``deepspeed_moe.experts.deepspeed_experts.<local id>``, parameters tagged ``allreduce=False`` with the
expert group name). That is the contract the DeepSpeed engine keys on: ZeRO-1/2 then reduce and
partition expert gradients and optimizer states over the expert-data-parallel group, and
``save_checkpoint`` writes one file per global expert. DeepSpeed refuses ZeRO-3 for this contract
(``_validate_zero3_moe_compatibility``); ZeRO-3 with EP exists only for AutoEP layers, which bring their own
router and SwiGLU-without-bias experts, so `check_topology` refuses ZeRO-3 with EP for MegaMoE experts
(HF MoE backbones get AutoEP: `autoep.py`).

Token exchange (shape legend: N rows sorted by global expert, E experts, L = E / ep local experts,
R = rows this rank receives):
  1. all-to-all of the per-expert row counts, so every rank knows what it will receive;
  2. all-to-all of the rows themselves (variable splits, DeepSpeed's ``_AllToAllV``); rows arrive grouped
     by (source rank, local expert) and are regrouped by local expert;
  3. each local expert runs on its rows; every expert runs, on zero rows if need be, so every expert
     parameter gets a gradient on every rank and the ZeRO reduction hooks fire in lockstep (no hang);
  4. the reverse all-to-all brings the outputs home, in the order they left.
"""

from collections.abc import Callable, Sequence

import torch
from deepspeed import comm as dist
from deepspeed.module_inject.auto_ep_layer import _AllToAllV
from deepspeed.moe.experts import Experts
from deepspeed.moe.layer import MoE
from deepspeed.utils import groups
from torch import nn

from ..model.moe_experts import GroupedExperts
from ..model.moe_layer import MoEFeedForward


def expert_group_name(ep_size: int) -> str:
    """DeepSpeed's name for the expert-parallel group of this size (``MoE.expert_group_name``)."""
    return f"ep_size_{ep_size}"


def create_expert_parallel_groups(ep_size: int) -> None:
    """DeepSpeed's expert-parallel groups (consecutive ranks) and expert-data-parallel groups (strided)."""
    if expert_group_name(ep_size) not in groups._get_expert_parallel_group_dict():
        groups._create_expert_and_data_parallel(ep_size)


class ExpertParallelExperts(MoE):
    """This rank's share of one layer's experts, fed by DeepSpeed's all-to-all.

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
        first = ep_rank * self.num_local_experts
        local = [_single_expert(experts, first + i) for i in range(self.num_local_experts)]
        self.deepspeed_moe = _ExpertShard(local, self.expert_group_name)

    def forward(self, x_ND: torch.Tensor, tokens_per_expert_E: torch.Tensor) -> torch.Tensor:
        group = self.deepspeed_moe.ep_group
        num_local = self.num_local_experts
        # 1. Row counts: sent[r, i] rows go to local expert i of rank r; received[s, i] come from rank s.
        sent_RL = tokens_per_expert_E.view(self.ep_size, num_local)
        received_RL = torch.empty_like(sent_RL)
        dist.all_to_all_single(received_RL, sent_RL.contiguous(), group=group)
        send_splits = sent_RL.sum(1).tolist()
        receive_splits = received_RL.sum(1).tolist()
        # 2. Rows out, then regrouped from (source, local expert) order to local-expert order. The rows past
        #    the groups are the dispatch plan's tail, which no expert computes: they stay home.
        num_rows = x_ND.shape[0]
        x_RD = _AllToAllV.apply(group, x_ND[: sum(send_splits)], send_splits, receive_splits)
        local_id = torch.arange(num_local, device=x_ND.device).repeat(self.ep_size)
        order = torch.argsort(local_id.repeat_interleave(received_RL.reshape(-1)), stable=True)
        # 3. Every local expert runs, on zero rows if it got none.
        rows_per_local_expert = received_RL.sum(0)
        chunks = x_RD.index_select(0, order).split(rows_per_local_expert.tolist())
        y_sorted = torch.cat(
            [
                expert(chunk, rows_per_local_expert[i : i + 1])
                for i, (chunk, expert) in enumerate(
                    zip(chunks, self.deepspeed_moe.experts.deepspeed_experts, strict=True)
                )
            ]
        )
        # 4. Back to arrival order, then home, where the tail is zeros.
        y_RD = y_sorted.index_select(0, torch.argsort(order))
        y_ND = _AllToAllV.apply(group, y_RD, receive_splits, send_splits)
        return torch.cat([y_ND, y_ND.new_zeros(num_rows - y_ND.shape[0], y_ND.shape[1])])

    def set_deepspeed_parallelism(self, use_data_before_expert_parallel_: bool = False) -> None:
        if use_data_before_expert_parallel_:
            raise ValueError("megamoe builds expert-parallel groups over consecutive ranks (E + D topology)")
        create_expert_parallel_groups(self.ep_size)
        self.deepspeed_moe.ep_group = groups._get_expert_parallel_group(self.expert_group_name)


class _ExpertShard(nn.Module):
    """Holds the local experts where DeepSpeed's checkpointing looks for them: ``experts.deepspeed_experts``."""

    def __init__(self, local_experts: list[GroupedExperts], group_name: str):
        super().__init__()
        self.experts = Experts(local_experts[0], len(local_experts), group_name)
        # Experts deep-copies its template L times; put each local expert's own weights in.
        self.experts.deepspeed_experts.load_state_dict(
            {f"{i}.{k}": v for i, expert in enumerate(local_experts) for k, v in expert.state_dict().items()}
        )
        self.ep_group: dist.ProcessGroup | None = None

    def _set_ep_group(self, group: dist.ProcessGroup) -> None:
        self.ep_group = group


def _single_expert(experts: GroupedExperts, index: int) -> GroupedExperts:
    """Expert ``index`` of a stack, as a 1-expert `GroupedExperts` with its own copy of the weights."""
    one = GroupedExperts(
        1,
        experts.down_proj.shape[1],
        experts.down_proj.shape[2],
        mlp_type="glu" if experts.is_glu else "mlp",
        hidden_act=experts.hidden_act,
        bias=experts.down_proj_bias is not None,
    )
    one.load_state_dict({k: v[index : index + 1].clone() for k, v in experts.state_dict().items()})
    return one


def shard_experts(model: nn.Module, ep_size: int) -> int:
    """Keep only this rank's experts in every MoE layer of ``model``; returns the number of layers sharded."""
    create_expert_parallel_groups(ep_size)
    ep_rank = groups._get_expert_parallel_rank(expert_group_name(ep_size))
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
    marker = ".deepspeed_moe.experts.deepspeed_experts."
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
