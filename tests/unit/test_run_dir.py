"""`megamoe train` refuses a run directory it cannot use before any work, and writes nothing into it then."""

import os
import re
import subprocess

import pytest

from megamoe import train as train_module
from megamoe.cli import main
from megamoe.run_dir import check_run_dir


@pytest.fixture
def train_cli(tmp_path, monkeypatch, capsys):
    """`megamoe train` on a run config with the given run_dir; returns (exit code, stderr). Joining the
    process group fails the test: every check here comes before it."""

    def joined(*args, **kwargs):
        raise AssertionError("the process group was joined before the run directory was checked")

    monkeypatch.setattr(train_module, "init_distributed", joined)

    def train(run_dir, *flags):
        config = tmp_path / "run.yaml"
        config.write_text(
            f"run_dir: {run_dir}\n"
            "model: {init: upcycle, base: builtin:all-MiniLM-L6-v2}\n"
            "tasks: {topic: {type: sequence_classification, source: 'builtin:bbc_news'}}\n"
        )
        code = main(["train", str(config), *flags])
        return code, capsys.readouterr().err

    return train


@pytest.fixture
def unwritable_dir(tmp_path):
    """A directory nothing can be created in: mode 0555, and immutable (chattr +i) for root, whom modes do not
    stop."""
    directory = tmp_path / "read_only"
    directory.mkdir()
    directory.chmod(0o555)
    as_root = os.geteuid() == 0
    if as_root and subprocess.run(["chattr", "+i", str(directory)], capture_output=True).returncode != 0:
        directory.chmod(0o755)
        pytest.skip("running as root, and chattr +i is not available to make a directory unwritable")
    yield directory
    if as_root:
        subprocess.run(["chattr", "-i", str(directory)], check=True)
    directory.chmod(0o755)


def contents(directory):
    return {path: path.read_bytes() if path.is_file() else None for path in sorted(directory.rglob("*"))}


@pytest.mark.parametrize("inside", [False, True])
def test_an_unwritable_run_dir_fails_before_any_work(train_cli, unwritable_dir, inside):
    run_dir = unwritable_dir if inside else unwritable_dir / "runs" / "new"
    code, err = train_cli(run_dir)
    what = "write into" if inside else f"create {run_dir} in"
    assert code == 2 and re.fullmatch(
        f"error: run_dir: cannot {re.escape(what)} {unwritable_dir} \\((Permission denied|Operation not "
        r"permitted)\): give a run_dir on a writable filesystem \(override run_dir=PATH\)\n",
        err,
    ), err
    assert list(unwritable_dir.iterdir()) == []


def test_a_run_dir_under_a_file_fails_before_any_work(train_cli, tmp_path):
    (tmp_path / "notes").write_text("not a directory")
    code, err = train_cli(tmp_path / "notes" / "run")
    assert code == 2
    assert err == (
        f"error: run_dir: {tmp_path / 'notes'} is a file, so {tmp_path / 'notes' / 'run'} cannot be created; "
        "give a directory\n"
    )


def test_training_again_into_a_run_dir_with_a_run_is_refused_and_changes_nothing(train_cli, tmp_path):
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints" / "step_00000006").mkdir(parents=True)
    (run_dir / "checkpoints" / "latest").write_text("step_00000006")
    (run_dir / "metrics.json").write_text("{}")
    (run_dir / "deepspeed_config.json").write_text("{}")
    before = contents(run_dir)
    code, err = train_cli(run_dir)
    assert code == 2
    assert err == (
        f"error: run_dir: {run_dir} already holds a run (checkpoints, metrics.json): continue that run with "
        "--resume, or train into a fresh run_dir (override run_dir=PATH); one directory never mixes two runs' "
        "checkpoints, metrics and event files\n"
    )
    assert contents(run_dir) == before


def test_a_run_that_left_no_checkpoint_is_refused_without_offering_resume(tmp_path):
    (tmp_path / "tensorboard").mkdir()
    (tmp_path / "tensorboard" / "events.out.tfevents.1").write_bytes(b"")
    with pytest.raises(
        ValueError, match=r"\(tensorboard\): it has no checkpoint to --resume from: remove it"
    ):
        check_run_dir(tmp_path, resuming=False)


def test_a_run_dir_a_run_may_use(tmp_path):
    # What a run that failed before training leaves (generated configs, an empty checkpoints/) is no run.
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "deepspeed_config.json").write_text("{}")
    check_run_dir(tmp_path, resuming=False)
    # A run continued in its own directory.
    (tmp_path / "metrics.json").write_text("{}")
    check_run_dir(tmp_path, resuming=True)
    assert sorted(path.name for path in tmp_path.iterdir()) == [
        "checkpoints",
        "deepspeed_config.json",
        "metrics.json",
    ]


def fake_disk(monkeypatch, free: int) -> None:
    from collections import namedtuple

    from megamoe import run_dir

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(run_dir.shutil, "disk_usage", lambda path: usage(10**15, 10**15 - free, free))


def test_a_filesystem_without_room_for_one_checkpoint_is_refused_and_a_tight_one_warned(
    monkeypatch, tmp_path, capsys
):
    import torch

    from megamoe import MegaMoEForMultiTask
    from megamoe.config import ConfigError
    from megamoe.run_dir import check_free_space
    from tests.conftest import tiny_config

    config = tiny_config()
    parameters = sum(p.numel() for p in MegaMoEForMultiTask(config).parameters())
    checkpoint = parameters * (4 + 12)  # fp32 weights, fp32 master, Adam's two moments
    fake_disk(monkeypatch, checkpoint - 1)
    with pytest.raises(ConfigError, match=r"x 16 bytes: the weights, the fp32 master weights and Adam's two"):
        check_free_space(tmp_path / "run", config, torch.float32, keep_last=2)
    fake_disk(monkeypatch, checkpoint)  # one fits, the 2 kept + 1 being written + the export do not
    check_free_space(tmp_path / "run", config, torch.float32, keep_last=2)
    assert "the run needs ~" in capsys.readouterr().out
    fake_disk(monkeypatch, 3 * checkpoint + parameters * 4)
    check_free_space(tmp_path / "run", config, torch.float32, keep_last=2)
    assert capsys.readouterr().out == ""


def test_megamoe_train_on_a_full_filesystem_fails_before_any_data_work(monkeypatch, tmp_path, capsys):
    def prepared(*args, **kwargs):
        raise AssertionError("data was prepared before the free space was checked")

    monkeypatch.setattr(train_module, "prepare_task_data", prepared)
    fake_disk(monkeypatch, 10**6)
    config = tmp_path / "run.yaml"
    config.write_text(
        f"run_dir: {tmp_path / 'run'}\n"
        "model: {init: upcycle, base: builtin:all-MiniLM-L6-v2}\n"
        "tasks: {topic: {type: sequence_classification, source: 'builtin:bbc_news'}}\n"
    )
    assert main(["train", str(config)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(
        f"error: run_dir: {tmp_path} has 0.0 GB free, and one checkpoint of this model takes"
    )
