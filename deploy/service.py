"""``fedscan serve``: the HTTP inference service and its upload page.

``POST /predict`` takes one image or DICOM as multipart field ``file`` and
answers ``{label, probabilities, model}`` (plus a Grad-CAM overlay as a PNG
data URL with ``?explain=true``). Bad uploads are the client's problem, not the
server's: an empty, oversized, non-image or undecodable DICOM upload gets a 4xx
with a message saying why, and the service keeps serving.

Uploaded pixels and file names are never logged or stored.
"""

from __future__ import annotations

import base64
import logging
import threading
from importlib.resources import files
from typing import Any

from fastapi import FastAPI, HTTPException, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse
from starlette.concurrency import run_in_threadpool

from fedscan.common.core.errors import UnreadableImageError
from fedscan.deploy.package import ModelPackage

log = logging.getLogger("fedscan.serve")

DEFAULT_MAX_UPLOAD = 20 * 1024 * 1024
_CHUNK = 1 << 20


def create_app(package: ModelPackage, *, max_upload_bytes: int = DEFAULT_MAX_UPLOAD) -> FastAPI:
    app = FastAPI(title="fedscan inference", version=str(package.spec["provenance"]["run"]))
    page = files("deploy").joinpath("static/index.html").read_text()
    explain_lock = threading.Lock()  # Grad-CAM hooks the shared module; one at a time
    model_info = {
        "name": package.name,
        "classes": package.classes,
        "runtime": package.runtime,
        "provenance": package.spec["provenance"],
    }

    @app.exception_handler(RequestValidationError)
    async def bad_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        """One sentence a person can act on instead of FastAPI's validation dump."""
        fields = sorted({str(e.get("loc", ["", "?"])[-1]) for e in exc.errors()})
        if "file" in fields:
            detail = "no file uploaded: send it as multipart/form-data in the field 'file'"
        else:
            detail = f"bad request: check {', '.join(fields)} (see /docs)"
        return JSONResponse({"detail": detail}, status_code=422)

    @app.get("/", response_class=HTMLResponse)
    def index() -> str:
        return page

    @app.get("/healthz")
    def healthz() -> dict[str, Any]:
        return {"status": "ok", "model": package.name}

    @app.get("/model")
    def model() -> dict[str, Any]:
        return model_info

    @app.post("/predict")
    async def predict(request: Request, file: UploadFile, explain: bool = False) -> JSONResponse:
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > max_upload_bytes + _CHUNK:
            raise HTTPException(413, f"upload larger than the limit of {max_upload_bytes} bytes")
        data = bytearray()
        while chunk := await file.read(_CHUNK):
            data += chunk
            if len(data) > max_upload_bytes:
                raise HTTPException(
                    413, f"upload larger than the limit of {max_upload_bytes} bytes"
                )
        if not data:
            raise HTTPException(400, "empty upload: choose a JPEG, PNG or DICOM file")
        name = file.filename or "upload"
        try:  # inference is CPU-bound: off the event loop
            body = await run_in_threadpool(_classify, bytes(data), name, explain)
        except UnreadableImageError as exc:
            raise HTTPException(415, f"cannot read the upload: {exc.reason}") from None
        return JSONResponse(body)

    def _classify(data: bytes, name: str, explain: bool) -> dict[str, Any]:
        image = package.load_bytes(data, name)
        pred = package.predict(image[None])[0]
        body: dict[str, Any] = {**pred.as_dict(), "model": package.name}
        if explain:
            from fedscan.deploy.explain import gradcam, overlay_png

            with explain_lock:
                heat = gradcam(package, image, package.classes.index(pred.label))
            # no caption band: this PNG travels in the same JSON as its label and
            # probabilities, and the page draws them (a PNG file on disk gets the band)
            png = base64.b64encode(overlay_png(image, heat)).decode()
            body["explanation"] = f"data:image/png;base64,{png}"
        return body

    return app


def serve(
    package: ModelPackage,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    max_upload_bytes: int = DEFAULT_MAX_UPLOAD,
) -> None:
    import uvicorn

    log.info("serving %s on http://%s:%d", package.name, host, port)
    uvicorn.run(
        create_app(package, max_upload_bytes=max_upload_bytes),
        host=host,
        port=port,
        log_level="warning",
    )
