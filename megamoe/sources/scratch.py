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
        torch.manual_seed(request.options.seed)
        # transformers' own route for `from_config`: under ZeRO-3 (an alive HfDeepSpeedConfig, see
        # `partitioned_construction`) it builds under deepspeed.zero.Init, so no rank holds the whole model.
        return MegaMoEForMultiTask._from_config(MegaMoEConfig(tasks=request.tasks, **architecture))
