"""Published HF MoE models (Qwen3-MoE, Qwen2-MoE, Mixtral, OLMoE, DeepSeek-V2/V3) as the shared backbone.

The checkpoint's base model (embeddings, layers, experts, router) becomes `MegaMoEForMultiTask`'s backbone
unchanged; a causal-LM checkpoint loses only its LM head. Task heads start fresh, and sequence heads pool
the last real token by default: in a causal model it is the only one that has seen the whole input.
"""

from typing import Any

import torch
from transformers import AutoConfig, AutoModel

from ..model import MegaMoEConfig, MegaMoEForMultiTask
from ..model.configuration_megamoe import HF_MOE_BACKBONES


def hf_moe_config(source: str, *, tasks: dict[str, dict[str, Any]], **architecture: Any) -> MegaMoEConfig:
    """The MegaMoE config around ``source``'s architecture (read from its config.json only)."""
    backbone = AutoConfig.from_pretrained(source)
    if backbone.model_type not in HF_MOE_BACKBONES:
        raise ValueError(
            f"{source} is a {backbone.model_type!r} model; an HF MoE backbone is one of "
            f"{sorted(HF_MOE_BACKBONES)} (dense BERT-family encoders: use init: upcycle)"
        )
    return MegaMoEConfig(
        backbone=backbone.to_dict(), tasks=tasks, **{"classifier_pooling": "last", **architecture}
    )


def load_hf_moe(
    source: str, *, tasks: dict[str, dict[str, Any]], seed: int = 0, **architecture: Any
) -> MegaMoEForMultiTask:
    """``source`` (Hub id or directory) as the backbone of a multi-task model with fresh heads for ``tasks``.

    ``architecture`` sets MegaMoE-side fields: `classifier_pooling`, `classifier_dropout`,
    `router_aux_loss_coef`, `router_z_loss_coef`.
    """
    config = hf_moe_config(source, tasks=tasks, **architecture)
    torch.manual_seed(seed)
    model = MegaMoEForMultiTask(config)
    # float32 master weights: the engine casts to the run's precision (a bf16 checkpoint would stay bf16).
    pretrained = AutoModel.from_pretrained(source, dtype=torch.float32)
    model.model.backbone.load_state_dict(pretrained.state_dict(), strict=True, assign=True)
    return model
