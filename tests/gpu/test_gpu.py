"""Checks that need a CUDA device (one NCCL rank): ``python -m pytest -m gpu tests/gpu``.

Deselected by default (pyproject's ``-m 'not gpu'``); run them whenever a GPU machine is lent, and record the
run in docs/benchmarks.md (docs/gpu.md says how).
"""

from datetime import timedelta

import pytest
import torch
import torch.distributed as dist

from megamoe.config import ParallelSection, TrainSection
from megamoe.engine.deepspeed_engine import Engine, deepspeed_config
from megamoe.engine.distributed import init_distributed
from megamoe.model import moe_experts
from megamoe.model.moe_experts import grouped_linear
from megamoe.tasks.objective import MultiTaskObjective
from megamoe.tasks.weighting import build_weighting
from tests.conftest import TASKS

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.fixture(scope="module")
def nccl_group():
    init_distributed(timeout_minutes=7.0)
    assert dist.get_backend() == "nccl"
    return dist.group.WORLD


def test_nccl_groups_created_without_a_timeout_get_the_run_timeout(nccl_group):
    """DeepSpeed's expert groups are `new_group(ranks)` without a timeout: on NCCL they read
    `default_pg_nccl_timeout`, which init_distributed sets to parallel.timeout_minutes."""
    group = dist.new_group([0])
    for pg in (nccl_group, group):
        backend = pg._get_backend(torch.device("cuda"))
        assert backend.options._timeout == timedelta(minutes=7.0)


def test_bf16_steps_of_the_quickstart_model_train_and_export_what_it_computes(nccl_group, tmp_path):
    """The quickstart's architecture: all-MiniLM-L6-v2's shape (random weights: the GPU machine has no copy of
    the published ones) upcycled to 8 experts, top-2, in its last layer."""
    from transformers import BertConfig, BertModel

    from megamoe.checkpoint.export import load_checkpoint_model
    from megamoe.checkpoint.resume import Checkpointer, Topology
    from megamoe.sources.upcycle import upcycle_pretrained

    minilm = BertConfig(hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536)
    BertModel(minilm).save_pretrained(tmp_path / "dense")
    model = upcycle_pretrained(
        str(tmp_path / "dense"),
        tasks=TASKS,
        expert_noise_std=0.01,
        num_experts=8,
        num_experts_per_tok=2,
        moe_layer_freq=6,
    )
    objective = MultiTaskObjective(model, build_weighting("static", list(model.config.tasks)))
    train = TrainSection(max_steps=4, micro_batch_size=4, precision="bf16", lr=1e-3, warmup_ratio=0.0)
    engine = Engine(objective, deepspeed_config(train, ParallelSection(zero_stage=2)))
    ids = torch.randint(1000, 30000, (4, 12))
    batch = {
        "task": "topic",
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "labels": torch.tensor([0, 1, 2, 0]),
    }
    losses = [float(engine.train_step(batch).loss) for _ in range(4)]
    assert losses[-1] < losses[0], losses
    checkpointer = Checkpointer(
        engine.engine,
        tmp_path / "checkpoints",
        topology=Topology(1, 1, 2),
        rank_local={},
        write_hf_files=model.config.save_pretrained,
    )
    exported = load_checkpoint_model(checkpointer.save(4)).cuda().eval()
    live = engine.eval_forward(batch).logits.float()
    with torch.no_grad():
        torch.testing.assert_close(
            exported(ids.cuda(), task="topic").logits, live, rtol=5e-2, atol=5e-2
        )  # bf16 vs fp32


def test_grouped_mm_runs_on_cuda_in_bf16_and_equals_the_loop(monkeypatch):
    calls = []
    supported = moe_experts._grouped_mm_supported
    monkeypatch.setattr(
        moe_experts, "_grouped_mm_supported", lambda x, w: calls.append(supported(x, w)) or calls[-1]
    )
    sizes = torch.tensor([3, 0, 5, 8], device="cuda")
    x = torch.randn(16, 64, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(4, 128, 64, device="cuda", dtype=torch.bfloat16)
    fast = grouped_linear(x, w, sizes)
    assert calls == [True], "torch.nn.functional.grouped_mm took the CUDA path"
    starts = [0, 3, 3, 8]
    loop = torch.cat(
        [x[s : s + n] @ w[e].T for e, (s, n) in enumerate(zip(starts, sizes.tolist(), strict=True))]
    )
    torch.testing.assert_close(fast, loop, rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("capacity_factor", [None, 1.0], ids=["dropless", "capacity"])
def test_a_bf16_moe_layer_step_reads_nothing_back_to_the_host(capacity_factor):
    """``set_sync_debug_mode("error")`` raises on any device-to-host sync: the layer's forward and backward
    (router, dispatch, `F.grouped_mm` experts, combine, losses) must make none, padded or at capacity."""
    from tests.unit.test_moe_layer import HIDDEN, make_layer

    layer = make_layer(num_experts=8, top_k=2, capacity_factor=capacity_factor).to("cuda", torch.bfloat16)
    x = torch.randn(4, 64, HIDDEN, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    mask = torch.ones(4, 64, dtype=torch.bool, device="cuda")
    mask[1, 40:] = False
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        y, stats = layer(x, mask)
        (y.float().sum() + stats.aux_loss + stats.z_loss).backward()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert torch.isfinite(x.grad).all() and all(torch.isfinite(p.grad).all() for p in layer.parameters())


def test_choosing_the_checkpoint_to_resume_all_reduces_on_the_gpu_under_nccl(nccl_group, tmp_path):
    """NCCL takes no CPU tensor: the ranks' agreement on a whole checkpoint must run on this rank's GPU."""
    import json

    from megamoe.checkpoint.resume import LATEST, RUN_INFO, newest_whole_checkpoint, tag_for

    tag_dir = tmp_path / "checkpoints" / tag_for(1)
    tag_dir.mkdir(parents=True)
    torch.save({"weight": torch.ones(8)}, tag_dir / "mp_rank_00_model_states.pt")
    torch.save({}, tag_dir / "megamoe_rank00000.pt")
    topology = {"world_size": 1, "expert_parallel_size": 1, "zero_stage": 0}
    (tag_dir / RUN_INFO).write_text(json.dumps({"step": 1, "format": 2, "topology": topology}))
    (tmp_path / "checkpoints" / LATEST).write_text(tag_dir.name)
    assert newest_whole_checkpoint(tmp_path) == tag_dir
