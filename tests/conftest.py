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
