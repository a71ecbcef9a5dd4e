"""Where a run's model comes from: one `ModelSource` per ``model.init``, each reading its architecture from
config files only (so a bad config fails before any heavy work) and building its model.

- ``upcycle``: a dense BERT-family checkpoint whose FFNs become experts (`upcycle`).
- ``pretrained``: a MegaMoE checkpoint (`pretrained`).
- ``hf_moe``: a published HF MoE model as the backbone (`hf_moe`).
- ``scratch``: random init from ``model.architecture`` (`scratch`).

``builtin:<name>`` bases are published checkpoints shipped through the package registry (`builtin_models`).
"""

import inspect
from typing import Any

from transformers import PreTrainedTokenizerBase

from ..config import MODEL_INITS, ConfigError, ModelSection
from ..model import MegaMoEConfig, MegaMoEForMultiTask
from .base import BuildOptions, BuildRequest, ModelSource
from .hf_moe import HFMoESource
from .pretrained import PretrainedSource
from .scratch import ScratchSource
from .upcycle import UpcycleSource

MODEL_SOURCES: dict[str, ModelSource] = {
    "upcycle": UpcycleSource(),
    "pretrained": PretrainedSource(),
    "hf_moe": HFMoESource(),
    "scratch": ScratchSource(),
}
assert tuple(MODEL_SOURCES) == MODEL_INITS, "config.MODEL_INITS lists the sources' names"

# What `model.architecture` may set: MegaMoEConfig's own fields (the tasks come from the run's `tasks`).
ARCHITECTURE_FIELDS = set(inspect.signature(MegaMoEConfig.__init__).parameters) - {
    "self",
    "tasks",
    "backbone",
}


def resolved_base(section: ModelSection, cache_dir: str | None) -> str | None:
    """``model.base`` as ``from_pretrained`` takes it (``builtin:`` prepared in the cache); None for scratch."""
    from .builtin_models import resolve_model_source

    if section.base is None:
        return None
    try:
        return resolve_model_source(section.base, cache_dir)
    except (OSError, ValueError) as err:
        raise ConfigError(f"model.base: {err}") from None


def declared_model_config(section: ModelSection, cache_dir: str | None) -> MegaMoEConfig:
    """The architecture the run will build, read from config files only (before any heavy work).

    A base that is missing or not what ``model.init`` needs, an unknown or invalid ``model.architecture``
    field: `ConfigError` naming the key.
    """
    unknown = sorted(set(section.architecture) - ARCHITECTURE_FIELDS)
    if unknown:
        raise ConfigError(
            f"model.architecture: unknown key {unknown[0]!r}; MegaMoEConfig fields: {sorted(ARCHITECTURE_FIELDS)}"
        )
    base = resolved_base(section, cache_dir)
    try:
        return MODEL_SOURCES[section.init].declared_config(section, base)
    except ConfigError:
        raise
    except (OSError, ValueError) as err:
        raise ConfigError(f"model: {err}") from None


def build_model(
    section: ModelSection,
    tasks: dict[str, dict[str, Any]],
    tokenizer: PreTrainedTokenizerBase | None,
    options: BuildOptions,
) -> MegaMoEForMultiTask:
    """The network ``section`` names, with one head per task of ``tasks``."""
    base = resolved_base(section, options.cache_dir)
    request = BuildRequest(section, base, tasks, tokenizer, options)
    return MODEL_SOURCES[section.init].build(request)


__all__ = [
    "ARCHITECTURE_FIELDS",
    "MODEL_SOURCES",
    "BuildOptions",
    "BuildRequest",
    "ModelSource",
    "build_model",
    "declared_model_config",
    "resolved_base",
]
