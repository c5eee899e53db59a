"""stt-fast annotate: every clip labelled as `stt-fast predict` labels it, a bad file carrying its error,
resumable after an interruption without duplicates, in one process and on a local Ray cluster."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from stt_fast import STT, get_config, save_checkpoint
from stt_fast.annotate import annotate, list_sources, read_rows
from stt_fast.data.synthetic import SynthConfig, write_synthetic_dfew
from stt_fast.predict import predict_paths
from stt_fast.predictors import load_predictor
from tests.helpers import trained_looking


@pytest.fixture(scope="module")
def collection(tmp_path_factory):
    """A synthetic DFEW-layout set (frame folders and videos) with one unreadable file among them."""
    root = write_synthetic_dfew(tmp_path_factory.mktemp("collection") / "videos",
                                SynthConfig(clips_per_class=2, video_fraction=0.3, seed=3), progress=False)
    (root / "Clip" / "original" / "broken.mp4").write_bytes(b"not a video")
    return root


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_checkpoint(trained_looking(get_config("tiny")), tmp_path_factory.mktemp("model") / "m.safetensors")


def _by_path(rows):
    paths = [r["path"] for r in rows]
    assert len(paths) == len(set(paths)), "no clip twice"
    return {r["path"]: r for r in rows}


def _assert_same_as_predict(rows, paths, checkpoint):
    expected = {r["path"]: r for r in predict_paths(paths, load_predictor("reference", checkpoint=checkpoint,
                                                                          device="cpu"), batch_size=4)}
    got = _by_path(rows)
    assert set(got) == set(expected)
    for path, want in expected.items():
        row = got[path]
        if "error" in want:
            assert row["error"] == want["error"] and row["label"] is None
            continue
        assert row["error"] is None and row["label"] == want["label"]
        for name, p in want["probabilities"].items():
            assert row[f"p_{name}"] == pytest.approx(p, abs=2e-6)


def test_sources_folder_dfew_set_and_list_file(collection, tmp_path):
    found = list_sources(collection)
    assert len(found) == 15 and str(collection / "Clip" / "original" / "broken.mp4") in found
    assert all(not p.endswith(".jpg") for p in found), "a folder of frames is one clip"
    listing = tmp_path / "clips.txt"
    relative = os.path.relpath(found[0], tmp_path)
    listing.write_text(f"# my clips\n{relative}\n{found[1]}\n\n")
    assert list_sources(listing) == [str(tmp_path / relative), found[1]]
    with pytest.raises(FileNotFoundError):
        list_sources(tmp_path / "nowhere")


@pytest.mark.parametrize("fmt", ["parquet", "jsonl"])
def test_in_process_equals_predict_and_a_bad_file_carries_its_error(collection, checkpoint, tmp_path, fmt):
    result = annotate(collection, tmp_path / "out", checkpoint=checkpoint, device="cpu", batch_size=4, fmt=fmt)
    assert result.total == result.written == 15 and result.errors == 1
    rows = read_rows(tmp_path / "out")
    _assert_same_as_predict(rows, list_sources(collection), checkpoint)
    assert {r["backend"] for r in rows} == {"reference"} and len({r["model_sha256"] for r in rows}) == 1
    manifest = json.loads((tmp_path / "out" / "_manifest.json").read_text())
    assert manifest["clips"] == 15 and manifest["format"] == fmt and manifest["failed_clips"] == 1
    assert result.failed == [str(collection / "Clip" / "original" / "broken.mp4")]
    again = annotate(collection, tmp_path / "out", checkpoint=checkpoint, device="cpu", batch_size=4, fmt=fmt)
    assert again.skipped_done == 15 and again.written == 0, "a second run skips what is written"
    other = save_checkpoint(STT(get_config("tiny")).eval(), tmp_path / "other.safetensors")
    with pytest.raises(ValueError, match="another model"):
        annotate(collection, tmp_path / "out", checkpoint=other, device="cpu", fmt=fmt)


@pytest.mark.slow
def test_a_killed_run_resumes_without_loss_or_duplicates(tmp_path):
    """SIGKILL mid-run (42 clips, the paper-size model, one clip per part: a run of over ten seconds, long
    enough to be caught in the middle), then the same command again: complete, each clip once, and no
    half-written part ever."""
    collection = write_synthetic_dfew(tmp_path / "videos", SynthConfig(clips_per_class=6, video_fraction=0.0),
                                      progress=False)
    checkpoint = save_checkpoint(trained_looking(get_config("paper")), tmp_path / "paper.safetensors")
    out = tmp_path / "out"
    command = [os.path.join(os.path.dirname(sys.executable), "stt-fast"), "annotate", str(collection), "--checkpoint",
               str(checkpoint), "-o", str(out), "--batch-size", "1", "--format", "jsonl", "--device", "cpu", "--quiet"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 300
    while len(list(out.glob("part-*.jsonl"))) < 3 and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    parts = list(out.glob("part-*.jsonl"))
    assert 3 <= len(parts) < 42, "killed in the middle"
    for part in parts:  # every complete part reads back whole
        assert all(json.loads(line)["path"] for line in part.read_text().splitlines())
    finished = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert finished.returncode == 0, finished.stderr
    rows = read_rows(out)
    assert len(_by_path(rows)) == 42 and not list(out.glob(".part-*"))
    assert f"{len(parts)} already in" in finished.stdout


@pytest.mark.slow
def test_on_a_local_ray_cluster_same_numerics_and_resume(collection, checkpoint, tmp_path):
    pytest.importorskip("ray.data", reason="Ray is an optional extra (stt-fast[ray]); the dev extra installs it")
    paths = list_sources(collection)
    half = tmp_path / "half.txt"
    half.write_text("\n".join(paths[: len(paths) // 2]) + "\n")
    out = tmp_path / "out"
    first = annotate(half, out, checkpoint=checkpoint, device="cpu", batch_size=3)
    assert first.written == len(paths) // 2
    # the rest on Ray: decoding as tasks, inference in two actors
    listing = tmp_path / "all.txt"
    listing.write_text("\n".join(paths) + "\n")
    result = annotate(listing, out, checkpoint=checkpoint, device="cpu", batch_size=3, ray_address="local", workers=2)
    assert result.skipped_done == len(paths) // 2 and result.written == len(paths) - len(paths) // 2
    _assert_same_as_predict(read_rows(out), paths, checkpoint)
    import ray

    try:  # the docs' Ray Data reading of the output (docs/scale.md)
        assert ray.data.read_parquet(str(out)).count() == len(paths)
    finally:
        ray.shutdown()


def _entry():
    return os.path.join(os.path.dirname(sys.executable), "stt-fast")


def test_every_way_the_docs_read_the_output_works(collection, checkpoint, tmp_path):
    """pandas, pyarrow.dataset and a glob of part files, as docs/scale.md shows them (Ray Data: in the Ray
    test). (Mutation: the manifest as OUT/manifest.json makes pandas fail: "Could not read schema".)"""
    import glob

    import pandas as pd
    import pyarrow.dataset as ds
    import pyarrow.parquet as pq

    out = tmp_path / "annotations"
    annotate(collection, out, checkpoint=checkpoint, device="cpu", batch_size=4, fmt="parquet")
    schemas = {str(pq.read_schema(p)) for p in out.glob("*.parquet")}
    assert len(schemas) == 1, "every part has one schema (an all-readable part's error column is a string too)"
    frame = pd.read_parquet(out)
    assert len(frame) == 15 and {"path", "label", "p_Happy", "error"} <= set(frame.columns)
    assert ds.dataset(out, format="parquet").count_rows() == 15
    assert len(pd.concat(pd.read_parquet(p) for p in glob.glob(f"{out}/*.parquet"))) == 15
    assert int(frame["error"].notna().sum()) == 1


def test_failed_clips_make_the_command_fail_and_retry_failed_tries_them_again(collection, checkpoint, tmp_path):
    out = tmp_path / "out"
    command = [_entry(), "annotate", str(collection), "--checkpoint", str(checkpoint), "-o", str(out), "--device",
               "cpu", "--format", "jsonl", "--quiet"]
    first = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert first.returncode == 2 and "1 of 15 clips could not be read" in first.stderr
    assert "--retry-failed" in first.stderr
    assert len(first.stderr.strip().splitlines()) == 1, first.stderr
    broken = collection / "Clip" / "original" / "broken.mp4"
    rows = _by_path(read_rows(out))
    assert rows[str(broken)]["error"]
    again = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert again.returncode == 2 and "15 already in" in again.stdout, "without --retry-failed nothing is retried"
    fixed = tmp_path / "fixed"
    import shutil

    shutil.copytree(collection, fixed)
    good = next(p for p in (fixed / "Clip" / "original").iterdir() if p.suffix == ".mp4" and p.name != "broken.mp4")
    shutil.copyfile(good, fixed / "Clip" / "original" / "broken.mp4")  # the broken file repaired
    out2 = tmp_path / "out2"
    shutil.copytree(out, out2)
    for part in out2.glob("part-*.jsonl"):  # the same rows, pointing at the repaired copy
        part.write_text(part.read_text().replace(str(collection), str(fixed)))
    retry = subprocess.run([*command[:2], str(fixed), *command[3:6], str(out2), *command[7:], "--retry-failed"],
                           capture_output=True, text=True, timeout=600)
    assert retry.returncode == 0, retry.stderr
    rows = _by_path(read_rows(out2))
    assert len(rows) == 15 and all(r["error"] is None for r in rows.values())
    assert "14 already in" in retry.stdout and "1 annotated now" in retry.stdout


def test_the_output_folder_must_be_ours_and_nothing_of_the_users_is_touched(collection, checkpoint, tmp_path):
    """A folder holding the user's files (a manifest.json of their own, notes) is refused and left as it was; a
    foreign part file (named like ours) is named in the error; a single video as SOURCE says to use predict."""
    theirs = tmp_path / "mine"
    theirs.mkdir()
    (theirs / "manifest.json").write_text('{"my": "own manifest"}')
    (theirs / ".part-notes.tmp").write_text("keep me")
    with pytest.raises(ValueError, match="holds files stt-fast annotate did not write"):
        annotate(collection, theirs, checkpoint=str(checkpoint), device="cpu")
    assert (theirs / "manifest.json").read_text() == '{"my": "own manifest"}' and (theirs / ".part-notes.tmp").exists()
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "part-0123456789abcdef.jsonl").write_text('{"path": "x"}\n')
    with pytest.raises(ValueError, match=r"part-0123456789abcdef\.jsonl is not a part file stt-fast annotate wrote"):
        annotate(collection, foreign, checkpoint=str(checkpoint), device="cpu", fmt="jsonl")
    video = next((collection / "Clip" / "original").glob("0*.mp4"))
    with pytest.raises(ValueError, match=r"is a single clip.*stt-fast predict"):
        list_sources(video)
    binary = tmp_path / "list.bin"
    binary.write_bytes(bytes(range(256)))
    with pytest.raises(ValueError, match="not a text file of clip paths"):
        list_sources(binary)
