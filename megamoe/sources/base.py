"""The contract every model source keeps (`megamoe.sources.MODEL_SOURCES`)."""

from dataclasses import dataclass
from typing import Any, Protocol

import torch
from transformers import PreTrainedTokenizerBase

from ..config import ModelSection
from ..model import MegaMoEConfig, MegaMoEForMultiTask


@dataclass(frozen=True)
class BuildOptions:
    """What every source needs beyond ``model``: the run's seed, precision and cache."""

    seed: int
    dtype: torch.dtype
    """The run's precision: weights read from a checkpoint are kept in it (DeepSpeed holds the fp32 master)."""
    cache_dir: str | None = None


@dataclass(frozen=True)
class BuildRequest:
    """What a source is asked to build: ``model`` as configured, its resolved base, one head per task."""

    section: ModelSection
    base: str | None
    """``model.base`` as ``from_pretrained`` takes it (``builtin:`` prepared); None for scratch."""
    tasks: dict[str, dict[str, Any]]
    tokenizer: PreTrainedTokenizerBase | None
    options: BuildOptions


class ModelSource(Protocol):
    def declared_config(self, section: ModelSection, base: str | None) -> MegaMoEConfig:
        """The architecture the run will build, from config files only; ``base`` is resolved."""
        ...

    def build(self, request: BuildRequest) -> MegaMoEForMultiTask:
        """The model, with one fresh head per task of ``tasks`` (unless trained heads are loaded)."""
        ...
