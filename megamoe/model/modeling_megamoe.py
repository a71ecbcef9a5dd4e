"""MegaMoE: a transformer encoder with sparse Mixture-of-Experts feed-forward layers, shared by task heads.

Read top to bottom: embeddings → attention → encoder layer (dense FFN or MoE) → backbone → task heads →
the multi-task model. Single-device code: expert parallelism and ZeRO are applied from outside by the
engine. This file ships to the Hub as remote code, so it imports only torch, transformers and its
sibling files.

Shape legend: B batch, S sequence, D hidden size, H heads, Dh head dim, C task outputs.
"""

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModel, PreTrainedModel
from transformers import initialization as init
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.utils import ModelOutput

from .configuration_megamoe import MegaMoEConfig
from .moe_experts import FeedForward, GroupedExperts
from .moe_layer import MoEFeedForward, RouterStats
from .moe_losses import routing_statistics
from .moe_router import TopKRouter

IGNORE_INDEX = -100


def token_mask(input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """``[B, S]`` bool, True for real tokens (all of them without an attention mask)."""
    return torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()


class MegaMoERMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_f32 = x.float()
        x_f32 = x_f32 * torch.rsqrt(x_f32.square().mean(-1, keepdim=True) + self.eps)
        return self.weight * x_f32.to(x.dtype)


def make_norm(config: MegaMoEConfig) -> nn.Module:
    if config.norm_type == "rmsnorm":
        return MegaMoERMSNorm(config.hidden_size, eps=config.layer_norm_eps)
    return nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)


class MegaMoEEmbeddings(nn.Module):
    """Token (+ learned absolute position, + token type) embeddings, then a norm and dropout, as in BERT."""

    word_embeddings: nn.Module

    def __init__(self, config: MegaMoEConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(
            config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id
        )
        self.position_embeddings = (
            nn.Embedding(config.max_position_embeddings, config.hidden_size)
            if config.position_embedding_type == "absolute"
            else None
        )
        self.token_type_embeddings = (
            nn.Embedding(config.type_vocab_size, config.hidden_size) if config.type_vocab_size > 0 else None
        )
        self.norm = make_norm(config)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(
        self, input_ids: torch.Tensor, position_ids: torch.Tensor, token_type_ids: torch.Tensor | None
    ) -> torch.Tensor:
        x_BSD = self.word_embeddings(input_ids)
        if self.position_embeddings is not None:
            x_BSD = x_BSD + self.position_embeddings(position_ids)
        if self.token_type_embeddings is not None:
            if token_type_ids is None:
                token_type_ids = torch.zeros_like(input_ids)
            x_BSD = x_BSD + self.token_type_embeddings(token_type_ids)
        return self.dropout(self.norm(x_BSD))


class MegaMoERotaryEmbedding(nn.Module):
    """Rotary position embedding (RoFormer) on queries and keys."""

    inv_freq: torch.Tensor

    def __init__(self, config: MegaMoEConfig):
        super().__init__()
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.theta = config.rope_theta
        self.register_buffer("inv_freq", self.compute_inv_freq(), persistent=False)

    def compute_inv_freq(self) -> torch.Tensor:
        return 1.0 / (self.theta ** (torch.arange(0, self.head_dim, 2, dtype=torch.float32) / self.head_dim))

    def forward(self, position_ids_BS: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs_BSd = position_ids_BS[..., None].float() * self.inv_freq
        angles_BSDh = torch.cat([freqs_BSd, freqs_BSd], dim=-1)
        return angles_BSDh.cos(), angles_BSDh.sin()


def apply_rotary(x_BHSDh: torch.Tensor, cos_BSDh: torch.Tensor, sin_BSDh: torch.Tensor) -> torch.Tensor:
    first, second = x_BHSDh.chunk(2, dim=-1)
    rotated = torch.cat([-second, first], dim=-1)
    cos, sin = cos_BSDh[:, None].to(x_BHSDh.dtype), sin_BSDh[:, None].to(x_BHSDh.dtype)
    return x_BHSDh * cos + rotated * sin


class MegaMoEAttention(nn.Module):
    """Bidirectional multi-head self-attention with torch SDPA."""

    def __init__(self, config: MegaMoEConfig):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.dropout = config.attention_probs_dropout_prob
        bias = config.attention_bias
        self.q_proj = nn.Linear(config.hidden_size, config.hidden_size, bias=bias)
        self.k_proj = nn.Linear(config.hidden_size, config.hidden_size, bias=bias)
        self.v_proj = nn.Linear(config.hidden_size, config.hidden_size, bias=bias)
        self.o_proj = nn.Linear(config.hidden_size, config.hidden_size, bias=bias)

    def forward(
        self,
        x_BSD: torch.Tensor,
        attention_bias_B11S: torch.Tensor,
        rotary: tuple[torch.Tensor, torch.Tensor] | None,
    ) -> torch.Tensor:
        batch, seq, hidden = x_BSD.shape
        # shape: [B, S, D] -> [B, H, S, Dh]
        q, k, v = (
            proj(x_BSD).view(batch, seq, self.num_heads, self.head_dim).transpose(1, 2)
            for proj in (self.q_proj, self.k_proj, self.v_proj)
        )
        if rotary is not None:
            q, k = apply_rotary(q, *rotary), apply_rotary(k, *rotary)
        out_BHSDh = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attention_bias_B11S, dropout_p=self.dropout if self.training else 0.0
        )
        return self.o_proj(out_BHSDh.transpose(1, 2).reshape(batch, seq, hidden))


class MegaMoELayer(GradientCheckpointingLayer):
    """Self-attention then a feed-forward sublayer (dense or MoE), each with a residual and a norm.

    Post-norm (BERT): ``x = norm(x + sublayer(x))``. Pre-norm: ``x = x + sublayer(norm(x))``.
    """

    def __init__(self, config: MegaMoEConfig, layer_idx: int):
        super().__init__()
        self.pre_norm = config.norm_position == "pre"
        self.attention = MegaMoEAttention(config)
        self.attention_norm = make_norm(config)
        self.ffn_norm = make_norm(config)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        ffn_kwargs: dict[str, Any] = {
            "mlp_type": config.mlp_type,
            "hidden_act": config.hidden_act,
            "bias": config.mlp_bias,
        }
        self.is_moe = config.is_moe_layer(layer_idx)
        self.mlp: nn.Module
        if self.is_moe:
            self.mlp = MoEFeedForward(
                config.hidden_size,
                num_experts=config.num_experts,
                top_k=config.num_experts_per_tok,
                expert_intermediate_size=config.moe_intermediate_size,
                norm_topk_prob=config.norm_topk_prob,
                capacity_factor=config.capacity_factor,
                jitter_noise=config.router_jitter_noise,
                num_shared_experts=config.num_shared_experts,
                num_tasks=len(config.tasks) if config.task_aware_routing else 0,
                layer_idx=layer_idx,
                **ffn_kwargs,
            )
        else:
            self.mlp = FeedForward(config.hidden_size, config.intermediate_size, **ffn_kwargs)

    def _feed_forward(
        self, x_BSD: torch.Tensor, token_mask_BS: torch.Tensor, task_id: int | None
    ) -> tuple[torch.Tensor, RouterStats | None]:
        if self.is_moe:
            return self.mlp(x_BSD, token_mask_BS, task_id)
        return self.mlp(x_BSD), None

    def forward(
        self,
        x_BSD: torch.Tensor,
        attention_bias_B11S: torch.Tensor,
        token_mask_BS: torch.Tensor,
        rotary: tuple[torch.Tensor, torch.Tensor] | None = None,
        task_id: int | None = None,
    ) -> tuple[torch.Tensor, RouterStats | None]:
        if self.pre_norm:
            x_BSD = x_BSD + self.dropout(
                self.attention(self.attention_norm(x_BSD), attention_bias_B11S, rotary)
            )
            ffn_out, stats = self._feed_forward(self.ffn_norm(x_BSD), token_mask_BS, task_id)
            return x_BSD + self.dropout(ffn_out), stats
        x_BSD = self.attention_norm(x_BSD + self.dropout(self.attention(x_BSD, attention_bias_B11S, rotary)))
        ffn_out, stats = self._feed_forward(x_BSD, token_mask_BS, task_id)
        return self.ffn_norm(x_BSD + self.dropout(ffn_out)), stats


class MegaMoEPreTrainedModel(PreTrainedModel):
    config_class = MegaMoEConfig
    config: MegaMoEConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["MegaMoELayer"]  # noqa: RUF012 (a PreTrainedModel attribute)
    _supports_sdpa = True

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        std = self.config.initializer_range
        if isinstance(module, GroupedExperts):
            init.normal_(module.up_weight, mean=0.0, std=std)
            init.normal_(module.down_proj, mean=0.0, std=std)
            for bias in (module.up_bias, module.down_proj_bias):
                if bias is not None:
                    init.zeros_(bias)
        elif isinstance(module, TopKRouter):
            init.normal_(module.weight, mean=0.0, std=std)
            if module.task_logit_bias is not None:
                init.zeros_(module.task_logit_bias)
        elif isinstance(module, MegaMoERMSNorm):
            init.ones_(module.weight)
        elif isinstance(module, MegaMoERotaryEmbedding):
            # from_pretrained builds on the meta device and never loads non-persistent buffers: recompute.
            init.copy_(module.inv_freq, module.compute_inv_freq())

    def num_active_parameters(self) -> int:
        """Parameters one token uses: everything but the routed experts it is not sent to (all heads counted)."""
        # Routed experts sit at `layers.N.mlp.experts` in MegaMoE and in every supported HF MoE backbone.
        routed = sum(
            p.numel()
            for name, module in self.named_modules()
            if name.endswith("mlp.experts")
            for p in module.parameters()
        )
        inactive = routed * (1 - self.config.num_experts_per_tok / self.config.num_experts)
        return self.num_parameters() - round(inactive)


@dataclass
class MegaMoEModelOutput(ModelOutput):
    """Backbone output.

    Attributes:
        last_hidden_state: ``[B, S, D]``.
        hidden_states: per-layer inputs plus the final output when requested.
        router_stats: one `RouterStats` per MoE layer, in layer order.
    """

    last_hidden_state: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    router_stats: list[RouterStats] | None = None


class MegaMoEModel(MegaMoEPreTrainedModel):
    """The shared backbone: embeddings and N encoder layers (+ a final norm when pre-norm)."""

    def __init__(self, config: MegaMoEConfig):
        super().__init__(config)
        self.embeddings = MegaMoEEmbeddings(config)
        self.rotary = MegaMoERotaryEmbedding(config) if config.position_embedding_type == "rope" else None
        self.layers = nn.ModuleList(MegaMoELayer(config, i) for i in range(config.num_hidden_layers))
        self.final_norm = make_norm(config) if config.norm_position == "pre" else None
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.embeddings.word_embeddings

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.embeddings.word_embeddings = value

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        task_id: int | None = None,
        output_hidden_states: bool = False,
    ) -> MegaMoEModelOutput:
        batch, seq = input_ids.shape
        if seq > self.config.max_position_embeddings:
            raise ValueError(
                f"sequence length {seq} exceeds max_position_embeddings={self.config.max_position_embeddings}; "
                "truncate the inputs (tokenizer truncation=True, max_length=...)"
            )
        token_mask_BS = token_mask(input_ids, attention_mask)
        if position_ids is None:
            position_ids = torch.arange(seq, device=input_ids.device).expand(batch, seq)

        x_BSD = self.embeddings(input_ids, position_ids, token_type_ids)
        # An additive bias, not a boolean mask: a fully padded row then attends uniformly instead of giving NaN.
        attention_bias_B11S = torch.zeros(batch, 1, 1, seq, dtype=x_BSD.dtype, device=x_BSD.device)
        attention_bias_B11S.masked_fill_(~token_mask_BS[:, None, None, :], torch.finfo(x_BSD.dtype).min)
        rotary = self.rotary(position_ids) if self.rotary is not None else None

        all_hidden_states: list[torch.Tensor] = []
        router_stats: list[RouterStats] = []
        for layer in self.layers:
            if output_hidden_states:
                all_hidden_states.append(x_BSD)
            x_BSD, stats = layer(x_BSD, attention_bias_B11S, token_mask_BS, rotary, task_id)
            if stats is not None:
                router_stats.append(stats)
        if self.final_norm is not None:
            x_BSD = self.final_norm(x_BSD)
        if output_hidden_states:
            all_hidden_states.append(x_BSD)
        return MegaMoEModelOutput(
            last_hidden_state=x_BSD,
            hidden_states=tuple(all_hidden_states) if output_hidden_states else None,
            router_stats=router_stats,
        )


class MegaMoEHFBackbone(nn.Module):
    """The shared backbone taken from an HF MoE model (`config.backbone`: Qwen3-MoE, Mixtral, OLMoE, ...).

    The HF base model (no LM head) runs with its own attention, routing and experts; MegaMoE computes the
    router losses and statistics from the router logits it records, with padding masked out for every k
    (HF's base models compute no aux loss, and its LM heads count padding for k > 1). The chosen experts
    are the top-k of the logits: exact for softmax-then-top-k routers (Qwen, Mixtral, OLMoE, DeepSeek-V2
    greedy); an approximation for group-limited or bias-corrected routing (DeepSeek-V3), which only the
    statistics use.
    """

    backbone: PreTrainedModel
    """The HF base model (``Qwen3MoeModel``, ``MixtralModel``, ...)."""

    def __init__(self, config: MegaMoEConfig, backbone: PreTrainedModel | None = None):
        super().__init__()
        assert config.backbone is not None
        self.num_experts = config.num_experts
        self.top_k = config.num_experts_per_tok
        # A loaded checkpoint is taken as it is (no random copy is built first); else a random one.
        self.backbone = (
            backbone
            if backbone is not None
            else AutoModel.from_config(AutoConfig.for_model(**config.backbone))
        )
        # Which layers route (DeepSeek's first layers and Qwen's mlp_only_layers do not): one router-logit
        # tensor comes back per MoE layer, in this order.
        self.moe_layer_indices = config.moe_layers()

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        task_id: int | None = None,
        output_hidden_states: bool = False,
    ) -> MegaMoEModelOutput:
        if token_type_ids is not None and bool(token_type_ids.any()):
            raise ValueError(f"a {self.backbone.config.model_type} backbone has no token types")
        token_mask_BS = token_mask(input_ids, attention_mask)
        out = self.backbone(
            input_ids=input_ids,
            attention_mask=token_mask_BS.long(),
            position_ids=position_ids,
            use_cache=False,
            output_router_logits=True,
            output_hidden_states=output_hidden_states,
        )
        token_mask_T = token_mask_BS.reshape(-1)
        router_stats = [
            self._router_stats(layer_idx, logits_TE.float(), token_mask_T)
            for layer_idx, logits_TE in zip(self.moe_layer_indices, out.router_logits, strict=True)
        ]
        return MegaMoEModelOutput(
            last_hidden_state=out.last_hidden_state,
            hidden_states=out.hidden_states,
            router_stats=router_stats,
        )

    def _router_stats(
        self, layer_idx: int, logits_TE: torch.Tensor, token_mask_T: torch.Tensor
    ) -> RouterStats:
        statistics = routing_statistics(
            router_logits_TE=logits_TE,
            expert_ids_TK=logits_TE.topk(self.top_k, dim=-1).indices,
            token_mask_T=token_mask_T,
            num_experts=self.num_experts,
        )
        return RouterStats(
            layer_idx=layer_idx,
            aux_loss=statistics.aux_loss,
            z_loss=statistics.z_loss,
            tokens_per_expert=statistics.tokens_per_expert_E,
            dropped_tokens=statistics.tokens_per_expert_E.new_zeros(()),
        )


def classifier_dropout(config: MegaMoEConfig) -> float:
    """Dropout of the task heads: ``classifier_dropout``, or the hidden dropout when it is unset (BERT)."""
    return config.classifier_dropout if config.classifier_dropout is not None else config.hidden_dropout_prob


class MegaMoESequenceHead(nn.Module):
    """Pool, then dense + tanh + projection to C outputs (BERT's pooler + classifier)."""

    def __init__(self, config: MegaMoEConfig, num_outputs: int):
        super().__init__()
        self.pooling = config.classifier_pooling
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.dropout = nn.Dropout(classifier_dropout(config))
        self.out_proj = nn.Linear(config.hidden_size, num_outputs)

    def forward(self, hidden_BSD: torch.Tensor, token_mask_BS: torch.Tensor) -> torch.Tensor:
        if self.pooling == "cls":
            pooled_BD = hidden_BSD[:, 0]
        elif self.pooling == "last":
            # The last real token of each row, wherever the padding is (left or right).
            positions_BS = torch.arange(token_mask_BS.shape[1], device=token_mask_BS.device).expand_as(
                token_mask_BS
            )
            last_B = torch.where(token_mask_BS, positions_BS, -1).amax(dim=1).clamp(min=0)
            pooled_BD = hidden_BSD[torch.arange(hidden_BSD.shape[0], device=hidden_BSD.device), last_B]
        else:
            weights_BS1 = token_mask_BS[..., None].to(hidden_BSD.dtype)
            pooled_BD = (hidden_BSD * weights_BS1).sum(1) / weights_BS1.sum(1).clamp(min=1.0)
        pooled_BD = torch.tanh(self.dense(self.dropout(pooled_BD)))
        return self.out_proj(self.dropout(pooled_BD))


class MegaMoETokenHead(nn.Module):
    """Per-token projection to C labels."""

    def __init__(self, config: MegaMoEConfig, num_outputs: int):
        super().__init__()
        self.dropout = nn.Dropout(classifier_dropout(config))
        self.out_proj = nn.Linear(config.hidden_size, num_outputs)

    def forward(self, hidden_BSD: torch.Tensor, token_mask_BS: torch.Tensor) -> torch.Tensor:
        return self.out_proj(self.dropout(hidden_BSD))


def task_loss(task_type: str, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy for classification (label -100 ignored), MSE for regression."""
    if task_type == "sequence_regression":
        return F.mse_loss(logits.squeeze(-1).float(), labels.float())
    return F.cross_entropy(logits.flatten(0, -2).float(), labels.flatten(), ignore_index=IGNORE_INDEX)


@dataclass
class MegaMoEMultiTaskOutput(ModelOutput):
    """Output of `MegaMoEForMultiTask`.

    Attributes:
        loss: ``task_loss + router_aux_loss_coef * aux_loss + router_z_loss_coef * z_loss`` (with labels).
        task_loss: the task's own loss, unweighted (what multi-task weighting combines).
        logits: ``[B, C]`` for sequence tasks, ``[B, S, C]`` for token tasks.
        aux_loss: load-balancing loss averaged over MoE layers (0 for a dense model).
        z_loss: router z-loss averaged over MoE layers (0 for a dense model).
        router_stats: one `RouterStats` per MoE layer.
        hidden_states: per-layer hidden states when requested.
    """

    loss: torch.Tensor | None = None
    task_loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    aux_loss: torch.Tensor | None = None
    z_loss: torch.Tensor | None = None
    router_stats: list[RouterStats] | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None


class MegaMoEForMultiTask(MegaMoEPreTrainedModel):
    """The backbone plus one small head per task; ``forward(..., task=name)`` runs that task's head.

    ``backbone``: an HF base model already loaded for ``config.backbone`` (as `EncoderDecoderModel` takes its
    encoder), kept with its weights; post_init initializes only what it lacks, the heads.
    """

    def __init__(self, config: MegaMoEConfig, backbone: PreTrainedModel | None = None):
        super().__init__(config)
        if backbone is not None and config.backbone is None:
            raise ValueError("a backbone module needs config.backbone (an HF MoE architecture) to go with it")
        self.model = MegaMoEModel(config) if config.backbone is None else MegaMoEHFBackbone(config, backbone)
        head_classes = {
            "sequence_classification": MegaMoESequenceHead,
            "sequence_regression": MegaMoESequenceHead,
            "token_classification": MegaMoETokenHead,
        }
        self.heads = nn.ModuleDict(
            {
                name: head_classes[spec["type"]](config, config.num_task_outputs(name))
                for name, spec in config.tasks.items()
            }
        )
        self.post_init()

    def task_id(self, task: str) -> int:
        if task not in self.config.tasks:
            raise ValueError(f"unknown task {task!r}; this model's tasks are {self.config.task_names}")
        return self.config.task_names.index(task)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        task: str | None = None,
        labels: torch.Tensor | None = None,
        output_hidden_states: bool = False,
    ) -> MegaMoEMultiTaskOutput:
        if task is None:
            raise ValueError(f"pass task=<name>; this model's tasks are {self.config.task_names}")
        task_id = self.task_id(task)
        backbone = self.model(
            input_ids,
            attention_mask=attention_mask,
            token_type_ids=token_type_ids,
            position_ids=position_ids,
            task_id=task_id,
            output_hidden_states=output_hidden_states,
        )
        hidden_BSD = backbone.last_hidden_state
        token_mask_BS = token_mask(input_ids, attention_mask)
        logits = self.heads[task](hidden_BSD, token_mask_BS)

        stats = backbone.router_stats or []
        zero = hidden_BSD.new_zeros((), dtype=torch.float32)
        aux_loss = torch.stack([s.aux_loss for s in stats]).mean() if stats else zero
        z_loss = torch.stack([s.z_loss for s in stats]).mean() if stats else zero

        loss = own_loss = None
        if labels is not None:
            own_loss = task_loss(self.config.tasks[task]["type"], logits, labels)
            loss = (
                own_loss
                + self.config.router_aux_loss_coef * aux_loss
                + self.config.router_z_loss_coef * z_loss
            )
        return MegaMoEMultiTaskOutput(
            loss=loss,
            task_loss=own_loss,
            logits=logits,
            aux_loss=aux_loss,
            z_loss=z_loss,
            router_stats=stats,
            hidden_states=backbone.hidden_states,
        )


__all__ = ["MegaMoEForMultiTask", "MegaMoEHFBackbone", "MegaMoEModel", "MegaMoEPreTrainedModel"]
