"""Sparse upcycling of BERT-family encoders (Komatsuzaki et al., ICLR 2023).

Embeddings, attention and norms are copied; every MoE layer's experts start as copies of the dense FFN
(optionally with a little noise to break symmetry) and the router starts small. With the noise off the
upcycled model computes exactly what the dense one does: identical experts with renormalized top-k
weights sum back to the dense FFN. Experts narrower than the dense FFN are its slices (granular upcycling,
`expert_granularity`), and hold it exactly too.
"""

import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, cast

import torch
from safetensors import safe_open
from torch import nn
from transformers import AutoConfig, AutoModel, PretrainedConfig

from ..config import ModelSection
from ..model import MegaMoEConfig, MegaMoEForMultiTask
from ..model.modeling_megamoe import MegaMoESequenceHead
from .base import BuildRequest


@dataclass(frozen=True)
class DenseLayout:
    """Where a BERT-family encoder keeps each tensor: module paths without ``.weight`` / ``.bias``, ``{i}`` = layer."""

    word_embeddings: str
    position_embeddings: str
    token_type_embeddings: str | None
    embeddings_norm: str
    query: str
    key: str
    value: str
    attention_out: str
    attention_norm: str
    ffn_up: str
    ffn_down: str
    ffn_norm: str
    position_offset: bool = False
    """RoBERTa numbers positions from ``padding_idx + 1``: MegaMoE's position 0 is the table's row pad + 1."""


_BERT = DenseLayout(
    word_embeddings="embeddings.word_embeddings",
    position_embeddings="embeddings.position_embeddings",
    token_type_embeddings="embeddings.token_type_embeddings",
    embeddings_norm="embeddings.LayerNorm",
    query="encoder.layer.{i}.attention.self.query",
    key="encoder.layer.{i}.attention.self.key",
    value="encoder.layer.{i}.attention.self.value",
    attention_out="encoder.layer.{i}.attention.output.dense",
    attention_norm="encoder.layer.{i}.attention.output.LayerNorm",
    ffn_up="encoder.layer.{i}.intermediate.dense",
    ffn_down="encoder.layer.{i}.output.dense",
    ffn_norm="encoder.layer.{i}.output.LayerNorm",
)
LAYOUTS = {
    "bert": _BERT,
    "roberta": replace(_BERT, position_offset=True),
    "xlm-roberta": replace(_BERT, position_offset=True),
    "camembert": replace(_BERT, position_offset=True),
    "distilbert": DenseLayout(
        word_embeddings="embeddings.word_embeddings",
        position_embeddings="embeddings.position_embeddings",
        token_type_embeddings=None,
        embeddings_norm="embeddings.LayerNorm",
        query="transformer.layer.{i}.attention.q_lin",
        key="transformer.layer.{i}.attention.k_lin",
        value="transformer.layer.{i}.attention.v_lin",
        attention_out="transformer.layer.{i}.attention.out_lin",
        attention_norm="transformer.layer.{i}.sa_layer_norm",
        ffn_up="transformer.layer.{i}.ffn.lin1",
        ffn_down="transformer.layer.{i}.ffn.lin2",
        ffn_norm="transformer.layer.{i}.output_layer_norm",
    ),
}
"""The dense families upcycling holds exactly: all post-LN with biased attention and MLP and a stored position
table (DistilBERT's sinusoidal one is stored as weights too, and trains from there)."""


def _layout(model_type: str) -> DenseLayout:
    if model_type not in LAYOUTS:
        raise ValueError(
            f"upcycling supports model_type in {list(LAYOUTS)} (BERT-family encoders), got {model_type!r}; "
            "for an HF MoE model use model.init: hf_moe"
        )
    return LAYOUTS[model_type]


def _first_position(model_type: str, pad_token_id: int | None) -> int:
    """The row of the dense position table that MegaMoE's position 0 (``position_ids = arange``) reads."""
    if not _layout(model_type).position_offset:
        return 0
    if pad_token_id is None:
        raise ValueError(
            f"a {model_type} checkpoint numbers positions after its pad_token_id, which is unset"
        )
    return pad_token_id + 1


def _ffn_width(dense_config: PretrainedConfig) -> int:
    return int(
        dense_config.hidden_dim if dense_config.model_type == "distilbert" else dense_config.intermediate_size
    )


def dense_ffn_width(source: str) -> int:
    """The hidden width of a BERT-family checkpoint's feed-forward layers (a Hub id or local directory)."""
    return _ffn_width(AutoConfig.from_pretrained(source))


def config_from_bert(dense_config: PretrainedConfig, **overrides: Any) -> MegaMoEConfig:
    """The MegaMoE architecture that holds a BERT-family ``dense_config`` exactly; MoE and task settings come
    in ``overrides``."""
    _layout(dense_config.model_type)  # an unsupported family fails first, naming the supported ones
    position_type = getattr(dense_config, "position_embedding_type", "absolute")
    if position_type != "absolute":
        raise ValueError(f"only absolute position embeddings can be upcycled, got {position_type!r}")
    if getattr(dense_config, "is_decoder", False) or getattr(dense_config, "add_cross_attention", False):
        # MegaMoE attends bidirectionally and has no cross-attention: a causal or seq2seq layout has no twin.
        raise ValueError(
            "only bidirectional encoders can be upcycled (is_decoder / add_cross_attention is set)"
        )
    intermediate = _ffn_width(dense_config)
    if dense_config.model_type == "distilbert":  # its own field names; no token types, LayerNorm eps fixed
        act = dense_config.activation
        dropout, attention_dropout = dense_config.dropout, dense_config.attention_dropout
        layer_norm_eps, type_vocab_size = 1e-12, 0
    else:
        act = dense_config.hidden_act
        dropout, attention_dropout = (
            dense_config.hidden_dropout_prob,
            dense_config.attention_probs_dropout_prob,
        )
        layer_norm_eps, type_vocab_size = dense_config.layer_norm_eps, dense_config.type_vocab_size
    positions = dense_config.max_position_embeddings - _first_position(
        dense_config.model_type, dense_config.pad_token_id
    )
    kwargs: dict[str, Any] = dict(
        vocab_size=dense_config.vocab_size,
        hidden_size=dense_config.hidden_size,
        num_hidden_layers=dense_config.num_hidden_layers,
        num_attention_heads=dense_config.num_attention_heads,
        intermediate_size=intermediate,
        moe_intermediate_size=intermediate,
        hidden_act=act,
        mlp_type="mlp",
        mlp_bias=True,
        attention_bias=True,
        norm_type="layernorm",
        norm_position="post",
        layer_norm_eps=layer_norm_eps,
        position_embedding_type="absolute",
        max_position_embeddings=positions,
        type_vocab_size=type_vocab_size,
        hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=attention_dropout,
        initializer_range=dense_config.initializer_range,
        pad_token_id=dense_config.pad_token_id,
        norm_topk_prob=True,
    )
    kwargs.update(overrides)
    if not kwargs["norm_topk_prob"] and kwargs.get("num_experts_per_tok", 2) < kwargs.get("num_experts", 8):
        raise ValueError(
            "upcycling needs norm_topk_prob=True: unnormalized top-k weights scale the dense FFN"
        )
    config = MegaMoEConfig(**kwargs)
    if config.moe_layers():
        expert_granularity(config)  # an expert width that does not slice the dense FFN fails here, early
    return config


def expert_granularity(config: MegaMoEConfig) -> int:
    """How many slices of the dense FFN make one copy of it among the experts: 1 when every expert is a whole
    copy (sparse upcycling), G when experts are ``intermediate_size / G`` wide (granular upcycling, He et
    al. 2024, "Upcycling Large Language Models into Mixture of Experts": virtual groups).

    Experts ``r * G .. r * G + G - 1`` are the G slices of copy r, and share one router row, so at init the
    router picks whole copies: top-k must be a multiple of G. Each expert's down projection is scaled by G
    (its slice's weight is 1/G of its copy's), so the upcycled layer computes the dense FFN exactly, at top-k
    = G with the dense FFN's FLOPs per token.
    """
    width, dense_width = config.moe_intermediate_size, config.intermediate_size
    granularity = dense_width // width
    if granularity * width != dense_width:
        raise ValueError(
            f"moe_intermediate_size {width} does not slice the dense FFN's {dense_width} evenly: upcycled experts "
            f"are {dense_width} wide (whole copies) or {dense_width} / G for G slices per copy"
        )
    for field in ("num_experts", "num_experts_per_tok"):
        if getattr(config, field) % granularity:
            raise ValueError(
                f"{field} {getattr(config, field)} is not a multiple of {granularity}, the slices per copy of "
                f"the dense FFN (intermediate_size {dense_width} / moe_intermediate_size {width}): the router "
                "starts by picking whole copies"
            )
    return granularity


def upcycled_tensors(
    dense_state: Mapping[str, torch.Tensor],
    config: MegaMoEConfig,
    *,
    model_type: str = "bert",
    expert_noise_std: float = 0.0,
    router_std: float | None = None,
    generator: torch.Generator | None = None,
) -> Iterator[tuple[str, torch.Tensor]]:
    """The `MegaMoEModel` tensors a BERT-family base model's tensors (``bert.`` / ``roberta.`` /
    ``distilbert.`` prefix allowed) upcycle into, one at a time: `MegaMoEModel` key and value.

    Args:
        dense_state: the dense checkpoint's tensors (a dict, or a mapping that reads each when asked).
        config: from `config_from_bert`.
        model_type: the dense checkpoint's family, a key of `LAYOUTS`.
        expert_noise_std: relative std of Gaussian noise added to each expert copy (0 = exact copies).
        router_std: std of the router init; defaults to ``config.initializer_range``.
        generator: RNG for the noise and the router init, drawn in the order the tensors come.

    Yields every key `MegaMoEModel.load_state_dict(..., strict=True)` needs, once. Tensors copied unchanged
    are the dense state's own; expert stacks are new, one at a time: a large dense checkpoint streams
    through, it is never upcycled whole in memory.
    """
    if config.num_shared_experts > 0:
        raise ValueError("upcycling starts without shared experts (a copy would count the dense FFN twice)")
    layout = _layout(model_type)
    granularity = expert_granularity(config) if config.moe_layers() else 1
    width = config.moe_intermediate_size
    # Expert e holds slice e % G of the dense FFN's hidden units.
    expert_slices = [
        slice((e % granularity) * width, (e % granularity + 1) * width) for e in range(config.num_experts)
    ]
    names = _encoder_names(dense_state)

    def tensor(path: str, param: str = "weight") -> torch.Tensor:
        key = f"{path}.{param}"
        if key not in names:
            raise KeyError(f"the dense checkpoint has no {key!r}; is it a {model_type} encoder?")
        return dense_state[names[key]]

    def take(ours: str, theirs: str) -> Iterator[tuple[str, torch.Tensor]]:
        for param in ("weight", "bias"):
            yield f"{ours}.{param}", tensor(theirs, param)

    yield "embeddings.word_embeddings.weight", tensor(layout.word_embeddings)
    start = _first_position(model_type, config.pad_token_id)
    positions = tensor(layout.position_embeddings)[start : start + config.max_position_embeddings]
    yield "embeddings.position_embeddings.weight", positions.clone()  # a slice: its own, smaller storage
    if layout.token_type_embeddings is not None:
        yield "embeddings.token_type_embeddings.weight", tensor(layout.token_type_embeddings)
    yield from take("embeddings.norm", layout.embeddings_norm)

    for i in range(config.num_hidden_layers):
        ours = f"layers.{i}"
        for our_name, path in (
            ("attention.q_proj", layout.query),
            ("attention.k_proj", layout.key),
            ("attention.v_proj", layout.value),
            ("attention.o_proj", layout.attention_out),
            ("attention_norm", layout.attention_norm),
            ("ffn_norm", layout.ffn_norm),
        ):
            yield from take(f"{ours}.{our_name}", path.format(i=i))
        if not config.is_moe_layer(i):
            yield from take(f"{ours}.mlp.up_proj", layout.ffn_up.format(i=i))
            yield from take(f"{ours}.mlp.down_proj", layout.ffn_down.format(i=i))
            continue
        dtype = torch.float32
        for name, path, param, sliced, scale in (
            ("up_proj", layout.ffn_up, "weight", lambda t, s: t[s], 1),  # [F, D]: rows are hidden units
            ("up_proj_bias", layout.ffn_up, "bias", lambda t, s: t[s], 1),
            ("down_proj", layout.ffn_down, "weight", lambda t, s: t[:, s], granularity),  # [D, F]
            ("down_proj_bias", layout.ffn_down, "bias", lambda t, s: t, 1),  # each slice's share is 1/G
        ):
            dense = tensor(path.format(i=i), param)
            dtype = dense.dtype
            experts = torch.stack([sliced(dense, rows) for rows in expert_slices])
            if scale != 1:
                experts *= scale
            if expert_noise_std > 0:
                noise = torch.randn(experts.shape, generator=generator, dtype=experts.dtype)
                experts += expert_noise_std * scale * dense.std() * noise
            yield f"{ours}.mlp.experts.{name}", experts
        std = config.initializer_range if router_std is None else router_std
        copies = config.num_experts // granularity
        router = torch.randn(copies, config.hidden_size, generator=generator) * std
        yield f"{ours}.mlp.router.weight", router.repeat_interleave(granularity, dim=0).to(dtype)
        if config.task_aware_routing:
            yield f"{ours}.mlp.router.task_logit_bias", torch.zeros(len(config.tasks), config.num_experts)


def _encoder_names(dense_state: Mapping[str, torch.Tensor]) -> dict[str, str]:
    """The encoder's tensor names -> their keys in ``dense_state``: a task model's state dict
    (`BertForSequenceClassification`, ...) nests the encoder under its family's prefix."""
    prefix = next(
        (p for p in ("bert.", "roberta.", "distilbert.") if any(k.startswith(p) for k in dense_state)), ""
    )
    return {key.removeprefix(prefix): key for key in dense_state}


class _SafetensorsTensors(Mapping[str, torch.Tensor]):
    """A checkpoint's tensors as float32, each read from its safetensors file when asked (the file's pages,
    shared by the node's ranks, not a copy per rank)."""

    def __init__(self, weight_map: dict[str, Path]):
        self._files = weight_map

    def __getitem__(self, key: str) -> torch.Tensor:
        with safe_open(self._files[key], "pt") as checkpoint:
            return checkpoint.get_tensor(key).to(torch.float32)

    def __iter__(self) -> Iterator[str]:
        return iter(self._files)

    def __len__(self) -> int:
        return len(self._files)


def upcycle_pretrained(
    source: str,
    *,
    tasks: dict[str, dict[str, Any]],
    expert_noise_std: float = 0.0,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    **architecture: Any,
) -> MegaMoEForMultiTask:
    """Upcycle a dense BERT-family checkpoint (local directory or Hub id) into a multi-task MegaMoE in
    ``dtype``.

    The backbone comes from `upcycled_tensors`; each sequence head's dense layer starts from the checkpoint's
    pooler when it has one (what `BertForSequenceClassification` does), the output layers start from the usual
    random init. One copy of the MegaMoE is built (partitioned under ZeRO-3: `partitioned_construction`) and
    filled one upcycled tensor at a time, read from the dense checkpoint's safetensors files as they come.
    """
    from ..engine.partitioned_loading import (  # imports deepspeed: only when a model is built
        checkpoint_directory,
        copy_into_partition,
        from_config,
        safetensors_weight_map,
    )

    dense_config = AutoConfig.from_pretrained(source)
    config = config_from_bert(dense_config, tasks=tasks, **architecture)
    weight_map = safetensors_weight_map(checkpoint_directory(source))
    dense_state: Mapping[str, torch.Tensor] = (
        _SafetensorsTensors(weight_map)
        if weight_map is not None
        else AutoModel.from_pretrained(source, dtype=torch.float32).state_dict()
    )
    # Seeded and initialized whole, then overwritten: the heads draw what they drew before 2026-12-01 (a
    # meta-device build initializing only the heads drew other weights, and the quickstart's test scores
    # moved: topic 0.893 -> 0.701, NER F1 0.187 -> 0.081).
    torch.manual_seed(seed)
    model = from_config(MegaMoEForMultiTask, config, dtype=dtype)
    assert isinstance(model, MegaMoEForMultiTask)
    generator = torch.Generator().manual_seed(seed)
    expected = set(model.model.state_dict())
    for name, value in upcycled_tensors(
        dense_state,
        config,
        model_type=dense_config.model_type,
        expert_noise_std=expert_noise_std,
        generator=generator,
    ):
        copy_into_partition(model.model, name, value)
        expected.discard(name)
    if expected:
        raise ValueError(f"upcycling left {sorted(expected)[:5]} of the MegaMoE unset")
    names = _encoder_names(dense_state)
    if "pooler.dense.weight" in names:
        for task, head in cast(nn.ModuleDict, model.heads).items():
            if isinstance(head, MegaMoESequenceHead):
                for param in ("weight", "bias"):
                    pooler = dense_state[names[f"pooler.dense.{param}"]]
                    copy_into_partition(model, f"heads.{task}.dense.{param}", pooler)
    return model


# sentence-transformers' Pooling modes that a MegaMoE head pools the same way.
_SENTENCE_TRANSFORMERS_POOLING = {
    "pooling_mode_cls_token": "cls",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_lasttoken": "last",
}


def sentence_transformers_pooling(source: str) -> str | None:
    """How the sentence-transformers checkpoint ``source`` (a local directory or Hub id) pools its tokens,
    as a `MegaMoEConfig.classifier_pooling`; None for a plain HF checkpoint, or a pooling heads cannot copy
    (max, mean / sqrt(length), several at once).

    all-MiniLM-L6-v2 and its kin were trained for mean pooling: their [CLS] token was never trained as a
    sentence embedding. (Measured on the quickstart, one seed: test topic 0.883 -> 0.865, sentiment 0.846 ->
    0.864, NER F1 0.209 -> 0.235 with mean pooling; within the noise on topic.)
    """
    modules = _checkpoint_file(source, "modules.json")
    if modules is None:
        return None
    pooling = [m for m in json.loads(modules.read_text()) if m.get("type", "").endswith("models.Pooling")]
    pooling_config = _checkpoint_file(source, f"{pooling[0]['path']}/config.json") if pooling else None
    if pooling_config is None:
        return None
    modes = {
        key
        for key, on in json.loads(pooling_config.read_text()).items()
        if key.startswith("pooling_mode") and on
    }
    return _SENTENCE_TRANSFORMERS_POOLING.get(modes.pop()) if len(modes) == 1 else None


def _checkpoint_file(source: str, name: str) -> Path | None:
    """``name`` in the local directory or Hub repo ``source``; None when it has none."""
    if Path(source).is_dir():
        path = Path(source) / name
        return path if path.is_file() else None
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    try:
        return Path(hf_hub_download(source, name))
    except EntryNotFoundError:
        return None


def _with_checkpoint_pooling(base: str, architecture: dict[str, Any]) -> dict[str, Any]:
    """``architecture``, its heads pooling as the checkpoint was trained to unless it says otherwise."""
    pooling = sentence_transformers_pooling(base) if "classifier_pooling" not in architecture else None
    return {**architecture, "classifier_pooling": pooling} if pooling else architecture


class UpcycleSource:
    """``init: upcycle``: ``model.base`` is a dense BERT-family encoder; ``model.architecture`` sets the MoE
    layout (experts, top-k, which layers) over the dense architecture. The sequence heads pool as a
    sentence-transformers checkpoint was trained to (`sentence_transformers_pooling`) unless the architecture
    sets ``classifier_pooling``."""

    def declared_config(self, section: ModelSection, base: str | None) -> MegaMoEConfig:
        assert base is not None  # validated by ModelSection
        architecture = _with_checkpoint_pooling(base, section.architecture)
        return config_from_bert(AutoConfig.from_pretrained(base), tasks={}, **architecture)

    def build(self, request: BuildRequest) -> MegaMoEForMultiTask:
        assert request.base is not None
        return upcycle_pretrained(
            request.base,
            tasks=request.tasks,
            expert_noise_std=request.section.expert_noise_std,
            seed=request.options.seed,
            dtype=request.options.dtype,
            **_with_checkpoint_pooling(request.base, request.section.architecture),
        )
