"""Unit tests of ssmc.cache alone (no compiler involved)."""
from __future__ import annotations

import json
import multiprocessing as mp
import os
import pathlib
import warnings

import pytest

from ssmc import cache as cache_mod
from ssmc.cache import DiskCache, cache_key, default_root

PARTS = dict(ir="ssm mamba2 {...}", target="xla", options="chunk_size=64", version="0.1.0")
ENTRY = {"source": "def kernel(x):\n  return x\n", "ir": "h = exp(dt*A)*h", "passes": [["parse", "a"], ["chunk", "b"]]}


@pytest.fixture
def dc(tmp_path, monkeypatch):
    monkeypatch.setenv("SSMC_CACHE_DIR", str(tmp_path / "cache"))
    return DiskCache()


@pytest.fixture(autouse=True)
def _fresh_warn_state(monkeypatch):
    # The module warns once per root per process; reset so each test sees its own first warning.
    monkeypatch.setattr(cache_mod, "_warned_roots", set())


def entry_file(c: DiskCache, key: str) -> pathlib.Path:
    files = [p for p in c.root.rglob("*") if p.is_file() and p.name.startswith(key)]
    assert len(files) == 1, files
    return files[0]


# --- root and keys ---------------------------------------------------------------------------


def test_default_root_env_and_home(tmp_path, monkeypatch):
    monkeypatch.setenv("SSMC_CACHE_DIR", str(tmp_path / "x"))
    assert default_root() == tmp_path / "x"
    assert DiskCache().root == tmp_path / "x"
    monkeypatch.delenv("SSMC_CACHE_DIR")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_root() == tmp_path / "home" / ".cache" / "ssmc"
    assert DiskCache(tmp_path / "explicit").root == tmp_path / "explicit"


def test_key_stable_and_order_independent():
    k = cache_key(**PARTS)
    assert len(k) == 64 and int(k, 16) >= 0
    assert k == cache_key(**dict(reversed(list(PARTS.items()))))
    # Golden value: changing the encoding silently invalidates every user's cache, so it must be deliberate.
    assert cache_key(a="1", b="2") == "bb0f6b1c1f6fd62a942627af7a7f3c9b62035c841a17ab4ff8c66e10af1de0ca"


@pytest.mark.parametrize("name", sorted(PARTS))
def test_key_sensitive_to_each_part(name):
    base = cache_key(**PARTS)
    assert cache_key(**{**PARTS, name: PARTS[name] + " "}) != base
    without = {k: v for k, v in PARTS.items() if k != name}
    assert cache_key(**without) != base
    assert cache_key(**without, **{name + "_": PARTS[name]}) != base  # renaming a part changes the key


def test_key_encoding_unambiguous():
    assert cache_key(a="bc") != cache_key(ab="c")
    assert cache_key(a="b", c="") != cache_key(a="bc")
    assert cache_key(a="", b="x") != cache_key(a="x", b="")
    assert cache_key(a="1\x002") != cache_key(a="1", b="2")
    assert cache_key() != cache_key(a="")


def test_key_rejects_non_str():
    with pytest.raises(TypeError):
        cache_key(chunk=64)


# --- get / put -------------------------------------------------------------------------------


def test_round_trip(dc):
    k = cache_key(**PARTS)
    assert dc.get(k) is None
    dc.put(k, ENTRY)
    assert dc.get(k) == ENTRY
    # A second instance on the same root (another process, later run) sees it too.
    assert DiskCache(dc.root).get(k) == ENTRY
    f = entry_file(dc, k)
    assert f == dc.root / "v1" / k[:2] / f"{k}.json"
    # Overwrite replaces.
    dc.put(k, {"source": "new"})
    assert dc.get(k) == {"source": "new"}


def test_round_trip_unicode_and_tuples(dc):
    k = cache_key(ir="∑ ⊗ ·")
    dc.put(k, {"ir": "h = exp(dt*A)*h + dt*B⊗x", "passes": [("a", "é")]})
    assert dc.get(k) == {"ir": "h = exp(dt*A)*h + dt*B⊗x", "passes": [["a", "é"]]}


def test_missing_key(dc):
    assert dc.get(cache_key(ir="nothing")) is None
    assert not dc.root.exists()  # a read never creates directories


def test_invalid_key_rejected(dc):
    for bad in ["../../etc/passwd", "", "ABCDEF0123", "k" * 64]:
        with pytest.raises(ValueError):
            dc.get(bad)
        with pytest.raises(ValueError):
            dc.put(bad, ENTRY)


def test_put_rejects_non_json_entry(dc):
    k = cache_key(ir="x")
    with pytest.raises(TypeError):
        dc.put(k, {"fn": object()})
    with pytest.raises(TypeError):
        dc.put(k, ["not", "a", "dict"])
    assert dc.get(k) is None


@pytest.mark.parametrize(
    "content",
    [b"", b"{", b"not json at all", b"\xff\xfe\x00garbage", b"[]", b"null", b'"str"', b"{}", b"[" * 100000],
    ids=["empty", "open-brace", "text", "binary", "list", "null", "string", "empty-object", "deep"],
)
def test_corrupt_json_is_a_miss(dc, content):
    k = cache_key(**PARTS)
    dc.put(k, ENTRY)
    entry_file(dc, k).write_bytes(content)
    assert dc.get(k) is None
    dc.put(k, ENTRY)  # and a later put repairs it
    assert dc.get(k) == ENTRY


@pytest.mark.parametrize("frac", [0.1, 0.5, 0.9, 0.999])
def test_truncated_file_is_a_miss(dc, frac):
    k = cache_key(**PARTS)
    dc.put(k, ENTRY)
    f = entry_file(dc, k)
    data = f.read_bytes()
    f.write_bytes(data[: int(len(data) * frac)])
    assert dc.get(k) is None


def _rewrite(f: pathlib.Path, edit) -> None:
    env = json.loads(f.read_bytes())
    edit(env)
    f.write_text(json.dumps(env))


def test_checksum_mismatch_is_a_miss(dc):
    k = cache_key(**PARTS)
    dc.put(k, ENTRY)
    f = entry_file(dc, k)
    # Valid JSON, intact envelope, but the payload no longer matches its checksum.
    _rewrite(f, lambda env: env["entry"].__setitem__("source", "def kernel(x):\n  return -x\n"))
    assert dc.get(k) is None


def test_checksum_field_tampered_is_a_miss(dc):
    k = cache_key(**PARTS)
    dc.put(k, ENTRY)
    _rewrite(entry_file(dc, k), lambda env: env.__setitem__("sha256", "0" * 64))
    assert dc.get(k) is None


def test_reformatted_but_identical_entry_is_accepted(dc):
    # The checksum is over the canonical form, so whitespace/key order in the file don't matter.
    k = cache_key(**PARTS)
    dc.put(k, ENTRY)
    f = entry_file(dc, k)
    env = json.loads(f.read_bytes())
    f.write_text(json.dumps(dict(reversed(list(env.items()))), indent=3))
    assert dc.get(k) == ENTRY


@pytest.mark.parametrize("field,value", [("format", 0), ("format", 2), ("format", "1"), ("format", None)])
def test_wrong_version_is_a_miss(dc, field, value):
    k = cache_key(**PARTS)
    dc.put(k, ENTRY)
    _rewrite(entry_file(dc, k), lambda env: env.__setitem__(field, value))
    assert dc.get(k) is None


def test_entry_under_wrong_key_is_a_miss(dc):
    k1, k2 = cache_key(ir="one"), cache_key(ir="two")
    dc.put(k1, ENTRY)
    dst = dc.path(k2)
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_bytes(entry_file(dc, k1).read_bytes())  # e.g. a file copied/renamed by hand
    assert dc.get(k2) is None
    assert dc.get(k1) == ENTRY


def test_unreadable_entry_is_a_miss(dc):
    k = cache_key(**PARTS)
    p = dc.path(k)
    p.mkdir(parents=True)  # a directory where the file should be: reading raises IsADirectoryError
    assert dc.get(k) is None


# --- write failures --------------------------------------------------------------------------


def test_unwritable_root_warns_once_and_does_not_raise(tmp_path):
    blocker = tmp_path / "blocker"
    blocker.write_text("a file, so nothing can be created beneath it (works even as root)")
    c = DiskCache(blocker / "cache")
    k = cache_key(**PARTS)
    with pytest.warns(RuntimeWarning, match="cache"):
        c.put(k, ENTRY)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a second failure must not warn again
        c.put(k, ENTRY)
        DiskCache(blocker / "cache").put(cache_key(ir="other"), ENTRY)
        assert c.get(k) is None
        assert c.info() == {"root": str(blocker / "cache"), "entries": 0, "bytes": 0}
        assert c.clear() == 0


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root ignores permission bits")
def test_read_only_root_warns(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        with pytest.warns(RuntimeWarning):
            DiskCache(ro).put(cache_key(**PARTS), ENTRY)
    finally:
        ro.chmod(0o700)


def test_disk_full_warns_and_leaves_no_temp_files(dc, monkeypatch):
    import errno

    k = cache_key(**PARTS)
    dc.put(k, ENTRY)

    def full(*a, **kw):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(cache_mod.os, "replace", full)
    with pytest.warns(RuntimeWarning, match="No space left"):
        dc.put(k, {"source": "new"})
    monkeypatch.undo()
    assert dc.get(k) == ENTRY  # the old entry survives a failed overwrite
    assert sorted(p.name for p in dc.root.rglob("*") if p.is_file()) == [f"{k}.json", "secret.key"]


def test_fsync_failure_warns(dc, monkeypatch):
    import errno

    def bad_fsync(fd):
        raise OSError(errno.EIO, "I/O error")

    monkeypatch.setattr(cache_mod.os, "fsync", bad_fsync)
    k = cache_key(**PARTS)
    with pytest.warns(RuntimeWarning):
        dc.put(k, ENTRY)
    monkeypatch.undo()
    assert dc.get(k) is None
    assert dc.info()["entries"] == 0
    assert not [p for p in dc.root.rglob("*.tmp")]


# --- info / clear ----------------------------------------------------------------------------


def test_info_and_clear(dc):
    assert dc.info() == {"root": str(dc.root), "entries": 0, "bytes": 0}
    keys = [cache_key(ir=str(i)) for i in range(5)]
    for k in keys:
        dc.put(k, ENTRY)
    info = dc.info()
    assert info["entries"] == 5
    assert info["bytes"] == sum(dc.path(k).stat().st_size for k in keys) > 0
    assert dc.clear() == 5
    assert dc.info()["entries"] == 0 and dc.info()["bytes"] == 0
    assert all(dc.get(k) is None for k in keys)
    assert dc.clear() == 0
    dc.put(keys[0], ENTRY)  # usable after clear
    assert dc.get(keys[0]) == ENTRY and dc.info()["entries"] == 1


def test_clear_ignores_foreign_files_and_fresh_temp_files(dc):
    k = cache_key(**PARTS)
    dc.put(k, ENTRY)
    shard = dc.path(k).parent
    fresh = shard / f".{k}.abc.tmp"  # looks like an in-flight write of another process
    fresh.write_text("partial")
    stale = shard / f".{k}.old.tmp"
    stale.write_text("partial")
    os.utime(stale, (0, 0))
    foreign = dc.root / "README"
    foreign.write_text("keep me")
    assert dc.info()["entries"] == 1  # temp files are not entries
    assert dc.clear() == 1
    assert fresh.exists() and not stale.exists() and foreign.exists()


# --- concurrency -----------------------------------------------------------------------------


def _big_entry(writer: int, i: int) -> dict:
    # Large enough that a non-atomic write would be observable mid-way by a reader.
    return {"source": f"{writer}:{i}:" + "x" * (200_000 + 7919 * writer + 31 * i), "passes": [[str(writer), str(i)]]}


def _valid(entry: dict) -> bool:
    w, i = (int(v) for v in entry["passes"][0])
    return entry == _big_entry(w, i)


def _writer(root: str, key: str, writer: int, n: int, start) -> None:
    start.wait()
    c = DiskCache(root)
    for i in range(n):
        c.put(key, _big_entry(writer, i))


def test_concurrent_puts_leave_a_valid_entry(tmp_path):
    root, key = str(tmp_path / "cache"), cache_key(**PARTS)
    c = DiskCache(root)
    c.put(key, _big_entry(99, 0))  # pre-populated: from now on every read must hit

    ctx = mp.get_context("spawn")  # fork is unsafe once jax (multithreaded) is loaded in the test process
    start = ctx.Event()
    procs = [ctx.Process(target=_writer, args=(root, key, w, 25, start)) for w in range(4)]
    for p in procs:
        p.start()
    start.set()
    reads = misses = invalid = 0
    while any(p.is_alive() for p in procs) or reads == 0:
        got = c.get(key)
        reads += 1
        if got is None:
            misses += 1
        elif not _valid(got):
            invalid += 1
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    assert misses == 0 and invalid == 0, f"{misses} misses, {invalid} invalid of {reads} reads"
    final = c.get(key)
    assert final is not None and _valid(final) and final["passes"][0][1] == "24"
    assert c.info()["entries"] == 1
    assert not list(pathlib.Path(root).rglob("*.tmp"))  # no temp files left behind


# --- code fingerprint ------------------------------------------------------------------------


def test_code_fingerprint_tracks_source_edits(tmp_path, monkeypatch):
    pkg = tmp_path / "fp_pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("X = 1\n")
    (pkg / "emit.py").write_text("def emit():\n    return 'a'\n")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "notes.txt").write_text("ignored")
    monkeypatch.syspath_prepend(str(tmp_path))
    fp = cache_mod.code_fingerprint

    def fresh(*names):
        fp.cache_clear()
        return fp(*names)

    base = fresh("fp_pkg", "fp_pkg.sub")
    assert len(base) == 64 and base == fresh("fp_pkg", "fp_pkg.sub")
    assert fresh("fp_pkg") != base  # the package list matters
    (pkg / "notes.txt").write_text("still ignored")
    assert fresh("fp_pkg", "fp_pkg.sub") == base
    (pkg / "emit.py").write_text("def emit():\n    return 'b'\n")  # an emitter fix
    edited = fresh("fp_pkg", "fp_pkg.sub")
    assert edited != base
    (pkg / "sub" / "new.py").write_text("")  # a new file in a subpackage
    assert fresh("fp_pkg", "fp_pkg.sub") != edited
    assert fresh("no_such_pkg_xyz") != fresh("no_such_pkg_xyz2")  # absent packages don't raise
    fp.cache_clear()
    assert len(fp()) == 64  # the default covers the compiler's own packages
