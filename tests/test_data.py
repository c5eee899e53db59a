"""Data: TSN sampling, transforms, DFEW/AFEW loaders on generated folders and videos, metrics, and every
bad input named clearly."""

import csv
import random
import shutil

import pytest
import torch

from stt_fast.data.datasets import ClipDataset, class_folder_items, collate_clips, dfew_items, make_loader
from stt_fast.data.face import crop_square, largest_face, probe_positions
from stt_fast.data.sampling import sample_indices
from stt_fast.data.synthetic import SynthConfig, synth_clip, write_synthetic_dfew
from stt_fast.data.transforms import eval_transform, train_transform
from stt_fast.data.video import BadClipError, count_video_frames, read_clip
from stt_fast.metrics import confusion_matrix, per_class_recall, summarize, uar, war


@pytest.fixture(scope="module")
def synth_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    return write_synthetic_dfew(root, SynthConfig(clips_per_class=5, video_fraction=0.3, seed=1), progress=False)


# --- sampling ------------------------------------------------------------------------------------------

def test_sampling_long_clip_test_mode_takes_segment_centres():
    idx = sample_indices(100, segments=8, frames_per_segment=2, train=False)
    assert len(idx) == 16 and idx == sorted(idx)
    for s in range(8):
        first, second = idx[2 * s], idx[2 * s + 1]
        assert second == first + 1
        start, stop = round(s * 12.5), round((s + 1) * 12.5)
        assert start <= first and second < stop
        assert abs((first + second) / 2 - (start + stop - 1) / 2) <= 1  # centred


def test_sampling_long_clip_train_mode_is_random_within_segments():
    rng = random.Random(0)
    draws = {tuple(sample_indices(100, train=True, rng=rng)) for _ in range(20)}
    assert len(draws) > 1
    for idx in draws:
        for s in range(8):
            assert round(s * 12.5) <= idx[2 * s] and idx[2 * s + 1] < round((s + 1) * 12.5)
            assert idx[2 * s + 1] == idx[2 * s] + 1


def test_sampling_exact_length_takes_every_frame():
    assert sample_indices(16, train=False) == list(range(16))
    assert sample_indices(16, train=True, rng=random.Random(3)) == list(range(16))


def test_sampling_short_clip_repeats_frames_in_order():
    idx = sample_indices(5, train=False)
    assert len(idx) == 16 and idx == sorted(idx) and set(idx) == set(range(5))
    assert sample_indices(1, train=True) == [0] * 16


def test_sampling_rejects_an_empty_clip():
    with pytest.raises(ValueError, match="at least one frame"):
        sample_indices(0)


# --- transforms ----------------------------------------------------------------------------------------

def test_transforms_shape_range_and_one_crop_for_the_whole_clip():
    frame = torch.randint(0, 256, (1, 3, 48, 60), dtype=torch.uint8)
    frames = frame.expand(5, -1, -1, -1)
    out = train_transform(frames, 32, random.Random(0))
    assert out.shape == (5, 3, 32, 32) and out.dtype == torch.float32
    assert out.min() >= 0 and out.max() <= 1
    assert all(torch.equal(out[0], out[i]) for i in range(5)), "every frame must get the same crop and flip"
    test = eval_transform(frames, 32)
    assert test.shape == (5, 3, 32, 32)
    same = eval_transform(torch.full((2, 3, 32, 32), 255, dtype=torch.uint8), 32)
    assert torch.equal(same, torch.ones(2, 3, 32, 32))


# --- loaders -------------------------------------------------------------------------------------------

def test_dfew_layout_folds_and_both_clip_kinds(synth_root):
    train_items = dfew_items(synth_root, 1, "train")
    test_items = dfew_items(synth_root, 1, "test")
    assert len(train_items) + len(test_items) == 35
    assert {i.path for i in train_items}.isdisjoint({i.path for i in test_items})
    assert sorted({i.label for i in test_items}) == list(range(7))
    all_test = [i.path for f in range(1, 6) for i in dfew_items(synth_root, f, "test")]
    assert len(all_test) == 35 == len(set(all_test)), "each clip is tested in exactly one fold"
    kinds = {i.path.suffix for i in train_items + test_items}
    assert ".mp4" in kinds and "" in kinds, "frame folders and videos are both exercised"
    dataset = ClipDataset(train_items, num_frames=4, image_size=32, train=True)
    for clip, _, _, error in (dataset[i] for i in range(len(dataset))):
        assert clip.shape == (4, 3, 32, 32) and clip.min() >= 0 and clip.max() <= 1 and error is None
    batch = next(iter(make_loader(dataset, batch_size=6, workers=0)))
    assert batch["clips"].shape == (6, 4, 3, 32, 32) and batch["labels"].shape == (6,) and batch["bad"] == []


def test_video_and_folder_of_the_same_frames_agree(tmp_path):
    from stt_fast.data.synthetic import _write_video

    frames = synth_clip(4, 10, 64, random.Random(0))
    _write_video(tmp_path / "clip.mp4", frames)
    assert count_video_frames(tmp_path / "clip.mp4") == 10
    decoded = read_clip(tmp_path / "clip.mp4", lambda n: list(range(n)))
    assert decoded.shape == (10, 3, 64, 64)
    original = torch.from_numpy(frames).permute(0, 3, 1, 2).float()
    assert (decoded.float() - original).abs().mean() < 8, "lossy codec, but the same pictures"


def test_afew_style_class_folders(synth_root, tmp_path):
    items = dfew_items(synth_root, 2, "test")
    for item in items:
        target = tmp_path / "Val" / ["happy", "SAD", "Neutral", "angry", "Surprise", "disgust", "fear"][item.label]
        target.mkdir(parents=True, exist_ok=True)
        dest = target / item.path.name
        (shutil.copytree if item.path.is_dir() else shutil.copyfile)(item.path, dest)
    found = class_folder_items(tmp_path / "Val")
    assert sorted((i.path.name, i.label) for i in found) == sorted((i.path.name, i.label) for i in items)


# --- metrics -------------------------------------------------------------------------------------------

def test_metrics_against_hand_computed_values():
    targets = [0, 0, 0, 0, 1, 1, 2, 2, 2, 2]
    predictions = [0, 0, 0, 1, 1, 0, 2, 2, 1, 1]
    cm = confusion_matrix(predictions, targets, 3)
    assert cm.tolist() == [[3, 1, 0], [1, 1, 0], [0, 2, 2]]
    assert war(cm) == pytest.approx(6 / 10)
    assert per_class_recall(cm) == pytest.approx([3 / 4, 1 / 2, 2 / 4])
    assert uar(cm) == pytest.approx((3 / 4 + 1 / 2 + 2 / 4) / 3)
    summary = summarize(predictions, targets, 3, labels=["a", "b", "c"])
    assert summary["per_class_recall"] == pytest.approx({"a": 0.75, "b": 0.5, "c": 0.5})
    # a class absent from the targets does not count in UAR
    assert uar(confusion_matrix([0, 1], [0, 0], 3)) == pytest.approx(0.5)


def test_confusion_matrix_png(tmp_path):
    from stt_fast.metrics import plot_confusion_matrix

    plot_confusion_matrix(confusion_matrix([0, 1, 2, 3, 4, 5, 6], [0, 1, 2, 3, 4, 5, 5]), tmp_path / "cm.png")
    assert (tmp_path / "cm.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# --- bad inputs ----------------------------------------------------------------------------------------

def test_unreadable_video_is_named(tmp_path):
    bad = tmp_path / "noise.mp4"
    bad.write_bytes(b"\x00garbage" * 100)
    with pytest.raises(BadClipError, match=r"noise\.mp4: unreadable video"):
        read_clip(bad, lambda n: [0])


def test_truncated_video_is_named(tmp_path, synth_root):
    video = next((synth_root / "Clip" / "original").glob("*.mp4"))
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(video.read_bytes()[: video.stat().st_size // 2])
    with pytest.raises(BadClipError, match=r"cut\.mp4"):
        read_clip(cut, lambda n: list(range(n)))


def test_empty_folder_is_named(tmp_path):
    (tmp_path / "00042").mkdir()
    with pytest.raises(BadClipError, match="00042: no frame images"):
        read_clip(tmp_path / "00042", lambda n: [0])


def _copy_with_annotation(synth_root, tmp_path, rows):
    root = tmp_path / "dfew"
    shutil.copytree(synth_root, root)
    path = root / "EmoLabel_DataSplit" / "test(single-labeled)" / "set_1.csv"
    with open(path, "a", newline="") as f:
        csv.writer(f).writerows(rows)
    return root, path


def test_missing_clip_listed_in_an_annotation_file(synth_root, tmp_path):
    root, _ = _copy_with_annotation(synth_root, tmp_path, [(99999, 3)])
    with pytest.raises(BadClipError, match=r"set_1\.csv:\d+: clip 99999 is listed"):
        dfew_items(root, 1, "test")
    problems = []
    items = dfew_items(root, 1, "test", skip_missing=True, problems=problems)
    assert len(items) == 7 and len(problems) == 1 and "99999" in problems[0]


@pytest.mark.parametrize("name", ["../../elsewhere", "/etc/hosts", "..", "a/b"])
def test_a_clip_name_outside_the_data_root_is_refused(synth_root, tmp_path, name):
    root, _ = _copy_with_annotation(synth_root, tmp_path, [(name, 3)])
    with pytest.raises(BadClipError, match=r"set_1\.csv:\d+: clip name .* is not a plain name"):
        dfew_items(root, 1, "test")


def test_unknown_label_in_an_annotation_file(synth_root, tmp_path):
    root, _ = _copy_with_annotation(synth_root, tmp_path, [(1, 9)])
    with pytest.raises(BadClipError, match="unknown label '9'"):
        dfew_items(root, 1, "test")


def test_training_data_skips_and_reports_bad_clips(tmp_path, synth_root):
    items = dfew_items(synth_root, 1, "train")[:3]
    broken = tmp_path / "00001"
    broken.mkdir()
    dataset = ClipDataset([*items, type(items[0])(broken, 2)], num_frames=4, image_size=32, train=True,
                          skip_bad=True)
    batch = collate_clips([dataset[i] for i in range(len(dataset))])
    assert batch["clips"].shape[0] == 3
    assert batch["bad"] == [(str(broken), f"{broken}: no frame images in the folder")]
    strict = ClipDataset([type(items[0])(broken, 2)], num_frames=4, image_size=32, train=False)
    with pytest.raises(BadClipError):
        strict[0]


def test_no_face_found_is_named(tmp_path):
    from PIL import Image

    from stt_fast.data.pipeline import ClipPipeline

    clip = tmp_path / "clip"
    clip.mkdir()
    for i in range(4):
        Image.new("RGB", (64, 64), (128, 128, 128)).save(clip / f"{i:03d}.png")
    with pytest.raises(BadClipError, match=r"clip: no face found"):
        ClipPipeline(4, 32, detect_face=True, no_face="error").load(clip)


def test_face_crop_geometry_with_a_given_detector():
    frames = torch.arange(4 * 3 * 100 * 120, dtype=torch.int32).view(4, 3, 100, 120)
    detections = iter([[(30, 40, 20, 24)], [], [(10, 10, 5, 5)], []])
    box = largest_face([frames[i].permute(1, 2, 0).numpy() for i in probe_positions(4)], lambda rgb: next(detections))
    cropped = crop_square(frames, box)
    assert box == (30, 40, 20, 24) and cropped.shape == (4, 3, 36, 36)  # 24 px, with 25% margin on each side
    corner = crop_square(frames, (0, 0, 50, 50))  # clamped to the frame
    assert torch.equal(corner, frames[..., 0:75, 0:75])
