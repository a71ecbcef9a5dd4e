"""The MegaMoE model: heads, losses, padding invariance, save/load and Hub remote code."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from megamoe import MegaMoEForMultiTask, MegaMoEModel
from tests.conftest import BERT_STYLE, tiny_config, tiny_hf_moe_config

ARCHITECTURES = {"modern": {}, "bert": BERT_STYLE}


def batch(batch_size=3, seq=9, vocab=64, pad_from=(9, 5, 2)):
    input_ids = torch.randint(1, vocab, (batch_size, seq))
    attention_mask = torch.ones(batch_size, seq, dtype=torch.long)
    for row, start in enumerate(pad_from):
        attention_mask[row, start:] = 0
        input_ids[row, start:] = 0
    return input_ids, attention_mask


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("task", ["topic", "ner"])
def test_logits_do_not_depend_on_padding_partners(arch, task):
    model = MegaMoEForMultiTask(tiny_config(**ARCHITECTURES[arch])).eval()
    ids = torch.randint(1, 64, (1, 4))
    alone = model(ids, torch.ones_like(ids), task=task).logits
    partner = torch.randint(1, 64, (1, 11))
    padded_ids = torch.cat([torch.cat([ids, torch.zeros(1, 7, dtype=torch.long)], dim=1), partner])
    padded_mask = torch.cat([torch.tensor([[1] * 4 + [0] * 7]), torch.ones(1, 11, dtype=torch.long)])
    batched = model(padded_ids, padded_mask, task=task).logits
    got = batched[:1] if task == "topic" else batched[:1, :4]
    torch.testing.assert_close(got, alone, rtol=1e-5, atol=1e-5)


def test_multitask_output_and_losses():
    config = tiny_config(router_aux_loss_coef=0.1, router_z_loss_coef=0.01)
    model = MegaMoEForMultiTask(config)
    ids, mask = batch()
    ner_labels = torch.randint(0, 5, ids.shape).masked_fill(mask == 0, -100)
    out = model(ids, mask, task="ner", labels=ner_labels)
    assert out.logits.shape == (3, 9, 5)
    assert len(out.router_stats) == 2 and [s.layer_idx for s in out.router_stats] == [0, 1]
    expected_task_loss = torch.nn.functional.cross_entropy(out.logits[mask.bool()], ner_labels[mask.bool()])
    torch.testing.assert_close(out.task_loss, expected_task_loss)
    torch.testing.assert_close(out.loss, out.task_loss + 0.1 * out.aux_loss + 0.01 * out.z_loss)
    torch.testing.assert_close(out.aux_loss, torch.stack([s.aux_loss for s in out.router_stats]).mean())
    for stats in out.router_stats:
        assert int(stats.tokens_per_expert.sum()) == int(mask.sum()) * config.num_experts_per_tok

    topic = model(ids, mask, task="topic", labels=torch.tensor([0, 2, 1]))
    assert topic.logits.shape == (3, 3)
    out.loss.backward()
    router = model.model.layers[0].mlp.router
    assert router.weight.grad is not None and router.weight.grad.abs().sum() > 0, (
        "aux loss must reach the router"
    )
    assert model.heads["topic"].out_proj.weight.grad is None, "only the running task's head gets gradients"


def test_regression_head():
    config = tiny_config(tasks={"score": {"type": "sequence_regression"}})
    model = MegaMoEForMultiTask(config)
    ids, mask = batch()
    labels = torch.tensor([0.5, -2.0, 3.0])
    out = model(ids, mask, task="score", labels=labels)
    assert out.logits.shape == (3, 1)
    torch.testing.assert_close(out.task_loss, torch.nn.functional.mse_loss(out.logits.squeeze(-1), labels))


def test_unknown_task_lists_the_known_ones():
    model = MegaMoEForMultiTask(tiny_config())
    ids, mask = batch()
    with pytest.raises(
        ValueError, match=r"unknown task 'pos'; this model's tasks are \['ner', 'sentiment', 'topic'\]"
    ):
        model(ids, mask, task="pos")
    with pytest.raises(ValueError, match="pass task=<name>"):
        model(ids, mask)


def test_dense_baseline_has_no_router():
    model = MegaMoEForMultiTask(tiny_config(moe_layer_freq=0))
    out = model(*batch(), task="topic", labels=torch.tensor([0, 1, 2]))
    assert out.router_stats == [] and out.aux_loss.item() == 0.0 and out.z_loss.item() == 0.0
    assert not any("experts" in name for name, _ in model.named_parameters())
    torch.testing.assert_close(out.loss, out.task_loss)


def test_moe_layer_freq_two_alternates_dense_and_moe():
    model = MegaMoEModel(tiny_config(num_hidden_layers=4, moe_layer_freq=2))
    assert [layer.is_moe for layer in model.layers] == [False, True, False, True]
    assert [s.layer_idx for s in model(*batch()).router_stats] == [1, 3]


def test_capacity_factor_reports_dropped_tokens():
    model = MegaMoEForMultiTask(tiny_config(capacity_factor=0.25)).eval()
    out = model(*batch(), task="topic")
    assert sum(int(s.dropped_tokens) for s in out.router_stats) > 0


def test_task_aware_routing_differs_between_tasks():
    model = MegaMoEForMultiTask(tiny_config(task_aware_routing=True)).eval()
    ids, mask = batch()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.router.task_logit_bias.normal_(std=10.0)
    topic = model(ids, mask, task="topic").router_stats[0].tokens_per_expert
    sentiment = model(ids, mask, task="sentiment").router_stats[0].tokens_per_expert
    assert not torch.equal(topic, sentiment)


def test_sequence_longer_than_positions_is_a_clear_error():
    model = MegaMoEModel(tiny_config(**BERT_STYLE))
    with pytest.raises(ValueError, match="exceeds max_position_embeddings=32"):
        model(torch.ones(1, 33, dtype=torch.long))


def test_gradient_checkpointing_gives_the_same_gradients():
    config = tiny_config()
    model = MegaMoEForMultiTask(config)
    ids, mask = batch()
    labels = torch.tensor([0, 1, 2])
    model(ids, mask, task="topic", labels=labels).loss.backward()
    plain = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    model.gradient_checkpointing_enable()
    model.train()
    model(ids, mask, task="topic", labels=labels).loss.backward()
    for name, grad in plain.items():
        torch.testing.assert_close(dict(model.named_parameters())[name].grad, grad, msg=name)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_save_and_load_give_identical_logits(tmp_path, arch):
    model = MegaMoEForMultiTask(tiny_config(**ARCHITECTURES[arch])).eval()
    ids, mask = batch()
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    loaded = MegaMoEForMultiTask.from_pretrained(tmp_path).eval()
    for task in ("topic", "ner", "sentiment"):
        assert torch.equal(loaded(ids, mask, task=task).logits, model(ids, mask, task=task).logits)


@pytest.mark.parametrize(
    "config",
    [
        pytest.param(lambda: tiny_config(capacity_factor=2.0, num_shared_experts=1), id="megamoe"),
        pytest.param(
            lambda: tiny_config(
                backbone=tiny_hf_moe_config("qwen3_moe").to_dict(), classifier_pooling="last"
            ),
            id="qwen3_moe-backbone",
        ),
    ],
)
def test_automodel_remote_code_in_a_process_without_megamoe(tmp_path, config):
    model = MegaMoEForMultiTask(config()).eval()
    model_dir = tmp_path / "model"
    model.save_pretrained(model_dir)
    shipped = sorted(p.name for p in model_dir.glob("*.py"))
    assert shipped == [
        "configuration_megamoe.py",
        "modeling_megamoe.py",
        "moe_dispatch.py",
        "moe_experts.py",
        "moe_layer.py",
        "moe_losses.py",
        "moe_router.py",
    ]
    ids, mask = batch()
    expected = {task: model(ids, mask, task=task).logits for task in ("topic", "ner")}
    torch.save({"ids": ids, "mask": mask, "expected": expected}, tmp_path / "reference.pt")

    backbone_type = (model.config.backbone or {}).get("model_type")
    script = textwrap.dedent(
        f"""
        import sys
        sys.modules["megamoe"] = None  # any import of megamoe now fails: only the shipped code may be used
        import torch
        from transformers import AutoConfig, AutoModel

        ref = torch.load({str(tmp_path / "reference.pt")!r})
        config = AutoConfig.from_pretrained({str(model_dir)!r}, trust_remote_code=True)
        backbone_type = (config.backbone or {{}}).get("model_type")
        assert config.model_type == "megamoe" and backbone_type == {backbone_type!r}, config
        model = AutoModel.from_pretrained({str(model_dir)!r}, trust_remote_code=True).eval()
        assert type(model).__name__ == "MegaMoEForMultiTask", type(model)
        assert type(model).__module__.startswith("transformers_modules."), type(model).__module__
        for task, logits in ref["expected"].items():
            assert torch.equal(model(ref["ids"], ref["mask"], task=task).logits, logits), task
        print("REMOTE_CODE_OK")
        """
    )
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf_home"), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, cwd=tmp_path, timeout=300
    )
    assert result.returncode == 0 and "REMOTE_CODE_OK" in result.stdout, result.stderr[-3000:]
