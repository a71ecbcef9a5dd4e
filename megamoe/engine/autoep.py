"""Expert parallelism for HF MoE backbones: DeepSpeed AutoEP.

An HF backbone (`MegaMoEHFBackbone`) keeps its own router and experts, in exactly the layout AutoEP's presets
know (``layers.N.mlp`` with ``gate`` and fused ``experts``), so DeepSpeed swaps each MoE block for its
expert-parallel ``AutoEPMoELayer`` at ``deepspeed.initialize`` — the one DeepSpeed path that also
partitions experts under ZeRO-3. AutoEP keeps transformers' router-logit recording pointed at its own
router, so MegaMoE's padding-masked router losses are computed as without EP.
"""

import re
from types import SimpleNamespace
from typing import Any

import torch
from deepspeed.module_inject.auto_ep import _remove_transformers_output_capture_hooks
from deepspeed.module_inject.auto_ep_layer import AutoEPMoELayer
from deepspeed.module_inject.auto_ep_presets.base import TransformersTopLevelRouterLogitsAdapter
from deepspeed.module_inject.auto_ep_presets.registry import (
    get_preset,
    get_preset_adapter,
    preset_name_for_hf_model_type,
)
from torch import nn
from transformers import PreTrainedModel

from ..model.modeling_megamoe import MegaMoEHFBackbone


def hf_backbone(module: nn.Module) -> tuple[str, PreTrainedModel] | None:
    """The dotted name and module of the HF base model inside ``module`` (None for a MegaMoE backbone)."""
    for name, child in module.named_modules():
        if isinstance(child, MegaMoEHFBackbone):
            return f"{name}.backbone" if name else "backbone", child.backbone
    return None


def autoep_section(module: nn.Module, ep_size: int) -> dict[str, Any]:
    """The DeepSpeed ``expert_parallel`` section that shards ``module``'s HF backbone experts over ``ep_size`` ranks."""
    found = hf_backbone(module)
    if found is None:
        raise ValueError("AutoEP shards HF MoE backbones only; MegaMoE's own experts use shard_experts")
    name, backbone = found
    return {
        "enabled": True,
        "autoep_size": ep_size,
        "preset_model": _preset_for(backbone.config.model_type),
        # The presets match `model.layers.N.mlp` from the root of an HF causal LM; ours sits deeper.
        "moe_layer_pattern": re.escape(name) + r"\.layers\.\d+\.mlp",
    }


def check_replaced_and_record_router_logits(module: nn.Module) -> None:
    """After ``deepspeed.initialize``: make sure AutoEP swapped the MoE blocks, and that transformers records
    router logits from AutoEP's router.

    AutoEP only warns when its layer pattern matches nothing, and trains without expert parallelism; here that
    is an error. DeepSpeed retargets the router-logit recorder itself for the model types its preset's adapter
    names (Qwen, Mixtral); for the others (DeepSeek, OLMoE) the backbone would record nothing (its router
    class is gone), so DeepSpeed's own retargeting is applied to them here.
    """
    found = hf_backbone(module)
    if found is None:
        return
    layers = [m for m in module.modules() if isinstance(m, AutoEPMoELayer)]
    if not layers:
        raise RuntimeError(
            "DeepSpeed AutoEP replaced no MoE block of the HF backbone: the expert_parallel section's "
            "moe_layer_pattern matched nothing (a changed module layout?); refusing to train without EP"
        )
    backbone = found[1]
    model_type = backbone.config.model_type
    adapter = get_preset_adapter(get_preset(_preset_for(model_type)).preset_adapter)
    if isinstance(adapter, TransformersTopLevelRouterLogitsAdapter) and model_type in adapter.hf_model_types:
        return
    class_prefix = type(backbone).__name__.removesuffix("Model")  # DeepseekV3Model -> DeepseekV3
    ours = TransformersTopLevelRouterLogitsAdapter(
        display_name=model_type, hf_model_types=(model_type,), class_name_fragments=(class_prefix,)
    )
    ours.retarget_transformers_output_recorders(
        module,
        SimpleNamespace(model_family=model_type),
        layers[0],
        set(),
        _remove_transformers_output_capture_hooks,
    )


def hf_state_dict(state_dict: dict[str, torch.Tensor], model_type: str) -> dict[str, torch.Tensor]:
    """AutoEP's names back to the HF backbone's, with every expert present (the inverse of its swap).

    Per MoE layer AutoEP holds ``router.gate.weight`` (HF: ``gate.weight``), ``experts.w1 / w3 / w2``
    ``[E, F, D] / [E, F, D] / [E, D, F]`` (HF: fused ``experts.gate_up_proj [E, 2F, D]`` = gate rows then up
    rows, ``experts.down_proj``), and keeps the shared expert modules as ``shared_experts`` /
    ``shared_experts_gate`` (HF: the preset's names). Other keys pass through.
    """
    preset = get_preset(_preset_for(model_type))
    renames = {
        ".router.gate.": f".{preset.router_pattern}.",
        ".router.": f".{preset.router_pattern}.",  # buffers such as DeepSeek-V3's e_score_correction_bias
        ".shared_experts_gate.": f".{preset.shared_experts_gate_pattern}.",
        ".shared_experts.": f".{preset.shared_experts_pattern}.",
    }
    # AutoEP also registers its router under the preset's router name (`mlp.gate` -> `mlp.router`) so that
    # transformers' recorder finds it: the same tensors again, under `<layer>.gate.gate.*`.
    alias = f".{preset.router_pattern}.gate."
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        if alias in key:
            continue
        layer, sep, weight = key.rpartition(".experts.")
        if sep and weight in ("w1", "w2", "w3"):
            if weight == "w1":  # gate rows first, as HF's fused gate_up_proj
                out[f"{layer}.experts.{preset.expert_w1}"] = torch.cat(
                    [value, state_dict[f"{layer}.experts.w3"]], 1
                )
            elif weight == "w2":
                out[f"{layer}.experts.{preset.expert_w2}"] = value
            continue
        for ours, theirs in renames.items():
            if ours in key:
                key = key.replace(ours, theirs)
                break
        out[key] = value
    return out


# Architectures without a preset of their own whose MoE block is another's: OLMoE's is Mixtral's (gate +
# fused gate_up/down experts, softmax top-k); its norm_topk_prob=False is read from the backbone config.
_PRESET_OF_A_TWIN = {"olmoe": "mixtral"}


def _preset_for(model_type: str) -> str:
    preset = preset_name_for_hf_model_type(model_type) or _PRESET_OF_A_TWIN.get(model_type)
    if preset is None:
        raise ValueError(
            f"DeepSpeed {_deepspeed_version()} has no AutoEP preset for {model_type!r} backbones: train it with "
            "parallel.expert_parallel_size: 1 (ZeRO-3 still shards it), or pick a Qwen3-MoE, Qwen2-MoE, "
            "Mixtral, OLMoE or DeepSeek-V2/V3 checkpoint"
        )
    return preset


def _deepspeed_version() -> str:
    import deepspeed

    return deepspeed.__version__
