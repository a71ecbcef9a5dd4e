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
