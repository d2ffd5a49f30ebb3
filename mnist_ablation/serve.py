"""The model explorer: a web page and JSON API over the runs in MLflow.

Draw a digit and watch the class probabilities, see why the model decided (saliency, Grad-CAM, conv
activations), put two runs or an ensemble side by side, browse the test set through the run's confusion
matrix, and read its training curves. The server offers one or more runs, or the runs of an ablation study
(the best seed of each arm by final validation accuracy, or every finished run).

Layers, top to bottom: the command (``experiments/serve.py``; ``python -m mnist_ablation.serve`` runs it),
``create_app`` (HTTP: request and response models, the one table mapping errors to status codes, security
headers, the Host check), ``ModelExplorer`` (the domain: runs, models, test set, answers) and below it
``store`` (every MLflow query), ``explain`` and ``preprocess``. See docs/explorer.md.
"""

from __future__ import annotations

import base64
import hashlib
import re
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import quote

import numpy as np
from fastapi import Depends, FastAPI, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, Strict, ValidationError, WithJsonSchema, model_validator
from starlette.middleware.trustedhost import TrustedHostMiddleware

from . import naming, store
from .errors import UserError
from .preprocess import FIELD_SIZE, mnist_preprocess

STATIC_DIR = Path(__file__).resolve().parent / "static"
LOCAL_HOSTS = ("127.0.0.1", "localhost")  # Host headers always accepted (see trusted_hosts)
MAX_BODY_BYTES = 2_000_000  # a 560x560 drawing with 3 decimals fits; anything bigger is a mistake or abuse
MAX_DRAWING_SIDE = 560  # twice the page's canvas; larger drawings should be downscaled by the client
MAX_EXAMPLES = 200  # test images per page of the browser
MAX_ACTIVATION_CHANNELS = 64
MAX_RUN_ID_LENGTH = 64  # MLflow run ids are 32 hex digits
ENSEMBLE = "ensemble"  # run_id meaning: average the probabilities of every offered run
KEY_METRICS = ("test_accuracy", "test_loss", "val_accuracy", "val_loss", "train_seconds", "train_images_per_second")
KEY_PARAMS = ("epochs", "train_subset", "validation", "augmentation", "batch_norm", "dropout", "architecture",
              "optimizer", "learning_rate", "lr_schedule", "seed")
Sort = Literal["confidence", "true_probability", "index"]  # orders of the test-set browser

# The page loads only its own script and style sheet; no inline script or style, no plug-ins, no framing.
PAGE_CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
            "object-src 'none'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
SWAGGER_CDN = "https://cdn.jsdelivr.net"  # where FastAPI's /api/docs page loads Swagger UI from


# -- domain errors: raised by the explorer, mapped to HTTP status codes in one place (create_app) -------------


class ExplorerError(UserError):
    """The explorer cannot do what was asked (the base of the errors below; at start-up, an unknown study)."""


class UnknownRunError(ExplorerError, LookupError):
    """A run id that this server does not offer (HTTP 404)."""


class UnavailableError(ExplorerError):
    """Something a run needs cannot be loaded: its model, its logged predictions, the MNIST test set (503)."""


class InvalidRequestError(ExplorerError, ValueError):
    """A well-formed request that asks for something impossible, e.g. explaining the ensemble (422)."""


class MalformedBodyError(Exception):
    """A request body that is not a JSON object (HTTP 400)."""


class BodyTooLargeError(Exception):
    """A request body over MAX_BODY_BYTES (HTTP 413)."""


ERROR_STATUS = {UnknownRunError: 404, UnavailableError: 503, InvalidRequestError: 422, MalformedBodyError: 400,
                BodyTooLargeError: 413}


# -- the runs on offer -----------------------------------------------------------------------------------------


@dataclass
class OfferedRun:
    """One MLflow run the explorer offers, with what the page shows about it."""

    run_id: str
    label: str  # arm name in a study, else the run name
    run_name: str
    experiment_id: str
    arm: str | None
    seed: str | None
    val_accuracy: float | None
    test_accuracy: float | None


def _finite_or_none(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if np.isfinite(number) else None


def _text_or_none(value: Any) -> str | None:
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return None
    return str(value)


def study_runs_to_offer(study: str, best_per_arm: bool = True) -> list[OfferedRun]:
    """The study's finished cell runs: the best seed per arm (by final val_accuracy) or all of them.

    Cells of the study's current definition (``store.cell_runs``); the baseline arm first, then the
    study's arm order. Needs the tracking URI to be set.
    """
    experiment = store.experiment_id(naming.ablation_experiment(study))
    if experiment is None:
        raise ExplorerError(
            f"no study {study!r}: the tracking store has no experiment {naming.ablation_experiment(study)!r}. "
            f"Studies found there: {', '.join(store.ablation_studies()) or 'none'}. Run the study first or pass "
            "--tracking-uri."
        )
    frame = store.cell_runs(study)
    if frame.empty:
        raise ExplorerError(f"study {study!r} has no FINISHED runs yet in {store.redacted_tracking_uri()}.")
    arm_order = {arm: (arm != "baseline", position) for position, arm in enumerate(dict.fromkeys(frame["arm"]))}
    for column in ("val_accuracy", "test_accuracy"):
        if column not in frame:
            frame[column] = np.nan
    # Best validation accuracy first (a run without one last); ties go to the earlier run, so the choice is stable.
    frame = frame.assign(_arm=frame["arm"].map(arm_order), _val=frame["val_accuracy"].astype(float).fillna(-1.0))
    frame = frame.sort_values(["_arm", "_val", "start_time"], ascending=[True, False, True], kind="stable")
    if best_per_arm:
        frame = frame.drop_duplicates("arm", keep="first")
    return [
        OfferedRun(
            run_id=row.run_id,
            label=row.arm if best_per_arm else f"{row.arm} (seed {row.seed})",
            run_name=_text_or_none(row.run_name) or row.run_id,
            experiment_id=str(experiment),
            arm=row.arm,
            seed=str(row.seed),
            val_accuracy=_finite_or_none(row.val_accuracy),
            test_accuracy=_finite_or_none(row.test_accuracy),
        )
        for row in frame.itertuples()
    ]


def runs_by_id(run_ids: list[str]) -> list[OfferedRun]:
    """The given runs, each checked to exist in the tracking store; labelled by arm, else by run name."""
    offered = []
    for run_id in run_ids:
        try:
            record = store.run_record(run_id)
        except LookupError as error:
            raise UnknownRunError(str(error)) from None
        arm = record.tags.get(naming.ARM_TAG)
        offered.append(OfferedRun(
            run_id=run_id,
            label=arm or record.run_name,
            run_name=record.run_name,
            experiment_id=record.experiment_id,
            arm=arm,
            seed=record.tags.get(naming.SEED_TAG),
            val_accuracy=_finite_or_none(record.metrics.get("val_accuracy")),
            test_accuracy=_finite_or_none(record.metrics.get("test_accuracy")),
        ))
    labels = [run.label for run in offered]
    for run in offered:
        if labels.count(run.label) > 1:  # two runs of one arm: tell them apart
            run.label = f"{run.label} ({run.run_id[:8]})"
    return offered


# -- the domain: runs, their models and data, and what the API answers -----------------------------------------


class ModelExplorer:
    """The runs on offer and everything loaded for them (models, explainers, test predictions, test images).

    Raises the domain errors above; knows nothing of HTTP.
    """

    def __init__(self, runs: list[OfferedRun], data_dir: str | None = None,
                 mlflow_ui_url: str = naming.DEFAULT_MLFLOW_UI_URL):
        if not runs:
            raise ExplorerError("no runs to serve; pass --run-id ID or --study NAME.")
        self.runs = {run.run_id: run for run in runs}
        self.default_run_id = runs[0].run_id
        self.data_dir = data_dir
        self.mlflow_ui_url = mlflow_ui_url.rstrip("/")
        self._models: dict[str, Any] = {}
        self._explainers: dict[str, Any] = {}
        self._predictions: dict[str, Any] = {}
        self._details: dict[str, dict] = {}
        self._test_images: np.ndarray | None = None
        self._test_labels: np.ndarray | None = None
        self._lock = threading.Lock()  # one loader at a time; loads are rare, requests read the caches

    def run(self, run_id: str | None) -> OfferedRun:
        """The offered run ``run_id`` (the default run when None)."""
        chosen = run_id or self.default_run_id
        if chosen not in self.runs:
            offered = ", ".join(f"{r.run_id} ({r.label})" for r in self.runs.values())
            raise UnknownRunError(f"run_id {chosen!r} is not offered by this server; offered: {offered}"
                                  f" or {ENSEMBLE!r}.")
        return self.runs[chosen]

    def members(self, run_id: str | None) -> list[str]:
        """The runs whose probabilities answer for ``run_id``: every offered run for ``ensemble``."""
        return list(self.runs) if run_id == ENSEMBLE else [self.run(run_id).run_id]

    def is_loaded(self, run_id: str) -> bool:
        return run_id in self._models

    @property
    def test_images_loaded(self) -> bool:
        return self._test_images is not None

    def model(self, run_id: str):
        """The run's Keras model, loaded on first use and warmed up (its predict function traced)."""
        if run_id not in self._models:
            with self._lock:
                if run_id not in self._models:
                    try:
                        model = store.load_model(run_id)
                    except Exception as error:  # MLflow raises several types for a missing or broken model
                        raise UnavailableError(
                            f"cannot load the model of run {run_id}: {type(error).__name__}: {error}. "
                            "Was the run FINISHED with its model logged?"
                        ) from None
                    model.predict_on_batch(np.zeros((1, FIELD_SIZE, FIELD_SIZE, 1), np.float32))
                    self._models[run_id] = model
        return self._models[run_id]

    def explainer(self, run_id: str):
        """The run's Explainer (saliency, Grad-CAM, activations), built on first use."""
        if run_id not in self._explainers:
            model = self.model(run_id)
            with self._lock:
                if run_id not in self._explainers:
                    from .explain import Explainer

                    try:
                        self._explainers[run_id] = Explainer(model)
                    except ValueError as error:
                        raise UnavailableError(f"run {run_id}'s model cannot be explained: {error}") from None
        return self._explainers[run_id]

    def test_set(self) -> tuple[np.ndarray, np.ndarray]:
        """MNIST test images (10000, 28, 28) and labels, loaded once."""
        if self._test_images is None:
            with self._lock:
                if self._test_images is None:
                    from .data import DataError, load_mnist

                    try:
                        data = load_mnist(self.data_dir)
                    except DataError as error:
                        raise UnavailableError(f"MNIST test images unavailable: {error}") from None
                    # Keep only the test arrays; the 60,000 training images are freed.
                    self._test_labels = data.y_test
                    self._test_images = data.x_test[..., 0]
        return self._test_images, self._test_labels

    def predictions(self, run_id: str):
        """The run's logged test predictions (DataFrame: index, label, predicted, prob_0..prob_9)."""
        if run_id not in self._predictions:
            try:
                frame = store.read_predictions(run_id)
            except Exception as error:  # missing artifact, unreachable store
                raise UnavailableError(f"run {run_id} has no readable {naming.PREDICTIONS_ARTIFACT}: "
                                       f"{type(error).__name__}: {error}") from None
            self._predictions[run_id] = frame.sort_values("index").reset_index(drop=True)
        return self._predictions[run_id]

    def mlflow_url(self, run: OfferedRun) -> str:
        return f"{self.mlflow_ui_url}/#/experiments/{quote(run.experiment_id)}/runs/{quote(run.run_id)}"

    def summary(self, run: OfferedRun) -> dict:
        return {**asdict(run), "mlflow_url": self.mlflow_url(run)}

    def probabilities(self, image: np.ndarray, run_id: str | None) -> tuple[np.ndarray, list[str]]:
        """Probabilities for one 28x28 image from one run, or the mean over all runs for ``ensemble``.

        The models are called directly; nothing here goes through the Explainer.
        """
        members = self.members(run_id)  # an unknown run fails here, before any model work
        from .explain import as_batch

        batch = as_batch(image)
        total = sum(np.asarray(self.model(member).predict_on_batch(batch))[0].astype(np.float64)
                    for member in members)
        return total / len(members), members

    def explain(self, image: np.ndarray, run_id: str | None, target_class: int | None):
        """(run id, ``explain.Explanation``) of one run's decision on a 28x28 image."""
        run_id, explainer = self._single_model_explainer(run_id)
        try:
            return run_id, explainer.explain(image, target_class)
        except ValueError as error:  # a target class the model does not have
            raise InvalidRequestError(str(error)) from None

    def activations(self, image: np.ndarray, run_id: str | None):
        """(run id, predicted class, ``explain.Activations`` per conv layer) of one run on a 28x28 image."""
        run_id, explainer = self._single_model_explainer(run_id)
        return (run_id, *explainer.activations(image))

    def _single_model_explainer(self, run_id: str | None):
        if run_id == ENSEMBLE:
            raise InvalidRequestError("explanations are per model; pass one run's run_id, not 'ensemble'.")
        run = self.run(run_id)
        return run.run_id, self.explainer(run.run_id)

    def run_details(self, run_id: str | None) -> dict:
        """Key metrics and params, per-epoch curves and the MLflow UI link of one run."""
        run = self.run(run_id)
        if run.run_id not in self._details:
            try:
                record = store.run_record(run.run_id)
                history = store.metric_history(run.run_id)
            except LookupError as error:
                raise UnavailableError(str(error)) from None
            self._details[run.run_id] = {
                **self.summary(run),
                "status": record.status,
                "metrics": {key: _finite_or_none(record.metrics[key]) for key in KEY_METRICS if key in record.metrics},
                "params": {key: record.params[key] for key in KEY_PARAMS if key in record.params},
                "history": {
                    key: [{"epoch": int(epoch), "value": _finite_or_none(value)}
                          for epoch, value in zip(history["epoch"], history[key], strict=True) if not np.isnan(value)]
                    for key in store.HISTORY_METRICS
                },
            }
        return self._details[run.run_id]

    def confusion(self, run_id: str | None) -> dict:
        """The run's 10x10 confusion matrix on the test set (rows: true label), from its logged predictions."""
        run = self.run(run_id)
        frame = self.predictions(run.run_id)
        matrix = np.zeros((10, 10), dtype=np.int64)
        np.add.at(matrix, (frame["label"].to_numpy(), frame["predicted"].to_numpy()), 1)
        return {"run_id": run.run_id, "matrix": matrix.tolist(), "total": int(matrix.sum()),
                "accuracy": float(np.trace(matrix) / max(1, matrix.sum()))}

    def examples(self, run_id: str | None, label: int | None, predicted: int | None, sort: str,
                 limit: int, offset: int) -> dict:
        """Test images of one confusion-matrix cell (or row/column) with the run's probabilities."""
        run = self.run(run_id)
        frame = self.predictions(run.run_id)
        images, labels = self.test_set()
        if len(frame) != len(labels) or not np.array_equal(frame["label"].to_numpy(), labels[frame["index"]]):
            raise UnavailableError(
                f"run {run.run_id}'s logged test predictions do not match the MNIST test labels of "
                f"{self.data_dir or 'the default MNIST'}; point --data-dir at the MNIST the run was trained on."
            )
        probabilities = frame[[f"prob_{k}" for k in range(10)]].to_numpy()
        true_labels, predicted_classes = frame["label"].to_numpy(), frame["predicted"].to_numpy()
        rows = np.ones(len(frame), dtype=bool)
        if label is not None:
            rows &= true_labels == label
        if predicted is not None:
            rows &= predicted_classes == predicted
        chosen = np.flatnonzero(rows)
        confidence = probabilities[np.arange(len(frame)), predicted_classes]
        true_probability = probabilities[np.arange(len(frame)), true_labels]
        if sort == "confidence":  # most confident first: among mistakes, the hardest ones
            chosen = chosen[np.argsort(-confidence[chosen], kind="stable")]
        elif sort == "true_probability":  # least probability on the true class first
            chosen = chosen[np.argsort(true_probability[chosen], kind="stable")]
        return {
            "run_id": run.run_id, "label": label, "predicted": predicted, "sort": sort, "total": int(len(chosen)),
            "offset": offset,
            "examples": [
                {
                    "index": int(frame["index"].iat[row]),
                    "label": int(true_labels[row]),
                    "predicted": int(predicted_classes[row]),
                    "confidence": float(confidence[row]),
                    "true_probability": float(true_probability[row]),
                    "probabilities": [round(float(p), 6) for p in probabilities[row]],
                    # 0-255 integers: a third the size of floats in JSON, and exactly MNIST's pixels.
                    "image": np.rint(images[int(frame["index"].iat[row])] * 255).astype(int).tolist(),
                }
                for row in chosen[offset:offset + limit]
            ],
        }


def open_explorer(*, study: str | None = None, run_ids: list[str] | None = None, all_runs: bool = False,
                  tracking_uri: str | None = None, data_dir: str | None = None,
                  mlflow_ui_url: str = naming.DEFAULT_MLFLOW_UI_URL) -> ModelExplorer:
    """Resolve the tracking store and the runs to offer, and load the default model (failing now, not later)."""
    from .tracking import use_tracking_uri

    if (study is None) == (not run_ids):
        raise ExplorerError("pass either a study or one or more run ids.")
    use_tracking_uri(tracking_uri)
    runs = study_runs_to_offer(study, best_per_arm=not all_runs) if study else runs_by_id(run_ids)
    explorer = ModelExplorer(runs, data_dir=data_dir, mlflow_ui_url=mlflow_ui_url)
    explorer.model(explorer.default_run_id)
    return explorer


# -- request models: every body is checked here before anything reaches the explorer --------------------------

# Strict: true, "0.5" and null are not pixels. Range and finiteness are checked per array (one message, fast).
Pixel = Annotated[float, Strict(), WithJsonSchema({"type": "number", "minimum": 0, "maximum": 1})]
ImageRow = Annotated[list[Pixel], Field(min_length=FIELD_SIZE, max_length=FIELD_SIZE)]
DrawingRow = Annotated[list[Pixel], Field(min_length=1, max_length=MAX_DRAWING_SIDE)]
ImageRows = Annotated[list[ImageRow], Field(
    min_length=FIELD_SIZE, max_length=FIELD_SIZE,
    description="28x28 pixels in [0, 1], white digit on black (as MNIST); used as is")]
DrawingRows = Annotated[list[DrawingRow], Field(
    min_length=1, max_length=MAX_DRAWING_SIDE,
    description=f"HxW pixels in [0, 1] (H, W <= {MAX_DRAWING_SIDE}), white ink on black; preprocessed like MNIST "
                "(bounding box scaled to 20x20, centre of mass at the centre of 28x28)")]
RunId = Annotated[str, Strict(), Field(min_length=1, max_length=MAX_RUN_ID_LENGTH,
                                       description=f"an offered run's id, or {ENSEMBLE!r}; default: the first run")]
ClassIndex = Annotated[int, Strict(), Field(ge=0, le=9)]


def _pixel_array(rows: list[list[float]], name: str) -> np.ndarray:
    """``rows`` as a 2-D float64 array, or ValueError naming what is wrong (ragged, non-finite, out of range)."""
    width = len(rows[0])
    for index, row in enumerate(rows):
        if len(row) != width:
            raise ValueError(f"'{name}' row {index} has {len(row)} values but row 0 has {width}; "
                             "every row must have the same length.")
    array = np.asarray(rows, dtype=np.float64)
    if not np.all(np.isfinite(array)):
        where = np.argwhere(~np.isfinite(array))[0]
        raise ValueError(f"'{name}' holds NaN or infinite values (first at row {where[0]}, column {where[1]}); "
                         "pixels must be numbers in [0, 1].")
    if array.min() < 0 or array.max() > 1:
        where = np.argwhere((array < 0) | (array > 1))[0]
        raise ValueError(
            f"'{name}' pixels must lie in [0, 1] (white digit on black, as MNIST); found "
            f"{array[tuple(where)]:g} at row {where[0]}, column {where[1]} (values span "
            f"[{array.min():g}, {array.max():g}]). Divide 0-255 pixel values by 255."
        )
    return array


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid")  # a misspelt field is an error, not silently ignored


class ModelInput(StrictModel):
    """Exactly one of ``image`` (28x28, used as is) or ``drawing`` (HxW, preprocessed like MNIST)."""

    image: ImageRows | None = None
    drawing: DrawingRows | None = None
    _pixels: np.ndarray = PrivateAttr()  # the checked image or drawing as an array

    @model_validator(mode="after")
    def _one_checked_input(self):
        if (self.image is None) == (self.drawing is None):
            raise ValueError("send exactly one of 'image' (a 28x28 array in [0, 1], used as is) or 'drawing' "
                             "(any HxW array in [0, 1], preprocessed like MNIST).")
        self._pixels = _pixel_array(*((self.image, "image") if self.image is not None else (self.drawing, "drawing")))
        return self

    @property
    def preprocessed(self) -> bool:
        return self.drawing is not None

    def model_image(self) -> np.ndarray:
        """The 28x28 float32 image the model sees: ``image`` as is, or ``drawing`` through MNIST preprocessing."""
        return mnist_preprocess(self._pixels) if self.preprocessed else self._pixels.astype(np.float32)


class PredictRequest(ModelInput):
    """``image`` or ``drawing``, and the run to ask (a run id, ``ensemble``, or the default run)."""

    run_id: RunId | None = None


class SaliencyRequest(ModelInput):
    """``image`` or ``drawing``, the run to explain, and the class to explain (default: the predicted one)."""

    run_id: RunId | None = None
    target_class: ClassIndex | None = None


class ActivationsRequest(SaliencyRequest):
    """As for saliency, plus how many of each conv layer's most active channels to return."""

    max_channels: Annotated[int, Strict(), Field(ge=1, le=MAX_ACTIVATION_CHANNELS)] = 16


class PreprocessRequest(StrictModel):
    """A drawing to put through MNIST's preprocessing."""

    drawing: DrawingRows
    _pixels: np.ndarray = PrivateAttr()

    @model_validator(mode="after")
    def _checked_drawing(self):
        self._pixels = _pixel_array(self.drawing, "drawing")
        return self

    def model_image(self) -> np.ndarray:
        return mnist_preprocess(self._pixels)


# -- response models -------------------------------------------------------------------------------------------


class ValidationProblem(BaseModel):
    loc: list[str | int] = Field(description="where: body, query or path, then the field and indices")
    type: str
    msg: str


class ErrorResponse(BaseModel):
    detail: str = Field(description="what is wrong and how to fix it")
    errors: list[ValidationProblem] | None = Field(None, description="422 from validation: the first 20 problems")


class ModelStatus(BaseModel):
    run_id: str
    label: str
    loaded: bool


class HealthResponse(BaseModel):
    status: Literal["ok"]
    default_run_id: str
    models: list[ModelStatus]
    test_images_loaded: bool


class RunSummary(BaseModel):
    run_id: str
    label: str = Field(description="the arm in a study, else the run name")
    run_name: str
    experiment_id: str
    arm: str | None
    seed: str | None
    val_accuracy: float | None = Field(description="final validation accuracy")
    test_accuracy: float | None
    mlflow_url: str = Field(description="the run in the MLflow UI")


class RunsResponse(BaseModel):
    default_run_id: str
    ensemble: str | None = Field(description=f"{ENSEMBLE!r} when more than one run is offered")
    runs: list[RunSummary]


class HistoryPoint(BaseModel):
    epoch: int
    value: float | None


class RunDetails(RunSummary):
    status: str
    metrics: dict[str, float | None]
    params: dict[str, str]
    history: dict[str, list[HistoryPoint]] = Field(description="per-epoch loss, accuracy, val_*, learning_rate")


class ConfusionResponse(BaseModel):
    run_id: str
    matrix: list[list[int]] = Field(description="10x10 counts; rows: true label, columns: predicted class")
    total: int
    accuracy: float


class Example(BaseModel):
    index: int = Field(description="position in the MNIST test set")
    label: int
    predicted: int
    confidence: float = Field(description="probability of the predicted class")
    true_probability: float = Field(description="probability of the true label")
    probabilities: list[float]
    image: list[list[int]] = Field(description="28x28 pixels, 0-255")


class ExamplesResponse(BaseModel):
    run_id: str
    label: int | None
    predicted: int | None
    sort: Sort
    total: int = Field(description="test images in the cell (or row, or column)")
    offset: int
    examples: list[Example]


class PredictResponse(BaseModel):
    run_id: str
    predicted_class: int
    probabilities: list[float] = Field(description="ten class probabilities")
    members: list[str] | None = Field(None, description="for the ensemble: the runs averaged")
    image: list[list[float]] | None = Field(None, description="for a drawing: the 28x28 image the model saw")


class PreprocessResponse(BaseModel):
    image: list[list[float]] = Field(description="the 28x28 image the model would see, in [0, 1]")


class SaliencyResponse(BaseModel):
    run_id: str
    predicted_class: int
    target_class: int = Field(description="the class explained")
    probabilities: list[float]
    image: list[list[int]] = Field(description="the 28x28 model input, 0-255")
    saliency: list[list[int]] = Field(description="|d logit / d pixel|, 28x28, 0-255")
    gradcam: list[list[int]] = Field(description="Grad-CAM on gradcam_layer, upsampled to 28x28, 0-255")
    gradcam_layer: str


class ChannelMap(BaseModel):
    channel: int
    mean: float
    max: float
    map: list[list[int]] = Field(description="the channel's map scaled so its maximum is 255")


class LayerActivations(BaseModel):
    layer: str
    shape: list[int] = Field(description="height, width, channels")
    channels: list[ChannelMap]


class ActivationsResponse(BaseModel):
    run_id: str
    predicted_class: int
    layers: list[LayerActivations]


# -- HTTP: reading bodies, describing validation errors, security headers --------------------------------------

_JSON_TYPES = {dict: "object", list: "array", str: "string", int: "number", float: "number", bool: "boolean",
               type(None): "null"}


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
    """A dependency: the request body parsed as JSON (whatever its Content-Type) and validated as ``model``.

    Parsed by pydantic's own JSON parser, which bounds nesting depth and number size, so no body reaches
    Python's ``json`` module; problems become MalformedBodyError, BodyTooLargeError or RequestValidationError.
    """

    async def parse(request: Request):
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
        return JSONResponse({"detail": str(error)}, status_code=status)

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


def _quantized(values: np.ndarray) -> list:
    """[0, 1] floats as 0-255 integers, which is all a heat map can show and a quarter of the JSON."""
    return np.rint(np.clip(values, 0, 1) * 255).astype(int).tolist()


def _rounded(image: np.ndarray) -> list:
    return np.round(image.astype(np.float64), 4).tolist()




def _error_responses(*statuses: int) -> dict:
    """OpenAPI ``responses`` for the error statuses a route can answer (all with an ErrorResponse body)."""
    return {status: {"model": ErrorResponse} for status in statuses}


RUN_ERRORS = _error_responses(404, 422, 503)  # GET routes of one run
BODY_ERRORS = _error_responses(400, 404, 413, 422, 503)  # POST routes


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
    app.add_middleware(TrustedHostMiddleware, allowed_hosts=list(allowed_hosts))
    app.add_middleware(SecurityHeaders)
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

    @app.get("/", include_in_schema=False)
    def index() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", headers={"Cache-Control": "no-cache"})

    @app.get("/api/docs", include_in_schema=False)
    def docs() -> HTMLResponse:
        return _docs_page(app.openapi_url, f"{app.title} - API")

    @app.get("/api/health", response_model=HealthResponse)
    def health():
        """Which runs are offered and which models are loaded."""
        return {
            "status": "ok",
            "default_run_id": explorer.default_run_id,
            "models": [{"run_id": run.run_id, "label": run.label, "loaded": explorer.is_loaded(run.run_id)}
                       for run in explorer.runs.values()],
            "test_images_loaded": explorer.test_images_loaded,
        }

    @app.get("/api/runs", response_model=RunsResponse)
    def runs():
        """The offered runs, default first, with their MLflow UI links."""
        return {"default_run_id": explorer.default_run_id, "ensemble": ENSEMBLE if len(explorer.runs) > 1 else None,
                "runs": [explorer.summary(run) for run in explorer.runs.values()]}

    @app.get("/api/runs/{run_id}", response_model=RunDetails, responses=RUN_ERRORS)
    def run_details(run_id: str):
        """Key metrics and config, per-epoch curves and the MLflow UI link of one run."""
        return explorer.run_details(run_id)

    @app.get("/api/runs/{run_id}/confusion", response_model=ConfusionResponse, responses=RUN_ERRORS)
    def confusion(run_id: str):
        """The run's confusion matrix on the MNIST test set, from its logged test predictions."""
        return explorer.confusion(run_id)

    @app.get("/api/runs/{run_id}/examples", response_model=ExamplesResponse, responses=RUN_ERRORS)
    def examples(run_id: str,
                 label: Annotated[int | None, Query(ge=0, le=9, description="true label (row of the matrix)")] = None,
                 predicted: Annotated[int | None, Query(ge=0, le=9, description="predicted class (column)")] = None,
                 sort: Annotated[Sort, Query(description="confidence: most confident first; true_probability: "
                                                         "least probability on the true label first")] = "confidence",
                 limit: Annotated[int, Query(ge=1, le=MAX_EXAMPLES)] = 24,
                 offset: Annotated[int, Query(ge=0, le=10_000)] = 0):
        """Test images of one confusion-matrix cell (or a row or column) with the run's probabilities."""
        return explorer.examples(run_id, label, predicted, sort, limit, offset)

    @app.post("/api/predict", response_model=PredictResponse, response_model_exclude_none=True,
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

    @app.post("/api/preprocess", response_model=PreprocessResponse, responses=BODY_ERRORS,
              openapi_extra=request_body_schema(PreprocessRequest))
    def preprocess(body: Annotated[PreprocessRequest, Depends(json_body(PreprocessRequest))]):
        """The 28x28 image the model sees for a drawing (bounding box 20x20, centre of mass centred)."""
        return {"image": _rounded(body.model_image())}

    @app.post("/api/saliency", response_model=SaliencyResponse, responses=BODY_ERRORS,
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
            "image": _quantized(image),
            "saliency": _quantized(result.saliency),
            "gradcam": _quantized(result.gradcam),
            "gradcam_layer": result.gradcam_layer,
        }

    @app.post("/api/activations", response_model=ActivationsResponse, responses=BODY_ERRORS,
              openapi_extra=request_body_schema(ActivationsRequest))
    def activations(body: Annotated[ActivationsRequest, Depends(json_body(ActivationsRequest))]):
        """Each conv layer's feature maps: the ``max_channels`` most active, each scaled to 0-255."""
        run_id, predicted_class, activations = explorer.activations(body.model_image(), body.run_id)
        layers = []
        for activation in activations:
            maps = activation.maps
            strength = maps.mean(axis=(0, 1))
            channels = []
            for channel in np.argsort(-strength, kind="stable")[:body.max_channels]:
                channel_map = maps[:, :, channel]
                peak = float(channel_map.max())
                channels.append({"channel": int(channel), "mean": float(strength[channel]), "max": peak,
                                 "map": _quantized(channel_map / peak if peak > 0 else channel_map)})
            layers.append({"layer": activation.layer, "shape": list(maps.shape), "channels": channels})
        return {"run_id": run_id, "predicted_class": predicted_class, "layers": layers}

    return app


def run_server(explorer: ModelExplorer, host: str = "127.0.0.1", port: int = 8000,
               allowed_hosts: list[str] | tuple[str, ...] = (), log_level: str = "info") -> None:
    """Serve ``create_app(explorer)`` with uvicorn until interrupted; ``allowed_hosts`` extend ``trusted_hosts``."""
    import uvicorn

    app = create_app(explorer, allowed_hosts=trusted_hosts(host, allowed_hosts))
    uvicorn.run(app, host=host, port=port, log_level=log_level)


if __name__ == "__main__":  # `python -m mnist_ablation.serve` (documented) runs the command layer
    import runpy

    runpy.run_module("experiments.serve", run_name="__main__", alter_sys=True)
