"""Writes that a crash cannot leave half done: the one home of write-to-temporary-then-rename.

A reader (a resumed run, a plot, a user) sees either the old complete file or folder or the new
one, never a torn one; ``os.replace`` is atomic within one file system, so the temporary sits
beside its target.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path


def write_text(path: str | Path, text: str, mode: int | None = None) -> Path:
    """Write ``text`` to ``path`` via a fsynced hidden sibling and a rename.

    With ``mode`` (e.g. ``0o600`` for a file holding a secret) the file has exactly that mode from
    the moment it is created, so the text is never readable by others, not even briefly.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    if mode is not None:
        tmp.unlink(missing_ok=True)  # a stale temporary would keep its own mode
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
        os.fchmod(fd, mode)  # exactly ``mode``, whatever the umask
        opened = open(fd, "w", encoding="utf-8")  # noqa: SIM115 - closed by the with below
    else:
        opened = open(tmp, "w", encoding="utf-8")  # noqa: SIM115 - closed by the with below
    with opened as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    return path


def write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` via a fsynced hidden sibling and a rename (e.g. a serialised
    checkpoint: ``torch.save`` into a ``BytesIO`` first)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    return path


def replace_dir(tmp: str | Path, final: str | Path) -> None:
    """Swap the finished folder ``tmp`` into ``final``; a crash leaves either the old or the new one whole.

    The old folder is renamed aside first (a folder cannot be replaced by rename while it has
    contents) and removed only once the new one is in place.
    """
    tmp, final = Path(tmp), Path(final)
    old = final.with_name(f"{final.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def replace_symlink(link: str | Path, target: str | Path) -> None:
    """Point the symlink ``link`` at ``target`` (kept as given, e.g. relative) in one rename: a reader
    follows either the old target or the new one, never a missing link."""
    link = Path(link)
    tmp = link.with_name(f".{link.name}.tmp")
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    os.symlink(target, tmp)
    os.replace(tmp, link)
