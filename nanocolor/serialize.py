"""Saving and loading .npz files safely: atomic writes, a format version and a checksum.

Every file nanocolor writes holds its arrays plus one JSON string `__meta__` with the format
version, the file's kind ('weights' or 'checkpoint'), free-form fields, and a SHA-256 over the
arrays. A write goes to a temp file beside the target, is fsync'ed, then renamed over it, so a
crash at any moment leaves either the old file or the new one, never a half-written one.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import tempfile
import zipfile
from pathlib import Path

import numpy as np

FORMAT_VERSION = 1


class CorruptFileError(ValueError):
    """A file is missing, unreadable, of the wrong kind or version, or fails its checksum."""


def _checksum(arrays: dict) -> str:
    digest = hashlib.sha256()
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name])
        digest.update(f"{name}|{a.dtype.str}|{a.shape}|".encode())
        digest.update(a.tobytes())
    return digest.hexdigest()


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` so that readers only ever see the old or the complete new file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # make the rename itself durable
    finally:
        os.close(dir_fd)


def save_npz(path: str | os.PathLike, arrays: dict, kind: str, **meta) -> None:
    """Atomically write host arrays `arrays` with a metadata record to `path` (.npz)."""
    arrays = {name: np.asarray(a) for name, a in arrays.items()}
    record = {"format_version": FORMAT_VERSION, "kind": kind, "sha256": _checksum(arrays), **meta}
    buffer = io.BytesIO()
    np.savez(buffer, __meta__=np.array(json.dumps(record)), **arrays)
    atomic_write_bytes(path, buffer.getvalue())


def load_npz(path: str | os.PathLike, kinds: tuple = ("weights", "checkpoint")) -> tuple[dict, dict]:
    """Read and verify a file written by save_npz: returns (arrays, meta) or raises CorruptFileError."""
    path = Path(path)
    if not path.is_file():
        raise CorruptFileError(f"{path}: no such file")
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {name: npz[name] for name in npz.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, KeyError) as err:
        raise CorruptFileError(f"{path}: not a readable .npz file ({err.__class__.__name__}: {err})") from None
    if "__meta__" not in arrays:
        raise CorruptFileError(f"{path}: not a nanocolor file (no metadata record)")
    try:
        meta = json.loads(str(arrays.pop("__meta__")))
    except json.JSONDecodeError:
        raise CorruptFileError(f"{path}: metadata record is not valid JSON") from None
    version = meta.get("format_version")
    if version != FORMAT_VERSION:
        raise CorruptFileError(f"{path}: format version {version!r}, this nanocolor reads version {FORMAT_VERSION}")
    if meta.get("kind") not in kinds:
        raise CorruptFileError(f"{path}: holds a {meta.get('kind')!r}, expected {' or '.join(kinds)}")
    if meta.get("sha256") != _checksum(arrays):
        raise CorruptFileError(f"{path}: checksum mismatch, the file is corrupt")
    return arrays, meta
