"""What a POST /v1/predict carries, turned into the model's clip: the same decoding as `stt-fast predict`.

Accepted bodies (the upload limit is checked before and while the body is read, by the caller):
- multipart/form-data with a file field "file": a video (or image) file, or a .npy clip by its name;
- a raw body: Content-Type application/x-npy (a clip), or any other type (video/mp4,
  application/octet-stream...) as a video file whose suffix comes from ?filename= (default .mp4).
A clip as .npy is uint8 [T, 3, S, S], exactly the model's T frames of S x S pixels (0-255, RGB).
Everything wrong with a request is an UploadError with its HTTP status and a reason a user can act on.
"""

from __future__ import annotations

import email.parser
import email.policy
import io
import os
from dataclasses import dataclass

import numpy as np
import torch

NPY_TYPES = ("application/x-npy", "application/npy")


class UploadError(ValueError):
    """A request the service refuses: status (400, 413...) and the reason."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status, self.reason = status, reason


@dataclass(frozen=True)
class Upload:
    kind: str  # "npy" or "video"
    data: bytes
    suffix: str  # the video file's suffix (".mp4"); "" for npy


def check_declared_size(content_length: str | None, limit_bytes: int) -> None:
    """413 for a body declared larger than the limit (before reading it); 400 for a bad header."""
    if content_length is None:
        return
    try:
        declared = int(content_length)
    except ValueError:
        raise UploadError(400, f"Content-Length is not a number: {content_length!r}") from None
    if declared > limit_bytes:
        raise UploadError(413, f"the upload is {declared / 2**20:.1f} MiB; this server takes at most "
                               f"{limit_bytes / 2**20:.1f} MiB (--max-upload-mb)")


def _suffix(filename: str | None) -> str:
    """The video suffix of an upload's name (".mp4" without one); 400 for a name that is not a video's."""
    from stt_fast.data.video import VIDEO_SUFFIXES

    if not filename:
        return ".mp4"
    suffix = os.path.splitext(filename)[1].lower()
    if suffix not in VIDEO_SUFFIXES or any(ord(c) < 32 for c in filename):
        shown = suffix[:12] + ("..." if len(suffix) > 12 else "")
        raise UploadError(400, f"a file named *{shown!r} is not a video this server reads: send one of "
                               f"{', '.join(sorted(VIDEO_SUFFIXES))}, or a .npy clip")
    return suffix


MAX_PARTS = 16  # multipart parts in one request: the file and a few form fields


def parse_upload(body: bytes, content_type: str | None, filename: str | None = None) -> Upload:
    """The clip or video a request body holds (see the module docstring); 400 naming what is missing. CPU work
    on the body (the multipart parser): the service runs it off its event loop."""
    if not body:
        raise UploadError(400, "empty request body: send a video file (multipart field 'file') or a .npy clip")
    media = (content_type or "").split(";")[0].strip().lower()
    if media == "multipart/form-data":
        boundary = next((p.split("=", 1)[1].strip().strip('"') for p in (content_type or "").split(";")[1:]
                         if p.strip().lower().startswith("boundary=")), "")
        if not boundary:
            raise UploadError(400, "multipart upload without a boundary in its Content-Type")
        if body.count(b"--" + boundary.encode("latin-1")) > MAX_PARTS + 1:
            raise UploadError(400, f"a multipart upload of more than {MAX_PARTS} parts: send the file alone")
        message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
            b"Content-Type: " + content_type.encode("latin-1") + b"\r\n\r\n" + body)
        parts = [p for p in message.iter_parts() if p.get_param("name", header="content-disposition") == "file"] \
            if message.is_multipart() else []
        if not parts:
            raise UploadError(400, "multipart upload without a 'file' field (curl -F file=@clip.mp4)")
        part = parts[0]
        filename, body = part.get_filename(), part.get_payload(decode=True) or b""
        if not body:
            raise UploadError(400, "the 'file' field is empty")
        if (filename or "").lower().endswith(".npy"):
            return Upload("npy", body, "")
        media = ""
    if media in NPY_TYPES:
        return Upload("npy", body, "")
    return Upload("video", body, _suffix(filename))


def clip_from_npy(data: bytes, num_frames: int, image_size: int) -> torch.Tensor:
    """uint8 [T, 3, S, S] .npy bytes -> float32 [T, 3, S, S] in [0, 1] (as the model takes it). The header is
    read and checked before any array is made: a header declaring petabytes costs nothing."""
    from numpy.lib import format as npy

    want = (num_frames, 3, image_size, image_size)
    stream = io.BytesIO(data)
    try:
        version = npy.read_magic(stream)
        reader = npy.read_array_header_1_0 if version == (1, 0) else npy.read_array_header_2_0
        shape, fortran, dtype = reader(stream)
    except (ValueError, OSError, EOFError, SyntaxError) as e:
        raise UploadError(400, f"the body is not a .npy array: {e}") from None
    if dtype != np.uint8 or tuple(shape) != want:
        raise UploadError(400, f"a .npy clip must be uint8 {list(want)} (T, 3, H, W: this model's input); "
                               f"got {dtype} {list(shape)}")
    payload = data[stream.tell():]
    if len(payload) != int(np.prod(want)):
        raise UploadError(400, f"the .npy clip holds {len(payload)} bytes for {int(np.prod(want))} values")
    array = np.frombuffer(payload, np.uint8).reshape(want[::-1] if fortran else want)
    if fortran:
        array = array.transpose()
    return torch.from_numpy(array.copy()).float() / 255  # a writable copy: frombuffer arrays are read-only
