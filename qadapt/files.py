"""Writing outputs so that none is ever half-written, and saying what was written."""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


@contextmanager
def atomic_folder(dest: Path, replace: bool = True) -> Iterator[Path]:
    """Yield a temporary folder beside `dest`; on success sync it and rename it to `dest`.

    On any error the temporary folder is removed and `dest` is left as it was. An existing `dest` is
    replaced only after the new folder is complete; with `replace=False` (a cache two processes may fill at
    once) an existing `dest` is kept and the new folder dropped.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".tmp-{dest.name}-"))
    try:
        yield tmp
        for file in tmp.rglob("*"):
            if file.is_file():
                with open(file, "rb") as handle:
                    os.fsync(handle.fileno())
        if dest.exists() and replace:
            old = dest.with_name(f".old-{dest.name}")
            shutil.rmtree(old, ignore_errors=True)
            dest.rename(old)
            tmp.rename(dest)
            shutil.rmtree(old)
        else:
            try:
                tmp.rename(dest)
            except OSError:
                if replace or not dest.exists():
                    raise
                shutil.rmtree(tmp)  # another process filled `dest` meanwhile: keep that one
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextmanager
def atomic_file(dest: Path) -> Iterator[Path]:
    """Yield a temporary path beside `dest`; on success sync it and rename it to `dest`."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    handle, name = tempfile.mkstemp(dir=dest.parent, prefix=f".tmp-{dest.stem}-", suffix=dest.suffix)
    os.close(handle)
    tmp = Path(name)
    try:
        yield tmp
        with open(tmp, "rb") as written:
            os.fsync(written.fileno())
        tmp.replace(dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextmanager
def write_errors_reported(what: Path, advice: str) -> Iterator[None]:
    """A full disk or a write error while writing `what` becomes one clear line (with what to do next)."""
    from safetensors import SafetensorError

    from qadapt.errors import QadaptError

    try:
        yield
    except (OSError, SafetensorError) as exc:
        reason = getattr(exc, "strerror", None) or str(exc).rpartition("I/O error: ")[2] or type(exc).__name__
        raise QadaptError(f"could not write {what}: {reason}; {advice}") from None


def refuse_existing(out: Path) -> None:
    """Outputs never overwrite: a file, or a folder with anything in it, at `out` is an error."""
    from qadapt.errors import QadaptError

    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise QadaptError(f"{out} already exists; remove it or choose another --out")


def human_size(size: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    raise AssertionError("unreachable")


def describe_written(path: Path) -> str:
    """'wrote PATH (SIZE)' and, for a folder, one line per file with its size."""
    path = Path(path)
    if path.is_file():
        return f"wrote {path} ({human_size(path.stat().st_size)})"
    files = sorted(f for f in path.rglob("*") if f.is_file())
    lines = [f"wrote {path}/ ({len(files)} files, {human_size(sum(f.stat().st_size for f in files))})"]
    lines += [f"  {f.relative_to(path)}  {human_size(f.stat().st_size)}" for f in files]
    return "\n".join(lines)
