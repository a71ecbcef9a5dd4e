"""Top-k softmax router.

Shape legend: T tokens, D hidden size, E experts, K experts per token.
"""

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .moe_losses import routing_statistics


class RouterOutput(NamedTuple):
    """One layer's routing decisions.

    A NamedTuple, like `RouterStats`: DeepSpeed ZeRO-3 finds a module's output tensors inside tuples and
    dicts (not dataclasses) to re-gather the module's partitioned weights before their backward.

    Attributes:
        weights_TK: combine weight of each chosen expert, in the input dtype.
        expert_ids_TK: chosen experts, int64.
        tokens_per_expert_E: (token, slot) assignments per expert over non-padding tokens, before capacity.
        router_logits_TE: float32 logits, for analysis and the z-loss.
        aux_loss: load-balancing loss (scalar, unscaled).
        z_loss: router z-loss (scalar, unscaled).
    """

    weights_TK: torch.Tensor
    expert_ids_TK: torch.Tensor
    tokens_per_expert_E: torch.Tensor
    router_logits_TE: torch.Tensor
    aux_loss: torch.Tensor
    z_loss: torch.Tensor


class TopKRouter(nn.Module):
    """Softmax over E experts, then top-k (Switch for k=1, GShard/Mixtral for k>1).

    With ``num_tasks > 0`` the router is task-aware: a learned per-task bias on the logits, which is
    what a linear router computes when a one-hot task id is concatenated to its input (task-level MoE,
    Kudugunta et al. 2021; MMoE, Ma et al. 2018). It starts at zero, i.e. task-agnostic.
    """

    def __init__(
        self,
        hidden_size: int,
        num_experts: int,
        top_k: int,
        *,
        norm_topk_prob: bool = True,
        jitter_noise: float = 0.0,
        num_tasks: int = 0,
    ):
        super().__init__()
        self.num_experts = num_experts
        self.top_k = top_k
        self.norm_topk_prob = norm_topk_prob
        self.jitter_noise = jitter_noise
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size))
        self.task_logit_bias = nn.Parameter(torch.zeros(num_tasks, num_experts)) if num_tasks > 0 else None

    def forward(
        self, x_TD: torch.Tensor, token_mask_T: torch.Tensor, task_id: int | None = None
    ) -> RouterOutput:
        if self.training and self.jitter_noise > 0:
            x_TD = x_TD * torch.empty_like(x_TD).uniform_(1.0 - self.jitter_noise, 1.0 + self.jitter_noise)
        # Routing in float32: bf16 logits flip top-k choices between otherwise identical runs.
        router_logits_TE = F.linear(x_TD.float(), self.weight.float())
        if self.task_logit_bias is not None:
            if task_id is None:
                raise ValueError("this router is task-aware (task_aware_routing=True): pass the task")
            router_logits_TE = router_logits_TE + self.task_logit_bias[task_id].float()
        router_probs_TE = router_logits_TE.softmax(dim=-1)
        weights_TK, expert_ids_TK = router_probs_TE.topk(self.top_k, dim=-1)
        if self.norm_topk_prob:
            weights_TK = weights_TK / weights_TK.sum(dim=-1, keepdim=True)

        statistics = routing_statistics(
            router_logits_TE=router_logits_TE,
            router_probs_TE=router_probs_TE,
            expert_ids_TK=expert_ids_TK,
            token_mask_T=token_mask_T,
            num_experts=self.num_experts,
        )
        return RouterOutput(
            weights_TK=weights_TK.to(x_TD.dtype),
            expert_ids_TK=expert_ids_TK,
            tokens_per_expert_E=statistics.tokens_per_expert_E,
            router_logits_TE=router_logits_TE,
            aux_loss=statistics.aux_loss,
            z_loss=statistics.z_loss,
        )
