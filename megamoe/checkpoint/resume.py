"""Checkpoints that resume a run exactly: DeepSpeed's state plus everything DeepSpeed does not save.

DeepSpeed's ``save_checkpoint`` keeps the weights (experts one file per global expert), the optimizer and
ZeRO shards, the LR schedule and the loss scaler. It saves no RNG state and restores a sampler only under
curriculum learning, and its ``load_checkpoint`` silently starts fresh when ``latest`` is missing. So each
checkpoint also gets, per rank, ``megamoe_rank<r>.pt`` (RNG states, the batch iterator's position, the
rank-local part of the loss weighting), and a missing checkpoint is an error here.

Layout: ``<run_dir>/checkpoints/<tag>/`` with ``tag = step_<n>``; ``latest`` names the newest complete one.
DeepSpeed writes its ``latest`` when rank 0 is done, before the other ranks are (its barrier comes after) and
before the files above exist, so a job killed in a save would resume from a half-written checkpoint: DeepSpeed
is told not to, and ``latest`` is replaced atomically once every rank has written everything. ``megamoe.json``
records the step and the topology the shards depend on (checked before DeepSpeed touches anything); ``hf/``
holds the model config and tokenizer so a checkpoint alone can be exported to an HF directory (`megamoe export`).

A checkpoint whose files were cut short or damaged after it completed (a full disk, a copy interrupted, a bad
disk) is found before DeepSpeed reads it (`integrity`: torch's loader would not notice), naming the file;
resuming from a run directory then falls back to the newest older checkpoint that is whole, and says so.
"""

import json
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.distributed as dist

from ..engine.distributed import collective_device, local_rank, local_world_size
from ..run_dir import RunDir, write_text_atomic
from .integrity import damage

LATEST = "latest"
RUN_INFO = "megamoe.json"
# Format 2: under expert parallelism a rank's local experts are one stacked tensor per weight, so ZeRO's flat
# optimizer partitions order them by weight, not by expert as format 1's 1-expert modules did. Same sizes:
# DeepSpeed would load a format-1 optimizer state into the wrong experts without a word.
FORMAT = 2


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete, or was written by an incompatible run."""


class Stateful(Protocol):
    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> Any: ...


class DeepSpeedLike(Protocol):
    def save_checkpoint(
        self, save_dir: str, tag: str, client_state: dict[str, Any], save_latest: bool
    ) -> Any: ...

    def load_checkpoint(self, load_dir: str, tag: str) -> tuple[str | None, dict[str, Any] | None]: ...


@dataclass(frozen=True)
class Topology:
    """What a checkpoint's shards depend on; resuming on a different one is refused."""

    world_size: int
    expert_parallel_size: int
    zero_stage: int


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def resolve_checkpoint(path: str | Path) -> Path:
    """A tag directory, from itself, from a checkpoints directory (its ``latest``), or from a run directory."""
    path = Path(path)
    for directory in (path, RunDir(path).checkpoints):
        latest = directory / LATEST
        if latest.is_file():
            tag_dir = directory / latest.read_text().strip()
            if not tag_dir.is_dir():
                raise CheckpointError(f"{latest} names {tag_dir.name}, which does not exist")
            return tag_dir
    if (path / RUN_INFO).is_file():  # a step directory (ZeRO-3 ones have no mp_rank_00 file)
        return path
    raise CheckpointError(
        f"no checkpoint at {path}: expected a run directory, its checkpoints/ directory (with a "
        f"'{LATEST}' file) or a step_<n> directory; was the run saved (checkpoint.every_steps)?"
    )


def newest_whole_checkpoint(path: str | Path, *, verify_contents: bool = True) -> Path:
    """`resolve_checkpoint`'s checkpoint when every rank finds its files whole (`integrity.damage`). Else, for
    a run or checkpoints directory, the newest older complete checkpoint that is (said on rank 0); a damaged
    one named directly is an error naming the file.

    Every rank checks every file's end (a rank on another node may see other files); with
    ``verify_contents`` the node's ranks also split its files between them and read each once for its CRCs,
    so damage inside a file is found, not loaded as wrong weights. The ranks agree through one all-reduce
    per checkpoint checked, newest first."""
    latest = resolve_checkpoint(path)
    named_directly = Path(path).resolve() == latest.resolve()
    older = [] if named_directly else sorted(latest.parent.glob("step_*"), reverse=True)
    candidates = [latest, *(tag for tag in older if tag.name < latest.name and _is_complete(tag))]
    is_rank_0 = not dist.is_initialized() or dist.get_rank() == 0
    first_damage = None
    for candidate in candidates:
        found = _damage_seen_here(candidate, verify_contents)
        for line in found if not is_rank_0 else ():
            print(f"rank {dist.get_rank()}: {line}", flush=True)  # rank 0 names its own below
        whole = torch.tensor(0 if found else 1, dtype=torch.int32, device=collective_device())
        if dist.is_initialized():
            dist.all_reduce(whole, op=dist.ReduceOp.MIN)
        if whole.item():
            if candidate != latest and is_rank_0:
                print(f"{first_damage}. Resuming from the previous complete checkpoint, {candidate}")
            return candidate
        if first_damage is None:
            first_damage = (
                found[0] if found else f"{candidate} has a damaged file (named by another rank above)"
            )
    raise CheckpointError(
        f"{first_damage}"
        + ("" if named_directly else f"; no older checkpoint in {latest.parent} is whole")
        + ". Resume from another step_<n> directory, or start a new run"
    )


def _damage_seen_here(tag_dir: Path, verify_contents: bool) -> list[str]:
    """What this rank finds wrong with ``tag_dir``'s files: every file's end, and, with ``verify_contents``,
    the contents of this rank's share of them on its node."""
    files = sorted(tag_dir.glob("*.pt"))
    size, mine = local_world_size(), local_rank() % local_world_size()
    found = []
    for index, file in enumerate(files):
        problem = damage(file, contents=verify_contents and index % size == mine)
        if problem is not None:
            found.append(f"{file} is {problem}")
    return found


def _is_complete(tag_dir: Path) -> bool:
    """Whether every rank finished writing ``tag_dir`` (what `Checkpointer.save` writes last, per rank)."""
    try:
        world_size = read_run_info(tag_dir)["topology"]["world_size"]
    except (CheckpointError, json.JSONDecodeError, KeyError):
        return False
    return all((tag_dir / f"megamoe_rank{rank:05d}.pt").is_file() for rank in range(world_size))


def read_run_info(tag_dir: Path) -> dict[str, Any]:
    """The step and topology a megamoe checkpoint was saved with."""
    try:
        return json.loads((tag_dir / RUN_INFO).read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{tag_dir} has no {RUN_INFO}: it was not written by megamoe") from None


def _rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


class Checkpointer:
    """Saves every ``every_steps`` (and when asked), keeps the newest ``keep_last``, resumes exactly.

    Args:
        engine: the DeepSpeed engine (``save_checkpoint`` / ``load_checkpoint``).
        directory: ``<run_dir>/checkpoints``.
        topology: this run's world size, EP size and ZeRO stage (stored, and checked on resume).
        rank_local: objects whose state differs per rank and DeepSpeed does not save (batch iterator,
            loss weighting), by name.
        write_hf_files: called on rank 0 with ``<tag>/hf`` to write the model config and tokenizer.
    """

    def __init__(
        self,
        engine: DeepSpeedLike,
        directory: str | Path,
        *,
        topology: Topology,
        rank_local: dict[str, Stateful],
        write_hf_files: Any = None,
        keep_last: int = 2,
    ):
        self.engine = engine
        self.directory = Path(directory)
        self.topology = topology
        self.rank_local = rank_local
        self.write_hf_files = write_hf_files
        self.keep_last = keep_last
        self.newest_step: int | None = None
        """The step of the newest complete checkpoint this run saved or resumed from."""

    def save(self, step: int) -> Path:
        tag = tag_for(step)
        rank = dist.get_rank()
        self.engine.save_checkpoint(str(self.directory), tag=tag, client_state={}, save_latest=False)
        tag_dir = self.directory / tag
        local = {"rng": _rng_state(), **{name: obj.state_dict() for name, obj in self.rank_local.items()}}
        torch.save(local, tag_dir / f"megamoe_rank{rank:05d}.pt")
        if rank == 0:
            info = {"step": step, "format": FORMAT, "topology": vars(self.topology)}
            (tag_dir / RUN_INFO).write_text(json.dumps(info, indent=2))
            if self.write_hf_files is not None:
                self.write_hf_files(tag_dir / "hf")
        dist.barrier()  # every rank's files are written: the checkpoint is complete
        if rank == 0:
            write_text_atomic(self.directory / LATEST, tag)
            self._prune(tag)
        self.newest_step = step
        return tag_dir

    def load(self, path: str | Path) -> int:
        """Restore from ``path`` (see `resolve_checkpoint`; `newest_whole_checkpoint` picks one whose files
        are whole); returns the step it was saved at."""
        tag_dir = resolve_checkpoint(path)
        info = read_run_info(tag_dir)
        saved = Topology(**info["topology"])
        if saved != self.topology:
            raise CheckpointError(
                f"{tag_dir} was written with {saved}, this run has {self.topology}: resume with the same "
                "number of ranks, expert_parallel_size and zero_stage (export it and start a new run with "
                "model.init: pretrained to change them)"
            )
        if saved.expert_parallel_size > 1 and info.get("format", 1) < FORMAT:
            raise CheckpointError(
                f"{tag_dir} holds expert-parallel optimizer state in the layout of an older megamoe, which "
                "this one cannot resume: export it (megamoe export) and start a new run from the export "
                "with model.init: pretrained"
            )
        rank_file = tag_dir / f"megamoe_rank{dist.get_rank():05d}.pt"
        if not rank_file.is_file():
            raise CheckpointError(f"{tag_dir} has no {rank_file.name}: the checkpoint is incomplete")
        loaded_path, _ = self.engine.load_checkpoint(str(tag_dir.parent), tag=tag_dir.name)
        if loaded_path is None:
            raise CheckpointError(f"DeepSpeed could not load {tag_dir}")
        local = torch.load(rank_file, weights_only=False)
        for name, obj in self.rank_local.items():
            obj.load_state_dict(local[name])
        _set_rng_state(local["rng"])
        self.newest_step = int(info["step"])
        return self.newest_step

    def _prune(self, newest: str) -> None:
        """Keep ``newest`` and the ``keep_last - 1`` before it. Later tags are left alone: a save a killed job
        did not finish (this run, resumed from before it, will overwrite it), or a branch the user resumed from."""
        older = sorted(p for p in self.directory.glob("step_*") if p.is_dir() and p.name < newest)
        for stale in older[: max(len(older) - (self.keep_last - 1), 0)]:
            shutil.rmtree(stale, ignore_errors=True)
