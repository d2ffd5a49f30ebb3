"""The model explorer's domain: the runs on offer, their models and data, and the answers the API gives.

``ModelExplorer`` loads what a run needs on first use (its model through ``store.load_model``, which runs no
code from the store; its logged predictions, checked; the MNIST test set) and answers in plain dicts and
arrays. It raises the domain errors below and knows nothing of HTTP: ``schemas`` holds the request and
response models, ``serve`` the HTTP app. See docs/explorer.md.
"""

from __future__ import annotations

import threading
from dataclasses import asdict, dataclass
from typing import Any
from urllib.parse import quote

import numpy as np

from . import naming, store
from .data import NUM_CLASSES
from .errors import StoreDataError, UserError
from .preprocess import FIELD_SIZE
from .redaction import redact
from .studies import baseline_arm_of
from .sweep import INDEX_COLUMN, LABEL_COLUMN, PREDICTED_COLUMN, PROBABILITY_COLUMNS, usable_runs

ENSEMBLE = "ensemble"  # run_id meaning: average the probabilities of every offered run
KEY_METRICS = ("test_accuracy", "test_loss", "val_accuracy", "val_loss", "train_seconds", "train_images_per_second")
KEY_PARAMS = ("epochs", "train_subset", "validation", "augmentation", "batch_norm", "dropout", "architecture",
              "optimizer", "learning_rate", "lr_schedule", "seed")


def quantized(values: np.ndarray) -> list:
    """[0, 1] floats as 0-255 integers, which is all a heat map can show and a quarter of the JSON (NaN: 0)."""
    return np.rint(np.clip(np.nan_to_num(values, nan=0.0), 0, 1) * 255).astype(int).tolist()


# -- domain errors: raised by the explorer, mapped to HTTP status codes in one place (serve.create_app) -------


class ExplorerError(UserError):
    """The explorer cannot do what was asked (the base of the errors below; at start-up, an unknown study)."""


class UnknownRunError(ExplorerError, LookupError):
    """A run id that this server does not offer (HTTP 404)."""


class UnavailableError(ExplorerError):
    """Something a run needs cannot be loaded: its model, its logged predictions, the MNIST test set (503)."""


class InvalidRequestError(ExplorerError, ValueError):
    """A well-formed request that asks for something impossible, e.g. explaining the ensemble (422)."""


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
    """The study's usable cell runs: the best seed per arm (by final val_accuracy) or all of them.

    Each cell of the study's current definition offers its usable run (``sweep.usable_runs``: its latest
    FINISHED run with a finite test accuracy); the study's baseline arm first (``studies.baseline_arm_of``),
    then the study's arm order. Needs the tracking URI to be set.
    """
    experiment = store.experiment_id(naming.ablation_experiment(study))
    if experiment is None:
        raise ExplorerError(
            f"no study {study!r}: the tracking store has no experiment {naming.ablation_experiment(study)!r}. "
            f"Studies found there: {', '.join(store.ablation_studies()) or 'none'}. Run the study first or pass "
            "--tracking-uri."
        )
    frame = usable_runs(store.cell_runs(study)).usable
    if frame.empty:
        raise ExplorerError(f"study {study!r} has no FINISHED runs with a test accuracy yet in "
                            f"{store.redacted_tracking_uri()}.")
    baseline = baseline_arm_of(study, store.study_definition(study))
    arm_order = {arm: (arm != baseline, position) for position, arm in enumerate(dict.fromkeys(frame["arm"]))}
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
        self.refused: dict[str, str] = {}  # run id -> why its model is refused (kept: refusals are final)

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
        """The run's Keras model, loaded on first use and warmed up (its predict function traced).

        A model the store loader refuses (``store.load_model``: it could run code, or has the wrong shape)
        is refused for good: the reason is kept and every later request answers it without loading again.
        """
        if run_id in self.refused:
            raise UnavailableError(self.refused[run_id])
        if run_id not in self._models:
            with self._lock:
                if run_id in self.refused:
                    raise UnavailableError(self.refused[run_id])
                if run_id not in self._models:
                    try:
                        model = store.load_model(run_id)
                        model.predict_on_batch(np.zeros((1, FIELD_SIZE, FIELD_SIZE, 1), np.float32))
                    except StoreDataError as error:
                        self.refused[run_id] = redact(str(error))
                        raise UnavailableError(self.refused[run_id]) from None
                    except Exception as error:  # MLflow raises several types for a missing model or store trouble
                        raise UnavailableError(redact(
                            f"cannot load the model of run {run_id}: {type(error).__name__}: {error}. "
                            "Was the run FINISHED with its model logged?"
                        )) from None
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
        """The run's logged test predictions (DataFrame of ``sweep.PREDICTION_COLUMNS``), sorted by test index."""
        if run_id not in self._predictions:
            try:
                frame = store.read_predictions(run_id)
            except StoreDataError as error:  # labels, classes or indices this library could not have written
                raise UnavailableError(redact(str(error))) from None
            except Exception as error:  # missing artifact, unreachable store
                raise UnavailableError(redact(f"run {run_id} has no readable {naming.PREDICTIONS_ARTIFACT}: "
                                              f"{type(error).__name__}: {error}")) from None
            self._predictions[run_id] = frame.sort_values(INDEX_COLUMN).reset_index(drop=True)
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

    def activations(self, image: np.ndarray, run_id: str | None, max_channels: int) -> dict:
        """Each conv layer's ``max_channels`` most active feature maps of one run on a 28x28 image.

        Channels are ranked by mean activation; each map is scaled so its maximum is 255.
        """
        run_id, explainer = self._single_model_explainer(run_id)
        predicted_class, activations = explainer.activations(image)
        layers = []
        for activation in activations:
            maps = activation.maps
            strength = maps.mean(axis=(0, 1))
            channels = []
            for channel in np.argsort(-strength, kind="stable")[:max_channels]:
                channel_map = maps[:, :, channel]
                peak = float(channel_map.max())
                channels.append({"channel": int(channel), "mean": float(strength[channel]), "max": peak,
                                 "map": quantized(channel_map / peak if peak > 0 else channel_map)})
            layers.append({"layer": activation.layer, "shape": list(maps.shape), "channels": channels})
        return {"run_id": run_id, "predicted_class": predicted_class, "layers": layers}

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
                raise UnavailableError(redact(str(error))) from None
            except Exception as error:  # the tracking server failed the request
                raise UnavailableError(redact(f"cannot read run {run.run_id} from the tracking store: "
                                              f"{type(error).__name__}: {error}")) from None
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
        """The run's confusion matrix on the test set (rows: true label), from its logged predictions."""
        run = self.run(run_id)
        frame = self.predictions(run.run_id)
        matrix = np.zeros((NUM_CLASSES, NUM_CLASSES), dtype=np.int64)
        np.add.at(matrix, (frame[LABEL_COLUMN].to_numpy(), frame[PREDICTED_COLUMN].to_numpy()), 1)
        return {"run_id": run.run_id, "matrix": matrix.tolist(), "total": int(matrix.sum()),
                "accuracy": float(np.trace(matrix) / max(1, matrix.sum()))}

    def examples(self, run_id: str | None, label: int | None, predicted: int | None, sort: str,
                 limit: int, offset: int) -> dict:
        """Test images of one confusion-matrix cell (or row/column) with the run's probabilities."""
        run = self.run(run_id)
        frame = self.predictions(run.run_id)
        images, labels = self.test_set()
        if (len(frame) != len(labels) or frame[INDEX_COLUMN].max() >= len(labels)
                or not np.array_equal(frame[LABEL_COLUMN].to_numpy(), labels[frame[INDEX_COLUMN]])):
            raise UnavailableError(
                f"run {run.run_id}'s logged test predictions do not match the MNIST test labels of "
                f"{self.data_dir or 'the default MNIST'}; point --data-dir at the MNIST the run was trained on."
            )
        probabilities = frame[PROBABILITY_COLUMNS].to_numpy()
        test_indices = frame[INDEX_COLUMN].to_numpy()
        true_labels, predicted_classes = frame[LABEL_COLUMN].to_numpy(), frame[PREDICTED_COLUMN].to_numpy()
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
                    "index": int(test_indices[row]),
                    "label": int(true_labels[row]),
                    "predicted": int(predicted_classes[row]),
                    "confidence": float(confidence[row]),
                    "true_probability": float(true_probability[row]),
                    "probabilities": [round(float(p), 6) for p in probabilities[row]],
                    # 0-255 integers: a third the size of floats in JSON, and exactly MNIST's pixels.
                    "image": np.rint(images[test_indices[row]] * 255).astype(int).tolist(),
                }
                for row in chosen[offset:offset + limit]
            ],
        }


def open_explorer(*, study: str | None = None, run_ids: list[str] | None = None, all_runs: bool = False,
                  tracking_uri: str | None = None, data_dir: str | None = None,
                  mlflow_ui_url: str = naming.DEFAULT_MLFLOW_UI_URL) -> ModelExplorer:
    """Resolve the tracking store and the runs to offer, and load the default model (failing now, not later).

    A default model the loader refuses (see ``ModelExplorer.model``) does not stop the server: it is listed
    in ``explorer.refused`` and its run answers 503 with the reason; the other runs stay usable.
    """
    from .tracking import use_tracking_uri

    if (study is None) == (not run_ids):
        raise ExplorerError("pass either a study or one or more run ids.")
    use_tracking_uri(tracking_uri)
    runs = study_runs_to_offer(study, best_per_arm=not all_runs) if study else runs_by_id(run_ids)
    explorer = ModelExplorer(runs, data_dir=data_dir, mlflow_ui_url=mlflow_ui_url)
    try:
        explorer.model(explorer.default_run_id)
    except UnavailableError:
        if explorer.default_run_id not in explorer.refused:
            raise  # the store or the model is unreachable: fail now, not at the first request
    return explorer
