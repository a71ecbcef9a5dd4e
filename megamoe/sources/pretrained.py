"""``init: pretrained``: a MegaMoE checkpoint (a run's exported model, or `megamoe upcycle`'s output).

What a trained model is (widths, expert count, layout) is fixed by its weights; how it is trained (dropout,
router losses, capacity, jitter) can change. ``model.architecture`` sets the second kind and is refused,
naming the field, for the first: before, any field there was silently ignored.
"""

from typing import Any

import torch
from transformers import AutoConfig

from ..config import ConfigError, ModelSection
from ..model import MegaMoEConfig, MegaMoEForMultiTask
from .base import BuildRequest

TRAINING_FIELDS = (
    "hidden_dropout_prob",
    "attention_probs_dropout_prob",
    "classifier_dropout",
    "capacity_factor",
    "router_jitter_noise",
    "router_aux_loss_coef",
    "router_z_loss_coef",
)
"""The `MegaMoEConfig` fields a trained model can take new values of: none changes a weight's shape."""


class PretrainedSource:
    def declared_config(self, section: ModelSection, base: str | None) -> MegaMoEConfig:
        return self._config(section, base, tasks=None)

    def build(self, request: BuildRequest) -> MegaMoEForMultiTask:
        assert request.base is not None
        config = self._config(request.section, request.base, tasks=request.tasks)
        torch.manual_seed(request.options.seed)  # heads the checkpoint lacks
        from ..engine.partitioned_loading import (
            load_pretrained,  # imports deepspeed: only when a model is built
        )

        return load_pretrained(  # type: ignore[return-value]
            request.base,
            request.options.dtype,
            model_class=MegaMoEForMultiTask,
            config=config,
            may_lack=("heads.",),  # `megamoe upcycle` writes a backbone without heads
        )

    def _config(
        self, section: ModelSection, base: str | None, *, tasks: dict[str, dict[str, Any]] | None
    ) -> MegaMoEConfig:
        assert base is not None  # validated by ModelSection
        found = AutoConfig.from_pretrained(base)
        if not isinstance(found, MegaMoEConfig):
            raise ConfigError(
                f"model.base: {section.base} holds a {found.model_type!r} model, not a MegaMoE one: use "
                "model.init: upcycle for a dense BERT-family encoder, hf_moe for an HF MoE model"
            )
        for field, value in section.architecture.items():
            if field not in TRAINING_FIELDS and getattr(found, field) != value:
                raise ConfigError(
                    f"model.architecture.{field}: {section.base} was trained with {field}="
                    f"{getattr(found, field)!r}, which its weights fix; init: pretrained can change only "
                    f"{', '.join(TRAINING_FIELDS)}. Drop it, or start from init: upcycle / scratch"
                )
        if tasks is not None and found.tasks and found.tasks != tasks:
            raise ConfigError(
                f"{section.base} was trained for tasks {found.tasks}, the run declares {tasks}: "
                "use init: upcycle / scratch, or the same tasks and labels"
            )
        # A backbone without heads (`megamoe upcycle`) gets fresh ones for the run's tasks. from_dict runs
        # MegaMoEConfig's validation on the new values.
        overrides = {**section.architecture, **({"tasks": tasks} if tasks is not None else {})}
        return MegaMoEConfig.from_dict({**found.to_dict(), **overrides})
