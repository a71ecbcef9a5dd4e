"""`megamoe export`: one HF directory from a DeepSpeed checkpoint, experts gathered from every EP shard.

DeepSpeed's ``zero_to_fp32`` rebuilds ZeRO-partitioned weights but skips expert files; here the per-expert
files (``layer_<l>_expert_<g>_...``, one per global expert, whichever rank wrote it) are stacked back into
MegaMoE's ``[E, ...]`` expert tensors. No process group is needed: it reads files.
"""

from pathlib import Path

import torch
from transformers import AutoTokenizer

from ..engine.expert_parallel import unshard_expert_state_dict
from ..model import MegaMoEConfig, MegaMoEForMultiTask
from .resume import CheckpointError, read_run_info, resolve_checkpoint

# The training module is MultiTaskObjective: the network lives under `model.`, the loss weighting beside it.
_MODEL_PREFIX = "model."


def consolidated_state_dict(tag_dir: Path) -> dict[str, torch.Tensor]:
    """The full, unsharded state dict of the training module saved in ``tag_dir``."""
    if read_run_info(tag_dir)["topology"]["zero_stage"] == 3:
        # ZeRO-3 module states are placeholders; the weights live in the partitioned optimizer shards.
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        module = get_fp32_state_dict_from_zero_checkpoint(str(tag_dir.parent), tag=tag_dir.name)
    else:
        states = torch.load(tag_dir / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
        module = dict(states["module"])
    for expert_file in sorted(tag_dir.glob("layer_*_expert_*_model_states.pt")):
        module.update(torch.load(expert_file, map_location="cpu", weights_only=True))
    return unshard_expert_state_dict(module)


def load_checkpoint_model(path: str | Path) -> MegaMoEForMultiTask:
    """The MegaMoE model in a checkpoint (a run directory, its checkpoints/, or a step directory)."""
    tag_dir = resolve_checkpoint(path)
    hf_dir = tag_dir / "hf"
    if not (hf_dir / "config.json").is_file():
        raise CheckpointError(f"{tag_dir} has no hf/config.json: it was not written by megamoe train")
    model = MegaMoEForMultiTask(MegaMoEConfig.from_pretrained(hf_dir))
    state = {
        key.removeprefix(_MODEL_PREFIX): value
        for key, value in consolidated_state_dict(tag_dir).items()
        if key.startswith(_MODEL_PREFIX)
    }
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CheckpointError(
            f"{tag_dir} does not match its config: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    return model


def export_checkpoint(path: str | Path, out_dir: str | Path) -> Path:
    """Write the checkpoint at ``path`` as an HF model directory (safetensors, config, tokenizer, remote code)."""
    tag_dir = resolve_checkpoint(path)
    model = load_checkpoint_model(tag_dir)
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir)
    AutoTokenizer.from_pretrained(tag_dir / "hf").save_pretrained(out_dir)
    return out_dir
