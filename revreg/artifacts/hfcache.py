"""Base models named the Hugging Face way, found in the local Hugging Face cache and never
downloaded: `org/name`, `org/name@revision` (a branch, tag or commit), or a cache repo folder
`…/models--org--name` (used like its snapshot for `refs/main`).

The cache layout is the one huggingface_hub writes: `models--org--name/refs/<branch or tag>`
holds a 40-hex commit, `snapshots/<commit>/` holds the files, each a link into the repo's
`blobs/`. Both forms are resolved here by the same rules, and whatever leads out of that layout
(a ref that is not a commit, a symlinked repo or snapshot folder, a file linked outside the
repo's blobs) is refused: the cache is a directory anyone with write access can arrange.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from revreg.errors import InputError

# The Hub's repo id rules, loosely: one optional namespace, then a name; a revision after '@'.
_NAME = re.compile(r"[A-Za-z0-9][\w.-]{0,95}")
_REVISION = re.compile(r"[\w.-][\w.-]{0,254}(?:/[\w.-]{1,255}){0,8}")
_COMMIT = re.compile(r"[0-9a-f]{40}")


def is_cache_repo(path: Path) -> bool:
    """A cache repo folder: snapshots/ inside, no model files of its own."""
    return path.is_dir() and (path / "snapshots").is_dir() and not (path / "config.json").exists()


def cache_dir() -> Path:
    """$HF_HUB_CACHE, else $HF_HOME/hub, else ~/.cache/huggingface/hub (huggingface_hub's rule),
    read when asked so a changed environment counts."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "huggingface")
    return Path(home).expanduser() / "hub"


def _snapshot(repo: Path, revision: str | None, label: str) -> Path:
    """The snapshot of `revision` (default: refs/main, else the only snapshot) in a cache repo
    folder, checked to be inside that repo's layout."""
    for part in (repo, repo / "snapshots"):
        if part.is_symlink():
            raise InputError(f"{part} is a symbolic link; a cache repo folder and its snapshots/ must be real folders")
    snapshots = repo / "snapshots"
    if not snapshots.is_dir():
        raise InputError(f"{label} is not in the local Hugging Face cache ({cache_dir()}); revreg never downloads")
    if revision is None and not (repo / "refs" / "main").is_file():
        found = sorted(p.name for p in snapshots.iterdir() if p.is_dir())
        if len(found) != 1:
            raise InputError(f"{repo} has {len(found)} snapshots and no refs/main: name one as {label}@COMMIT")
        revision = found[0]
    revision = revision or "main"
    if not _COMMIT.fullmatch(revision):
        ref = repo / "refs" / revision
        if not ref.is_file() or ref.is_symlink():
            raise InputError(f"{label} has no revision {revision!r} in the local cache (revreg never downloads)")
        revision = ref.read_text(errors="replace").strip()
        if not _COMMIT.fullmatch(revision):
            raise InputError(f"{ref} does not hold a 40-hex commit; refusing it")
    snapshot = snapshots / revision
    if snapshot.is_symlink() or not snapshot.is_dir():
        raise InputError(f"{label} has no snapshot folder {revision} in the local cache (revreg never downloads)")
    blobs = (repo / "blobs").resolve()
    for entry in snapshot.rglob("*"):
        if entry.is_symlink() and not entry.resolve().is_relative_to(blobs):
            raise InputError(f"{entry} links outside {blobs}; refusing a snapshot that is not the cache's own files")
    return snapshot


def resolve_model(text: str | Path) -> Path:
    """A path that exists, a cache repo folder (its snapshot), or `org/name[@revision]` from
    the local Hugging Face cache. One clear error when none of these is found."""
    path = Path(text)
    if path.exists():
        return _snapshot(path, None, str(path)) if is_cache_repo(path) else path
    spec = str(text)
    repo_id, _, revision = spec.partition("@")
    names = repo_id.split("/")
    if (
        not 1 <= len(names) <= 2
        or not all(_NAME.fullmatch(n) and n not in (".", "..") for n in names)
        or (revision and (not _REVISION.fullmatch(revision) or ".." in revision.split("/")))
    ):
        raise InputError(f"{spec} does not exist (and is not a Hugging Face repo id such as org/name[@revision])")
    repo = cache_dir() / ("models--" + "--".join(names))
    if not repo.exists():
        raise InputError(
            f"{spec} is neither a path nor in the local Hugging Face cache ({cache_dir()}); revreg never downloads: "
            f"fetch it first (huggingface-cli download {repo_id}) or pass a directory"
        )
    return _snapshot(repo, revision or None, repo_id)
