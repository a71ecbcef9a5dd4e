"""Predictions from a trained multi-task model, pipeline style: labels with probabilities, NER entity spans.

    predictor = MultiTaskPredictor.from_pretrained("runs/quickstart/model")   # a directory or a Hub repo id
    predictor(["Rain is expected in London"], task="ner")
    # [{"text": ..., "task": "ner", "entities": [{"type": "geo-loc", "text": "London", "start_word": 4,
    #   "end_word": 5, "start_char": 20, "end_char": 26, "score": 0.93}]}]

NER text is split into words on whitespace (how the builtin WNUT-16 data is tokenized); each word takes the
prediction of its first sub-token, the inverse of the training alignment, and B-/I- runs become spans.
"""

import re
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from seqeval.metrics.sequence_labeling import get_entities
from transformers import AutoConfig, AutoTokenizer, PreTrainedTokenizerBase

from .data.tokenization import word_predictions
from .model import MegaMoEConfig, MegaMoEForMultiTask
from .sources.builtin_models import resolve_model_source

_WORD = re.compile(r"\S+")


def load_trained_model(
    path: str, device: torch.device | None = None
) -> tuple[MegaMoEForMultiTask, PreTrainedTokenizerBase]:
    """The MegaMoE model (on ``device``, default the CPU) and tokenizer of a model directory or Hub repo id; a
    ValueError for another model type."""
    path = resolve_model_source(path)
    config = AutoConfig.from_pretrained(path)
    if not isinstance(config, MegaMoEConfig):
        raise ValueError(
            f"{path} holds a {config.model_type!r} model, not a MegaMoE one (a trained run's model is "
            "<run_dir>/model)"
        )
    model = MegaMoEForMultiTask.from_pretrained(path, device_map=device)
    return model, AutoTokenizer.from_pretrained(path)


class MultiTaskPredictor:
    """Runs one or all task heads of a `MegaMoEForMultiTask` over texts, in batches, without gradients."""

    def __init__(
        self,
        model: MegaMoEForMultiTask,
        tokenizer: PreTrainedTokenizerBase,
        *,
        batch_size: int = 32,
        max_length: int = 512,
    ):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.max_length = min(max_length, model.config.max_position_embeddings)
        self.tasks: dict[str, dict[str, Any]] = dict(model.config.tasks)

    @classmethod
    def from_pretrained(cls, path: str, **kwargs: Any) -> "MultiTaskPredictor":
        """A model directory or Hub repo id holding a MegaMoE model and its tokenizer."""
        return cls(*load_trained_model(path), **kwargs)

    def resolve_tasks(self, task: str | None, all_tasks: bool = False) -> list[str]:
        """The heads to run: ``task``, every head, or the only head; else a ValueError listing them."""
        if all_tasks:
            return sorted(self.tasks)
        if task is None:
            if len(self.tasks) == 1:
                return list(self.tasks)
            raise ValueError(f"the model has several tasks {sorted(self.tasks)}: name one, or ask for all")
        if task not in self.tasks:
            raise ValueError(f"unknown task {task!r}; this model's tasks: {sorted(self.tasks)}")
        return [task]

    def __call__(
        self, texts: str | Sequence[str], task: str | None = None, *, all_tasks: bool = False
    ) -> list[dict[str, Any]]:
        texts = [texts] if isinstance(texts, str) else list(texts)
        return [result for batch in self.batches(texts, task, all_tasks=all_tasks) for result in batch]

    def batches(
        self, texts: Sequence[str], task: str | None = None, *, all_tasks: bool = False
    ) -> Iterator[list[dict[str, Any]]]:
        """Results batch by batch (for progress bars and streaming output), every task of a text together."""
        names = self.resolve_tasks(task, all_tasks)
        for start in range(0, len(texts), self.batch_size):
            chunk = texts[start : start + self.batch_size]
            per_task = {name: self._predict(chunk, name) for name in names}
            yield [per_task[name][i] for i in range(len(chunk)) for name in names]

    @torch.no_grad()
    def _predict(self, texts: Sequence[str], task: str) -> list[dict[str, Any]]:
        spec = self.tasks[task]
        if spec["type"] == "token_classification":
            return self._entities(texts, task, spec["labels"])
        encoded = self.tokenizer(
            list(texts), padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        )
        logits = self.model(**self._inputs(encoded), task=task).logits.float()
        if spec["type"] == "sequence_regression":
            return [
                {"text": t, "task": task, "score": s}
                for t, s in zip(texts, logits[:, 0].tolist(), strict=True)
            ]
        probabilities = logits.softmax(-1)
        results = []
        for text, row in zip(texts, probabilities.tolist(), strict=True):
            best = max(range(len(row)), key=row.__getitem__)
            results.append(
                {
                    "text": text,
                    "task": task,
                    "label": spec["labels"][best],
                    "score": row[best],
                    "probabilities": dict(zip(spec["labels"], row, strict=True)),
                }
            )
        return results

    def _entities(self, texts: Sequence[str], task: str, labels: list[str]) -> list[dict[str, Any]]:
        words = [[(m.group(), m.start(), m.end()) for m in _WORD.finditer(text)] for text in texts]
        encoded = self.tokenizer(
            [[w for w, _, _ in row] for row in words],
            is_split_into_words=True,
            padding=True,
            truncation=True,
            max_length=self.max_length,
            return_tensors="pt",
        )
        probabilities = self.model(**self._inputs(encoded), task=task).logits.float().softmax(-1)
        results = []
        for i, (text, row) in enumerate(zip(texts, words, strict=True)):
            best = probabilities[i].max(-1)
            per_word = word_predictions(
                encoded.word_ids(i),
                list(zip(best.indices.tolist(), best.values.tolist(), strict=True)),
                len(row),
            )
            # Words past the truncation point were never seen: reported as not covered, not as "O".
            covered = [p for p in per_word if p is not None]
            tags = [labels[label] for label, _ in covered]
            entities = []
            for entity_type, first, last in get_entities(tags):
                span = row[first : last + 1]
                entities.append(
                    {
                        "type": entity_type,
                        "text": text[span[0][1] : span[-1][2]],
                        "start_word": first,
                        "end_word": last + 1,
                        "start_char": span[0][1],
                        "end_char": span[-1][2],
                        "score": sum(score for _, score in covered[first : last + 1]) / len(span),
                    }
                )
            result: dict[str, Any] = {"text": text, "task": task, "entities": entities}
            if len(covered) < len(row):
                result["words_not_covered"] = len(row) - len(covered)
            results.append(result)
        return results

    def _inputs(self, encoded: Any) -> dict[str, torch.Tensor]:
        names = ("input_ids", "attention_mask", "token_type_ids")
        return {name: encoded[name].to(self.model.device) for name in names if name in encoded}
