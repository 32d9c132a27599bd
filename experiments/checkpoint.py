"""Crash-safe files: atomic writes, an append-only metrics log and checkpoints.

Every file a run writes is either

* replaced atomically: written to a temporary file in the same folder, flushed and
  ``fsync``-ed, then moved over the target with ``os.replace`` (atomic on POSIX and
  Windows), so a reader sees the old file or the new one, never a mix; or
* appended one whole line at a time (``metrics.jsonl``): each record is a single
  ``write`` of one JSON line followed by ``flush`` + ``fsync``. A run killed in the
  middle of a write can leave at most one partial last line; :func:`read_jsonl` ignores
  it and :meth:`MetricsLog.truncate` drops it (and every record after the checkpoint)
  on resume.

Checkpoints hold only tensors, numbers, strings, lists and dicts, so they load with
``torch.load(weights_only=True)`` (no pickled code is executed).
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

import torch

__all__ = [
    "atomic_write",
    "write_text",
    "write_json",
    "save_checkpoint",
    "load_checkpoint",
    "read_jsonl",
    "MetricsLog",
    "jsonable",
]


def _fsync_dir(path: Path) -> None:
    """Persist a rename in ``path`` (no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _umask() -> int:
    """The process umask (read from ``/proc`` where possible: setting it is not thread-safe)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _file_mode(path: Path) -> int:
    """The mode ``open(path, "w")`` would leave: the file's own if it exists, else 0666 & ~umask."""
    try:
        return path.stat().st_mode & 0o7777
    except OSError:
        return 0o666 & ~_umask()


def atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], None]) -> None:
    """Write ``path`` atomically: ``write(f)`` fills a temporary file that replaces ``path``.

    If ``write`` raises (or the process dies) the previous content of ``path`` is intact and
    the temporary file is removed (or, after a kill, left as ``.<name>.*.tmp``, never read).
    The file gets the permissions a plain ``open(path, "w")`` would give it (``mkstemp``
    alone would make it private, 0600).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    mode = _file_mode(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            os.chmod(tmp, mode)
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    _fsync_dir(path.parent)


def write_text(path: str | os.PathLike, text: str) -> None:
    """Atomically replace ``path`` with ``text`` (UTF-8)."""
    atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def jsonable(value: Any) -> Any:
    """``value`` with non-finite floats as JSON can hold them (NaN: null, inf: "inf")."""
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    return value


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Atomically replace ``path`` with ``obj`` as indented JSON."""
    write_text(path, json.dumps(jsonable(obj), indent=2, sort_keys=True) + "\n")


def save_checkpoint(path: str | os.PathLike, state: dict[str, Any]) -> None:
    """Atomically save ``state`` (tensors, numbers, strings, lists, dicts) with ``torch.save``."""
    atomic_write(path, lambda f: torch.save(state, f))


def load_checkpoint(path: str | os.PathLike, map_location: Any = "cpu") -> dict[str, Any]:
    """Load a checkpoint written by :func:`save_checkpoint` with ``weights_only=True``."""
    return torch.load(path, map_location=map_location, weights_only=True)


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Records of a JSON-lines file; a partial or corrupt *last* line (a killed write) is ignored.

    A corrupt line anywhere else is real damage and raises ``ValueError`` naming the line.
    """
    path = Path(path)
    if not path.exists():
        return []
    lines = path.read_bytes().split(b"\n")
    records: list[dict[str, Any]] = []
    complete = lines[:-1]  # the part after the last newline is an unterminated write
    for i, line in enumerate(complete):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as err:
            if i == len(complete) - 1:
                break
            raise ValueError(f"{path}: line {i + 1} is not valid JSON ({err})") from err
    return records


class MetricsLog:
    """Append-only ``metrics.jsonl``: one JSON object per line, each flushed and fsync-ed."""

    def __init__(self, path: str | os.PathLike, enabled: bool = True) -> None:
        self.path = Path(path)
        self.enabled = enabled

    def append(self, record: dict[str, Any]) -> None:
        """Append ``record`` as one line with a single write, then flush and fsync."""
        if not self.enabled:
            return
        line = (json.dumps(jsonable(record), sort_keys=True) + "\n").encode("utf-8")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "ab") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())

    def records(self) -> list[dict[str, Any]]:
        return read_jsonl(self.path)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return iter(self.records())

    def truncate(self, step: int) -> None:
        """Keep the records with ``record["step"] <= step`` (atomically rewriting the file)."""
        if not self.enabled or not self.path.exists():
            return
        kept = [r for r in read_jsonl(self.path) if r.get("step", 0) <= step]
        text = "".join(json.dumps(r, sort_keys=True) + "\n" for r in kept)
        write_text(self.path, text)
