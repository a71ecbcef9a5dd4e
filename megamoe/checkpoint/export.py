"""`megamoe export`: one HF directory from a DeepSpeed checkpoint, experts gathered from every EP shard.

DeepSpeed's ``zero_to_fp32`` rebuilds ZeRO-partitioned weights but skips expert files; here the per-expert
files (``layer_<l>_expert_<g>_...``, one per global expert, whichever rank wrote it) are stacked back into
MegaMoE's ``[E, ...]`` expert tensors. HF backbones sharded by AutoEP go through DeepSpeed's universal
checkpoint conversion instead. No process group is needed: it reads files.
"""

import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from accelerate import init_empty_weights
from transformers import AutoTokenizer

from ..engine.autoep import hf_state_dict
from ..engine.expert_parallel import unshard_expert_state_dict
from ..model import MegaMoEConfig, MegaMoEForMultiTask
from .resume import CheckpointError, read_run_info, resolve_checkpoint

# The training module is MultiTaskObjective: the network lives under `model.`, the loss weighting beside it.
_MODEL_PREFIX = "model."


def consolidated_state_dict(tag_dir: Path, config: MegaMoEConfig) -> dict[str, torch.Tensor]:
    """The full, unsharded state dict of the training module saved in ``tag_dir``."""
    topology = read_run_info(tag_dir)["topology"]
    if config.backbone is not None and topology["expert_parallel_size"] > 1:
        return _autoep_state_dict(tag_dir, config.backbone["model_type"])
    if topology["zero_stage"] == 3:
        # ZeRO-3 module states are placeholders; the weights live in the partitioned optimizer shards.
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        module = get_fp32_state_dict_from_zero_checkpoint(str(tag_dir.parent), tag=tag_dir.name)
    else:
        states = torch.load(
            tag_dir / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False, mmap=True
        )
        module = dict(states["module"])
    # Memory-mapped: the files' pages, not a second copy; only the stacked experts are new memory.
    for expert_file in sorted(tag_dir.glob("layer_*_expert_*_model_states.pt")):
        module.update(torch.load(expert_file, map_location="cpu", weights_only=True, mmap=True))
    return unshard_expert_state_dict(module)


def _autoep_state_dict(tag_dir: Path, model_type: str) -> dict[str, torch.Tensor]:
    """An AutoEP checkpoint through DeepSpeed's own expert-aware consolidation (``ds_to_universal``, which
    ``zero_to_fp32`` defers to for AutoEP), with AutoEP's names mapped back to the HF backbone's."""
    with tempfile.TemporaryDirectory(prefix="megamoe-universal-") as universal:
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
    states_file = tag_dir / "mp_rank_00_model_states.pt"  # ZeRO-1/2; ZeRO-3 writes one per rank
    if not states_file.is_file():
        states_file = tag_dir / "zero_pp_rank_0_mp_rank_00_model_states.pt"
    model_states = torch.load(states_file, map_location="cpu", weights_only=False)
    shapes = {name: shape for group in model_states["param_shapes"] for name, shape in group.items()}
    for name, value in state.items():
        if value.dim() == 1 and name in shapes and len(shapes[name]) > 1:
            state[name] = value.view(shapes[name])
    for name in model_states["buffer_names"]:
        state[name] = model_states["module"][name]
    return hf_state_dict(state, model_type)


def load_checkpoint_model(path: str | Path) -> MegaMoEForMultiTask:
    """The MegaMoE model in a checkpoint (a run directory, its checkpoints/, or a step directory)."""
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
    state = {
        key.removeprefix(_MODEL_PREFIX): value
        for key, value in consolidated_state_dict(tag_dir, config).items()
        if key.startswith(_MODEL_PREFIX)
    }
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    if missing or unexpected:
        raise CheckpointError(
            f"{tag_dir} does not match its config: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    return model


def export_checkpoint(path: str | Path, out_dir: str | Path, *, max_shard_size: str | int = "5GB") -> Path:
    """Write the checkpoint at ``path`` as an HF model directory (safetensors, config, tokenizer, remote code).

    Weights above ``max_shard_size`` are split into safetensors shards with HF's index file, as the Hub's
    published large models are (5 GB each by default).
    """
    tag_dir = resolve_checkpoint(path)
    model = load_checkpoint_model(tag_dir)
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir, max_shard_size=max_shard_size)
    AutoTokenizer.from_pretrained(tag_dir / "hf").save_pretrained(out_dir)
    return out_dir
