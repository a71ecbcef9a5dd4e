"""Dynamic padding of one task's tokenized rows into a micro-batch."""

from collections.abc import Sequence
from typing import Any

import torch

from .tokenization import IGNORE_INDEX


class MultiTaskCollator:
    """Pads to the longest row of the batch (optionally to a multiple, for tensor cores).

    Input rows come from one task (the sampler picks one task per step); the batch carries the task name
    so the model runs that task's head. Token labels and word ids are padded with -100 / -1 so padding
    never counts in the loss or in the word mapping.
    """

    def __init__(self, pad_token_id: int, pad_to_multiple_of: int | None = None):
        self.pad_values = {
            "input_ids": pad_token_id,
            "attention_mask": 0,
            "token_type_ids": 0,
            "labels": IGNORE_INDEX,
            "word_ids": -1,
        }
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, rows: Sequence[dict[str, Any]], task: str) -> dict[str, Any]:
        longest = max(len(row["input_ids"]) for row in rows)
        if self.pad_to_multiple_of:
            longest = -(-longest // self.pad_to_multiple_of) * self.pad_to_multiple_of
        batch: dict[str, Any] = {"task": task}
        for key, pad_value in self.pad_values.items():
            if key not in rows[0]:
                continue
            values = [row[key] for row in rows]
            if isinstance(values[0], (int, float)):  # sequence-level labels
                batch[key] = torch.tensor(values)
            else:
                batch[key] = torch.tensor([list(v) + [pad_value] * (longest - len(v)) for v in values])
        return batch
