"""Router losses: pure, keyword-only functions of one layer's routing decisions.

Shape legend: T tokens (batch x sequence, flattened), E experts, K experts per token.
Padding tokens (``token_mask_T == False``) never count: they are excluded from both the expert
fractions and the mean router probabilities, for every K.
"""

from typing import NamedTuple

import torch


def load_balancing_loss(
    *,
    router_probs_TE: torch.Tensor,
    expert_ids_TK: torch.Tensor,
    token_mask_T: torch.Tensor,
    num_experts: int,
) -> torch.Tensor:
    """Switch / GShard load-balancing loss ``E * sum_e f_e * P_e``.

    ``f_e`` is the fraction of the (token, slot) assignments that went to expert ``e`` and ``P_e`` the
    mean router probability of ``e``, both over non-padding tokens. The value is 1.0 under a perfectly
    uniform router for any K (megablocks' normalization; HF Mixtral's equals this times K), so one
    coefficient means the same thing across top-k settings. Gradients flow through ``P_e`` only.

    Args:
        router_probs_TE: softmax of the router logits, float32.
        expert_ids_TK: chosen experts per token.
        token_mask_T: True for real tokens, False for padding.
        num_experts: E.

    Returns:
        A scalar tensor; 0 when there is no real token.
    """
    mask_T = token_mask_T.to(router_probs_TE.dtype)
    num_tokens = mask_T.sum().clamp(min=1.0)
    top_k = expert_ids_TK.shape[-1]
    assignments_E = torch.zeros(num_experts, dtype=mask_T.dtype, device=mask_T.device)
    assignments_E.scatter_add_(0, expert_ids_TK.reshape(-1), mask_T.repeat_interleave(top_k))
    fraction_E = assignments_E / (num_tokens * top_k)
    mean_prob_E = (router_probs_TE * mask_T[:, None]).sum(dim=0) / num_tokens
    return num_experts * torch.dot(fraction_E, mean_prob_E)


def router_z_loss(*, router_logits_TE: torch.Tensor, token_mask_T: torch.Tensor) -> torch.Tensor:
    """ST-MoE router z-loss: mean over non-padding tokens of ``logsumexp(logits)**2``.

    It keeps router logits small so the float32 softmax stays well conditioned (Zoph et al. 2022).
    """
    mask_T = token_mask_T.to(router_logits_TE.dtype)
    log_z_T = torch.logsumexp(router_logits_TE, dim=-1)
    return (log_z_T.square() * mask_T).sum() / mask_T.sum().clamp(min=1.0)


class RoutingStatistics(NamedTuple):
    """One layer's router losses and load, over non-padding tokens (a NamedTuple: see `RouterOutput`)."""

    aux_loss: torch.Tensor
    z_loss: torch.Tensor
    tokens_per_expert_E: torch.Tensor
    """(token, slot) assignments per expert, int64, no gradient."""


def routing_statistics(
    *,
    router_logits_TE: torch.Tensor,
    expert_ids_TK: torch.Tensor,
    token_mask_T: torch.Tensor,
    num_experts: int,
    router_probs_TE: torch.Tensor | None = None,
) -> RoutingStatistics:
    """The load-balancing loss, the z-loss and the expert load of one layer's routing decisions.

    ``router_probs_TE``: the softmax of the logits when the caller has it already (else computed here).
    """
    with torch.no_grad():
        # Padding adds 0: no boolean-mask indexing, and no bincount (its output size depends on the data).
        tokens_per_expert_E = torch.zeros(num_experts, dtype=torch.long, device=expert_ids_TK.device)
        tokens_per_expert_E.scatter_add_(
            0, expert_ids_TK.reshape(-1), token_mask_T.long().repeat_interleave(expert_ids_TK.shape[-1])
        )
    return RoutingStatistics(
        aux_loss=load_balancing_loss(
            router_probs_TE=router_logits_TE.softmax(dim=-1) if router_probs_TE is None else router_probs_TE,
            expert_ids_TK=expert_ids_TK,
            token_mask_T=token_mask_T,
            num_experts=num_experts,
        ),
        z_loss=router_z_loss(router_logits_TE=router_logits_TE, token_mask_T=token_mask_T),
        tokens_per_expert_E=tokens_per_expert_E,
    )
