"""Training throughput of `megamoe train` on one GPU, with every optimizer step timed.

    python bench/train_throughput.py OUT.json CONFIG.yaml [overrides ...]

runs ``megamoe train CONFIG.yaml overrides...`` in this process (one rank, no launcher), with a trainer
callback (`StepTimer`) that records, per micro-batch, the wall time at its end (after
``torch.cuda.synchronize()``: the trainer itself reads the device only every ``logging.every_steps``, so the
bench waits for the GPU to time each step), the padded micro-batch shape and the real (attention-mask)
tokens. It also counts which expert path
(``F.grouped_mm`` or the per-expert loop) ran. From a steady-state window (``--skip`` first steps left out)
it reports step time, tokens/s and model FLOP utilization:

    FLOPs per padded token = 6 * (active params - embedding params) + 12 * layers * seq_len * hidden

(6N: forward + backward of every matmul weight a token uses; 12·L·s·h: QK^T and AV, forward + backward,
s = the micro-batch's padded length). Nothing in the trainer or the model is changed; the expert-path count
wraps `moe_experts._grouped_mm_supported`.
"""

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from megamoe.config import load_config
from megamoe.engine.callbacks import TrainerCallback
from megamoe.model import moe_experts
from megamoe.run_dir import RunDir
from megamoe.train import run as train

SPEC_PEAK_TFLOPS = {"H100/H200 SXM bf16 dense spec": 989.0}


def peaks_tflops() -> dict[str, float]:
    """The peaks MFU is reported against: the spec sheet's, and on a GPU an 8192^3 bf16 matmul timed on this
    very device (the H100 gave 798, an H200 769-798 here: what a kernel can reach, not the marketing figure)."""
    if not torch.cuda.is_available():
        return dict(SPEC_PEAK_TFLOPS)
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ a
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(10):
        a @ a
    torch.cuda.synchronize()
    measured = 10 * 2 * 8192**3 / (time.perf_counter() - start) / 1e12
    return {**SPEC_PEAK_TFLOPS, "8192^3 bf16 matmul measured on the device": measured}


class StepTimer(TrainerCallback):
    """Records every micro-batch's end time (after the device finished it), padded shape and real tokens.

    ``profile=(START, COUNT)``: cProfile (host Python) over steps START.., then torch.profiler (CPU ops +
    CUDA kernels) over the next COUNT steps (START >= 2: each profiler starts when the step before its
    first ends); tables go to ``profile_out``. Those steps' timings are perturbed.
    """

    def __init__(self, profile: tuple[int, int] | None = None, profile_out: Path | None = None):
        self.log: dict = {
            "step_end": [],
            "shapes": [],
            "tokens": [],
            "expert_path": {"grouped_mm": 0, "loop": 0},
        }
        self.profile = profile
        self.profile_out = profile_out
        self.profilers: dict = {}

    def on_fit_start(self, trainer) -> None:
        self.log["fit_start"] = time.perf_counter()

    def on_micro_batch_end(self, trainer, batch) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.log["step_end"].append(time.perf_counter())
        self.log["shapes"].append(list(batch["input_ids"].shape))
        self.log["tokens"].append(int(batch["attention_mask"].sum()))
        if self.profile:
            start, count = self.profile
            if trainer.step in (start + count - 1, start + 2 * count - 1):
                self.stop_profiler(python=trainer.step == start + count - 1)
            if trainer.step in (start - 1, start + count - 1):
                self.start_profiler(python=trainer.step == start - 1)

    def start_profiler(self, python: bool) -> None:
        if python:
            import cProfile

            self.profilers["py"] = cProfile.Profile()
            self.profilers["py"].enable()
        else:
            from torch.profiler import ProfilerActivity
            from torch.profiler import profile as torch_profile

            self.profilers["torch"] = torch_profile(
                activities=[ProfilerActivity.CPU]
                + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
            )
            self.profilers["torch"].__enter__()
            self.profilers["torch_t0"] = time.perf_counter()

    def stop_profiler(self, python: bool) -> None:
        import io
        import pstats

        assert self.profile is not None and self.profile_out is not None
        start, count = self.profile
        with open(self.profile_out, "a") as out:
            if python:
                self.profilers["py"].disable()
                stream = io.StringIO()
                pstats.Stats(self.profilers["py"], stream=stream).sort_stats("cumulative").print_stats(45)
                out.write(f"### cProfile, steps {start}..{start + count - 1}\n{stream.getvalue()}\n")
            else:
                wall_us = 1e6 * (time.perf_counter() - self.profilers["torch_t0"])
                prof = self.profilers["torch"]
                prof.__exit__(None, None, None)
                events = prof.key_averages()
                kernel_us = sum(e.self_device_time_total for e in events)
                out.write(
                    f"### torch.profiler, {count} steps: wall {wall_us / 1e3:.1f} ms, GPU self time "
                    f"{kernel_us / 1e3:.1f} ms ({100 * kernel_us / wall_us:.1f}% busy)\n"
                )
                out.write(events.table(sort_by="self_cpu_time_total", row_limit=30) + "\n")
                out.write(events.table(sort_by="self_device_time_total", row_limit=20) + "\n")


def count_expert_paths(log: dict) -> None:
    """Count which expert path (``F.grouped_mm`` or the per-expert loop) each MoE layer call took."""
    supported = moe_experts._grouped_mm_supported

    def counted_supported(x, weight):
        ok = supported(x, weight)
        log["expert_path"]["grouped_mm" if ok else "loop"] += 1
        return ok

    moe_experts._grouped_mm_supported = counted_supported


def model_sizes(model_dir: Path) -> dict:
    from transformers import AutoConfig

    from megamoe.model import MegaMoEForMultiTask

    config = AutoConfig.from_pretrained(model_dir)
    with torch.device("meta"):
        model = MegaMoEForMultiTask(config)
    return {
        "total": model.num_parameters(),
        "active": model.num_active_parameters(),
        "embedding": model.get_input_embeddings().weight.numel(),
        "layers": config.num_hidden_layers,
        "hidden": config.hidden_size,
    }


def summarize(log: dict, sizes: dict, skip: int, peaks: dict[str, float]) -> dict:
    ends = log["step_end"]
    window = range(skip, len(ends))
    step_s = [ends[i] - ends[i - 1] for i in window]
    seconds = ends[-1] - ends[skip - 1]
    shapes = [log["shapes"][i] for i in window]
    padded = sum(b * s for b, s in shapes)
    real = sum(log["tokens"][i] for i in window)
    dense = 6 * (sizes["active"] - sizes["embedding"])
    flops = sum(b * s * (dense + 12 * sizes["layers"] * s * sizes["hidden"]) for b, s in shapes)
    tflops = flops / seconds / 1e12
    return {
        "steps_timed": len(step_s),
        "first_step_s": ends[0] - log["fit_start"],
        "step_ms_mean": 1e3 * seconds / len(step_s),
        "step_ms_median": 1e3 * statistics.median(step_s),
        "step_ms_p90": 1e3 * sorted(step_s)[int(0.9 * len(step_s))],
        "mean_padded_len": statistics.mean(s for _, s in shapes),
        "padded_tokens_per_s": padded / seconds,
        "real_tokens_per_s": real / seconds,
        "padding_fraction": 1 - real / padded,
        "achieved_tflops": tflops,
        "peak_tflops": peaks,
        "mfu": {name: tflops / peak for name, peak in peaks.items()},
    }


def run() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", help="where the JSON summary goes")
    parser.add_argument("config")
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--skip", type=int, default=50, help="warm-up steps left out of the summary")
    parser.add_argument("--profile", help="START:COUNT: profile COUNT steps from START (see StepTimer)")
    args = parser.parse_args()
    profile = tuple(int(x) for x in args.profile.split(":")) if args.profile else None
    timer = StepTimer(profile, Path(args.out).with_suffix(".profile.txt"))
    log = timer.log
    count_expert_paths(log)
    started = time.perf_counter()
    result = train(load_config(args.config, args.overrides), callbacks=[timer])
    wall = time.perf_counter() - started
    if dist.is_initialized():
        dist.destroy_process_group()
    sizes = model_sizes(RunDir(Path(result.run_dir)).model)
    summary = {
        "command": sys.argv,
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "torch": torch.__version__,
        "max_memory_allocated_GiB": torch.cuda.max_memory_allocated() / 2**30
        if torch.cuda.is_available()
        else 0,
        "wall_s_whole_command": wall,
        "train_loop_s": log["step_end"][-1] - log["fit_start"],
        "params": sizes,
        "expert_path_calls": log["expert_path"],
        **summarize(log, sizes, args.skip, peaks_tflops()),
        "per_step": {"end_s": [t - log["fit_start"] for t in log["step_end"]], "shape": log["shapes"]},
    }
    Path(args.out).write_text(json.dumps(summary, indent=1))
    print(json.dumps({k: v for k, v in summary.items() if k != "per_step"}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(run())
