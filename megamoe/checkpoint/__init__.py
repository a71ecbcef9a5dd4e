"""Checkpoint conversion: dense published encoders into MegaMoE (sparse upcycling)."""

from .upcycle import config_from_bert, upcycle_bert_state_dict, upcycle_pretrained

__all__ = ["config_from_bert", "upcycle_bert_state_dict", "upcycle_pretrained"]
