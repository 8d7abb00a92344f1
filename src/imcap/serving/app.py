"""The FastAPI app: REST API under /v1, /health, offline API docs, and the Gradio page at /.

    app = create_app({"default": Captioner.from_pretrained()}, ServeSettings())

Every request decodes and checks its own uploads (a bad file is that request's 4xx) and hands the
pictures to the one Batcher, which captions them in shared model calls.
"""

from __future__ import annotations

import asyncio
import hmac
import threading
import time
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated

import anyio
from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

import imcap
from imcap.captioner import Captioner
from imcap.explain import ExplainError, Explanation, check_explainable
from imcap.generation import OptionsError
from imcap.serving.limits import RateLimit
from imcap.serving.queue import Batcher, Captioned, QueueFull, ShuttingDown
from imcap.serving.schemas import CaptionsOut, ErrorOut, ModelsOut, caption_form_schema
from imcap.serving.settings import API_KEY_VARIABLE, ServeSettings
from imcap.serving.uploads import CaptionRequest, RequestError, decode_upload, read_caption_request
from imcap.writers import candidate_dict, tag_dict

DOCS_STATIC = "/docs-static"
# at module level: FastAPI resolves a dependency's (string) annotations in this module's globals
_BEARER = HTTPBearer(auto_error=False, description=f"the server's {API_KEY_VARIABLE}")
_ERRORS = {status: {"model": ErrorOut} for status in (400, 401, 413, 422, 429, 503)}


def create_app(captioners: Mapping[str, Captioner], settings: ServeSettings | None = None) -> FastAPI:
    """The whole server for these models (id -> Captioner; the first is the default)."""
    settings = (settings or ServeSettings()).validate()
    batcher = Batcher(
        captioners, settings.queue_size, settings.max_batch, settings.max_wait_ms, settings.threads
    )

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        batcher.close()

    app = FastAPI(
        title="imcap",
        version=imcap.__version__,
        description="Image captioning. POST images to /v1/captions; the web page is at /.",
        docs_url=None,  # the stock pages load Swagger UI / ReDoc from a CDN; ours are served locally
        redoc_url=None,
        lifespan=lifespan,
    )
    app.state.settings, app.state.batcher, app.state.captioners = settings, batcher, dict(captioners)
    app.add_middleware(BodyLimit, max_bytes=settings.max_request_bytes, prefix="/v1/")
    if settings.rate_limit is not None:  # added last, so it runs first: a refused request costs nothing
        app.add_middleware(RateLimit, per_second=settings.rate_limit, prefix="/v1/")
    if settings.cors_origins:  # without it browsers keep other sites' pages from reading our answers
        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(settings.cors_origins),
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "Content-Type"],
        )
    app.add_exception_handler(RequestError, _request_error)
    app.add_exception_handler(QueueFull, _queue_full)
    app.add_exception_handler(ShuttingDown, _shutting_down)
    _add_routes(app, settings, batcher, captioners)
    _add_offline_docs(app)
    if settings.ui:
        from imcap.serving.ui import mount_ui  # gradio is imported only when the page is wanted

        mount_ui(app, batcher, captioners, settings)
    return app


def _add_routes(
    app: FastAPI, settings: ServeSettings, batcher: Batcher, captioners: Mapping[str, Captioner]
) -> None:
    default_model = next(iter(captioners))
    max_tokens = {name: captioner.max_caption_tokens for name, captioner in captioners.items()}
    auth = [Depends(_api_key_check(settings.api_key))]
    # a few full-size decodes at once, not one per waiting request: each can take ~200 MB for a moment
    decode_slots = threading.BoundedSemaphore(settings.threads)

    def decode_all(caption_request: CaptionRequest) -> list:
        with decode_slots:
            return [
                decode_upload(upload, i, settings.max_pixels)
                for i, upload in enumerate(caption_request.uploads)
            ]

    @app.get("/health", tags=["server"])
    async def health() -> dict:
        """Up or not, for load balancers: no versions, and model ids (a --model path, maybe) only when
        /v1/models shows them to anyone too, that is without an API key."""
        if settings.api_key is not None:
            return {"status": "ok", "queued_images": batcher.pending}
        return {"status": "ok", "models": list(captioners), "queued_images": batcher.pending}

    @app.get("/v1/models", tags=["captions"], dependencies=auth, response_model=ModelsOut, responses=_ERRORS)
    async def models() -> dict:
        return {
            "models": [
                {"id": name, "default": name == default_model, "max_caption_tokens": max_tokens[name]}
                for name in captioners
            ]
        }

    @app.post(
        "/v1/captions",
        tags=["captions"],
        dependencies=auth,
        response_model=CaptionsOut,
        responses=_ERRORS,
        openapi_extra=caption_form_schema(),
    )
    async def captions(request: Request) -> dict:
        """Caption one or more uploaded images (multipart/form-data, files in the `images` field)."""
        started = time.perf_counter()
        async with _parsed_form(request) as form:
            caption_request = await read_caption_request(form, settings, max_tokens, default_model)
        if caption_request.return_attention:
            _check_explainable(captioners[caption_request.model])
        _check_prompt(captioners[caption_request.model], caption_request.options)
        caption_request.options = _resolved(captioners[caption_request.model], caption_request.options)
        batcher.check_room(len(caption_request.uploads))  # a full queue answers 503 before any decoding
        decode_started = time.perf_counter()
        decoded = await anyio.to_thread.run_sync(decode_all, caption_request)
        decode_ms = _ms_since(decode_started)
        futures = batcher.submit(
            caption_request.model,
            [image for image, _ in decoded],
            caption_request.options,
            attention=caption_request.return_attention,
        )
        try:
            done = await asyncio.wait_for(
                asyncio.gather(*(asyncio.wrap_future(f) for f in futures)), settings.request_timeout_s
            )
        except TimeoutError:  # wait_for cancelled the futures: images still queued are dropped
            raise HTTPException(
                503,
                f"timed out after {settings.request_timeout_s:g} s waiting for the model; try again",
                headers={"Retry-After": "1"},
            ) from None
        return _response(caption_request, decoded, done, decode_ms, _ms_since(started))


def _check_prompt(captioner: Captioner, options) -> None:
    """422 for a prompt the model does not take (imcap.families), before any image is decoded."""
    if options.prompt is None:  # nothing to check (and stand-ins for a Captioner need no check_prompt)
        return
    try:
        captioner.check_prompt(options)
    except OptionsError as error:
        raise RequestError(422, str(error)) from error


def _resolved(captioner: Captioner, options):
    """The options as the model runs them (its own no_repeat_ngram_size when left unset), which the answer
    reports; stand-ins for a Captioner, without a model, leave them as they are."""
    resolve = getattr(captioner, "resolved", None)
    return resolve(options) if resolve is not None else options


def _best_scores(candidates: list) -> dict:
    best = candidate_dict(candidates[0])  # the same names and rounding as the CLI's rows
    return {"score": best["score"], "logprob": best["logprob"]}


def _response(
    caption_request: CaptionRequest, decoded: list, done: list[Captioned], decode_ms: float, total_ms: float
) -> dict:
    images = [
        {
            "filename": upload.filename,
            "width": size[0],
            "height": size[1],
            "caption": item.result.caption,
            **_best_scores(item.result.candidates),
            "candidates": [candidate_dict(c) for c in item.result.candidates],
            "tags": [tag_dict(t) for t in item.result.tags[: caption_request.num_tags]],
            "timing": {
                "queue_ms": round(item.queued_s * 1000, 1),
                "model_ms": round(item.model_s * 1000, 1),
                "batch_images": item.batch_images,
            },
            "attention": _attention(item.explanation),
        }
        for upload, (_, size), item in zip(caption_request.uploads, decoded, done, strict=True)
    ]
    return {
        "model": caption_request.model,
        "settings": caption_request.options.to_dict(),
        "images": images,
        "timing": {"decode_ms": round(decode_ms, 1), "total_ms": round(total_ms, 1)},
    }


def _check_explainable(captioner: Captioner) -> None:
    try:
        check_explainable(captioner.model)
    except ExplainError as error:
        raise RequestError(422, f"return_attention: {error}") from error


def _attention(explanation: Explanation | None) -> dict | None:
    """imcap explain's JSON for one image, less the caption the answer already has (None: not asked)."""
    if explanation is None:
        return None
    return {key: value for key, value in explanation.to_json().items() if key != "caption"}


def _ms_since(started: float) -> float:
    return (time.perf_counter() - started) * 1000


@asynccontextmanager
async def _parsed_form(request: Request) -> AsyncIterator:
    """The multipart form, its spooled files closed (and so deleted) when the block ends."""
    content_type = request.headers.get("content-type", "")
    if not content_type.startswith("multipart/form-data"):
        raise RequestError(400, "send multipart/form-data with image files in the 'images' field")
    try:
        form = await request.form()
    except StarletteHTTPException as error:  # Starlette's parser: a malformed multipart body
        if error.status_code == 413:
            raise
        raise RequestError(400, f"malformed multipart body: {error.detail}") from error
    try:
        yield form
    finally:
        await form.close()


def _api_key_check(api_key: str | None):
    """A dependency that wants `Authorization: Bearer <api_key>`, or nothing when no key is set."""

    async def check(credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_BEARER)]) -> None:
        if api_key is None:
            return
        sent = credentials.credentials if credentials else ""
        # constant time, so that the key cannot be guessed from how fast a wrong one is refused
        if not hmac.compare_digest(sent.encode(), api_key.encode()):
            raise HTTPException(
                401,
                f"missing or wrong API key: send 'Authorization: Bearer <{API_KEY_VARIABLE}>'",
                headers={"WWW-Authenticate": "Bearer"},
            )

    return check


async def _request_error(_: Request, error: RequestError) -> JSONResponse:
    return JSONResponse({"detail": str(error)}, status_code=error.status)


async def _queue_full(_: Request, error: QueueFull) -> JSONResponse:
    return JSONResponse(
        {"detail": str(error)}, status_code=503, headers={"Retry-After": str(error.retry_after_s)}
    )


async def _shutting_down(_: Request, error: ShuttingDown) -> JSONResponse:
    return JSONResponse({"detail": str(error)}, status_code=503, headers={"Retry-After": "5"})


class BodyLimit:
    """ASGI middleware: 413 for a request body over `max_bytes` under `prefix`, declared or streamed.

    Starlette spools uploads to disk without a size limit of its own; this stops reading at the limit.
    """

    def __init__(self, app: ASGIApp, max_bytes: int, prefix: str):
        self.app, self.max_bytes, self.prefix = app, max_bytes, prefix

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith(self.prefix):
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length", b"0")
        if not declared.isdigit() or int(declared) > self.max_bytes:
            response = JSONResponse({"detail": self._message(declared)}, status_code=413)
            return await response(scope, receive, send)
        received = 0

        async def limited() -> Message:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_bytes:  # a chunked body that did not declare its length
                raise HTTPException(413, self._message(b""))
            return message

        await self.app(scope, limited, send)

    def _message(self, declared: bytes) -> str:
        if declared and not declared.isdigit():
            return "invalid Content-Length"
        return f"request body over the limit of {self.max_bytes / 2**20:.0f} MB"


def _add_offline_docs(app: FastAPI) -> None:
    """Swagger UI at /docs and ReDoc at /redoc from files in the fastapi-offline package: no CDN."""
    import fastapi_offline

    static = Path(fastapi_offline.__file__).parent / "static"
    app.mount(DOCS_STATIC, StaticFiles(directory=static), name="docs-static")

    @app.get("/docs", include_in_schema=False)
    async def swagger() -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url=app.openapi_url,
            title="imcap API",
            swagger_js_url=f"{DOCS_STATIC}/swagger-ui-bundle.js",
            swagger_css_url=f"{DOCS_STATIC}/swagger-ui.css",
            swagger_favicon_url=f"{DOCS_STATIC}/favicon.png",
            swagger_ui_parameters={"validatorUrl": None},  # the badge would call validator.swagger.io
        )

    @app.get("/redoc", include_in_schema=False)
    async def redoc() -> HTMLResponse:
        return get_redoc_html(
            openapi_url=app.openapi_url,
            title="imcap API",
            redoc_js_url=f"{DOCS_STATIC}/redoc.standalone.js",
            redoc_favicon_url=f"{DOCS_STATIC}/favicon.png",
            with_google_fonts=False,
        )
