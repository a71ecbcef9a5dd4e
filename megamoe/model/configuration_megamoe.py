"""MegaMoE model configuration.

This file travels to the Hub next to the weights (remote code), so it imports only torch-free
transformers pieces and never `megamoe` itself.
"""

import types
import typing
from dataclasses import field
from typing import Any

from transformers import AutoConfig, PreTrainedConfig

TASK_TYPES = ("sequence_classification", "token_classification", "sequence_regression")

# HF MoE architectures that can be the shared backbone: model_type -> (experts field, expert width field).
# Field names as read from the config object. Each records its router logits (`output_router_logits`) and
# keeps its experts at `layers.N.mlp.experts`.
HF_MOE_BACKBONES = {
    "qwen3_moe": ("num_experts", "moe_intermediate_size"),
    "qwen2_moe": ("num_experts", "moe_intermediate_size"),
    "mixtral": ("num_local_experts", "intermediate_size"),
    "olmoe": ("num_experts", "intermediate_size"),
    "deepseek_v2": ("n_routed_experts", "moe_intermediate_size"),
    "deepseek_v3": ("n_routed_experts", "moe_intermediate_size"),
}
_SIZE_FIELDS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")
# Router features of MegaMoE's own MoE layers that an HF backbone's router does not have.
_OWN_ROUTER_ONLY = {
    "capacity_factor": None,
    "router_jitter_noise": 0.0,
    "num_shared_experts": 0,
    "task_aware_routing": False,
}
_CHOICES = {
    "mlp_type": ("mlp", "glu"),
    "norm_type": ("layernorm", "rmsnorm"),
    "norm_position": ("pre", "post"),
    "position_embedding_type": ("absolute", "rope"),
    "classifier_pooling": ("cls", "mean", "last"),
    "hidden_act": ("gelu", "gelu_new", "gelu_pytorch_tanh", "relu", "silu"),
}


class MegaMoEConfig(PreTrainedConfig):
    r"""Configuration of a MegaMoE encoder: a transformer whose feed-forward layers are sparse
    Mixture-of-Experts layers, shared by several task heads.

    The defaults describe a modern pre-norm encoder (RMSNorm, SwiGLU, rotary positions) for training
    from scratch. A BERT-family checkpoint (post-LN, GELU MLP with biases, learned absolute positions,
    token types) is held exactly with `norm_position="post"`, `norm_type="layernorm"`, `mlp_type="mlp"`,
    `hidden_act="gelu"`, `mlp_bias=True`, `attention_bias=True`, `position_embedding_type="absolute"`,
    `type_vocab_size=2`.

    Args:
        vocab_size: Size of the token vocabulary.
        hidden_size: Width of the residual stream.
        num_hidden_layers: Number of encoder layers.
        num_attention_heads: Number of attention heads; must divide `hidden_size`.
        intermediate_size: Width of the dense feed-forward layers (the layers that are not MoE).
        hidden_act: Activation of the feed-forward layers (for `mlp_type="glu"`, of the gate).
        mlp_type: `"mlp"` (up → act → down, BERT) or `"glu"` (act(gate) * up → down; SwiGLU with silu).
        mlp_bias: Whether feed-forward projections (dense and experts) carry biases.
        attention_bias: Whether the q/k/v/output projections carry biases.
        norm_type: `"layernorm"` or `"rmsnorm"`.
        norm_position: `"post"` (BERT: norm after each residual add) or `"pre"` (norm before each sublayer,
            plus a final norm).
        layer_norm_eps: Epsilon of every norm.
        position_embedding_type: `"absolute"` (learned table, BERT) or `"rope"` (rotary, on q and k).
        max_position_embeddings: Longest sequence the model accepts.
        rope_theta: Base of the rotary frequencies.
        type_vocab_size: Number of token types (segment ids); 0 disables the token-type embedding.
        hidden_dropout_prob: Dropout on embeddings and sublayer outputs.
        attention_probs_dropout_prob: Dropout on attention probabilities.
        classifier_dropout: Dropout in task heads; `None` reuses `hidden_dropout_prob`.
        classifier_pooling: How sequence heads pool tokens: `"cls"` (first token), `"mean"` (over non-padding)
            or `"last"` (last non-padding token: the one a causal backbone lets see the whole sequence).
        initializer_range: Std of the normal initializer.
        moe_intermediate_size: Width of one expert.
        num_experts: Number of routed experts per MoE layer.
        num_experts_per_tok: Experts each token is sent to (top-k).
        moe_layer_freq: Every n-th layer is MoE (layer i is MoE when `(i + 1) % n == 0`); 0 = fully dense model.
        capacity_factor: `None` = dropless. A float sets each expert's capacity to
            `ceil(capacity_factor * tokens * k / num_experts)`; assignments past it are dropped (the token keeps
            its residual) and counted.
        norm_topk_prob: Renormalize the top-k routing weights to sum to 1.
        router_jitter_noise: Multiplicative uniform noise on the router input in training (Switch); 0 = off.
        router_aux_loss_coef: Weight of the load-balancing loss in `loss`.
        router_z_loss_coef: Weight of the router z-loss in `loss`.
        num_shared_experts: Experts every token goes through (DeepSeek/Qwen style), fused into one dense FFN of
            width `num_shared_experts * moe_intermediate_size`.
        task_aware_routing: The router also sees a learned per-task embedding, so tasks can specialize experts.
        tasks: Task name → `{"type": one of TASK_TYPES, "labels": [...]}` (labels for classification tasks).
        backbone: An HF MoE model's config (`PreTrainedConfig.to_dict()`, model_type one of `HF_MOE_BACKBONES`:
            Qwen3-MoE, Qwen2-MoE, Mixtral, OLMoE, DeepSeek-V2/V3) that replaces MegaMoE's own embeddings and
            layers; heads and router losses stay MegaMoE's. The size fields (`hidden_size`, `num_experts`, ...)
            then mirror the backbone's and are set from it.
    """

    model_type = "megamoe"

    vocab_size: int = 30522
    hidden_size: int = 384
    num_hidden_layers: int = 6
    num_attention_heads: int = 6
    intermediate_size: int = 1536
    hidden_act: str = "silu"
    mlp_type: str = "glu"
    mlp_bias: bool = False
    attention_bias: bool = False
    norm_type: str = "rmsnorm"
    norm_position: str = "pre"
    layer_norm_eps: float = 1e-6
    position_embedding_type: str = "rope"
    max_position_embeddings: int = 512
    rope_theta: float = 10000.0
    type_vocab_size: int = 0
    hidden_dropout_prob: float = 0.0
    attention_probs_dropout_prob: float = 0.0
    classifier_dropout: float | None = None
    classifier_pooling: str = "cls"
    initializer_range: float = 0.02
    moe_intermediate_size: int = 768
    num_experts: int = 8
    num_experts_per_tok: int = 2
    moe_layer_freq: int = 1
    capacity_factor: float | None = None
    norm_topk_prob: bool = True
    router_jitter_noise: float = 0.0
    router_aux_loss_coef: float = 0.01
    router_z_loss_coef: float = 0.001
    num_shared_experts: int = 0
    task_aware_routing: bool = False
    tasks: dict[str, Any] = field(default_factory=dict)
    backbone: dict[str, Any] | None = None
    pad_token_id: int | None = 0

    def __post_init__(self, **kwargs):
        self._validate_types()
        if self.backbone is not None:
            self._mirror_backbone()
        self._validate_architecture()
        self._validate_moe()
        self.tasks = {name: _normalized_task(name, spec) for name, spec in self.tasks.items()}
        super().__post_init__(**kwargs)

    def _validate_types(self) -> None:
        for name, expected in MegaMoEConfig.__annotations__.items():
            value = getattr(self, name)
            allowed = typing.get_args(expected) if isinstance(expected, types.UnionType) else (expected,)
            allowed = tuple(typing.get_origin(t) or t for t in allowed)
            # bool is an int in Python, and an int is a fine float; neither the other way round.
            ok = isinstance(value, allowed) and not (isinstance(value, bool) and bool not in allowed)
            ok = ok or (float in allowed and isinstance(value, int) and not isinstance(value, bool))
            _require(ok, name, f"expected {_type_name(expected)}, got {type(value).__name__} {value!r}")

    def _validate_architecture(self) -> None:
        for name in _SIZE_FIELDS:
            _require(getattr(self, name) >= 1, name, f"must be >= 1, got {getattr(self, name)}")
        _require(
            self.hidden_size % self.num_attention_heads == 0,
            "hidden_size",
            f"{self.hidden_size} is not divisible by num_attention_heads={self.num_attention_heads}",
        )
        for name, allowed in _CHOICES.items():
            _require(
                getattr(self, name) in allowed, name, f"{getattr(self, name)!r} is not one of {list(allowed)}"
            )
        if self.position_embedding_type == "rope":
            head_dim = self.hidden_size // self.num_attention_heads
            _require(
                head_dim % 2 == 0, "position_embedding_type", f"rope needs an even head dim, got {head_dim}"
            )
        _require(self.type_vocab_size >= 0, "type_vocab_size", f"must be >= 0, got {self.type_vocab_size}")
        for name in ("hidden_dropout_prob", "attention_probs_dropout_prob"):
            _require(0.0 <= getattr(self, name) < 1.0, name, f"must be in [0, 1), got {getattr(self, name)}")

    def _validate_moe(self) -> None:
        _require(
            self.moe_layer_freq >= 0, "moe_layer_freq", f"must be >= 0 (0 = dense), got {self.moe_layer_freq}"
        )
        if self.moe_layer_freq == 0:
            return
        _require(self.num_experts >= 1, "num_experts", f"must be >= 1, got {self.num_experts}")
        _require(
            1 <= self.num_experts_per_tok <= self.num_experts,
            "num_experts_per_tok",
            f"top-k must be in [1, num_experts={self.num_experts}], got {self.num_experts_per_tok}",
        )
        _require(
            self.moe_intermediate_size >= 1,
            "moe_intermediate_size",
            f"must be >= 1, got {self.moe_intermediate_size}",
        )
        _require(
            self.capacity_factor is None or self.capacity_factor > 0,
            "capacity_factor",
            f"must be None (dropless) or > 0, got {self.capacity_factor}",
        )
        _require(
            self.router_jitter_noise >= 0,
            "router_jitter_noise",
            f"must be >= 0, got {self.router_jitter_noise}",
        )
        _require(
            self.num_shared_experts >= 0, "num_shared_experts", f"must be >= 0, got {self.num_shared_experts}"
        )

    def _mirror_backbone(self) -> None:
        """Take the sizes from the HF backbone's config, refusing router features it does not have."""
        assert self.backbone is not None
        model_type = str(self.backbone.get("model_type"))
        _require(
            model_type in HF_MOE_BACKBONES,
            "backbone",
            f"model_type {model_type!r} is not one of {sorted(HF_MOE_BACKBONES)}",
        )
        for name, default in _OWN_ROUTER_ONLY.items():
            _require(
                getattr(self, name) == default,
                name,
                f"MegaMoE's own router only; the {model_type} backbone routes with its own router",
            )
        _require(
            self.classifier_pooling != "cls",
            "classifier_pooling",
            f"the first token of a causal {model_type} backbone sees only itself: use 'last' or 'mean'",
        )
        # The config object, not the dict: transformers 5 aliases fields per architecture (attribute_map).
        hf_config = AutoConfig.for_model(**self.backbone)
        experts_field, width_field = HF_MOE_BACKBONES[model_type]
        for name in _SIZE_FIELDS:
            setattr(self, name, getattr(hf_config, name))
        self.max_position_embeddings = hf_config.max_position_embeddings
        self.num_experts = getattr(hf_config, experts_field)
        self.num_experts_per_tok = hf_config.num_experts_per_tok
        self.moe_intermediate_size = getattr(hf_config, width_field)
        self.norm_topk_prob = getattr(hf_config, "norm_topk_prob", True)
        self.moe_layer_freq = 1  # "has MoE layers"; which ones is the backbone's own pattern (is_moe_layer)

    def is_moe_layer(self, layer_idx: int) -> bool:
        if self.backbone is not None:
            return layer_idx in self.moe_layers()
        return self.moe_layer_freq > 0 and (layer_idx + 1) % self.moe_layer_freq == 0

    def moe_layers(self) -> list[int]:
        """Indices of the MoE layers: every `moe_layer_freq`-th, or an HF backbone's own pattern."""
        if self.backbone is not None:
            hf_config = AutoConfig.for_model(**self.backbone)  # built once, not per layer
            return [i for i in range(self.num_hidden_layers) if _routes(hf_config, i)]
        return [i for i in range(self.num_hidden_layers) if self.is_moe_layer(i)]

    @property
    def task_names(self) -> list[str]:
        """Tasks in a fixed order (sorted: config.json sorts keys), which numbers them for task-aware routing."""
        return sorted(self.tasks)

    def num_task_outputs(self, task: str) -> int:
        spec = self.tasks[task]
        return 1 if spec["type"] == "sequence_regression" else len(spec["labels"])


def _routes(hf_config: Any, layer_idx: int) -> bool:
    """Whether layer ``layer_idx`` of an HF MoE backbone is sparse, by the rule its modeling file applies."""
    if hf_config.model_type in ("qwen2_moe", "qwen3_moe"):
        return (
            layer_idx not in hf_config.mlp_only_layers
            and (layer_idx + 1) % hf_config.decoder_sparse_step == 0
        )
    if hf_config.model_type in ("deepseek_v2", "deepseek_v3"):
        return layer_idx >= hf_config.first_k_dense_replace
    return True  # Mixtral, OLMoE: every layer


def _require(condition: bool, field_name: str, message: str) -> None:
    if not condition:
        raise ValueError(f"MegaMoEConfig.{field_name}: {message}")


def _type_name(annotation: Any) -> str:
    return getattr(annotation, "__name__", str(annotation))


def _normalized_task(name: str, spec: Any) -> dict[str, Any]:
    where = f"tasks.{name}"
    _require(isinstance(spec, dict), where, f"must be a mapping with 'type' (and 'labels'), got {spec!r}")
    unknown = set(spec) - {"type", "labels"}
    _require(not unknown, where, f"unknown keys {sorted(unknown)}; allowed: ['labels', 'type']")
    task_type = spec.get("type")
    _require(task_type in TASK_TYPES, f"{where}.type", f"{task_type!r} is not one of {list(TASK_TYPES)}")
    labels = list(spec.get("labels") or [])
    if task_type == "sequence_regression":
        _require(not labels, f"{where}.labels", "a regression task has no labels")
        return {"type": task_type}
    _require(len(labels) > 0, f"{where}.labels", "a classification task needs a non-empty label list")
    _require(
        all(isinstance(label, str) for label in labels),
        f"{where}.labels",
        f"labels must be strings: {labels}",
    )
    duplicates = sorted({label for label in labels if labels.count(label) > 1})
    _require(not duplicates, f"{where}.labels", f"duplicate labels {duplicates}")
    return {"type": task_type, "labels": labels}


__all__ = ["HF_MOE_BACKBONES", "TASK_TYPES", "MegaMoEConfig"]
