"""Peak host memory per rank while a published HF MoE is loaded and trained, against the ideal.

    python bench/load_memory.py [--ranks 2 4] [--layouts zero2 zero3 zero3_autoep] [--size 300m]
                                [--return-freed-memory] [--out bench/results/load_memory.json]

writes a random bf16 Qwen3-MoE checkpoint (a CausalLM on disk, as the Hub serves one; ``--size`` picks how
big), then for every ranks x layout launches itself under the deepspeed launcher (CPU ranks, gloo). Each
rank loads the checkpoint as `megamoe train` does (`megamoe.sources.hf_moe.load_hf_moe` inside
`partitioned_construction`), builds the engine, runs one step, saves a checkpoint, and rank 0 exports it.
A sampler thread records, per phase, the peak of VmRSS (all resident pages) and of RssAnon (without the
checkpoint file's page cache mapped by safetensors, which the kernel can drop), above the rank's baseline
after `import torch, deepspeed, transformers` and joining the group.

The ideal of the load phase is the checkpoint's bytes one rank must hold: all of them under ZeRO-1/2
(every rank has a full copy), 1/ranks of them under ZeRO-3. Target (issue 12): load-phase peak <= 1.25 x
ideal. Export runs on rank 0 only and is measured in that process (AutoEP's consolidation runs DeepSpeed's
ds_to_universal in a child: its peak is the children's column).
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path

from launcher import deepspeed_launcher  # bench/ is on sys.path when a bench script runs

REPO = Path(__file__).resolve().parents[1]
LAYOUTS = {  # name: (zero stage, expert-parallel size = ranks?)
    "zero2": (2, False),
    "zero3": (3, False),
    "zero3_autoep": (3, True),
}
SIZES = {  # a few hundred million parameters: hidden, layers, experts, expert width
    "small": dict(hidden_size=256, num_hidden_layers=4, num_experts=8, moe_intermediate_size=256),
    "300m": dict(hidden_size=768, num_hidden_layers=8, num_experts=32, moe_intermediate_size=512),
}
_GIB = 2**30


def write_checkpoint(directory: Path, size: str) -> int:
    """A random bf16 Qwen3-MoE causal LM saved with save_pretrained; returns its parameter bytes."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(
        "qwen3_moe",
        vocab_size=32000,
        num_attention_heads=8,
        num_key_value_heads=4,
        intermediate_size=1024,
        num_experts_per_tok=4,
        max_position_embeddings=256,
        **SIZES[size],
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).to(torch.bfloat16)
    model.save_pretrained(directory)
    return sum(p.numel() * p.element_size() for p in model.parameters())


class PeakSampler:
    """Peak VmRSS / RssAnon of this process per phase, sampled every 2 ms by a daemon thread."""

    def __init__(self) -> None:
        self.peaks = {"rss": 0, "anon": 0}
        self.phases: dict[str, dict[str, float]] = {}
        threading.Thread(target=self._sample, daemon=True).start()

    @staticmethod
    def now() -> dict[str, int]:
        fields = {}
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(("VmRSS:", "RssAnon:")):
                    name, kib = line.split(":")
                    fields["rss" if name == "VmRSS" else "anon"] = int(kib.split()[0]) * 1024
        return fields

    def _sample(self) -> None:
        while True:
            for key, value in self.now().items():
                self.peaks[key] = max(self.peaks[key], value)
            time.sleep(0.002)

    @contextmanager
    def phase(self, name: str):
        self.peaks = self.now()
        started = time.perf_counter()
        yield
        time.sleep(0.01)  # one more sample
        self.phases[name] = {
            "peak_rss_GiB": self.peaks["rss"] / _GIB,
            "peak_anon_GiB": self.peaks["anon"] / _GIB,
            "seconds": time.perf_counter() - started,
        }


def worker(args: argparse.Namespace) -> None:
    sampler = PeakSampler()
    import torch
    import torch.distributed as dist

    # Imported before the baseline: the modules the load imports lazily are not part of what it holds.
    import transformers.conversion_mapping
    import transformers.integrations.deepspeed
    import transformers.models.qwen3_moe.modeling_qwen3_moe  # noqa: F401

    import megamoe.engine.partitioned_loading  # noqa: F401
    from megamoe.checkpoint.export import export_weights
    from megamoe.checkpoint.resume import Checkpointer, Topology
    from megamoe.config import ParallelSection, TrainSection
    from megamoe.engine.deepspeed_engine import Engine, deepspeed_config, partitioned_construction
    from megamoe.engine.distributed import init_distributed
    from megamoe.sources.hf_moe import load_hf_moe
    from megamoe.tasks.objective import MultiTaskObjective
    from megamoe.tasks.weighting import build_weighting

    zero_stage, autoep = LAYOUTS[args.layout]
    init_distributed(10)
    rank, world_size = dist.get_rank(), dist.get_world_size()
    ep = world_size if autoep else 1
    train = TrainSection(max_steps=2, micro_batch_size=2, precision="bf16", lr=1e-4)
    ds_config = deepspeed_config(train, ParallelSection(expert_parallel_size=ep, zero_stage=zero_stage))
    baseline = PeakSampler.now()
    tasks = {"topic": {"type": "sequence_classification", "labels": ["a", "b", "c"]}}
    with sampler.phase("load"), partitioned_construction(ds_config):
        model = load_hf_moe(args.checkpoint, tasks=tasks, dtype=torch.bfloat16)
    objective = MultiTaskObjective(model, build_weighting("static", list(tasks)))
    with sampler.phase("deepspeed.initialize"):
        engine = Engine(objective, ds_config, expert_parallel_size=ep)
    ids = torch.randint(1, 32000, (2, 64), generator=torch.Generator().manual_seed(rank))
    with sampler.phase("first step"):
        engine.train_step(
            {
                "task": "topic",
                "input_ids": ids,
                "attention_mask": torch.ones_like(ids),
                "labels": torch.tensor([0, 1]),
            }
        )
    checkpointer = Checkpointer(
        engine.engine,
        Path(args.out_dir) / "checkpoints",
        topology=Topology(world_size, ep, zero_stage),
        rank_local={},
        write_hf_files=model.config.save_pretrained,
    )
    with sampler.phase("save"):
        tag_dir = checkpointer.save(1)
    if rank == 0:  # export_checkpoint's weights part (this checkpoint has no tokenizer to copy)
        with sampler.phase("export"):
            export_weights(tag_dir, Path(args.out_dir) / "exported", max_shard_size="200MB")
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024 / _GIB
    result = {
        "rank": rank,
        "baseline_rss_GiB": baseline["rss"] / _GIB,
        "baseline_anon_GiB": baseline["anon"] / _GIB,
        "children_peak_rss_GiB": children,
        "phases": sampler.phases,
    }
    (Path(args.out_dir) / f"rank{rank}.json").write_text(json.dumps(result))
    dist.barrier()
    dist.destroy_process_group()


# glibc keeps freed heap memory for reuse (RSS stays at its high-water mark); with these it returns every
# block above 64 KiB at once, so RSS follows what is live. `--return-freed-memory` sets them for the ranks.
_RETURN_FREED_MEMORY = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}


def launch(checkpoint: Path, layout: str, ranks: int, work: Path, *, return_freed: bool) -> list[dict]:
    out_dir = work / f"{layout}_{ranks}"
    out_dir.mkdir(parents=True)
    command = [
        *deepspeed_launcher(ranks),
        __file__,
        "--worker",
        "--checkpoint",
        str(checkpoint),
        "--layout",
        layout,
        "--out-dir",
        str(out_dir),
    ]
    env = dict(os.environ, PYTHONPATH=str(REPO), **(_RETURN_FREED_MEMORY if return_freed else {}))
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{layout} on {ranks} ranks failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return [json.loads((out_dir / f"rank{rank}.json").read_text()) for rank in range(ranks)]


def table(results: list[dict], checkpoint_gib: float) -> str:
    """GiB above the baseline; load in RSS and anon, the later phases in anon: all the rank holds by then
    (the model, and from the first step the optimizer states), not what the phase adds."""
    lines = [
        f"checkpoint: {checkpoint_gib:.3f} GiB of bf16 parameters; peaks in GiB above each rank's baseline",
        "| ranks | layout | ideal load / rank | load: RSS (anon) | x ideal: RSS (anon) "
        "| initialize | first step | export (rank 0) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for run in results:
        ranks, layout = run["ranks"], run["layout"]
        ideal = checkpoint_gib / (ranks if LAYOUTS[layout][0] == 3 else 1)
        worst = max(
            run["per_rank"], key=lambda r: r["phases"]["load"]["peak_anon_GiB"] - r["baseline_anon_GiB"]
        )

        def above(phase: str, kind: str = "anon", r: dict = worst) -> float:
            return r["phases"][phase][f"peak_{kind}_GiB"] - r[f"baseline_{kind}_GiB"]

        rank0 = run["per_rank"][0]
        export = f"{above('export', r=rank0):.2f}" if "export" in rank0["phases"] else "-"
        lines.append(
            f"| {ranks} | {layout} | {ideal:.3f} | {above('load', 'rss'):.3f} ({above('load'):.3f}) "
            f"| {above('load', 'rss') / ideal:.2f} ({above('load') / ideal:.2f}) | {above('deepspeed.initialize'):.2f} "
            f"| {above('first step'):.2f} | {export} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--layouts", nargs="+", choices=sorted(LAYOUTS), default=list(LAYOUTS))
    parser.add_argument("--size", choices=sorted(SIZES), default="300m")
    parser.add_argument(
        "--out",
        type=Path,
        default=REPO / "bench" / "results" / "load_memory.json",
        help="the JSON file of every rank's phases (the table is printed)",
    )
    parser.add_argument(
        "--return-freed-memory",
        action="store_true",
        help="have glibc return freed blocks to the kernel at once (RSS = live memory, not the heap's high-water mark)",
    )
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--checkpoint", help=argparse.SUPPRESS)
    parser.add_argument("--layout", help=argparse.SUPPRESS)
    parser.add_argument("--out-dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    if args.out.is_dir():
        parser.error(
            f"--out {args.out} is a directory: give the JSON file to write, e.g. {args.out / 'load_memory.json'}"
        )
    from tqdm.auto import tqdm

    with tempfile.TemporaryDirectory(prefix="megamoe-load-memory-") as tmp:
        work = Path(tmp)
        checkpoint_bytes = write_checkpoint(work / "checkpoint", args.size)
        results = []
        runs = [(ranks, layout) for ranks in args.ranks for layout in args.layouts]
        for ranks, layout in tqdm(runs, desc="launches"):
            per_rank = launch(work / "checkpoint", layout, ranks, work, return_freed=args.return_freed_memory)
            results.append({"ranks": ranks, "layout": layout, "per_rank": per_rank})
    summary = table(results, checkpoint_bytes / _GIB)
    summary += "\nallocator: " + (
        "glibc returning freed blocks" if args.return_freed_memory else "glibc default"
    )
    print(summary, flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps({"command": sys.argv, "checkpoint_bytes": checkpoint_bytes, "runs": results}, indent=1)
    )


if __name__ == "__main__":
    main()
