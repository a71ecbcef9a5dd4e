import pytest

from megamoe import MegaMoEConfig
from tests.conftest import tiny_config


@pytest.mark.parametrize(
    ("overrides", "field", "fragment"),
    [
        ({"num_experts_per_tok": 5}, "num_experts_per_tok", "top-k must be in [1, num_experts=4]"),
        ({"num_experts_per_tok": 0}, "num_experts_per_tok", "top-k must be in"),
        ({"hidden_size": 30}, "hidden_size", "not divisible by num_attention_heads=4"),
        (
            {"tasks": {"x": {"type": "seq_classification", "labels": ["a"]}}},
            "tasks.x.type",
            "'seq_classification'",
        ),
        ({"tasks": {"x": {"type": "token_classification", "labels": []}}}, "tasks.x.labels", "non-empty"),
        (
            {"tasks": {"x": {"type": "token_classification", "labels": ["O", "O"]}}},
            "tasks.x.labels",
            "duplicate",
        ),
        (
            {"tasks": {"x": {"type": "sequence_classification", "lables": ["a"]}}},
            "tasks.x",
            "unknown keys ['lables']",
        ),
        ({"tasks": {"x": {"type": "sequence_regression", "labels": ["a"]}}}, "tasks.x.labels", "no labels"),
        ({"norm_type": "batchnorm"}, "norm_type", "not one of ['layernorm', 'rmsnorm']"),
        ({"capacity_factor": 0.0}, "capacity_factor", "None (dropless) or > 0"),
        ({"num_experts": "8"}, "num_experts", "got str '8'"),
        ({"norm_topk_prob": 1}, "norm_topk_prob", "got int 1"),
        ({"moe_layer_freq": -1}, "moe_layer_freq", "0 = dense"),
    ],
)
def test_invalid_config_names_the_field(overrides, field, fragment):
    with pytest.raises(ValueError, match="MegaMoEConfig") as excinfo:
        tiny_config(**overrides)
    message = str(excinfo.value)
    assert f"MegaMoEConfig.{field}:" in message
    assert fragment in message


def test_dense_model_skips_moe_validation():
    # moe_layer_freq=0 is the dense baseline: expert settings are irrelevant and must not be rejected.
    config = tiny_config(moe_layer_freq=0, num_experts_per_tok=99)
    assert not any(config.is_moe_layer(i) for i in range(config.num_hidden_layers))


def test_moe_layer_frequency():
    config = tiny_config(num_hidden_layers=6, moe_layer_freq=2)
    assert [config.is_moe_layer(i) for i in range(6)] == [False, True, False, True, False, True]


def test_capacity_factor_accepts_an_int():
    assert tiny_config(capacity_factor=1).capacity_factor == 1


def test_round_trip_through_json(tmp_path):
    config = tiny_config(capacity_factor=1.25, task_aware_routing=True)
    config.save_pretrained(tmp_path)
    loaded = MegaMoEConfig.from_pretrained(tmp_path)
    assert loaded.tasks == config.tasks
    assert loaded.task_names == config.task_names == ["ner", "sentiment", "topic"]
    assert (loaded.capacity_factor, loaded.task_aware_routing) == (1.25, True)
