"""A NaN loss on rank 1 only, at step 4 of 6, under the trainer; run by test_nan_steps.py. Every rank writes
``rank<r>.json``: the steps its trainer skipped, and whether its own parameters (its experts under EP) changed
in each step."""

import argparse
import json
from pathlib import Path

import torch
import torch.distributed as dist

from megamoe.config import ParallelSection, TrainSection
from megamoe.engine.callbacks import TrainerCallback
from megamoe.engine.deepspeed_engine import Engine, deepspeed_config
from megamoe.engine.trainer import Trainer
from megamoe.tasks.objective import MultiTaskObjective
from megamoe.tasks.weighting import build_weighting
from tests.distributed.ep_worker import MICRO_BATCH, TASK_NAMES, global_batch, tiny_model

STEPS, POISONED_STEP = 6, 4


class PoisonedOnRank1(MultiTaskObjective):
    step = 0

    def forward(self, **inputs):
        output = super().forward(**inputs)
        if self.training and self.step == POISONED_STEP and dist.get_rank() == 1:
            output.loss = output.loss * float("nan")
        return output


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--zero-stage", type=int, required=True)
    parser.add_argument("--ep-size", type=int, default=2)
    args = parser.parse_args()
    model = tiny_model(4)  # topic trains, sentiment's head stays idle
    objective = PoisonedOnRank1(model, build_weighting("dwa", list(TASK_NAMES)))
    train = TrainSection(max_steps=STEPS, micro_batch_size=MICRO_BATCH, lr=1e-2, warmup_ratio=0.0)
    parallel = ParallelSection(expert_parallel_size=args.ep_size, zero_stage=args.zero_stage)
    engine = Engine(objective, deepspeed_config(train, parallel), expert_parallel_size=args.ep_size)
    rank = dist.get_rank()

    def batches():
        for step in range(1, STEPS + 1):
            objective.step = step
            rows = slice(rank * MICRO_BATCH, (rank + 1) * MICRO_BATCH)
            yield {"task": "topic", **{k: v[rows] for k, v in global_batch(step).items()}}

    snapshots = {}

    class Snapshot(TrainerCallback):
        def on_step_end(self, trainer, step):
            snapshots[step] = [p.detach().clone() for p in engine.engine.module.parameters()]

    trainer = Trainer(engine, batches(), max_steps=STEPS, callbacks=[Snapshot()], show_progress=False)
    trainer.fit()
    changed = {
        step: any(not torch.equal(a, b) for a, b in zip(snapshots[step - 1], snapshots[step], strict=True))
        for step in range(2, STEPS + 1)
    }
    finite = all(torch.isfinite(p).all() for p in snapshots[STEPS])
    (args.out / f"rank{rank}.json").write_text(
        json.dumps({"skipped_steps": trainer.skipped_steps, "changed": changed, "finite": finite})
    )


if __name__ == "__main__":
    main()
