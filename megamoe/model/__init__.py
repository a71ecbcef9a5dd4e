"""The MegaMoE model: HF-style configuration and modeling files plus the MoE pieces they import.

Every file here uses only sibling (single-dot) imports, torch and transformers: ``save_pretrained`` copies
them next to the weights so ``AutoModel.from_pretrained(dir, trust_remote_code=True)`` works where megamoe
is not installed.
"""

from .configuration_megamoe import TASK_TYPES, MegaMoEConfig
from .modeling_megamoe import (
    MegaMoEForMultiTask,
    MegaMoEModel,
    MegaMoEModelOutput,
    MegaMoEMultiTaskOutput,
    MegaMoEPreTrainedModel,
)
from .moe_layer import MoEFeedForward, RouterStats

__all__ = [
    "TASK_TYPES",
    "MegaMoEConfig",
    "MegaMoEForMultiTask",
    "MegaMoEModel",
    "MegaMoEModelOutput",
    "MegaMoEMultiTaskOutput",
    "MegaMoEPreTrainedModel",
    "MoEFeedForward",
    "RouterStats",
]
