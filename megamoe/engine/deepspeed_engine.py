"""The one place that knows DeepSpeed: config generation, initialize, backward/step.

The trainer calls `Engine.train_step` / `Engine.eval_forward` and never sees DeepSpeed. The DeepSpeed
JSON is generated from the run config and written into the run directory, never maintained by hand.
"""

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.accelerator import get_accelerator
from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer
from deepspeed.runtime.zero.utils import is_zero_param
from deepspeed.utils import safe_set_local_grad
from torch import nn

from ..config import ParallelSection, TrainSection
from ..model import MegaMoEConfig
from .autoep import autoep_section, check_replaced_and_record_router_logits, hf_backbone
from .distributed import collective_device, init_distributed
from .expert_parallel import shard_experts

# Parameters that get no weight decay: biases and norm weights (BERT/RoBERTa fine-tuning practice).
_NO_DECAY_SUFFIXES = ("bias", "norm.weight", "LayerNorm.weight")


class TopologyError(ValueError):
    """The run config does not fit the ranks it was launched on (raised before any collective)."""


def launch_world_size() -> int:
    """Ranks the launcher started (deepspeed / torchrun / accelerate all export WORLD_SIZE); 1 without one."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def user_deepspeed_config_path(parallel: ParallelSection) -> str | None:
    """The user's DeepSpeed JSON: ``parallel.deepspeed_config``, else the one `accelerate launch
    --deepspeed_config_file` passed to its processes."""
    return parallel.deepspeed_config or os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE")


def check_topology(
    train: TrainSection, parallel: ParallelSection, *, world_size: int, model: MegaMoEConfig
) -> None:
    """Refuse, with what to change, every combination DeepSpeed would refuse later or silently get wrong."""
    ep = parallel.expert_parallel_size
    num_experts = model.num_experts if model.moe_layer_freq > 0 else None
    if parallel.zero_stage == 3 and ep > 1 and model.backbone is None:
        raise TopologyError(
            "ZeRO-3 with expert_parallel_size > 1 is not available for MegaMoE's own experts: DeepSpeed "
            "partitions expert parameters under ZeRO-3 only for AutoEP layers (HF MoE backbones, "
            "model.init: hf_moe), whose router would replace MegaMoE's (padding-masked losses, task-aware "
            "routing, BERT-style experts). Use zero_stage 1 or 2 with expert parallelism, or "
            "expert_parallel_size: 1 with ZeRO-3"
        )
    if ep > 1 and num_experts is None:
        raise TopologyError(f"parallel.expert_parallel_size={ep} but the model has no MoE layers")
    if num_experts is not None and num_experts % ep:
        raise TopologyError(
            f"parallel.expert_parallel_size={ep} does not divide num_experts={num_experts}: "
            "each EP rank must hold the same number of experts"
        )
    if world_size % ep:
        raise TopologyError(
            f"parallel.expert_parallel_size={ep} does not divide the {world_size} launched ranks: "
            f"launch a multiple of {ep} ranks or change expert_parallel_size"
        )
    expected = train.micro_batch_size * train.gradient_accumulation_steps * world_size
    if train.global_batch_size is not None and train.global_batch_size != expected:
        raise TopologyError(
            f"train.global_batch_size={train.global_batch_size} but micro_batch_size "
            f"{train.micro_batch_size} x gradient_accumulation_steps {train.gradient_accumulation_steps} x "
            f"{world_size} ranks = {expected}: change one of them"
        )
    accelerate_stage = os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE")
    if accelerate_stage is not None and int(accelerate_stage) != parallel.zero_stage:
        raise TopologyError(
            f"accelerate launch asked for ZeRO stage {accelerate_stage} but parallel.zero_stage="
            f"{parallel.zero_stage}: the run config decides; make them agree"
        )
    accelerator = get_accelerator()
    if train.precision == "bf16" and not accelerator.is_bf16_supported():
        raise TopologyError(
            f"train.precision=bf16 but this {accelerator.device_name()} has no bf16 support: use fp16 or fp32"
        )
    if train.precision == "fp16" and not accelerator.is_fp16_supported():
        raise TopologyError(
            f"train.precision=fp16 but this {accelerator.device_name()} has no fp16 support: use bf16 or fp32"
        )


def deepspeed_config(train: TrainSection, parallel: ParallelSection | None = None) -> dict[str, Any]:
    """The DeepSpeed JSON for a run: batch sizes, AdamW, warmup + linear decay, clipping, precision, ZeRO."""
    parallel = parallel or ParallelSection()
    warmup_steps = int(train.warmup_ratio * train.max_steps)
    on_cpu = not torch.cuda.is_available()
    adamw: dict[str, Any] = {"lr": train.lr, "weight_decay": train.weight_decay}
    if on_cpu:
        # DeepSpeed's fused Adam is a CUDA kernel: torch's AdamW, fused (one pass over each flat ZeRO partition;
        # its default loops op by op, 4-7x slower on 2 cores, ~17 % of a quickstart step).
        adamw.update(torch_adam=True, fused=True)
    zero: dict[str, Any] = {"stage": parallel.zero_stage}
    if parallel.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": not on_cpu}
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": train.micro_batch_size,
        "gradient_accumulation_steps": train.gradient_accumulation_steps,
        "optimizer": {"type": "AdamW", "params": adamw},
        "scheduler": {
            "type": "WarmupDecayLR",
            "params": {
                "total_num_steps": train.max_steps,
                "warmup_num_steps": max(warmup_steps, 1),
                # None: each parameter group warms up to its own lr (the optimizer's, the heads' head_lr).
                "warmup_max_lr": train.lr if train.head_lr is None else None,
                "warmup_min_lr": 0.0,
                "warmup_type": "linear",
            },
        },
        "gradient_clipping": train.max_grad_norm,
        "zero_optimization": zero,
        "bf16": {"enabled": train.precision == "bf16"},
        "fp16": {"enabled": train.precision == "fp16"},
        "steps_per_print": 10**9,  # the trainer logs; DeepSpeed's own step prints would interleave with it
        "wall_clock_breakdown": False,
    }
    return config


# (dotted key in the DeepSpeed JSON) that the run config owns: a user JSON must agree on them.
_RUN_CONFIG_OWNED = (
    "train_micro_batch_size_per_gpu",
    "gradient_accumulation_steps",
    "zero_optimization.stage",
    "bf16.enabled",
    "fp16.enabled",
    "gradient_clipping",
)


def _lookup(config: dict[str, Any], dotted: str) -> Any:
    node: Any = config
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def _merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in override.items():
        both_dicts = isinstance(value, dict) and isinstance(base.get(key), dict)
        merged[key] = _merge(base[key], value) if both_dicts else value
    return merged


def merge_user_deepspeed_config(
    path: str | Path, generated: dict[str, Any], *, world_size: int
) -> dict[str, Any]:
    """The user's DeepSpeed JSON over the generated one, after checking it against the run config."""
    try:
        user = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise TopologyError(f"parallel.deepspeed_config: no such file {path}") from None
    except IsADirectoryError:
        raise TopologyError(f"parallel.deepspeed_config: {path} is a directory; give the JSON file") from None
    except json.JSONDecodeError as err:
        raise TopologyError(f"parallel.deepspeed_config: {path} is not valid JSON: {err}") from None
    if not isinstance(user, dict):
        raise TopologyError(
            f"parallel.deepspeed_config: {path} holds a JSON {type(user).__name__}, not an object"
        )
    conflicts = [
        f"{key} is {_lookup(user, key)!r} there but {_lookup(generated, key)!r} in the run config"
        for key in _RUN_CONFIG_OWNED
        if _lookup(user, key) is not None and _lookup(user, key) != _lookup(generated, key)
    ]
    global_batch = (
        generated["train_micro_batch_size_per_gpu"] * generated["gradient_accumulation_steps"] * world_size
    )
    if user.get("train_batch_size") not in (None, global_batch):
        conflicts.append(f"train_batch_size is {user['train_batch_size']} there but {global_batch} here")
    if conflicts:
        raise TopologyError(
            f"parallel.deepspeed_config {path} disagrees with the run config: "
            + "; ".join(conflicts)
            + ". Set these in the run config (train / parallel sections) and drop them from the JSON"
        )
    merged = _merge(generated, user)
    user_optimizer = _lookup(user, "optimizer.type")
    if user_optimizer is not None and user_optimizer.lower() not in ("adam", "adamw"):
        # Another optimizer takes the run config's lr and weight decay, not the flags of torch's AdamW.
        params = {key: merged["optimizer"]["params"][key] for key in ("lr", "weight_decay")}
        merged["optimizer"] = {
            **user["optimizer"],
            "params": {**params, **user["optimizer"].get("params", {})},
        }
    if _lookup(user, "scheduler.type") not in (None, _lookup(generated, "scheduler.type")):
        merged["scheduler"] = user["scheduler"]  # the generated params belong to another schedule
    if _lookup(generated, "scheduler.params.warmup_max_lr") is None and not _keeps_group_lrs(merged):
        raise TopologyError(
            f"train.head_lr is set, but the scheduler of parallel.deepspeed_config {path} gives every parameter "
            "group the same peak: use WarmupLR / WarmupDecayLR without warmup_max_lr (each group then warms up "
            "to its own lr) or WarmupCosineLR, or drop train.head_lr"
        )
    return merged


def _keeps_group_lrs(config: dict[str, Any]) -> bool:
    """Whether the scheduler keeps each parameter group's own peak lr: WarmupCosineLR scales it, WarmupLR /
    WarmupDecayLR warm up to it when their warmup_max_lr is None, and without a scheduler it stays."""
    kind = _lookup(config, "scheduler.type")
    if kind in ("WarmupLR", "WarmupDecayLR"):
        return _lookup(config, "scheduler.params.warmup_max_lr") is None
    return kind in (None, "WarmupCosineLR")


@contextmanager
def partitioned_construction(config: dict[str, Any]) -> Iterator[None]:
    """Under ZeRO-3, models built inside are born partitioned: while an `HfDeepSpeedConfig` is alive,
    transformers' ``from_pretrained`` / ``from_config`` build under ``deepspeed.zero.Init`` and read each
    checkpoint shard into the partitions, so no rank ever holds the whole model. Other stages build the model
    whole, once per rank: nothing to do.

    Scoped to the build: an alive config would also partition models built later in the process (export).
    """
    if _lookup(config, "zero_optimization.stage") != 3:
        yield
        return
    from transformers.integrations import HfDeepSpeedConfig

    alive = HfDeepSpeedConfig(config)  # transformers keeps a weak reference only
    try:
        yield
    finally:
        del alive


# What a run starts from scratch beside a pretrained body, trained at `train.head_lr`: the task heads, and the
# loss weighting's own parameters (uncertainty's log-variances: at the body's 1e-4 they moved its weights from
# 0.500 to 0.505 in the quickstart's 360 steps, i.e. not at all).
FRESH_MODULES = frozenset({"heads", "weighting"})


def parameter_groups(
    module: nn.Module, weight_decay: float, head_lr: float | None = None
) -> list[dict[str, Any]]:
    """AdamW groups: no decay on biases and norms; with ``head_lr``, the parameters a run starts from scratch
    (under a module named in `FRESH_MODULES`) in groups of their own at that ``lr``; expert parameters split into
    DeepSpeed's MoE groups, which keep the settings of the group they came from."""
    groups: dict[str, dict[str, Any]] = {}
    for name, param in module.named_parameters():
        if not param.requires_grad:
            continue
        decays = not name.endswith(_NO_DECAY_SUFFIXES)
        fresh = head_lr is not None and not FRESH_MODULES.isdisjoint(name.split("."))
        key = ("fresh_" if fresh else "") + ("decay" if decays else "no_decay")
        if key not in groups:
            groups[key] = {"name": key, "params": [], "weight_decay": weight_decay if decays else 0.0}
            if fresh:
                groups[key]["lr"] = head_lr
        groups[key]["params"].append(param)
    order = ("decay", "no_decay", "fresh_decay", "fresh_no_decay")
    return split_params_into_different_moe_groups_for_optimizer([groups[k] for k in order if k in groups])


def _cast_parameters_built_outside_zero_init(module: nn.Module, config: dict[str, Any]) -> None:
    """Bring the parameters a ZeRO-3 model got after its partitioned build (task heads, loss weighting) to the
    run's precision.

    DeepSpeed casts a module to bf16 / fp16 only when none of its parameters was built under `zero.Init`;
    once the backbone is (a ZeRO-3 `from_pretrained`), it casts nothing, and its optimizer refuses partitions
    of mixed dtypes. This is the cast it would have done.
    """
    dtype = (
        torch.bfloat16
        if config.get("bf16", {}).get("enabled")
        else torch.float16
        if config.get("fp16", {}).get("enabled")
        else None
    )
    parameters = list(module.parameters())
    if dtype is None or not any(is_zero_param(p) for p in parameters):
        return
    for param in parameters:
        if not is_zero_param(param) and param.is_floating_point():
            param.data = param.data.to(dtype)


def _skip_unless_finite(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
    """An optimizer step pre-hook (torch's public hook) for fp32 without ZeRO, where DeepSpeed steps torch's
    AdamW on whatever gradients it holds, so one NaN would spread to every weight. When any gradient on any
    rank is not finite (expert gradients live on their expert-parallel ranks only, hence the all-reduce), it
    drops every gradient, and torch's AdamW leaves parameters without one, and their moments, untouched. It
    sets ``optimizer.overflow``, which DeepSpeed's engine reads from its own optimizers after a step: the skip
    is then counted, and the LR schedule held, as DeepSpeed does for its own. One all-reduce and one host read
    per optimizer step, in this configuration only."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    gradients = [p.grad for p in params if p.grad is not None]
    finite = (
        torch.stack([g.isfinite().all() for g in gradients]).all()
        if gradients
        else torch.tensor(True, device=collective_device())  # NCCL takes no CPU tensor
    )
    bad = (~finite).float()
    if dist.is_initialized():
        dist.all_reduce(bad, op=dist.ReduceOp.MAX)
    overflow = bool(bad)
    setattr(optimizer, "overflow", overflow)  # noqa: B010 (DeepSpeed's optimizer protocol: not torch's attribute)
    if overflow:
        for param in params:
            param.grad = None


class IdleGradientZeroFill:
    """Under ZeRO-3, a parameter no gradient reached in an accumulation window (the head of a task no
    micro-batch of the window trained) steps with a zero gradient, as under ZeRO-1/2 and in one process.

    DeepSpeed's ZeRO-3 (0.19.8) keeps each parameter's reduced gradient partition in a buffer that only a
    gradient arriving in the window overwrites (`DeepSpeedZeroOptimizer_Stage3.partition_grads`), and at the
    step hands every parameter's buffer to the optimizer and the clipping norm
    (`independent_gradient_partition_epilogue`): an idle parameter steps with the gradient of the last window
    that used it, which no checkpoint holds, so a resumed run steps it with zeros instead. ZeRO-1/2 fill a
    missing gradient with zeros (`get_flat_partition`). This fills the idle parameters' partitions with zeros
    before the step, through DeepSpeed's public `safe_set_local_grad` (which also covers ZeRO-Offload's fp32
    gradients). tests/unit/test_engine.py shows DeepSpeed's behaviour without it, and fails once DeepSpeed
    zero-fills by itself.

    Cost: a hook call per parameter per backward, recording that its gradient arrived, and at the step a fill
    of the idle parameters' local partitions; no collective.
    """

    def __init__(self, module: nn.Module):
        # ZeRO-3 parameters: `nn.Parameter`s with DeepSpeed's untyped ``ds_*`` attributes.
        self.params: list[Any] = [p for p in module.parameters() if p.requires_grad]
        self.received: set[nn.Parameter] = set()
        for param in self.params:
            param.register_post_accumulate_grad_hook(self.received.add)

    def before_step(self) -> None:
        """At the accumulation boundary, after the last backward of the window."""
        for param in self.params:
            if param not in self.received:
                safe_set_local_grad(param, torch.zeros_like(param.ds_tensor))
        self.received.clear()


class CollectiveError(RuntimeError):
    """A collective failed or timed out: another rank died, is stuck, or the network broke."""


# Words in the errors gloo / NCCL / c10d raise when a peer is gone or a collective times out.
_COLLECTIVE_FAILURE_MARKERS = (
    "timed out",
    "timeout",
    "connection closed",
    "connection reset",
    "nccl",
    "gloo",
)


@contextmanager
def collective_phase(phase: str, timeout_minutes: float) -> Iterator[None]:
    """Re-raise a collective failure inside ``phase`` as a `CollectiveError` naming this rank and the phase."""
    try:
        yield
    except RuntimeError as err:
        message = str(err)
        if not isinstance(err, dist.DistError) and not any(
            marker in message.lower() for marker in _COLLECTIVE_FAILURE_MARKERS
        ):
            raise
        rank, world_size = dist.get_rank(), dist.get_world_size()
        raise CollectiveError(
            f"rank {rank} of {world_size}: a collective failed during {phase} (parallel.timeout_minutes="
            f"{timeout_minutes:g}). Another rank has most likely died or is stuck: its own output above says "
            f"why. Underlying error: {message.splitlines()[0] if message else type(err).__name__}"
        ) from err


class Engine:
    """A DeepSpeed engine over ``module`` (whose forward returns an object with ``.loss``).

    A collective that fails or outlives ``timeout_minutes`` raises `CollectiveError` naming the rank and the
    phase (forward, backward, optimizer step, evaluation) instead of hanging the job. ``head_lr``: the task
    heads' peak learning rate (`parameter_groups`), when not the optimizer's.
    """

    def __init__(
        self,
        module: nn.Module,
        config: dict[str, Any],
        *,
        config_file: Path | None = None,
        expert_parallel_size: int = 1,
        timeout_minutes: float = 30.0,
        head_lr: float | None = None,
    ):
        if head_lr is not None and not _keeps_group_lrs(config):
            raise ValueError(
                "head_lr needs a scheduler that keeps each group's peak: `deepspeed_config(train)` with "
                "train.head_lr set gives one (warmup_max_lr None); this config's would run the heads at the body's rate"
            )
        init_distributed(timeout_minutes)
        self.timeout_minutes = timeout_minutes
        self.micro_steps = 0
        backbone = hf_backbone(module)
        if expert_parallel_size > 1 and backbone is not None:
            # DeepSpeed AutoEP swaps the HF backbone's MoE blocks at initialize; it reads the architecture
            # (experts, top-k, routing groups) from the root module's `config`.
            config = {**config, "expert_parallel": autoep_section(module, expert_parallel_size)}
            setattr(module, "config", backbone[1].config)  # noqa: B010 (nn.Module typing of attributes)
        elif expert_parallel_size > 1:
            shard_experts(module, expert_parallel_size)
        groups = parameter_groups(module, config["optimizer"]["params"]["weight_decay"], head_lr)
        if config_file is not None and dist.get_rank() == 0:  # the DeepSpeed JSON as it ran, for the user
            config_file.parent.mkdir(parents=True, exist_ok=True)
            config_file.write_text(json.dumps(config, indent=2))
        _cast_parameters_built_outside_zero_init(module, config)
        self.engine, _, _, self.scheduler = deepspeed.initialize(
            model=module, model_parameters=groups, config=config
        )
        if "expert_parallel" in config:
            check_replaced_and_record_router_logits(module)
        if not any(
            _lookup(config, key) for key in ("zero_optimization.stage", "bf16.enabled", "fp16.enabled")
        ):
            self.engine.optimizer.register_step_pre_hook(_skip_unless_finite)
        self.idle_gradients = (
            IdleGradientZeroFill(self.engine.module) if self.engine.zero_optimization_stage() == 3 else None
        )

    @property
    def device(self) -> torch.device:
        return self.engine.device

    @property
    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    @property
    def step_applied(self) -> bool:
        """Whether the last optimizer step updated the model. DeepSpeed skips a step whose gradients hold an
        inf or NaN on any rank (an all-reduced flag: the same decision on every rank), without advancing the LR
        schedule: ZeRO-1/2/3 in every precision, and bf16 / fp16 without ZeRO; `_skip_unless_finite` does the
        same for fp32 without ZeRO. Reading it reads nothing from the device: the step has read the flag."""
        return bool(self.engine.was_step_applied())

    def train_step(self, batch: dict[str, Any]) -> Any:
        """Forward + backward of one micro-batch; the optimizer steps at accumulation boundaries."""
        self.engine.train()
        self.micro_steps += 1
        where = f"micro-batch {self.micro_steps} (task {batch.get('task')})"
        with collective_phase(f"the forward pass of {where}", self.timeout_minutes):
            output = self.engine(**self._to_device(batch))
        with collective_phase(f"the backward pass of {where}", self.timeout_minutes):
            self.engine.backward(output.loss)
        if self.idle_gradients is not None and self.engine.is_gradient_accumulation_boundary():
            self.idle_gradients.before_step()
        with collective_phase(f"the optimizer step after {where}", self.timeout_minutes):
            self.engine.step()
        return output

    @torch.no_grad()
    def eval_forward(self, batch: dict[str, Any]) -> Any:
        self.engine.eval()
        with collective_phase(f"evaluation (task {batch.get('task')})", self.timeout_minutes):
            return self.engine(**self._to_device(batch))

    def _to_device(self, batch: dict[str, Any]) -> dict[str, Any]:
        return {k: v.to(self.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
