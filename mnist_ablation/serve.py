"""``python -m mnist_ablation.serve``: the model explorer, a web page and JSON API over runs in MLflow.

Draw a digit and watch the class probabilities, see why the model decided (saliency, Grad-CAM, conv
activations), put two runs or an ensemble side by side, browse the test set through the run's confusion
matrix, and read its training curves. The server offers one or more runs (``--run-id``, repeatable) or
the runs of an ablation study (``--study``: the best seed of each arm by final validation accuracy, or
every finished run with ``--all-runs``).

The only module besides ``explain``/``preprocess`` that touches FastAPI; MLflow is read directly here.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# The artifact downloads here are tiny; their progress bars would only clutter the server log.
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

import numpy as np  # noqa: E402
from fastapi import FastAPI, HTTPException, Query, Request  # noqa: E402
from fastapi.responses import FileResponse, JSONResponse  # noqa: E402
from fastapi.staticfiles import StaticFiles  # noqa: E402
from starlette.concurrency import run_in_threadpool  # noqa: E402

from .preprocess import FIELD_SIZE, check_drawing, mnist_preprocess  # noqa: E402

STATIC_DIR = Path(__file__).resolve().parent / "static"
DEFAULT_MLFLOW_UI_URL = "http://127.0.0.1:5000"
MAX_BODY_BYTES = 2_000_000  # a 560x560 drawing with 3 decimals fits; anything bigger is a mistake or abuse
MAX_DRAWING_SIDE = 560  # twice the page's canvas; larger drawings should be downscaled by the client
MAX_EXAMPLES = 200  # test images per page of the browser
MAX_ACTIVATION_CHANNELS = 64
ENSEMBLE = "ensemble"  # run_id meaning: average the probabilities of every offered run
HISTORY_METRICS = ("loss", "accuracy", "val_loss", "val_accuracy", "learning_rate")
KEY_METRICS = ("test_accuracy", "test_loss", "val_accuracy", "val_loss", "train_seconds", "train_images_per_second")
KEY_PARAMS = ("epochs", "train_subset", "validation", "augmentation", "batch_norm", "dropout", "architecture",
              "optimizer", "learning_rate", "lr_schedule", "seed")
SORTS = ("confidence", "true_probability", "index")


class ExplorerError(RuntimeError):
    """The runs to serve cannot be found or used (unknown study or run, no finished runs)."""


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
    return number if math.isfinite(number) else None


def _arm_order(arm: str) -> tuple[int, str]:
    return (0 if arm == "baseline" else 1, arm)


def study_runs_to_offer(study: str, best_per_arm: bool = True) -> list[OfferedRun]:
    """The finished cell runs of ``ablation/<study>``: the best seed per arm (by final val_accuracy) or all.

    Needs the MLflow tracking URI to be set. Arms come baseline first, then alphabetically.
    """
    import mlflow
    from mlflow.tracking import MlflowClient

    experiment_name = f"ablation/{study}"
    experiment = MlflowClient().get_experiment_by_name(experiment_name)
    if experiment is None:
        known = sorted(e.name.split("/", 1)[1] for e in mlflow.search_experiments() if e.name.startswith("ablation/"))
        raise ExplorerError(
            f"no study {study!r}: the tracking store has no experiment {experiment_name!r}. "
            f"Studies found there: {', '.join(known) or 'none'}. Run the study first or pass --tracking-uri."
        )
    frame = mlflow.search_runs(
        [experiment.experiment_id],
        filter_string="tags.`mnist_ablation.role` = 'cell' and attributes.status = 'FINISHED'",
        max_results=50_000,
    )
    if frame.empty:
        raise ExplorerError(f"study {study!r} has no FINISHED runs yet in {mlflow.get_tracking_uri()}.")
    for column in ("tags.arm", "tags.seed", "metrics.val_accuracy", "metrics.test_accuracy", "tags.mlflow.runName"):
        if column not in frame:
            frame[column] = None
    frame["tags.arm"] = frame["tags.arm"].fillna("unknown-arm")
    frame["_val"] = frame["metrics.val_accuracy"].astype(float).fillna(-1.0)
    # Best validation accuracy first; ties go to the earlier run so the choice is stable.
    frame = frame.sort_values(["_val", "start_time"], ascending=[False, True], kind="stable")
    if best_per_arm:
        frame = frame.drop_duplicates("tags.arm", keep="first")
    offered = [
        OfferedRun(
            run_id=row["run_id"],
            label=row["tags.arm"] if best_per_arm else f"{row['tags.arm']} (seed {row['tags.seed']})",
            run_name=row["tags.mlflow.runName"] or row["run_id"],
            experiment_id=str(row["experiment_id"]),
            arm=row["tags.arm"],
            seed=row["tags.seed"],
            val_accuracy=_finite_or_none(row["metrics.val_accuracy"]),
            test_accuracy=_finite_or_none(row["metrics.test_accuracy"]),
        )
        for _, row in frame.iterrows()
    ]
    return sorted(offered, key=lambda run: (_arm_order(run.arm or ""), -(run.val_accuracy or -1.0)))


def runs_by_id(run_ids: list[str]) -> list[OfferedRun]:
    """The given runs, each checked to exist in the tracking store."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    offered = []
    for run_id in run_ids:
        try:
            run = client.get_run(run_id)
        except MlflowException as error:
            raise ExplorerError(
                f"run {run_id!r} is not in the tracking store {client.tracking_uri} ({error.message.splitlines()[0]}). "
                "Check the id (mlflow ui shows it) or pass the store with --tracking-uri."
            ) from None
        tags = run.data.tags
        name = tags.get("mlflow.runName", run_id)
        offered.append(OfferedRun(
            run_id=run_id,
            label=tags.get("arm") or name,
            run_name=name,
            experiment_id=run.info.experiment_id,
            arm=tags.get("arm"),
            seed=tags.get("seed"),
            val_accuracy=_finite_or_none(run.data.metrics.get("val_accuracy")),
            test_accuracy=_finite_or_none(run.data.metrics.get("test_accuracy")),
        ))
    labels = [run.label for run in offered]
    for run in offered:
        if labels.count(run.label) > 1:  # two runs of one arm: tell them apart
            run.label = f"{run.label} ({run.run_id[:8]})"
    return offered


class ModelExplorer:
    """The runs on offer and everything loaded for them (models, test predictions, test images)."""

    def __init__(self, runs: list[OfferedRun], data_dir: str | None = None,
                 mlflow_ui_url: str = DEFAULT_MLFLOW_UI_URL):
        if not runs:
            raise ExplorerError("no runs to serve; pass --run-id ID or --study NAME.")
        self.runs = {run.run_id: run for run in runs}
        self.default_run_id = runs[0].run_id
        self.data_dir = data_dir
        self.mlflow_ui_url = mlflow_ui_url.rstrip("/")
        self._explainers: dict[str, Any] = {}
        self._predictions: dict[str, Any] = {}
        self._details: dict[str, dict] = {}
        self._test_images: np.ndarray | None = None
        self._test_labels: np.ndarray | None = None
        self._lock = threading.Lock()  # one loader at a time; loads are rare, requests read the caches

    # Loading.
    def run(self, run_id: str | None) -> OfferedRun:
        """The offered run ``run_id`` (the default run when None), else a 404 naming the offered ones."""
        chosen = run_id or self.default_run_id
        if chosen not in self.runs:
            offered = ", ".join(f"{r.run_id} ({r.label})" for r in self.runs.values())
            raise HTTPException(404, f"run_id {chosen!r} is not offered by this server; offered: {offered}"
                                     f" or {ENSEMBLE!r}.")
        return self.runs[chosen]

    def explainer(self, run_id: str):
        """The loaded model of ``run_id`` wrapped for prediction and explanation (loads on first use)."""
        if run_id in self._explainers:
            return self._explainers[run_id]
        with self._lock:
            if run_id not in self._explainers:
                import mlflow

                from .explain import Explainer

                try:
                    model = mlflow.keras.load_model(f"runs:/{run_id}/model")
                except Exception as error:  # MLflow raises several types for a missing or broken model
                    raise HTTPException(
                        503, f"cannot load the model of run {run_id}: {type(error).__name__}: {error}. "
                             "Was the run FINISHED with its model logged?"
                    ) from None
                explainer = Explainer(model)
                explainer.warm_up()
                self._explainers[run_id] = explainer
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
                        raise HTTPException(503, f"MNIST test images unavailable: {error}") from None
                    # Keep only the test arrays; the 60,000 training images are freed.
                    self._test_labels = data.y_test
                    self._test_images = data.x_test[..., 0]
        return self._test_images, self._test_labels

    def predictions(self, run_id: str):
        """The run's logged test predictions (DataFrame: index, label, predicted, prob_0..prob_9)."""
        if run_id not in self._predictions:
            from .tracking import PREDICTIONS_ARTIFACT, read_predictions

            try:
                frame = read_predictions(run_id)
            except Exception as error:  # missing artifact, unreachable store
                raise HTTPException(
                    503, f"run {run_id} has no readable {PREDICTIONS_ARTIFACT}: {type(error).__name__}: {error}"
                ) from None
            frame = frame.sort_values("index").reset_index(drop=True)
            self._predictions[run_id] = frame
        return self._predictions[run_id]

    def mlflow_url(self, run: OfferedRun) -> str:
        return f"{self.mlflow_ui_url}/#/experiments/{run.experiment_id}/runs/{run.run_id}"

    # What the API answers.
    def probabilities(self, image: np.ndarray, run_id: str | None) -> tuple[np.ndarray, list[str]]:
        """Probabilities for one 28x28 image from one run, or the mean over all runs for ``ensemble``."""
        members = list(self.runs) if run_id == ENSEMBLE else [self.run(run_id).run_id]
        total = sum(self.explainer(member).predict(image)[0].astype(np.float64) for member in members)
        return total / len(members), members

    def run_details(self, run_id: str | None) -> dict:
        """Key metrics and params, per-epoch curves and the MLflow UI link of one run."""
        run = self.run(run_id)
        if run.run_id not in self._details:
            from mlflow.tracking import MlflowClient

            client = MlflowClient()
            mlflow_run = client.get_run(run.run_id)
            history = {}
            for key in HISTORY_METRICS:
                points = sorted(client.get_metric_history(run.run_id, key), key=lambda m: (m.step, m.timestamp))
                history[key] = [{"epoch": int(m.step), "value": _finite_or_none(m.value)} for m in points]
            metrics = mlflow_run.data.metrics
            params = mlflow_run.data.params
            self._details[run.run_id] = {
                **asdict(run),
                "status": mlflow_run.info.status,
                "mlflow_url": self.mlflow_url(run),
                "metrics": {key: _finite_or_none(metrics.get(key)) for key in KEY_METRICS if key in metrics},
                "params": {key: params[key] for key in KEY_PARAMS if key in params},
                "history": history,
            }
        return self._details[run.run_id]

    def confusion(self, run_id: str | None) -> dict:
        run = self.run(run_id)
        frame = self.predictions(run.run_id)
        matrix = np.zeros((10, 10), dtype=np.int64)
        np.add.at(matrix, (frame["label"].to_numpy(), frame["predicted"].to_numpy()), 1)
        return {
            "run_id": run.run_id,
            "matrix": matrix.tolist(),  # rows: true label, columns: predicted class
            "total": int(matrix.sum()),
            "accuracy": float(np.trace(matrix) / max(1, matrix.sum())),
        }

    def examples(self, run_id: str | None, label: int | None, predicted: int | None, sort: str,
                 limit: int, offset: int) -> dict:
        """Test images of one confusion-matrix cell (or row/column) with the run's probabilities."""
        run = self.run(run_id)
        frame = self.predictions(run.run_id)
        images, labels = self.test_set()
        if len(frame) != len(labels) or not np.array_equal(frame["label"].to_numpy(), labels[frame["index"]]):
            raise HTTPException(
                500, f"run {run.run_id}'s logged test predictions do not match the MNIST test labels in "
                     f"{self.data_dir or os.environ.get('MNIST_DATA_DIR') or 'the Keras download'}; "
                     "point --data-dir at the MNIST the run was trained on."
            )
        probability_columns = [f"prob_{k}" for k in range(10)]
        probabilities = frame[probability_columns].to_numpy()
        rows = np.ones(len(frame), dtype=bool)
        if label is not None:
            rows &= frame["label"].to_numpy() == label
        if predicted is not None:
            rows &= frame["predicted"].to_numpy() == predicted
        chosen = np.flatnonzero(rows)
        confidence = probabilities[np.arange(len(frame)), frame["predicted"].to_numpy()]
        true_probability = probabilities[np.arange(len(frame)), frame["label"].to_numpy()]
        if sort == "confidence":  # most confident first: among mistakes, the hardest ones
            chosen = chosen[np.argsort(-confidence[chosen], kind="stable")]
        elif sort == "true_probability":  # least probability on the true class first
            chosen = chosen[np.argsort(true_probability[chosen], kind="stable")]
        page = chosen[offset:offset + limit]
        return {
            "run_id": run.run_id,
            "label": label,
            "predicted": predicted,
            "sort": sort,
            "total": int(len(chosen)),
            "offset": offset,
            "examples": [
                {
                    "index": int(frame["index"].iat[row]),
                    "label": int(frame["label"].iat[row]),
                    "predicted": int(frame["predicted"].iat[row]),
                    "confidence": float(confidence[row]),
                    "true_probability": float(true_probability[row]),
                    "probabilities": [round(float(p), 6) for p in probabilities[row]],
                    # 0-255 integers: a third the size of floats in JSON, and exactly MNIST's pixels.
                    "image": np.rint(images[int(frame["index"].iat[row])] * 255).astype(int).tolist(),
                }
                for row in page
            ],
        }


# Request checking: every problem becomes a 4xx naming it; nothing reaches the model unchecked.
async def read_json_object(request: Request) -> dict:
    """The request body as a JSON object, refusing oversized and non-JSON bodies with a clear 4xx."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise HTTPException(413, f"request body of {declared} bytes is larger than the limit of {MAX_BODY_BYTES} "
                                 "bytes; send a 28x28 'image' or a drawing of at most "
                                 f"{MAX_DRAWING_SIDE}x{MAX_DRAWING_SIDE} pixels.")
    body = bytearray()
    async for chunk in request.stream():
        body.extend(chunk)
        if len(body) > MAX_BODY_BYTES:  # a chunked body without Content-Length
            raise HTTPException(413, f"request body is larger than the limit of {MAX_BODY_BYTES} bytes.")
    try:
        payload = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise HTTPException(400, f"request body is not valid JSON ({error}); send e.g. "
                                 '{"image": [[0.0, ...], ...]} with Content-Type: application/json.') from None
    if not isinstance(payload, dict):
        raise HTTPException(400, f"request body must be a JSON object, got a JSON {type(payload).__name__}.")
    return payload


def _pixel_array(value: Any, name: str, exact_size: int | None) -> np.ndarray:
    """``value`` (nested lists) as a 2-D float array, or a 422 naming what is wrong with it."""
    if not isinstance(value, list) or not value:
        raise HTTPException(422, f"'{name}' must be a non-empty list of rows of numbers, got {type(value).__name__}.")
    if not isinstance(value[0], list):
        raise HTTPException(422, f"'{name}' must be a list of rows, each a list of numbers; row 0 is a "
                                 f"{type(value[0]).__name__}, not a list of numbers.")
    if exact_size is not None and len(value) != exact_size:
        raise HTTPException(422, f"'{name}' has {len(value)} rows; expected {exact_size} rows of {exact_size} numbers.")
    if exact_size is None and len(value) > MAX_DRAWING_SIDE:
        raise HTTPException(422, f"'{name}' has {len(value)} rows; at most {MAX_DRAWING_SIDE} are accepted.")
    width = len(value[0]) if isinstance(value[0], list) else None
    for index, row in enumerate(value):
        if not isinstance(row, list):
            raise HTTPException(422, f"'{name}' row {index} is a {type(row).__name__}, not a list of numbers.")
        expected = exact_size if exact_size is not None else width
        if len(row) != expected:
            raise HTTPException(422, f"'{name}' row {index} has {len(row)} values; expected {expected}.")
        if any(isinstance(v, bool) or not isinstance(v, (int, float)) for v in row):
            bad = next(v for v in row if isinstance(v, bool) or not isinstance(v, (int, float)))
            raise HTTPException(422, f"'{name}' row {index} holds {bad!r}, which is not a number.")
    if exact_size is None and width > MAX_DRAWING_SIDE:
        raise HTTPException(422, f"'{name}' rows have {width} values; at most {MAX_DRAWING_SIDE} are accepted.")
    array = np.asarray(value, dtype=np.float64)
    if not np.all(np.isfinite(array)):
        raise HTTPException(422, f"'{name}' holds NaN or infinite values; pixels must be numbers in [0, 1].")
    low, high = float(array.min()), float(array.max())
    if low < 0 or high > 1:
        where = np.argwhere((array < 0) | (array > 1))[0]
        raise HTTPException(
            422, f"'{name}' pixels must lie in [0, 1] (white digit on black, as MNIST); found "
                 f"{array[tuple(where)]:g} at row {where[0]}, column {where[1]} (values span [{low:g}, {high:g}]). "
                 "Divide 0-255 pixel values by 255."
        )
    return array


def model_input(payload: dict) -> tuple[np.ndarray, bool]:
    """The 28x28 image to classify: ``image`` as given, or ``drawing`` put through MNIST preprocessing."""
    has_image, has_drawing = "image" in payload, "drawing" in payload
    if has_image == has_drawing:
        raise HTTPException(422, "send exactly one of 'image' (a 28x28 array in [0, 1], used as is) or "
                                 "'drawing' (any HxW array in [0, 1], preprocessed like MNIST).")
    if has_image:
        return _pixel_array(payload["image"], "image", FIELD_SIZE).astype(np.float32), False
    drawing = check_drawing(_pixel_array(payload["drawing"], "drawing", None))
    return mnist_preprocess(drawing), True


def _optional_run_id(payload: dict) -> str | None:
    run_id = payload.get("run_id")
    if run_id is not None and not isinstance(run_id, str):
        raise HTTPException(422, f"'run_id' must be a string, got {type(run_id).__name__}.")
    return run_id


def _quantized(values: np.ndarray) -> list:
    """[0, 1] floats as 0-255 integers, which is all a heat map can show and a quarter of the JSON."""
    return np.rint(np.clip(values, 0, 1) * 255).astype(int).tolist()


def create_app(explorer: ModelExplorer) -> FastAPI:
    """The FastAPI app: the page at ``/``, its files under ``/static``, the JSON API under ``/api``."""
    app = FastAPI(title="MNIST model explorer", docs_url="/api/docs", openapi_url="/api/openapi.json")
    app.state.explorer = explorer
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

    @app.get("/", include_in_schema=False)
    def index() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", headers={"Cache-Control": "no-cache"})

    @app.get("/api/health")
    def health() -> dict:
        """Which runs are offered and which models are loaded."""
        return {
            "status": "ok",
            "default_run_id": explorer.default_run_id,
            "models": [
                {"run_id": run.run_id, "label": run.label, "loaded": run.run_id in explorer._explainers}
                for run in explorer.runs.values()
            ],
            "test_images_loaded": explorer._test_images is not None,
        }

    @app.get("/api/runs")
    def runs() -> dict:
        """The offered runs, default first, with their MLflow UI links."""
        return {
            "default_run_id": explorer.default_run_id,
            "ensemble": ENSEMBLE if len(explorer.runs) > 1 else None,
            "runs": [{**asdict(run), "mlflow_url": explorer.mlflow_url(run)} for run in explorer.runs.values()],
        }

    @app.get("/api/runs/{run_id}")
    def run_details(run_id: str) -> dict:
        return explorer.run_details(run_id)

    @app.get("/api/runs/{run_id}/confusion")
    def confusion(run_id: str) -> dict:
        return explorer.confusion(run_id)

    @app.get("/api/runs/{run_id}/examples")
    def examples(run_id: str,
                 label: int | None = Query(None, ge=0, le=9, description="true label (row of the matrix)"),
                 predicted: int | None = Query(None, ge=0, le=9, description="predicted class (column)"),
                 sort: str = Query("confidence", description=f"one of {SORTS}"),
                 limit: int = Query(24, ge=1, le=MAX_EXAMPLES),
                 offset: int = Query(0, ge=0)) -> dict:
        if sort not in SORTS:
            raise HTTPException(422, f"sort={sort!r} is not known; use one of {', '.join(SORTS)}.")
        return explorer.examples(run_id, label, predicted, sort, limit, offset)

    @app.post("/api/predict")
    async def predict(request: Request) -> JSONResponse:
        """``{"image": 28x28 | "drawing": HxW, "run_id"?}`` -> predicted class and ten probabilities."""
        payload = await read_json_object(request)
        run_id = _optional_run_id(payload)
        if run_id != ENSEMBLE:
            explorer.run(run_id)  # 404 for an unknown run before any work
        start = time.perf_counter()

        def work():
            image, preprocessed = model_input(payload)
            probabilities, members = explorer.probabilities(image, run_id)
            return image, preprocessed, probabilities, members

        image, preprocessed, probabilities, members = await run_in_threadpool(work)
        elapsed_ms = (time.perf_counter() - start) * 1000
        answer = {
            "run_id": run_id or explorer.default_run_id,
            "predicted_class": int(np.argmax(probabilities)),
            "probabilities": [float(p) for p in probabilities],
        }
        if run_id == ENSEMBLE:
            answer["members"] = members
        if preprocessed:
            answer["image"] = [[round(float(v), 4) for v in row] for row in image]
        return JSONResponse(answer, headers={"Server-Timing": f"model;dur={elapsed_ms:.2f}"})

    @app.post("/api/preprocess")
    async def preprocess(request: Request) -> dict:
        """``{"drawing": HxW}`` -> the 28x28 image the model sees (bounding box 20x20, centre of mass centred)."""
        payload = await read_json_object(request)
        if "drawing" not in payload:
            raise HTTPException(422, "send {'drawing': [[...], ...]}, an HxW array in [0, 1] (white ink on black).")
        image, _ = await run_in_threadpool(model_input, {"drawing": payload["drawing"]})
        return {"image": [[round(float(v), 4) for v in row] for row in image]}

    async def explanation(request: Request) -> tuple[dict, np.ndarray, dict]:
        payload = await read_json_object(request)
        run_id = _optional_run_id(payload)
        if run_id == ENSEMBLE:
            raise HTTPException(422, "explanations are per model; pass one run's run_id, not 'ensemble'.")
        run = explorer.run(run_id)
        target = payload.get("target_class")
        if target is not None and (isinstance(target, bool) or not isinstance(target, int) or not 0 <= target <= 9):
            raise HTTPException(422, f"'target_class' must be an integer 0..9, got {target!r}.")

        def work():
            image, _ = model_input(payload)
            return image, explorer.explainer(run.run_id).explain(image, target)

        image, result = await run_in_threadpool(work)
        return payload, image, {"run_id": run.run_id, **result}

    @app.post("/api/saliency")
    async def saliency(request: Request) -> dict:
        """Gradient saliency and Grad-CAM (28x28, 0-255) for the predicted (or ``target_class``) class."""
        _, image, result = await explanation(request)
        return {
            "run_id": result["run_id"],
            "predicted_class": result["predicted_class"],
            "target_class": result["target_class"],
            "probabilities": [float(p) for p in result["probabilities"]],
            "image": _quantized(image),
            "saliency": _quantized(result["saliency"]),
            "gradcam": _quantized(result["gradcam"]),
            "gradcam_layer": result["gradcam_layer"],
        }

    @app.post("/api/activations")
    async def activations(request: Request) -> dict:
        """Each conv layer's feature maps for the image: the ``max_channels`` most active, each scaled to 0-255."""
        payload, _, result = await explanation(request)
        max_channels = payload.get("max_channels", 16)
        if isinstance(max_channels, bool) or not isinstance(max_channels, int) or not 1 <= max_channels <= MAX_ACTIVATION_CHANNELS:
            raise HTTPException(422, f"'max_channels' must be an integer 1..{MAX_ACTIVATION_CHANNELS}, got {max_channels!r}.")
        layers = []
        for activation in result["activations"]:
            maps = activation.maps
            strength = maps.mean(axis=(0, 1))
            strongest = np.argsort(-strength, kind="stable")[:max_channels]
            channels = []
            for channel in strongest:
                channel_map = maps[:, :, channel]
                peak = float(channel_map.max())
                channels.append({
                    "channel": int(channel),
                    "mean": float(strength[channel]),
                    "max": peak,
                    "map": _quantized(channel_map / peak if peak > 0 else channel_map),
                })
            layers.append({"layer": activation.layer, "shape": list(maps.shape), "channels": channels})
        return {"run_id": result["run_id"], "predicted_class": result["predicted_class"], "layers": layers}

    return app


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m mnist_ablation.serve", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--run-id", action="append", metavar="ID",
                       help="MLflow run to serve (repeatable: the first is the default, the others can be compared)")
    which.add_argument("--study", metavar="NAME", help="serve the runs of the ablation study NAME (experiment ablation/NAME)")
    parser.add_argument("--all-runs", action="store_true",
                        help="with --study: offer every finished run, not only the best seed per arm")
    parser.add_argument("--host", default="127.0.0.1", help="interface to listen on (default: %(default)s)")
    parser.add_argument("--port", type=int, default=8000, help="port (default: %(default)s)")
    parser.add_argument("--tracking-uri", default=None,
                        help="MLflow tracking URI (also $MLFLOW_TRACKING_URI); default sqlite:///mlruns/mlflow.db")
    parser.add_argument("--data-dir", default=None,
                        help="MNIST directory for the test-set browser (also $MNIST_DATA_DIR)")
    parser.add_argument("--mlflow-ui-url", default=DEFAULT_MLFLOW_UI_URL,
                        help="base URL of the MLflow UI for the run links (default: %(default)s)")
    parser.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"),
                        help="uvicorn log level (default: %(default)s)")
    return parser.parse_args(argv)


def build_explorer(args: argparse.Namespace) -> ModelExplorer:
    """Resolve the tracking store and the runs to offer, and load the default model."""
    from .tracking import use_tracking_uri

    use_tracking_uri(args.tracking_uri)
    if args.study:
        runs = study_runs_to_offer(args.study, best_per_arm=not args.all_runs)
    else:
        runs = runs_by_id(args.run_id)
    explorer = ModelExplorer(runs, data_dir=args.data_dir, mlflow_ui_url=args.mlflow_ui_url)
    explorer.explainer(explorer.default_run_id)  # fail now, not at the first request, if the model is broken
    return explorer


def main(argv=None) -> int:
    args = parse_args(argv)
    import uvicorn

    from .tracking import TrackingError

    try:
        explorer = build_explorer(args)
    except (ExplorerError, TrackingError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except HTTPException as error:
        print(f"error: {error.detail}", file=sys.stderr)
        return 2
    offered = ", ".join(f"{run.label} [{run.run_id}]" for run in explorer.runs.values())
    print(f"serving {offered} at http://{args.host}:{args.port}/", flush=True)
    uvicorn.run(create_app(explorer), host=args.host, port=args.port, log_level=args.log_level)
    return 0


if __name__ == "__main__":
    sys.exit(main())
