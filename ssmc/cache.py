"""Persistent disk cache of generated kernels.

Layout: ``root/v1/<key[:2]>/<key>.json``, plus ``root/secret.key``. Each file is a JSON envelope
``{"format": 1, "key": ..., "sha256": ..., "hmac": ..., "entry": {...}}`` where ``sha256`` is over the
canonical serialisation of ``entry`` and ``hmac`` is HMAC-SHA256 over the key and that serialisation with a
per-root secret (32 random bytes, mode 0600, created on the first write). The cache is an optimisation only, so
every read problem is treated as a miss and every write problem as a warning, never an error.

Entries become executed Python, so nothing is read that another user could have written (as pip's and the XDG
caches do): directories are created 0700; a root, subdirectory, entry or key file not owned by the current user,
or that group/other can write, is not used (the root: one warning, then compile without the cache); entries are
read only as regular files (no symlinks, FIFOs or devices) of bounded size; and an entry whose HMAC does not
verify with the secret (one planted with a recomputed sha256, say) is a miss.
"""
from __future__ import annotations

import errno
import functools
import hashlib
import hmac
import importlib
import json
import os
import pathlib
import re
import secrets
import stat
import tempfile
import time
import warnings
from typing import Any

FORMAT_VERSION = 1
MAX_ENTRY_BYTES = 32 << 20  # generated kernels are ~100 KB; anything far larger is not ours
SECRET_NAME = "secret.key"
_SECRET_BYTES = 32
_KEY_RE = re.compile(r"[0-9a-f]{8,128}")
_STALE_TMP_S = 3600.0  # temp files older than this are leftovers of a crashed writer
_RACY_S = 3.0  # files changed this recently are hashed again next time (see code_fingerprint)
_POSIX = os.name == "posix"
_warned_roots: set[str] = set()  # warn once per root per process, not once per compile
# O_NONBLOCK: opening a FIFO for reading must not wait for a writer (we reject it after fstat anyway).
_READ_FLAGS = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)


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
    Reading and hashing every source costs milliseconds in each process, so the digest is also kept in the disk
    cache under a key of the files' names, sizes, mtimes, ctimes and inodes; as git does for its index, the
    digest is not stored while a file changed in the last few seconds (an edit within the timestamps' granularity
    that keeps the size would otherwise be missed).
    """
    listing = []  # (package, [(directory, [(path, stat)] or None when unreadable)])
    for name in packages or ("ssmc", "ssmc.passes", "ssmc.targets", "ssmc.grammar"):
        try:
            dirs = importlib.import_module(name).__path__
        except (ImportError, AttributeError):
            dirs = []  # not a package (or absent): contributes its name only
        listing.append((name, [(d, _source_files(d)) for d in dirs]))
    stamps = repr([(name, [(str(d), files and [(p.name, st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)
                                             for p, st in files]) for d, files in dirs]) for name, dirs in listing])
    dc = DiskCache(space="fingerprint")
    key = cache_key(stamps=stamps)
    hit = dc.get(key)
    if hit is not None and isinstance(hit.get("sha256"), str):
        return hit["sha256"]
    h = hashlib.sha256()
    newest = 0
    for name, dirs in listing:
        h.update(f"\0{name}\0".encode())
        for d, files in dirs:
            try:
                if files is None:
                    raise OSError
                for f, st in files:
                    data = f.read_bytes()
                    h.update(f"{f.name}\0{len(data)}\0".encode())
                    h.update(data)
                    newest = max(newest, st.st_mtime_ns, st.st_ctime_ns)
            except OSError:  # e.g. a zipped install: fall back to names/version only
                h.update(f"\0?{d}".encode())
    digest = h.hexdigest()
    if newest < (time.time() - _RACY_S) * 1e9:
        dc.put(key, {"sha256": digest})
    return digest


def _source_files(d) -> list | None:
    try:
        files = [(p, p.stat()) for p in sorted(pathlib.Path(d).iterdir()) if p.suffix in (".py", ".lark")]
    except OSError:
        return None
    return [(p, st) for p, st in files if stat.S_ISREG(st.st_mode)]


def _canonical(entry: dict) -> bytes:
    # Deterministic bytes for the checksum: the same dict always hashes the same after a JSON round trip.
    return json.dumps(entry, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def _mac(secret: bytes, key: str, body: bytes) -> str:
    # The key is covered too, so an authentic entry copied under another key's name is still a miss.
    return hmac.new(secret, b"ssmc-cache-entry\0" + key.encode() + b"\0" + body, hashlib.sha256).hexdigest()


def _distrust(st: os.stat_result, what: str, private: bool = False) -> str | None:
    """Why a file or directory with this stat must not be used, or None. ``private``: no group/other bits at all."""
    if not _POSIX:  # no uids or mode bits to check; the HMAC still applies
        return None
    uid = os.geteuid()
    if st.st_uid != uid:
        return f"{what} is owned by uid {st.st_uid}, not by the current user (uid {uid})"
    bad = st.st_mode & (0o077 if private else 0o022)
    if bad:
        return f"{what} has mode {stat.S_IMODE(st.st_mode):04o}: group or others can {'access' if private else 'write'} it"
    return None


def _dir_distrust(st: os.stat_result, what: str) -> str | None:
    if stat.S_ISLNK(st.st_mode):
        return f"{what} is a symlink"
    if not stat.S_ISDIR(st.st_mode):
        return f"{what} is not a directory"
    return _distrust(st, what)


def _read_trusted(path: pathlib.Path, limit: int, private: bool = False) -> bytes | None:
    """The bytes of a regular file of ours of at most ``limit`` bytes, else None (never blocks, never follows a
    symlink at the last component, never reads a device or more than ``limit`` + 1 bytes)."""
    try:
        fd = os.open(path, _READ_FLAGS)
    except OSError:  # missing, a symlink (ELOOP), a directory we cannot open, ...
        return None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_size > limit or _distrust(st, "file", private):
            return None
        chunks, n = [], 0
        while n <= limit:  # st_size can be stale (a concurrent writer), so bound the read itself
            b = os.read(fd, min(1 << 20, limit + 1 - n))
            if not b:
                break
            chunks.append(b)
            n += len(b)
        return None if n > limit else b"".join(chunks)
    except OSError:
        return None
    finally:
        os.close(fd)


class DiskCache:
    """Kernels live in ``root/v1``; ``space`` names a separate subdirectory of it (``"lark"``: the spec parser's
    tables) that ``info`` and ``clear`` of the kernel cache do not count. One secret per root."""

    def __init__(self, root: str | os.PathLike | None = None, space: str | None = None):
        self.root = pathlib.Path(root).expanduser() if root is not None else default_root()
        self._dir = self.root / f"v{FORMAT_VERSION}"
        if space is not None:
            if not re.fullmatch(r"[a-z]{3,16}", space):  # never two characters: those are kernel shards
                raise ValueError(f"invalid cache space {space!r}")
            self._dir = self._dir / space

    def path(self, key: str) -> pathlib.Path:
        # Keys become file names, so only accept hex to rule out path traversal.
        if not isinstance(key, str) or not _KEY_RE.fullmatch(key):
            raise ValueError(f"invalid cache key {key!r}: expected lowercase hex (see cache_key)")
        return self._dir / key[:2] / f"{key}.json"

    def get(self, key: str) -> dict | None:
        """The stored entry, or None if missing, unreadable, corrupt, truncated, of another format, not a regular
        file of ours, or not authenticated by this root's secret. A root that is not ours warns (once)."""
        path = self.path(key)
        if not self._trusted(path.parent, create=False):
            return None
        secret = self._secret(create=False)
        data = _read_trusted(path, MAX_ENTRY_BYTES) if secret is not None else None
        if data is None:
            return None
        try:
            env = json.loads(data)
            entry = env["entry"]
            if env.get("format") == FORMAT_VERSION and env.get("key") == key and isinstance(entry, dict):
                body = _canonical(entry)
                mac = env.get("hmac")
                if (env.get("sha256") == hashlib.sha256(body).hexdigest() and isinstance(mac, str)
                        and hmac.compare_digest(mac, _mac(secret, key, body))):
                    return entry
        except (ValueError, TypeError, KeyError, RecursionError):
            pass  # ValueError covers JSONDecodeError and UnicodeDecodeError
        # A bad entry is not deleted: a concurrent writer may just have replaced it with a good
        # one, and the caller's next put() overwrites it anyway.
        return None

    def put(self, key: str, entry: dict) -> None:
        """Store ``entry`` atomically; on I/O failure (or a root that is not ours) warn once and carry on."""
        path = self.path(key)
        # Serialise first so a bad entry (a caller bug) raises instead of being warned away.
        if not isinstance(entry, dict):
            raise TypeError(f"cache entry must be a dict, got {type(entry).__name__}")
        body = _canonical(entry)
        tmp = None
        try:
            if not self._trusted(path.parent, create=True):
                return
            secret = self._secret(create=True)
            if secret is None:
                return
            data = _canonical({"format": FORMAT_VERSION, "key": key, "sha256": hashlib.sha256(body).hexdigest(),
                               "hmac": _mac(secret, key, body), "entry": entry})
            # The temp file (mode 0600) sits next to the target so os.replace is a same-filesystem atomic
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
        """``{"root", "entries", "bytes"}`` for the current format version (counts only, nothing is read)."""
        entries = total = 0
        for p in self._entries():
            try:
                total += p.stat().st_size
                entries += 1
            except OSError:
                pass  # removed concurrently
        return {"root": str(self.root), "entries": entries, "bytes": total}

    def clear(self) -> int:
        """Remove all entries (and stale temp files); return how many entries were removed. The secret stays.
        A root that is not ours is left alone (with a warning): its subdirectories may lead anywhere."""
        if not self._trusted(self._dir, create=False):
            return 0
        removed = 0
        now = time.time()
        for d in self._dir.glob("??"):
            if not self._trusted(d, create=False, quiet=True):
                continue
            for p in d.glob("*.json"):
                if p.name.startswith("."):
                    continue
                try:
                    p.unlink()
                    removed += 1
                except OSError:
                    pass
            # Fresh temp files may belong to a live writer; only old ones are crash leftovers.
            for p in d.glob(".*.tmp"):
                try:
                    if now - p.lstat().st_mtime > _STALE_TMP_S:
                        p.unlink()
                except OSError:
                    pass
            try:
                d.rmdir()  # only succeeds when empty
            except OSError:
                pass
        return removed

    def _entries(self):
        return (p for p in self._dir.glob("??/*.json") if not p.name.startswith("."))

    # ---- trust --------------------------------------------------------------------------------------
    def _trusted(self, directory: pathlib.Path, create: bool, quiet: bool = False) -> bool:
        """Whether the root and every directory from it down to ``directory`` (which must lie below it) are ours
        and not writable by group/other, creating missing ones 0700 when ``create``. A missing one without
        ``create`` is False (a miss) without a warning; an untrusted one warns once per root."""
        rel = directory.relative_to(self.root).parts
        if create:
            _makedirs_private(self.root)
        try:
            st = os.stat(self.root)  # the root may be a symlink (~/.cache on another disk); what it names counts
        except OSError:
            return False
        why = _dir_distrust(st, f"the cache directory {self.root}")
        d = self.root
        for part in rel:
            if why:
                break
            d = d / part
            try:
                if create:
                    try:
                        os.mkdir(d, 0o700)
                    except FileExistsError:
                        pass
                st = os.lstat(d)  # below the root nothing may be a symlink
            except OSError:
                if create:
                    raise
                return False
            why = _dir_distrust(st, str(d))
        if why and not quiet:
            self._warn(f"ssmc: not using the kernel cache at {self.root}: {why}; compiling without it. Use a "
                       f"directory of your own (SSMC_CACHE_DIR), or fix its owner/mode (chmod go-w)")
        return why is None

    def _secret(self, create: bool) -> bytes | None:
        """This root's HMAC secret (32 bytes in a 0600 file of ours), created atomically when missing and
        ``create``; None if absent or not trustworthy (then nothing is read or written)."""
        path = self.root / SECRET_NAME
        data = _read_trusted(path, _SECRET_BYTES, private=True)
        if data is None and create and not os.path.lexists(path):
            fd, tmp = tempfile.mkstemp(dir=self.root, prefix=".secret.", suffix=".tmp")  # mode 0600
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(secrets.token_bytes(_SECRET_BYTES))
                    f.flush()
                    os.fsync(f.fileno())
                try:
                    os.link(tmp, path)  # atomic and exclusive: of two racing processes one secret wins
                except FileExistsError:
                    pass
                except OSError as e:  # a filesystem without hard links: rename (a lost race only costs misses)
                    if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK):
                        raise
                    if not os.path.lexists(path):
                        os.replace(tmp, path)
            finally:
                try:
                    os.unlink(tmp)
                except OSError:
                    pass
            data = _read_trusted(path, _SECRET_BYTES, private=True)
        if data is None or len(data) != _SECRET_BYTES:
            if os.path.lexists(path):  # there but unusable: say so (absent on a read is just a miss)
                self._warn(f"ssmc: not using the kernel cache at {self.root}: {path} is not a {_SECRET_BYTES}-byte "
                           f"regular file of yours with mode 0600; compiling without the cache")
            return None
        return data

    def _warn(self, message: str) -> None:
        root = str(self.root)
        if root not in _warned_roots:
            _warned_roots.add(root)
            warnings.warn(message, RuntimeWarning, stacklevel=3)


def _makedirs_private(path: pathlib.Path) -> None:
    """mkdir -p with mode 0700 for every directory it creates (pathlib/os.makedirs give the parents the umask's
    mode, 0777 under umask 000). Existing directories are left as they are (the root is checked afterwards)."""
    missing = []
    p = path
    while not os.path.lexists(p) and p != p.parent:
        missing.append(p)
        p = p.parent
    for d in reversed(missing):
        try:
            os.mkdir(d, 0o700)
        except FileExistsError:
            pass


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
