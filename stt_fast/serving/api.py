"""The HTTP routes of `stt-fast serve` (service.py says what each costs), one FastAPI app for both modes: the
embedded server runs it on uvicorn, the Ray mode's Gateway deployment serves it through Ray Serve. The
Service behind the routes is app.state.service (embedded), or the one register() made this process's (a
Ray replica: Serve runs a copy of the app, so its state is not the one the Gateway's constructor sees)."""

# No `from __future__ import annotations` here: FastAPI reads the routes' parameter annotations as types.
import asyncio
import logging
import time

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from .kserve import HEADER, model_metadata
from .service import Answer, Overloaded, Service
from .uploads import UploadError

log = logging.getLogger("stt_fast.serving")
ROUTES = ("POST /v1/predict", "GET /healthz", "GET /readyz", "GET /metrics", "GET /v2", "GET /v2/health/live",
          "GET /v2/health/ready", "GET /v2/models/{name}", "GET /v2/models/{name}/ready",
          "POST /v2/models/{name}/infer")
OPEN = ("/healthz", "/readyz", "/v2/health/live", "/v2/health/ready")  # answered without the API key


def error(status: int, reason: str, **headers: str) -> JSONResponse:
    return JSONResponse({"error": reason}, status_code=status, headers=headers or None)


_REGISTERED: dict[str, Service] = {}


def register(service: Service) -> None:
    """The service of this process's app (the Ray mode: one Gateway replica a process)."""
    _REGISTERED["service"] = service


def unauthorised() -> JSONResponse:
    return error(401, "this server needs its API key: Authorization: Bearer KEY", **{"WWW-Authenticate": "Bearer"})


def _service(request: Request) -> Service:
    service = getattr(request.app.state, "service", None) or _REGISTERED.get("service")
    if service is None:
        raise RuntimeError("no service registered for this app")
    return service


async def _answer(request: Request, work) -> Response:
    """work() -> Answer, with the API key, every error as one JSON line, and the metrics."""
    service = _service(request)
    started = time.perf_counter()
    status, batch = 500, None
    try:
        if not service.authorised(request.headers.get("authorization")):
            status = 401
            return unauthorised()
        answer: Answer = await work(service)
        status, batch = answer.status, answer.batch_size
        if isinstance(answer.body, bytes):
            return Response(answer.body, status_code=answer.status, headers=answer.headers)
        return JSONResponse(answer.body, status_code=answer.status, headers=answer.headers or None)
    except UploadError as e:
        status = e.status
        return error(e.status, e.reason)
    except Overloaded as e:
        status = 503
        return error(503, f"{e}; retry after a moment", **{"Retry-After": "1"})
    except asyncio.TimeoutError:
        status = 504
        return error(504, f"no answer within {service.options.request_timeout_s:g} s (--timeout-s): the service is "
                          "overloaded or its model is restarting", **{"Retry-After": "5"})
    except ClientDisconnect:
        status = 499
        log.info("stt_fast serve: %s %s: the client disconnected before its request was read", request.method,
                 request.url.path)
        return Response(status_code=499)
    except Exception as e:
        failure = getattr(service.model, "failure", lambda error: None)(e)  # the Ray mode names its replicas' deaths
        if failure:
            status = 503
            return error(503, failure, **{"Retry-After": "2"})
        log.exception("stt_fast serve: request failed")
        return error(500, f"internal error: {type(e).__name__}: {e}")
    finally:
        service.metrics.answered(status, time.perf_counter() - started, batch)


def make_api() -> FastAPI:
    api = FastAPI(title="stt_fast", docs_url=None, redoc_url=None, openapi_url=None)

    @api.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 404:
            return error(404, f"no route {request.method} {request.url.path}; this service has {', '.join(ROUTES)}")
        if exc.status_code == 405:
            return error(405, f"{request.method} is not allowed on {request.url.path}; this service has "
                              f"{', '.join(ROUTES)}")
        return error(exc.status_code, str(exc.detail))

    @api.exception_handler(RequestValidationError)
    async def _bad_parameters(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = "; ".join(f"{'.'.join(map(str, e.get('loc', ())))}: {e.get('msg')}" for e in exc.errors())
        return error(400, f"bad request parameters: {problems}")

    @api.post("/v1/predict")
    async def predict(request: Request, filename: str | None = None):
        async def work(service: Service) -> Answer:
            body = await service.read_body(request.headers, request.stream())
            return await service.predict(body, request.headers.get("content-type"), filename)

        return await _answer(request, work)

    @api.get("/healthz")
    async def healthz():
        return {"status": "ok"}

    @api.get("/readyz")
    async def readyz(request: Request):
        ready, body = await _service(request).model.readiness()
        return JSONResponse({"ready": ready} | body, status_code=200 if ready else 503)

    @api.get("/metrics")
    async def metrics(request: Request):
        service = _service(request)
        if not service.authorised(request.headers.get("authorization")):
            return unauthorised()
        return Response(service.metrics.text(), media_type="text/plain; version=0.0.4")

    # --- the Open Inference Protocol (kserve.py) ---------------------------------------------------------------

    @api.get("/v2")
    async def server_metadata(request: Request):
        from stt_fast import __version__

        async def work(service: Service) -> Answer:
            return Answer(200, {"name": "stt_fast", "version": __version__, "extensions": ["binary_tensor_data"]})

        return await _answer(request, work)

    @api.get("/v2/health/live")
    async def live():
        return Response(status_code=200)

    @api.get("/v2/health/ready")
    async def ready(request: Request):
        ok, _ = await _service(request).model.readiness()
        return Response(status_code=200 if ok else 503)

    @api.get("/v2/models/{name}")
    @api.get("/v2/models/{name}/versions/{version}")
    async def metadata(request: Request, name: str, version: str = "1"):
        async def work(service: Service) -> Answer:
            service._check_model(name)
            return Answer(200, model_metadata(name, (await service.facts())["config"]))

        return await _answer(request, work)

    @api.get("/v2/models/{name}/ready")
    @api.get("/v2/models/{name}/versions/{version}/ready")
    async def model_ready(request: Request, name: str, version: str = "1"):
        async def work(service: Service) -> Answer:
            service._check_model(name)
            ok, _ = await service.model.readiness()
            return Answer(200 if ok else 503, {"name": name, "ready": ok})

        return await _answer(request, work)

    @api.post("/v2/models/{name}/infer")
    @api.post("/v2/models/{name}/versions/{version}/infer")
    async def infer(request: Request, name: str, version: str = "1"):
        async def work(service: Service) -> Answer:
            body = await service.read_body(request.headers, request.stream())
            return await service.infer(name, body, request.headers.get(HEADER.lower()))

        return await _answer(request, work)

    return api
