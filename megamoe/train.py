"""`megamoe train`: run directory checks → process group → config checks → data → model → engine → batches →
trainer.fit() → evaluate → save.

One visible build sequence; every piece is built here and handed to the next. The process group comes first
(torchtitan's and OLMo-core's order): ZeRO-3 builds the model partitioned, and each node prepares its data
once, on local rank 0, while the others wait.
"""

import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import yaml

from .checkpoint.export import export_checkpoint
from .checkpoint.model_card import save_model_card
from .checkpoint.resume import (
    Checkpointer,
    CheckpointError,
    Topology,
    newest_whole_checkpoint,
    resolve_checkpoint,
    tag_for,
)
from .config import ConfigError, ExperimentConfig
from .data.collate import MultiTaskCollator
from .data.pipeline import prepare_task_data
from .data.sampling import build_batches
from .data.tokenization import load_tokenizer
from .engine.callbacks import CheckpointCallback, EvaluationCallback, LoggerCallback, TrainerCallback
from .engine.deepspeed_engine import (
    Engine,
    check_topology,
    deepspeed_config,
    merge_user_deepspeed_config,
    partitioned_construction,
    user_deepspeed_config_path,
)
from .engine.distributed import init_distributed, local_main_first
from .engine.host_memory import describe_host_memory
from .engine.memory_report import memory_line
from .engine.run_logger import RunLogger
from .engine.trainer import StepRecord, Trainer
from .model import MegaMoEConfig
from .run_dir import RunDir, check_free_space, check_run_dir, write_json_atomic
from .sources import BuildOptions, build_model, declared_model_config
from .sources.builtin_models import resolve_model_source
from .tasks.evaluation import evaluate
from .tasks.metrics import format_metrics_table
from .tasks.objective import MultiTaskObjective
from .tasks.weighting import build_weighting

logger = logging.getLogger(__name__)


@dataclass
class RunResult:
    run_dir: Path
    metrics: dict[str, dict[str, dict[str, float]]]
    history: list[StepRecord]


def check_checkpoint_tasks(tag_dir: Path, tasks: dict[str, dict[str, Any]]) -> None:
    """Refuse to resume a checkpoint whose task heads (names, types, labels) differ from this run's."""
    saved = MegaMoEConfig.from_pretrained(tag_dir / "hf").tasks
    if saved != tasks:
        raise CheckpointError(
            f"{tag_dir} was trained for tasks {saved}, this run declares {tasks}: resume with the same tasks "
            "and labels, or start a new run from it (megamoe export, then model.init: pretrained)"
        )


# The weights' dtype for each train.precision (DeepSpeed keeps the fp32 master copy of bf16 / fp16 runs).
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class _FirstStepMemoryLine(TrainerCallback):
    """``memory: first step, ...`` once the first optimizer step is done (rank 0)."""

    def __init__(self) -> None:
        self.reported = False

    def on_step_end(self, trainer: Trainer, step: int) -> None:
        if not self.reported:
            print(memory_line("first step"), flush=True)
            self.reported = True


def run(
    config: ExperimentConfig,
    *,
    resume: str | Path | None = None,
    show_progress: bool = True,
    callbacks: Sequence[TrainerCallback] = (),
) -> RunResult:
    """Train, evaluate and export; ``resume`` is a checkpoint path (a run directory resumes its latest).
    ``callbacks`` run after the run's own (logging, evaluation, memory report, checkpoints)."""
    run_dir = Path(config.run_dir)
    paths = RunDir(run_dir)
    if resume is not None:  # a missing checkpoint is an error now, not after the model is built
        resolve_checkpoint(resume)
    # So is a run directory that cannot be written, or that holds another run: on every rank, before any
    # waits for the others.
    check_run_dir(run_dir, resuming=resume is not None)
    # 0. Join the process group first, with the run's timeout: ZeRO-3 builds the model partitioned, and the
    #    builtin data and models are prepared once per node while the node's other ranks wait.
    parallel = config.parallel
    init_distributed(parallel.timeout_minutes)
    rank, world_size = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(config.train.seed)
    # The newest checkpoint every rank finds whole: from a run directory, past a damaged one.
    if resume is not None:
        resume = newest_whole_checkpoint(resume, verify_contents=config.checkpoint.verify_on_resume)

    with local_main_first():
        # 1. Refuse a config that does not fit the launched ranks, before any data or model work.
        model_config = declared_model_config(config.model, config.data.cache_dir)
        check_topology(config.train, parallel, world_size=world_size, model=model_config)
        check_free_space(
            run_dir,
            model_config,
            _DTYPES[config.train.precision],
            config.checkpoint.keep_last,
            warn=rank == 0,
        )
        lengths = {"data.max_length": config.data.max_length}
        lengths.update(
            {f"tasks.{n}.max_length": t.max_length for n, t in config.tasks.items() if t.max_length}
        )
        for where, length in lengths.items():
            if length > model_config.max_position_embeddings:
                raise ConfigError(
                    f"{where}: {length} is more than the model's max_position_embeddings "
                    f"{model_config.max_position_embeddings}"
                )
        # 2. Data: load every task, infer its labels, tokenize (the other ranks of the node read the cache).
        tokenizer_source = config.model.tokenizer or config.model.base
        assert tokenizer_source is not None  # validated by ModelSection
        try:
            tokenizer = load_tokenizer(
                resolve_model_source(tokenizer_source, config.data.cache_dir),
                pretokenized=any(task.type == "token_classification" for task in config.tasks.values()),
            )
        except (OSError, ValueError) as err:
            key = "model.tokenizer" if config.model.tokenizer else "model.base"
            raise ConfigError(f"{key}: cannot load a tokenizer from {tokenizer_source}: {err}") from None
        tasks = prepare_task_data(config, tokenizer)

    # 3. Model (partitioned as it is built under ZeRO-3) and objective (task heads + loss weighting + router
    #    losses).
    ds_config = deepspeed_config(config.train, parallel)
    user_ds_config = user_deepspeed_config_path(parallel)
    if user_ds_config is not None:
        ds_config = merge_user_deepspeed_config(user_ds_config, ds_config, world_size=world_size)
    options = BuildOptions(
        seed=config.train.seed, dtype=_DTYPES[config.train.precision], cache_dir=config.data.cache_dir
    )
    with partitioned_construction(ds_config):
        model = build_model(
            config.model, {name: task.model_spec for name, task in tasks.items()}, tokenizer, options
        )
    if rank == 0:
        print(memory_line("model built"), flush=True)
    if resume is not None:
        check_checkpoint_tasks(resume, model.config.tasks)
    alphas = {name: task.weight for name, task in config.tasks.items()}
    objective = MultiTaskObjective(
        model, build_weighting(config.train.loss_weighting, list(tasks), alphas=alphas)
    )

    # 4. Engine: DeepSpeed (experts sharded over the EP group), its JSON written into the run directory.
    engine = Engine(
        objective,
        ds_config,
        config_file=paths.deepspeed_config,
        expert_parallel_size=parallel.expert_parallel_size,
        timeout_minutes=parallel.timeout_minutes,
        head_lr=config.train.head_lr,
    )
    torch.manual_seed(config.train.seed + rank)  # every rank built the same model; dropout differs per rank
    if rank == 0:
        print(memory_line("engine ready"), flush=True)
        if not torch.cuda.is_available():
            print(describe_host_memory())  # CPU speed hinges on it (megamoe.engine.host_memory)
        # The run as it ran, overrides applied (the model card shows it).
        paths.run_config.write_text(yaml.safe_dump(asdict(config), sort_keys=False))

    # 5. Batches: one task per micro-batch, same schedule on every rank, examples sharded by rank.
    collate = MultiTaskCollator(tokenizer.pad_token_id)
    batches = build_batches(
        {name: task.splits["train"] for name, task in tasks.items()},
        collate,
        strategy=config.data.sampling,
        temperature=config.data.temperature,
        micro_batch_size=config.train.micro_batch_size,
        rank=rank,
        world_size=world_size,
        seed=config.train.seed,
        epochs={name: task.epochs for name, task in config.tasks.items()},
    )

    # 6. Train (resuming if asked), evaluating every eval_every steps and checkpointing every every_steps.
    def validate(step: int) -> dict[str, Any]:
        return evaluate(engine.eval_forward, tasks, ("validation",), collate)[0]

    def write_hf_files(directory: Path) -> None:
        model.config.save_pretrained(directory)
        tokenizer.save_pretrained(directory)

    logger = RunLogger(paths.tensorboard, enabled=rank == 0, tensorboard=config.logging.tensorboard)
    trainer = Trainer(
        engine,
        batches,
        max_steps=config.train.max_steps,
        grad_accum=config.train.gradient_accumulation_steps,
        task_weights=objective.weighting.current_weights,
        callbacks=[
            LoggerCallback(logger),
            EvaluationCallback(validate, config.train.eval_every, logger),
            *([_FirstStepMemoryLine()] if rank == 0 else []),
            CheckpointCallback(lambda step: checkpointer.save(step), config.checkpoint.every_steps),
            *callbacks,
        ],
        log_every=config.logging.every_steps,
        max_skipped_steps_in_a_row=config.train.max_skipped_steps_in_a_row,
        last_checkpoint=lambda: checkpointer.newest_step,
        show_progress=show_progress and rank == 0,
    )
    checkpointer = Checkpointer(
        engine.engine,
        paths.checkpoints,
        topology=Topology(world_size, parallel.expert_parallel_size, parallel.zero_stage),
        rank_local={"batches": batches, "weighting": objective.weighting, "trainer": trainer},
        write_hf_files=write_hf_files,
        keep_last=config.checkpoint.keep_last,
    )
    if resume is not None:
        step = checkpointer.load(resume)
        if rank == 0:
            print(f"resumed from step {step} ({resume})")
    history = trainer.fit()
    last_checkpoint = paths.checkpoints / tag_for(trainer.step)
    if not last_checkpoint.is_dir():
        last_checkpoint = checkpointer.save(trainer.step)
    logger.close()

    # 7. Final evaluation, metrics.json, and the model gathered from every shard into an HF directory.
    metrics, utilization = evaluate(
        engine.eval_forward, tasks, ("validation", "test"), collate, show_progress=show_progress and rank == 0
    )
    if rank == 0:
        print(format_metrics_table(metrics))
        write_json_atomic(paths.metrics, metrics)
        write_json_atomic(
            paths.expert_utilization,
            {"fractions": utilization.fractions(), "imbalance": utilization.imbalance()},
        )
        write_json_atomic(paths.history, [asdict(record) for record in history])
        export_checkpoint(last_checkpoint, paths.model)
        save_model_card(paths.model)
    dist.barrier()
    return RunResult(run_dir=run_dir, metrics=metrics, history=history)
