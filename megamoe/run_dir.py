"""The run directory's up-front checks: `megamoe train` fails on a run directory it cannot use before it joins
the process group, prepares data or builds a model, on every rank.

A run directory holds one run. Training into one that holds another run's results would mix two runs'
checkpoints (the pruning of old ones, `latest`), metrics and TensorBoard event files, so that is refused unless
the run continues there (``--resume``).
"""

import tempfile
from pathlib import Path

from .config import ConfigError

# What a run leaves in its directory; the generated configs (deepspeed_config.json, the run config) are
# rewritten at every start, so a run that failed before training may be started again in place.
_RUN_RESULTS = (
    "checkpoints",
    "metrics.json",
    "history.json",
    "expert_utilization.json",
    "model",
    "tensorboard",
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
    found = [name for name in _RUN_RESULTS if _holds_something(run_dir / name)]
    if not found:
        return
    if "checkpoints" in found:
        how = "continue that run with --resume"
    else:
        how = "it has no checkpoint to --resume from: remove it"
    raise ConfigError(
        f"run_dir: {run_dir} already holds a run ({', '.join(found)}): {how}, or train into a fresh run_dir "
        "(override run_dir=PATH); one directory never mixes two runs' checkpoints, metrics and event files"
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
