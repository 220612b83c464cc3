"""Writing files so that a crash, a kill or a power loss never leaves half of one; their hashes.

`write_text_atomic` replaces one file, `atomic_dir` a whole directory: a reader sees the previous
version or the complete new one. `file_record` (size and sha256) is what manifest.json and
secvec.json's "files" list for each file. A failed write (disk full, no permission) becomes a
one-line UserError through `save_error`.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Iterator, Optional


def fsync_dir(d: Path) -> None:
    """Make a directory's entries (a rename into it, new files) durable."""
    fd = os.open(d, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno != errno.EINVAL:  # file systems that cannot sync a directory say EINVAL: nothing to do
            raise
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """fsync every file under `root`, then its directories bottom-up, so that after a power loss a
    directory renamed into place holds its files with their content, never empty or short ones."""
    for d, _, files in os.walk(root, topdown=False):
        for name in files:
            fd = os.open(os.path.join(d, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(Path(d))


def write_text_atomic(path: Path, text: str) -> None:
    """Write `text` to `path` so that a reader sees the old file or the whole new one, never half:
    a temporary sibling, fsynced, renamed over `path`, then the directory fsynced."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)  # the rename itself


def _recover_killed_save(final: Path) -> None:
    """Leftovers of a save that was killed: half-written `.tmp-*` siblings go; an `.old-*` sibling
    (killed between moving the previous version aside and renaming the new one in) is put back
    when `final` is missing, else removed."""
    for p in final.parent.glob(f".{final.name}.tmp-*"):
        shutil.rmtree(p, ignore_errors=True)
    for p in sorted(final.parent.glob(f".{final.name}.old-*"), key=lambda q: q.stat().st_mtime):
        if not final.exists():
            p.rename(final)
        else:
            shutil.rmtree(p, ignore_errors=True)


@contextlib.contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Write a directory under a temporary name and rename it into place only when complete.

    A crash leaves the previous `final` untouched and at most a `.tmp-*` sibling behind, so a
    half-written directory is never mistaken for a finished one. Files and directories are fsynced
    before the rename and the parent after it, so a power loss cannot leave a renamed `final` with
    empty or short files either. A write that fails (disk full,
    file too large, no permission) removes the temporary directory and ends in a one-line
    `UserError` naming `final` (see `save_error`), the previous `final` untouched.
    """
    final = Path(final)
    tmp = final.parent / f".{final.name}.tmp-{os.getpid()}"
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        _recover_killed_save(final)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
    except OSError as e:
        raise save_error(final, e) from e
    try:
        yield tmp
        fsync_tree(tmp)  # content on disk before the rename makes it visible as finished
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        err = save_error(final, e)
        if err is not None:
            raise err from e
        raise
    old = final.parent / f".{final.name}.old-{os.getpid()}"
    try:
        if final.exists():
            final.rename(old)
        tmp.rename(final)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if old.exists() and not final.exists():
            old.rename(final)  # the previous version back in place
        raise save_error(final, e) from e
    if old.exists():
        shutil.rmtree(old, ignore_errors=True)
    fsync_dir(final.parent)  # the rename itself


# ---------------------------------------------------------------------------------------------
# the cache shared by runs

def cache_root() -> Path:
    """Where runs share what they build once (the demo's aligned base, converted GGUF checkpoints,
    the real-model world's files): $DIST_SECVEC_CACHE, else ~/.cache/dist-secvec."""
    return Path(os.environ.get("DIST_SECVEC_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "dist-secvec"))


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """An exclusive lock on `path` (created if missing), held for the block: ranks and concurrent
    runs that build the same cache entry take turns, and the first one builds it."""
    import fcntl

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


# ---------------------------------------------------------------------------------------------
# hashes

def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def file_record(path: Path) -> dict:
    """A file's size and sha256, as manifest.json and secvec.json's "files" record each file."""
    return {"size": os.path.getsize(path), "sha256": sha256_file(path)}


# ---------------------------------------------------------------------------------------------
# failed writes as user errors

_NO_SPACE = {errno.ENOSPC, errno.EFBIG, getattr(errno, "EDQUOT", errno.ENOSPC)}
_NO_ACCESS = {errno.EACCES, errno.EPERM, errno.EROFS}


def _os_errno(e: BaseException) -> Optional[int]:
    """The errno of an OSError, of a library error that wraps one in its message (safetensors:
    "I/O error: File too large (os error 27)"), or of one raised while handling an OSError
    (torch.save into a file object: "unexpected pos ..." with the OSError as its context)."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno is not None:
            return e.errno
        m = re.search(r"\(os error (\d+)\)", str(e))
        if m:
            return int(m.group(1))
        e = e.__cause__ or e.__context__
    return None


def write_failure(e: BaseException) -> Optional[str]:
    """Why a write failed and what to do, for an I/O error (disk full, file too large, no
    permission, ...); None for anything else (a bug, or a UserError that speaks for itself)."""
    from dist_secvec.errors import UserError

    if isinstance(e, UserError):
        return None
    code = _os_errno(e)
    if code is None:
        return None
    if code in _NO_SPACE:
        return (f"the disk is full or the file is too large ({os.strerror(code)}); free space or raise the "
                "file-size limit (ulimit -f), then rerun")
    if code in _NO_ACCESS:
        return f"no permission to write there ({os.strerror(code)}); choose a writable output_dir"
    return f"{type(e).__name__}: {os.strerror(code)}; check the file system, then rerun"


def save_error(final: Path, e: BaseException):
    """A one-line UserError for a failed write of `final`, or None when `e` is no I/O error."""
    from dist_secvec.errors import UserError

    why = write_failure(e)
    if why is None:
        return None
    return UserError(f"cannot save '{final}': {why} (nothing was written; any previous version is unchanged)")
