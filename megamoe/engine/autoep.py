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


def record_router_logits(module: nn.Module) -> None:
    """After AutoEP swapped the MoE blocks, make transformers record router logits from AutoEP's router.

    DeepSpeed retargets the recorder itself for Qwen and Mixtral; for DeepSeek it does not, and the backbone
    would record nothing (its router class is gone). This applies DeepSpeed's own retargeting to those.
    """
    found = hf_backbone(module)
    layers = [m for m in module.modules() if isinstance(m, AutoEPMoELayer)]
    if found is None or not layers:
        return
    model_type = found[1].config.model_type
    if isinstance(
        get_preset_adapter(get_preset(_preset_for(model_type)).preset_adapter),
        TransformersTopLevelRouterLogitsAdapter,
    ):
        return
    class_prefix = type(found[1]).__name__.removesuffix("Model")  # DeepseekV3Model -> DeepseekV3
    adapter = TransformersTopLevelRouterLogitsAdapter(
        display_name=model_type, hf_model_types=(model_type,), class_name_fragments=(class_prefix,)
    )
    adapter.retarget_transformers_output_recorders(
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


def _preset_for(model_type: str) -> str:
    preset = preset_name_for_hf_model_type(model_type)
    if preset is None:
        raise ValueError(
            f"DeepSpeed {_deepspeed_version()} has no AutoEP preset for {model_type!r} backbones: train it with "
            "parallel.expert_parallel_size: 1 (ZeRO-3 still shards it), or pick a Qwen3-MoE, Qwen2-MoE, "
            "Mixtral or DeepSeek-V2/V3 checkpoint"
        )
    return preset


def _deepspeed_version() -> str:
    import deepspeed

    return deepspeed.__version__
