"""The disk cache runs no code that someone else could have written, and a malformed entry never hangs or crashes
compile (issue 11 items 1 and 2). Real files, modes, owners (os.chown to another uid; the tests run as root in CI
or skip that part), FIFOs, symlinks and subprocesses."""
from __future__ import annotations

import hashlib
import json
import os
import pathlib
import shutil
import stat
import subprocess
import sys
import threading
import warnings

import numpy as np
import pytest

import ssmc
from ssmc import api
from ssmc import cache as cache_mod
from ssmc.cache import MAX_ENTRY_BYTES, SECRET_NAME, DiskCache, cache_key

from reference import VARIANTS, rel_l2

ROOT = pathlib.Path(__file__).resolve().parent.parent
MAMBA2 = ROOT / "examples" / "mamba2.ssm"
ENTRY = {"source": "X = 1\n", "ir": "ir", "passes": [["a", "b"]]}
OTHER_UID = 54321  # an account that is not us: the "other user" of a shared machine
posix = pytest.mark.skipif(os.name != "posix", reason="owners and mode bits are POSIX")
as_root = pytest.mark.skipif(os.name != "posix" or os.geteuid() != 0, reason="chown to another uid needs root")


@pytest.fixture(autouse=True)
def _fresh_warn_state(monkeypatch):
    monkeypatch.setattr(cache_mod, "_warned_roots", set())


def mode(p) -> int:
    return stat.S_IMODE(os.lstat(p).st_mode)


def envelope(c: DiskCache, key: str) -> dict:
    return json.loads(c.path(key).read_bytes())


def plant(path: pathlib.Path, key: str, entry: dict, secret: bytes | None = None) -> None:
    """Write an entry the way an attacker would: valid JSON, the right key and a recomputed sha256; an HMAC only
    if they know the secret."""
    body = cache_mod._canonical(entry)
    env = {"format": cache_mod.FORMAT_VERSION, "key": key, "sha256": hashlib.sha256(body).hexdigest(), "entry": entry}
    if secret is not None:
        env["hmac"] = cache_mod._mac(secret, key, body)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(env))


def chown_tree(root: pathlib.Path, uid: int) -> None:
    for p in [root, *root.rglob("*")]:
        os.lchown(p, uid, uid)


# --- item 1: permissions and ownership -----------------------------------------------------------------


@posix
def test_created_private_even_under_umask_000(tmp_path):
    root = tmp_path / "a" / "b" / "cache"  # missing parents are created too
    old = os.umask(0)
    try:
        c = DiskCache(root)
        k = cache_key(ir="x")
        c.put(k, ENTRY)
    finally:
        os.umask(old)
    for d in (tmp_path / "a", tmp_path / "a" / "b", root, root / "v1", c.path(k).parent):
        assert mode(d) == 0o700, d
    assert mode(root / SECRET_NAME) == 0o600
    assert mode(c.path(k)) & 0o077 == 0
    assert len((root / SECRET_NAME).read_bytes()) == 32
    assert c.get(k) == ENTRY


@posix
@pytest.mark.parametrize("bits", [0o777, 0o770, 0o702])
def test_root_writable_by_others_is_not_used(tmp_path, bits):
    root = tmp_path / "shared"
    c = DiskCache(root)
    k = cache_key(ir="x")
    c.put(k, ENTRY)
    assert c.get(k) == ENTRY
    root.chmod(bits)
    with pytest.warns(RuntimeWarning, match=r"group or others can write"):
        assert c.get(k) is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per root
        assert c.get(k) is None
        c.put(cache_key(ir="y"), ENTRY)  # nothing written into it either
    assert not c.path(cache_key(ir="y")).exists()
    root.chmod(0o755)  # group/other may read, not write: fine
    assert c.get(k) == ENTRY


@posix
def test_subdirectory_writable_by_others_is_not_used(tmp_path):
    c = DiskCache(tmp_path / "c")
    k = cache_key(ir="x")
    c.put(k, ENTRY)
    c.path(k).parent.chmod(0o777)
    with pytest.warns(RuntimeWarning, match="group or others"):
        assert c.get(k) is None


@as_root
def test_root_owned_by_another_user_is_not_used(tmp_path):
    root = tmp_path / "theirs"
    c = DiskCache(root)
    k = cache_key(ir="x")
    c.put(k, ENTRY)  # a complete, authentic-looking cache (their secret, their HMAC)
    chown_tree(root, OTHER_UID)
    with pytest.warns(RuntimeWarning, match=rf"owned by uid {OTHER_UID}"):
        assert c.get(k) is None
    c.put(cache_key(ir="y"), ENTRY)
    assert not c.path(cache_key(ir="y")).exists()
    assert c.clear() == 0 and c.path(k).exists()  # and `ssmc cache clear` leaves their files alone


@as_root
def test_entry_or_secret_owned_by_another_user_is_a_miss(tmp_path):
    c = DiskCache(tmp_path / "c")
    k = cache_key(ir="x")
    c.put(k, ENTRY)
    os.chown(c.path(k), OTHER_UID, OTHER_UID)
    assert c.get(k) is None
    c.put(k, ENTRY)  # replaced by one of ours
    assert os.stat(c.path(k)).st_uid == os.geteuid() and c.get(k) == ENTRY
    os.chown(c.root / SECRET_NAME, OTHER_UID, OTHER_UID)
    with pytest.warns(RuntimeWarning, match=SECRET_NAME):
        assert c.get(k) is None


@posix
def test_entry_or_secret_with_loose_mode_is_a_miss(tmp_path):
    c = DiskCache(tmp_path / "c")
    k = cache_key(ir="x")
    c.put(k, ENTRY)
    c.path(k).chmod(0o666)
    assert c.get(k) is None
    c.path(k).chmod(0o644)  # readable by others is harmless
    assert c.get(k) == ENTRY
    (c.root / SECRET_NAME).chmod(0o640)  # a secret others can read is no secret
    with pytest.warns(RuntimeWarning, match=SECRET_NAME):
        assert c.get(k) is None


def test_planted_entry_with_recomputed_sha256_is_a_miss(tmp_path):
    c = DiskCache(tmp_path / "c")
    k = cache_key(ir="x")
    c.put(k, ENTRY)
    secret = (c.root / SECRET_NAME).read_bytes()
    plant(c.path(k), k, {**ENTRY, "source": "evil()\n"})  # no HMAC
    assert c.get(k) is None
    plant(c.path(k), k, {**ENTRY, "source": "evil()\n"}, secret=b"\0" * 32)  # a guessed secret
    assert c.get(k) is None
    env = envelope(c, k)
    env["hmac"] = cache_mod._mac(secret, cache_key(ir="other"), cache_mod._canonical(env["entry"]))
    c.path(k).write_text(json.dumps(env))  # authentic body, but authenticated for another key
    assert c.get(k) is None
    plant(c.path(k), k, {**ENTRY, "source": "mine\n"}, secret=secret)  # only the secret's holder can do this
    assert c.get(k) == {**ENTRY, "source": "mine\n"}


def test_secret_created_once_and_kept(tmp_path):
    c = DiskCache(tmp_path / "c")
    assert c.get(cache_key(ir="x")) is None and not c.root.exists()  # a read creates nothing
    c.put(cache_key(ir="x"), ENTRY)
    s1 = (c.root / SECRET_NAME).read_bytes()
    c.put(cache_key(ir="y"), ENTRY)
    assert c.clear() == 2
    c.put(cache_key(ir="z"), ENTRY)
    assert (c.root / SECRET_NAME).read_bytes() == s1
    assert DiskCache(tmp_path / "d").put(cache_key(ir="x"), ENTRY) is None
    assert (tmp_path / "d" / SECRET_NAME).read_bytes() != s1  # one secret per root, random
    assert not list(c.root.glob(".secret.*"))  # no temp file left


# --- the same through ssmc.compile in fresh processes ----------------------------------------------------

_SCRIPT = """
import json, sys, numpy as np, ssmc
k = ssmc.compile({spec!r})
xs = dict(np.load({inputs!r}))
np.savez({outputs!r}, *[np.asarray(r, np.float64) for r in k(**xs)])
print(json.dumps({{"from_disk_cache": k.from_disk_cache, "source": k.source}}))
"""


def _compile_in_process(tmp_path, cache_root) -> tuple[dict, list, str]:
    """Compile mamba2 in a fresh python with SSMC_CACHE_DIR=cache_root, run it on fresh random inputs."""
    ref = VARIANTS["mamba2"]
    rng = np.random.default_rng(int.from_bytes(os.urandom(4), "little"))
    xs = ref.make_inputs(rng, dict(b=1, t=24, h=2, p=3, n=4, g=1))
    np.savez(tmp_path / "in.npz", **{k: np.asarray(v, np.float32) for k, v in xs.items()})
    script = _SCRIPT.format(spec=str(MAMBA2), inputs=str(tmp_path / "in.npz"), outputs=str(tmp_path / "out.npz"))
    env = dict(os.environ, SSMC_CACHE_DIR=str(cache_root), JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    got = np.load(tmp_path / "out.npz")
    outs, states = ref.reference({k: np.asarray(v, np.float32) for k, v in xs.items()})
    want = [*outs, *states]
    assert len(got.files) == len(want)
    for i, w in enumerate(want):
        assert rel_l2(got[f"arr_{i}"], w) < 1e-4
    return json.loads(proc.stdout.strip().splitlines()[-1]), want, proc.stderr


def _genuine_entry(tmp_path, monkeypatch) -> tuple[pathlib.Path, dict]:
    """A real cache built by compiling mamba2 once (here): (root, {"key", "path", "env"})."""
    root = tmp_path / "genuine"
    monkeypatch.setenv("SSMC_CACHE_DIR", str(root))
    monkeypatch.setattr(api, "_MEMORY", type(api._MEMORY)())
    assert not ssmc.compile(str(MAMBA2)).from_disk_cache
    (path,) = [p for p in (root / "v1").glob("??/*.json")]
    return root, {"key": path.stem, "path": path, "env": json.loads(path.read_bytes())}


def _evil(entry: dict, marker: pathlib.Path) -> dict:
    # Writes a marker when executed, then behaves (almost) like the real kernel: a planted entry need not crash.
    return {**entry, "source": f"open({str(marker)!r}, 'w').write('executed')\n" + entry["source"]}


def test_planted_entry_in_our_own_cache_is_not_executed(tmp_path, monkeypatch):
    root, g = _genuine_entry(tmp_path, monkeypatch)
    marker = tmp_path / "MARKER"
    plant(g["path"], g["key"], _evil(g["env"]["entry"], marker))  # recomputed sha256, no valid HMAC
    report, _, _ = _compile_in_process(tmp_path, root)
    assert not marker.exists()
    assert not report["from_disk_cache"] and report["source"] == g["env"]["entry"]["source"]
    assert envelope(DiskCache(root), g["key"])["entry"] == g["env"]["entry"]  # regenerated in place
    assert DiskCache(root).get(g["key"]) == g["env"]["entry"]  # and it is an authentic hit again


@as_root
@pytest.mark.slow
def test_root_created_by_another_user_is_not_executed(tmp_path, monkeypatch):
    """The probe's case: a root process compiles with SSMC_CACHE_DIR pointing at a directory another user made,
    holding a complete cache (their own secret and valid HMACs) whose kernel writes a marker."""
    genuine, g = _genuine_entry(tmp_path, monkeypatch)
    theirs = tmp_path / "theirs"
    shutil.copytree(genuine, theirs)
    secret = (theirs / SECRET_NAME).read_bytes()
    plant(theirs / g["path"].relative_to(genuine), g["key"], _evil(g["env"]["entry"], tmp_path / "MARKER"), secret)
    assert DiskCache(theirs).get(g["key"]) is not None  # authentic as far as the HMAC goes
    chown_tree(theirs, OTHER_UID)
    report, _, err = _compile_in_process(tmp_path, theirs)
    assert not (tmp_path / "MARKER").exists()
    assert not report["from_disk_cache"] and report["source"] == g["env"]["entry"]["source"]
    assert f"owned by uid {OTHER_UID}" in err and err.count("not using the kernel cache") == 1
    assert os.stat(theirs / g["path"].relative_to(genuine)).st_uid == OTHER_UID  # nothing written there


@posix
@pytest.mark.slow
def test_world_writable_root_is_not_executed(tmp_path, monkeypatch):
    genuine, g = _genuine_entry(tmp_path, monkeypatch)
    secret = (genuine / SECRET_NAME).read_bytes()
    plant(g["path"], g["key"], _evil(g["env"]["entry"], tmp_path / "MARKER"), secret)  # e.g. the secret leaked
    genuine.chmod(0o777)
    report, _, err = _compile_in_process(tmp_path, genuine)
    assert not (tmp_path / "MARKER").exists() and not report["from_disk_cache"]
    assert "group or others can write" in err


# --- item 2: malformed files never hang or crash ---------------------------------------------------------


def _get_with_timeout(c: DiskCache, key: str, seconds: float = 30.0):
    box = {}
    t = threading.Thread(target=lambda: box.setdefault("v", c.get(key)), daemon=True)
    t.start()
    t.join(seconds)
    assert not t.is_alive(), "DiskCache.get blocked"
    return box["v"]


def _entry_removed(tmp_path):
    """A cache with one entry written and its file unlinked, for a test to put something else in its place."""
    c = DiskCache(tmp_path / "c")
    k = cache_key(ir="x")
    c.put(k, ENTRY)
    c.path(k).unlink()
    return c, k


@posix
def test_fifo_entry_does_not_block(tmp_path):
    c, k = _entry_removed(tmp_path)
    os.mkfifo(c.path(k), 0o600)
    assert _get_with_timeout(c, k) is None
    c.put(k, ENTRY)  # and a put replaces it
    assert stat.S_ISREG(os.lstat(c.path(k)).st_mode) and c.get(k) == ENTRY


@posix
@pytest.mark.parametrize("target", ["/dev/zero", "/dev/urandom", "genuine"])
def test_symlinked_entry_is_a_miss(tmp_path, target):
    c = DiskCache(tmp_path / "c")
    k = cache_key(ir="x")
    c.put(k, ENTRY)
    if target == "genuine":  # even one pointing at a valid entry of ours: links are never followed
        target = str(tmp_path / "copy.json")
        shutil.copy(c.path(k), target)
    c.path(k).unlink()
    c.path(k).symlink_to(target)
    assert _get_with_timeout(c, k) is None


@posix
def test_symlinked_shard_directory_is_not_followed(tmp_path):
    c = DiskCache(tmp_path / "c")
    k = cache_key(ir="x")
    c.put(k, ENTRY)
    shard = c.path(k).parent
    shard.rename(tmp_path / "elsewhere")
    shard.symlink_to(tmp_path / "elsewhere")
    with pytest.warns(RuntimeWarning, match="is a symlink"):
        assert c.get(k) is None
    assert c.clear() == 0 and (tmp_path / "elsewhere" / c.path(k).name).exists()


@posix
def test_device_node_entry_is_a_miss(tmp_path):
    c, k = _entry_removed(tmp_path)
    try:
        os.mknod(c.path(k), 0o600 | stat.S_IFCHR, os.makedev(1, 5))  # /dev/zero's numbers
    except PermissionError:
        pytest.skip("mknod needs privileges")
    assert _get_with_timeout(c, k) is None


def test_oversize_entry_is_not_read(tmp_path, monkeypatch):
    c = DiskCache(tmp_path / "c")
    k = cache_key(ir="x")
    c.put(k, ENTRY)
    size = c.path(k).stat().st_size
    with c.path(k).open("ab") as f:  # still valid JSON: only the size bound can reject it
        f.write(b" " * (MAX_ENTRY_BYTES + 1 - size))
    assert c.path(k).stat().st_size == MAX_ENTRY_BYTES + 1
    reads = []
    real_read = os.read
    monkeypatch.setattr(cache_mod.os, "read", lambda fd, n: reads.append(n) or real_read(fd, n))
    assert c.get(k) is None
    assert max(reads) <= cache_mod._SECRET_BYTES + 1  # only the secret was read: rejected from fstat
    with c.path(k).open("r+b") as f:
        f.truncate(MAX_ENTRY_BYTES)
    assert c.get(k) == ENTRY  # at the bound it is read


@posix
@pytest.mark.slow
def test_fifo_entry_does_not_hang_compile(tmp_path, monkeypatch):
    root, g = _genuine_entry(tmp_path, monkeypatch)
    g["path"].unlink()
    os.mkfifo(g["path"], 0o600)
    report, _, _ = _compile_in_process(tmp_path, root)  # (300 s timeout; it used to block forever)
    assert not report["from_disk_cache"]
    assert stat.S_ISREG(os.lstat(g["path"]).st_mode)


@posix
@pytest.mark.slow
def test_dev_zero_entry_does_not_crash_compile(tmp_path, monkeypatch):
    root, g = _genuine_entry(tmp_path, monkeypatch)
    g["path"].unlink()
    g["path"].symlink_to("/dev/zero")
    report, _, _ = _compile_in_process(tmp_path, root)  # used to raise MemoryError
    assert not report["from_disk_cache"]
    assert not g["path"].is_symlink()
