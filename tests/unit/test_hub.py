"""`push_to_hub` and the model card, end to end against a local Hub server (tests/hub_server.py).

The real huggingface_hub client runs: uploads in this process (HfApi reads `constants.ENDPOINT` when it is
constructed, so patching that attribute is enough), downloads in a fresh process with HF_ENDPOINT set
(huggingface_hub builds its download URL template from HF_ENDPOINT at import time).
"""

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml
from huggingface_hub import ModelCard
from huggingface_hub import constants as hf_constants
from transformers import AutoTokenizer

from megamoe import MegaMoEForMultiTask
from megamoe.checkpoint.hub import HubAuthError, push_to_hub
from megamoe.checkpoint.model_card import build_model_card
from megamoe.run_dir import write_json_atomic
from megamoe.tasks.metrics import ExpertUtilization
from tests.conftest import TASKS, tiny_config
from tests.hub_server import HubServer

REPO_ROOT = Path(__file__).resolve().parents[2]
TOKEN = "hf_TESTtoken0123456789secretVALUE"
BASE = "sentence-transformers/all-MiniLM-L6-v2"
TRAINING_CONFIG = {
    "model": {"init": "upcycle", "base": BASE, "architecture": {"num_experts": 4, "num_experts_per_tok": 2}},
    "tasks": {
        "topic": {"type": "sequence_classification", "source": "builtin:bbc_news"},
        "ner": {"type": "token_classification", "source": "eriktks/conll2003"},
        "sentiment": {"type": "sequence_classification", "source": "builtin:vader_sentiment"},
    },
    "train": {"max_steps": 10, "lr": 1.0e-4},
}
METRICS = {
    "topic": {
        "validation": {"accuracy": 0.9, "macro_f1": 0.88},
        "test": {"accuracy": 0.91, "macro_f1": 0.87},
    },
    "ner": {"test": {"f1": 0.31, "precision": 0.4, "recall": 0.25, "f1_PER": 0.5}},
    "sentiment": {"validation": {"accuracy": 0.81, "macro_f1": 0.8}},
}


@pytest.fixture
def hub(monkeypatch, tmp_path):
    with HubServer(token=TOKEN) as server:
        monkeypatch.setattr(hf_constants, "ENDPOINT", server.url)
        # No ambient credentials: each test says where its token comes from.
        monkeypatch.delenv("HF_TOKEN", raising=False)
        monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
        monkeypatch.setattr(hf_constants, "HF_TOKEN_PATH", str(tmp_path / "no_token"))
        monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        yield server


@pytest.fixture(scope="module")
def _built_run_dir(tmp_path_factory) -> Path:
    """A run directory as `megamoe train` leaves it: model/, metrics.json, expert_utilization.json."""
    run = tmp_path_factory.mktemp("hub") / "run"
    torch.manual_seed(0)
    model = MegaMoEForMultiTask(tiny_config()).eval()
    model.save_pretrained(run / "model")
    AutoTokenizer.from_pretrained(REPO_ROOT / "tokenizer" / "default").save_pretrained(run / "model")
    utilization = ExpertUtilization()
    for task in TASKS:
        ids = torch.randint(1, 64, (4, 9))
        utilization.update(task, model(ids, torch.ones_like(ids), task=task).router_stats)
    write_json_atomic(run / "metrics.json", METRICS)
    write_json_atomic(
        run / "expert_utilization.json",
        {"fractions": utilization.fractions(), "imbalance": utilization.imbalance()},
    )
    return run


@pytest.fixture
def run_dir(_built_run_dir, tmp_path) -> Path:
    return Path(shutil.copytree(_built_run_dir, tmp_path / "run"))


def _card(content: bytes) -> ModelCard:
    return ModelCard(content.decode())


def test_push_uploads_model_card_and_plot_and_loads_back(hub, run_dir, tmp_path):
    model_dir = run_dir / "model"
    before = sorted(p.name for p in model_dir.iterdir())
    result = push_to_hub(
        model_dir, "alice/tiny-moe", private=True, token=TOKEN, training_config=TRAINING_CONFIG
    )

    assert result.repo_url == f"{hub.url}/alice/tiny-moe" and result.url == result.repo_url
    assert not result.repo_existed and not result.private_ignored and result.changed
    assert result.repo_private is True and hub.repos["alice/tiny-moe"].private
    (create,) = hub.requests_to("POST", "/api/repos/create")
    assert create.body == {"name": "tiny-moe", "organization": "alice", "visibility": "private"}
    assert sorted(p.name for p in model_dir.iterdir()) == before, "the model directory is left as it was"

    files = hub.files("alice/tiny-moe")
    shipped = {p.name for p in model_dir.iterdir()}
    assert shipped <= set(files) and {"README.md", "expert_utilization.png"} <= set(files)
    assert {"model.safetensors", "config.json", "tokenizer.json", "modeling_megamoe.py"} <= shipped
    for name in shipped:
        assert files[name] == (model_dir / name).read_bytes(), name
    assert json.loads(files["config.json"])["tasks"] == TASKS
    assert files["expert_utilization.png"].startswith(b"\x89PNG\r\n\x1a\n")

    # The card: metadata that parses, with the model-index per task (test split, else validation).
    card = _card(files["README.md"])
    meta = card.data.to_dict()
    assert {"mixture-of-experts", "megamoe", "multi-task", "token-classification"} <= set(meta["tags"])
    assert meta["base_model"] == BASE and meta["library_name"] == "transformers"
    assert meta["license"] == "apache-2.0" and meta["datasets"] == ["eriktks/conll2003"]
    results = {(r.task_name, r.dataset_split, r.metric_type, r.metric_value) for r in card.data.eval_results}
    assert card.data.model_name == "tiny-moe"
    assert ("Token Classification (ner)", "test", "f1", 0.31) in results
    assert ("Text Classification (topic)", "test", "accuracy", 0.91) in results
    assert ("Text Classification (sentiment)", "validation", "accuracy", 0.81) in results
    assert not any(name.startswith("f1_") for _, _, name, _ in results)
    model_index = yaml.safe_load(files["README.md"].decode().split("---")[1])["model-index"]
    assert {r["task"]["name"] for r in model_index[0]["results"]} == {
        "Token Classification (ner)",
        "Text Classification (topic)",
        "Text Classification (sentiment)",
    }
    text = card.text
    assert "![Expert utilization per task](expert_utilization.png)" in text
    assert "| experts per MoE layer | 4 |" in text and "| experts per token (top-k) | 2 |" in text
    assert "active parameters per token" in text and "`B-PER`, `I-PER`" in text
    assert "AutoModel.from_pretrained(repo, trust_remote_code=True)" in text and 'task="ner"' in text
    assert "max_steps: 10" in text

    # The token went out as a Bearer header on every write and was never written anywhere.
    writes = [r for r in hub.requests if r.method == "POST" and r.path != "/api/validate-yaml"]
    assert writes and all(r.authorization == f"Bearer {TOKEN}" for r in writes)
    for content in hub.files("alice/tiny-moe").values():
        assert TOKEN.encode() not in content

    # A fresh process that never imports megamoe loads the model and tokenizer through the same endpoint.
    model = MegaMoEForMultiTask.from_pretrained(model_dir).eval()
    ids = torch.randint(1, 64, (3, 9))
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    expected = {task: model(ids, mask, task=task).logits for task in TASKS}
    tokenizer_ids = AutoTokenizer.from_pretrained(model_dir)("Hello Paris")["input_ids"]
    torch.save({"ids": ids, "mask": mask, "expected": expected, "tok": tokenizer_ids}, tmp_path / "ref.pt")
    script = textwrap.dedent(
        f"""
        import sys
        sys.modules["megamoe"] = None  # only the code shipped with the weights may be used
        import torch
        from transformers import AutoModel, AutoTokenizer

        ref = torch.load({str(tmp_path / "ref.pt")!r})
        model = AutoModel.from_pretrained("alice/tiny-moe", trust_remote_code=True).eval()
        tokenizer = AutoTokenizer.from_pretrained("alice/tiny-moe", trust_remote_code=True)
        assert type(model).__module__.startswith("transformers_modules."), type(model).__module__
        assert tokenizer("Hello Paris")["input_ids"] == ref["tok"]
        for task, logits in ref["expected"].items():
            assert torch.equal(model(ref["ids"], ref["mask"], task=task).logits, logits), task
        print("HUB_ROUND_TRIP_OK")
        """
    )
    n_before = len(hub.requests)
    env = {
        **os.environ,
        "HF_ENDPOINT": hub.url,
        "HF_HOME": str(tmp_path / "hf_home"),
        "HF_TOKEN": TOKEN,
        "HF_HUB_DISABLE_TELEMETRY": "1",
    }
    done = subprocess.run(
        [sys.executable, "-c", script], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0 and "HUB_ROUND_TRIP_OK" in done.stdout, done.stderr[-3000:]
    downloads = [r for r in hub.requests[n_before:] if "/resolve/" in r.path]
    assert {r.path.rsplit("/", 1)[1] for r in downloads} >= {
        "config.json",
        "model.safetensors",
        "tokenizer.json",
    }
    assert all(r.authorization == f"Bearer {TOKEN}" for r in downloads), "a private repo needs the token"


@pytest.mark.parametrize("xet", [True, False], ids=["xet-pipeline", "legacy-commit"])
def test_push_to_branch_and_pull_request(hub, run_dir, monkeypatch, xet):
    # With hf_xet installed, upload_folder streams through its multi-commit pipeline (which opens a pull
    # request first, then commits to refs/pr/<n>); without, one create_commit with ?create_pr=1.
    monkeypatch.setattr(hf_constants, "HF_HUB_DISABLE_XET", not xet)
    model_dir = run_dir / "model"
    monkeypatch.setenv("HF_TOKEN", TOKEN)  # the token from the environment this time
    first = push_to_hub(model_dir, "alice/tiny-moe", private=True)
    main_files = hub.files("alice/tiny-moe")

    changed = {**TRAINING_CONFIG, "train": {"max_steps": 20, "lr": 1.0e-4}}
    branch = push_to_hub(model_dir, "alice/tiny-moe", private=True, revision="exp-1", training_config=changed)
    assert branch.repo_existed and branch.private_ignored and branch.repo_private is True
    assert branch.revision == "exp-1" and branch.url == f"{hub.url}/alice/tiny-moe/tree/exp-1"
    assert branch.changed and branch.commit_url != first.commit_url
    assert hub.requests_to("POST", "/api/models/alice/tiny-moe/branch/exp-1")
    assert hub.requests_to("POST", "/api/models/alice/tiny-moe/commit/exp-1")
    assert "max_steps: 20" in _card(hub.files("alice/tiny-moe", "exp-1")["README.md"]).text
    assert hub.files("alice/tiny-moe") == main_files, "main is untouched by a branch push"
    assert hub.repos["alice/tiny-moe"].private, "the Hub keeps an existing repo's visibility"

    again = push_to_hub(model_dir, "alice/tiny-moe", revision="exp-1", training_config=changed)
    assert not again.changed and not again.private_ignored, "nothing new: no commit, private not asked"

    pr = push_to_hub(
        model_dir, "alice/tiny-moe", create_pr=True, training_config=changed, commit_message="Try"
    )
    assert pr.pr_url == f"{hub.url}/alice/tiny-moe/discussions/1" and pr.url == pr.pr_url and pr.changed
    assert "max_steps: 20" in _card(hub.files("alice/tiny-moe", "refs/pr/1")["README.md"]).text
    assert hub.files("alice/tiny-moe") == main_files, "a pull request leaves main untouched"
    if xet:
        (opened,) = hub.requests_to("POST", "/api/models/alice/tiny-moe/discussions")
        assert opened.body["pullRequest"] is True and opened.body["title"] == "Try"
        assert hub.requests_to("POST", "/api/models/alice/tiny-moe/commit/refs/pr/1")
    else:
        (commit,) = [r for r in hub.requests_to("POST", "/commit/main") if r.query.get("create_pr") == "1"]
        assert commit.body["summary"] == "Try"
    for ref in hub.repos["alice/tiny-moe"].refs:
        for content in hub.files("alice/tiny-moe", ref).values():
            assert TOKEN.encode() not in content


def test_push_errors_are_clear(hub, run_dir, tmp_path):
    model_dir = run_dir / "model"
    with pytest.raises(FileNotFoundError, match="does not exist"):
        push_to_hub(tmp_path / "nope", "alice/x", token=TOKEN)
    with pytest.raises(
        FileNotFoundError, match=r"missing config.json, \*\.safetensors\); pass <run_dir>/model"
    ):
        push_to_hub(run_dir, "alice/x", token=TOKEN)
    with pytest.raises(HubAuthError, match="no Hugging Face token"):
        push_to_hub(model_dir, "alice/x")
    with pytest.raises(HubAuthError, match="HTTP 401") as refused:
        push_to_hub(model_dir, "alice/x", token="hf_wrong_token_value")
    assert "hf_wrong_token_value" not in str(refused.value)
    with pytest.raises(ValueError, match="cannot be combined"):
        push_to_hub(model_dir, "alice/x", token=TOKEN, create_pr=True, revision="dev")
    assert "alice/x" not in hub.repos


def test_bare_repo_name_goes_to_the_token_owner(hub, run_dir):
    result = push_to_hub(run_dir / "model", "bare-moe", token=TOKEN)
    assert result.repo_id == f"{hub.user}/bare-moe" and not result.repo_existed
    assert result.repo_private is False and not result.private_ignored
    assert hub.requests_to("GET", "/api/whoami-v2")[0].authorization == f"Bearer {TOKEN}"
    assert f'repo = "{hub.user}/bare-moe"' in _card(hub.files(f"{hub.user}/bare-moe")["README.md"]).text


def test_card_without_run_files_or_matplotlib(run_dir, tmp_path, monkeypatch):
    bare = tmp_path / "bare"
    (run_dir / "model").rename(bare)
    for module in ("matplotlib", "matplotlib.figure", "matplotlib.backends.backend_agg"):
        monkeypatch.setitem(sys.modules, module, None)
    card = build_model_card(bare, repo_id="alice/bare", out_dir=tmp_path / "out")
    assert "No `metrics.json`" in card.text and "No `expert_utilization.json`" in card.text
    assert card.data.eval_results is None and card.data.base_model is None
    assert "mixture-of-experts" in card.data.tags

    # With utilization but no matplotlib: the card says the plot was skipped; list-per-layer form accepted.
    write_json_atomic(tmp_path / "expert_utilization.json", {"fractions": {"topic": [[0.5, 0.5, 0, 0]] * 2}})
    card = build_model_card(bare, run_dir=tmp_path, out_dir=tmp_path / "out")
    assert "plot was skipped: matplotlib is not installed" in card.text
    assert not (tmp_path / "out" / "expert_utilization.png").exists()


@pytest.mark.parametrize(
    ("base", "expected"),
    [
        ("builtin:all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2"),
        ("org/dense-encoder", "org/dense-encoder"),
        ("LOCAL_DIR", None),
    ],
)
def test_card_base_model_from_the_run_config(run_dir, base, expected):
    base = str(run_dir) if base == "LOCAL_DIR" else base
    card = build_model_card(run_dir / "model", training_config={"model": {"base": base}})
    assert card.data.base_model == expected


def test_cli_push_prints_the_url_and_when_private_was_ignored(hub, run_dir, monkeypatch, capsys):
    from megamoe.cli import main

    model_dir = str(run_dir / "model")
    assert main(["push", model_dir, "alice/cli-moe", "--private"]) == 2
    assert "no Hugging Face token" in capsys.readouterr().err
    monkeypatch.setenv("HF_TOKEN", "hf_not_the_right_one")
    assert main(["push", model_dir, "alice/cli-moe"]) == 2
    err = capsys.readouterr().err
    assert "refused the token (HTTP 401)" in err and "hf_not_the_right_one" not in err
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    assert main(["push", str(run_dir / "missing"), "alice/cli-moe"]) == 2
    assert "missing does not exist: give a model directory" in capsys.readouterr().err
    assert main(["push", str(run_dir / "model" / "config.json"), "alice/cli-moe"]) == 2
    assert "config.json is a file, not a model directory" in capsys.readouterr().err

    assert main(["push", model_dir, "alice/cli-moe", "--private"]) == 0
    out = capsys.readouterr().out
    assert out.strip() == f"pushed to {hub.url}/alice/cli-moe" and hub.repos["alice/cli-moe"].private
    assert main(["push", model_dir, "alice/cli-moe", "--private", "--revision", "dev"]) == 0
    out = capsys.readouterr().out
    assert "already existed, so --private was ignored" in out and "it stays private" in out
    assert out.strip().endswith(f"pushed to {hub.url}/alice/cli-moe/tree/dev")
    assert main(["push", model_dir, "alice/cli-moe", "--create-pr", "--base-model", "org/base"]) == 0
    assert capsys.readouterr().out.strip() == f"opened pull request {hub.url}/alice/cli-moe/discussions/1"
    assert TOKEN not in out


@pytest.mark.parametrize("repo_id", ["alice/offline-moe", "offline-moe"])
def test_cli_push_without_network_is_one_line_without_the_token(run_dir, monkeypatch, capsys, repo_id):
    from megamoe.cli import main

    monkeypatch.setattr(hf_constants, "ENDPOINT", "http://127.0.0.1:9")  # the discard port: nobody answers
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    model_dir = run_dir / "model"
    before = sorted(model_dir.rglob("*"))
    assert main(["push", str(model_dir), repo_id]) == 1
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.count("\n") == 1
    assert captured.err.startswith(
        f"error: cannot reach the Hub at http://127.0.0.1:9 to push {repo_id} (ConnectError: "
    )
    assert "nothing was uploaded: check the network connection" in captured.err
    assert TOKEN not in captured.err
    assert sorted(model_dir.rglob("*")) == before
