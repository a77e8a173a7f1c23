"""Where outputs go: checked before any work, staged, and moved into place whole.

Invariants every writer of this package keeps (``io.save``, ``export_onnx``, ``save_hf``, the
command line and the demo):

1. the destination is checked before the work starts (``check_destination``): a parent that is
   a file, an unwritable folder, or an existing output without ``overwrite`` is a one-line
   error, and nothing is written;
2. everything is written into one staging folder ``.subclone-staging-<pid>-<hex>`` beside the
   destination and moved into place with ``os.replace`` only when every part succeeded; the
   staging folder is removed on success and on failure;
3. a staging folder left by a killed process (its pid no longer runs) is removed by the next
   writer into the same folder (``remove_stale_staging``);
4. ``overwrite`` never deletes what this package did not write: a folder output (the Hugging
   Face checkpoint, the command line's output folder) lists what it wrote in
   ``.subclone-manifest.json``, and a folder holding any other file is refused, not emptied.
   An existing *empty* folder may always be written into. A file is never turned into a folder.
"""
from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
from pathlib import Path

__all__ = ["STAGING_PREFIX", "MANIFEST", "check_destination", "check_outputs", "write_all", "staging_folder",
           "remove_stale_staging",
           "write_manifest", "read_manifest", "foreign_files", "replace_with"]

STAGING_PREFIX = ".subclone-staging-"
MANIFEST = ".subclone-manifest.json"


def _pid_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:       # someone else's process: alive
        return True
    return True


def remove_stale_staging(folder: Path) -> list[Path]:
    """Remove staging folders in ``folder`` whose process is gone; return what was removed."""
    removed = []
    if not folder.is_dir():
        return removed
    for path in folder.glob(STAGING_PREFIX + "*"):
        pid = path.name[len(STAGING_PREFIX):].split("-")[0]
        if pid.isdigit() and int(pid) != os.getpid() and not _pid_running(int(pid)):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def _nearest_existing(path: Path) -> Path:
    for candidate in [path, *path.parents]:
        if candidate.exists():
            return candidate
    return Path(".")


def read_manifest(folder: Path) -> list[str]:
    """The relative paths a previous run wrote into ``folder`` (empty when there is no manifest)."""
    file = folder / MANIFEST
    if not file.is_file():
        return []
    try:
        names = json.loads(file.read_text(encoding="utf-8"))["written"]
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        return []
    return [n for n in names if isinstance(n, str)]


def write_manifest(folder: Path, names=None) -> None:
    """List every file under ``folder`` (or ``names``) as written by this package."""
    if names is None:
        names = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
    names = sorted(set(names) - {MANIFEST})
    (folder / MANIFEST).write_text(json.dumps({"written": names}, indent=1) + "\n", encoding="utf-8")


def foreign_files(folder: Path, also_ours=()) -> list[str]:
    """Files under ``folder`` that no manifest (its own, or ``also_ours``) lists."""
    ours = set(read_manifest(folder)) | set(also_ours) | {MANIFEST}
    found = []
    for path in sorted(folder.rglob("*")):
        name = str(path.relative_to(folder))
        if path.is_file() and name not in ours and not any(name.startswith(o + os.sep) for o in ours):
            found.append(name)
    return found


def check_destination(path, *, overwrite: bool, folder: bool = False, option: str = "overwrite=True") -> Path:
    """Refuse, before any work, an output ``path`` that cannot or must not be written (see doc)."""
    path = Path(path)
    existing = _nearest_existing(path.parent)
    if not existing.is_dir():
        raise NotADirectoryError(f"cannot write {path}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise PermissionError(f"cannot write {path}: {existing} is not writable")
    if not path.exists() and not path.is_symlink():
        return path
    if folder and not path.is_dir():
        raise FileExistsError(f"{path} exists and is a file, not a folder; refusing to replace it")
    if not folder and path.is_dir():
        raise FileExistsError(f"{path} exists and is a folder, not a file; refusing to replace it")
    if folder and not any(path.iterdir()):
        return path                              # an empty folder is safe to write into
    if not overwrite:
        raise FileExistsError(f"{path} exists; pass {option} to replace it")
    if folder:
        foreign = foreign_files(path)
        if foreign:
            raise FileExistsError(f"{path} holds {foreign[0]!r}, which subclone_graph did not write; "
                                  f"refusing to replace the folder (move it away first)")
    return path


@contextlib.contextmanager
def staging_folder(parent: Path):
    """A fresh staging folder in ``parent`` (normal permissions), removed when the block ends."""
    parent = Path(parent)
    parent.mkdir(parents=True, exist_ok=True)
    remove_stale_staging(parent)
    staging = parent / f"{STAGING_PREFIX}{os.getpid()}-{secrets.token_hex(4)}"
    staging.mkdir()              # the umask applies (0755 usually), unlike mkdtemp's 0700
    try:
        yield staging
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def replace_with(staged: Path, path: Path, staging: Path) -> None:
    """Move ``staged`` to ``path``; an existing folder at ``path`` is moved into ``staging`` first
    (and goes with it). ``path`` was checked by ``check_destination``."""
    if path.is_dir() and not path.is_symlink():
        if any(path.iterdir()):
            os.replace(path, staging / f"old-{secrets.token_hex(4)}")
        else:
            path.rmdir()
    os.replace(staged, path)


def check_outputs(out_dir, names: dict[str, bool], *, overwrite: bool, option: str = "overwrite=True") -> Path:
    """Check, before any work, that ``out_dir`` can take the outputs ``names`` (name -> is a folder).

    Without ``overwrite``, an existing output — or any output of a previous run listed in
    ``out_dir``'s manifest, which would otherwise be left beside this run's — is refused.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise NotADirectoryError(f"cannot write into {out_dir}: it is a file, not a folder")
    for name, is_folder in names.items():
        check_destination(out_dir / name, overwrite=overwrite, folder=is_folder, option=option)
    if not overwrite and out_dir.is_dir():
        for name in read_manifest(out_dir):
            if (out_dir / name).exists():
                raise FileExistsError(f"{out_dir / name} exists (written by an earlier run); pass {option} "
                                      f"to replace that run's outputs")
    return out_dir


def _remove_previous(out_dir: Path, written: list[str], staging: Path) -> None:
    """Outputs of the previous run that this run did not write go (never a foreign file)."""
    for name in read_manifest(out_dir):
        path = out_dir / name
        if name in written or not path.exists() or (path.is_dir() and foreign_files(path)):
            continue
        os.replace(path, staging / f"previous-{secrets.token_hex(4)}")


def write_all(out_dir, writers: dict, *, overwrite: bool, folders=(), option: str = "overwrite=True") -> dict:
    """Run ``writers`` (name -> ``write(path)``) into one staging folder; move the set into
    ``out_dir`` only when every one succeeded; return their results by name (see module doc)."""
    out_dir = check_outputs(out_dir, {n: n in folders for n in writers}, overwrite=overwrite, option=option)
    results = {}
    with staging_folder(out_dir.parent) as staging:
        stage = staging / out_dir.name
        stage.mkdir()
        for name, write in writers.items():
            results[name] = write(stage / name)
        written = sorted(p.name for p in stage.iterdir())
        if not out_dir.exists():
            write_manifest(stage, written)
            os.replace(stage, out_dir)
            return results
        for name in written:
            replace_with(stage / name, out_dir / name, staging)
        if overwrite:
            _remove_previous(out_dir, written, staging)
        write_manifest(out_dir, written)
    return results
