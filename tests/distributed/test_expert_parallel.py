"""Expert parallelism + ZeRO through the real deepspeed launcher on 2 CPU ranks (gloo).

The reference is one process with the same global batch: 2 ranks with expert_parallel_size=2 must give the
same losses and the same weights, each rank holding half the experts; a resumed run must continue exactly;
the checkpoint's export must hold what the live, sharded model computed.
"""

import json
import shutil

import pytest

from megamoe.checkpoint.resume import CheckpointError
from tests.distributed.ep_runs import (
    assert_same_weights,
    live_logits_match_export,
    losses,
    router_loads,
    weights,
    worker,
)
from tests.distributed.launcher import (
    accelerate_launch,
    deepspeed_launch,
    single_process,
    torchrun,
    two_nodes_on_one_host,
)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("one_process")
    single_process(*worker(out))
    return out


@pytest.fixture(scope="module")
def ep2_zero2(tmp_path_factory):
    out = tmp_path_factory.mktemp("ep2_zero2")
    deepspeed_launch(*worker(out, ep_size=2, save_at=2))
    return out


def test_an_expert_receiving_no_tokens_neither_hangs_nor_loses_gradients():
    result = deepspeed_launch("tests/distributed/ep_layer_worker.py")
    assert "EP-LAYER-OK" in result.stdout


def test_expert_parallel_zero2_matches_one_process(reference, ep2_zero2):
    assert losses(ep2_zero2) == pytest.approx(losses(reference), rel=1e-5)
    assert router_loads(ep2_zero2) == router_loads(reference)
    assert_same_weights(weights(ep2_zero2), weights(reference), atol=1e-6)


def test_each_rank_holds_half_the_experts(reference, ep2_zero2):
    one = json.loads((reference / "expert_numel.json").read_text())
    ep2 = json.loads((ep2_zero2 / "expert_numel.json").read_text())
    assert ep2["parameters"] * 2 == one["parameters"]
    # DeepSpeed put them in MoE param groups, partitioned over the expert-data-parallel group (size 1
    # here): this rank's optimizer holds fp32 state for exactly its own experts.
    assert ep2["optimizer_partition"] == ep2["parameters"]
    # One checkpoint file per global expert (4 experts x 2 layers), whichever rank wrote it.
    assert len(list((ep2_zero2 / "checkpoints" / "step_00000004").glob("layer_*_expert_*"))) == 8


def test_export_holds_what_the_live_sharded_model_computed(ep2_zero2):
    live_logits_match_export(ep2_zero2)


def test_export_names_missing_and_truncated_expert_files(ep2_zero2, tmp_path, capsys):
    from megamoe.cli import main

    tag = tmp_path / "step_00000004"
    shutil.copytree(ep2_zero2 / "checkpoints" / tag.name, tag)
    out = tmp_path / "exported"
    # The last expert of a layer too: stacking what is there would not notice that one is gone.
    missing = ["layer_0_expert_1_mp_rank_00_model_states.pt", "layer_1_expert_3_mp_rank_00_model_states.pt"]
    for name in missing:
        (tag / name).rename(tmp_path / name)
    assert main(["export", str(tag), str(out)]) == 2
    assert capsys.readouterr().err == (
        f"error: {tag} is incomplete: 2 of its 8 expert files are missing ({', '.join(missing)}); each of "
        "its 2 MoE layers has experts 0..3, one file each, written by the rank that held it: copy the missing "
        "files from that rank's node, or export an earlier checkpoint\n"
    )
    for name in missing:
        (tmp_path / name).rename(tag / name)
    damaged = tag / missing[1]
    damaged.write_bytes(damaged.read_bytes()[:100])
    assert main(["export", str(tag), str(out)]) == 2
    assert capsys.readouterr().err.startswith(
        f"error: {damaged} is truncated (it has no zip central directory"
    )
    assert not out.exists()


def test_resume_continues_exactly(ep2_zero2, tmp_path):
    deepspeed_launch(*worker(tmp_path, ep_size=2, resume=ep2_zero2 / "checkpoints" / "step_00000002"))
    assert json.loads((tmp_path / "losses.json").read_text())["first_step"] == 3
    assert losses(tmp_path) == losses(ep2_zero2)[2:]
    # Every per-expert tensor, bit for bit (a silently dropped expert shard would show here).
    assert_same_weights(weights(tmp_path), weights(ep2_zero2), atol=0)


def test_resume_on_a_different_topology_is_refused(ep2_zero2, tmp_path):
    with pytest.raises(AssertionError, match="resume with the same number of ranks"):
        single_process(*worker(tmp_path, resume=ep2_zero2))


def test_resume_without_a_checkpoint_is_an_error(tmp_path):
    from megamoe.checkpoint.resume import resolve_checkpoint

    with pytest.raises(CheckpointError, match="no checkpoint at"):
        resolve_checkpoint(tmp_path)


def test_expert_parallel_zero1_matches_one_process(reference, tmp_path):
    deepspeed_launch(*worker(tmp_path, ep_size=2, zero_stage=1))
    assert losses(tmp_path) == pytest.approx(losses(reference), rel=1e-5)
    assert_same_weights(weights(tmp_path), weights(reference), atol=1e-6)


def test_two_nodes_on_one_host_match_one_node(ep2_zero2, tmp_path):
    two_nodes_on_one_host(*worker(tmp_path, ep_size=2), hostfile=tmp_path / "hostfile")
    assert losses(tmp_path) == losses(ep2_zero2)


def test_a_stuck_rank_fails_the_job_with_rank_and_phase_instead_of_hanging():
    with pytest.raises(AssertionError) as failure:
        deepspeed_launch("tests/distributed/timeout_worker.py")
    assert (
        "COLLECTIVE-ERROR: rank 0 of 2: a collective failed during the forward pass of micro-batch 1"
        in str(failure.value)
    )


def test_zero3_data_parallel_matches_one_process(reference, tmp_path):
    """ZeRO-3 without EP (DeepSpeed refuses ZeRO-3 for native-MoE expert parallelism, see the README). The
    head idle in a step steps with a zero gradient, as in the one-process (ZeRO-2) reference."""
    deepspeed_launch(*worker(tmp_path, zero_stage=3))
    assert losses(tmp_path) == pytest.approx(losses(reference), rel=1e-5)
    assert_same_weights(weights(tmp_path), weights(reference), atol=1e-6)


@pytest.mark.parametrize("launch", [torchrun, accelerate_launch], ids=["torchrun", "accelerate"])
def test_other_launchers_run_the_same_program(reference, tmp_path, launch):
    launch(*worker(tmp_path, ep_size=2))
    assert losses(tmp_path) == pytest.approx(losses(reference), rel=1e-5)


@pytest.mark.parametrize("backbone", [None, "qwen3_moe"], ids=["megamoe_experts", "autoep"])
def test_the_run_timeout_reaches_every_process_group(tmp_path, backbone):
    """parallel.timeout_minutes holds for DeepSpeed's expert-parallel and expert-data-parallel groups too
    (created without a timeout argument; torch's 30 min default before), not only for the world group."""
    args = ["--out", str(tmp_path)] + (["--backbone", backbone] if backbone else [])
    deepspeed_launch("tests/distributed/group_timeout_worker.py", *args)
    for rank in (0, 1):
        timeouts = json.loads((tmp_path / f"timeouts_rank{rank}.json").read_text())
        assert len(timeouts) >= 3, timeouts  # the world, an expert-parallel and an expert-data-parallel group
        assert set(timeouts.values()) == {7 * 60.0}, timeouts
