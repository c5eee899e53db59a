"""The path from a file to the model (stt_fast.data.pipeline, data.video, data.face): every frame decoded at
most once and equal to a plain decode of the same index, faces found on a downscaled copy where they are
found at full size, limits refused before decoding, reading ahead in order and bounded."""

import os
import threading
import time

import av
import numpy as np
import pytest
import torch
from stt_fast.benchmarks.face_videos import astronaut, face_position, write_face_video, write_faceless_video

from stt_fast.data.face import haar_detector
from stt_fast.data.pipeline import ClipPipeline, read_ahead
from stt_fast.data.sampling import sample_indices
from stt_fast.data.video import BadClipError, ReadLimits, decode_frames, frame_rgb, probe_video, read_video


def _write(path, count, width=96, height=64, fps=25, gop=None, codec="libx264", fmt=None):
    """A video whose frames differ from one another (a moving bar and a ramp), so that frame i is recognisable."""
    with av.open(str(path), "w", format=fmt) as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        if gop:
            stream.codec_context.gop_size = gop
        for i in range(count):
            img = np.zeros((height, width, 3), np.uint8)
            img[..., 0] = (i * 7) % 256
            img[i % height, :, 1] = 255
            img[:, (3 * i) % width, 2] = 255
            for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def _plain_decode(path):
    """Every frame, in order, as the decoder gives it: the independent reference."""
    with av.open(str(path)) as container:
        return [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]


VIDEOS = {  # name: (frames, keyword arguments of _write)
    "mp4-one-gop": (60, {}),
    "mp4-gop12-long": (400, {"gop": 12}),
    "mkv-gop25": (300, {"gop": 25, "fmt": "matroska"}),
    "webm-vp9": (40, {"codec": "libvpx-vp9", "gop": 10, "fmt": "webm"}),
    "avi-mpeg4": (50, {"codec": "mpeg4", "gop": 12, "fmt": "avi"}),
}


@pytest.mark.parametrize("name", list(VIDEOS), ids=list(VIDEOS))
def test_sampled_frames_equal_a_plain_decode_and_each_is_decoded_once(tmp_path, name):
    count, kwargs = VIDEOS[name]
    suffix = {"matroska": ".mkv", "webm": ".webm", "avi": ".avi"}.get(kwargs.get("fmt"), ".mp4")
    path = _write(tmp_path / f"clip{suffix}", count, **kwargs)
    plain = _plain_decode(path)
    info = probe_video(path)
    assert info.frames == len(plain) == count and (info.width, info.height) == (96, 64)
    indices = sample_indices(info.frames, segments=8, frames_per_segment=2)
    seen = []
    frames = decode_frames(info, indices, on_frame=lambda f: seen.append(f.pts))
    for i in indices:
        assert np.array_equal(frame_rgb(frames[i]), plain[i]), f"frame {i} differs from the plain decode"
    assert len(seen) == len(set(seen)), "a frame was decoded twice"
    assert len(seen) <= max(indices) + 1 + 16, "frames past the last one sampled were decoded"
    if kwargs.get("gop", 0) and count >= 300:
        assert len(seen) < count / 2, f"seeking should skip most of a long video: {len(seen)} of {count} decoded"
    assert torch.equal(read_video(path, [5, 5, 0]), torch.from_numpy(np.stack([plain[5], plain[5], plain[0]]))
                       .permute(0, 3, 1, 2))


def test_limits_refuse_a_video_before_decoding(tmp_path):
    path = _write(tmp_path / "big.mp4", 30, width=320, height=240)
    with pytest.raises(BadClipError, match=r"big\.mp4: frames of 320x240 exceed the limit of 50,000 pixels"):
        probe_video(path, ReadLimits(max_frame_pixels=50_000))
    with pytest.raises(BadClipError, match=r"1\.2 s long, beyond the limit of 0\.5 s"):
        probe_video(path, ReadLimits(max_seconds=0.5))
    with pytest.raises(BadClipError, match="more than the limit of 10 frames"):
        probe_video(path, ReadLimits(max_frames=10))
    pipeline = ClipPipeline(4, 32, limits=ReadLimits(max_frame_pixels=50_000))
    item = pipeline.prepare(path)
    assert item.clip is None and "exceed the limit" in item.error


def test_a_pipe_is_refused_not_read(tmp_path):
    """A FIFO as a video or a frame image would block the reader forever (nobody writes to it)."""
    fifo = tmp_path / "clip.mp4"
    os.mkfifo(fifo)
    frames = tmp_path / "frames"
    frames.mkdir()
    os.mkfifo(frames / "0001.jpg")
    pipeline = ClipPipeline(4, 32)
    result = {}
    worker = threading.Thread(target=lambda: result.update(video=pipeline.prepare(fifo),
                                                           images=pipeline.prepare(frames)), daemon=True)
    worker.start()
    worker.join(20)
    assert not worker.is_alive(), "reading a FIFO blocked"
    assert "not a regular file" in result["video"].error and "not a regular file" in result["images"].error


@pytest.fixture(scope="module")
def face_video(tmp_path_factory):
    return write_face_video(tmp_path_factory.mktemp("face") / "face.mp4", 1280, 720, seconds=0.5, fps=30,
                            face_side=360)


def _overlap(a, b):
    (t1, l1, h1, w1), (t2, l2, h2, w2) = a, b
    inter = max(0, min(t1 + h1, t2 + h2) - max(t1, t2)) * max(0, min(l1 + w1, l2 + w2) - max(l1, l2))
    return inter / (h1 * w1 + h2 * w2 - inter)


def test_detection_on_a_downscaled_copy_finds_the_full_size_box_on_a_real_face(face_video):
    """scikit-image's astronaut photograph at 720p: the box found on the 640x360 copy, mapped back, is the box
    the cascade finds on the full frame, within a few pixels, and it lies where the photograph's face is."""
    rgb = frame_rgb(decode_frames(probe_video(face_video), [0])[0])
    full = haar_detector(detect_side=10**6)(rgb)
    small = haar_detector()(rgb)
    face_of = lambda boxes: max(boxes, key=lambda b: b[2] * b[3])  # noqa: E731
    assert full and small
    assert _overlap(face_of(small), face_of(full)) > 0.8, (small, full)
    assert max(abs(a - b) for a, b in zip(face_of(small), face_of(full))) <= 0.1 * face_of(full)[2]
    top, left = face_position(0, 15, 1280, 720, 360)
    t, lf, h, w = face_of(small)
    cy, cx = (t + h / 2 - top) / 360, (lf + w / 2 - left) / 360  # the face's centre in the photograph
    assert 0.15 < cy < 0.45 and 0.25 < cx < 0.55, (cy, cx)


def test_a_real_face_is_cropped_and_a_faceless_video_gets_no_clip(face_video, tmp_path):
    pipeline = ClipPipeline(4, 64, detect_face=True)
    item = pipeline.prepare(face_video)
    assert item.clip is not None and item.clip.shape == (4, 3, 64, 64) and item.error is None
    assert set(item.seconds) == {"decode", "detect", "crop_resize"}
    faceless = write_faceless_video(tmp_path / "wall.mp4", seconds=0.5)
    skipped = pipeline.prepare(faceless)
    assert skipped.clip is None and "no face found" in skipped.skipped and skipped.error is None
    full = ClipPipeline(4, 64, detect_face=True, no_face="full").prepare(faceless)
    assert full.clip is not None and any("no face found" in w for w in full.warnings)
    error = ClipPipeline(4, 64, detect_face=True, no_face="error").prepare(faceless)
    assert error.clip is None and "no face found" in error.error


def test_the_face_crop_is_the_full_size_frames_crop_exactly(face_video):
    """The region is cropped in YUV and only it converted: bit for bit the decoder's RGB conversion of the
    whole frame, cropped, resized as the whole frames would be."""
    from stt_fast.data.transforms import resize

    pipeline = ClipPipeline(4, 32, detect_face=True)
    frames, _ = pipeline.sampled_frames(face_video)
    top, left, h, w = region = pipeline.region(frames, "face", [])
    assert h < 720 and not (top | left | h | w) & 1, region
    full = torch.from_numpy(np.stack([frame_rgb(f) for f in frames])).permute(0, 3, 1, 2)
    crops = torch.from_numpy(np.stack([frame_rgb(f, region) for f in frames])).permute(0, 3, 1, 2)
    assert torch.equal(crops, full[..., top:top + h, left:left + w])
    direct = resize(full[..., top:top + h, left:left + w].contiguous(), 32, dtype=torch.uint8)
    assert torch.equal(pipeline.crop_resize(frames, region), direct)


def test_read_ahead_keeps_order_bounds_the_queue_and_raises_in_place():
    started, lock = [], threading.Lock()

    def work(i):
        with lock:
            started.append(i)
        if i == 5:
            raise ValueError("five")
        time.sleep(0.002)
        return i * 10

    out = []
    gen = read_ahead(range(10), work, depth=2)
    for _ in range(5):
        out.append(next(gen))
        time.sleep(0.02)  # a slow consumer: the reader must not run away
        with lock:
            assert len(started) <= len(out) + 3, (started, out)
    with pytest.raises(ValueError, match="five"):
        next(gen)
    assert out == [0, 10, 20, 30, 40]
    gen.close()
    with pytest.raises(ValueError, match="depth"):
        list(read_ahead([1], work, depth=0))


def test_a_bad_file_gets_its_error_while_the_others_go_on(tmp_path):
    good = _write(tmp_path / "good.mp4", 20)
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"\x00not a video" * 50)
    items = list(ClipPipeline(4, 32).read_ahead([good, bad, tmp_path / "missing.mp4", good], depth=2))
    assert [i.path for i in items] == [str(good), str(bad), str(tmp_path / "missing.mp4"), str(good)]
    assert items[0].clip is not None and torch.equal(items[0].clip, items[3].clip)
    assert "bad.mp4: unreadable video" in items[1].error and "not found" in items[2].error


def test_the_astronaut_is_a_real_photograph():
    image = astronaut()
    assert image.shape == (512, 512, 3) and image.dtype == np.uint8 and image.std() > 30
