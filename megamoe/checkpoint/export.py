"""`megamoe export`: one HF directory from a DeepSpeed checkpoint, experts gathered from every EP shard.

DeepSpeed's ``zero_to_fp32`` rebuilds ZeRO-partitioned weights but skips expert files; here the per-expert
files (``layer_<l>_expert_<g>_...``, one per global expert, whichever rank wrote it) are stacked back into
MegaMoE's ``[E, ...]`` expert tensors. HF backbones sharded by AutoEP go through DeepSpeed's universal
checkpoint conversion instead. No process group is needed: it reads files.
"""

import math
import os
import pickle
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from accelerate import init_empty_weights
from transformers import AutoTokenizer

from ..engine.autoep import hf_state_dict
from ..engine.expert_parallel import unshard_expert_state_dict
from ..model import MegaMoEConfig, MegaMoEForMultiTask
from .integrity import damage
from .resume import CheckpointError, read_run_info, resolve_checkpoint

# The training module is MultiTaskObjective: the network lives under `model.`, the loss weighting beside it.
_MODEL_PREFIX = "model."


class FileBackedTensors:
    """New tensors whose memory is a file in ``directory``, mapped shared and unlinked at once.

    The consolidation makes new tensors (stacked experts, merged ZeRO-3 partitions, casts to the run's
    dtype). In heap memory they would add up to the whole model; as shared file mappings the kernel writes
    their pages out and drops them under memory pressure, as it does the checkpoint's own memory-mapped
    files, so a checkpoint larger than host memory exports. The files vanish with the last tensor that maps
    them. ``directory`` must be on a disk (the export's own filesystem), not a tmpfs, where pages are RAM.
    """

    def __init__(self, directory: Path):
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)

    def empty(self, shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
        numel = math.prod(shape)
        if numel == 0:
            return torch.empty(shape, dtype=dtype)
        descriptor, path = tempfile.mkstemp(dir=self.directory, suffix=".tensor")
        try:
            os.ftruncate(descriptor, numel * dtype.itemsize)
            tensor = torch.from_file(path, shared=True, size=numel, dtype=dtype)
        finally:
            os.close(descriptor)
            os.unlink(path)
        return tensor.view(shape)

    def copy(self, tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """``tensor`` in ``dtype``, in a file mapping."""
        out = self.empty(tensor.shape, dtype)
        out.copy_(tensor)
        return out


class _HeapTensors:
    """What `FileBackedTensors` does, in ordinary memory: for a model that is used, not exported."""

    directory = None  # temporary files (AutoEP's universal checkpoint) go to the system's temporary directory

    def empty(self, shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
        return torch.empty(shape, dtype=dtype)

    def copy(self, tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return tensor.to(dtype)


def consolidated_state_dict(
    tag_dir: Path, config: MegaMoEConfig, memory: FileBackedTensors | _HeapTensors
) -> dict[str, torch.Tensor]:
    """The full, unsharded state dict of the training module saved in ``tag_dir``, in the dtype the run
    computed in (bf16 / fp16 runs: the module's weights, not DeepSpeed's fp32 master copy, which rounds to
    them). Tensors the checkpoint's files hold as they are stay memory-mapped; new ones come from
    ``memory``, one at a time."""
    topology = read_run_info(tag_dir)["topology"]
    # Read (and CRC-checked) once: it holds the dtype, ZeRO-1/2's module and AutoEP's shapes and buffers.
    model_states = _load(_model_states_file(tag_dir), weights_only=False)
    dtype = _module_dtype(model_states["ds_config"])
    if config.backbone is not None and topology["expert_parallel_size"] > 1:
        state = _autoep_state_dict(tag_dir, model_states, config.backbone["model_type"], memory)
        return {name: _in_dtype(value, dtype, memory) for name, value in state.items()}
    if topology["zero_stage"] == 3:
        # ZeRO-3 module states are placeholders; the weights live in the partitioned optimizer shards, merged
        # here one parameter at a time (DeepSpeed's lazy mode: memory-mapped shards, one merge in memory).
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        lazy = get_fp32_state_dict_from_zero_checkpoint(str(tag_dir.parent), tag=tag_dir.name, lazy_mode=True)
        module = {name: _in_dtype(value.contiguous(), dtype, memory) for name, value in lazy.items()}
    else:
        module = dict(model_states["module"])
    # Memory-mapped: the files' pages, not a second copy; only the stacked experts are new memory, `memory`'s.
    for expert_file in _expert_files(tag_dir, config, topology["expert_parallel_size"]):
        module.update(_load(expert_file, weights_only=True))
    return unshard_expert_state_dict(module, empty=memory.empty)


def _load(path: Path, *, weights_only: bool) -> Any:
    """``torch.load`` of a checkpoint file, memory-mapped, once its CRCs are checked (torch checks none: a
    damaged record would export as wrong weights); a damaged file is a `CheckpointError` naming it."""
    problem = damage(path, contents=True) if path.is_file() else None
    if problem is None:
        try:
            return torch.load(path, map_location="cpu", weights_only=weights_only, mmap=True)
        except FileNotFoundError:
            raise  # not damaged but absent: `megamoe export` says the checkpoint is incomplete
        except (OSError, RuntimeError, EOFError, pickle.UnpicklingError) as err:
            problem = f"unreadable ({str(err).splitlines()[0] if str(err) else type(err).__name__})"
    raise CheckpointError(
        f"{path} is {problem}: export an earlier step_<n> directory of {path.parent.parent}"
    )


def _expert_files(tag_dir: Path, config: MegaMoEConfig, expert_parallel_size: int) -> list[Path]:
    """The files DeepSpeed writes for experts sharded over EP ranks, one per MoE layer and global expert
    (``layer_<l>_expert_<g>_mp_rank_00_model_states.pt``, by whichever rank held it); unsharded experts are
    in the model states. Every one is checked for before any is read: without one, the stacked experts would
    come out short or mis-numbered."""
    if expert_parallel_size == 1:
        return []
    expected = [
        tag_dir / f"layer_{layer}_expert_{expert}_mp_rank_00_model_states.pt"
        for layer in range(len(config.moe_layers()))
        for expert in range(config.num_experts)
    ]
    missing = [path.name for path in expected if not path.is_file()]
    if missing:
        shown = ", ".join(missing[:4]) + (f" and {len(missing) - 4} more" if len(missing) > 4 else "")
        raise CheckpointError(
            f"{tag_dir} is incomplete: {len(missing)} of its {len(expected)} expert files are missing "
            f"({shown}); each of its {len(config.moe_layers())} MoE layers has experts "
            f"0..{config.num_experts - 1}, one file each, written by the rank that held it: copy the missing "
            "files from that rank's node, or export an earlier checkpoint"
        )
    return expected


def _model_states_file(tag_dir: Path) -> Path:
    states_file = tag_dir / "mp_rank_00_model_states.pt"  # ZeRO-1/2; ZeRO-3 writes one per rank
    return states_file if states_file.is_file() else tag_dir / "zero_pp_rank_0_mp_rank_00_model_states.pt"


def _module_dtype(ds_config: dict[str, Any]) -> torch.dtype:
    """The dtype the run's module computed in, from the DeepSpeed config saved with its model states."""
    if ds_config.get("bf16", {}).get("enabled"):
        return torch.bfloat16
    return torch.float16 if ds_config.get("fp16", {}).get("enabled") else torch.float32


def _in_dtype(
    tensor: torch.Tensor, dtype: torch.dtype, memory: FileBackedTensors | _HeapTensors
) -> torch.Tensor:
    """Floating-point ``tensor`` in ``dtype`` (new memory only where it differs); others as they are."""
    if not tensor.is_floating_point() or tensor.dtype == dtype:
        return tensor
    return memory.copy(tensor, dtype)


def _autoep_state_dict(
    tag_dir: Path,
    model_states: dict[str, Any],
    model_type: str,
    memory: FileBackedTensors | _HeapTensors,
) -> dict[str, torch.Tensor]:
    """An AutoEP checkpoint through DeepSpeed's own expert-aware consolidation (``ds_to_universal``, which
    ``zero_to_fp32`` defers to for AutoEP), with AutoEP's names mapped back to the HF backbone's. Its fp32
    files are written beside ``memory``'s (on the export's disk) and memory-mapped."""
    with tempfile.TemporaryDirectory(prefix="megamoe-universal-", dir=memory.directory) as universal:
        command = [
            sys.executable,
            "-m",
            "deepspeed.checkpoint.ds_to_universal",
            "--input_folder",
            str(tag_dir),
        ]
        command += ["--output_folder", universal, "--num_extract_workers", "1", "--num_merge_workers", "1"]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            raise CheckpointError(f"ds_to_universal could not consolidate {tag_dir}:\n{done.stderr[-2000:]}")
        state: dict[str, torch.Tensor] = {}
        for param_dir in sorted(p for p in (Path(universal) / "zero").iterdir() if p.is_dir()):
            fp32 = torch.load(param_dir / "fp32.pt", map_location="cpu", weights_only=False, mmap=True)
            state[param_dir.name] = fp32["param"] if isinstance(fp32, dict) else fp32
    # Non-expert parameters come back flat; the model states know their shapes, and hold the buffers.
    shapes = {name: shape for group in model_states["param_shapes"] for name, shape in group.items()}
    for name, value in state.items():
        if value.dim() == 1 and name in shapes and len(shapes[name]) > 1:
            state[name] = value.view(shapes[name])
    for name in model_states["buffer_names"]:
        state[name] = model_states["module"][name]
    return hf_state_dict(state, model_type)


def load_checkpoint_model(path: str | Path, *, scratch_dir: Path | None = None) -> MegaMoEForMultiTask:
    """The MegaMoE model in a checkpoint (a run directory, its checkpoints/, or a step directory).

    With ``scratch_dir`` (on a disk), every tensor is a file mapping, the checkpoint's or one made there by
    `FileBackedTensors`: what an export of a model larger than host memory needs; without, new tensors are
    ordinary memory.
    """
    tag_dir = resolve_checkpoint(path)
    hf_dir = tag_dir / "hf"
    if not (hf_dir / "config.json").is_file():
        raise CheckpointError(f"{tag_dir} has no hf/config.json: it was not written by megamoe train")
    config = MegaMoEConfig.from_pretrained(hf_dir)
    # Parameters on the meta device, then the consolidated tensors themselves: one copy of the model, not a
    # random one plus the checkpoint's. Buffers are built as usual: non-persistent ones (rotary frequencies)
    # are in no state dict.
    with init_empty_weights(include_buffers=False):
        model = MegaMoEForMultiTask(config)
    memory = FileBackedTensors(scratch_dir) if scratch_dir is not None else _HeapTensors()
    state = {
        key.removeprefix(_MODEL_PREFIX): value
        for key, value in consolidated_state_dict(tag_dir, config, memory).items()
        if key.startswith(_MODEL_PREFIX)
    }
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    if missing or unexpected:
        raise CheckpointError(
            f"{tag_dir} does not match its config: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    return model


def export_weights(path: str | Path, out_dir: str | Path, *, max_shard_size: str | int = "5GB") -> Path:
    """Write the model in the checkpoint at ``path`` as an HF model directory: safetensors, config and
    remote code.

    Weights above ``max_shard_size`` are split into safetensors shards with HF's index file, as the Hub's
    published large models are (5 GB each by default), in the dtype the run computed in. The consolidated
    weights are file mappings in a scratch directory inside ``out_dir`` (removed after): about one shard is
    in memory at a time, whatever the model's size.
    """
    tag_dir = resolve_checkpoint(path)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".consolidating-", dir=out_dir) as scratch:
        model = load_checkpoint_model(tag_dir, scratch_dir=Path(scratch))
        # The layout the model holds: reverting an HF MoE backbone's fused experts to the published
        # per-expert layout (transformers' default) makes all of them again in memory before any shard is
        # written, ~39 GB for Qwen3-30B-A3B (bench/save_memory.py). from_pretrained reads either layout.
        model.save_pretrained(out_dir, max_shard_size=max_shard_size, save_original_format=False)
        del model
    return out_dir


def export_checkpoint(path: str | Path, out_dir: str | Path, *, max_shard_size: str | int = "5GB") -> Path:
    """`export_weights`, and the run's tokenizer beside them: the directory `megamoe export` writes. An
    export that fails leaves no ``out_dir`` behind (one that existed before is left as it was)."""
    out_dir = Path(out_dir)
    created = not out_dir.exists()
    try:
        out = export_weights(path, out_dir, max_shard_size=max_shard_size)
        AutoTokenizer.from_pretrained(resolve_checkpoint(path) / "hf").save_pretrained(out)
    except BaseException:
        if created:  # not a directory that looks like a model but is not one
            shutil.rmtree(out_dir, ignore_errors=True)
        raise
    return out
