"""The HTTP API (FastAPI): routes, validation, error shapes, body-size limit.

:func:`build_api` knows nothing of Ray: it calls a *backend* (the Serve ingress
deployment in production, a fake in the unit tests) with an already validated request.

Routes::

    POST /recommend   RecommendRequest -> RecommendResponse (4xx with {"detail": ...} on bad input)
    GET  /healthz     liveness of the HTTP layer
    GET  /readyz      200 when every model slot answers, else 503
    GET  /models      model slots, their versions and inference settings
    GET  /openapi.json, /docs

Every client mistake is a 4xx with a one-line ``detail``: 422 for schema violations
(wrong types, k/beams/history out of range, unknown fields, bad JSON) and for unknown
item ids, 404 for an unknown user or model slot, 413 for an oversized body.
"""
# No ``from __future__ import annotations``: FastAPI must see the request class built
# inside build_api as a real annotation, not a string it cannot resolve.

from typing import Any, Protocol

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.requests import Request

from cobra_scale.serve.schemas import ErrorResponse, Limits, RecommendResponse, first_error_line, request_model


class ApiError(Exception):
    """A request the service refuses (status 4xx) or cannot serve right now (503)."""

    def __init__(self, status: int, detail: str):
        super().__init__(detail)
        self.status = status
        self.detail = detail


class Backend(Protocol):
    async def recommend(self, request: Any) -> dict: ...  # a RecommendResponse dict; raises ApiError

    async def ready(self) -> dict: ...  # {"ready": bool, "models": {slot: info}}

    async def models(self) -> dict: ...  # {"default": slot, "models": {slot: info}}


def build_api(backend: Backend, limits: Limits, title: str = "cobra_scale recommendations") -> FastAPI:
    """The FastAPI app of the service, validating against ``limits`` and answering from ``backend``."""
    RecommendRequest = request_model(limits)
    app = FastAPI(
        title=title,
        version="1",
        description="COBRA generative retrieval: history -> beam search over sparse IDs -> dense vectors -> BeamFusion -> top-k items.",
    )
    app.add_middleware(BodyLimit, max_bytes=limits.max_body_bytes)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [{"loc": list(e.get("loc", ())), "msg": str(e.get("msg", "")), "type": str(e.get("type", ""))} for e in exc.errors()]
        return JSONResponse({"detail": first_error_line(errors), "errors": errors}, status_code=422)

    @app.exception_handler(ApiError)
    async def _refused(_: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse({"detail": exc.detail}, status_code=exc.status)

    errors = {code: {"model": ErrorResponse} for code in (404, 413, 422, 503)}

    @app.post("/recommend", response_model=RecommendResponse, responses=errors, summary="Top-k items for a history or a user")
    async def recommend(body: RecommendRequest) -> dict:
        return await backend.recommend(body)

    @app.get("/healthz", summary="Liveness of the HTTP layer")
    async def healthz() -> dict:
        return {"status": "ok"}

    @app.get("/readyz", summary="200 when every model slot is loaded and answering", responses={503: {"description": "not ready"}})
    async def readyz() -> JSONResponse:
        state = await backend.ready()
        return JSONResponse(state, status_code=200 if state.get("ready") else 503)

    @app.get("/models", summary="Model slots, versions and inference settings")
    async def models() -> dict:
        return await backend.models()

    return app


class BodyLimit:
    """ASGI middleware: bodies over ``max_bytes`` get 413 (declared length or streamed bytes)."""

    def __init__(self, app, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_bytes):
            return await self._reject(send)
        seen = 0
        started = False

        async def limited_receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise _TooLarge
            return message

        async def tracking_send(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except _TooLarge:
            if not started:
                await self._reject(send)

    async def _reject(self, send):
        body = ('{"detail": "request body larger than %d bytes"}' % self.max_bytes).encode()
        await send({"type": "http.response.start", "status": 413, "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


class _TooLarge(Exception):
    pass


__all__ = ["ApiError", "Backend", "BodyLimit", "build_api"]
