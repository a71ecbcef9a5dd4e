"""The committed SentencePiece tokenizer, its training script, and every config in configs/."""

import importlib.util
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from megamoe.config import load_config
from megamoe.data.tokenization import tokenize_token_batch, word_predictions
from megamoe.model import MegaMoEConfig

ROOT = Path(__file__).resolve().parents[2]


def load_script():
    spec = importlib.util.spec_from_file_location(
        "train_tokenizer", ROOT / "tokenizer" / "train_tokenizer.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_committed_tokenizer_aligns_wnut_words():
    tokenizer = AutoTokenizer.from_pretrained(ROOT / "tokenizer" / "default")
    assert len(tokenizer) == 8000 and tokenizer.is_fast
    words = ["@paulwalk", "It", "'s", "the", "Empire", "State", "Building", "=", "ESB", "."]
    tags = ["O", "O", "O", "O", "B-facility", "I-facility", "I-facility", "O", "B-facility", "O"]
    labels = ["O", "B-facility", "I-facility"]
    out = tokenize_token_batch(
        {"tokens": [words], "tags": [tags]}, [0], tokenizer, max_length=64, label_list=labels, where="t"
    )
    assert (
        out["input_ids"][0][0] == tokenizer.cls_token_id and out["input_ids"][0][-1] == tokenizer.sep_token_id
    )
    back = word_predictions(out["word_ids"][0], out["labels"][0], len(words))
    assert [labels[i] for i in back] == tags
    assert tokenizer.unk_token_id not in out["input_ids"][0]


@pytest.mark.parametrize("model_type", ["unigram", "bpe"])
def test_training_script_makes_a_loadable_tokenizer(tmp_path, model_type):
    texts = ["Lionel Messi scored twice for Inter Miami", "Shares of Nvidia rose in early trading"] * 50
    load_script().train_tokenizer(texts, tmp_path, vocab_size=60, model_type=model_type)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    encoded = tokenizer(["Messi", "scored"], is_split_into_words=True)
    pieces = tokenizer.convert_ids_to_tokens(encoded["input_ids"])
    assert pieces[0] == "[CLS]" and pieces[-1] == "[SEP]"
    assert set(encoded.word_ids()) == {None, 0, 1}


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_config_validates(path):
    config = load_config(path)
    # The architecture section must be valid MegaMoEConfig arguments too.
    MegaMoEConfig(**config.model.architecture, tasks={"t": {"type": "sequence_regression"}})
