"""Rank 1 stops taking part after setup; rank 0's next collective must fail within the timeout, naming
its rank and phase (run by test_expert_parallel.py)."""

import sys
import time

from megamoe.config import ParallelSection, TrainSection
from megamoe.engine.deepspeed_engine import CollectiveError, Engine, deepspeed_config
from tests.distributed.ep_worker import global_batch, tiny_model


def main() -> None:
    train = TrainSection(max_steps=2, micro_batch_size=4)
    engine = Engine(
        tiny_model(4),
        deepspeed_config(train, ParallelSection(expert_parallel_size=2)),
        expert_parallel_size=2,
        timeout_minutes=0.1,
    )
    if engine.engine.global_rank == 1:
        time.sleep(40)  # stuck: never reaches the forward's all-to-all
        return
    try:
        engine.train_step({"task": "topic", **{k: v[:4] for k, v in global_batch(1).items()}})
    except CollectiveError as err:
        print(f"COLLECTIVE-ERROR: {err}", flush=True)
        sys.exit(3)


if __name__ == "__main__":
    main()
