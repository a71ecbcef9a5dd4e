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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="megamoe",
        description="Train sparse Mixture-of-Experts transformers on several NLP tasks at once.",
    )
    parser.add_argument("--version", action="version", version=f"megamoe {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    describe_parser = commands.add_parser(
        "describe", help="architecture and total / active parameters of a model", description=describe.__doc__
    )
    describe_parser.add_argument(
        "model", help="a model directory, a config.json's directory, or a Hub repo id"
    )
    describe_parser.set_defaults(handler=describe)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
