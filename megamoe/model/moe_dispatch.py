"""Dropless (or capacity-limited) token dispatch by sorting assignments by expert.

Shape legend: T tokens, D hidden size, E experts, K experts per token,
A = T*K (token, slot) assignments, flattened slot-major (a = k*T + t), N kept assignments (N <= A).

Memory is O(A * D): no [tokens, experts, capacity] mask is ever built.

Both directions of the token <-> row exchange are gathers, forward and backward: ``permute`` gathers token
rows into expert order (``x[token_idx_N]``); its backward and ``unpermute`` (the combine) gather each
token's K rows back through the inverse permutation ``row_idx_KT`` and add them. No ``index_add`` /
``scatter_add`` is left on the hot path (a scatter needs a zero-filled output, and on GPUs atomics); the
routing weight is applied in the combine, on D-wide rows, and only ``y_ND`` is saved for its gradient.
"""

import math
from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class DispatchPlan:
    """Where each kept (token, slot) assignment goes, rows sorted by expert.

    Attributes:
        token_idx_N: source token of each row.
        weights_N: combine weight of each row (differentiable: gradients reach the router).
        tokens_per_expert_E: rows per expert, int64; the group sizes of the grouped matmul.
        num_dropped: assignments dropped at capacity (int64 scalar; 0 when dropless).
        row_idx_KT: row of assignment (slot k, token t), the inverse of ``token_idx_N``; 0 (any valid row)
            where the assignment was not kept.
        kept_KT: which assignments were kept, as 0/1 in the weights' dtype; None when all were (dropless,
            no padding), which saves a multiply in the combine and in the permute's backward.
    """

    token_idx_N: torch.Tensor
    weights_N: torch.Tensor
    tokens_per_expert_E: torch.Tensor
    num_dropped: torch.Tensor
    row_idx_KT: torch.Tensor
    kept_KT: torch.Tensor | None


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

    # 4. The inverse permutation, for the gathers of the combine and of the permute's backward.
    num_kept = kept_A.numel()
    row_idx_A = torch.zeros_like(order_A)
    row_idx_A[kept_A] = torch.arange(num_kept, device=kept_A.device)
    kept_KT = None
    if num_kept < order_A.numel():
        kept_A_mask = torch.zeros(order_A.numel(), dtype=weights_TK.dtype, device=weights_TK.device)
        kept_KT = kept_A_mask.index_fill_(0, kept_A, 1.0).view(top_k, num_tokens)

    return DispatchPlan(
        token_idx_N=kept_A % num_tokens,
        weights_N=weights_A[kept_A],
        tokens_per_expert_E=kept_E,
        num_dropped=routed_E.sum() - kept_E.sum(),
        row_idx_KT=row_idx_A.view(top_k, num_tokens),
        kept_KT=kept_KT,
    )


def _gather_sum(
    src_ND: torch.Tensor, row_idx_KT: torch.Tensor, scale_KT: torch.Tensor | None
) -> torch.Tensor:
    """``out[t] = sum_k scale[k, t] * src[row_idx[k, t]]`` (scale 1 when None), with K gathers and no scatter.

    A row with scale 0 adds exactly 0 (its source row is a real, finite expert row).
    """
    top_k, num_tokens = row_idx_KT.shape
    if src_ND.shape[0] == 0:  # nothing was routed (all padding): there is no row to point at
        return src_ND.new_zeros(num_tokens, src_ND.shape[1])
    out_TD = src_ND.index_select(0, row_idx_KT[0])
    if scale_KT is not None:
        out_TD.mul_(scale_KT[0, :, None])
    gathered_TD = torch.empty_like(out_TD) if top_k > 1 else out_TD
    for k in range(1, top_k):
        torch.index_select(src_ND, 0, row_idx_KT[k], out=gathered_TD)
        if scale_KT is None:
            out_TD.add_(gathered_TD)
        else:
            out_TD.addcmul_(gathered_TD, scale_KT[k, :, None])
    return out_TD


class _Permute(torch.autograd.Function):
    """``x_ND = x_TD[token_idx_N]``; backward gathers each token's K row gradients instead of ``index_add``."""

    @staticmethod
    def forward(
        ctx: Any,
        x_TD: torch.Tensor,
        token_idx_N: torch.Tensor,
        row_idx_KT: torch.Tensor,
        kept_KT: torch.Tensor | None,
    ) -> torch.Tensor:
        ctx.save_for_backward(row_idx_KT, kept_KT)
        return x_TD.index_select(0, token_idx_N)

    @staticmethod
    def backward(ctx: Any, grad_ND: torch.Tensor) -> tuple[torch.Tensor | None, None, None, None]:
        row_idx_KT, kept_KT = ctx.saved_tensors
        kept_KT = None if kept_KT is None else kept_KT.to(grad_ND.dtype)
        return _gather_sum(grad_ND.contiguous(), row_idx_KT, kept_KT), None, None, None


class _Unpermute(torch.autograd.Function):
    """The combine ``y_TD[t] = sum_k w[k, t] * y_ND[row_idx[k, t]]`` as gathers, forward and backward.

    Saves only ``y_ND`` (for the routing weights' gradient) and the indices: the weighted ``[N, D]`` product
    is never kept.
    """

    @staticmethod
    def forward(
        ctx: Any,
        y_ND: torch.Tensor,
        weights_N: torch.Tensor,
        token_idx_N: torch.Tensor,
        row_idx_KT: torch.Tensor,
        kept_KT: torch.Tensor | None,
    ) -> torch.Tensor:
        ctx.save_for_backward(y_ND, weights_N, token_idx_N)
        # The weight of assignment (k, t), 0 where it was not kept.
        if y_ND.shape[0] == 0:
            weights_KT = None
        else:
            weights_KT = weights_N.to(y_ND.dtype).index_select(0, row_idx_KT.reshape(-1)).view_as(row_idx_KT)
            if kept_KT is not None:
                weights_KT.mul_(kept_KT.to(weights_KT.dtype))
        return _gather_sum(y_ND, row_idx_KT, weights_KT)

    @staticmethod
    def backward(
        ctx: Any, grad_TD: torch.Tensor
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, None, None, None]:
        y_ND, weights_N, token_idx_N = ctx.saved_tensors
        # Row n's gradient is its token's output gradient: a gather, then scaled in place.
        grad_out_ND = grad_TD.index_select(0, token_idx_N)
        grad_y_ND = grad_w_N = None
        if ctx.needs_input_grad[0]:
            grad_y_ND = grad_out_ND * weights_N.to(grad_out_ND.dtype)[:, None]
        if ctx.needs_input_grad[1]:
            grad_w_N = grad_out_ND.mul_(y_ND).sum(dim=-1).to(weights_N.dtype)
        return grad_y_ND, grad_w_N, None, None, None


def permute(x_TD: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
    """Gather token rows into expert order: ``x_ND``."""
    return _Permute.apply(x_TD, plan.token_idx_N, plan.row_idx_KT, plan.kept_KT)


def unpermute(y_ND: torch.Tensor, plan: DispatchPlan, num_tokens: int) -> torch.Tensor:
    """Weight each expert output row and sum it back into its token: ``y_TD`` (zeros where nothing was routed)."""
    if plan.row_idx_KT.shape[1] != num_tokens:
        raise ValueError(f"the plan is for {plan.row_idx_KT.shape[1]} tokens, not num_tokens={num_tokens}")
    return _Unpermute.apply(y_ND, plan.weights_N, plan.token_idx_N, plan.row_idx_KT, plan.kept_KT)
