"""megamoe: sparse Mixture-of-Experts transformers trained on several NLP tasks at once."""

from transformers import AutoConfig, AutoModel

from .model import MegaMoEConfig, MegaMoEForMultiTask, MegaMoEModel
from .predict import MultiTaskPredictor

__version__ = "0.1.0"

AutoConfig.register(MegaMoEConfig.model_type, MegaMoEConfig)
# AutoModel resolves to the multi-task model: a MegaMoE checkpoint is its heads as much as its backbone.
AutoModel.register(MegaMoEConfig, MegaMoEForMultiTask)
# save_pretrained then writes auto_map and copies the model files, so the Hub copy loads without megamoe.
MegaMoEConfig.register_for_auto_class()
MegaMoEForMultiTask.register_for_auto_class("AutoModel")

__all__ = ["MegaMoEConfig", "MegaMoEForMultiTask", "MegaMoEModel", "MultiTaskPredictor", "__version__"]
