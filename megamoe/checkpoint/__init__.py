"""Checkpoints as release artifacts: upcycling dense published encoders into MegaMoE, the model card, and
pushing to the Hugging Face Hub."""

from .hub import HubAuthError, PushResult, push_to_hub
from .model_card import build_model_card, save_model_card
from .upcycle import config_from_bert, upcycle_bert_state_dict, upcycle_pretrained

__all__ = [
    "HubAuthError",
    "PushResult",
    "build_model_card",
    "config_from_bert",
    "push_to_hub",
    "save_model_card",
    "upcycle_bert_state_dict",
    "upcycle_pretrained",
]
