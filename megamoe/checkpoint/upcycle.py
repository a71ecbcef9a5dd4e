"""Sparse upcycling of BERT-family encoders (Komatsuzaki et al., ICLR 2023).

Embeddings, attention and norms are copied; every MoE layer's experts start as copies of the dense FFN
(optionally with a little noise to break symmetry) and the router starts small. With the noise off the
upcycled model computes exactly what the dense one does: identical experts with renormalized top-k
weights sum back to the dense FFN.
"""

from typing import Any

import torch
from transformers import AutoModel, PretrainedConfig

from ..model import MegaMoEConfig, MegaMoEForMultiTask
from ..model.modeling_megamoe import MegaMoESequenceHead

_BERT_FAMILY = ("bert",)


def config_from_bert(bert_config: PretrainedConfig, **overrides: Any) -> MegaMoEConfig:
    """The MegaMoE architecture that holds ``bert_config`` exactly; MoE and task settings come in ``overrides``."""
    if bert_config.model_type not in _BERT_FAMILY:
        raise ValueError(
            f"upcycling supports model_type in {list(_BERT_FAMILY)}, got {bert_config.model_type!r}; "
            "convert the checkpoint to a BERT layout first"
        )
    position_type = getattr(bert_config, "position_embedding_type", "absolute")
    if position_type != "absolute":
        raise ValueError(f"only absolute position embeddings can be upcycled, got {position_type!r}")
    kwargs: dict[str, Any] = dict(
        vocab_size=bert_config.vocab_size,
        hidden_size=bert_config.hidden_size,
        num_hidden_layers=bert_config.num_hidden_layers,
        num_attention_heads=bert_config.num_attention_heads,
        intermediate_size=bert_config.intermediate_size,
        moe_intermediate_size=bert_config.intermediate_size,
        hidden_act=bert_config.hidden_act,
        mlp_type="mlp",
        mlp_bias=True,
        attention_bias=True,
        norm_type="layernorm",
        norm_position="post",
        layer_norm_eps=bert_config.layer_norm_eps,
        position_embedding_type="absolute",
        max_position_embeddings=bert_config.max_position_embeddings,
        type_vocab_size=bert_config.type_vocab_size,
        hidden_dropout_prob=bert_config.hidden_dropout_prob,
        attention_probs_dropout_prob=bert_config.attention_probs_dropout_prob,
        initializer_range=bert_config.initializer_range,
        pad_token_id=bert_config.pad_token_id,
        norm_topk_prob=True,
    )
    kwargs.update(overrides)
    if not kwargs["norm_topk_prob"] and kwargs.get("num_experts_per_tok", 2) < kwargs.get("num_experts", 8):
        raise ValueError(
            "upcycling needs norm_topk_prob=True: unnormalized top-k weights scale the dense FFN"
        )
    return MegaMoEConfig(**kwargs)


def upcycle_bert_state_dict(
    bert_state: dict[str, torch.Tensor],
    config: MegaMoEConfig,
    *,
    expert_noise_std: float = 0.0,
    router_std: float | None = None,
    generator: torch.Generator | None = None,
) -> dict[str, torch.Tensor]:
    """Map a BertModel state dict (``bert.`` prefix allowed) onto `MegaMoEModel` keys.

    Args:
        bert_state: the dense checkpoint's tensors.
        config: from `config_from_bert`.
        expert_noise_std: relative std of Gaussian noise added to each expert copy (0 = exact copies).
        router_std: std of the router init; defaults to ``config.initializer_range``.
        generator: RNG for the noise and the router init.

    Returns:
        A state dict that `MegaMoEModel.load_state_dict(..., strict=True)` accepts.
    """
    if config.num_shared_experts > 0:
        raise ValueError("upcycling starts without shared experts (a copy would count the dense FFN twice)")
    src = {key.removeprefix("bert."): value for key, value in bert_state.items()}
    out: dict[str, torch.Tensor] = {}

    def take(dst: str, key: str) -> None:
        if key not in src:
            raise KeyError(f"the dense checkpoint has no {key!r}; is it a BERT-family encoder?")
        out[dst] = src[key].clone()

    for name in ("word_embeddings", "position_embeddings", "token_type_embeddings"):
        take(f"embeddings.{name}.weight", f"embeddings.{name}.weight")
    for param in ("weight", "bias"):
        take(f"embeddings.norm.{param}", f"embeddings.LayerNorm.{param}")

    for i in range(config.num_hidden_layers):
        bert, ours = f"encoder.layer.{i}", f"layers.{i}"
        for param in ("weight", "bias"):
            for bert_name, our_name in (("query", "q_proj"), ("key", "k_proj"), ("value", "v_proj")):
                take(f"{ours}.attention.{our_name}.{param}", f"{bert}.attention.self.{bert_name}.{param}")
            take(f"{ours}.attention.o_proj.{param}", f"{bert}.attention.output.dense.{param}")
            take(f"{ours}.attention_norm.{param}", f"{bert}.attention.output.LayerNorm.{param}")
            take(f"{ours}.ffn_norm.{param}", f"{bert}.output.LayerNorm.{param}")
        up_w, up_b = src[f"{bert}.intermediate.dense.weight"], src[f"{bert}.intermediate.dense.bias"]
        down_w, down_b = src[f"{bert}.output.dense.weight"], src[f"{bert}.output.dense.bias"]
        if not config.is_moe_layer(i):
            out.update(
                {
                    f"{ours}.mlp.up_proj.weight": up_w.clone(),
                    f"{ours}.mlp.up_proj.bias": up_b.clone(),
                    f"{ours}.mlp.down_proj.weight": down_w.clone(),
                    f"{ours}.mlp.down_proj.bias": down_b.clone(),
                }
            )
            continue
        experts = {
            "up_proj": up_w,
            "up_proj_bias": up_b,
            "down_proj": down_w,
            "down_proj_bias": down_b,
        }
        for name, dense in experts.items():
            copies = dense.expand(config.num_experts, *dense.shape).clone()
            if expert_noise_std > 0:
                noise = torch.randn(copies.shape, generator=generator, dtype=copies.dtype)
                copies += expert_noise_std * dense.std() * noise
            out[f"{ours}.mlp.experts.{name}"] = copies
        std = config.initializer_range if router_std is None else router_std
        router = torch.randn(config.num_experts, config.hidden_size, generator=generator) * std
        out[f"{ours}.mlp.router.weight"] = router.to(up_w.dtype)
        if config.task_aware_routing:
            out[f"{ours}.mlp.router.task_logit_bias"] = torch.zeros(len(config.tasks), config.num_experts)
    return out


def upcycle_pretrained(
    source: str,
    *,
    tasks: dict[str, dict[str, Any]],
    expert_noise_std: float = 0.0,
    seed: int = 0,
    **architecture: Any,
) -> MegaMoEForMultiTask:
    """Upcycle a dense BERT-family checkpoint (local directory or Hub id) into a multi-task MegaMoE.

    The backbone comes from `upcycle_bert_state_dict`; each sequence head's dense layer starts from the
    checkpoint's pooler when it has one (what `BertForSequenceClassification` does), the output layers
    start from the usual random init.
    """
    dense = AutoModel.from_pretrained(source)
    config = config_from_bert(dense.config, tasks=tasks, **architecture)
    generator = torch.Generator().manual_seed(seed)
    dense_state = dense.state_dict()
    backbone = upcycle_bert_state_dict(
        dense_state, config, expert_noise_std=expert_noise_std, generator=generator
    )
    torch.manual_seed(seed)
    model = MegaMoEForMultiTask(config)
    model.model.load_state_dict(backbone, strict=True)
    if "pooler.dense.weight" in dense_state:
        with torch.no_grad():
            for head in model.heads.values():
                if isinstance(head, MegaMoESequenceHead):
                    head.dense.weight.copy_(dense_state["pooler.dense.weight"])
                    head.dense.bias.copy_(dense_state["pooler.dense.bias"])
    return model
