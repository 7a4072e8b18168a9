"""The web viewer and its JSON API: one loaded run, one plain page, images in, screenings out.

Endpoints (FastAPI documents them at ``/docs``):

- ``GET /``: the viewer page (``static/``: plain HTML, CSS and JavaScript, no build step, nothing loaded
  from elsewhere);
- ``GET /health``: ``{"status": "ok"}``, for load balancers and tests;
- ``GET /model``: what the run is (model, classes, heads, input, operating point, training summary, its own
  test figures with their 95 % intervals as training stored them in best.pt, and which segmenter draws
  the lungs: ``classical`` is the rough fallback of a machine without a trained lung model);
- ``POST /predict``: multipart form with the image in field ``file`` (PNG, JPEG or DICOM); the screening
  (:mod:`lungscreen.audit.screening`: probabilities, the decision in words, lungs and the window the model
  saw, DICOM identity) as JSON with the original and the overlay as PNG data URLs. An image the run does
  not take (another modality, no lungs found...) is 422 with the reason in ``detail``.

Security is part of the design: the model is loaded once, from the command line, never from a request; the
upload is read into memory up to ``max_upload`` bytes (413 beyond, before decoding) and nothing from a
request is written to the file system; the content is sniffed from its bytes (PNG, JPEG or DICOM
signature), never trusted from the file name or the declared type (415 otherwise, and for a signature on
bytes that do not decode); with a ``token``, every endpoint but ``/health`` needs ``Authorization: Bearer
TOKEN`` (401 otherwise). Inference runs in a worker thread, one image at a time under a lock (Grad-CAM
hooks the model), so the event loop keeps answering health checks and queued uploads meanwhile.
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import io
import threading
from email.parser import BytesParser
from email.policy import HTTP
from importlib import resources
from typing import Any

import numpy as np
from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import HTMLResponse, Response

from lungscreen.audit.screening import DISCLAIMER, screen_image
from lungscreen.errors import LungscreenError
from lungscreen.inference.predict import Predictor
from lungscreen.io.images import read_image

#: Default upload limit: a 16-bit 3000 x 3000 DICOM is 18 MB.
MAX_UPLOAD = 32 * 1024 * 1024
#: What the page may load: its own files, and the PNGs the API returns as data URLs.
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; connect-src 'self'; "
       "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
STATIC = {"index.html": "text/html; charset=utf-8", "viewer.js": "text/javascript; charset=utf-8",
          "viewer.css": "text/css; charset=utf-8"}


def sniff(data: bytes) -> str | None:
    """The image format the bytes themselves announce: ``png``, ``jpeg``, ``dicom`` or None."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if data.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if len(data) > 132 and data[128:132] == b"DICM":
        return "dicom"
    return None


def create_app(predictor: Predictor, *, token: str | None = None, max_upload: int = MAX_UPLOAD,
               segmenter: Any = None) -> FastAPI:
    """The viewer application around one loaded run (see the module docstring)."""
    from lungscreen.audit.explain import lung_segmenter

    segmenter = segmenter or lung_segmenter(predictor)
    lock = threading.Lock()
    about = {**model_summary(predictor), "lungs": getattr(segmenter, "method", None)}
    app = FastAPI(title="lungscreen viewer", version=about["lungscreen"], description=DISCLAIMER,
                  docs_url="/docs", redoc_url=None)

    def authorise(request: Request) -> None:
        if token is None:
            return
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
            raise HTTPException(401, "missing or wrong token: send Authorization: Bearer <token>",
                                headers={"WWW-Authenticate": "Bearer"})

    @app.middleware("http")
    async def headers(request: Request, call_next):  # type: ignore[no-untyped-def]
        response = await call_next(request)
        response.headers.update({"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff",
                                 "Referrer-Policy": "no-referrer", "Cache-Control": "no-store"})
        return response

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def page() -> Response:
        return static_file("index.html")

    @app.get("/static/{name}", include_in_schema=False)
    def static(name: str) -> Response:
        if name not in STATIC:  # a fixed list: no path is ever built from the request
            raise HTTPException(404, "not found")
        return static_file(name)

    @app.get("/health")
    def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/model")
    def model(request: Request) -> dict[str, Any]:
        authorise(request)
        return about

    @app.post("/predict", openapi_extra={"requestBody": {"required": True, "content": {"multipart/form-data": {
        "schema": {"type": "object", "required": ["file"],
                   "properties": {"file": {"type": "string", "format": "binary",
                                           "description": "a PNG, JPEG or DICOM chest image"}}}}}}})
    async def predict(request: Request) -> dict[str, Any]:
        """Screen one image: probabilities against the operating point, Grad-CAM and lung overlay."""
        authorise(request)
        data = form_file(await read_limited(request, max_upload), request.headers.get("content-type", ""))
        kind = sniff(data)
        if kind is None:
            raise HTTPException(415, "not a PNG, JPEG or DICOM image (judged by its bytes, not its name)")
        return await asyncio.to_thread(screen_bytes, data, kind)

    def screen_bytes(data: bytes, kind: str) -> dict[str, Any]:
        try:
            image = read_image(data, name=f"upload.{kind}")
        except LungscreenError as error:
            raise HTTPException(415, f"the {kind.upper()} signature is there but the image does not decode: "
                                     f"{getattr(error, 'reason', None) or error}") from None
        try:
            with lock:
                result = screen_image(predictor, image, segmenter=segmenter)
        except LungscreenError as error:
            raise HTTPException(422, str(error)) from None
        return {**result.as_dict(), "model": about["name"],
                "pictures": {"original": png_url(gray(image.pixels)), "overlay": png_url(result.picture(image.pixels))}}

    return app


async def read_limited(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 as soon as it passes ``limit`` (or announces that it will)."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise HTTPException(413, f"upload larger than {limit // (1024 * 1024)} MB")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise HTTPException(413, f"upload larger than {limit // (1024 * 1024)} MB")
    return bytes(body)


def form_file(body: bytes, content_type: str, field: str = "file") -> bytes:
    """The bytes of ``field`` in a multipart/form-data body, parsed in memory (nothing spooled to disk)."""
    if not content_type.lower().startswith("multipart/form-data"):
        raise HTTPException(415, "send the image as multipart/form-data in field 'file'")
    message = BytesParser(policy=HTTP).parsebytes(b"Content-Type: " + content_type.encode("latin-1") + b"\r\n\r\n" + body)
    for part in message.iter_parts():
        if part.get_param("name", header="content-disposition") == field:
            return part.get_payload(decode=True) or b""
    raise HTTPException(422, f"no form field '{field}' with the image")


def model_summary(predictor: Predictor) -> dict[str, Any]:
    """What the page and ``GET /model`` say about the run: nothing a request can change."""
    from importlib.metadata import version

    meta, spec = predictor.checkpoint.meta, predictor.spec
    extra = meta.get("extra", {}) or {}
    best = extra.get("best") or {}
    return {"name": meta.get("name"), "run": extra.get("run"), "task": spec.task, "modality": spec.modality,
            "classes": predictor.class_names, "heads": [h.model_dump() for h in spec.heads],
            "input": {"size": spec.input.size, "channels": spec.input.channels, "pipeline": spec.input.pipeline["name"]},
            "operating_point": spec.operating_point.model_dump(mode="json") if spec.operating_point else None,
            "training": {"patients": len(extra.get("train_patients") or []), "best_epoch": best.get("epoch"),
                         "monitor": best.get("metric"), "validation": best.get("value")},
            "test": json_safe(predictor.test_report),
            "lungscreen": version("lungscreen"), "disclaimer": DISCLAIMER}


def json_safe(value: Any) -> Any:
    """``value`` with every NaN or infinite number replaced by None (JSON has no NaN; an undefined figure,
    such as an AUC on a one-class split, is stored as NaN)."""
    if isinstance(value, dict):
        return {key: json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(item) for item in value]
    if isinstance(value, float) and not np.isfinite(value):
        return None
    return value


def static_file(name: str) -> Response:
    return Response(resources.files("lungscreen.serve").joinpath("static", name).read_bytes(), media_type=STATIC[name])


def gray(pixels: np.ndarray) -> np.ndarray:
    return np.clip(pixels * 255.0, 0, 255).astype(np.uint8)


def png_url(picture: np.ndarray) -> str:
    """A data URL of an RGB or gray uint8 picture."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(picture).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")
