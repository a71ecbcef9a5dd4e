"""Building and loading HF-style models so that, under ZeRO-3, no rank holds the whole model: built
partitioned (`deepspeed.zero.Init`), then filled one conversion group of a layer at a time, read by rank 0
only and scattered into every rank's partition. Outside ZeRO-3, transformers' own `from_pretrained`.

The transformers internals this needs (`_from_config` and its ZeRO-3 random init
`initialize_weights_zero3`, the weight conversion of a state dict, the `_is_hf_initialized` flag) are used
here only; tests/unit/test_partitioned_loading.py fails when they change.
So is DeepSpeed's partition layout (`_scatter_into_partition`), tested by
tests/distributed/test_partitioned_loading.py.

transformers' own ZeRO-3 ``from_pretrained`` has every rank read the whole checkpoint and convert it (the
published per-expert tensors become fused ``[E, ...]`` ones) before rank 0 copies it in: while it loads, each
rank holds about a full copy, ~61 GB per rank for Qwen3-30B-A3B, eight of them per node (bench/load_memory.py
measures it at small scale). Here rank 0 holds one conversion group (as read and as converted) on top of
its partition, and sends every other rank its own slice of each parameter, straight into its partition: the
load gathers no parameter on any rank. The conversion itself is transformers' (its conversion mapping
for the model type), applied per group.
"""

import json
import re
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import deepspeed
import torch
import torch.distributed as dist
import transformers.integrations.deepspeed as transformers_deepspeed
from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus
from safetensors import safe_open
from transformers import MODEL_MAPPING, AutoConfig, PretrainedConfig, PreTrainedModel
from transformers.conversion_mapping import get_model_conversion_mapping
from transformers.core_model_loading import WeightConverter
from transformers.integrations import is_deepspeed_zero3_enabled
from transformers.integrations.deepspeed import _apply_weight_conversions_to_state_dict

_INDEX = "model.safetensors.index.json"
_SINGLE = "model.safetensors"
_LAYER = re.compile(r"\.layers\.(\d+)\.")
_EXPERT = re.compile(r"\.experts\.(\d+)\.")
_DTYPES = {
    "BF16": torch.bfloat16,
    "F16": torch.float16,
    "F32": torch.float32,
    "F64": torch.float64,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


def safetensors_weight_map(directory: Path) -> dict[str, Path] | None:
    """Tensor name -> the safetensors file holding it, for a (sharded or single-file) checkpoint directory;
    None when it has no safetensors weights."""
    if (directory / _INDEX).is_file():
        weight_map = json.loads((directory / _INDEX).read_text())["weight_map"]
        return {key: directory / file for key, file in weight_map.items()}
    if (directory / _SINGLE).is_file():
        with safe_open(directory / _SINGLE, "pt") as checkpoint:
            return dict.fromkeys(checkpoint.keys(), directory / _SINGLE)
    return None


def checkpoint_directory(source: str) -> Path:
    """``source`` as a local directory: itself, or the Hub snapshot of its weights and configs."""
    if Path(source).is_dir():
        return Path(source)
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(source, allow_patterns=["*.safetensors", _INDEX, "*.json"]))


def from_config(
    model_class: type[PreTrainedModel], config: PretrainedConfig, **kwargs: Any
) -> PreTrainedModel:
    """A randomly initialized ``model_class``, built partitioned under ZeRO-3 (`partitioned_construction`):
    transformers' own route for ``AutoModel.from_config``, for any class."""
    return model_class._from_config(config, **kwargs)


def load_pretrained(
    source: str,
    dtype: torch.dtype,
    *,
    model_class: type[PreTrainedModel] | None = None,
    config: PretrainedConfig | None = None,
    may_lack: tuple[str, ...] = (),
) -> PreTrainedModel:
    """``model_class`` (default: the HF base model of ``source``'s architecture) with ``source``'s weights in
    ``dtype``, loaded once.

    Under ZeRO-3 (inside `partitioned_construction`) each parameter is partitioned over the ranks as it is
    built and filled layer by layer from rank 0's reads; parameters whose names start with one of ``may_lack``
    may be missing from the checkpoint (initialized, on rank 0), any other missing one is an error. Otherwise,
    and for a checkpoint without safetensors weights, transformers' ``from_pretrained`` (the meta device, then
    the checkpoint; under ZeRO-3 every rank then reads all of it).
    """
    config = config if config is not None else AutoConfig.from_pretrained(source)
    built: type[PreTrainedModel] = model_class or MODEL_MAPPING[type(config)]  # type: ignore[assignment]
    weight_map = (
        safetensors_weight_map(checkpoint_directory(source)) if is_deepspeed_zero3_enabled() else None
    )
    if weight_map is None:
        if is_deepspeed_zero3_enabled() and dist.get_rank() == 0:
            print(f"{source} has no safetensors weights: every rank reads the whole checkpoint", flush=True)
        return built.from_pretrained(source, config=config, dtype=dtype)
    with _without_zero3_random_init():
        model = from_config(built, config, dtype=dtype)
    conversions = get_model_conversion_mapping(model)
    expected = set(model.state_dict())
    loaded: set[str] = set()
    for keys, merged in _load_chunks(weight_map, conversions):
        if merged and _load_fused_experts_by_slices(model, keys, weight_map, conversions, loaded):
            continue
        # Renames (the CausalLM's `model.` prefix) and fusions, on real tensors on rank 0 and on meta
        # tensors elsewhere: every rank gets the same names, in the same order, for the collectives below.
        # The tensors as read are dropped once converted.
        converted = _apply_weight_conversions_to_state_dict(
            model, _read(keys, weight_map, real=dist.get_rank() == 0), conversions
        )
        loaded.update(converted)
        for name in sorted(converted):  # each dropped once scattered: rank 0 holds one less at every step
            copy_into_partition(model, name, converted.pop(name))
    missing = sorted(name for name in expected - loaded if not name.startswith(may_lack))
    if missing:
        raise ValueError(f"{source} has no weights for {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    _initialize_what_was_not_loaded(model, loaded)
    for module in model.modules():  # loaded: a later post_init must not initialize it again
        setattr(module, "_is_hf_initialized", True)  # noqa: B010 (nn.Module typing of attributes)
    return model


@contextmanager
def _without_zero3_random_init() -> Iterator[None]:
    """`_from_config` under ZeRO-3 without its random init, for a model the checkpoint then fills.

    transformers builds under `zero.Init` and `no_init_weights`, then `initialize_weights_zero3` gathers every
    module whole, on every rank, to draw values the checkpoint overwrites: for the model being loaded that
    was the load's memory peak (a layer's experts gathered, about twice their size over gloo) and a third of
    its time (docs/memory.md). `_from_config` imports it at call time, so the module attribute is what it calls.
    """
    original = transformers_deepspeed.initialize_weights_zero3
    transformers_deepspeed.initialize_weights_zero3 = lambda model: None
    try:
        yield
    finally:
        transformers_deepspeed.initialize_weights_zero3 = original


def _initialize_what_was_not_loaded(model: PreTrainedModel, loaded: set[str]) -> None:
    """transformers' init for the tensors the checkpoint did not hold (``may_lack`` heads) and the
    non-persistent buffers, as its ``_initialize_missing_keys`` does: loaded tensors are flagged, so the
    init skips them, and only the parameters it initializes are gathered (rank 0 draws, the others receive)."""
    fresh = []
    for name, tensor in model.state_dict(keep_vars=True).items():
        if name in loaded:
            tensor._is_hf_initialized = True
        elif isinstance(tensor, torch.nn.Parameter):
            fresh.append(tensor)
    with deepspeed.zero.GatheredParameters(fresh, modifier_rank=0):
        model.initialize_weights()


def _load_chunks(weight_map: dict[str, Path], conversions: list[Any]) -> list[tuple[list[str], bool]]:
    """The checkpoint's tensor names in the groups that are read, converted and scattered together, each with
    whether it is the sources of a many-to-one conversion: per layer, the sources of each such conversion (all
    of a layer's experts' gate and up projections become one fused tensor), then the layer's other tensors;
    embeddings, final norm and LM head form one more group. Rank 0 then holds one converted parameter and its
    sources at a time, not a layer (and of a fused expert tensor, one rank's slice: `_load_fused_experts_by_slices`)."""
    merges = [
        [re.compile(re.escape(pattern).replace(r"\*", r"\d+")) for pattern in conversion.source_patterns]
        for conversion in conversions
        if isinstance(conversion, WeightConverter)
    ]
    chunks: dict[tuple[int, int], list[str]] = defaultdict(list)
    for key in weight_map:
        layer = _LAYER.search(key)
        merge = next(
            (index for index, patterns in enumerate(merges) if any(p.search(key) for p in patterns)),
            len(merges),
        )
        chunks[int(layer.group(1)) if layer else -1, merge].append(key)
    return [(sorted(chunks[index]), index[1] < len(merges)) for index in sorted(chunks)]


def _load_fused_experts_by_slices(
    model: PreTrainedModel,
    keys: list[str],
    weight_map: dict[str, Path],
    conversions: list[Any],
    loaded: set[str],
) -> bool:
    """The fused expert tensor that ``keys`` (per-expert sources, ``...experts.<e>....``) convert into, loaded
    one destination rank's slice at a time: rank 0 reads the experts that slice covers, converts them as if
    they were a layer of their own (the fusions stack experts along the leading dimension, so experts lo..hi
    of the fused tensor are the fusion of experts lo..hi), cuts the slice and sends it to its rank, which
    receives it into its partition. Rank 0 holds about 2 / ranks of the tensor at a time instead of twice
    all of it. False, having loaded nothing, when ``keys`` are not such sources (the caller converts them whole).
    tests/distributed/test_partitioned_loading.py checks the partitions against the whole conversion's."""
    experts = {key: _EXPERT.search(key) for key in keys}
    if not all(experts.values()):
        return False
    index = {key: int(found.group(1)) for key, found in experts.items() if found is not None}
    shapes = _apply_weight_conversions_to_state_dict(model, _read(keys, weight_map, real=False), conversions)
    if len(shapes) != 1:
        return False
    ((name, shape),) = shapes.items()
    if len(set(index.values())) != shape.shape[0]:
        return False  # not one leading slot per expert: not a stacking fusion
    param: Any = model.get_parameter(name)
    partition, numel, group = _partition_of(param)
    loaded.add(name)
    if dist.get_rank() != 0:
        dist.recv(partition, src=dist.get_global_rank(group, 0), group=group)
        return True
    per_expert = param.ds_numel // shape.shape[0]
    for rank in range(dist.get_world_size(group)):
        start, end = rank * numel, min((rank + 1) * numel, param.ds_numel)
        piece = torch.zeros(numel, dtype=partition.dtype, device=partition.device)  # zero padding at the end
        if start < end:
            first, last = start // per_expert, (end - 1) // per_expert
            # The slice's experts, renumbered from 0, so the conversion sees a layer of last - first + 1.
            renamed = {
                key.replace(f".experts.{e}.", f".experts.{e - first}."): key
                for key, e in index.items()
                if first <= e <= last
            }
            read = _read(list(renamed.values()), weight_map, real=True)
            sources = {new: read.pop(old) for new, old in renamed.items()}
            fused = _apply_weight_conversions_to_state_dict(model, sources, conversions)[name]
            offset = first * per_expert
            piece[: end - start] = fused.reshape(-1)[start - offset : end - offset]
            del fused, sources
        if rank == 0:
            partition.copy_(piece)
        else:
            dist.send(piece, dst=dist.get_global_rank(group, rank), group=group)
    return True


def _read(keys: list[str], weight_map: dict[str, Path], *, real: bool) -> dict[str, torch.Tensor]:
    """The tensors ``keys`` from their files; with ``real=False`` meta tensors of their shapes and dtypes."""
    by_file: dict[Path, list[str]] = defaultdict(list)
    for key in keys:
        by_file[weight_map[key]].append(key)
    tensors = {}
    for file, file_keys in by_file.items():
        with safe_open(file, "pt") as checkpoint:
            for key in file_keys:
                if real:
                    tensors[key] = checkpoint.get_tensor(key)
                else:
                    view = checkpoint.get_slice(key)
                    tensors[key] = torch.empty(
                        view.get_shape(), dtype=_DTYPES[view.get_dtype()], device="meta"
                    )
    return tensors


def copy_into_partition(model: PreTrainedModel, name: str, value: torch.Tensor) -> None:
    """``value`` into parameter (or buffer) ``name``, cast to its dtype. Under ZeRO-3 (inside
    `partitioned_construction`) rank 0's ``value`` reaches every rank's partition, and other ranks' values
    are not read (they may be meta tensors)."""
    target = model.get_parameter_or_buffer(name)
    if not is_deepspeed_zero3_enabled():
        with torch.no_grad():
            target.copy_(value)
        return
    if isinstance(target, torch.nn.Parameter):
        _scatter_into_partition(target, value)
        return
    with torch.no_grad():  # buffers are not partitioned: every rank holds the whole of it
        if dist.get_rank() == 0:
            target.copy_(value)
        dist.broadcast(target, src=0)


def _scatter_into_partition(param: Any, value: torch.Tensor) -> None:
    """Rank 0's ``value`` into ZeRO-3 parameter ``param`` (a `torch.nn.Parameter` with DeepSpeed's untyped
    ``ds_*`` attributes), each rank receiving only its own slice, in place in its partition.

    `deepspeed.zero.GatheredParameters` (the public way) would gather the whole parameter on every rank for
    the copy, and on rank 0 next to ``value``. This writes DeepSpeed's partition layout instead (0.19.8,
    `Init._partition_param`): the parameter flattened and padded at the end to a multiple of the size of its
    group (``param.ds_process_group``, the world under `partitioned_construction`), group rank r holding
    elements [r·n, (r+1)·n) in ``param.ds_tensor``, n = ``param.partition_numel()``. The padding is zeros
    here (DeepSpeed leaves it uninitialized; a gather cuts it off). tests/distributed/test_partitioned_loading.py
    compares the partitions with GatheredParameters' bit for bit, so a change of layout fails there.
    """
    partition, numel, group = _partition_of(param)
    if dist.get_rank() != 0:
        dist.scatter(partition, src=0, group=group)
        return
    # shape: [ds_numel] -> group size slices of [n]; views of rank 0's value but the padded last ones.
    flat = value.detach().reshape(-1).to(dtype=partition.dtype, device=partition.device)
    slices = []
    for start in range(0, numel * dist.get_world_size(group), numel):
        part = flat[start : start + numel]
        if part.numel() < numel:
            part = torch.cat([part, part.new_zeros(numel - part.numel())])
        slices.append(part)
    dist.scatter(partition, slices, src=0, group=group)


def _partition_of(param: Any) -> tuple[torch.Tensor, int, Any]:
    """ZeRO-3 parameter ``param``'s partition on this rank, its length, and the group it is partitioned over,
    for writing into (DeepSpeed 0.19.8's layout, see `_scatter_into_partition`)."""
    # A parameter gathered now would keep its full data, stale once its partition is written.
    if param.ds_status != ZeroParamStatus.NOT_AVAILABLE:
        raise RuntimeError(f"parameter {param.ds_id} is {param.ds_status.name}, not partitioned: cannot load")
    return param.ds_tensor, param.partition_numel(), param.ds_process_group
