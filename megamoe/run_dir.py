"""The run directory: every path a run writes under it (`RunDir`), how its files are written (atomically),
and the up-front checks: `megamoe train` fails on a run directory it cannot use before it joins the process
group, prepares data or builds a model, on every rank.

A run directory holds one run. Training into one that holds another run's results would mix two runs'
checkpoints (the pruning of old ones, `latest`), metrics and TensorBoard event files, so that is refused unless
the run continues there (``--resume``). A filesystem without room for one checkpoint of the model is refused
once the model's architecture is known (`check_free_space`), before any data or model work.
"""

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .config import ConfigError
from .model import MegaMoEConfig, MegaMoEForMultiTask

_GB = 1e9
# Bytes a checkpoint holds per parameter: the module's weights in the run's dtype, plus the optimizer's fp32
# master weights and Adam's two fp32 moments (DeepSpeed saves all three, partitioned or not).
_OPTIMIZER_BYTES = 12


@dataclass(frozen=True)
class RunDir:
    """Every path a run writes under ``root``, named here only."""

    root: Path

    @property
    def checkpoints(self) -> Path:
        """DeepSpeed checkpoints, ``step_<n>/`` and ``latest`` (`megamoe.checkpoint.resume`)."""
        return self.root / "checkpoints"

    @property
    def model(self) -> Path:
        """The exported HF model with its card."""
        return self.root / "model"

    @property
    def metrics(self) -> Path:
        """``{task: {split: {metric: value}}}`` of the final evaluation."""
        return self.root / "metrics.json"

    @property
    def expert_utilization(self) -> Path:
        return self.root / "expert_utilization.json"

    @property
    def history(self) -> Path:
        """One `StepRecord` per micro-batch."""
        return self.root / "history.json"

    @property
    def tensorboard(self) -> Path:
        return self.root / "tensorboard"

    @property
    def deepspeed_config(self) -> Path:
        """The DeepSpeed JSON generated from the run config (rewritten at every start)."""
        return self.root / "deepspeed_config.json"

    @property
    def run_config(self) -> Path:
        """The run config as it ran, overrides applied (rewritten at every start; the model card reads it)."""
        return self.root / "config.yaml"

    def results(self) -> tuple[Path, ...]:
        """What a run leaves: the generated configs are not among them, so a run that failed before training
        may be started again in place."""
        return (
            self.checkpoints,
            self.metrics,
            self.history,
            self.expert_utilization,
            self.model,
            self.tensorboard,
        )


def check_run_dir(run_dir: Path, *, resuming: bool) -> None:
    """Refuse a ``run_dir`` that cannot be written, or that holds another run's results while not ``resuming``.

    Writes nothing that stays: whether the directory (or the parent it will be created in) is writable is
    tried with a temporary directory there.

    Raises:
        ConfigError: naming ``run_dir`` and what to do.
    """
    _check_writable(run_dir)
    if resuming:
        return
    paths = RunDir(run_dir)
    found = [path.name for path in paths.results() if _holds_something(path)]
    if not found:
        return
    if paths.checkpoints.name in found:
        how = "continue that run with --resume"
    else:
        how = "it has no checkpoint to --resume from: remove it"
    raise ConfigError(
        f"run_dir: {run_dir} already holds a run ({', '.join(found)}): {how}, or train into a fresh run_dir "
        "(override run_dir=PATH); one directory never mixes two runs' checkpoints, metrics and event files"
    )


def check_free_space(
    run_dir: Path, model: MegaMoEConfig, dtype: torch.dtype, keep_last: int, *, warn: bool = True
) -> None:
    """Refuse a ``run_dir`` whose filesystem cannot hold one checkpoint of ``model`` (the run would train
    until its first save, then fail); say so on stdout when it cannot hold the ``keep_last`` checkpoints plus
    the one being written and the exported model, which the run needs at its peak (when ``warn``: rank 0).

    Raises:
        ConfigError: naming the free and the needed space and what to do.
    """
    with torch.device("meta"):  # the architecture only: no memory, no init
        parameters = sum(p.numel() for p in MegaMoEForMultiTask(model).parameters())
    weights = parameters * dtype.itemsize
    checkpoint = weights + parameters * _OPTIMIZER_BYTES
    existing = next(path for path in (run_dir, *run_dir.parents) if path.exists())
    free = shutil.disk_usage(existing).free
    what = (
        f"one checkpoint of this model takes ~{checkpoint / _GB:.1f} GB ({parameters / 1e6:.0f} M parameters x "
        f"{checkpoint // parameters} bytes: the weights, the fp32 master weights and Adam's two moments)"
    )
    if free < checkpoint:
        raise ConfigError(
            f"run_dir: {existing} has {free / _GB:.1f} GB free, and {what}: free some space, or give a run_dir "
            "on a larger filesystem (override run_dir=PATH)"
        )
    peak = (keep_last + 1) * checkpoint + weights
    if warn and free < peak:
        print(
            f"warning: run_dir: {existing} has {free / _GB:.1f} GB free; {what}, and the run needs ~{peak / _GB:.1f} "
            f"GB at its peak (checkpoint.keep_last={keep_last}, one being written, the exported model): it may "
            "fail at a save (the previous checkpoint stays usable); lower checkpoint.keep_last or free space",
            flush=True,
        )


def _check_writable(run_dir: Path) -> None:
    existing = next(path for path in (run_dir, *run_dir.parents) if path.exists())
    if not existing.is_dir():
        raise ConfigError(f"run_dir: {existing} is a file, so {run_dir} cannot be created; give a directory")
    try:
        with tempfile.TemporaryDirectory(prefix=".megamoe-write-check-", dir=existing):
            pass
    except OSError as err:
        what = "write into" if existing == run_dir else f"create {run_dir} in"
        raise ConfigError(
            f"run_dir: cannot {what} {existing} ({err.strerror}): give a run_dir on a writable filesystem "
            "(override run_dir=PATH)"
        ) from None


def _holds_something(path: Path) -> bool:
    return path.is_file() or (path.is_dir() and any(path.iterdir()))


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write through a synced temporary file and a rename: a reader sees the old content or the new, never half."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, suffix=".tmp", delete=False) as tmp:
        tmp.write(text)
        tmp.flush()
        # A temporary file is created 0600; the result gets the mode any file the user writes gets.
        os.fchmod(tmp.fileno(), 0o666 & ~_current_umask())
        os.fsync(tmp.fileno())
    os.replace(tmp.name, path)


def _current_umask() -> int:
    umask = os.umask(0)  # the only way to read it is to set it
    os.umask(umask)
    return umask


def write_json_atomic(path: str | Path, payload: Any) -> None:
    """`write_text_atomic` of ``payload`` as indented JSON."""
    write_text_atomic(path, json.dumps(payload, indent=2, sort_keys=True))
