"""Checkpoints as release artifacts: upcycling dense published encoders into MegaMoE, published HF MoE
models as its backbone, the model card, and pushing to the Hugging Face Hub."""

from .hf_moe import hf_moe_config, load_hf_moe
from .hub import HubAuthError, PushResult, push_to_hub
from .model_card import build_model_card, save_model_card
from .upcycle import config_from_bert, upcycle_bert_state_dict, upcycle_pretrained

__all__ = [
    "HubAuthError",
    "PushResult",
    "build_model_card",
    "config_from_bert",
    "hf_moe_config",
    "load_hf_moe",
    "push_to_hub",
    "save_model_card",
    "upcycle_bert_state_dict",
    "upcycle_pretrained",
]
