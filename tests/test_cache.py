"""The cache of exported graphs and engines stays bounded (least recently used out first) and can be listed
and cleared from the command line."""

import json
import os
import subprocess
import sys
import time

from stt_fast import cache


def _entry(folder, name, megabytes, age):
    path = folder / name
    path.mkdir(parents=True)
    (path / "model.onnx").write_bytes(b"x" * int(megabytes * 2**20))
    stamp = time.time() - age
    os.utime(path, (stamp, stamp))
    return path


def test_trim_removes_the_least_recently_used_first_and_never_the_new_entry(tmp_path):
    """(Mutation: without trimming, every compile of a new model adds ~77 MB for good.)"""
    onnx = tmp_path / "onnx"
    old, _middle, recent = (_entry(onnx, n, 1, age) for n, age in (("old", 300), ("middle", 200), ("recent", 100)))
    new = _entry(onnx, "new", 1, 400)  # the oldest stamp, but it is the one just written
    removed = cache.trim(keep=new, limit=int(2.5 * 2**20))
    assert [e.key for e in removed] == ["old", "middle"]
    assert sorted(p.name for p in onnx.iterdir()) == ["new", "recent"]
    cache.touch(recent)
    assert [e.key for e in cache.entries([("onnx", onnx)])] == ["new", "recent"], "touched: most recently used"
    assert cache.trim(keep=new, limit=10 * 2**20) == [] and old.parent.is_dir()
    assert "2 entries, 2 MB" in cache.describe(onnx)


def test_the_limit_comes_from_the_environment(monkeypatch):
    monkeypatch.setenv("STT_FAST_CACHE_LIMIT_MB", "0")
    assert cache.limit_bytes() is None
    monkeypatch.setenv("STT_FAST_CACHE_LIMIT_MB", "10")
    assert cache.limit_bytes() == 10 * 2**20
    monkeypatch.delenv("STT_FAST_CACHE_LIMIT_MB")
    assert cache.limit_bytes() == cache.DEFAULT_LIMIT_MB * 2**20


def test_cache_list_and_clear_through_the_command(tmp_path):
    root = tmp_path / "xdg" / "stt_fast"
    _entry(root / "onnx", "a" * 20, 0.5, 10)
    _entry(root / "engines", "b" * 20, 0.25, 5)
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "xdg")}
    entry = os.path.join(os.path.dirname(sys.executable), "stt-fast")
    listed = subprocess.run([entry, "cache", "list"], capture_output=True, text=True, env=env, timeout=120)
    assert listed.returncode == 0 and f"{root / 'onnx'}: 1 entries, 0 MB" in listed.stdout
    assert "a" * 20 in listed.stdout and "b" * 20 in listed.stdout
    as_json = json.loads(subprocess.run([entry, "cache", "list", "--json"], capture_output=True, text=True, env=env,
                                        timeout=120).stdout)
    assert {e["kind"] for e in as_json["entries"]} == {"onnx", "engines"}
    cleared = subprocess.run([entry, "cache", "clear", "--kind", "onnx"], capture_output=True, text=True, env=env,
                             timeout=120)
    assert cleared.returncode == 0 and "removed 1 entries" in cleared.stdout
    assert not any((root / "onnx").iterdir()) and any((root / "engines").iterdir())
