"""Persistent disk cache of generated kernels.

Layout: ``root/v1/<key[:2]>/<key>.json``. Each file is a JSON envelope
``{"format": 1, "key": ..., "sha256": ..., "entry": {...}}`` where ``sha256`` is over the
canonical serialisation of ``entry``. The cache is an optimisation only, so every read
problem is treated as a miss and every write problem as a warning, never an error.
"""
from __future__ import annotations

import functools
import hashlib
import importlib
import json
import os
import pathlib
import re
import tempfile
import time
import warnings
from typing import Any

FORMAT_VERSION = 1
_KEY_RE = re.compile(r"[0-9a-f]{8,128}")
_STALE_TMP_S = 3600.0  # temp files older than this are leftovers of a crashed writer
_warned_roots: set[str] = set()  # warn once per root per process, not once per compile


def default_root() -> pathlib.Path:
    """``$SSMC_CACHE_DIR`` if set (and non-empty), else ``~/.cache/ssmc``."""
    env = os.environ.get("SSMC_CACHE_DIR")
    if env:
        return pathlib.Path(env).expanduser()
    return pathlib.Path.home() / ".cache" / "ssmc"


def cache_key(**parts: str) -> str:
    """sha256 hex over the named parts, independent of argument order.

    Each name and value is length-prefixed so no two different part sets encode to the same
    bytes (e.g. ``a="bc"`` vs ``ab="c"``, or a value that contains a separator).
    """
    h = hashlib.sha256(b"ssmc-cache-key\0")
    for name in sorted(parts):
        value = parts[name]
        if not isinstance(value, str):
            raise TypeError(f"cache_key part {name!r} must be str, got {type(value).__name__}")
        for field in (name.encode(), value.encode()):
            h.update(len(field).to_bytes(8, "big"))
            h.update(field)
    return h.hexdigest()


@functools.lru_cache(maxsize=None)
def code_fingerprint(*packages: str) -> str:
    """sha256 over the .py/.lark files of the named packages (default: the compiler itself).

    Meant as a cache_key part: ``__version__`` does not change while the compiler is being edited,
    so without this a cached kernel from older emitter code would be served after a fix.
    """
    h = hashlib.sha256()
    for name in packages or ("ssmc", "ssmc.passes", "ssmc.targets", "ssmc.grammar"):
        try:
            dirs = importlib.import_module(name).__path__
        except (ImportError, AttributeError):
            dirs = []  # not a package (or absent): contributes its name only
        h.update(f"\0{name}\0".encode())
        for d in dirs:
            try:
                files = sorted(p for p in pathlib.Path(d).iterdir() if p.suffix in (".py", ".lark") and p.is_file())
                for f in files:
                    data = f.read_bytes()
                    h.update(f"{f.name}\0{len(data)}\0".encode())
                    h.update(data)
            except OSError:  # e.g. a zipped install: fall back to names/version only
                h.update(f"\0?{d}".encode())
    return h.hexdigest()


def _canonical(entry: dict) -> bytes:
    # Deterministic bytes for the checksum: the same dict always hashes the same after a JSON round trip.
    return json.dumps(entry, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


class DiskCache:
    def __init__(self, root: str | os.PathLike | None = None):
        self.root = pathlib.Path(root).expanduser() if root is not None else default_root()
        self._dir = self.root / f"v{FORMAT_VERSION}"

    def path(self, key: str) -> pathlib.Path:
        # Keys become file names, so only accept hex to rule out path traversal.
        if not isinstance(key, str) or not _KEY_RE.fullmatch(key):
            raise ValueError(f"invalid cache key {key!r}: expected lowercase hex (see cache_key)")
        return self._dir / key[:2] / f"{key}.json"

    def get(self, key: str) -> dict | None:
        """The stored entry, or None if missing, unreadable, corrupt, truncated or of another format."""
        path = self.path(key)
        try:
            env = json.loads(path.read_bytes())
            entry = env["entry"]
            if (
                env.get("format") == FORMAT_VERSION
                and env.get("key") == key
                and isinstance(entry, dict)
                and env.get("sha256") == hashlib.sha256(_canonical(entry)).hexdigest()
            ):
                return entry
        except (OSError, ValueError, TypeError, KeyError, RecursionError):
            pass  # ValueError covers JSONDecodeError and UnicodeDecodeError
        # A bad entry is not deleted: a concurrent writer may just have replaced it with a good
        # one, and the caller's next put() overwrites it anyway.
        return None

    def put(self, key: str, entry: dict) -> None:
        """Store ``entry`` atomically; on I/O failure warn once and carry on."""
        path = self.path(key)
        # Serialise first so a bad entry (a caller bug) raises instead of being warned away.
        if not isinstance(entry, dict):
            raise TypeError(f"cache entry must be a dict, got {type(entry).__name__}")
        digest = hashlib.sha256(_canonical(entry)).hexdigest()
        data = _canonical({"format": FORMAT_VERSION, "key": key, "sha256": digest, "entry": entry})
        tmp = None
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            # The temp file sits next to the target so os.replace is a same-filesystem atomic
            # rename: readers see the old file or the new one, never a partial write.
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{key}.", suffix=".tmp")
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())  # data on disk before the rename makes it visible
            os.replace(tmp, path)
            tmp = None
            _fsync_dir(path.parent)
        except OSError as e:
            self._warn(f"ssmc: could not write kernel cache entry under {self.root}: {e}; continuing without caching")
        finally:
            if tmp is not None:
                try:
                    os.unlink(tmp)
                except OSError:
                    pass

    def info(self) -> dict[str, Any]:
        """``{"root", "entries", "bytes"}`` for the current format version."""
        entries = total = 0
        for p in self._entries():
            try:
                total += p.stat().st_size
                entries += 1
            except OSError:
                pass  # removed concurrently
        return {"root": str(self.root), "entries": entries, "bytes": total}

    def clear(self) -> int:
        """Remove all entries (and stale temp files); return how many entries were removed."""
        removed = 0
        for p in self._entries():
            try:
                p.unlink()
                removed += 1
            except OSError:
                pass
        # Fresh temp files may belong to a live writer; only old ones are crash leftovers.
        now = time.time()
        for p in self._dir.glob("??/.*.tmp"):
            try:
                if now - p.stat().st_mtime > _STALE_TMP_S:
                    p.unlink()
            except OSError:
                pass
        for d in self._dir.glob("??"):
            try:
                d.rmdir()  # only succeeds when empty
            except OSError:
                pass
        return removed

    def _entries(self):
        return (p for p in self._dir.glob("??/*.json") if not p.name.startswith("."))

    def _warn(self, message: str) -> None:
        root = str(self.root)
        if root not in _warned_roots:
            _warned_roots.add(root)
            warnings.warn(message, RuntimeWarning, stacklevel=3)


def _fsync_dir(directory: pathlib.Path) -> None:
    # Persist the rename itself (POSIX); not possible everywhere, and not needed for correctness.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
