"""Write a folder or a file so that a reader sees all of it or none of it: stage beside the target, then rename.

    with staged_folder("runs/x/checkpoint", overwrite=True) as staging:
        (staging / "config.json").write_text(...)       # renamed to runs/x/checkpoint on a clean exit
    atomic_write_text("runs/x/_SUCCESS", "")             # a temporary sibling, os.replace'd into place

The staging folder is a hidden sibling of the target (same filesystem, so the rename is atomic). On an error
it is removed and the target is left as it was. With overwrite, an existing target is moved aside first and
removed only after the new one is in place, so a crash in between leaves the old folder under a hidden name,
never a half-written one under the target's. Without overwrite, a target that exists and is not an empty
folder is an error, checked before the work starts and again just before the rename (another writer may
have filled it meanwhile).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def check_free_folder(target: Path, what: str) -> None:
    """An error unless `target` is absent or an empty folder; `what` ends the message."""
    if target.exists() and not target.is_dir():
        raise FileExistsError(f"{target} exists and is not a folder")
    if target.is_dir() and any(target.iterdir()):
        raise FileExistsError(f"{target} exists and is not empty: {what}")


@contextmanager
def staged_folder(
    target: str | Path, *, overwrite: bool = False, what: str = "pass overwrite=True to replace it"
) -> Iterator[Path]:
    """Yield an empty staging folder that becomes `target` when the block ends without an error.

    `what` ends the error message for a target that is not free (why this writer wants a new folder)."""
    target = Path(target)
    if not overwrite:
        check_free_folder(target, what)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        yield staging
        retired = None
        if overwrite and target.exists():
            retired = target.with_name(f".{target.name}.old-{os.getpid()}")
            os.replace(target, retired)
        else:
            check_free_folder(target, what)
            if target.is_dir():
                target.rmdir()
        os.replace(staging, target)
        if retired is not None:
            shutil.rmtree(retired, ignore_errors=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write `text` to `path` through a temporary sibling renamed into place (readers never see half a file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(handle, "w") as out:
            out.write(text)
            out.flush()
            os.fsync(out.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path
