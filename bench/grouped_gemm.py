"""Benchmark: the six GEMMs of one gated MoE layer's forward+backward, grouped per expert vs dense.

For E experts, T tokens, top-k, hidden d and expert width F, the MoE layer runs over N = T*k expert-sorted rows
six grouped GEMMs (``torch.nn.functional.grouped_mm``, what ``megamoe.model.moe_experts.grouped_linear`` calls):

    gate_up forward   [N, d] @ W_gu[e].T      -> [N, 2F]     down forward    [N, F] @ W_d[e].T  -> [N, d]
    gate_up dgrad     [N, 2F] @ W_gu[e]       -> [N, d]      down dgrad      [N, d] @ W_d[e]    -> [N, F]
    gate_up wgrad     g[rows e].T @ x[rows e] -> [E, 2F, d]  down wgrad      g[rows e].T @ h    -> [E, d, F]

The dense SwiGLU FFN of width k*F (bench/moe_layer.py's denominator) does the same FLOPs with nine large GEMMs
(gate and up separately). Both sides are timed here, interleaved (each round runs every GEMM once, in an order
that alternates), so the ratio of the sums says how much of the MoE layer's gap to the dense layer the expert
GEMMs alone explain, before routing, dispatch and combine. Group sizes are a multinomial draw (balanced router)
or exactly T*k/E each (``--uniform``).

    python bench/grouped_gemm.py --threads 2 --experts 8 64
"""

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from megamoe.engine.host_memory import (
    ALLOCATOR_CHOICES,
    caching_allocator_in_use,
    enable_transparent_huge_pages,
    restart_with_caching_allocator,
)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--experts", type=int, nargs="+", default=[8, 64], help="numbers of experts E")
    parser.add_argument("--tokens", type=int, default=4096, help="tokens T")
    parser.add_argument("--hidden", type=int, default=256, help="hidden size d")
    parser.add_argument("--expert-width", type=int, default=512, help="expert intermediate size F")
    parser.add_argument("--top-k", type=int, default=2, help="experts per token k")
    parser.add_argument("--rounds", type=int, default=15, help="timed rounds (median reported)")
    parser.add_argument(
        "--uniform", action="store_true", help="T*k/E rows per expert instead of a random draw"
    )
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument(
        "--allocator",
        choices=ALLOCATOR_CHOICES,
        default="auto",
        help="CPU malloc: restart under tcmalloc / jemalloc as `megamoe train` does (system: glibc's)",
    )
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args()


def median_ms(gemms: dict[str, Callable[[], torch.Tensor]], rounds: int) -> dict[str, float]:
    """Median wall time of every GEMM over ``rounds`` rounds, each round running all of them (order alternating)."""
    for gemm in gemms.values():
        gemm()
    times: dict[str, list[float]] = {name: [] for name in gemms}
    for round_index in range(rounds):
        order = list(gemms) if round_index % 2 == 0 else list(reversed(gemms))
        for name in order:
            start = time.perf_counter()
            gemms[name]()
            times[name].append((time.perf_counter() - start) * 1e3)
    return {name: statistics.median(values) for name, values in times.items()}


def grouped_gemms(args: argparse.Namespace, experts: int) -> dict[str, Callable[[], torch.Tensor]]:
    rows, d, f = args.tokens * args.top_k, args.hidden, args.expert_width
    if args.uniform:
        if rows % experts:
            raise SystemExit(f"error: --uniform needs T*k = {rows} divisible by E = {experts}")
        sizes = torch.full((experts,), rows // experts)
    else:
        sizes = torch.multinomial(torch.ones(experts), rows, replacement=True).bincount(minlength=experts)
    offsets = sizes.cumsum(0).to(torch.int32)
    x, h = torch.randn(rows, d), torch.randn(rows, f)
    grad_gate_up, grad_out = torch.randn(rows, 2 * f), torch.randn(rows, d)
    gate_up, down = torch.randn(experts, 2 * f, d), torch.randn(experts, d, f)
    return {
        "gate_up forward": lambda: F.grouped_mm(x, gate_up.transpose(-2, -1), offs=offsets),
        "down forward": lambda: F.grouped_mm(h, down.transpose(-2, -1), offs=offsets),
        "down dgrad": lambda: F.grouped_mm(grad_out, down, offs=offsets),
        "down wgrad": lambda: F.grouped_mm(grad_out.t(), h, offs=offsets),
        "gate_up dgrad": lambda: F.grouped_mm(grad_gate_up, gate_up, offs=offsets),
        "gate_up wgrad": lambda: F.grouped_mm(grad_gate_up.t(), x, offs=offsets),
    }


def dense_gemms(args: argparse.Namespace) -> dict[str, Callable[[], torch.Tensor]]:
    """The dense FFN's GEMMs under the same six names: gate and up are two GEMMs each (nn.Linear per projection)."""
    tokens, d, width = args.tokens, args.hidden, args.top_k * args.expert_width
    x, h, grad_h, grad_out = (torch.randn(tokens, d), torch.randn(tokens, width), torch.randn(tokens, width),
                              torch.randn(tokens, d))  # fmt: skip
    gate, up, down = torch.randn(width, d), torch.randn(width, d), torch.randn(d, width)
    return {
        "gate_up forward": lambda: (x @ gate.t(), x @ up.t())[1],
        "down forward": lambda: h @ down.t(),
        "down dgrad": lambda: grad_out @ down,
        "down wgrad": lambda: grad_out.t() @ h,
        "gate_up dgrad": lambda: (grad_h @ gate, grad_h @ up)[1],
        "gate_up wgrad": lambda: (grad_h.t() @ x, grad_h.t() @ x)[1],
    }


def main() -> None:
    args = parse_args()
    try:
        restart_with_caching_allocator(args.allocator)  # the same command line again, the allocator preloaded
    except ValueError as err:
        raise SystemExit(f"error: {err}") from None
    enable_transparent_huge_pages()  # before any tensor, like `megamoe train`
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, malloc {caching_allocator_in_use() or 'glibc'}; "
        f"T={args.tokens} k={args.top_k} d={args.hidden} F={args.expert_width}; median of {args.rounds} rounds"
    )
    for experts in args.experts:
        grouped, dense = grouped_gemms(args, experts), dense_gemms(args)
        times = median_ms({**{f"moe {k}": v for k, v in grouped.items()}, **dense}, args.rounds)
        rows = args.tokens * args.top_k / experts
        print(f"\nE={experts} (~{rows:.0f} rows per expert)   grouped ms   dense ms   ratio")
        for name in grouped:
            print(
                f"  {name:<16} {times[f'moe {name}']:>10.1f} {times[name]:>10.1f} {times[f'moe {name}'] / times[name]:>7.2f}"
            )
        grouped_sum, dense_sum = sum(times[f"moe {n}"] for n in grouped), sum(times[n] for n in dense)
        print(f"  {'all six':<16} {grouped_sum:>10.1f} {dense_sum:>10.1f} {grouped_sum / dense_sum:>7.2f}")


if __name__ == "__main__":
    main()
