"""The serving floor of bench_serve: a plain FastAPI app that parses a .npy upload as `stt-fast serve` does and
answers a constant (no model): what HTTP and the framework cost by themselves.

No `from __future__ import annotations` here: FastAPI reads the route's annotations as types."""

from fastapi import FastAPI, Request

from stt_fast.serving.uploads import clip_from_npy


def echo_api(num_frames: int, image_size: int) -> FastAPI:
    api = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)

    @api.post("/v1/predict")
    async def predict(request: Request) -> dict:
        clip_from_npy(await request.body(), num_frames, image_size)
        return {"label": "Happy", "batch_size": 1}

    return api
