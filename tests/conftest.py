from typing import ClassVar

import pytest
import torch

from megamoe import MegaMoEConfig

TASKS = {
    "topic": {"type": "sequence_classification", "labels": ["business", "sport", "tech"]},
    "ner": {"type": "token_classification", "labels": ["O", "B-PER", "I-PER", "B-LOC", "I-LOC"]},
    "sentiment": {"type": "sequence_classification", "labels": ["negative", "positive"]},
}


def tiny_config(**overrides) -> MegaMoEConfig:
    """A 2-layer MegaMoE small enough for exact float comparisons in milliseconds."""
    kwargs = dict(
        vocab_size=64,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        moe_intermediate_size=16,
        num_experts=4,
        num_experts_per_tok=2,
        max_position_embeddings=32,
        tasks=TASKS,
    )
    kwargs.update(overrides)
    return MegaMoEConfig(**kwargs)


BERT_STYLE = dict(
    norm_position="post",
    norm_type="layernorm",
    layer_norm_eps=1e-12,
    mlp_type="mlp",
    hidden_act="gelu",
    mlp_bias=True,
    attention_bias=True,
    position_embedding_type="absolute",
    type_vocab_size=2,
)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# Tiny random configs of every supported HF MoE backbone: 2 layers, 4 experts, top-2 (4 % 2 == 0 for EP 2).
_HF_MOE_SIZES = dict(
    vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=64
)
HF_MOE_TINY = {
    "qwen3_moe": dict(num_key_value_heads=2, intermediate_size=64, num_experts=4, moe_intermediate_size=16),
    "qwen2_moe": dict(
        num_key_value_heads=2,
        intermediate_size=64,
        num_experts=4,
        moe_intermediate_size=16,
        shared_expert_intermediate_size=16,
    ),
    "mixtral": dict(num_key_value_heads=2, intermediate_size=16, num_local_experts=4),
    "olmoe": dict(num_key_value_heads=2, intermediate_size=16, num_experts=4, eos_token_id=None),
    "deepseek_v2": dict(
        intermediate_size=64,
        n_routed_experts=4,
        moe_intermediate_size=16,
        first_k_dense_replace=0,
        kv_lora_rank=16,
        q_lora_rank=None,
        qk_rope_head_dim=4,
        qk_nope_head_dim=4,
        v_head_dim=8,
    ),
    "deepseek_v3": dict(
        intermediate_size=64,
        n_routed_experts=4,
        moe_intermediate_size=16,
        first_k_dense_replace=1,
        n_group=2,
        topk_group=1,
        kv_lora_rank=16,
        q_lora_rank=None,
        qk_rope_head_dim=4,
        qk_nope_head_dim=4,
        v_head_dim=8,
    ),
}


def tiny_hf_moe_config(model_type: str):
    """A random-init-sized config of an HF MoE architecture (a `transformers.PreTrainedConfig`)."""
    from transformers import AutoConfig

    return AutoConfig.for_model(model_type, num_experts_per_tok=2, **_HF_MOE_SIZES, **HF_MOE_TINY[model_type])


class DeviceReads(torch.Tensor):
    """A tensor that counts reads of its values to the host (what waits for a GPU), and passes the count on
    to every tensor computed from it."""

    reads: ClassVar[list[str]] = []
    READS: ClassVar[set[str]] = {"item", "tolist", "cpu", "numpy", "__float__", "__int__", "__bool__"}

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", None) in cls.READS:
            cls.reads.append(func.__name__)
        return super().__torch_function__(func, types, args, kwargs or {})


def flip_bytes_inside(file) -> str:
    """Flip 16 bytes in the middle of the largest record of ``file`` (a torch.save zip), as a bad disk or
    copy would, leaving its zip structure whole; returns the record's name."""
    import struct
    import zipfile

    with zipfile.ZipFile(file) as archive:
        record = max(archive.infolist(), key=lambda info: info.file_size)
    data = bytearray(file.read_bytes())
    name_length, extra_length = struct.unpack(
        "<HH", data[record.header_offset + 26 : record.header_offset + 30]
    )
    start = record.header_offset + 30 + name_length + extra_length + record.file_size // 2
    data[start : start + 16] = bytes(255 - b for b in data[start : start + 16])
    file.write_bytes(bytes(data))
    return record.filename
