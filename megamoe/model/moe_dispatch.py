"""Dropless (or capacity-limited) token dispatch by sorting assignments by expert.

Shape legend: T tokens, D hidden size, E experts, K experts per token,
A = T*K (token, slot) assignments, N kept assignments (N <= A).

Memory is O(A * D): no [tokens, experts, capacity] mask is ever built.
"""

import math
from dataclasses import dataclass

import torch


@dataclass
class DispatchPlan:
    """Where each kept (token, slot) assignment goes, rows sorted by expert.

    Attributes:
        token_idx_N: source token of each row.
        weights_N: combine weight of each row (differentiable: gradients reach the router).
        tokens_per_expert_E: rows per expert, int64; the group sizes of the grouped matmul.
        num_dropped: assignments dropped at capacity (int64 scalar; 0 when dropless).
    """

    token_idx_N: torch.Tensor
    weights_N: torch.Tensor
    tokens_per_expert_E: torch.Tensor
    num_dropped: torch.Tensor


def expert_capacity(*, num_tokens: int, top_k: int, num_experts: int, capacity_factor: float) -> int:
    """GShard capacity: each expert takes at most ``ceil(capacity_factor * tokens * k / E)`` assignments."""
    return math.ceil(capacity_factor * num_tokens * top_k / num_experts)


def plan_dispatch(
    *,
    expert_ids_TK: torch.Tensor,
    weights_TK: torch.Tensor,
    token_mask_T: torch.Tensor,
    num_experts: int,
    capacity_factor: float | None = None,
) -> DispatchPlan:
    """Sort assignments by expert, leaving out padding and (with a capacity) the overflow."""
    num_tokens, top_k = expert_ids_TK.shape
    # 1. Slot-major flattening, a = k*T + t: a stable sort then puts, inside every expert, all first
    #    choices before any second choice (GShard's priority under capacity), each in token order.
    expert_ids_A = expert_ids_TK.t().reshape(-1)
    weights_A = weights_TK.t().reshape(-1)
    # 2. Padding goes to a sentinel expert E, which sorts after every real one and is cut off below.
    sentinel_ids_A = torch.where(token_mask_T.repeat(top_k), expert_ids_A, num_experts)
    order_A = torch.argsort(sentinel_ids_A, stable=True)
    routed_E = torch.bincount(sentinel_ids_A, minlength=num_experts + 1)[:num_experts]

    if capacity_factor is None:
        # 3a. Dropless: keep every routed assignment (one host sync for the row count).
        kept_A = order_A[: int(routed_E.sum())]
        kept_E = routed_E
    else:
        # 3b. Capacity: a row survives when its rank inside its expert's group is below capacity.
        capacity = expert_capacity(
            num_tokens=int(token_mask_T.sum()),
            top_k=top_k,
            num_experts=num_experts,
            capacity_factor=capacity_factor,
        )
        sorted_ids_A = sentinel_ids_A[order_A]
        group_start_E = torch.cumsum(routed_E, dim=0) - routed_E
        group_start_A = torch.cat([group_start_E, group_start_E.new_zeros(1)])[sorted_ids_A]
        rank_A = torch.arange(order_A.numel(), device=order_A.device) - group_start_A
        kept_A = order_A[(sorted_ids_A < num_experts) & (rank_A < capacity)]
        kept_E = routed_E.clamp(max=capacity)

    return DispatchPlan(
        token_idx_N=kept_A % num_tokens,
        weights_N=weights_A[kept_A],
        tokens_per_expert_E=kept_E,
        num_dropped=routed_E.sum() - kept_E.sum(),
    )


def permute(x_TD: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
    """Gather token rows into expert order: ``x_ND``."""
    return x_TD.index_select(0, plan.token_idx_N)


def unpermute(y_ND: torch.Tensor, plan: DispatchPlan, num_tokens: int) -> torch.Tensor:
    """Weight each expert output row and sum it back into its token: ``y_TD`` (zeros where nothing was routed)."""
    weighted_ND = y_ND * plan.weights_N[:, None]
    # scatter_add, not index_add: index_add's backward keeps its whole [N, D] source alive (expand_as),
    # scatter_add's keeps only the index, an expanded view that costs no memory.
    index_ND = plan.token_idx_N[:, None].expand_as(weighted_ND)
    return weighted_ND.new_zeros(num_tokens, y_ND.shape[-1]).scatter_add(0, index_ND, weighted_ND)
