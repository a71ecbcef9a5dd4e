"""The model card of a MegaMoE release: README.md with Hub metadata, plus a plot of expert utilization.

The metadata (license, base model, tags, datasets, ``model-index`` eval results) is built with
huggingface_hub's `ModelCardData` / `EvalResult`; the body is a Jinja template filled from the model's
config, the run's ``metrics.json`` and ``expert_utilization.json``, and the training config.

Where the numbers come from: ``model_dir`` is what ``megamoe train`` writes as ``<run_dir>/model``, so by
default the run directory is ``model_dir.parent`` and ``metrics.json`` / ``expert_utilization.json`` /
``config.yaml`` are read from there when present (pass ``run_dir`` to read them elsewhere). A model
directory that is not inside a run directory still gets a card, without those sections.
"""

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from huggingface_hub import EvalResult, ModelCard, ModelCardData

from ..model import MegaMoEConfig, MegaMoEForMultiTask
from ..run_dir import RunDir

PLOT_FILENAME = "expert_utilization.png"
"""The resolved run config in a run directory, read as ``training_config`` when none is passed."""

_HF_TASK = {
    "sequence_classification": ("text-classification", "Text Classification"),
    "token_classification": ("token-classification", "Token Classification"),
    "sequence_regression": ("text-classification", "Text Regression"),
}
# Our metric names → the Hub's metric ids (https://hf.co/metrics), with metric args where they matter.
_METRIC_TYPE: dict[str, tuple[str, dict[str, Any] | None]] = {
    "accuracy": ("accuracy", None),
    "macro_f1": ("f1", {"average": "macro"}),
    "f1": ("f1", None),
    "precision": ("precision", None),
    "recall": ("recall", None),
    "mae": ("mae", None),
    "pearson": ("pearsonr", None),
}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")

_TEMPLATE = """---
{{ card_data }}
---

# {{ title }}

{{ summary }}

## Tasks

{{ tasks_table }}

## Architecture

{{ architecture_table }}

## Evaluation

{{ evaluation }}

## Expert utilization

{{ utilization }}

## How to use

The modeling code ships with the weights, so `megamoe` does not need to be installed:

```python
import torch
from transformers import AutoModel, AutoTokenizer

repo = "{{ repo_id }}"
# trust_remote_code also for the tokenizer: AutoTokenizer reads the config, which names remote code.
tokenizer = AutoTokenizer.from_pretrained(repo, trust_remote_code=True)
model = AutoModel.from_pretrained(repo, trust_remote_code=True).eval()

batch = tokenizer({{ example_texts }}, padding=True, return_tensors="pt")
with torch.no_grad():
    out = model(**batch, task="{{ example_task }}")  # one of: {{ task_names }}
{{ example_decode }}
```

`out.router_stats` holds, per MoE layer, the tokens each expert received.

## Training configuration

{{ training }}
"""


@dataclass
class RunArtifacts:
    """What a run directory holds next to the model: metrics, expert utilization, the run config."""

    metrics: dict[str, dict[str, dict[str, float]]] | None = None
    """``{task: {split: {metric: value}}}`` (``metrics.json``)."""
    utilization: dict[str, Any] | None = None
    """``{"fractions": {task: {layer: [fraction per expert]}}, "imbalance": {task: {layer: max/mean}}}``."""
    training_config: dict[str, Any] | None = None


def read_run_artifacts(run_dir: str | Path) -> RunArtifacts:
    """``metrics.json``, ``expert_utilization.json`` and ``config.yaml`` of ``run_dir``, each None when absent."""
    paths = RunDir(Path(run_dir))

    def read(path: Path, parse: Any) -> Any:
        return parse(path.read_text(encoding="utf-8")) if path.is_file() else None

    return RunArtifacts(
        metrics=read(paths.metrics, json.loads),
        utilization=read(paths.expert_utilization, json.loads),
        training_config=read(paths.run_config, yaml.safe_load),
    )


def build_model_card(
    model_dir: str | Path,
    *,
    repo_id: str | None = None,
    base_model: str | None = None,
    datasets: Mapping[str, str] | None = None,
    training_config: Mapping[str, Any] | None = None,
    license: str = "apache-2.0",
    run_dir: str | Path | None = None,
    out_dir: str | Path | None = None,
) -> ModelCard:
    """The model card of the MegaMoE model in ``model_dir``; its plot is written to ``out_dir``.

    Args:
        model_dir: An HF directory written by ``MegaMoEForMultiTask.save_pretrained`` (config.json is read;
            the weights are not loaded).
        repo_id: The Hub repo the card is for (title and usage snippet); default: the run directory's name.
        base_model: Hub id of the checkpoint the model was fine-tuned / upcycled from. Default: the Hub id of
            ``training_config["model"]["base"]`` (a ``builtin:`` model's published id; None for a local path).
        datasets: Task name → dataset (Hub id, ``builtin:<name>`` or a path). Default: each task's ``source``
            in ``training_config``. Only Hub ids go into the ``datasets`` metadata.
        training_config: The run config (a plain mapping, shown as YAML). Default: ``<run_dir>/config.yaml``.
        license: License id for the metadata.
        run_dir: Where ``metrics.json`` / ``expert_utilization.json`` live; default ``model_dir``'s parent.
        out_dir: Where the card will be saved; ``expert_utilization.png`` is written there and linked
            relatively. Default: ``model_dir``.

    Returns:
        A `huggingface_hub.ModelCard`; ``card.save(out_dir / "README.md")`` writes it.
    """
    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"{model_dir} is not a model directory: it has no config.json")
    config = MegaMoEConfig.from_pretrained(model_dir)
    run = read_run_artifacts(Path(run_dir) if run_dir is not None else model_dir.parent)
    if training_config is None:
        training_config = run.training_config
    out_dir = Path(out_dir) if out_dir is not None else model_dir
    repo_id = repo_id or (model_dir.parent.name if model_dir.name == "model" else model_dir.name)
    model_name = repo_id.split("/")[-1]

    sources = dict(datasets) if datasets is not None else _task_sources(training_config)
    if base_model is None:
        base_model = _base_model_id((training_config or {}).get("model", {}).get("base"))

    eval_results = _eval_results(config, run.metrics, sources, model_name)
    task_tags = sorted({_HF_TASK[spec["type"]][0] for spec in config.tasks.values()})
    card_data = ModelCardData(
        license=license,
        library_name="transformers",
        base_model=base_model,
        datasets=sorted({s for s in sources.values() if _looks_like_hub_id(s)}) or None,
        tags=["megamoe", "mixture-of-experts", "moe", "multi-task", *task_tags, *sorted(config.tasks)],
        model_name=model_name,
        eval_results=eval_results or None,
    )

    out_dir.mkdir(parents=True, exist_ok=True)
    example_task = _example_task(config)
    return ModelCard.from_template(
        card_data,
        template_str=_TEMPLATE,
        title=model_name,
        repo_id=repo_id,
        summary=_summary(config, base_model),
        tasks_table=_tasks_table(config, sources),
        architecture_table=_architecture_table(config, model_dir),
        evaluation=_evaluation(run.metrics),
        utilization=_utilization_section(run.utilization, config, out_dir / PLOT_FILENAME),
        training=_training_section(training_config),
        task_names=", ".join(f'"{t}"' for t in config.task_names),
        example_task=example_task,
        example_texts=json.dumps(["Apple opened a new office in Paris.", "What a wonderful film!"]),
        example_decode=_example_decode(config, example_task),
    )


def save_model_card(model_dir: str | Path, out_dir: str | Path | None = None, **kwargs: Any) -> Path:
    """Write ``README.md`` (and ``expert_utilization.png``) for ``model_dir`` into ``out_dir`` (default:
    ``model_dir``); keyword arguments go to `build_model_card`. Returns the README path."""
    out_dir = Path(out_dir) if out_dir is not None else Path(model_dir)
    card = build_model_card(model_dir, out_dir=out_dir, **kwargs)
    path = out_dir / "README.md"
    card.save(path)
    return path


# -- metadata ---------------------------------------------------------------------------------------------


def _looks_like_hub_id(name: str) -> bool:
    return bool(_HUB_ID.match(name)) and not Path(name).exists()


def _base_model_id(base: Any) -> str | None:
    """The Hub id of the run's ``model.base``: a builtin model's published id, a Hub id as is, else None."""
    if not isinstance(base, str):
        return None
    from ..sources.builtin_models import (
        base_model_id,  # imports the dataset machinery: only when a base is named
    )

    try:
        base = base_model_id(base)
    except ValueError:  # an unknown builtin: name nothing rather than fail the card
        return None
    return base if _looks_like_hub_id(base) else None


def _task_sources(training_config: Mapping[str, Any] | None) -> dict[str, str]:
    tasks = (training_config or {}).get("tasks") or {}
    return {
        name: spec["source"]
        for name, spec in tasks.items()
        if isinstance(spec, Mapping) and isinstance(spec.get("source"), str)
    }


def _eval_split(splits: Mapping[str, Any]) -> str | None:
    return next((split for split in ("test", "validation") if split in splits), None)


def _eval_results(
    config: MegaMoEConfig,
    metrics: Mapping[str, Mapping[str, Mapping[str, float]]] | None,
    sources: Mapping[str, str],
    model_name: str,
) -> list[EvalResult]:
    """One `EvalResult` per task and metric, from the test split (validation when there is no test split).

    Per-entity F1s (``f1_<TYPE>``) stay in the card's table. The Hub groups results by (task type,
    dataset, config, split): two tasks with the same type and dataset are told apart by ``dataset_config``.
    """
    results: list[EvalResult] = []
    if not metrics:
        return results
    datasets = {task: sources.get(task, task) for task in metrics}
    for task in sorted(metrics):
        split = _eval_split(metrics[task])
        if split is None or task not in config.tasks:
            continue
        task_type, task_name = _HF_TASK[config.tasks[task]["type"]]
        shared = [
            other
            for other in datasets
            if other in config.tasks
            and datasets[other] == datasets[task]
            and _HF_TASK[config.tasks[other]["type"]][0] == task_type
        ]
        for name, value in metrics[task][split].items():
            if name.startswith("f1_"):
                continue
            metric_type, metric_args = _METRIC_TYPE.get(name, (name, None))
            results.append(
                EvalResult(
                    task_type=task_type,
                    task_name=f"{task_name} ({task})",
                    dataset_type=datasets[task],
                    dataset_name=f"{task}: {sources[task]}" if task in sources else task,
                    dataset_config=task if len(shared) > 1 else None,
                    dataset_split=split,
                    metric_type=metric_type,
                    metric_name=f"{task} {name} ({split})",
                    metric_value=round(float(value), 4),
                    metric_args=metric_args,
                )
            )
    return results


# -- body -------------------------------------------------------------------------------------------------


def _md(text: Any) -> str:
    return str(text).replace("|", r"\|")


def _table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_md(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def _summary(config: MegaMoEConfig, base_model: str | None) -> str:
    moe = config.moe_layers()
    kind = "encoder" if config.backbone is None else f"`{config.backbone['model_type']}` decoder backbone"
    if moe:
        shape = (
            f"a sparse Mixture-of-Experts {kind}: {len(moe)} of its {config.num_hidden_layers} layers route "
            f"each token to {config.num_experts_per_tok} of {config.num_experts} experts"
        )
    else:
        shape = f"a dense {config.num_hidden_layers}-layer encoder (the dense baseline: no MoE layers)"
    origin = f", initialized from [{base_model}](https://huggingface.co/{base_model})" if base_model else ""
    return (
        f"A MegaMoE multi-task model{origin}: {shape}. One backbone is "
        f"shared by {len(config.tasks)} task heads ({', '.join(f'`{t}`' for t in config.task_names)}); "
        "pick the head with `task=` in the forward call."
    )


def _tasks_table(config: MegaMoEConfig, sources: Mapping[str, str]) -> str:
    rows = []
    for task in config.task_names:
        spec = config.tasks[task]
        labels = spec.get("labels") or []
        shown = ", ".join(f"`{label}`" for label in labels) if labels else "(regression: one score)"
        rows.append([f"`{task}`", spec["type"], sources.get(task, "—"), len(labels) or "—", shown])
    return _table(["task", "head", "data", "labels", "label set (id order)"], rows)


def _architecture_table(config: MegaMoEConfig, model_dir: Path) -> str:
    # Parameter counts from the architecture alone: the model is built on the meta device, no weights loaded.
    with torch.device("meta"):
        model = MegaMoEForMultiTask(config)
    total, active = model.num_parameters(), model.num_active_parameters()
    moe = config.moe_layers()
    rows: list[list[Any]] = [
        ["backbone", "MegaMoE" if config.backbone is None else f"HF `{config.backbone['model_type']}`"],
        ["layers", config.num_hidden_layers],
        ["hidden size / attention heads", f"{config.hidden_size} / {config.num_attention_heads}"],
    ]
    if moe:
        capacity = (
            "dropless" if config.capacity_factor is None else f"capacity factor {config.capacity_factor}"
        )
        rows += [
            ["MoE layers", f"{len(moe)} of {config.num_hidden_layers} (layers {', '.join(map(str, moe))})"],
            ["experts per MoE layer", config.num_experts],
            ["experts per token (top-k)", config.num_experts_per_tok],
            ["expert width", config.moe_intermediate_size],
        ]
        if config.backbone is None:  # an HF backbone routes with its own router: none of these apply
            rows += [
                ["shared experts", config.num_shared_experts],
                ["token dropping", capacity],
                ["task-aware routing", "yes" if config.task_aware_routing else "no"],
            ]
    rows += [
        ["total parameters", f"{total:,}"],
        ["active parameters per token", f"{active:,} ({active / total:.0%})"],
    ]
    return _table(["", ""], rows)


def _evaluation(metrics: Mapping[str, Mapping[str, Mapping[str, float]]] | None) -> str:
    if not metrics:
        return "_No `metrics.json` was found next to this model._"
    rows = []
    for task in sorted(metrics):
        for split, values in metrics[task].items():
            rows += [[f"`{task}`", split, name, f"{value:.4f}"] for name, value in values.items()]
    return (
        "Measured by `megamoe train` at the end of training (`metrics.json`); the `model-index` metadata "
        "reports the test split.\n\n" + _table(["task", "split", "metric", "value"], rows)
    )


def _by_layer(per_task: Any) -> list[tuple[int, Any]]:
    """``{layer: value}`` (JSON keys are strings) or ``[value per MoE layer]`` → sorted (layer, value) pairs."""
    if isinstance(per_task, Mapping):
        return sorted((int(layer), value) for layer, value in per_task.items())
    return list(enumerate(per_task))


def _utilization_section(utilization: Mapping[str, Any] | None, config: MegaMoEConfig, plot: Path) -> str:
    fractions = {task: _by_layer(v) for task, v in ((utilization or {}).get("fractions") or {}).items()}
    if not fractions:
        return "_No `expert_utilization.json` was found next to this model._"
    text = (
        "Fraction of each task's (token, expert) assignments that each expert received on the evaluation "
        f"data, per MoE layer; the dashed line is a perfectly balanced 1/{config.num_experts}."
    )
    if _plot_utilization(fractions, plot):
        text += f"\n\n![Expert utilization per task]({plot.name})"
    else:
        text += "\n\n_(The plot was skipped: matplotlib is not installed — `pip install matplotlib`.)_"
    imbalance = {
        task: dict(_by_layer(per_task))
        for task, per_task in ((utilization or {}).get("imbalance") or {}).items()
    }
    if imbalance:
        layers = sorted({layer for per_task in imbalance.values() for layer in per_task})
        rows = [
            [
                f"`{task}`",
                *(f"{imbalance[task][layer]:.2f}" if layer in imbalance[task] else "—" for layer in layers),
            ]
            for task in sorted(imbalance)
        ]
        text += "\n\nLoad imbalance (max / mean expert load; 1.00 is perfectly balanced):\n\n" + _table(
            ["task", *(f"layer {layer}" for layer in layers)], rows
        )
    return text


def _plot_utilization(fractions: Mapping[str, list[tuple[int, list[float]]]], path: Path) -> bool:
    """Grouped bars (one group per expert, one bar per task), one panel per MoE layer. False without matplotlib."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return False
    tasks = sorted(fractions)
    layers = sorted({layer for per_task in fractions.values() for layer, _ in per_task})
    num_experts = max(len(f) for per_task in fractions.values() for _, f in per_task)
    cols = min(3, len(layers))
    rows = math.ceil(len(layers) / cols)
    # Object-oriented matplotlib with the Agg canvas: no pyplot, no global backend switch.
    fig = Figure(figsize=(4.2 * cols, 2.8 * rows + 0.6), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, cols, squeeze=False, sharey=True)
    width = 0.8 / len(tasks)
    for ax, layer in zip(axes.flat, layers, strict=False):
        for i, task in enumerate(tasks):
            values = dict(fractions[task]).get(layer)
            if values is not None:
                xs = [e - 0.4 + width * (i + 0.5) for e in range(len(values))]
                ax.bar(xs, values, width=width, label=task)
        ax.axhline(1 / num_experts, color="black", linestyle="--", linewidth=0.8)
        ax.set_title(f"MoE layer {layer}")
        ax.set_xticks(range(num_experts))
        ax.set_xlabel("expert")
    for ax in axes.flat[len(layers) :]:
        ax.set_visible(False)
    for ax in axes[:, 0]:
        ax.set_ylabel("fraction of assignments")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside upper center", ncols=len(tasks))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return True


def _training_section(training_config: Mapping[str, Any] | None) -> str:
    if not training_config:
        return "_The run configuration was not provided._"
    dumped = yaml.safe_dump(json.loads(json.dumps(training_config, default=str)), sort_keys=False)
    return f"The `megamoe train` run configuration:\n\n```yaml\n{dumped.rstrip()}\n```"


def _example_task(config: MegaMoEConfig) -> str:
    token_tasks = [t for t in config.task_names if config.tasks[t]["type"] == "token_classification"]
    return (token_tasks or config.task_names or ["<task>"])[0]


def _example_decode(config: MegaMoEConfig, task: str) -> str:
    spec = config.tasks.get(task, {})
    if spec.get("type") == "token_classification":
        return (
            f'labels = model.config.tasks["{task}"]["labels"]\n'
            "tags = [[labels[i] for i in row] for row in out.logits.argmax(-1).tolist()]  # one tag per token"
        )
    if spec.get("type") == "sequence_classification":
        return (
            f'labels = model.config.tasks["{task}"]["labels"]\n'
            "predictions = [labels[i] for i in out.logits.argmax(-1).tolist()]"
        )
    return "scores = out.logits.squeeze(-1).tolist()"
