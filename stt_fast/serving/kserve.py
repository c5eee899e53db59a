"""The Open Inference Protocol (KServe v2; Triton Inference Server's HTTP/REST protocol) for `stt-fast serve`,
as plain functions: request bodies in, tensors out; results in, response bodies out.

    GET  /v2                          server metadata (name, version, extensions)
    GET  /v2/health/live | ready      200, or 503 while the model is not ready
    GET  /v2/models/{m}[/versions/1]  model metadata: its inputs and outputs
    GET  /v2/models/{m}/ready         200 / 503
    POST /v2/models/{m}/infer         inputs -> outputs

Inputs (one of): "clips" UINT8 [B, T, 3, S, S] (0-255) or FP32 [B, T, 3, S, S] (in [0, 1]): the model's
own input; "video" BYTES [B]: video files, decoded as `stt-fast predict` decodes them.
Outputs: "logits" FP32 [B, K], "probabilities" FP32 [B, K], "label" BYTES [B].
Tensors travel as JSON ("data", row-major) or with the binary data extension: the body is the JSON header
(its length in the Inference-Header-Content-Length header) followed by each binary tensor's bytes, in the
order of the inputs, each input saying its size in parameters.binary_data_size; BYTES elements are each a
4-byte little-endian length and the bytes. Outputs are binary when the request asks (binary_data_output, or
an output's parameters.binary_data), as tritonclient does by default.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass

import numpy as np

from .uploads import UploadError

HEADER = "Inference-Header-Content-Length"
DATATYPES = {"UINT8": np.uint8, "FP32": np.float32, "FP16": np.float16, "INT64": np.int64, "INT32": np.int32}
OUTPUTS = ("logits", "probabilities", "label")


@dataclass
class InferRequest:
    """What an infer request asks: the clips (a uint8 or float32 array [B, T, 3, S, S]) or the videos (bytes),
    the outputs wanted (names) and whether each is wanted binary."""

    id: str | None
    clips: np.ndarray | None
    videos: list[bytes] | None
    outputs: dict[str, bool]  # name -> binary


def model_metadata(name: str, config, version: str = "1") -> dict:
    t, s, k = config.num_frames, config.image_size, config.num_classes
    return {"name": name, "versions": [version], "platform": "stt_fast",
            "inputs": [{"name": "clips", "datatype": "UINT8", "shape": [-1, t, 3, s, s]},
                       {"name": "video", "datatype": "BYTES", "shape": [-1]}],
            "outputs": [{"name": "logits", "datatype": "FP32", "shape": [-1, k]},
                        {"name": "probabilities", "datatype": "FP32", "shape": [-1, k]},
                        {"name": "label", "datatype": "BYTES", "shape": [-1]}]}


def _bytes_elements(raw: bytes, count: int) -> list[bytes]:
    items, offset = [], 0
    for _ in range(count):
        if offset + 4 > len(raw):
            raise UploadError(400, "a BYTES tensor ends before its elements do")
        (size,) = struct.unpack_from("<I", raw, offset)
        offset += 4
        if offset + size > len(raw):
            raise UploadError(400, "a BYTES element is longer than the data sent")
        items.append(raw[offset:offset + size])
        offset += size
    return items


def parse_infer(body: bytes, header_length: str | None, config, *, max_batch: int) -> InferRequest:
    """An infer request body -> InferRequest, with every shape, type and size checked against the model; an
    UploadError (400) naming what is wrong."""
    try:
        json_size = int(header_length) if header_length is not None else len(body)
    except ValueError:
        raise UploadError(400, f"{HEADER} is not a number: {header_length!r}") from None
    if not 0 < json_size <= len(body):
        raise UploadError(400, f"{HEADER} ({json_size}) does not fit the body ({len(body)} bytes)")
    try:
        request = json.loads(body[:json_size])
    except (ValueError, UnicodeDecodeError) as e:
        raise UploadError(400, f"the inference header is not JSON: {e}") from None
    if not isinstance(request, dict) or not isinstance(request.get("inputs"), list) or len(request["inputs"]) != 1:
        raise UploadError(400, "an infer request has one input: 'clips' (UINT8 or FP32 [B, T, 3, S, S]) or 'video' "
                               "(BYTES [B])")
    spec = request["inputs"][0]
    if not isinstance(spec, dict):
        raise UploadError(400, "an input must be an object with name, datatype, shape")
    name, datatype, shape = spec.get("name"), spec.get("datatype"), spec.get("shape")
    if not isinstance(shape, list) or not shape or not all(isinstance(d, int) and d >= 0 for d in shape):
        raise UploadError(400, f"input {name!r}: shape must be a list of sizes, got {shape!r}")
    batch = shape[0]
    if not 1 <= batch <= max_batch:
        raise UploadError(400, f"input {name!r}: batch {batch} is outside 1..{max_batch} (--max-batch)")
    binary = body[json_size:]
    size = (spec.get("parameters") or {}).get("binary_data_size")
    if size is not None and (not isinstance(size, int) or size != len(binary)):
        raise UploadError(400, f"input {name!r}: binary_data_size {size!r} but {len(binary)} bytes follow the header")
    clips = videos = None
    if name == "clips":
        t, s = config.num_frames, config.image_size
        want = [batch, t, 3, s, s]
        if shape != want or datatype not in ("UINT8", "FP32"):
            raise UploadError(400, f"input 'clips' must be UINT8 or FP32 {want}; got {datatype} {shape}")
        dtype = DATATYPES[datatype]
        count = int(np.prod(want))
        if size is not None:
            if len(binary) != count * np.dtype(dtype).itemsize:
                raise UploadError(400, f"input 'clips': {len(binary)} bytes for {count} {datatype} values")
            clips = np.frombuffer(binary, dtype=dtype).reshape(want)
        else:
            data = spec.get("data")
            if not isinstance(data, list):
                raise UploadError(400, "input 'clips' carries neither 'data' nor binary data")
            try:
                clips = np.asarray(data, dtype=dtype).reshape(want)
            except (ValueError, TypeError) as e:
                raise UploadError(400, f"input 'clips': its data is not {count} numbers: {e}") from None
        if datatype == "FP32" and not np.isfinite(clips).all():
            raise UploadError(400, "input 'clips' holds NaN or infinite values")
    elif name == "video":
        if datatype != "BYTES" or len(shape) != 1:
            raise UploadError(400, f"input 'video' must be BYTES [B]; got {datatype} {shape}")
        if size is not None:
            videos = _bytes_elements(binary, batch)
        else:
            data = spec.get("data")
            if not isinstance(data, list) or len(data) != batch or not all(isinstance(d, str) for d in data):
                raise UploadError(400, "input 'video' in JSON carries its files as strings; send binary data instead")
            videos = [d.encode("latin-1") for d in data]
    else:
        raise UploadError(400, f"unknown input {name!r}: this model takes 'clips' or 'video'")
    default_binary = bool((request.get("parameters") or {}).get("binary_data_output", False))
    outputs: dict[str, bool] = {}
    for out in request.get("outputs") or [{"name": n} for n in OUTPUTS]:
        if not isinstance(out, dict) or out.get("name") not in OUTPUTS:
            raise UploadError(400, f"unknown output {out!r}: this model has {', '.join(OUTPUTS)}")
        outputs[out["name"]] = bool((out.get("parameters") or {}).get("binary_data", default_binary))
    return InferRequest(request.get("id"), clips, videos, outputs)


def infer_response(model_name: str, request: InferRequest, logits: np.ndarray, probabilities: np.ndarray,
                   labels: list[str], version: str = "1") -> tuple[bytes, dict[str, str]]:
    """(body, headers) answering request: each output wanted, as JSON data or binary."""
    tensors = {"logits": ("FP32", np.ascontiguousarray(logits, np.float32)),
               "probabilities": ("FP32", np.ascontiguousarray(probabilities, np.float32)),
               "label": ("BYTES", labels)}
    outputs, chunks = [], []
    for name, binary in request.outputs.items():
        datatype, value = tensors[name]
        shape = [len(value)] if datatype == "BYTES" else list(value.shape)
        entry = {"name": name, "datatype": datatype, "shape": shape}
        if binary:
            raw = b"".join(struct.pack("<I", len(v.encode())) + v.encode() for v in value) if datatype == "BYTES" \
                else value.tobytes()
            entry["parameters"] = {"binary_data_size": len(raw)}
            chunks.append(raw)
        else:
            entry["data"] = list(value) if datatype == "BYTES" else value.reshape(-1).tolist()
        outputs.append(entry)
    header = {"model_name": model_name, "model_version": version, "outputs": outputs}
    if request.id is not None:
        header["id"] = request.id
    text = json.dumps(header).encode()
    if not chunks:
        return text, {"Content-Type": "application/json"}
    return text + b"".join(chunks), {"Content-Type": "application/octet-stream", HEADER: str(len(text))}
