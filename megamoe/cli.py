"""The `megamoe` command line."""

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from . import __version__


def output_directory(value: str) -> str:
    """argparse type: a directory to write into (it may exist), not an existing file."""
    if Path(value).is_file():
        raise argparse.ArgumentTypeError(f"{value} is a file; give a directory to write into")
    return value


def at_least(kind: type[int] | type[float], minimum: int) -> Callable[[str], int | float]:
    """argparse type: a number of ``kind`` that is >= ``minimum``."""

    def parse(value: str) -> int | float:
        try:
            number = kind(value)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{value!r} is not {'an integer' if kind is int else 'a number'}"
            ) from None
        if not number >= minimum:  # NaN fails too
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return number

    return parse


def describe(args: argparse.Namespace) -> int:
    """Print the architecture and parameter counts of a MegaMoE config or model directory / Hub id."""
    import torch
    from transformers import AutoConfig

    from .model import MegaMoEConfig, MegaMoEForMultiTask
    from .sources.builtin_models import resolve_model_source

    try:
        config = AutoConfig.from_pretrained(resolve_model_source(args.model))
    except (OSError, ValueError) as err:
        print(f"error: cannot read a MegaMoE config from {args.model!r}: {err}", file=sys.stderr)
        return 2
    if not isinstance(config, MegaMoEConfig):
        print(f"error: {args.model!r} holds a {config.model_type!r} config, not 'megamoe'", file=sys.stderr)
        return 2
    with torch.device("meta"):
        model = MegaMoEForMultiTask(config)
    moe_layers = config.moe_layers()
    total, active = model.num_parameters(), model.num_active_parameters()
    if config.backbone is not None:
        print(f"backbone          HF {config.backbone['model_type']} (its own attention, router and experts)")
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


def restart_cpu_training_with_caching_allocator() -> None:
    """On a machine without CUDA, restart under tcmalloc/jemalloc (megamoe.engine.host_memory says why)."""
    import torch

    from .engine.host_memory import restart_with_caching_allocator

    if not torch.cuda.is_available():
        restart_with_caching_allocator()


def train(args: argparse.Namespace) -> int:
    """Train a multi-task MegaMoE from a YAML run config (under the deepspeed launcher or as one process)."""
    from .engine.host_memory import enable_transparent_huge_pages

    enable_transparent_huge_pages()  # before any tensor exists
    import torch.distributed as dist

    from .checkpoint.resume import CheckpointError
    from .config import ConfigError, load_config
    from .data.text_files import DataError
    from .data.tokenization import LabelError
    from .engine.deepspeed_engine import TopologyError
    from .engine.trainer import TrainingDivergedError
    from .train import run

    try:
        config = load_config(args.config, args.overrides)
        resume = config.run_dir if args.resume is True else args.resume
        result = run(config, resume=resume)
    except (ConfigError, TopologyError) as err:
        # Every rank on a node reads the same config and run_dir filesystem, so every one raises it: said once
        # per node (the launcher would interleave its ranks' copies on one line). LOCAL_RANK is set by the
        # launcher before any process group exists.
        if int(os.environ.get("LOCAL_RANK", "0")) == 0:
            print(f"error: {err}", file=sys.stderr)
        return 2
    except (CheckpointError, DataError, LabelError) as err:  # may differ per rank (its own shard, its files)
        print(f"error: {err}", file=sys.stderr)
        return 2
    except TrainingDivergedError as err:
        # Raised on every rank (the skips are the same everywhere): said once.
        if not dist.is_initialized() or dist.get_rank() == 0:
            print(f"error: {err}", file=sys.stderr)
        return 1
    rank = dist.get_rank() if dist.is_initialized() else 0
    if dist.is_initialized():
        dist.destroy_process_group()  # exiting with live gloo / NCCL threads can abort the process
    if rank == 0:
        print(f"run directory: {result.run_dir}")
    return 0


def export(args: argparse.Namespace) -> int:
    """Gather a DeepSpeed checkpoint's shards (every EP rank's experts) into one HF model directory."""
    from .checkpoint.export import export_checkpoint
    from .checkpoint.resume import CheckpointError

    try:
        out = export_checkpoint(args.checkpoint, args.out_dir, max_shard_size=args.max_shard_size)
    except CheckpointError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except FileNotFoundError as err:
        print(f"error: the checkpoint is incomplete: {err.filename} is missing", file=sys.stderr)
        return 2
    print(f"exported to {out} (load with AutoModel.from_pretrained(..., trust_remote_code=True))")
    return 0


def upcycle(args: argparse.Namespace) -> int:
    """Turn a dense BERT-family checkpoint into a MegaMoE checkpoint (sparse upcycling): embeddings, attention
    and norms copied, every MoE layer's experts initialized from the dense FFN (whole copies, or with
    --granularity G its G slices), the router small; the tokenizer travels along. With --noise-std 0 the result
    computes exactly what the dense model does."""
    from transformers import AutoTokenizer

    from .sources.builtin_models import resolve_model_source
    from .sources.upcycle import dense_ffn_width, upcycle_pretrained

    try:
        source = resolve_model_source(args.source)
        dense_width = dense_ffn_width(source)
        width, leftover = divmod(dense_width, args.granularity)
        if leftover:
            raise ValueError(
                f"--granularity {args.granularity} does not divide the dense FFN's width {dense_width}"
            )
        model = upcycle_pretrained(
            source,
            tasks={},
            expert_noise_std=args.noise_std,
            seed=args.seed,
            num_experts=args.num_experts,
            num_experts_per_tok=args.top_k,
            moe_layer_freq=args.moe_layer_freq,
            moe_intermediate_size=width,
        )
    except (OSError, ValueError, KeyError) as err:
        print(f"error: cannot upcycle {args.source!r}: {err}", file=sys.stderr)
        return 2
    model.save_pretrained(args.out)
    AutoTokenizer.from_pretrained(source).save_pretrained(args.out)
    total, active = model.num_parameters(), model.num_active_parameters()
    layout = (
        f"{args.num_experts} experts, top-{args.top_k}"
        if model.config.moe_layers()
        else "dense (no MoE layer)"
    )
    print(
        f"upcycled {args.source} into {args.out}: {layout}, "
        f"{total:,} parameters ({active:,} active per token). Train it with model.init: pretrained, "
        f"model.base: {args.out} (task heads are added then)."
    )
    return 0


def predict(args: argparse.Namespace) -> int:
    """Predict with a trained model (a directory or Hub repo id): one JSON line per text and task — label and
    probabilities for classification, entity spans (word and character offsets, type, score) for NER."""
    import json

    from tqdm.auto import tqdm

    from .data.text_files import DataError, json_lines
    from .predict import MultiTaskPredictor

    if bool(args.texts) == bool(args.file):
        print("error: give texts as arguments or --file F.jsonl (one of them)", file=sys.stderr)
        return 2
    texts = list(args.texts)
    if args.file:
        try:
            rows = list(json_lines(Path(args.file)))
        except (OSError, DataError) as err:
            print(f"error: {err} (--file takes JSON lines with a {args.text_key!r} field)", file=sys.stderr)
            return 2
        texts = []
        for number, row in rows:
            text = row.get(args.text_key) if isinstance(row, dict) else None
            if not isinstance(text, str):
                print(f"error: {args.file}:{number}: no {args.text_key!r} string in {row!r}", file=sys.stderr)
                return 2
            texts.append(text)
        if not texts:
            print(f"note: {args.file} has no texts; nothing to predict", file=sys.stderr)
    try:
        predictor = MultiTaskPredictor.from_pretrained(args.model, batch_size=args.batch_size)
    except (OSError, ValueError) as err:
        print(f"error: cannot load a MegaMoE model from {args.model!r}: {err}", file=sys.stderr)
        return 2
    try:
        tasks_per_text = len(predictor.resolve_tasks(args.task, args.all_tasks))
    except ValueError as err:
        print(f"error: {err} (use --task NAME or --all-tasks)", file=sys.stderr)
        return 2
    with tqdm(total=len(texts), desc="predict", unit="text", disable=len(texts) < 256) as progress:
        for batch in predictor.batches(texts, args.task, all_tasks=args.all_tasks):
            for result in batch:
                print(json.dumps(result, ensure_ascii=False))
            progress.update(len(batch) // tasks_per_text)
    return 0


def evaluate(args: argparse.Namespace) -> int:
    """Score a trained model's task head on a labelled dataset from anywhere (another domain's texts of the
    task, a Hub dataset, a local file) with the metrics training reports; prints one JSON object."""
    import json

    from .data.text_files import DataError
    from .data.tokenization import LabelError
    from .evaluate import evaluate_model

    columns = {
        name: value
        for name in ("text_column", "label_column", "tokens_column", "tags_column")
        if (value := getattr(args, name)) is not None
    }
    try:
        report = evaluate_model(
            args.model,
            args.task,
            args.source,
            split=args.split,
            max_length=args.max_length,
            max_examples=args.max_examples,
            batch_size=args.batch_size,
            columns=columns,
            show_progress=True,
        )
    except (OSError, ValueError, DataError, LabelError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(json.dumps({"model": args.model, **vars(report)}))
    return 0


def push(args: argparse.Namespace) -> int:
    """Upload a model directory (weights, config, tokenizer, remote code) to the Hugging Face Hub, with a
    generated model card (README.md with metadata, metrics, expert-utilization plot).

    The token comes from HF_TOKEN or `hf auth login`; it is never printed.
    """
    from huggingface_hub.errors import HfHubHTTPError

    from .checkpoint.hub import HubAuthError, HubUnreachableError, push_to_hub

    try:
        result = push_to_hub(
            args.model_dir,
            args.repo_id,
            private=True if args.private else None,
            revision=args.revision,
            create_pr=args.create_pr,
            base_model=args.base_model,
        )
    except (FileNotFoundError, HubAuthError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except HubUnreachableError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except HfHubHTTPError as err:
        print(f"error: the Hub refused the push to {args.repo_id}: {err}", file=sys.stderr)
        return 1
    if result.private_ignored:
        visibility = {True: "private", False: "public", None: "unchanged"}[result.repo_private]
        print(
            f"note: {result.repo_id} already existed, so --private was ignored: the Hub keeps an existing "
            f"repo's visibility (it stays {visibility}); change it in the repo's settings on the Hub"
        )
    if not result.changed:
        what = "no pull request was opened" if args.create_pr else "no commit was made"
        print(f"note: every file was already on the Hub at {result.revision}; {what}")
    print(f"{'opened pull request' if result.pr_url else 'pushed to'} {result.url}")
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
    export_parser.add_argument("out_dir", type=output_directory, help="the HF model directory to write")
    export_parser.add_argument(
        "--max-shard-size",
        default="5GB",
        help="split the weights into safetensors shards of at most this size, with HF's index file (default 5GB)",
    )
    export_parser.set_defaults(handler=export)

    upcycle_parser = commands.add_parser(
        "upcycle", help="dense BERT-family checkpoint -> MegaMoE checkpoint", description=upcycle.__doc__
    )
    upcycle_parser.add_argument(
        "source",
        help="a Hub id or local directory of a BERT, RoBERTa (XLM-R, CamemBERT) or DistilBERT model, or "
        "builtin:all-MiniLM-L6-v2 (offline)",
    )
    upcycle_parser.add_argument(
        "out", type=output_directory, help="the MegaMoE checkpoint directory to write"
    )
    upcycle_parser.add_argument(
        "--num-experts", type=int, default=8, help="experts per MoE layer (default 8)"
    )
    upcycle_parser.add_argument("--top-k", type=int, default=2, help="experts per token (default 2)")
    upcycle_parser.add_argument(
        "--moe-layer-freq", type=int, default=1, help="every n-th layer becomes MoE (default 1: all)"
    )
    upcycle_parser.add_argument(
        "--granularity",
        type=at_least(int, 1),
        default=1,
        help="slices of the dense FFN per expert copy (default 1: whole copies); G makes each expert 1/G as "
        "wide, and top-k = G costs the dense FFN's FLOPs (granular upcycling)",
    )
    upcycle_parser.add_argument(
        "--noise-std",
        type=at_least(float, 0),
        default=0.0,
        help="relative noise on each expert copy to break symmetry (default 0: exact copies)",
    )
    upcycle_parser.add_argument("--seed", type=int, default=0, help="seeds the noise and the router init")
    upcycle_parser.set_defaults(handler=upcycle)

    predict_parser = commands.add_parser(
        "predict",
        help="labels / entity spans from a trained model, as JSON lines",
        description=predict.__doc__,
    )
    predict_parser.add_argument("model", help="a model directory (e.g. <run_dir>/model) or a Hub repo id")
    predict_parser.add_argument("texts", nargs="*", help="texts to predict (or --file)")
    which = predict_parser.add_mutually_exclusive_group()
    which.add_argument("--task", help="the task head to run (default: the model's only task)")
    which.add_argument("--all-tasks", action="store_true", help="run every task head on every text")
    predict_parser.add_argument("--file", help="JSON lines with one text per line")
    predict_parser.add_argument(
        "--text-key", default="text", help="the text field of --file lines (default: text)"
    )
    predict_parser.add_argument(
        "--batch-size", type=at_least(int, 1), default=32, help="texts per forward pass (default 32)"
    )
    predict_parser.set_defaults(handler=predict)

    evaluate_parser = commands.add_parser(
        "evaluate",
        help="a trained model's task on a labelled dataset from anywhere, with the training metrics",
        description=evaluate.__doc__,
    )
    evaluate_parser.add_argument("model", help="a model directory (e.g. <run_dir>/model) or a Hub repo id")
    evaluate_parser.add_argument(
        "source",
        help="builtin:<name>, a local file or directory, or a Hub dataset name (as in tasks.*.source)",
    )
    evaluate_parser.add_argument("--task", required=True, help="the task head to score")
    evaluate_parser.add_argument(
        "--split", choices=("train", "validation", "test", "all"), default="test", help="default: test"
    )
    evaluate_parser.add_argument(
        "--max-length",
        type=at_least(int, 1),
        help="truncation in tokens (default: the model's longest; give the training length to score as it did)",
    )
    evaluate_parser.add_argument(
        "--max-examples", type=at_least(int, 1), help="the first N examples of the split only"
    )
    evaluate_parser.add_argument(
        "--batch-size", type=at_least(int, 1), default=64, help="examples per forward pass (default 64)"
    )
    for column in ("text", "label", "tokens", "tags"):
        evaluate_parser.add_argument(
            f"--{column}-column", help=f"the source's {column} column (default: {column})"
        )
    evaluate_parser.set_defaults(handler=evaluate)

    push_parser = commands.add_parser(
        "push", help="model directory -> Hugging Face Hub repo, with a model card", description=push.__doc__
    )
    push_parser.add_argument("model_dir", help="an exported model directory, e.g. <run_dir>/model")
    push_parser.add_argument("repo_id", help="namespace/name (a bare name goes to the token's owner)")
    push_parser.add_argument(
        "--private", action="store_true", help="create the repo private (ignored if it already exists)"
    )
    push_parser.add_argument("--revision", metavar="BRANCH", help="commit to this branch (created from main)")
    push_parser.add_argument(
        "--create-pr", action="store_true", help="open a pull request against main instead of committing"
    )
    push_parser.add_argument(
        "--base-model",
        help="Hub id for the card's base_model (default: from the run config's model.base when known)",
    )
    push_parser.set_defaults(handler=push)

    data_parser = commands.add_parser(
        "data", help="builtin datasets", description="Work with the builtin datasets."
    )
    data_commands = data_parser.add_subparsers(dest="data_command", required=True, metavar="COMMAND")
    prepare_parser = data_commands.add_parser(
        "prepare", help=data_prepare.__doc__, description=data_prepare.__doc__
    )
    prepare_parser.add_argument("names", nargs="*", help="datasets to prepare (default: all)")
    prepare_parser.add_argument(
        "--cache-dir", type=output_directory, help="default: $MEGAMOE_CACHE or ~/.cache/megamoe"
    )
    prepare_parser.add_argument("--force", action="store_true", help="rebuild even when prepared")
    prepare_parser.set_defaults(handler=data_prepare)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # argparse fills a nargs="*" positional in one go, so `predict MODEL --task ner TEXT ...` leaves the
    # texts after the option unparsed: they are still texts.
    if extra and getattr(args, "texts", None) is not None and not any(e.startswith("-") for e in extra):
        args.texts += extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if argv is None and args.handler is train:
        # Only a process that is `megamoe train` itself (not a caller of main) may re-execute its command line.
        try:
            restart_cpu_training_with_caching_allocator()
        except ValueError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
