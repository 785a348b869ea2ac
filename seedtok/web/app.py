"""The web app: one page (``/``, static files, no CDN: it works offline) and a JSON API under ``/api`` with an
OpenAPI schema at ``/api/openapi.json``.

FastAPI (on Starlette, served by uvicorn): typed request models give the OpenAPI schema and input validation
for free, file uploads are first-class, it is widely used and maintained, and it adds no front-end runtime
(Gradio would bring a large JS bundle and its own page layout). Swagger UI is off: its assets come from a CDN.

Safety: bodies over ``max_upload_bytes`` get 413 before any parsing (`BodyLimit`); uploads are decoded only
in the formats a browser sends and after their header's pixel count is checked (`image_from_bytes`); every
error is JSON ``{"error": "..."}`` with a 4xx code for bad input (503 for an ability without weights); model
calls are serialised by the engine's lock (endpoints are plain functions run in Starlette's thread pool).
"""

from __future__ import annotations

import base64
import io
import json
from importlib import resources

from fastapi import FastAPI, File, Form, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException

from .. import __version__
from ..errors import ConfigError, IdsError, ImageError, SeedtokError, UnavailableError
from ..models.tokenizer import parse_ids
from .engine import MAX_PIXELS, MAX_TEXT, Engine, ImageTooLargeError, image_from_bytes

MAX_UPLOAD_BYTES = 10 * 1024 * 1024
# typed errors -> HTTP status (first match wins: subclasses before their bases)
STATUS = ((ImageTooLargeError, 413), (ImageError, 400), (IdsError, 422), (UnavailableError, 503),
          (ConfigError, 400), (SeedtokError, 400))


# ------------------------------------------------------------------------------------------------ schemas
class ErrorOut(BaseModel):
    error: str = Field(description="what went wrong, in one line")


class IdsOut(BaseModel):
    ids: list[int] = Field(description="the image's token ids, in causal order")


class ImageOut(BaseModel):
    image: str = Field(description="a PNG as a data URL (data:image/png;base64,...)")


class ReconstructOut(IdsOut, ImageOut):
    pass


class CaptionOut(IdsOut):
    caption: str


class AskOut(IdsOut):
    question: str
    answer: str


class DrawOut(IdsOut):
    prompt: str
    image: str | None = Field(description="a PNG data URL; null when the model has no image decoder")


class DetokenizeIn(BaseModel):
    ids: list[int] = Field(description="one image's ids (as many as the model's num_tokens)")
    seed: int = Field(0, ge=0, le=2**31 - 1, description="the decoder's noise seed")


class DrawIn(BaseModel):
    prompt: str = Field(min_length=1, max_length=MAX_TEXT)
    seed: int = Field(0, ge=0, le=2**31 - 1, description="the LM's sampling seed (and the decoder's)")


ERRORS = {code: {"model": ErrorOut} for code in (400, 413, 422, 503)}


# ------------------------------------------------------------------------------------------------ middleware
class BodyLimit:
    """Refuse request bodies over ``limit`` bytes with 413 before the app parses them: a declared
    Content-Length is checked at once, a chunked body is counted while it is read (and buffered, at most
    ``limit`` bytes, then replayed to the app)."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        if declared is not None:
            try:
                too_big = int(declared) > self.limit
            except ValueError:
                return await _error(send, 400, "bad Content-Length header")
            if too_big:
                return await _error(send, 413, f"request body too large (at most {self.limit // 2**20} MB)")
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            size += len(message.get("body", b""))
            if size > self.limit:
                return await _error(send, 413, f"request body too large (at most {self.limit // 2**20} MB)")
            chunks.append(message.get("body", b""))
            if not message.get("more_body"):
                break
        body = b"".join(chunks)
        sent = False

        async def replay():
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body: wait for the disconnect as the app expects

        return await self.app(scope, replay, send)


async def _error(send, status: int, message: str) -> None:
    body = json.dumps({"error": message}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})


# ------------------------------------------------------------------------------------------------ helpers
def data_url(image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


# ------------------------------------------------------------------------------------------------ the app
def create_app(engine: Engine, *, max_upload_bytes: int = MAX_UPLOAD_BYTES, max_pixels: int = MAX_PIXELS) -> FastAPI:
    """The app around an already loaded `Engine` (tests pass one built on micro models)."""
    app = FastAPI(title="seedtok", version=__version__, openapi_url="/api/openapi.json", docs_url=None,
                  redoc_url=None, description="SEED image tokenizer: images <-> 32 causal ids, and a language "
                  "model that reads and writes them. Errors are JSON {\"error\": ...}.")
    app.state.engine = engine

    @app.exception_handler(SeedtokError)
    async def _seedtok_error(request: Request, exc: SeedtokError):
        status = next(code for kind, code in STATUS if isinstance(exc, kind))
        return JSONResponse({"error": str(exc)}, status_code=status)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        message = f"{where}: {first.get('msg', 'invalid request')}" if where else first.get("msg", "invalid request")
        return JSONResponse({"error": message}, status_code=422)

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, exc: HTTPException):
        return JSONResponse({"error": str(exc.detail)}, status_code=exc.status_code, headers=exc.headers)

    def read(upload: UploadFile) -> object:
        return image_from_bytes(upload.file.read(), max_pixels)

    def source(image: UploadFile | None, ids: str | None):
        """An uploaded image, or ids given instead (saves encoding the image again)."""
        if (image is None) == (ids is None):
            raise SeedtokError("give exactly one of an image file ('image') or its ids ('ids')")
        if image is not None:
            return [read(image)]
        return engine.check_ids([parse_ids(ids)])

    @app.get("/api/info", summary="the models and which abilities work (and why not)")
    def info() -> dict:
        return {**engine.info(), "max_upload_bytes": max_upload_bytes, "max_pixels": max_pixels,
                "max_text": MAX_TEXT}

    @app.post("/api/tokenize", response_model=IdsOut, responses=ERRORS, summary="image -> ids")
    def tokenize(image: UploadFile = File(description="PNG, JPEG, GIF, WEBP, BMP or TIFF")):
        return {"ids": engine.tokenize([read(image)])[0].tolist()}

    @app.post("/api/detokenize", response_model=ImageOut, responses=ERRORS, summary="ids -> image")
    def detokenize(body: DetokenizeIn):
        return {"image": data_url(engine.detokenize([body.ids], seed=body.seed)[0])}

    @app.post("/api/reconstruct", response_model=ReconstructOut, responses=ERRORS, summary="image -> ids -> image")
    def reconstruct(image: UploadFile = File(description="PNG, JPEG, GIF, WEBP, BMP or TIFF"),
                    seed: int = Form(0, ge=0, le=2**31 - 1)):
        ids, images = engine.reconstruct([read(image)], seed=seed)
        return {"ids": ids[0].tolist(), "image": data_url(images[0])}

    @app.post("/api/caption", response_model=CaptionOut, responses=ERRORS, summary="image (or its ids) -> caption")
    def caption(image: UploadFile | None = File(None), ids: str | None = Form(None, description="instead of image")):
        src = source(image, ids)
        ids_ = src if not isinstance(src, list) else engine.tokenize(src)
        return {"ids": ids_[0].tolist(), "caption": engine.caption(ids_)[0]}

    @app.post("/api/ask", response_model=AskOut, responses=ERRORS, summary="image (or its ids) + question -> answer")
    def ask(question: str = Form(min_length=1, max_length=MAX_TEXT), image: UploadFile | None = File(None),
            ids: str | None = Form(None, description="instead of image")):
        src = source(image, ids)
        ids_ = src if not isinstance(src, list) else engine.tokenize(src)
        return {"ids": ids_[0].tolist(), "question": question, "answer": engine.ask(ids_, question)[0]}

    @app.post("/api/draw", response_model=DrawOut, responses=ERRORS, summary="prompt -> ids -> image")
    def draw(body: DrawIn):
        ids, images = engine.draw(body.prompt, seed=body.seed)
        return {"prompt": body.prompt, "ids": ids[0].tolist(),
                "image": data_url(images[0]) if images is not None else None}

    static = resources.files("seedtok.web") / "static"
    page = (static / "index.html").read_text(encoding="utf-8")

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def index():
        return page

    app.mount("/static", StaticFiles(directory=str(static)), name="static")
    app.add_middleware(BodyLimit, limit=max_upload_bytes)
    return app
