"""manifest.json: the list of a finished directory's files with their sizes and sha256.

Written last into checkpoints, stage-2 `final/` directories and exports (inside the temporary
directory, before it is renamed into place), and checked before anything is loaded from them: a
file that was truncated, flipped or swapped since is refused in one line naming it. The manifest
also holds a hash of its own file list, so a damaged manifest that still parses is refused too.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Optional

from dist_secvec.errors import UserError
from dist_secvec.files import file_record, sha256_file

MANIFEST = "manifest.json"


def _files_digest(files: dict) -> str:
    return hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()


def write_manifest(d: Path) -> dict:
    d = Path(d)
    files = {}
    for p in sorted(d.rglob("*")):
        if p.is_file() and p.relative_to(d) != Path(MANIFEST):
            files[str(p.relative_to(d))] = file_record(p)
    manifest = {"files": files, "files_sha256": _files_digest(files)}
    # a plain write: always inside atomic_dir (or a checkpoint's tmp dir), whose tree fsync covers it
    (d / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


def verify_manifest(d: Path, what: str = "directory", fix: str = "re-create or re-copy it",
                    missing_fix: Optional[str] = None, error: type = UserError, hashes: bool = True) -> None:
    """Every file the manifest lists exists with its size and hash; else one line naming the file.
    `what` names the directory's kind ("checkpoint", "model directory"), `fix` what to do.
    hashes=False checks the sizes only: seconds instead of reading every byte (a preflight)."""
    d = Path(d)
    m = d / MANIFEST
    if not m.is_file():
        raise error(f"{what} '{d}' has no {MANIFEST}: it was not completely written; {missing_fix or fix}")
    try:
        manifest = json.loads(m.read_text())
        files = manifest["files"]
        ok = (isinstance(files, dict) and manifest["files_sha256"] == _files_digest(files)
              and all(isinstance(w, dict) and isinstance(w.get("size"), int) and isinstance(w.get("sha256"), str)
                      for w in files.values()))
    except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError, OSError) as e:
        raise error(f"{what} '{d}': file '{MANIFEST}' is corrupted ({type(e).__name__}); {fix}")
    if not ok:
        raise error(f"{what} '{d}': file '{MANIFEST}' is corrupted (its file list does not match its own "
                    f"sha256); {fix}")
    for rel, want in files.items():
        p = d / rel
        if not p.is_file():
            raise error(f"{what} '{d}': file '{rel}' is missing; {fix}")
        if p.stat().st_size != want["size"] or (hashes and sha256_file(p) != want["sha256"]):
            raise error(f"{what} '{d}': file '{rel}' is corrupted (size or sha256 differs from {MANIFEST}); {fix}")
