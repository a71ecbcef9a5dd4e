"""The one place that knows DeepSpeed: config generation, initialize, backward/step.

The trainer calls `Engine.train_step` / `Engine.eval_forward` and never sees DeepSpeed. The DeepSpeed
JSON is generated from the run config and written into the run directory, never maintained by hand.
"""

import json
import os
import socket
from pathlib import Path
from typing import Any

import deepspeed
import torch
from torch import nn

from ..config import TrainSection

# Parameters that get no weight decay: biases and norm weights (BERT/RoBERTa fine-tuning practice).
_NO_DECAY_SUFFIXES = ("bias", "norm.weight", "LayerNorm.weight")


def deepspeed_config(train: TrainSection, *, zero_stage: int = 2) -> dict[str, Any]:
    """The DeepSpeed JSON for a run: batch sizes, AdamW, warmup + linear decay, clipping, precision, ZeRO."""
    warmup_steps = int(train.warmup_ratio * train.max_steps)
    on_cpu = not torch.cuda.is_available()
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": train.micro_batch_size,
        "gradient_accumulation_steps": train.gradient_accumulation_steps,
        "optimizer": {
            "type": "AdamW",
            # DeepSpeed's fused Adam is a CUDA kernel; torch's AdamW runs everywhere.
            "params": {"lr": train.lr, "weight_decay": train.weight_decay, "torch_adam": on_cpu},
        },
        "scheduler": {
            "type": "WarmupDecayLR",
            "params": {
                "total_num_steps": train.max_steps,
                "warmup_num_steps": max(warmup_steps, 1),
                "warmup_max_lr": train.lr,
                "warmup_min_lr": 0.0,
                "warmup_type": "linear",
            },
        },
        "gradient_clipping": train.max_grad_norm,
        "zero_optimization": {"stage": zero_stage},
        "bf16": {"enabled": train.precision == "bf16"},
        "fp16": {"enabled": train.precision == "fp16"},
        "steps_per_print": 10**9,  # the trainer logs; DeepSpeed's own step prints would interleave with it
        "wall_clock_breakdown": False,
    }
    return config


def parameter_groups(module: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for name, param in module.named_parameters():
        if param.requires_grad:
            (no_decay if name.endswith(_NO_DECAY_SUFFIXES) else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def init_distributed() -> None:
    """Join the process group the launcher set up; a plain `python` run becomes a 1-rank group."""
    if "RANK" not in os.environ:
        # Not under deepspeed / torchrun / accelerate: a single process with a private port.
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        os.environ.update(
            MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", LOCAL_RANK="0", WORLD_SIZE="1"
        )
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, verbose=False)


class Engine:
    """A DeepSpeed engine over ``module`` (whose forward returns an object with ``.loss``)."""

    def __init__(self, module: nn.Module, config: dict[str, Any], run_dir: str | Path | None = None):
        init_distributed()
        if run_dir is not None:
            Path(run_dir).mkdir(parents=True, exist_ok=True)
            (Path(run_dir) / "deepspeed_config.json").write_text(json.dumps(config, indent=2))
        weight_decay = config["optimizer"]["params"]["weight_decay"]
        self.engine, _, _, self.scheduler = deepspeed.initialize(
            model=module, model_parameters=parameter_groups(module, weight_decay), config=config
        )

    @property
    def device(self) -> torch.device:
        return self.engine.device

    @property
    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def train_step(self, batch: dict[str, Any]) -> Any:
        """Forward + backward of one micro-batch; the optimizer steps at accumulation boundaries."""
        self.engine.train()
        output = self.engine(**self._to_device(batch))
        self.engine.backward(output.loss)
        self.engine.step()
        return output

    @torch.no_grad()
    def eval_forward(self, batch: dict[str, Any]) -> Any:
        self.engine.eval()
        return self.engine(**self._to_device(batch))

    def _to_device(self, batch: dict[str, Any]) -> dict[str, Any]:
        return {k: v.to(self.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
