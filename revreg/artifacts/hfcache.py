"""Base models named the Hugging Face way, found in the local Hugging Face cache and never
downloaded: `org/name`, `org/name@revision` (a branch, tag or commit), or a cache repo folder
`…/models--org--name` (used like its snapshot for `refs/main`)."""

from __future__ import annotations

import re
from pathlib import Path

from revreg.errors import InputError

# The Hub's repo id rules, loosely: one optional namespace, then a name; a revision after '@'.
_REPO_ID = re.compile(r"(?:[A-Za-z0-9][\w.-]{0,95}/)?[A-Za-z0-9][\w.-]{0,95}")
_REVISION = re.compile(r"[\w.-][\w./-]{0,254}")
_COMMIT = re.compile(r"[0-9a-f]{40}")


def _inside(snapshot: Path, repo: Path) -> Path:
    """The snapshot folder, refused unless it is a real folder directly under repo/snapshots
    (a ref, revision or symlink that leads elsewhere is not the cache's model)."""
    snapshots = (repo / "snapshots").resolve()
    if snapshot.is_symlink() or snapshot.resolve().parent != snapshots or not snapshot.is_dir():
        raise InputError(f"{snapshot} is not a snapshot folder inside {snapshots}; refusing it")
    return snapshot


def is_cache_repo(path: Path) -> bool:
    """A cache repo folder: snapshots/ inside, no model files of its own."""
    return path.is_dir() and (path / "snapshots").is_dir() and not (path / "config.json").exists()


def _repo_snapshot(repo: Path, revision: str | None) -> Path:
    snapshots = repo / "snapshots"
    if revision is None:
        ref = repo / "refs" / "main"
        if ref.is_file():
            revision = ref.read_text().strip()
        else:
            found = sorted(p.name for p in snapshots.iterdir() if p.is_dir())
            if len(found) != 1:
                raise InputError(
                    f"{repo} has {len(found)} snapshots and no refs/main: name one as {repo}/snapshots/REVISION"
                )
            revision = found[0]
    elif (repo / "refs" / revision).is_file():
        revision = (repo / "refs" / revision).read_text().strip()
    if not _COMMIT.fullmatch(revision):
        raise InputError(f"revision {revision!r} of {repo} is not a 40-hex commit; refusing it")
    snapshot = snapshots / revision
    if not snapshot.is_dir():
        raise InputError(f"{repo} has no snapshot {revision}: it is not in the local cache (revreg never downloads)")
    return _inside(snapshot, repo)


def resolve_model(text: str | Path) -> Path:
    """A path that exists, a cache repo folder (its snapshot), or `org/name[@revision]` from
    the local Hugging Face cache. One clear error when none of these is found."""
    path = Path(text)
    if path.exists():
        return _repo_snapshot(path, None) if is_cache_repo(path) else path
    spec = str(text)
    repo_id, _, revision = spec.partition("@")
    if (
        not _REPO_ID.fullmatch(repo_id)
        or ".." in repo_id.split("/")
        or (revision and (not _REVISION.fullmatch(revision) or ".." in revision.split("/")))
    ):
        raise InputError(f"{spec} does not exist (and is not a Hugging Face repo id such as org/name[@revision])")
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError
    except ImportError as exc:
        raise InputError(
            f"{spec} does not exist; resolving it as a Hugging Face repo needs huggingface_hub: "
            "pip install 'revreg[hf]'"
        ) from exc
    try:
        found = snapshot_download(repo_id, revision=revision or None, local_files_only=True)
    except LocalEntryNotFoundError as exc:
        from huggingface_hub.constants import HF_HUB_CACHE

        raise InputError(
            f"{spec} is neither a path nor in the local Hugging Face cache ({HF_HUB_CACHE}); revreg never downloads: "
            f"fetch it first (huggingface-cli download {repo_id}) or pass a directory"
        ) from exc
    except (OSError, ValueError) as exc:
        raise InputError(f"cannot resolve {spec} in the local Hugging Face cache: {exc}") from exc
    found_path = Path(found)
    if not _COMMIT.fullmatch(found_path.name):
        raise InputError(f"{spec} resolved to {found_path}, which is not a snapshot of a commit; refusing it")
    return _inside(found_path, found_path.parent.parent)
