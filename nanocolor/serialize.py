"""Saving and loading .npz files safely: atomic writes, a format version and a checksum.

Every file nanocolor writes holds its arrays plus one JSON string `__meta__` with the format
version, the file's kind ('weights' or 'checkpoint'), free-form fields, and a SHA-256 over the
arrays. A write goes to a temp file beside the target, is fsync'ed, then renamed over it, so a
crash at any moment leaves either the old file or the new one, never a half-written one.
"""
from __future__ import annotations

import glob
import hashlib
import io
import json
import os
import tempfile
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


_UMASK = os.umask(0o022)
os.umask(_UMASK)  # read once (at import, single-threaded): mkstemp's files would otherwise stay 0600


def _temp_pattern(path: Path) -> tuple[str, str]:
    return f".{path.name}.", ".tmp"


def _about(err: OSError, path: Path) -> OSError:
    """The same error naming `path` where it named a temporary file of `path` (a name that means
    nothing to the user)."""
    prefix, suffix = _temp_pattern(path)
    name = Path(err.filename).name if isinstance(err.filename, str) else ""
    if err.errno and name.startswith(prefix) and name.endswith(suffix):
        return OSError(err.errno, err.strerror, str(path))
    return err


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` so that readers only ever see the old or the complete new file.

    The new file gets the old file's permissions, or the usual ones (0666 less the umask).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    mode = path.stat().st_mode & 0o7777 if path.is_file() else 0o666 & ~_UMASK
    prefix, suffix = _temp_pattern(path)
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=prefix, suffix=suffix, dir=path.parent)
        os.chmod(tmp, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        if tmp and os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(err, OSError):
            raise _about(err, path) from None
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # make the rename itself durable
    finally:
        os.close(dir_fd)


def temp_files(path: str | os.PathLike) -> list[Path]:
    """The temporary files of writes of `path` lying beside it (left by a killed process, or in progress)."""
    path = Path(path)
    prefix, suffix = _temp_pattern(path)
    return [p for p in path.parent.glob(f"{glob.escape(prefix)}*{suffix}") if p.is_file()]


def remove_stale_temp_files(path: str | os.PathLike) -> list[Path]:
    """Delete temp files that writes of `path` left behind when their process was killed.

    Call it only while no other process writes `path` (e.g. when a training run starts).
    """
    stale = temp_files(path)
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


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
    if path.is_dir():
        raise CorruptFileError(f"{path}: is a folder; weights are a .npz file (a run's model.npz or checkpoint.npz)")
    if not path.is_file():
        raise CorruptFileError(f"{path}: no such file")
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as err:
        raise CorruptFileError(f"{path}: cannot read it ({err.strerror})") from None
    if magic != b"PK\x03\x04":  # every .npz is a zip archive
        raise CorruptFileError(f"{path}: not an .npz file" + (" (it is empty)" if not magic else ""))
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {name: npz[name] for name in npz.files}
    except Exception as err:  # zipfile/numpy raise BadZipFile, ValueError, NotImplementedError, ... on bad bytes
        raise CorruptFileError(f"{path}: corrupt or truncated .npz file ({err.__class__.__name__}: {err})") from None
    if "__meta__" not in arrays:
        raise CorruptFileError(f"{path}: not a nanocolor file (no metadata record)")
    try:
        meta = json.loads(str(arrays.pop("__meta__")))
    except json.JSONDecodeError:
        raise CorruptFileError(f"{path}: metadata record is not valid JSON") from None
    if not isinstance(meta, dict):
        raise CorruptFileError(f"{path}: metadata record is not a JSON object")
    version = meta.get("format_version")
    if version != FORMAT_VERSION:
        raise CorruptFileError(f"{path}: format version {version!r}, this nanocolor reads version {FORMAT_VERSION}")
    if meta.get("kind") not in kinds:
        raise CorruptFileError(f"{path}: holds a {meta.get('kind')!r}, expected {' or '.join(kinds)}")
    if meta.get("sha256") != _checksum(arrays):
        raise CorruptFileError(f"{path}: checksum mismatch, the file is corrupt")
    return arrays, meta
