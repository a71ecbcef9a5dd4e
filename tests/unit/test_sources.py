"""Model sources (`model.init`): each builds its model once, from its checkpoint, and refuses what it cannot apply."""

import pytest
import torch
import transformers
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from megamoe import MegaMoEForMultiTask
from megamoe.config import ConfigError, ModelSection
from megamoe.sources import BuildOptions, build_model, declared_model_config
from megamoe.sources.hf_moe import load_hf_moe
from tests.conftest import TASKS, tiny_config, tiny_hf_moe_config


@pytest.fixture
def trained(tmp_path):
    model = MegaMoEForMultiTask(tiny_config())
    model.save_pretrained(tmp_path / "trained")
    return model, str(tmp_path / "trained")


def pretrained_section(base: str, **architecture) -> ModelSection:
    return ModelSection(init="pretrained", base=base, tokenizer=base, architecture=architecture)


def test_pretrained_takes_new_training_settings_and_keeps_the_weights(trained):
    saved, base = trained
    section = pretrained_section(
        base, router_aux_loss_coef=0.5, hidden_dropout_prob=0.2, capacity_factor=1.5, num_experts=4
    )
    assert declared_model_config(section, None).capacity_factor == 1.5
    model = build_model(section, TASKS, tokenizer=None, options=BuildOptions(seed=0, dtype=torch.float32))
    assert (model.config.router_aux_loss_coef, model.config.hidden_dropout_prob) == (0.5, 0.2)
    assert model.config.capacity_factor == 1.5
    for name, value in saved.state_dict().items():
        assert torch.equal(model.state_dict()[name], value), name


@pytest.mark.parametrize(
    ("field", "value", "saved"),
    [("num_experts", 8, 4), ("moe_intermediate_size", 32, 16), ("task_aware_routing", True, False)],
)
def test_pretrained_refuses_what_its_weights_fix_naming_the_field(trained, field, value, saved):
    _, base = trained
    with pytest.raises(
        ConfigError, match=rf"model\.architecture\.{field}: .* was trained with {field}={saved}"
    ):
        declared_model_config(pretrained_section(base, **{field: value}), None)


def test_pretrained_refuses_an_invalid_training_setting(trained):
    with pytest.raises(ConfigError, match="capacity_factor"):
        declared_model_config(pretrained_section(trained[1], capacity_factor=-1.0), None)


@pytest.mark.parametrize("init", ["pretrained", "hf_moe", "scratch"])
def test_expert_noise_is_refused_where_no_expert_is_copied(init):
    with pytest.raises(ConfigError, match="expert_noise_std: only init: upcycle copies experts"):
        ModelSection(init=init, base="somewhere", tokenizer="somewhere", expert_noise_std=0.01)


def test_an_hf_moe_checkpoint_is_loaded_once_in_the_run_dtype(tmp_path, monkeypatch):
    """No random backbone is built first (from_config is never called), and the backbone holds the
    checkpoint's bf16 tensors bit for bit."""
    causal_lm = AutoModelForCausalLM.from_config(tiny_hf_moe_config("qwen3_moe")).to(torch.bfloat16)
    causal_lm.save_pretrained(tmp_path / "published")
    checkpoint = load_file(tmp_path / "published" / "model.safetensors")

    def refuse(*args, **kwargs):
        raise AssertionError("a random backbone was built")

    monkeypatch.setattr(transformers.AutoModel, "from_config", refuse)
    model = load_hf_moe(str(tmp_path / "published"), tasks=TASKS, dtype=torch.bfloat16)
    backbone = model.model.backbone.state_dict()
    assert {value.dtype for value in backbone.values() if value.is_floating_point()} == {torch.bfloat16}
    fused = {key for key in backbone if "experts" in key}
    assert fused, "the experts are transformers' fused tensors"
    for key, value in backbone.items():
        if f"model.{key}" in checkpoint:
            assert torch.equal(value, checkpoint[f"model.{key}"]), key
    head = model.heads["topic"].out_proj.weight
    assert head.device.type == "cpu" and head.abs().sum() > 0
