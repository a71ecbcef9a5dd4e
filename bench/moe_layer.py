"""Benchmark: forward+backward of one MoE layer against a dense FFN and two anchor implementations.

What is measured, all in one process, on the same input ``x [T/512, 512, d]`` (requires grad) and the same
fixed output gradient ``g`` (``y.backward(g)``):

* ``dense``          SwiGLU FFN of width k*F: the same active parameters per token; denominator of every ratio.
* ``megamoe``        ``megamoe.model.moe_layer.MoEFeedForward``: dropless, sort-based dispatch, grouped GEMM.
* ``deepspeed``      ``deepspeed.moe.layer.MoE``, single process (1-rank gloo group), ep_size=1, k=2,
                     capacity_factor=1.25 set explicitly (``MoE``'s own default is 1.0; overflow is dropped),
                     experts = SwiGLU FFNs of width F.
* ``hf_eager``       transformers' ``Qwen3MoeSparseMoeBlock``, default per-expert loop.
* ``hf_grouped_mm``  the same block with ``config._experts_implementation = "grouped_mm"``.

All MoE variants get the same router and expert weights (copied from megamoe's layer), so they route the
same tokens to the same experts -- except DeepSpeed, whose second expert is Gumbel-sampled and which drops
assignments beyond its capacity.

Timing: ``--warmup`` rounds, then ``--repeats`` rounds; inside every round each implementation runs once
(round-robin, starting point rotated), so machine noise hits all of them alike. Reported: the median ms of
forward+backward (wall clock, ``torch.cuda.synchronize`` before and after on CUDA). Memory: the activation
memory, i.e. the bytes of the distinct storages saved for backward (seen with
``torch.autograd.graph.saved_tensors_hooks``), leaving out the parameters and the layer input; on CUDA also the
peak allocated bytes during forward+backward above the level before it (``torch.cuda.max_memory_allocated``,
which includes the parameters' gradients), and that peak is then the memory of the table and the JSON.

Run (the numbers in docs/benchmarks.md; about 10 minutes on 2 CPU cores with the default 2 + 20 rounds):

    python bench/moe_layer.py --threads 2 --json bench/results/moe_layer_cpu.json --plot docs/img/moe_layer_cpu.png

GPU (docs/benchmarks.md, "GPU (H100)"):

    python bench/moe_layer.py --device cuda --dtype bfloat16 --hidden 2048 --expert-width 1408 --warmup 3 \
        --json bench/results/moe_layer_h100.json --plot docs/img/moe_layer_h100.png
"""

import argparse
import json
import logging
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import deepspeed
import torch
import torch.nn.functional as F
import transformers
from deepspeed.moe.layer import MoE
from grouped_gemm import median_ms  # bench/ is on sys.path when a bench script runs
from torch import nn
from transformers import Qwen3MoeConfig
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

from megamoe.engine.distributed import init_distributed
from megamoe.engine.host_memory import (
    ALLOCATOR_CHOICES,
    THP_ENV,
    caching_allocator_in_use,
    enable_transparent_huge_pages,
    restart_with_caching_allocator,
)
from megamoe.model.moe_experts import FeedForward, _grouped_mm_supported
from megamoe.model.moe_layer import MoEFeedForward

SEQ_LEN = 512
DS_CAPACITY_FACTOR = 1.25
TARGETS = {8: 1.15, 64: 1.3}  # experts -> maximum megamoe/dense time ratio
ANCHORS = ("deepspeed", "hf_eager")  # megamoe must beat these at E >= 32
Y_TICKS = (1, 1.15, 1.3, 1.5, 2, 4, 8, 16)  # log-scale ticks of the ratio plot


@dataclass
class Impl:
    """One implementation under test: its module, how to call it, and how many assignments it last dropped."""

    name: str
    module: nn.Module
    forward: Callable[[torch.Tensor], torch.Tensor]
    last_dropped: Callable[[], int] = lambda: 0


@dataclass
class Result:
    experts: int
    tokens: int
    impl: str
    ms: float
    ratio: float
    memory_mb: float
    memory_ratio: float
    saved_activations_mb: float
    dropped: int | None
    max_abs_diff_vs_megamoe: float | None


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--experts", type=int, nargs="+", default=[8, 32, 64], help="numbers of experts E")
    parser.add_argument("--tokens", type=int, nargs="+", default=[4096, 16384], help="tokens T per batch")
    parser.add_argument("--hidden", type=int, default=256, help="hidden size d")
    parser.add_argument("--expert-width", type=int, default=512, help="expert intermediate size F")
    parser.add_argument("--top-k", type=int, default=2, help="experts per token k")
    parser.add_argument("--repeats", type=int, default=20, help="timed rounds")
    parser.add_argument("--warmup", type=int, default=2, help="untimed rounds")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument(
        "--huge-pages",
        action=argparse.BooleanOptionalAction,
        default=True,
        help=f"back CPU tensors of 2 MB and more with transparent huge pages ({THP_ENV}=1), as `megamoe train` "
        "does; --no-huge-pages measures 4 KB pages (every fresh gradient page-faults)",
    )
    parser.add_argument(
        "--allocator",
        choices=ALLOCATOR_CHOICES,
        default="auto",
        help="CPU malloc for every implementation: the bench restarts itself with tcmalloc / jemalloc preloaded "
        "as `megamoe train` does (auto: tcmalloc, else jemalloc, else glibc); system keeps glibc's",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--plot", type=Path, help="write the ratio-to-dense plot here (PNG)")
    return parser.parse_args()


def swiglu(hidden: int, width: int) -> FeedForward:
    return FeedForward(hidden, width, mlp_type="glu", hidden_act="silu", bias=False)


def build_dense(args: argparse.Namespace) -> Impl:
    dense = swiglu(args.hidden, args.top_k * args.expert_width)
    with torch.no_grad():
        for param in dense.parameters():
            param.normal_(0.0, 0.02)
    return Impl("dense", dense, dense)


def build_megamoe(args: argparse.Namespace, experts: int) -> Impl:
    layer = MoEFeedForward(
        args.hidden,
        num_experts=experts,
        top_k=args.top_k,
        expert_intermediate_size=args.expert_width,
        mlp_type="glu",
        hidden_act="silu",
        bias=False,
    )
    with torch.no_grad():
        for param in layer.parameters():
            param.normal_(0.0, 0.02)
    last = {}

    def forward(x_BSD: torch.Tensor) -> torch.Tensor:
        y_BSD, last["stats"] = layer(
            x_BSD, torch.ones(x_BSD.shape[:2], dtype=torch.bool, device=x_BSD.device)
        )
        return y_BSD

    return Impl("megamoe", layer, forward, lambda: int(last["stats"].dropped_tokens))


def build_deepspeed(args: argparse.Namespace, ours: MoEFeedForward) -> Impl:
    """DeepSpeed MoE with megamoe's router and expert weights; counts the assignments its gate drops."""
    experts = ours.num_experts
    layer = MoE(
        args.hidden,
        swiglu(args.hidden, args.expert_width),
        num_experts=experts,
        ep_size=1,
        k=args.top_k,
        capacity_factor=DS_CAPACITY_FACTOR,
    )
    layer.set_deepspeed_parallelism()
    gate_up, down = ours.experts.gate_up_proj, ours.experts.down_proj
    with torch.no_grad():
        layer.deepspeed_moe.gate.wg.weight.copy_(ours.router.weight)
        for e, expert in enumerate(layer.deepspeed_moe.experts.deepspeed_experts):
            gate_w, up_w = gate_up[e].chunk(2)
            expert.gate_proj.weight.copy_(gate_w)
            expert.up_proj.weight.copy_(up_w)
            expert.down_proj.weight.copy_(down[e])
    # The gate returns (l_aux, capacity, E, routes [k, T], ...); routes over capacity carry expert id -1.
    last = {}
    layer.deepspeed_moe.gate.register_forward_hook(lambda _m, _inp, out: last.update(routes=out[3]))
    return Impl("deepspeed", layer, lambda x: layer(x)[0], lambda: int((last["routes"] < 0).sum()))


def build_hf(args: argparse.Namespace, ours: MoEFeedForward, experts_implementation: str) -> Impl:
    """Qwen3-MoE sparse block with megamoe's weights (same [E, 2F, D] / [E, D, F] layout)."""
    config = Qwen3MoeConfig(
        hidden_size=args.hidden,
        moe_intermediate_size=args.expert_width,
        num_experts=ours.num_experts,
        num_experts_per_tok=args.top_k,
        norm_topk_prob=True,
    )
    config._experts_implementation = experts_implementation
    block = Qwen3MoeSparseMoeBlock(config)
    with torch.no_grad():
        block.gate.weight.copy_(ours.router.weight)
        block.experts.gate_up_proj.copy_(ours.experts.gate_up_proj)
        block.experts.down_proj.copy_(ours.experts.down_proj)
    return Impl(f"hf_{experts_implementation}", block, block)


def build_impls(args: argparse.Namespace, experts: int, x: torch.Tensor) -> list[Impl]:
    """All implementations for E experts, on the benchmark's device and dtype; a variant that fails is skipped."""
    ours = build_megamoe(args, experts)
    builders: list[Callable[[], Impl]] = [
        lambda: build_dense(args),
        lambda: ours,
        lambda: build_deepspeed(args, ours.module),
        lambda: build_hf(args, ours.module, "eager"),
        lambda: build_hf(args, ours.module, "grouped_mm"),
    ]
    impls = []
    for build in builders:
        try:
            impl = build()
            impl.module.to(device=x.device, dtype=x.dtype)
            impl.forward(x).sum().backward()  # one call proves it runs
        except Exception as error:  # report any failure and benchmark the rest
            print(f"  skipped an implementation (E={experts}): {type(error).__name__}: {error}")
            continue
        impls.append(impl)
    return impls


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def fwd_bwd_ms(impl: Impl, x: torch.Tensor, grad: torch.Tensor) -> float:
    impl.module.zero_grad(set_to_none=True)
    x.grad = None
    synchronize(x.device)
    start = time.perf_counter()
    impl.forward(x).backward(grad)
    synchronize(x.device)
    return (time.perf_counter() - start) * 1e3


def time_round_robin(
    impls: list[Impl], x: torch.Tensor, grad: torch.Tensor, args: argparse.Namespace
) -> dict[str, float]:
    """Median fwd+bwd ms per implementation, each round running every implementation once."""
    times: dict[str, list[float]] = {impl.name: [] for impl in impls}
    for round_idx in range(args.warmup + args.repeats):
        shift = round_idx % len(impls)
        for impl in impls[shift:] + impls[:shift]:
            ms = fwd_bwd_ms(impl, x, grad)
            if round_idx >= args.warmup:
                times[impl.name].append(ms)
    return {name: statistics.median(values) for name, values in times.items()}


def saved_activation_bytes(impl: Impl, x: torch.Tensor) -> int:
    """Bytes of the distinct storages autograd saves for backward, parameters and the input left out."""
    excluded = {p.untyped_storage().data_ptr() for p in impl.module.parameters()}
    excluded.add(x.untyped_storage().data_ptr())
    saved: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in excluded:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        impl.forward(x)
    return sum(saved.values())


def peak_cuda_bytes(impl: Impl, x: torch.Tensor, grad: torch.Tensor) -> int:
    impl.module.zero_grad(set_to_none=True)
    x.grad = None
    torch.cuda.synchronize(x.device)
    torch.cuda.reset_peak_memory_stats(x.device)
    before = torch.cuda.memory_allocated(x.device)
    impl.forward(x).backward(grad)
    torch.cuda.synchronize(x.device)
    return torch.cuda.max_memory_allocated(x.device) - before


def measure_memory(impl: Impl, x: torch.Tensor, grad: torch.Tensor) -> tuple[int, int]:
    """(the table's memory: CUDA peak on CUDA, saved activations on CPU; saved activations)."""
    saved = saved_activation_bytes(impl, x)
    return (peak_cuda_bytes(impl, x, grad) if x.device.type == "cuda" else saved), saved


def megamoe_experts_path(args: argparse.Namespace) -> str:
    """Which expert GEMM megamoe's ``grouped_linear`` takes for this device and dtype."""
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    x = torch.zeros(1, args.hidden, device=device, dtype=dtype)
    weight = torch.zeros(1, 2 * args.expert_width, args.hidden, device=device, dtype=dtype)
    grouped = _grouped_mm_supported(x, weight)
    return (
        f"torch.nn.functional.grouped_mm {'present' if hasattr(F, 'grouped_mm') else 'absent'}, "
        f"torch._grouped_mm {'present' if hasattr(torch, '_grouped_mm') else 'absent'}; "
        f"megamoe experts: {'F.grouped_mm' if grouped else 'per-expert F.linear loop (fallback)'}"
    )


def small_gemm_probe(args: argparse.Namespace, groups: int = 64, rows: int = 128, repeats: int = 11) -> str:
    """How much slower ``groups`` GEMMs of ``rows`` rows are than one GEMM of the same FLOPs, on this machine now.

    The expert GEMMs at E=64, T=4096 are exactly such 128-row GEMMs. On the 2-vCPU VM of docs/benchmarks.md
    their speed is bimodal from one process (or hour) to the next -- 32 or 52 ms for the 64 ``gate_up``
    projections while the single GEMM stays at 24 ms -- and megamoe's E=64 ratio follows it; this line says
    which regime the run started in (it can flip within minutes). bench/grouped_gemm.py breaks all six down.
    """
    x = torch.randn(groups * rows, args.hidden)
    weight = torch.randn(groups, 2 * args.expert_width, args.hidden)
    offsets = torch.arange(1, groups + 1, dtype=torch.int32) * rows
    times = median_ms(
        {
            "grouped": lambda: F.grouped_mm(x, weight.transpose(-2, -1), offs=offsets),
            "single": lambda: x @ weight[0].t(),
        },
        repeats,
    )
    grouped, single = times["grouped"], times["single"]
    return (
        f"small-GEMM probe: {groups} x [{rows}x{args.hidden} @ {args.hidden}x{2 * args.expert_width}] "
        f"grouped_mm {grouped:.1f} ms vs one GEMM of the same FLOPs {single:.1f} ms ({grouped / single:.2f}x)"
    )


def run_config(args: argparse.Namespace, experts: int, tokens: int) -> list[Result]:
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    generator = torch.Generator().manual_seed(args.seed)
    shape = (tokens // SEQ_LEN, SEQ_LEN, args.hidden)
    x = torch.randn(shape, generator=generator).to(device=device, dtype=dtype).requires_grad_()
    grad = torch.randn(shape, generator=generator).to(device=device, dtype=dtype)
    torch.manual_seed(args.seed)  # same expert weights for a given E, whatever T
    impls = build_impls(args, experts, x)

    ms = time_round_robin(impls, x, grad, args)
    memory, saved = {}, {}
    for impl in impls:
        memory[impl.name], saved[impl.name] = measure_memory(impl, x, grad)
    with torch.no_grad():
        outputs = {impl.name: impl.forward(x) for impl in impls}
    results = []
    for impl in impls:
        is_moe = impl.name != "dense"
        diff = (outputs[impl.name] - outputs["megamoe"]).abs().max().item() if is_moe else None
        results.append(
            Result(
                experts=experts,
                tokens=tokens,
                impl=impl.name,
                ms=ms[impl.name],
                ratio=ms[impl.name] / ms["dense"],
                memory_mb=memory[impl.name] / 2**20,
                memory_ratio=memory[impl.name] / memory["dense"],
                saved_activations_mb=saved[impl.name] / 2**20,
                dropped=impl.last_dropped() if is_moe else None,
                max_abs_diff_vs_megamoe=diff,
            )
        )
    return results


def format_table(results: list[Result], memory_metric: str) -> str:
    """One row per result; on CUDA a saved-activations column follows the peak-memory one."""
    with_saved = memory_metric != "saved activations"
    header = (
        f"{'E':>3} {'T':>6} {'impl':<14} {'ms':>9} {'x dense':>8} {memory_metric + ' MB':>18} {'x dense':>8}"
        + (f" {'saved act. MB':>14} {'x dense':>8}" if with_saved else "")
        + f" {'dropped':>8} {'max|y-y_megamoe|':>17}"
    )
    dense_saved = {(r.experts, r.tokens): r.saved_activations_mb for r in results if r.impl == "dense"}
    lines = [header, "-" * len(header)]
    for r in results:
        dropped = "-" if r.dropped is None else str(r.dropped)
        diff = "-" if r.max_abs_diff_vs_megamoe is None else f"{r.max_abs_diff_vs_megamoe:.1e}"
        saved = ""
        if with_saved:
            saved_ratio = r.saved_activations_mb / dense_saved[(r.experts, r.tokens)]
            saved = f" {r.saved_activations_mb:>14.1f} {saved_ratio:>8.2f}"
        lines.append(
            f"{r.experts:>3} {r.tokens:>6} {r.impl:<14} {r.ms:>9.2f} {r.ratio:>8.2f} {r.memory_mb:>18.1f}"
            f" {r.memory_ratio:>8.2f}{saved} {dropped:>8} {diff:>17}"
        )
    return "\n".join(lines)


def find(results: list[Result], experts: int, tokens: int, impl: str) -> Result | None:
    return next((r for r in results if (r.experts, r.tokens, r.impl) == (experts, tokens, impl)), None)


def memory_linearity(results: list[Result], tokens: list[int]) -> list[str]:
    """megamoe's memory at the smallest and largest T: the ratio should be close to the token ratio."""
    low, high = min(tokens), max(tokens)
    lines = []
    for experts in sorted({r.experts for r in results}):
        a, b = find(results, experts, low, "megamoe"), find(results, experts, high, "megamoe")
        if a and b and low != high:
            lines.append(
                f"memory linear in tokens (megamoe, E={experts}): {a.memory_mb:.1f} MB at T={low}, "
                f"{b.memory_mb:.1f} MB at T={high}: x{b.memory_mb / a.memory_mb:.2f} (tokens x{high / low:.0f})"
            )
    return lines


def check_targets(results: list[Result]) -> list[str]:
    """PASS/FAIL lines for every target and token count that was measured."""
    lines = []
    for tokens in sorted({r.tokens for r in results}):
        for experts, limit in TARGETS.items():
            ours = find(results, experts, tokens, "megamoe")
            if ours:
                verdict = "PASS" if ours.ratio <= limit else "FAIL"
                lines.append(
                    f"{verdict}  T={tokens} E={experts}: megamoe {ours.ratio:.2f}x dense (target <= {limit}x)"
                )
        for experts in sorted(e for e in {r.experts for r in results} if e >= 32):
            ours = find(results, experts, tokens, "megamoe")
            for anchor_name in ANCHORS:
                anchor = find(results, experts, tokens, anchor_name)
                if ours and anchor:
                    verdict = "PASS" if ours.ms < anchor.ms else "FAIL"
                    lines.append(
                        f"{verdict}  T={tokens} E={experts}: megamoe {ours.ms:.1f} ms vs {anchor_name} "
                        f"{anchor.ms:.1f} ms (target: faster)"
                    )
    return lines


def plot(results: list[Result], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    token_counts = sorted({r.tokens for r in results})
    impls = list(dict.fromkeys(r.impl for r in results if r.impl != "dense"))
    fig, axes = plt.subplots(
        1, len(token_counts), figsize=(6 * len(token_counts), 4.5), sharey=True, squeeze=False
    )
    for ax, tokens in zip(axes[0], token_counts, strict=True):
        for impl in impls:
            points = sorted((r.experts, r.ratio) for r in results if r.tokens == tokens and r.impl == impl)
            ours = impl == "megamoe"
            ax.plot(
                *zip(*points, strict=True),
                marker="o",
                label=impl,
                linewidth=2.5 if ours else 1.5,
                zorder=3 if ours else 2,
            )
        ax.axhline(1.0, color="gray", linestyle="--", linewidth=1, label="dense (same active params)")
        ax.scatter(
            list(TARGETS), list(TARGETS.values()), marker="_", s=400, color="black", label="megamoe target"
        )
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_yticks(Y_TICKS, labels=[f"{tick:g}x" for tick in Y_TICKS])
        ax.minorticks_off()
        ax.set_xticks(sorted({r.experts for r in results}), labels=sorted({r.experts for r in results}))
        ax.set_xlabel("experts E")
        ax.set_title(f"T = {tokens} tokens")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("fwd+bwd time / dense")
    axes[0][-1].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def main() -> None:
    args = parse_args()
    if args.device == "cpu":
        try:
            restart_with_caching_allocator(
                args.allocator
            )  # the same command line again, the allocator preloaded
        except ValueError as err:
            raise SystemExit(f"error: {err}") from None
    # Before any tensor exists (PyTorch reads the switch at its first CPU allocation).
    if not args.huge_pages:
        os.environ[THP_ENV] = "0"
    huge_pages = enable_transparent_huge_pages()
    if args.threads:
        torch.set_num_threads(args.threads)
    init_distributed()  # DeepSpeed's MoE needs a process group: 1 rank unless launched
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    memory_metric = "CUDA peak alloc" if args.device == "cuda" else "saved activations"
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    where = device_name if args.device == "cuda" else f"{torch.get_num_threads()} CPU threads"
    environment = (
        f"torch {torch.__version__}, deepspeed {deepspeed.__version__}, transformers {transformers.__version__}, "
        f"device {device_name}, {torch.get_num_threads()} threads, {args.dtype}, "
        f"{THP_ENV}={int(huge_pages)}, malloc {caching_allocator_in_use() or 'glibc'}; {megamoe_experts_path(args)}"
    )
    if args.device == "cpu" and hasattr(F, "grouped_mm"):
        environment += f"; {small_gemm_probe(args)}"
    print(environment)
    print(
        f"d={args.hidden} F={args.expert_width} k={args.top_k}, dense width {args.top_k * args.expert_width}; "
        f"median of {args.repeats} round-robin rounds after {args.warmup} warmup; memory = {memory_metric}"
    )
    print(
        f"DeepSpeed drop behaviour: capacity = max(ceil(T/E * {DS_CAPACITY_FACTOR} * k), 4) rows per expert; "
        "assignments past it are dropped (the token keeps only its other expert, or gets 0), and every expert "
        "computes its full capacity buffer (E*C rows, empty slots zero); the 2nd expert is Gumbel-sampled."
    )

    results: list[Result] = []
    start = time.perf_counter()
    for tokens in args.tokens:
        for experts in args.experts:
            print(f"[{time.perf_counter() - start:6.0f} s] E={experts} T={tokens} ...", flush=True)
            config_results = run_config(args, experts, tokens)
            results += config_results
            print(", ".join(f"{r.impl} {r.ms:.1f} ms ({r.ratio:.2f}x)" for r in config_results), flush=True)
    print(f"done in {time.perf_counter() - start:.0f} s\n")

    results.sort(key=lambda r: (r.tokens, r.experts))
    print(format_table(results, memory_metric))
    print()
    summary = memory_linearity(results, args.tokens) + check_targets(results)
    print("\n".join(summary))

    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        payload = {
            "environment": environment,
            "args": {
                key: str(value) if isinstance(value, Path) else value for key, value in vars(args).items()
            },
            "memory_metric": memory_metric,
            "results": [asdict(r) for r in results],
            "summary": summary,
        }
        args.json.write_text(json.dumps(payload, indent=2))
    if args.plot:
        plot(
            results,
            args.plot,
            f"MoE layer fwd+bwd vs dense FFN (d={args.hidden}, F={args.expert_width}, "
            f"k={args.top_k}, {args.dtype}, {where})",
        )


if __name__ == "__main__":
    main()
