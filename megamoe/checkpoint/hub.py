"""`megamoe push`: a MegaMoE model directory, with its generated model card, to the Hugging Face Hub.

What is uploaded: every file of the model directory (safetensors weights, config.json with the label set of
each task, the tokenizer, the remote-code ``.py`` files that make ``AutoModel.from_pretrained(repo,
trust_remote_code=True)`` work), plus a ``README.md`` model card and its ``expert_utilization.png`` built by
`build_model_card`. The card and plot are written into a temporary staging directory whose other entries
link to the model directory's files: the model directory itself is never modified, and the weights are not
copied (symlinks, or a copy where the filesystem has none). A ``README.md`` / ``expert_utilization.png``
already in the model directory is replaced by the generated one in the upload.

Authentication: the ``token`` argument, else ``HF_TOKEN``, else the token saved by ``hf auth login``. It
is only handed to `huggingface_hub.HfApi`; it is never printed, logged or written into the card.
The endpoint is huggingface_hub's (``HF_ENDPOINT``, default https://huggingface.co).
"""

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from huggingface_hub import HfApi, get_token
from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

from .model_card import PLOT_FILENAME, save_model_card

try:  # the HTTP client's error for a server that cannot be reached: httpx2 (huggingface_hub 2), else httpx
    from httpx2 import TransportError
except ImportError:
    from httpx import TransportError  # type: ignore[no-redef]

DEFAULT_BRANCH = "main"
_GENERATED = {"README.md", PLOT_FILENAME}


class HubAuthError(RuntimeError):
    """No Hugging Face token was found, or the Hub rejected it (HTTP 401 / 403)."""


class HubUnreachableError(ConnectionError):
    """The Hub did not answer: no network, a wrong ``HF_ENDPOINT``, a proxy, or offline mode."""


@dataclass(frozen=True)
class PushResult:
    """Where a push landed, and what the caller should tell the user."""

    repo_id: str
    repo_url: str
    commit_url: str
    pr_url: str | None
    """The pull request opened by ``create_pr=True``; None otherwise."""
    revision: str
    """The branch committed to (``main`` unless ``revision`` was given); a PR's ref is in ``pr_url``."""
    repo_existed: bool
    private_ignored: bool
    """``private`` was given but the repo already existed: the Hub keeps an existing repo's visibility."""
    repo_private: bool | None
    """The repo's visibility, when the Hub reported it."""
    changed: bool
    """False when every file was already there: the client then makes no commit and opens no pull request."""

    @property
    def url(self) -> str:
        """The page to show: the pull request, the branch, or the repo."""
        if self.pr_url is not None:
            return self.pr_url
        if self.revision != DEFAULT_BRANCH:
            return f"{self.repo_url}/tree/{self.revision}"
        return self.repo_url


def push_to_hub(
    model_dir: str | Path,
    repo_id: str,
    *,
    private: bool | None = None,
    revision: str | None = None,
    create_pr: bool = False,
    token: str | None = None,
    commit_message: str | None = None,
    **card_kwargs: Any,
) -> PushResult:
    """Upload ``model_dir`` and its model card to the Hub repo ``repo_id`` (created if missing).

    Args:
        model_dir: An HF directory written by ``megamoe train`` / ``megamoe export`` (``<run_dir>/model``).
        repo_id: ``namespace/name``; a bare ``name`` goes to the token owner's namespace.
        private: Visibility for a new repo (None: the Hub's default, public unless the organization says
            otherwise). Ignored by the Hub when the repo exists: see `PushResult.private_ignored`.
        revision: Branch to commit to; created from ``main`` when missing. ``refs/pr/<n>`` pushes to an
            existing pull request.
        create_pr: Open a pull request against ``main`` with the upload instead of committing to it.
        token: Hub token; default ``HF_TOKEN``, then the ``hf auth login`` token.
        commit_message: Commit (or pull request) title.
        **card_kwargs: Passed to `build_model_card` (``base_model``, ``datasets``, ``training_config``,
            ``license``, ``run_dir``).

    Raises:
        FileNotFoundError: ``model_dir`` is not a model directory.
        ValueError: ``create_pr`` with a ``revision`` other than ``main`` (a pull request targets ``main``),
            or a card the Hub's metadata validation rejects.
        HubAuthError: no token, or the Hub rejected it.
        HubUnreachableError: the Hub could not be reached.
        huggingface_hub.errors.HfHubHTTPError: any other Hub error.
    """
    model_dir = Path(model_dir)
    _check_model_dir(model_dir)
    if create_pr and revision not in (None, DEFAULT_BRANCH):
        raise ValueError(
            f"create_pr opens a pull request against {DEFAULT_BRANCH!r}; it cannot be combined with "
            f"revision={revision!r}"
        )
    token = token or get_token()
    if token is None:
        raise HubAuthError(
            "no Hugging Face token: set HF_TOKEN or log in with `hf auth login` (a token with write access)"
        )
    api = HfApi(token=token)
    if "/" not in repo_id:
        with _hub_errors(api, repo_id):
            repo_id = f"{api.whoami()['name']}/{repo_id}"
    branch = revision or DEFAULT_BRANCH

    with tempfile.TemporaryDirectory(prefix="megamoe-push-") as tmp:
        # 1. Stage: the model files (linked) + the card and its plot, built before anything changes on the Hub.
        staging = Path(tmp)
        _link_tree(model_dir, staging)
        save_model_card(model_dir, out_dir=staging, repo_id=repo_id, **card_kwargs)

        with _hub_errors(api, repo_id):
            # 2. The repo: create it, or learn that it existed (the Hub then ignores `private`).
            repo_existed = _create_repo(api, repo_id, private)
            # 3. The branch: the Hub does not create one on commit.
            if branch != DEFAULT_BRANCH and not branch.startswith("refs/"):
                api.create_branch(repo_id, branch=branch, exist_ok=True)
            before = api.repo_info(repo_id, revision=branch)
            # 4. One upload of the staged folder (a commit, or a pull request with `create_pr`).
            commit = api.upload_folder(
                repo_id=repo_id,
                folder_path=staging,
                revision=revision,
                create_pr=create_pr,
                commit_message=commit_message or "Upload MegaMoE model with megamoe push",
            )

    return PushResult(
        repo_id=repo_id,
        repo_url=f"{api.endpoint}/{repo_id}",
        commit_url=commit.commit_url,
        pr_url=commit.pr_url,
        revision=branch,
        repo_existed=repo_existed,
        private_ignored=repo_existed and private is not None,
        repo_private=before.private,
        changed=commit.oid != before.sha,
    )


def _check_model_dir(model_dir: Path) -> None:
    if not model_dir.is_dir():
        what = "is a file, not" if model_dir.is_file() else "does not exist: give"
        raise FileNotFoundError(f"{model_dir} {what} a model directory")
    missing = [] if (model_dir / "config.json").is_file() else ["config.json"]
    if not any(model_dir.glob("*.safetensors")):
        missing.append("*.safetensors")
    if missing:
        raise FileNotFoundError(
            f"{model_dir} is not an exported model directory (missing {', '.join(missing)}); "
            "pass <run_dir>/model, or write one with `megamoe export`"
        )


def _link_tree(source: Path, staging: Path) -> None:
    """Mirror ``source``'s files into ``staging`` as symlinks (copies where symlinks are unavailable),
    leaving out what the card replaces."""
    for path in sorted(source.rglob("*")):
        relative = path.relative_to(source)
        if not path.is_file() or relative.as_posix() in _GENERATED:
            continue
        target = staging / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.symlink(path.resolve(), target)
        except OSError:
            shutil.copy2(path, target)


def _create_repo(api: HfApi, repo_id: str, private: bool | None) -> bool:
    """Create ``repo_id``; True when it already existed."""
    try:
        api.create_repo(repo_id, private=private, exist_ok=False)
        return False
    except HfHubHTTPError as err:
        if err.response.status_code == 409:
            return True
        if err.response.status_code in (401, 403):
            # A token may write to an existing repo without the right to create repos in the namespace.
            try:
                api.repo_info(repo_id)
            except HfHubHTTPError:
                raise err from None
            return True
        raise


@contextmanager
def _hub_errors(api: HfApi, repo_id: str) -> Iterator[None]:
    """Turn the Hub's 401 / 403 answers into `HubAuthError` and no answer at all into `HubUnreachableError`
    (neither message holds the token: it travels in a header, which errors do not show)."""
    try:
        yield
    except (TransportError, OfflineModeIsEnabled) as err:
        raise HubUnreachableError(
            f"cannot reach the Hub at {api.endpoint} to push {repo_id} ({type(err).__name__}: {err}); nothing "
            "was uploaded: check the network connection (and HF_ENDPOINT, a proxy, HF_HUB_OFFLINE), then run "
            "the push again"
        ) from None
    except HfHubHTTPError as err:
        status = err.response.status_code if err.response is not None else None
        if status not in (401, 403):
            raise
        detail = err.server_message or str(err).splitlines()[0]
        raise HubAuthError(
            f"the Hub refused the token (HTTP {status}) for {repo_id}: {detail}. Check that HF_TOKEN (or the "
            "`hf auth login` token) is valid and has write access to this namespace."
        ) from err
