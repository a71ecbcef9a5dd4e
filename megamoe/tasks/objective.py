"""The training objective: the multi-task model, its task-loss weighting, and the router losses."""

from typing import Any

import torch
from torch import nn

from ..model import MegaMoEForMultiTask, MegaMoEMultiTaskOutput
from .weighting import LossWeighting

MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


class MultiTaskObjective(nn.Module):
    """``loss = w_t(L_t) + aux_coef * aux + z_coef * z`` for the micro-batch's task t.

    One module so DeepSpeed sees (and shards, and checkpoints) the weighting's parameters with the model's.
    Extra batch fields (``word_ids``) are ignored here; evaluation uses them.
    """

    def __init__(self, model: MegaMoEForMultiTask, weighting: LossWeighting):
        super().__init__()
        self.model = model
        self.weighting = weighting

    def forward(self, task: str, labels: torch.Tensor | None = None, **batch: Any) -> MegaMoEMultiTaskOutput:
        output = self.model(**{k: v for k, v in batch.items() if k in MODEL_INPUTS}, task=task, labels=labels)
        if labels is not None:
            config = self.model.config
            output.loss = (
                self.weighting(task, output.task_loss)
                + config.router_aux_loss_coef * output.aux_loss
                + config.router_z_loss_coef * output.z_loss
            )
        return output
