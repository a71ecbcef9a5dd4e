"""Published HF MoE models (Qwen3-MoE, Qwen2-MoE, Mixtral, OLMoE, DeepSeek-V2/V3) as the shared backbone.

The checkpoint's base model (embeddings, layers, experts, router) becomes `MegaMoEForMultiTask`'s backbone
unchanged; a causal-LM checkpoint loses only its LM head. Task heads start fresh, and sequence heads pool
the last real token by default: in a causal model it is the only one that has seen the whole input.

The backbone is loaded once, by transformers' own `from_pretrained` (which also converts published layouts,
e.g. Qwen3-MoE's per-expert tensors into fused ones): on the meta device and filled from the checkpoint in
the run's dtype, or, under ZeRO-3 (`megamoe.engine.deepspeed_engine.partitioned_construction`), built under
`deepspeed.zero.Init` and filled layer by layer from rank 0's reads (`megamoe.engine.partitioned_loading`).
No random copy is built first.
"""

from typing import Any

import torch
from transformers import AutoConfig

from ..config import ModelSection
from ..model import MegaMoEConfig, MegaMoEForMultiTask
from ..model.configuration_megamoe import HF_MOE_BACKBONES
from .base import BuildRequest


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
    source: str,
    *,
    tasks: dict[str, dict[str, Any]],
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    **architecture: Any,
) -> MegaMoEForMultiTask:
    """``source`` (Hub id or directory) as the backbone of a multi-task model with fresh heads for ``tasks``.

    ``dtype``: what the backbone's weights are kept in (the run's precision: DeepSpeed keeps the fp32 master
    copy). ``architecture`` sets MegaMoE-side fields: `classifier_pooling`, `classifier_dropout`,
    `router_aux_loss_coef`, `router_z_loss_coef`.
    """
    config = hf_moe_config(source, tasks=tasks, **architecture)
    from ..engine.partitioned_loading import load_pretrained  # imports deepspeed: only when a model is built

    backbone = load_pretrained(source, dtype)
    torch.manual_seed(seed)  # the heads' init
    return MegaMoEForMultiTask(config, backbone=backbone)


class HFMoESource:
    """``init: hf_moe``: ``model.base`` is a published HF MoE model; ``model.architecture`` sets MegaMoE's
    side (pooling, head dropout, router loss coefficients)."""

    def declared_config(self, section: ModelSection, base: str | None) -> MegaMoEConfig:
        assert base is not None  # validated by ModelSection
        return hf_moe_config(base, tasks={}, **section.architecture)

    def build(self, request: BuildRequest) -> MegaMoEForMultiTask:
        assert request.base is not None
        options = request.options
        return load_hf_moe(
            request.base,
            tasks=request.tasks,
            seed=options.seed,
            dtype=options.dtype,
            **request.section.architecture,
        )
