"""The model explorer's HTTP app: a web page and JSON API over the runs in MLflow.

Draw a digit and watch the class probabilities, see why the model decided (saliency, Grad-CAM, conv
activations), put two runs or an ensemble side by side, browse the test set through the run's confusion
matrix, and read its training curves.

Layers, top to bottom: the command (``python -m experiments.serve``), this module (HTTP: reading and checking
bodies against ``schemas``, the one table mapping errors to status codes, security headers, the Host check),
``explorer.ModelExplorer`` (the domain: runs, models, test set, answers) and below it ``store`` (every MLflow
query), ``explain`` and ``preprocess``. See docs/explorer.md.
"""

from __future__ import annotations

import base64
import hashlib
import re
import time
from pathlib import Path
from typing import Annotated

import numpy as np
from fastapi import APIRouter, Depends, FastAPI, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ValidationError
from starlette.responses import PlainTextResponse

from .explorer import (
    ENSEMBLE,
    InvalidRequestError,
    ModelExplorer,
    UnavailableError,
    UnknownRunError,
    quantized,
)
from .redaction import redact
from .schemas import (
    MAX_DRAWING_SIDE,
    MAX_EXAMPLES,
    ActivationsRequest,
    ActivationsResponse,
    ConfusionResponse,
    ErrorResponse,
    ExamplesResponse,
    HealthResponse,
    PredictRequest,
    PredictResponse,
    PreprocessRequest,
    PreprocessResponse,
    RunDetails,
    RunsResponse,
    SaliencyRequest,
    SaliencyResponse,
    Sort,
)

STATIC_DIR = Path(__file__).resolve().parent / "static"
LOCAL_HOSTS = ("127.0.0.1", "localhost")  # Host headers always accepted (see trusted_hosts)
MAX_BODY_BYTES = 2_000_000  # a 560x560 drawing with 3 decimals fits; anything bigger is a mistake or abuse

# The page loads only its own script and style sheet; no inline script or style, no plug-ins, no framing.
PAGE_CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
            "object-src 'none'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
SWAGGER_CDN = "https://cdn.jsdelivr.net"  # where FastAPI's /api/docs page loads Swagger UI from


# -- HTTP errors, and the one table mapping every error to its status code ----------------------------------


class MalformedBodyError(Exception):
    """A request body that is not a JSON object (HTTP 400)."""


class BodyTooLargeError(Exception):
    """A request body over MAX_BODY_BYTES (HTTP 413)."""


class UnsupportedMediaTypeError(Exception):
    """A POST whose Content-Type is not application/json (HTTP 415)."""


ERROR_STATUS = {UnknownRunError: 404, UnavailableError: 503, InvalidRequestError: 422, MalformedBodyError: 400,
                BodyTooLargeError: 413, UnsupportedMediaTypeError: 415}


# -- HTTP: reading bodies, describing validation errors, security headers --------------------------------------

_JSON_TYPES = {dict: "object", list: "array", str: "string", int: "number", float: "number", bool: "boolean",
               type(None): "null"}


def _require_json(request: Request) -> None:
    """Only ``application/json`` bodies: a web page can send text/plain or a form to any address without a
    CORS preflight, but not JSON, so this keeps other sites' pages from making the explorer compute."""
    media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media_type != "application/json":
        raise UnsupportedMediaTypeError(
            f"request body must be sent with Content-Type: application/json, got {media_type or 'none'!r}.")


async def _read_body(request: Request) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise BodyTooLargeError(f"request body of {declared} bytes is larger than the limit of {MAX_BODY_BYTES} "
                                f"bytes; send a 28x28 'image' or a drawing of at most "
                                f"{MAX_DRAWING_SIDE}x{MAX_DRAWING_SIDE} pixels.")
    body = bytearray()
    async for chunk in request.stream():
        body.extend(chunk)
        if len(body) > MAX_BODY_BYTES:  # a chunked body without Content-Length
            raise BodyTooLargeError(f"request body is larger than the limit of {MAX_BODY_BYTES} bytes.")
    return bytes(body)


def json_body(model: type[BaseModel]):
    """A dependency: the request body (Content-Type: application/json only) parsed and validated as ``model``.

    Parsed by pydantic's own JSON parser, which bounds nesting depth and number size, so no body reaches
    Python's ``json`` module; problems become MalformedBodyError, BodyTooLargeError or RequestValidationError.
    """

    async def parse(request: Request):
        _require_json(request)
        body = await _read_body(request)
        try:
            return model.model_validate_json(body)
        except ValidationError as error:
            problems = error.errors(include_url=False)
            invalid = next((p for p in problems if p["type"] == "json_invalid"), None)
            if invalid is not None:
                reason = invalid.get("ctx", {}).get("error", invalid["msg"])
                raise MalformedBodyError(
                    f"request body is not valid JSON ({reason}); send e.g. "
                    '{"image": [[0.0, ...], ...]} with Content-Type: application/json.') from None
            if len(problems) == 1 and problems[0]["type"] == "model_type" and not problems[0]["loc"]:
                kind = _JSON_TYPES.get(type(problems[0]["input"]), type(problems[0]["input"]).__name__)
                raise MalformedBodyError(f"request body must be a JSON object, got a JSON {kind}.") from None
            raise RequestValidationError([{**p, "loc": ("body", *p["loc"])} for p in problems]) from None

    parse.__name__ = f"read_{model.__name__}"
    return parse


def request_body_schema(model: type[BaseModel]) -> dict:
    """OpenAPI ``requestBody`` of a route whose body the ``json_body`` dependency reads."""
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": model.model_json_schema()}}}}


def _where(location: tuple) -> str:
    """``('body', 'image', 5, 0)`` -> "'image' row 5, column 0"; ``('query', 'label')`` -> "query parameter 'label'"."""
    source, *path = location
    names = [part for part in path if isinstance(part, str)]
    indices = [part for part in path if isinstance(part, int)]
    if source in ("query", "path"):
        return f"{source} parameter {names[0]!r}" if names else f"{source} parameter"
    if not names:
        return "request body"
    where = f"'{'.'.join(names)}'"
    if names[0] in ("image", "drawing") and indices:
        where += f" row {indices[0]}" + (f", column {indices[1]}" if len(indices) > 1 else "")
    elif indices:
        where += "".join(f"[{index}]" for index in indices)
    return where


def _describe(problem: dict) -> str:
    if problem["type"] == "value_error":  # raised by the request models' own checks, which name the field
        return problem["msg"].removeprefix("Value error, ")
    message = problem["msg"]
    if problem["type"].endswith(("_type", "_parsing")) or problem["type"] in ("literal_error", "enum"):
        shown = repr(problem.get("input"))
        message += f", got {shown if len(shown) <= 40 else shown[:37] + '...'}"
    return f"{_where(tuple(problem['loc']))}: {message}"


def describe_validation_errors(problems: list[dict], shown: int = 3) -> str:
    """One readable sentence for pydantic errors: the first ``shown`` problems and how many more there are."""
    text = "; ".join(_describe(problem) for problem in problems[:shown])
    return text + (f" (and {len(problems) - shown} more problems)" if len(problems) > shown else "")


def _status_handler(status: int):
    async def handle(request: Request, error: Exception) -> JSONResponse:
        return JSONResponse({"detail": redact(str(error))}, status_code=status)  # no password in any answer

    return handle


async def _validation_handler(request: Request, error: RequestValidationError) -> JSONResponse:
    problems = list(error.errors())
    return JSONResponse(status_code=422, content={
        "detail": describe_validation_errors(problems),
        "errors": [{"loc": list(p["loc"]), "type": p["type"], "msg": p["msg"]} for p in problems[:20]],
    })


class SecurityHeaders:
    """ASGI middleware: a Content-Security-Policy (unless the response set its own) and nosniff on every answer."""

    def __init__(self, app, policy: str = PAGE_CSP):
        self.app = app
        self.headers = [(b"content-security-policy", policy.encode()), (b"x-content-type-options", b"nosniff"),
                        (b"referrer-policy", b"no-referrer")]

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                present = {name.lower() for name, _ in message.get("headers", [])}
                extra = [(name, value) for name, value in self.headers if name not in present]
                message = {**message, "headers": [*message.get("headers", []), *extra]}
            await send(message)

        await self.app(scope, receive, send_with_headers)


def host_name(header: str) -> str:
    """The host of a Host header, without port or IPv6 brackets: ``[::1]:8000`` -> ``::1``, ``a.b:80`` -> ``a.b``."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[1:header.find("]")] if "]" in header else header
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


class HostCheck:
    """ASGI middleware: answer only requests whose Host is allowed (HTTP 400 otherwise), IPv6 literals included.

    Starlette's TrustedHostMiddleware splits ``[::1]:8000`` at its first colon and so refuses every IPv6 request.
    """

    def __init__(self, app, allowed_hosts: list[str] | tuple[str, ...]):
        self.app = app
        self.allowed = {host_name(f"[{host}]" if ":" in host and not host.startswith("[") else host)
                        for host in allowed_hosts}

    def allows(self, header: str) -> bool:
        name = host_name(header)
        return "*" in self.allowed or name in self.allowed or any(
            pattern.startswith("*.") and name.endswith(pattern[1:]) for pattern in self.allowed)

    async def __call__(self, scope, receive, send):
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        header = next((value.decode("latin-1") for name, value in scope["headers"] if name == b"host"), "")
        if not self.allows(header):
            return await PlainTextResponse("Invalid host header", status_code=400)(scope, receive, send)
        await self.app(scope, receive, send)


def trusted_hosts(host: str, extra: list[str] | tuple[str, ...] = ()) -> list[str]:
    """Host headers the server answers: 127.0.0.1, localhost, the interface it listens on, and ``extra``.

    Anything else is refused (HTTP 400), so a web page on another name that resolves to this machine
    (DNS rebinding) cannot read the API.
    """
    return list(dict.fromkeys([*LOCAL_HOSTS, host, *extra]))


def _docs_page(openapi_url: str, title: str) -> HTMLResponse:
    """FastAPI's Swagger UI page, with a CSP that admits its CDN and exactly its own inline script."""
    page = get_swagger_ui_html(openapi_url=openapi_url, title=title)
    body = page.body.decode()
    hashes = " ".join(
        "'sha256-" + base64.b64encode(hashlib.sha256(script.encode()).digest()).decode() + "'"
        for script in re.findall(r"<script>(.*?)</script>", body, flags=re.DOTALL)
    )
    policy = (f"default-src 'self'; script-src 'self' {SWAGGER_CDN} {hashes}; "
              f"style-src 'self' {SWAGGER_CDN} 'unsafe-inline'; img-src 'self' data: https:; connect-src 'self'; "
              "object-src 'none'; base-uri 'none'; frame-ancestors 'none'")
    return HTMLResponse(body, headers={"Content-Security-Policy": policy})


def _rounded(image: np.ndarray) -> list:
    return np.round(image.astype(np.float64), 4).tolist()


def _error_responses(*statuses: int) -> dict:
    """OpenAPI ``responses`` for the error statuses a route can answer (all with an ErrorResponse body)."""
    return {status: {"model": ErrorResponse} for status in statuses}


RUN_ERRORS = _error_responses(404, 422, 503)  # GET routes of one run
BODY_ERRORS = _error_responses(400, 404, 413, 415, 422, 503)  # POST routes


def api_routes(explorer: ModelExplorer) -> APIRouter:
    """The JSON API under ``/api``: each route validates its input (``schemas``), asks ``explorer``, and answers."""
    router = APIRouter()

    @router.get("/api/health", response_model=HealthResponse)
    def health():
        """Which runs are offered and which models are loaded."""
        return {
            "status": "ok",
            "default_run_id": explorer.default_run_id,
            "models": [{"run_id": run.run_id, "label": run.label, "loaded": explorer.is_loaded(run.run_id)}
                       for run in explorer.runs.values()],
            "test_images_loaded": explorer.test_images_loaded,
        }

    @router.get("/api/runs", response_model=RunsResponse)
    def runs():
        """The offered runs, default first, with their MLflow UI links."""
        return {"default_run_id": explorer.default_run_id, "ensemble": ENSEMBLE if len(explorer.runs) > 1 else None,
                "runs": [explorer.summary(run) for run in explorer.runs.values()]}

    @router.get("/api/runs/{run_id}", response_model=RunDetails, responses=RUN_ERRORS)
    def run_details(run_id: str):
        """Key metrics and config, per-epoch curves and the MLflow UI link of one run."""
        return explorer.run_details(run_id)

    @router.get("/api/runs/{run_id}/confusion", response_model=ConfusionResponse, responses=RUN_ERRORS)
    def confusion(run_id: str):
        """The run's confusion matrix on the MNIST test set, from its logged test predictions."""
        return explorer.confusion(run_id)

    @router.get("/api/runs/{run_id}/examples", response_model=ExamplesResponse, responses=RUN_ERRORS)
    def examples(run_id: str,
                 label: Annotated[int | None, Query(ge=0, le=9, description="true label (row of the matrix)")] = None,
                 predicted: Annotated[int | None, Query(ge=0, le=9, description="predicted class (column)")] = None,
                 sort: Annotated[Sort, Query(description="confidence: most confident first; true_probability: "
                                                         "least probability on the true label first")] = "confidence",
                 limit: Annotated[int, Query(ge=1, le=MAX_EXAMPLES)] = 24,
                 offset: Annotated[int, Query(ge=0, le=10_000)] = 0):
        """Test images of one confusion-matrix cell (or a row or column) with the run's probabilities."""
        return explorer.examples(run_id, label, predicted, sort, limit, offset)

    @router.post("/api/predict", response_model=PredictResponse, response_model_exclude_none=True,
              responses=BODY_ERRORS, openapi_extra=request_body_schema(PredictRequest))
    def predict(body: Annotated[PredictRequest, Depends(json_body(PredictRequest))], response: Response):
        """Predicted class and ten probabilities of one run (or the ``ensemble``) for an image or drawing."""
        start = time.perf_counter()
        image = body.model_image()
        probabilities, members = explorer.probabilities(image, body.run_id)
        response.headers["Server-Timing"] = f"model;dur={(time.perf_counter() - start) * 1000:.2f}"
        return {
            "run_id": body.run_id or explorer.default_run_id,
            "predicted_class": int(np.argmax(probabilities)),
            "probabilities": [float(p) for p in probabilities],
            "members": members if body.run_id == ENSEMBLE else None,
            "image": _rounded(image) if body.preprocessed else None,
        }

    @router.post("/api/preprocess", response_model=PreprocessResponse, responses=BODY_ERRORS,
              openapi_extra=request_body_schema(PreprocessRequest))
    def preprocess(body: Annotated[PreprocessRequest, Depends(json_body(PreprocessRequest))]):
        """The 28x28 image the model sees for a drawing (bounding box 20x20, centre of mass centred)."""
        return {"image": _rounded(body.model_image())}

    @router.post("/api/saliency", response_model=SaliencyResponse, responses=BODY_ERRORS,
              openapi_extra=request_body_schema(SaliencyRequest))
    def saliency(body: Annotated[SaliencyRequest, Depends(json_body(SaliencyRequest))]):
        """Gradient saliency and Grad-CAM (28x28, 0-255) for the predicted (or ``target_class``) class."""
        image = body.model_image()
        run_id, result = explorer.explain(image, body.run_id, body.target_class)
        return {
            "run_id": run_id,
            "predicted_class": result.predicted_class,
            "target_class": result.target_class,
            "probabilities": [float(p) for p in result.probabilities],
            "image": quantized(image),
            "saliency": quantized(result.saliency),
            "gradcam": quantized(result.gradcam),
            "gradcam_layer": result.gradcam_layer,
        }

    @router.post("/api/activations", response_model=ActivationsResponse, responses=BODY_ERRORS,
              openapi_extra=request_body_schema(ActivationsRequest))
    def activations(body: Annotated[ActivationsRequest, Depends(json_body(ActivationsRequest))]):
        """Each conv layer's feature maps: the ``max_channels`` most active, each scaled to 0-255."""
        return explorer.activations(body.model_image(), body.run_id, body.max_channels)

    return router


def create_app(explorer: ModelExplorer, allowed_hosts: list[str] | tuple[str, ...] = LOCAL_HOSTS) -> FastAPI:
    """The FastAPI app: the page at ``/``, its files under ``/static``, the JSON API under ``/api``.

    ``allowed_hosts``: the Host headers answered (see ``trusted_hosts``); others get HTTP 400.
    """
    app = FastAPI(title="MNIST model explorer", docs_url=None, redoc_url=None, openapi_url="/api/openapi.json",
                  description="JSON API of the MNIST model explorer; see docs/explorer.md.")
    app.state.explorer = explorer
    for error_type, status in ERROR_STATUS.items():
        app.add_exception_handler(error_type, _status_handler(status))
    app.add_exception_handler(RequestValidationError, _validation_handler)
    # Added last, so outermost: a wrong Host is refused first, and every answer carries the headers.
    app.add_middleware(HostCheck, allowed_hosts=list(allowed_hosts))
    app.add_middleware(SecurityHeaders)
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

    @app.get("/", include_in_schema=False)
    def index() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", headers={"Cache-Control": "no-cache"})

    @app.get("/api/docs", include_in_schema=False)
    def docs() -> HTMLResponse:
        return _docs_page(app.openapi_url, f"{app.title} - API")

    app.include_router(api_routes(explorer))
    return app


def run_server(explorer: ModelExplorer, host: str = "127.0.0.1", port: int = 8000,
               allowed_hosts: list[str] | tuple[str, ...] = (), log_level: str = "info") -> None:
    """Serve ``create_app(explorer)`` with uvicorn until interrupted; ``allowed_hosts`` extend ``trusted_hosts``."""
    import uvicorn

    app = create_app(explorer, allowed_hosts=trusted_hosts(host, allowed_hosts))
    uvicorn.run(app, host=host, port=port, log_level=log_level)


if __name__ == "__main__":  # the command moved to the command layer; the library never runs it
    import sys

    sys.exit("error: the explorer's command is `python -m experiments.serve` (same flags); "
             "`python -m mnist_ablation.serve` no longer runs it.")
