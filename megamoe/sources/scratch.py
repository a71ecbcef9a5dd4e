"""``init: scratch``: a MegaMoE of ``model.architecture``, randomly initialized, over the run's tokenizer."""

import torch

from ..config import ModelSection
from ..model import MegaMoEConfig, MegaMoEForMultiTask
from .base import BuildRequest


class ScratchSource:
    def declared_config(self, section: ModelSection, base: str | None) -> MegaMoEConfig:
        return MegaMoEConfig(**{"tasks": {}, **section.architecture})

    def build(self, request: BuildRequest) -> MegaMoEForMultiTask:
        tokenizer = request.tokenizer
        assert tokenizer is not None, "a scratch model takes its vocabulary from the run's tokenizer"
        architecture = {
            "vocab_size": len(tokenizer),
            "pad_token_id": tokenizer.pad_token_id,
            **request.section.architecture,
        }
        from ..engine.partitioned_loading import from_config  # imports deepspeed: only when a model is built

        torch.manual_seed(request.options.seed)
        # Under ZeRO-3 (`partitioned_construction`) built under deepspeed.zero.Init: no rank holds the whole model.
        return from_config(MegaMoEForMultiTask, MegaMoEConfig(tasks=request.tasks, **architecture))  # type: ignore[return-value]
