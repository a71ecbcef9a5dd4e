"""A long `megamoe train` run, to show that resident memory stays flat: the quickstart job (2 ranks through the
deepspeed launcher) for ``--steps`` steps with a checkpoint and a validation pass every ``--every-steps``,
each rank's RSS and RssAnon sampled from /proc every ``--sample-seconds``.

A leak (history records, router statistics, logging, evaluation, checkpoint buffers) would show as anon memory
that grows from one checkpoint interval to the next. The bench reports, per rank, the anon memory at the end
of each interval (after its checkpoint and evaluation) and the growth per hour between the second interval and
the last (the first holds the allocator's warm-up), and writes every sample to ``--out`` and a plot to
``--plot``. The defaults (900 steps, every 100) took 32 min on a 2-core CPU machine that other tests shared
part of the time (2026-12-02, docs/memory.md); ~20 min on a quiet one.

    python bench/soak.py --plot docs/img/soak.png          # ~20-30 min on 2 CPU cores
    python bench/soak.py --steps 40 --every-steps 10 --plot docs/img/soak.png
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from launcher import deepspeed_launcher  # bench/ is on sys.path when a bench script runs

REPO = Path(__file__).resolve().parents[1]
_MARK = "MEGAMOE_SOAK_RUN"  # in every rank's environment: how the sampler finds them


def rank_processes(mark: str) -> dict[int, int]:
    """local rank -> pid of the training processes whose environment carries ``_MARK=mark``."""
    found = {}
    for entry in Path("/proc").iterdir():
        try:
            environ = dict(
                item.split("=", 1) for item in (entry / "environ").read_text().split("\0") if "=" in item
            )
        except (OSError, ValueError):
            continue
        if environ.get(_MARK) == mark and "LOCAL_RANK" in environ:
            found[int(environ["LOCAL_RANK"])] = int(entry.name)
    return found


def memory(pid: int) -> dict[str, int] | None:
    """VmRSS and RssAnon of ``pid`` in bytes; None once it is gone."""
    try:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    except OSError:
        return None
    fields = {}
    for line in lines:
        if line.startswith(("VmRSS:", "RssAnon:")):
            name, kib = line.split(":")
            fields["rss" if name == "VmRSS" else "anon"] = int(kib.split()[0]) * 1024
    return fields or None


def checkpoint_times(run_dir: Path) -> dict[int, float]:
    """step -> when its checkpoint directory appeared (the end of that interval)."""
    return {
        int(path.name.split("_")[1]): path.stat().st_mtime
        for path in (run_dir / "checkpoints").glob("step_*")
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=900)
    parser.add_argument("--every-steps", type=int, default=100, help="checkpoint and evaluation cadence")
    parser.add_argument("--sample-seconds", type=float, default=2.0)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "soak.json")
    parser.add_argument("--plot", type=Path, help="a PNG of anon memory over time, per rank")
    args = parser.parse_args()
    if args.steps < 3 * args.every_steps:
        parser.error("--steps must cover at least 3 intervals of --every-steps (the first is warm-up)")

    with tempfile.TemporaryDirectory(prefix="megamoe-soak-") as tmp:
        run_dir = Path(tmp) / "run"
        mark = str(time.time_ns())
        overrides = [
            f"run_dir={run_dir}",
            f"train.max_steps={args.steps}",
            f"train.eval_every={args.every_steps}",
            f"checkpoint.every_steps={args.every_steps}",
            f"checkpoint.keep_last={args.steps // args.every_steps + 1}",  # keep every one: their times
            "logging.tensorboard=false",
        ]
        command = [
            *deepspeed_launcher(2),
            "--module",
            "megamoe",
            "train",
            "configs/quickstart.yaml",
            *overrides,
        ]
        env = {**os.environ, _MARK: mark}
        started = time.time()
        # The output goes to a file: a pipe nobody reads fills up (the progress bar alone) and blocks rank 0.
        log = Path(tmp) / "train.log"
        with log.open("wb") as output:
            job = subprocess.Popen(command, cwd=REPO, env=env, stdout=output, stderr=subprocess.STDOUT)
            samples: list[dict] = []
            while job.poll() is None:
                for rank, pid in rank_processes(mark).items():
                    if (now := memory(pid)) is not None:
                        samples.append({"t": time.time() - started, "rank": rank, **now})
                time.sleep(args.sample_seconds)
        if job.returncode != 0:
            sys.exit(f"the run failed ({job.returncode}):\n{log.read_text(errors='replace')[-3000:]}")
        ends = {step: when - started for step, when in sorted(checkpoint_times(run_dir).items())}

    report = {"command": sys.argv, "interval_ends_s": ends, "samples": samples, "ranks": {}}
    for rank in sorted({s["rank"] for s in samples}):
        mine = [s for s in samples if s["rank"] == rank]
        # anon memory at each interval's end: the last sample before its checkpoint appeared
        at_ends = {
            step: max((s for s in mine if s["t"] <= t), key=lambda s: s["t"])["anon"]
            for step, t in ends.items()
        }
        steps = sorted(at_ends)
        second, last = steps[1], steps[-1]
        hours = (ends[last] - ends[second]) / 3600
        growth = (at_ends[last] - at_ends[second]) / hours if hours > 0 else 0.0
        report["ranks"][rank] = {"anon_at_interval_ends": at_ends, "anon_growth_per_hour": growth}
        print(
            f"rank {rank}: anon GiB at each checkpoint "
            + ", ".join(f"{step}: {value / 2**30:.3f}" for step, value in at_ends.items())
            + f"; growth from step {second} to {last}: {growth / 2**20:+.1f} MiB/h"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        figure, axes = plt.subplots(figsize=(8, 3.5))
        for rank in sorted(report["ranks"]):
            mine = [s for s in samples if s["rank"] == rank]
            axes.plot([s["t"] / 60 for s in mine], [s["anon"] / 2**30 for s in mine], label=f"rank {rank}")
        for t in ends.values():
            axes.axvline(t / 60, color="grey", linewidth=0.5, linestyle="--")
        axes.set_xlabel("minutes (dashed: checkpoint + evaluation)")
        axes.set_ylabel("anon memory, GiB")
        axes.legend()
        figure.tight_layout()
        args.plot.parent.mkdir(parents=True, exist_ok=True)
        figure.savefig(args.plot, dpi=120)


if __name__ == "__main__":
    main()
