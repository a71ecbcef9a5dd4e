"""The `megamoe` command line."""

import argparse
import sys
from collections.abc import Sequence

from . import __version__


def describe(args: argparse.Namespace) -> int:
    """Print the architecture and parameter counts of a MegaMoE config or model directory / Hub id."""
    import torch
    from transformers import AutoConfig

    from .model import MegaMoEConfig, MegaMoEForMultiTask

    try:
        config = AutoConfig.from_pretrained(args.model)
    except (OSError, ValueError) as err:
        print(f"error: cannot read a MegaMoE config from {args.model!r}: {err}", file=sys.stderr)
        return 2
    if not isinstance(config, MegaMoEConfig):
        print(f"error: {args.model!r} holds a {config.model_type!r} config, not 'megamoe'", file=sys.stderr)
        return 2
    with torch.device("meta"):
        model = MegaMoEForMultiTask(config)
    moe_layers = [i for i in range(config.num_hidden_layers) if config.is_moe_layer(i)]
    total, active = model.num_parameters(), model.num_active_parameters()
    print(f"layers            {config.num_hidden_layers} (MoE: {moe_layers or 'none, dense'})")
    print(f"hidden / heads    {config.hidden_size} / {config.num_attention_heads}")
    if moe_layers:
        capacity = (
            "dropless" if config.capacity_factor is None else f"capacity factor {config.capacity_factor}"
        )
        print(
            f"experts           {config.num_experts} x {config.moe_intermediate_size}, top-{config.num_experts_per_tok}, {capacity}"
        )
    tasks = ", ".join(f"{name} ({spec['type']})" for name, spec in sorted(config.tasks.items()))
    print(f"tasks             {tasks or 'none'}")
    print(f"parameters        {total:,} total, {active:,} active per token ({active / total:.1%})")
    return 0


def train(args: argparse.Namespace) -> int:
    """Train a multi-task MegaMoE from a YAML run config (under the deepspeed launcher or as one process)."""
    from .checkpoint.resume import CheckpointError
    from .config import ConfigError, load_config
    from .engine.deepspeed_engine import TopologyError
    from .train import run

    try:
        config = load_config(args.config, args.overrides)
        resume = config.run_dir if args.resume is True else args.resume
        result = run(config, resume=resume)
    except (ConfigError, TopologyError, CheckpointError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"run directory: {result.run_dir}")
    return 0


def export(args: argparse.Namespace) -> int:
    """Gather a DeepSpeed checkpoint's shards (every EP rank's experts) into one HF model directory."""
    from .checkpoint.export import export_checkpoint
    from .checkpoint.resume import CheckpointError

    try:
        out = export_checkpoint(args.checkpoint, args.out_dir)
    except CheckpointError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"exported to {out} (load with AutoModel.from_pretrained(..., trust_remote_code=True))")
    return 0


def data_prepare(args: argparse.Namespace) -> int:
    """Download, parse and split the builtin offline datasets into the cache (idempotent)."""
    from .data.builtin import BUILTIN_DATASETS, load_builtin, prepare_builtin

    unknown = sorted(set(args.names) - set(BUILTIN_DATASETS))
    if unknown:
        print(
            f"error: unknown builtin dataset(s) {unknown}; builtin datasets: {sorted(BUILTIN_DATASETS)}",
            file=sys.stderr,
        )
        return 2
    paths = prepare_builtin(args.names or None, cache_dir=args.cache_dir, force=args.force)
    for name, path in paths.items():
        sizes = {split: len(ds) for split, ds in load_builtin(name, args.cache_dir).items()}
        print(f"{name:16s} {sizes}  {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="megamoe",
        description="Train sparse Mixture-of-Experts transformers on several NLP tasks at once.",
    )
    parser.add_argument("--version", action="version", version=f"megamoe {__version__}")
    # `deepspeed --module megamoe ...` inserts --local_rank=N before the command; ranks come from the environment.
    parser.add_argument("--local_rank", type=int, help=argparse.SUPPRESS)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    describe_parser = commands.add_parser(
        "describe", help="architecture and total / active parameters of a model", description=describe.__doc__
    )
    describe_parser.add_argument(
        "model", help="a model directory, a config.json's directory, or a Hub repo id"
    )
    describe_parser.set_defaults(handler=describe)

    train_parser = commands.add_parser(
        "train", help="train from a YAML run config", description=train.__doc__
    )
    train_parser.add_argument("config", help="the run config (YAML)")
    train_parser.add_argument(
        "overrides", nargs="*", help="dotted overrides, e.g. train.lr=3e-4 data.max_length=64"
    )
    train_parser.add_argument(
        "--resume",
        nargs="?",
        const=True,
        default=None,
        metavar="PATH",
        help="continue from the latest checkpoint of the run directory, or from PATH (a run directory, "
        "its checkpoints/ or a step_<n> directory); a missing checkpoint is an error",
    )
    train_parser.set_defaults(handler=train)

    export_parser = commands.add_parser(
        "export", help="checkpoint -> HF model directory (experts gathered)", description=export.__doc__
    )
    export_parser.add_argument(
        "checkpoint",
        help="a run directory (its latest checkpoint), its checkpoints/, or a step_<n> directory",
    )
    export_parser.add_argument("out_dir", help="the HF model directory to write")
    export_parser.set_defaults(handler=export)

    data_parser = commands.add_parser(
        "data", help="builtin datasets", description="Work with the builtin datasets."
    )
    data_commands = data_parser.add_subparsers(dest="data_command", required=True, metavar="COMMAND")
    prepare_parser = data_commands.add_parser(
        "prepare", help=data_prepare.__doc__, description=data_prepare.__doc__
    )
    prepare_parser.add_argument("names", nargs="*", help="datasets to prepare (default: all)")
    prepare_parser.add_argument("--cache-dir", help="default: $MEGAMOE_CACHE or ~/.cache/megamoe")
    prepare_parser.add_argument("--force", action="store_true", help="rebuild even when prepared")
    prepare_parser.set_defaults(handler=data_prepare)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
