"""`megamoe train`: config → data → model → engine → batches → trainer.fit() → evaluate → save.

One visible build sequence; every piece is built here and handed to the next.
"""

import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from .checkpoint import upcycle_pretrained
from .config import ExperimentConfig
from .data.collate import MultiTaskCollator
from .data.pipeline import TaskData, prepare_task_data
from .data.sampling import build_batches
from .engine.deepspeed_engine import Engine, deepspeed_config
from .engine.trainer import StepRecord, Trainer
from .model import MegaMoEConfig, MegaMoEForMultiTask
from .tasks.evaluation import evaluate
from .tasks.metrics import format_metrics_table, write_json_atomic
from .tasks.objective import MultiTaskObjective
from .tasks.weighting import build_weighting

logger = logging.getLogger(__name__)


@dataclass
class RunResult:
    run_dir: Path
    metrics: dict[str, dict[str, dict[str, float]]]
    history: list[StepRecord]


def build_model(
    config: ExperimentConfig, tasks: dict[str, TaskData], tokenizer: PreTrainedTokenizerBase
) -> MegaMoEForMultiTask:
    """The network named by ``config.model``, with one head per task."""
    section = config.model
    task_specs = {name: task.model_spec for name, task in tasks.items()}
    if section.init == "upcycle":
        assert section.base is not None  # validated by ModelSection
        return upcycle_pretrained(
            section.base,
            tasks=task_specs,
            expert_noise_std=section.expert_noise_std,
            seed=config.train.seed,
            **section.architecture,
        )
    if section.init == "pretrained":
        model = MegaMoEForMultiTask.from_pretrained(section.base)
        if model.config.tasks != task_specs:
            raise ValueError(
                f"{section.base} was trained for tasks {model.config.tasks}, the run declares {task_specs}: "
                "use init: upcycle / scratch, or the same tasks and labels"
            )
        return model
    architecture = {
        "vocab_size": len(tokenizer),
        "pad_token_id": tokenizer.pad_token_id,
        **section.architecture,
    }
    return MegaMoEForMultiTask(MegaMoEConfig(tasks=task_specs, **architecture))


def run(config: ExperimentConfig, *, show_progress: bool = True) -> RunResult:
    run_dir = Path(config.run_dir)
    torch.manual_seed(config.train.seed)

    # 1. Data: load every task, infer its labels, tokenize.
    tokenizer = AutoTokenizer.from_pretrained(config.model.tokenizer or config.model.base)
    tasks = prepare_task_data(config, tokenizer)

    # 2. Model and objective (task heads + loss weighting + router losses).
    model = build_model(config, tasks, tokenizer)
    alphas = {name: task.weight for name, task in config.tasks.items()}
    objective = MultiTaskObjective(
        model, build_weighting(config.train.loss_weighting, list(tasks), alphas=alphas)
    )

    # 3. Engine: DeepSpeed, with its JSON generated from the run config into the run directory.
    engine = Engine(objective, deepspeed_config(config.train), run_dir=run_dir)
    rank, world_size = dist.get_rank(), dist.get_world_size()

    # 4. Batches: one task per micro-batch, same schedule on every rank, examples sharded by rank.
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
    )

    # 5. Train, evaluating on validation every eval_every steps.
    def validate(step: int) -> dict[str, Any]:
        return evaluate(engine.eval_forward, tasks, ("validation",), collate)[0]

    trainer = Trainer(
        engine,
        batches,
        max_steps=config.train.max_steps,
        grad_accum=config.train.gradient_accumulation_steps,
        evaluate=validate,
        eval_every=config.train.eval_every,
        task_weights=objective.weighting.current_weights,
        show_progress=show_progress and rank == 0,
    )
    history = trainer.fit()

    # 6. Final evaluation, metrics.json, and the trained model as an HF directory.
    metrics, utilization = evaluate(engine.eval_forward, tasks, ("validation", "test"), collate)
    if rank == 0:
        print(format_metrics_table(metrics))
        write_json_atomic(run_dir / "metrics.json", metrics)
        write_json_atomic(
            run_dir / "expert_utilization.json",
            {"fractions": utilization.fractions(), "imbalance": utilization.imbalance()},
        )
        write_json_atomic(run_dir / "history.json", [asdict(record) for record in history])
        model.save_pretrained(run_dir / "model")
        tokenizer.save_pretrained(run_dir / "model")
    return RunResult(run_dir=run_dir, metrics=metrics, history=history)
