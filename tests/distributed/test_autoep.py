"""HF MoE backbones with DeepSpeed AutoEP + ZeRO-3 through the real deepspeed launcher on 2 CPU ranks.

The reference is one process (ZeRO-3, no EP) on the same global batches: AutoEP must give the same losses,
route the same tokens to the same experts (so the router losses see what one process sees), hold half the
experts per rank, resume exactly, and export to an HF-layout checkpoint that computes what the live,
sharded model computed.
"""

import json
import textwrap

import pytest
import torch

from tests.distributed.ep_runs import (
    assert_same_weights,
    live_logits_match_export,
    losses,
    router_loads,
    weights,
    worker,
)
from tests.distributed.launcher import REPO, deepspeed_launch, single_process

pytestmark = pytest.mark.slow

# Qwen3-MoE, Qwen2-MoE (shared expert + gate), Mixtral, DeepSeek-V3 (sigmoid group routing) and OLMoE (no
# preset of its own: Mixtral's, with norm_topk_prob=False). For the last two DeepSpeed does not retarget the
# router-logit recorder; megamoe does.
BACKBONES = ["qwen3_moe", "qwen2_moe", "mixtral", "deepseek_v3", "olmoe"]


@pytest.fixture(scope="module")
def zero3_runs(tmp_path_factory):
    """backbone -> (one process, AutoEP on 2 ranks) run directories. Every backbone runs in the same single
    process and the same launch, one engine after another: the start-up is paid twice, not ten times."""
    one = [tmp_path_factory.mktemp(f"{backbone}_one_process") for backbone in BACKBONES]
    two = [tmp_path_factory.mktemp(f"{backbone}_autoep2_zero3") for backbone in BACKBONES]
    single_process(*worker(one, backbone=BACKBONES, zero_stage=3))
    deepspeed_launch(*worker(two, backbone=BACKBONES, zero_stage=3, ep_size=2, save_at=2))
    return dict(zip(BACKBONES, zip(one, two, strict=True), strict=True))


@pytest.fixture(params=BACKBONES)
def runs(request, zero3_runs):
    return zero3_runs[request.param]


def test_autoep_zero3_matches_one_process(runs):
    one, two = runs
    assert losses(two) == pytest.approx(losses(one), rel=1e-5)
    assert router_loads(two) == router_loads(one)
    ep, reference = weights(two), weights(one)
    # A key bias (Qwen2-MoE has them) shifts all of a query's logits equally and softmax ignores it: its
    # gradient is round-off, which Adam divides by its own tiny magnitude. On this VM the two runs differ by
    # 2.3e-6 there (1e-7 elsewhere), the same with the code before 2026-12-01.
    key_biases = {name for name in reference if name.endswith("self_attn.k_proj.bias")}
    assert_same_weights({n: ep[n] for n in key_biases}, {n: reference[n] for n in key_biases}, atol=1e-4)
    for name in key_biases:
        del ep[name], reference[name]
    # Round-off elsewhere: Mixtral's embedding differed by 1.5e-6 on one VM (2026-12-02, the code before that day
    # too), 1e-7 on others; a mis-sharded update moves weights by ~lr, 1e-3.
    assert_same_weights(ep, reference, atol=2e-6)


def test_each_rank_holds_half_the_experts(runs):
    one, two = runs
    full = json.loads((one / "expert_numel.json").read_text())["parameters"]
    assert json.loads((two / "expert_numel.json").read_text())["parameters"] * 2 == full


def test_autoep_export_holds_what_the_live_sharded_model_computed(runs):
    live_logits_match_export(runs[1])


@pytest.mark.parametrize("runs", ["qwen3_moe"], indirect=True)  # the same code for every backbone
def test_autoep_resume_continues_exactly(runs, tmp_path):
    two = runs[1]
    resume = two / "checkpoints" / "step_00000002"
    deepspeed_launch(*worker(tmp_path, backbone="qwen3_moe", zero_stage=3, ep_size=2, resume=resume))
    assert losses(tmp_path) == losses(two)[2:]
    assert_same_weights(weights(tmp_path), weights(two), atol=0)


def test_autoep_zero2_matches_one_process(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    single_process(*worker(one, backbone="qwen3_moe", zero_stage=2))
    deepspeed_launch(*worker(two, backbone="qwen3_moe", zero_stage=2, ep_size=2))
    assert losses(two) == pytest.approx(losses(one), rel=1e-5)
    assert_same_weights(weights(two), weights(one), atol=1e-6)


def test_megamoe_train_fine_tunes_a_published_hf_moe_checkpoint_with_autoep(tmp_path):
    """`deepspeed --module megamoe train` with `model.init: hf_moe`: a causal-LM checkpoint on disk (as the Hub
    would serve it) becomes the backbone, AutoEP shards its experts, ZeRO-3 the rest; the run is evaluated,
    exported in the HF layout and loads without megamoe."""
    from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

    from tests.conftest import tiny_hf_moe_config

    published = tmp_path / "published"
    tokenizer = AutoTokenizer.from_pretrained(REPO / "tokenizer" / "default")
    backbone_config = tiny_hf_moe_config("qwen3_moe")
    backbone_config.vocab_size = len(tokenizer)
    AutoModelForCausalLM.from_config(backbone_config).save_pretrained(published)
    tokenizer.save_pretrained(published)
    config = tmp_path / "run.yaml"
    config.write_text(
        textwrap.dedent(
            f"""
            run_dir: {tmp_path / "run"}
            model: {{init: hf_moe, base: {published}}}
            tasks:
              topic: {{type: sequence_classification, source: "builtin:bbc_news", max_train_examples: 16, max_eval_examples: 16}}
              ner: {{type: token_classification, source: "builtin:wnut16", max_train_examples: 16, max_eval_examples: 16}}
            data: {{max_length: 32, sampling: round_robin}}
            train: {{max_steps: 4, micro_batch_size: 4, lr: 1.0e-3}}
            parallel: {{expert_parallel_size: 2, zero_stage: 3}}
            """
        )
    )
    result = deepspeed_launch("megamoe", "train", str(config), module=True)
    run_dir = tmp_path / "run"
    assert f"run directory: {run_dir}" in result.stdout
    ds_config = json.loads((run_dir / "deepspeed_config.json").read_text())
    assert ds_config["zero_optimization"]["stage"] == 3
    assert ds_config["expert_parallel"]["preset_model"] == "qwen3_moe"
    assert set(json.loads((run_dir / "metrics.json").read_text())) == {"topic", "ner"}
    assert "`qwen3_moe` decoder backbone" in (run_dir / "model" / "README.md").read_text()

    model = AutoModel.from_pretrained(run_dir / "model", trust_remote_code=True).eval()
    experts = model.model.backbone.layers[0].mlp.experts
    assert experts.gate_up_proj.shape == (4, 32, 32), "every expert, in the HF layout"
    assert not torch.equal(
        experts.gate_up_proj[0], AutoModel.from_pretrained(published).layers[0].mlp.experts.gate_up_proj[0]
    )
    batch = tokenizer(["Shares rose sharply in London."], return_tensors="pt")
    assert model(**batch, task="topic").logits.shape == (1, 5)
