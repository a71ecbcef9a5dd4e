"""The sparse MoE feed-forward layer: router | dispatch | experts | combine (+ shared experts).

Shape legend: B batch, S sequence, T = B*S tokens, D hidden size, E experts, K experts per token,
N expert-sorted rows.
"""

from typing import Any, NamedTuple

import torch
from torch import nn

from .moe_dispatch import permute, plan_dispatch, unpermute
from .moe_experts import FeedForward, GroupedExperts
from .moe_router import TopKRouter


class RouterStats(NamedTuple):
    """What one MoE layer did with a batch.

    Attributes:
        layer_idx: index of the encoder layer.
        aux_loss: load-balancing loss (unscaled).
        z_loss: router z-loss (unscaled).
        tokens_per_expert: (token, slot) assignments per expert over real tokens, before capacity, int64 [E].
        dropped_tokens: assignments dropped at capacity (int64 scalar).
    """

    layer_idx: int
    aux_loss: torch.Tensor
    z_loss: torch.Tensor
    tokens_per_expert: torch.Tensor
    dropped_tokens: torch.Tensor


class MoEFeedForward(nn.Module):
    """Top-k routed experts with sort-based grouped dispatch; dropless unless a capacity factor is set.

    Padding tokens (``token_mask == False``) are not routed at all: they cost no expert compute, never
    count in capacity, statistics or losses, and get a zero routed output.
    """

    def __init__(
        self,
        hidden_size: int,
        *,
        num_experts: int,
        top_k: int,
        expert_intermediate_size: int,
        mlp_type: str,
        hidden_act: str,
        bias: bool,
        norm_topk_prob: bool = True,
        capacity_factor: float | None = None,
        jitter_noise: float = 0.0,
        num_shared_experts: int = 0,
        num_tasks: int = 0,
        layer_idx: int = 0,
    ):
        super().__init__()
        self.num_experts = num_experts
        self.capacity_factor = capacity_factor
        self.layer_idx = layer_idx
        self.router = TopKRouter(
            hidden_size,
            num_experts,
            top_k,
            norm_topk_prob=norm_topk_prob,
            jitter_noise=jitter_noise,
            num_tasks=num_tasks,
        )
        ffn_kwargs: dict[str, Any] = {"mlp_type": mlp_type, "hidden_act": hidden_act, "bias": bias}
        self.experts = GroupedExperts(num_experts, hidden_size, expert_intermediate_size, **ffn_kwargs)
        self.shared_experts = (
            FeedForward(hidden_size, num_shared_experts * expert_intermediate_size, **ffn_kwargs)
            if num_shared_experts > 0
            else None
        )

    def forward(
        self, x_BSD: torch.Tensor, token_mask_BS: torch.Tensor, task_id: int | None = None
    ) -> tuple[torch.Tensor, RouterStats]:
        batch, seq, hidden = x_BSD.shape
        x_TD = x_BSD.reshape(-1, hidden)
        token_mask_T = token_mask_BS.reshape(-1).bool()

        # 1. Route every token to its top-k experts (float32 router, padding masked out of the losses).
        routing = self.router(x_TD, token_mask_T, task_id)
        # 2. Sort the kept (token, slot) assignments by expert; padding and overflow go to the tail.
        plan = plan_dispatch(
            expert_ids_TK=routing.expert_ids_TK,
            weights_TK=routing.weights_TK,
            token_mask_T=token_mask_T,
            num_experts=self.num_experts,
            capacity_factor=self.capacity_factor,
        )
        # 3. Run each expert on its contiguous group of rows (grouped GEMM), then
        # 4. weight the rows and sum them back into their tokens.
        y_ND = self.experts(permute(x_TD, plan), plan.group_sizes_E)
        y_TD = unpermute(y_ND, plan, num_tokens=x_TD.shape[0])
        if self.shared_experts is not None:
            y_TD = y_TD + self.shared_experts(x_TD)

        stats = RouterStats(
            layer_idx=self.layer_idx,
            aux_loss=routing.aux_loss,
            z_loss=routing.z_loss,
            tokens_per_expert=routing.tokens_per_expert_E,
            dropped_tokens=plan.num_dropped,
        )
        return y_TD.reshape(batch, seq, hidden), stats
