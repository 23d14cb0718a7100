"""Publish an export to the Hugging Face Hub with huggingface_hub: one repo, one commit of the changed files.

huggingface_hub does the work: the token (HF_TOKEN or the stored login), ``create_repo(exist_ok=True)``, and
one ``upload_folder`` commit, in which the library uploads large files through LFS or Xet as the Hub asks.
Before that, the remote files of the revision are listed and compared with the local ones (size, then the git
blob id or the LFS sha256), so pushing again uploads nothing that is unchanged, and re-running a push that
failed halfway uploads only what did not arrive. Every failure is a DPEExportError of one line; the local
export is only read, never changed.
"""
from __future__ import annotations

import hashlib
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

from dpe_export import __version__
from dpe_export.errors import DPEExportError, first_line
from dpe_export.export.files import (
    _feed,
    file_sha256,
    human_size,
    is_export_file,
    manifest_difference,
    read_manifest,
)
from dpe_export.generated import RETIRED_RUNTIME_FILES, foreign_code
from dpe_export.safefiles import check_model_tree, links_in
from dpe_export.sources.checkpoint import CONFIG_FILE, Checkpoint

logger = logging.getLogger("dpe_export")


DEFAULT_REVISION = "main"


_GLOB_SPECIAL = re.compile(r"([*?\[])")


@dataclass
class PlannedFile:
    path: str  # relative, with forward slashes
    size: int
    status: str  # "new", "changed", "unchanged", or "upload" when the remote was not checked


@dataclass
class PushPlan:
    folder: Path
    repo_id: str
    revision: str
    files: list[PlannedFile]
    remote_checked: bool
    remote_note: Optional[str] = None  # why the remote was not checked
    retired: tuple = ()  # remote files of an earlier runtime layout (dpe_core.py) that `upgrade` removed locally

    @property
    def to_upload(self) -> list[PlannedFile]:
        return [f for f in self.files if f.status != "unchanged"]


@dataclass
class PushResult:
    plan: PushPlan
    commit_url: Optional[str]  # None when nothing was uploaded
    repo_url: str


def check_export_dir(folder, include: Sequence[str] = ()) -> Path:
    """`folder` as a Path, after checking that it holds what dpe-export wrote and nothing else: its config.json
    is an export's (read first, so that a folder that is not an export is named so before anything is walked),
    no link and no hard link leads out of it (the rules of every command that reads a model directory), its
    generated code is exactly what this dpe-export writes, and every other file is one an export has, or is
    named in `include` (paths relative to the folder)."""
    folder = Path(folder)
    if not folder.exists():
        raise DPEExportError(f"export directory not found: {folder}")
    if folder.is_symlink() or not folder.is_dir():
        raise DPEExportError(f"{folder} is not a directory")
    export = Checkpoint(folder)
    try:
        if (folder / CONFIG_FILE).is_symlink():
            raise OSError
        raw = export.raw
    except (OSError, DPEExportError):
        raise DPEExportError(
            f"{folder} has no readable config.json; it is not a DPE export (give the output directory of "
            "dpe-export convert)"
        ) from None
    if not export.is_export:
        raise DPEExportError(
            f"{folder} is not a DPE export (its config.json has no dpe section); run dpe-export convert first"
        )
    links = links_in(folder)
    if links:
        raise DPEExportError(f"{links[0]} is a symbolic link; dpe-export publishes regular files only and never "
                             "follows links (replace it with the file, or remove it)")
    check_model_tree(folder)
    why = foreign_code(folder, raw)
    if why is not None:
        raise DPEExportError(f"{folder} is not as dpe-export wrote it: {why}; run `dpe-export upgrade` on it (or "
                             "convert again) before publishing")
    named = {Path(p).as_posix().strip("/") for p in include}
    present = [rel for rel, _ in local_files(folder)]
    manifest = read_manifest(folder)  # None: an export of a dpe-export before manifests; its file names decide
    for rel in present:
        if rel not in named and not (rel in manifest if manifest is not None else is_export_file(rel)):
            raise DPEExportError(f"{folder / rel} is not a file dpe-export wrote; publish it with --include {rel}, "
                                 "or remove it")
    if manifest is not None:
        why = manifest_difference(folder, manifest, present)
        if why is not None:
            raise DPEExportError(f"{folder} is not as dpe-export wrote it: {why}; convert again (or publish it "
                                 "with huggingface_hub yourself)")
    missing = sorted(n for n in named if not (folder / n).is_file())
    if missing:
        raise DPEExportError(f"--include {missing[0]}: no such file in {folder}")
    return folder


def local_files(folder: Path) -> list[tuple[str, Path]]:
    """(path in repo, local path) of every file to publish, sorted; hidden files and directories are left out."""
    out = []
    for p in sorted(folder.rglob("*")):
        rel = p.relative_to(folder)
        if any(part.startswith(".") for part in rel.parts) or not p.is_file():
            continue
        out.append((rel.as_posix(), p))
    if not out:
        raise DPEExportError(f"{folder} holds no files to upload")
    return out


def git_blob_sha1(path: Path) -> str:
    """The git object id of a file's content (what the Hub reports as `oid` of a regular file)."""
    h = hashlib.sha1()
    h.update(b"blob %d\0" % path.stat().st_size)
    _feed(h, path)
    return h.hexdigest()


def same_as_remote(local: Path, remote) -> bool:
    """Whether a local file has the content of a remote RepoFile (size first; hashes only when sizes agree)."""
    size = local.stat().st_size
    lfs = getattr(remote, "lfs", None)
    if lfs is not None:
        return lfs.size == size and lfs.sha256 == file_sha256(local)
    return remote.size == size and remote.blob_id == git_blob_sha1(local)


_REVISION = re.compile(r"^(?!.*\.\.)(?!.*//)[A-Za-z0-9][A-Za-z0-9._/-]{0,99}(?<![./])$")


def check_revision(revision: Optional[str]) -> Optional[str]:
    """A branch name the Hub accepts (letters, digits, . _ - /; no '..'), else a one-line error."""
    if revision is None:
        return None
    if not _REVISION.match(revision) or revision.endswith(".lock"):
        raise DPEExportError(f"--revision must be a branch name (letters, digits, '.', '_', '-', '/'), got {revision!r}")
    return revision


def check_repo_id(repo_id: str) -> str:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if not repo_id or repo_id.count("/") != 1:
        raise DPEExportError(f"--repo-id must be ORG/NAME (or USER/NAME), got {repo_id!r}")
    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        raise DPEExportError(f"invalid --repo-id {repo_id!r}: {first_line(e)}") from None
    return repo_id


def check_push_ready(repo_id: str, *, dry_run: bool = False, folder=None) -> Optional[str]:
    """Check what a push needs before any work: a valid repo id and, unless a dry run, network and a token.

    Returns the token (None for a dry run without one).
    """
    check_repo_id(repo_id)
    token = _token()
    if dry_run:
        return token
    if not _online():
        raise DPEExportError("cannot push: HF_HUB_OFFLINE is set; unset it to publish")
    if token is None:
        where = f"; the export at {folder} is unchanged" if folder is not None else ""
        raise DPEExportError(
            "cannot push: no Hugging Face token; set HF_TOKEN or log in with `hf auth login` "
            f"(nothing was uploaded{where})"
        )
    return token


def _api(token: Optional[str]):
    from huggingface_hub import HfApi

    return HfApi(token=token, library_name="dpe-export", library_version=__version__)


def _remote_files(api, repo_id: str, revision: str) -> dict:
    """{path: RepoFile} of the revision; {} when the repo or the revision does not exist yet."""
    from huggingface_hub.errors import RepositoryNotFoundError, RevisionNotFoundError

    try:
        return {
            f.path: f
            for f in api.list_repo_tree(repo_id, revision=revision, recursive=True)
            if hasattr(f, "blob_id")
        }
    except (RepositoryNotFoundError, RevisionNotFoundError):
        return {}


def plan_push(
    folder, repo_id: str, revision: str = DEFAULT_REVISION, *, api=None, check_remote: bool = True,
    include: Sequence[str] = (),
) -> PushPlan:
    """What a push of `folder` would upload: each file with its size and status (new / changed / unchanged)."""
    folder = check_export_dir(folder, include)
    files = local_files(folder)
    note = None
    remote = None
    if check_remote:
        try:
            remote = _remote_files(api or _api(_token()), repo_id, revision)
        except Exception as e:  # noqa: BLE001 - any failure just means "not compared"
            note = _describe_error(e, repo_id)
    planned = []
    for rel, path in files:
        size = path.stat().st_size
        if remote is None:
            status = "upload"
        elif rel not in remote:
            status = "new"
        else:
            status = "unchanged" if same_as_remote(path, remote[rel]) else "changed"
        planned.append(PlannedFile(rel, size, status))
    local = {rel for rel, _ in files}
    retired = tuple(n for n in RETIRED_RUNTIME_FILES if remote and n in remote and n not in local)
    return PushPlan(folder, repo_id, revision, planned, remote is not None, note, retired)


def push(
    folder,
    repo_id: str,
    *,
    private: bool = False,
    revision: Optional[str] = None,
    commit_message: Optional[str] = None,
    dry_run: bool = False,
    echo: Callable[[str], None] = print,
    retry_hint: Optional[str] = None,
    include: Sequence[str] = (),
) -> Optional[PushResult]:
    """Publish the export in `folder` to the Hub repo `repo_id`; DPEExportError (one line) when it fails.

    Creates the repo if needed (private with `private`; an existing repo keeps its visibility) and the branch
    `revision` if it is not main, then uploads the new and changed files in one commit. With `dry_run` it only
    prints what would be uploaded. Returns None for a dry run. `retry_hint` replaces "run the same command
    again" in the failure message. `include`: files beside the export's own that the user chose to publish.
    """
    folder = check_export_dir(folder, include)
    check_revision(revision)
    token = check_push_ready(repo_id, dry_run=dry_run, folder=folder)
    revision = revision or DEFAULT_REVISION
    if dry_run:
        plan = plan_push(folder, repo_id, revision, check_remote=_online() and _token() is not None, include=include)
        if plan.remote_note is None and not plan.remote_checked:
            plan.remote_note = "offline" if not _online() else "no token to read the repo"
        _echo_plan(plan, echo, dry_run=True)
        return None

    api = _api(token)
    try:
        repo_url = str(api.create_repo(repo_id, private=True if private else None, exist_ok=True, repo_type="model"))
        if revision != DEFAULT_REVISION:
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        plan = plan_push(folder, repo_id, revision, api=api, include=include)
        if plan.remote_note is not None:
            raise DPEExportError(plan.remote_note)
        _echo_plan(plan, echo, dry_run=False)
        if not plan.to_upload and not plan.retired:
            return PushResult(plan, None, repo_url)
        info = api.upload_folder(
            repo_id=repo_id,
            folder_path=str(folder),
            revision=revision,
            commit_message=commit_message or f"Upload DPE export (dpe-export {__version__})",
            allow_patterns=[_glob_escape(f.path) for f in plan.to_upload],
            delete_patterns=[_glob_escape(name) for name in plan.retired] or None,
            repo_type="model",
        )
    except DPEExportError as e:
        raise DPEExportError(_failed(str(e), folder, retry_hint)) from None
    except Exception as e:  # noqa: BLE001 - network, HTTP and library errors all become one line
        raise DPEExportError(_failed(_describe_error(e, repo_id), folder, retry_hint)) from None
    commit_url = getattr(info, "commit_url", None) or str(info)
    echo(f"Pushed {len(plan.to_upload)} file(s) to {repo_id} ({revision}): {commit_url}")
    return PushResult(plan, commit_url, repo_url)


_NEEDS_A_FIX = ("HTTP 401", "HTTP 403", "HF_HUB_OFFLINE", "no token")


def _failed(reason: str, folder: Path, retry_hint: Optional[str] = None) -> str:
    retry = retry_hint or "run the same command again to finish the upload"
    if any(k in reason for k in _NEEDS_A_FIX):  # running it again as it is cannot help
        retry = f"fix that first, then {retry}"
    return (
        f"push failed: {reason} (the local export at {folder} is intact; {retry}: files that arrived are not "
        "sent again)"
    )


def _glob_escape(name: str) -> str:
    """A pattern for upload_folder's allow_patterns that matches exactly `name` (fnmatch syntax)."""
    return _GLOB_SPECIAL.sub(r"[\1]", name)


def _echo_plan(plan: PushPlan, echo: Callable[[str], None], dry_run: bool) -> None:
    """Dry run: every file with its size and status. Push: the files being uploaded."""

    up = plan.to_upload
    total = sum(f.size for f in up)
    where = f"{plan.repo_id} ({plan.revision})"
    if plan.retired:
        echo(f"{'Would remove' if dry_run else 'Removing'} {', '.join(plan.retired)} from {where}: the runtime file(s) "
             "of an earlier dpe-export that this export no longer runs")
    if not dry_run and not up:
        echo(f"Nothing to upload: {where} already has all {len(plan.files)} files of {plan.folder}, unchanged.")
        return
    head = "Dry run: would upload" if dry_run else "Uploading"
    if plan.remote_checked:
        unchanged = len(plan.files) - len(up)
        echo(f"{head} {len(up)} of {len(plan.files)} file(s), {human_size(total)}, from {plan.folder} to {where}; "
             f"{unchanged} unchanged")
    else:
        echo(f"{head} {len(up)} file(s), {human_size(total)}, from {plan.folder} to {where} "
             f"(not compared with the remote: {plan.remote_note})")
    shown = plan.files if dry_run else up
    width = max(len(f.path) for f in shown)
    for f in shown:
        echo(f"  {f.path:<{width}}  {human_size(f.size):>10}  {f.status}")


def _token() -> Optional[str]:
    from huggingface_hub import get_token

    return get_token()


def _online() -> bool:
    from huggingface_hub import constants

    return not constants.HF_HUB_OFFLINE


def _describe_error(e: BaseException, repo_id: str) -> str:
    """One line saying what went wrong, for any exception huggingface_hub or the network raises."""
    from huggingface_hub import constants
    from huggingface_hub.errors import (
        HfHubHTTPError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
    )

    endpoint = constants.ENDPOINT
    if isinstance(e, DPEExportError):
        return str(e)
    if isinstance(e, OfflineModeIsEnabled):
        return "HF_HUB_OFFLINE is set; unset it to publish"
    if isinstance(e, HfHubHTTPError):
        response = getattr(e, "response", None)
        status = getattr(response, "status_code", None)
        server = getattr(e, "server_message", None) or ""
        detail = f": {' '.join(server.split())[:200]}" if server.strip() else ""
        if status == 401:
            return f"the Hub at {endpoint} rejected the token (HTTP 401); check HF_TOKEN or log in again{detail}"
        if status == 403:
            return f"no permission to write to {repo_id} (HTTP 403); the token needs write access{detail}"
        if isinstance(e, RepositoryNotFoundError) or status == 404:
            return f"repository {repo_id} not found, or the token cannot see it (HTTP 404){detail}"
        return f"the Hub at {endpoint} answered HTTP {status}{detail}" if status else f"HTTP error: {first_line(e)}"
    cause = e
    while cause is not None:  # huggingface_hub wraps upload errors (RuntimeError from a worker thread)
        if _is_network_error(cause):
            return f"network error talking to {endpoint}: {type(cause).__name__}: {first_line(cause)}"
        if isinstance(cause, HfHubHTTPError) and cause is not e:
            return _describe_error(cause, repo_id)
        cause = cause.__cause__ or cause.__context__
    return f"{type(e).__name__}: {first_line(e)}"


def _is_network_error(e: BaseException) -> bool:
    try:
        import httpx2

        if isinstance(e, httpx2.TransportError):
            return True
    except ImportError:  # pragma: no cover - older huggingface_hub uses requests / httpx
        pass
    try:
        import httpx

        if isinstance(e, httpx.TransportError):
            return True
    except ImportError:  # pragma: no cover
        pass
    return isinstance(e, (ConnectionError, TimeoutError))

