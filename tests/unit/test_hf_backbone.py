"""Published HF MoE architectures as the shared backbone: our heads, our padding-masked router losses."""

import re

import pytest
import torch
from transformers import AutoModel, AutoModelForCausalLM

from megamoe import MegaMoEConfig, MegaMoEForMultiTask
from megamoe.engine import autoep
from megamoe.engine.autoep import autoep_section, hf_state_dict
from megamoe.model.moe_losses import load_balancing_loss, router_z_loss
from megamoe.sources.hf_moe import load_hf_moe
from tests.conftest import HF_MOE_TINY, TASKS, tiny_config, tiny_hf_moe_config


def backbone_model(model_type: str, **overrides) -> MegaMoEForMultiTask:
    config = MegaMoEConfig(
        backbone=tiny_hf_moe_config(model_type).to_dict(), tasks=TASKS, classifier_pooling="last", **overrides
    )
    return MegaMoEForMultiTask(config).eval()


def right_padded(lengths=(9, 6, 3), vocab=64):
    ids = torch.randint(1, vocab, (len(lengths), max(lengths)))
    mask = torch.zeros_like(ids)
    for row, length in enumerate(lengths):
        mask[row, :length] = 1
    return ids.masked_fill(mask == 0, 0), mask


@pytest.mark.parametrize("model_type", sorted(HF_MOE_TINY))
def test_backbone_runs_every_task_with_masked_router_losses(model_type):
    model = backbone_model(model_type)
    assert model.config.num_experts == 4 and model.config.hidden_size == 32
    sparse_layers = [
        i for i, layer in enumerate(model.model.backbone.layers) if hasattr(layer.mlp, "experts")
    ]
    assert model.model.moe_layer_indices == sparse_layers == ([1] if model_type == "deepseek_v3" else [0, 1])
    ids, mask = right_padded()
    ner_labels = torch.randint(0, 5, ids.shape).masked_fill(mask == 0, -100)
    out = model(ids, mask, task="ner", labels=ner_labels)
    assert out.logits.shape == (3, 9, 5)

    # Router statistics and losses count real tokens only: the same as recomputed by hand from the
    # logits HF records, restricted to the 18 real tokens.
    recorded = model.model.backbone(ids, attention_mask=mask, output_router_logits=True).router_logits
    assert len(out.router_stats) == len(recorded) >= 1
    real_T = mask.reshape(-1).bool()
    for stats, logits_TE in zip(out.router_stats, recorded, strict=True):
        logits_TE = logits_TE.float()
        chosen_TK = logits_TE.topk(2, dim=-1).indices
        assert int(stats.tokens_per_expert.sum()) == 2 * int(mask.sum())
        assert torch.equal(
            stats.tokens_per_expert, torch.bincount(chosen_TK[real_T].reshape(-1), minlength=4)
        )
        expected_aux = load_balancing_loss(
            router_probs_TE=logits_TE[real_T].softmax(-1),
            expert_ids_TK=chosen_TK[real_T],
            token_mask_T=torch.ones(int(mask.sum()), dtype=torch.bool),
            num_experts=4,
        )
        torch.testing.assert_close(stats.aux_loss, expected_aux)
        torch.testing.assert_close(
            stats.z_loss, router_z_loss(router_logits_TE=logits_TE[real_T], token_mask_T=real_T[real_T])
        )
    expected_loss = out.task_loss + 0.01 * out.aux_loss + 0.001 * out.z_loss
    torch.testing.assert_close(out.loss, expected_loss)

    # Gradients reach the heads, the router and the experts.
    model.train()
    model(ids, mask, task="topic", labels=torch.tensor([0, 1, 2])).loss.backward()
    grads = {name: p.grad for name, p in model.named_parameters()}
    assert grads["heads.topic.out_proj.weight"].abs().sum() > 0
    assert any("experts" in n and g is not None and g.abs().sum() > 0 for n, g in grads.items())
    assert any(n.endswith("gate.weight") and g is not None and g.abs().sum() > 0 for n, g in grads.items())


@pytest.mark.parametrize("model_type", ["qwen3_moe", "mixtral"])
def test_padding_does_not_change_real_rows(model_type):
    model = backbone_model(model_type)
    ids, mask = right_padded()
    for task in ("topic", "ner"):
        batched = model(ids, mask, task=task).logits
        alone = model(ids[2:, :3], mask[2:, :3], task=task).logits
        torch.testing.assert_close(
            batched[2:, :3] if task == "ner" else batched[2:], alone, rtol=1e-5, atol=1e-5
        )


def test_last_token_pooling_reads_the_last_real_token_for_left_and_right_padding():
    model = backbone_model("qwen3_moe")
    ids = torch.randint(1, 64, (1, 5))
    alone = model(ids, task="topic").logits
    right = model(
        torch.cat([ids, torch.zeros(1, 3, dtype=torch.long)], 1),
        torch.tensor([[1] * 5 + [0] * 3]),
        task="topic",
    )
    torch.testing.assert_close(right.logits, alone, rtol=1e-5, atol=1e-5)
    head = model.heads["topic"]
    hidden = torch.randn(2, 4, 32)
    left_mask = torch.tensor([[0, 0, 1, 1], [0, 1, 1, 1]])
    torch.testing.assert_close(
        head(hidden, left_mask.bool()), head(hidden[:, 3:], torch.ones(2, 1, dtype=torch.bool))
    )


def test_router_features_the_backbone_lacks_are_refused():
    backbone = tiny_hf_moe_config("qwen3_moe").to_dict()
    for field, value in [("capacity_factor", 1.25), ("task_aware_routing", True), ("num_shared_experts", 1)]:
        with pytest.raises(ValueError, match=rf"MegaMoEConfig\.{field}: MegaMoE's own router only"):
            MegaMoEConfig(backbone=backbone, classifier_pooling="last", **{field: value})
    with pytest.raises(ValueError, match=r"MegaMoEConfig\.classifier_pooling: the first token of a causal"):
        MegaMoEConfig(backbone=backbone)
    with pytest.raises(ValueError, match=r"MegaMoEConfig\.backbone: model_type 'bert' is not one of"):
        MegaMoEConfig(backbone={"model_type": "bert"}, classifier_pooling="last")


def test_a_published_causal_lm_checkpoint_becomes_the_backbone(tmp_path):
    causal_lm = AutoModelForCausalLM.from_config(tiny_hf_moe_config("qwen3_moe"))
    causal_lm.save_pretrained(tmp_path / "published")
    model = load_hf_moe(str(tmp_path / "published"), tasks=TASKS).eval()
    assert model.config.classifier_pooling == "last" and model.config.backbone["model_type"] == "qwen3_moe"
    ids, mask = right_padded()
    expected = (
        AutoModel.from_pretrained(tmp_path / "published").eval()(ids, attention_mask=mask).last_hidden_state
    )
    got = model.model(ids, mask).last_hidden_state
    torch.testing.assert_close(got[mask.bool()], expected[mask.bool()])
    with pytest.raises(ValueError, match="is a 'megamoe' model; an HF MoE backbone is one of"):
        model.save_pretrained(tmp_path / "ours")
        load_hf_moe(str(tmp_path / "ours"), tasks=TASKS)


def test_autoep_section_targets_the_nested_backbone_and_refuses_architectures_without_a_preset(monkeypatch):
    objective = torch.nn.ModuleDict({"model": backbone_model("mixtral")})
    section = autoep_section(objective, 2)
    assert section["preset_model"] == "mixtral" and section["autoep_size"] == 2
    names = [
        name for name, _ in objective.named_modules() if re.fullmatch(section["moe_layer_pattern"], name)
    ]
    assert names == ["model.model.backbone.layers.0.mlp", "model.model.backbone.layers.1.mlp"]
    assert autoep_section(backbone_model("olmoe"), 2)["preset_model"] == "mixtral", "the same MoE block"
    monkeypatch.setattr(autoep, "_PRESET_OF_A_TWIN", {})
    with pytest.raises(ValueError, match="no AutoEP preset for 'olmoe' backbones: train it with"):
        autoep_section(backbone_model("olmoe"), 2)
    with pytest.raises(ValueError, match="AutoEP shards HF MoE backbones only"):
        autoep_section(MegaMoEForMultiTask(tiny_config()), 2)


def test_autoep_names_map_back_to_the_hf_layout():
    w1, w3, w2 = torch.randn(4, 16, 32), torch.randn(4, 16, 32), torch.randn(4, 32, 16)
    gate = torch.randn(4, 32)
    autoep = {
        "m.layers.0.mlp.router.gate.weight": gate,
        "m.layers.0.mlp.gate.gate.weight": gate,  # AutoEP's alias of its router, for the HF recorder
        "m.layers.0.mlp.experts.w1": w1,
        "m.layers.0.mlp.experts.w2": w2,
        "m.layers.0.mlp.experts.w3": w3,
        "m.layers.0.mlp.shared_experts.up_proj.weight": w1[0],
        "m.layers.0.mlp.shared_experts_gate.weight": gate[:1],
        "m.norm.weight": gate[0],
    }
    hf = hf_state_dict(autoep, "qwen2_moe")
    assert sorted(hf) == [
        "m.layers.0.mlp.experts.down_proj",
        "m.layers.0.mlp.experts.gate_up_proj",
        "m.layers.0.mlp.gate.weight",
        "m.layers.0.mlp.shared_expert.up_proj.weight",
        "m.layers.0.mlp.shared_expert_gate.weight",
        "m.norm.weight",
    ]
    assert torch.equal(hf["m.layers.0.mlp.experts.gate_up_proj"], torch.cat([w1, w3], dim=1))
    assert torch.equal(hf["m.layers.0.mlp.experts.down_proj"], w2)
    # That the fused order is right (gate rows first) is what tests/distributed/test_autoep.py's export
    # test shows: the exported HF model computes what the live AutoEP model computed.
