"""Checkpoints as release artifacts: resume, export to an HF directory, the model card, and pushing to the
Hugging Face Hub. Where a model comes from (upcycling, HF MoE backbones, builtin models) is megamoe.sources."""

from .hub import HubAuthError, PushResult, push_to_hub
from .model_card import build_model_card, save_model_card

__all__ = ["HubAuthError", "PushResult", "build_model_card", "push_to_hub", "save_model_card"]
