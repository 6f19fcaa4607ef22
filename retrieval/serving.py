"""The search API: an HTTP JSON service (FastAPI) over one :class:`~retrieval.search.Searcher`.

    GET  /health                    {"status": "ok", "images": n, "captions": n, "words": n}
    GET  /info                      model, index and limits (what the index stamp says)
    POST /search/text               {"query": "a red bus", "k": 5}         → images
    POST /search/arithmetic         {"query": "dog - grass + snow", "k": 5} → its terms and images
    POST /search/image-to-text      multipart: image=<file>, k             → captions and words
    POST /search/image-to-image     multipart: image=<file>, k, text       → images (moved by ``text``,
                                                                              e.g. "+ snow - grass", if given)

Answers are the in-process search's (same keys, order and scores). Every refusal is one JSON line
``{"error": "..."}`` with a 4xx status: 400 bad input, 404 unknown path, 405 wrong method,
413 a body over ``max_body_bytes`` or an image over ``max_pixels``, 415 a body of the wrong type.
Endpoints are plain functions, so the server runs them in its thread pool: searches of one
Searcher run concurrently (see ``retrieval.search`` on thread safety).
"""

from __future__ import annotations

import io
import json
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from PIL import Image
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from retrieval.data.images import ImageTooLarge, open_within_limit, pixel_limit
from retrieval.errors import ConfigError, RetrievalError
from retrieval.imagefile import open_image
from retrieval.search import SIMILARITIES, ImageHit, Searcher, TextHit
from retrieval.text.query import parse_arithmetic

DEFAULT_MAX_BODY_BYTES = 20 * 1024 * 1024
DEFAULT_MAX_PIXELS = 40_000_000
DEFAULT_MAX_K = 100
DEFAULT_MAX_QUERY_CHARS = 1000


@dataclass(frozen=True)
class ServeLimits:
    """What one request may ask: body size in bytes, decoded image size (width × height), ``k`` and query length."""

    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    max_pixels: int = DEFAULT_MAX_PIXELS
    max_k: int = DEFAULT_MAX_K
    max_query_chars: int = DEFAULT_MAX_QUERY_CHARS

    def __post_init__(self) -> None:
        for name in ("max_body_bytes", "max_pixels", "max_k", "max_query_chars"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be a positive whole number, got {value!r}")
        ceiling = pixel_limit()
        if ceiling is not None and self.max_pixels > ceiling:
            raise ConfigError(f"max_pixels {self.max_pixels:,} is above PIL's decompression-bomb limit {ceiling:,}")


class RequestRefused(Exception):
    """A request the API answers with ``{"error": message}`` and ``status``."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.message, self.status = message, status


def one_line(text: object) -> str:
    """``text`` on one line (line breaks become spaces)."""
    return " ".join(str(text).split())


def error_response(message: str, status: int) -> JSONResponse:
    return JSONResponse({"error": one_line(message)}, status_code=status)


class BodyLimit:
    """ASGI middleware: a request body over ``max_bytes`` (declared or streamed) is refused with 413."""

    def __init__(self, app: Callable[..., Awaitable[None]], max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        too_large = f"request body over {self.max_bytes:,} bytes; send a smaller one"
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await error_response(too_large, 413)(scope, receive, send)
            return
        received = 0

        async def counted() -> dict:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise RequestRefused(too_large, 413)
            return message

        started = False

        async def tracked_send(message: dict) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted, tracked_send)
        except RequestRefused as refused:
            if not started:
                await error_response(refused.message, refused.status)(scope, receive, send)


def image_hit(hit: ImageHit) -> dict[str, Any]:
    """An image hit as JSON (the thumbnail file is the server's business: not sent)."""
    return {"key": hit.key, "score": hit.score, "similarity": hit.similarity, "captions": hit.captions}


def text_hit(hit: TextHit) -> dict[str, Any]:
    return {"text": hit.text, "score": hit.score, "similarity": hit.similarity}


def describe(searcher: Searcher, limits: ServeLimits) -> dict[str, Any]:
    """Model, index and limits: what ``GET /info`` answers."""
    model, config = searcher.model, searcher.model.config
    index = {name: {"kind": vectors.kind, "metric": vectors.metric, "dim": vectors.dim, "count": len(vectors),
                    "search_params": vectors.search_params}
             for name, vectors in (("images", searcher.images), ("captions", searcher.captions))}
    return {
        "model": {"backbone": config.model.backbone, "projection": config.model.projection,
                  "text_vectors": config.text.vectors, "text_dim": model.caption_encoder.dim,
                  "loss": config.loss.name, "epoch": model.epoch, "distance": searcher.distance.name},
        "index": {**index, "words": len(searcher.words), "stamp": searcher.images.stamp},
        "similarity": {"images": searcher.image_similarity, "captions": searcher.caption_similarity,
                       "words": "cosine", "meaning": SIMILARITIES},
        "limits": asdict(limits),
    }


def create_app(searcher: Searcher, limits: ServeLimits | None = None) -> FastAPI:
    """The search API over ``searcher`` within ``limits`` (default :class:`ServeLimits`)."""
    limits = limits or ServeLimits()
    app = FastAPI(title="retrieval search API", docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(RequestRefused)
    async def refused(request: Request, error: RequestRefused) -> JSONResponse:
        return error_response(error.message, error.status)

    @app.exception_handler(RetrievalError)
    async def retrieval_error(request: Request, error: RetrievalError) -> JSONResponse:
        return error_response(str(error), 400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        text = {404: f"no endpoint {request.url.path}", 405: f"{request.method} is not allowed on {request.url.path}"}
        return error_response(text.get(error.status_code, str(error.detail)), error.status_code)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, error: RequestValidationError) -> JSONResponse:
        return error_response("malformed request", 400)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, error: Exception) -> JSONResponse:
        return JSONResponse({"error": f"internal error: {one_line(type(error).__name__)}"}, status_code=500)

    def check_k(value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise RequestRefused(f"k must be a whole number from 1 to {limits.max_k}")
        try:
            k = int(value)
        except ValueError:
            raise RequestRefused(f"k must be a whole number from 1 to {limits.max_k}, got {value!r}") from None
        if not 1 <= k <= limits.max_k:
            raise RequestRefused(f"k must be from 1 to {limits.max_k}, got {k}")
        return k

    def check_text(value: Any, field: str) -> str:
        if not isinstance(value, str):
            raise RequestRefused(f"{field} must be a string")
        if not value.strip():
            raise RequestRefused(f"{field} is empty: type some words")
        if len(value) > limits.max_query_chars:
            raise RequestRefused(f"{field} is {len(value):,} characters long; the limit is {limits.max_query_chars:,}")
        return value

    async def json_body(request: Request) -> tuple[str, int]:
        """``query`` and ``k`` (default 5) of a JSON body."""
        if "json" not in request.headers.get("content-type", ""):
            raise RequestRefused('send a JSON body such as {"query": "a red bus", "k": 5}', 415)
        try:
            body = json.loads(await request.body())
        except (ValueError, UnicodeDecodeError):
            raise RequestRefused("the body is not valid JSON") from None
        if not isinstance(body, dict):
            raise RequestRefused('the body must be a JSON object such as {"query": "a red bus", "k": 5}')
        unknown = sorted(set(body) - {"query", "k"})
        if unknown:
            raise RequestRefused(f"unknown field {', '.join(map(repr, unknown))}; give query and k")
        if "query" not in body:
            raise RequestRefused("missing field 'query'")
        return check_text(body["query"], "query"), check_k(body.get("k", 5))

    async def upload(request: Request, extra: tuple[str, ...] = ()) -> tuple[bytes, str, int, dict[str, str]]:
        """The image bytes, its name, ``k`` and any ``extra`` text fields of a multipart upload."""
        if "multipart/form-data" not in request.headers.get("content-type", ""):
            raise RequestRefused("send the image as multipart/form-data with a field named 'image'", 415)
        try:
            form = await request.form(max_files=1, max_fields=4)
        except RequestRefused:
            raise
        except Exception as error:  # python-multipart and starlette refuse a malformed form in several ways
            raise RequestRefused(f"malformed upload: {one_line(getattr(error, 'detail', error))}") from None
        unknown = sorted(set(form.keys()) - {"image", "k", *extra})
        if unknown:
            raise RequestRefused(f"unknown field {', '.join(map(repr, unknown))}; give image, k"
                                 f"{''.join(', ' + name for name in extra)}")
        image = form.get("image")
        if not isinstance(image, UploadFile):
            raise RequestRefused("missing file field 'image'")
        data = await image.read()
        await form.close()
        texts = {name: check_text(form[name], name) for name in extra if isinstance(form.get(name), str)}
        return data, image.filename or "upload", check_k(form.get("k", 5)), texts

    def decode(data: bytes, name: str) -> Image.Image:
        """The upload decoded under the pixel cap: over it → 413, not an image → 400."""
        if not data:
            raise RequestRefused(f"image {name} is empty")
        try:
            open_within_limit(io.BytesIO(data), limits.max_pixels)
        except ImageTooLarge as error:
            raise RequestRefused(error.describe(f"image {name}"), 413) from None
        except Exception:  # not an image: open_image below says so in one line
            pass
        return open_image(io.BytesIO(data), name=name, max_pixels=limits.max_pixels)

    def images_for(query: str, k: int) -> list[dict[str, Any]]:
        return [image_hit(hit) for hit in searcher.text_to_image(query, k)]

    @app.get("/health")
    def health() -> dict[str, Any]:
        return {"status": "ok", "images": len(searcher.images), "captions": len(searcher.captions),
                "words": len(searcher.words)}

    @app.get("/info")
    def info() -> dict[str, Any]:
        return describe(searcher, limits)

    @app.get("/thumbnail/{key}")
    def thumbnail(key: str) -> Response:
        """The JPEG thumbnail of an image of the index, by the key a search answered."""
        if len(key) > limits.max_query_chars:
            raise RequestRefused(f"key is {len(key):,} characters long; the limit is {limits.max_query_chars:,}")
        data = searcher.thumbnail(key)
        if data is None:
            raise RequestRefused(f"no thumbnail for {one_line(key)!r}", 404)
        return Response(content=data, media_type="image/jpeg")

    @app.post("/search/text")
    async def text_to_image(request: Request) -> dict[str, Any]:
        query, k = await json_body(request)
        return {"query": query, "k": k, "images": await run_in_pool(images_for, query, k)}

    @app.post("/search/arithmetic")
    async def arithmetic(request: Request) -> dict[str, Any]:
        query, k = await json_body(request)
        terms = parse_arithmetic(query)
        return {"query": query, "k": k, "terms": [{"sign": "+" if sign > 0 else "-", "text": term}
                                                  for sign, term in terms],
                "images": await run_in_pool(images_for, query, k)}

    @app.post("/search/image-to-text")
    async def image_to_text(request: Request) -> dict[str, Any]:
        data, name, k, _ = await upload(request)

        def answer() -> dict[str, Any]:
            found = searcher.image_to_text(decode(data, name), k)
            return {"k": k, "captions": [text_hit(hit) for hit in found.captions],
                    "words": [text_hit(hit) for hit in found.words]}

        return await run_in_pool(answer)

    @app.post("/search/image-to-image")
    async def image_to_image(request: Request) -> dict[str, Any]:
        data, name, k, texts = await upload(request, extra=("text",))

        def answer() -> dict[str, Any]:
            image = decode(data, name)
            hits = (searcher.image_plus_text(image, texts["text"], k) if "text" in texts
                    else searcher.image_to_image(image, k))
            return {"k": k, **texts, "images": [image_hit(hit) for hit in hits]}

        return await run_in_pool(answer)

    app.add_middleware(BodyLimit, max_bytes=limits.max_body_bytes)
    return app


async def run_in_pool(function: Callable[..., Any], *args: Any) -> Any:
    """``function(*args)`` in the server's thread pool, so searches never block the event loop."""
    from starlette.concurrency import run_in_threadpool

    return await run_in_threadpool(function, *args)
