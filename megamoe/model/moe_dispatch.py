"""Dropless (or capacity-limited) token dispatch by sorting assignments by expert, on static shapes.

Shape legend: T tokens, D hidden size, E experts, K experts per token,
A = T*K (token, slot) assignments, flattened slot-major (a = k*T + t), N = A expert-sorted rows.

Every shape is fixed by T and K, so the layer runs forward and backward without reading a count to the host
(no ``.item()``, ``.tolist()``, boolean-mask indexing, ``nonzero`` or data-sized ``bincount``) and
``torch.compile(fullgraph=True)`` traces it whole. The N rows are the kept assignments sorted by expert, then a
tail of the ones not kept (padding and, with a capacity, the overflow) that no expert computes: the grouped
GEMM leaves it uninitialized, and no output or gradient depends on it. Neither gather reads it: an assignment
that was not kept points at row 0 with scale 0, and row 0 is always computed (a kept row, or when nothing is
kept, one row of the last expert's group), so it is finite and adds exactly 0. The tail's combine weights
are 0 through a select, which also drops the gradient computed from the tail's contents.

Memory is O(A * D): no [tokens, experts, capacity] mask is ever built.

Both directions of the token <-> row exchange are gathers, forward and backward: ``permute`` gathers token
rows into expert order (``x[token_idx_N]``); its backward and ``unpermute`` (the combine) gather each
token's K rows back through ``row_idx_KT`` and add them. No ``index_add`` / ``scatter_add`` is left on the
hot path (a scatter needs a zero-filled output, and on GPUs atomics); the routing weight is applied in the
combine, on D-wide rows, and only ``y_ND`` is saved for its gradient.
"""

from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class DispatchPlan:
    """Where each (token, slot) assignment goes: N = T*K rows, the kept ones sorted by expert, then the tail.

    Attributes:
        token_idx_N: source token of each row.
        weights_N: combine weight of each row, 0 in the tail (differentiable: gradients reach the router).
        group_sizes_E: rows in each expert's group, int64, summing to at most N: its kept assignments (and
            row 0 in the last group when nothing was kept); the group sizes of the grouped matmul.
        num_dropped: assignments dropped at capacity (int64 scalar; 0 when dropless).
        row_idx_KT: row of assignment (slot k, token t), the inverse of ``token_idx_N`` on the kept rows; 0 (a
            computed row) where the assignment was not kept.
        kept_KT: which assignments were kept, as 0/1 in the weights' dtype.
    """

    token_idx_N: torch.Tensor
    weights_N: torch.Tensor
    group_sizes_E: torch.Tensor
    num_dropped: torch.Tensor
    row_idx_KT: torch.Tensor
    kept_KT: torch.Tensor


def expert_capacity(
    *, num_tokens: torch.Tensor, top_k: int, num_experts: int, capacity_factor: float
) -> torch.Tensor:
    """GShard capacity: each expert takes at most ``ceil(capacity_factor * tokens * k / E)`` assignments.

    ``num_tokens`` (the real tokens) stays a device tensor, so the capacity is never read to the host; float64
    gives the same value as the Python float arithmetic ``math.ceil(capacity_factor * n * k / E)``. The rows
    are bounded by the static T*K whatever the capacity.
    """
    return torch.ceil(capacity_factor * num_tokens.to(torch.float64) * top_k / num_experts).long()


def plan_dispatch(
    *,
    expert_ids_TK: torch.Tensor,
    weights_TK: torch.Tensor,
    token_mask_T: torch.Tensor,
    num_experts: int,
    capacity_factor: float | None = None,
) -> DispatchPlan:
    """Sort assignments by expert, moving padding and (with a capacity) the overflow to the tail."""
    num_tokens, top_k = expert_ids_TK.shape
    num_rows = num_tokens * top_k
    device = expert_ids_TK.device
    # 1. Slot-major flattening, a = k*T + t: a stable sort then puts, inside every expert, all first
    #    choices before any second choice (GShard's priority under capacity), each in token order.
    expert_ids_A = expert_ids_TK.t().reshape(-1)
    weights_A = weights_TK.t().reshape(-1)
    # 2. Padding goes to a sentinel expert E, which sorts after every real one, into the tail.
    sentinel_ids_A = torch.where(token_mask_T.repeat(top_k), expert_ids_A, num_experts)
    order_N = torch.argsort(sentinel_ids_A, stable=True)
    sorted_ids_N = sentinel_ids_A[order_N]
    # Group ends by binary search in the sorted ids (a bincount's output size would depend on the data).
    experts_E = torch.arange(num_experts, device=device, dtype=sorted_ids_N.dtype)
    routed_end_E = torch.searchsorted(sorted_ids_N, experts_E, right=True)
    routed_E = torch.diff(routed_end_E, prepend=routed_end_E.new_zeros(1))

    if capacity_factor is None:
        # 3a. Dropless: every routed assignment is kept, and they already come first.
        kept_E = routed_E
        rows_N = order_N
    else:
        # 3b. Capacity: a row survives when its rank inside its expert's group is below capacity; a stable
        #     sort on "dropped" then moves the overflow to the tail and keeps the kept rows in expert order.
        capacity = expert_capacity(
            num_tokens=token_mask_T.sum(),
            top_k=top_k,
            num_experts=num_experts,
            capacity_factor=capacity_factor,
        )
        group_start_N = (routed_end_E - routed_E)[sorted_ids_N.clamp(max=num_experts - 1)]
        rank_N = torch.arange(num_rows, device=device) - group_start_N
        dropped_N = (sorted_ids_N == num_experts) | (rank_N >= capacity)
        kept_E = routed_E.clamp(max=capacity)
        rows_N = order_N[torch.argsort(dropped_N.to(torch.uint8), stable=True)]

    # 4. Row 0 is what the assignments that were not kept read, with scale 0: when nothing was kept, the last
    #    expert computes it anyway (finite, so 0 * row = 0; its weight is 0, so its gradient is 0).
    num_kept = kept_E.sum()
    group_sizes_E = torch.cat([kept_E[:-1], kept_E[-1:] + (num_kept == 0).long()])
    # 5. The inverse permutation, for the gathers of the combine and of the permute's backward.
    row_N = torch.arange(num_rows, device=device)
    row_of_A = torch.empty_like(rows_N).scatter_(0, rows_N, row_N)
    kept_A = row_of_A < num_kept
    # The tail's weights are 0 through a select, not a product: their gradient (read from the tail of the
    # expert output) is dropped, whatever it holds.
    weights_N = torch.where(row_N < num_kept, weights_A.index_select(0, rows_N), 0.0)

    return DispatchPlan(
        token_idx_N=rows_N % num_tokens,
        weights_N=weights_N,
        group_sizes_E=group_sizes_E,
        num_dropped=routed_E.sum() - num_kept,
        row_idx_KT=torch.where(kept_A, row_of_A, 0).view(top_k, num_tokens),
        kept_KT=kept_A.to(weights_TK.dtype).view(top_k, num_tokens),
    )


def _gather_sum(src_ND: torch.Tensor, row_idx_KT: torch.Tensor, scale_KT: torch.Tensor) -> torch.Tensor:
    """``out[t] = sum_k scale[k, t] * src[row_idx[k, t]]``, with K gathers and no scatter.

    A row with scale 0 adds exactly 0 (the plan points it at row 0, a computed, finite expert row).
    """
    top_k = row_idx_KT.shape[0]
    out_TD = src_ND.index_select(0, row_idx_KT[0]).mul_(scale_KT[0, :, None])
    gathered_TD = torch.empty_like(out_TD) if top_k > 1 else out_TD
    for k in range(1, top_k):
        torch.index_select(src_ND, 0, row_idx_KT[k], out=gathered_TD)
        out_TD.addcmul_(gathered_TD, scale_KT[k, :, None])
    return out_TD


class _Permute(torch.autograd.Function):
    """``x_ND = x_TD[token_idx_N]``; backward gathers each token's K row gradients instead of ``index_add``.

    The tail rows' gradient is never read (the grouped GEMM does not compute it): they carry weight 0 in the
    combine, so their true gradient is 0.
    """

    @staticmethod
    def forward(
        ctx: Any,
        x_TD: torch.Tensor,
        token_idx_N: torch.Tensor,
        row_idx_KT: torch.Tensor,
        kept_KT: torch.Tensor,
    ) -> torch.Tensor:
        ctx.save_for_backward(row_idx_KT, kept_KT)
        return x_TD.index_select(0, token_idx_N)

    @staticmethod
    def backward(ctx: Any, grad_ND: torch.Tensor) -> tuple[torch.Tensor | None, None, None, None]:
        row_idx_KT, kept_KT = ctx.saved_tensors
        return _gather_sum(grad_ND.contiguous(), row_idx_KT, kept_KT.to(grad_ND.dtype)), None, None, None


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
        kept_KT: torch.Tensor,
    ) -> torch.Tensor:
        ctx.save_for_backward(y_ND, weights_N, token_idx_N)
        # The weight of assignment (k, t), 0 where it was not kept.
        weights_KT = weights_N.to(y_ND.dtype).index_select(0, row_idx_KT.reshape(-1)).view_as(row_idx_KT)
        weights_KT.mul_(kept_KT.to(weights_KT.dtype))
        return _gather_sum(y_ND, row_idx_KT, weights_KT)

    @staticmethod
    def backward(
        ctx: Any, grad_TD: torch.Tensor
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, None, None, None]:
        y_ND, weights_N, token_idx_N = ctx.saved_tensors
        # Row n's gradient is its token's output gradient: a gather, then scaled in place. In the tail it is
        # 0 for y (weight 0); for the weights it is whatever the unread tail of y_ND holds, and the plan's
        # ``torch.where`` that zeroed the tail weights zeroes it too before it reaches the router.
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
    """Weight each expert output row and sum it back into its token: ``y_TD`` (zeros where nothing was kept)."""
    if plan.row_idx_KT.shape[1] != num_tokens:
        raise ValueError(f"the plan is for {plan.row_idx_KT.shape[1]} tokens, not num_tokens={num_tokens}")
    return _Unpermute.apply(y_ND, plan.weights_N, plan.token_idx_N, plan.row_idx_KT, plan.kept_KT)
