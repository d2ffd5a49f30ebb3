"""Every query of the tracking store: runs, studies, ensembles, tuning runs, histories, predictions, models and
queue rounds, by the names of ``naming`` (the naming scheme, kept import-light there).

Writing runs is ``tracking``'s job; this module reads. With ``tracking`` it is the only library module
that imports MLflow.
"""

from __future__ import annotations

import json
import zipfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import PurePosixPath

import mlflow
import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from .config import FIELD_NAMES, ConfigError, parse_value
from .data import NUM_CLASSES
from .errors import StoreDataError, StudyError
from .naming import (
    ABLATION_EXPERIMENT_PREFIX,
    ARM_TAG,
    CELL_ROLE,
    CONFIG_HASH_TAG,
    ENSEMBLE_ROLE,
    FAILURE_REASON_TAG,
    MEMBER_RUN_IDS_TAG,
    MODEL_NAME,
    PREDICTIONS_ARTIFACT,
    RECORDED_DEFINITION_KEY,
    REUSES_RUN_TAG,
    ROLE_TAG,
    RUN_ID_ATTR,
    RUN_NAME_TAG,
    SEED_TAG,
    STUDY_DEFINITION_ARTIFACT,
    STUDY_ROLE,
    STUDY_TAG,
    SWEEP_TAG,
    TRIAL_ROLE,
    ablation_experiment,
    is_queue_round,
    tuning_experiment,
)
from .registry import UnknownNameError
from .studies import STUDIES, DefinitionError, Study, study_from_definition
from .sweep import INDEX_COLUMN, LABEL_COLUMN, PREDICTED_COLUMN, PREDICTION_COLUMNS, PROBABILITY_COLUMNS

# -- queries ----------------------------------------------------------------------------------------------

HISTORY_METRICS = ("loss", "accuracy", "val_loss", "val_accuracy", "learning_rate")
MAX_RESULTS = 50_000


def _quoted(value: str) -> str:
    """A value for an MLflow filter string (single quotes escaped)."""
    return "'" + str(value).replace("'", "\\'") + "'"


# -- experiments and parent runs -------------------------------------------------------------------------


def experiment_id(name: str) -> str | None:
    experiment = MlflowClient().get_experiment_by_name(name)
    return None if experiment is None else experiment.experiment_id


def ablation_studies() -> list[str]:
    """The ablation studies that have an experiment in the active store."""
    return sorted(e.name[len(ABLATION_EXPERIMENT_PREFIX):] for e in MlflowClient().search_experiments()
                  if e.name.startswith(ABLATION_EXPERIMENT_PREFIX))


def find_parent_run(study: str, experiment: str | None = None, sweep: str | None = None):
    """The parent run of the study's latest sweep (or of ``sweep``), or None. ``experiment``: its id if known.

    Each sweep (a study at one set of arms, configs, seeds and seeding rule) has its own parent run; running
    the same command again reuses it.
    """
    experiment = experiment or experiment_id(ablation_experiment(study))
    if experiment is None:
        return None
    clauses = [f"tags.`{ROLE_TAG}` = '{STUDY_ROLE}'", f"tags.{STUDY_TAG} = {_quoted(study)}"]
    if sweep is not None:
        clauses.append(f"tags.`{SWEEP_TAG}` = {_quoted(sweep)}")
    runs = MlflowClient().search_runs([experiment], filter_string=" and ".join(clauses),
                                      order_by=["attributes.start_time DESC"], max_results=1)
    return runs[0] if runs else None


def read_json_artifact(run_id: str, path: str) -> dict | None:
    """A JSON artifact of a run, or None when the run has none at ``path``."""
    if not has_artifact(run_id, path):
        return None
    local = mlflow.artifacts.download_artifacts(run_id=artifact_run(run_id, path), artifact_path=path)
    with open(local) as handle:
        return json.load(handle)


def _logged(run_id: str, path: str) -> bool:
    directory = path.rsplit("/", 1)[0] if "/" in path else None
    return path in {f.path for f in MlflowClient().list_artifacts(run_id, directory)}


def reused_run(run_id: str) -> str | None:
    """The run whose training ``run_id`` reuses (tag ``mnist_ablation.reuses_run``), or None."""
    return MlflowClient().get_run(run_id).data.tags.get(REUSES_RUN_TAG)


def artifact_run(run_id: str, path: str) -> str:
    """The run that holds ``run_id``'s file at ``path``: itself, or for a cell that reuses another cell's
    training run (identical arms), that run (its predictions, model and figures)."""
    if _logged(run_id, path):
        return run_id
    return reused_run(run_id) or run_id


def has_artifact(run_id: str, path: str) -> bool:
    """Whether the run logged a file at ``path`` (e.g. ``predictions/test_predictions_tta.parquet``), itself or
    through the run it reuses."""
    return _logged(artifact_run(run_id, path), path)


def study_definition(study: str) -> dict | None:
    """The ``study.json`` of the study's latest invocation (arms, seeds, config hashes), if any."""
    parent = find_parent_run(study)
    return None if parent is None else read_json_artifact(parent.info.run_id, STUDY_DEFINITION_ARTIFACT)


def get_study(name: str) -> Study:
    """The study called ``name``: a built-in one, else the definition a study of that name recorded in the
    tracking store (a study run from a ``--study-file``), so later commands need no file.

    An unknown name raises UnknownNameError listing the built-in ones.
    """
    if name in STUDIES:
        return STUDIES[name]
    recorded = (study_definition(name) or {}).get(RECORDED_DEFINITION_KEY)
    if not recorded:
        raise UnknownNameError(f"{STUDIES.unknown_message(name)} Nor has the tracking store "
                               f"{redacted_tracking_uri()} a study {name!r} from a study file; to run a "
                               "study of your own, pass --study-file FILE (docs/studies.md).")
    try:
        return study_from_definition(recorded)
    except DefinitionError as error:
        at = ".".join(error.key) or "its top level"
        raise StudyError(f"the definition of study {name!r} recorded in the tracking store is not usable (at {at}): "
                         f"{error} Rerun the study with --study-file FILE to record a good one.") from None


# -- cell runs as pandas ---------------------------------------------------------------------------------

CELL_COLUMNS = ["study", "arm", "seed", "run_id", "run_name", "status", "config_hash", "reuses_run"]


def _typed_param(name: str, text):
    if text is None or (isinstance(text, float) and np.isnan(text)):
        return None
    try:
        return parse_value(name, str(text))
    except ConfigError:
        return text


def _column(raw: pd.DataFrame, name: str) -> pd.Series:
    return raw[name] if name in raw else pd.Series([None] * len(raw), index=raw.index, dtype=object)


def search_role(experiment: str, role: str, status: str | None = None) -> pd.DataFrame:
    """``mlflow.search_runs`` of one experiment's runs with ``role`` (and ``status``); empty if none."""
    experiment_ = experiment_id(experiment)
    if experiment_ is None:
        return pd.DataFrame()
    clauses = [f"tags.`{ROLE_TAG}` = '{role}'"] + ([f"attributes.status = '{status}'"] if status else [])
    return mlflow.search_runs([experiment_], filter_string=" and ".join(clauses), max_results=MAX_RESULTS,
                              order_by=["attributes.start_time ASC"])


def _checked_cell_tags(raw: pd.DataFrame, study: str) -> pd.DataFrame:
    """``raw`` (cell runs) if every run has an arm tag and a whole-number seed tag; else StoreDataError naming
    the first run that does not (a run written by hand or by another tool)."""
    arms, seeds = _column(raw, f"tags.{ARM_TAG}"), _column(raw, f"tags.{SEED_TAG}")
    for run_id, arm, seed in zip(raw["run_id"], arms, seeds, strict=True):
        problem = None
        if not isinstance(arm, str) or not arm:
            problem = f"has no {ARM_TAG!r} tag"
        elif not isinstance(seed, str) or not seed.isdigit():
            problem = f"has the {SEED_TAG!r} tag {seed!r}, not a whole number"
        if problem:
            raise StoreDataError(
                f"cell run {run_id} of study {study!r} {problem}; every cell run needs its arm and seed. Fix the tag "
                f"(MlflowClient().set_tag) or delete the run (mlflow runs delete --run-id {run_id}).")
    return raw


def cell_runs(study: str, include_unfinished: bool = False, all_sweeps: bool = False) -> pd.DataFrame:
    """One row per cell run of ``study``: study, arm, seed, run_id, status, config fields, final metrics.

    By default only FINISHED runs of the study's current definition (the config hashes in its
    ``study.json``) are returned; ``all_sweeps`` keeps runs of earlier definitions (say another
    ``--epochs``), ``include_unfinished`` keeps FAILED, KILLED and RUNNING runs. A per-epoch metric named
    like a config field (``learning_rate``) keeps its last value as ``final_<name>``, so the column of that
    name stays the configured value.
    """
    raw = search_role(ablation_experiment(study), CELL_ROLE)
    if raw.empty:
        return pd.DataFrame(columns=CELL_COLUMNS)
    _checked_cell_tags(raw, study)
    frame = pd.DataFrame({
        "study": study,
        "arm": raw[f"tags.{ARM_TAG}"],
        "seed": raw[f"tags.{SEED_TAG}"].astype(int),
        "run_id": raw["run_id"],
        "run_name": _column(raw, f"tags.{RUN_NAME_TAG}"),
        "status": raw["status"],
        "config_hash": raw[f"tags.{CONFIG_HASH_TAG}"],
        "start_time": raw["start_time"],
        "end_time": raw["end_time"],
        "failure_reason": _column(raw, f"tags.{FAILURE_REASON_TAG}"),
        "reuses_run": _column(raw, f"tags.{REUSES_RUN_TAG}"),
    })
    for name in FIELD_NAMES:
        if f"params.{name}" in raw and name != "seed":
            frame[name] = [_typed_param(name, v) for v in raw[f"params.{name}"]]
    for column in sorted(c for c in raw.columns if c.startswith("metrics.")):
        name = column[len("metrics."):]
        frame[f"final_{name}" if name in FIELD_NAMES else name] = raw[column].to_numpy()
    definition = study_definition(study)
    if not all_sweeps and definition is not None:
        frame = frame[frame["config_hash"].isin({c["config_hash"] for c in definition["cells"]})]
    if not include_unfinished:
        frame = frame[frame["status"] == "FINISHED"]
    known = list(dict.fromkeys(c["arm"] for c in definition["cells"])) if definition else []
    order = {arm: i for i, arm in enumerate(known + sorted(set(frame["arm"]) - set(known)))}
    frame = frame.assign(_order=frame["arm"].map(order)).sort_values(["_order", "seed", "start_time"])
    return frame.drop(columns="_order").reset_index(drop=True)


def finished_cells(study: str) -> set[tuple[str, int, str]]:
    """(arm, seed, config_hash) of every FINISHED cell run of ``study``, whatever its definition."""
    raw = search_role(ablation_experiment(study), CELL_ROLE, status="FINISHED")
    if raw.empty:
        return set()
    _checked_cell_tags(raw, study)
    return set(zip(raw[f"tags.{ARM_TAG}"], raw[f"tags.{SEED_TAG}"].astype(int), raw[f"tags.{CONFIG_HASH_TAG}"]))


def ensemble_runs(study: str, include_unfinished: bool = False) -> pd.DataFrame:
    """One row per ensemble run of ``study``: run_id, run_name, arm, seed, member_run_ids, metrics."""
    columns = ["study", "arm", "seed", "run_id", "run_name", "status", MEMBER_RUN_IDS_TAG]
    raw = search_role(ablation_experiment(study), ENSEMBLE_ROLE)
    if raw.empty:
        return pd.DataFrame(columns=columns)
    frame = pd.DataFrame({
        "study": study,
        "arm": raw[f"tags.{ARM_TAG}"],
        "seed": pd.to_numeric(_column(raw, f"tags.{SEED_TAG}"), errors="coerce").astype("Int64"),
        "run_id": raw["run_id"],
        "run_name": _column(raw, f"tags.{RUN_NAME_TAG}"),
        "status": raw["status"],
        MEMBER_RUN_IDS_TAG: raw[f"tags.{MEMBER_RUN_IDS_TAG}"],
    })
    for column in sorted(c for c in raw.columns if c.startswith("metrics.")):
        frame[column[len("metrics."):]] = raw[column].to_numpy()
    if not include_unfinished:
        frame = frame[frame["status"] == "FINISHED"]
    return frame.reset_index(drop=True)


def tuning_runs(study_name: str, role: str = TRIAL_ROLE, finished_only: bool = False) -> pd.DataFrame:
    """``mlflow.search_runs`` rows of a tuning study's runs with ``role`` (trial or best_retrain)."""
    return search_role(tuning_experiment(study_name), role, status="FINISHED" if finished_only else None)


# -- single runs -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RunRecord:
    """What the store knows of one run: identity, status, tags, params and final metrics."""

    run_id: str
    run_name: str
    experiment_id: str
    status: str
    tags: dict
    params: dict
    metrics: dict


def run_record(run_id: str) -> RunRecord:
    """The run ``run_id``; an unknown id raises LookupError naming the store."""
    client = MlflowClient()
    try:
        run = client.get_run(run_id)
    except MlflowException as error:
        raise LookupError(
            f"run {run_id!r} is not in the tracking store {redacted_tracking_uri()} "
            f"({error.message.splitlines()[0]}). Check the id (the MLflow UI shows it) or pass --tracking-uri."
        ) from None
    tags = dict(run.data.tags)
    return RunRecord(run_id, tags.get(RUN_NAME_TAG, run_id), run.info.experiment_id, run.info.status, tags,
                     dict(run.data.params), dict(run.data.metrics))


def run_exists(run_id: str) -> bool:
    try:
        run_record(run_id)
    except LookupError:
        return False
    return True


def metric_history(run_id: str, metrics: Iterable[str] = HISTORY_METRICS) -> pd.DataFrame:
    """Per-epoch metrics of one run: one row per epoch (step), a column per metric; resumed epochs once."""
    client = MlflowClient()
    per_epoch: dict[int, dict] = {}
    for metric in metrics:
        for point in sorted(client.get_metric_history(run_id, metric), key=lambda m: (m.step, m.timestamp)):
            per_epoch.setdefault(point.step, {})[metric] = point.value
    frame = pd.DataFrame([{"epoch": epoch, **values} for epoch, values in sorted(per_epoch.items())],
                         columns=["epoch", *metrics])
    return frame


def metric_histories(runs: pd.DataFrame, metrics: Iterable[str] = HISTORY_METRICS) -> pd.DataFrame:
    """``metric_history`` of every run in ``runs`` (columns run_id, arm, seed), stacked."""
    metrics = tuple(metrics)
    frames = [metric_history(row.run_id, metrics).assign(run_id=row.run_id, arm=row.arm, seed=row.seed)
              for row in runs.itertuples()]
    columns = ["run_id", "arm", "seed", "epoch", *metrics]
    if not frames:
        return pd.DataFrame(columns=columns)
    return pd.concat(frames, ignore_index=True)[columns].sort_values(["run_id", "epoch"]).reset_index(drop=True)


def last_activity_ms(run) -> int:
    """Epoch milliseconds of ``run``'s (an MLflow Run) latest logged metric, or its start when it logged none."""
    client = MlflowClient()
    latest = run.info.start_time or 0
    for key in run.data.metrics:
        for metric in client.get_metric_history(run.info.run_id, key)[-1:]:
            latest = max(latest, metric.timestamp)
    return latest


MODEL_INPUT_SHAPE = (None, 28, 28, 1)
MODEL_OUTPUT_SHAPE = (None, NUM_CLASSES)
KERAS_MODEL_FILE = "model.keras"  # in the Keras flavor's data directory (MLflow's layout)


def read_predictions(run_id: str, artifact: str = PREDICTIONS_ARTIFACT) -> pd.DataFrame:
    """The per-example test predictions a run logged (``sweep.PREDICTION_COLUMNS``), or those of the run it
    reuses, checked.

    A frame this library could not have written (a missing column, a label or class outside 0..9, a
    negative or repeated index, a probability that is not a number in [0, 1]) raises StoreDataError.
    """
    return _read_parquet(artifact_run(run_id, artifact), artifact)


def _read_parquet(run_id: str, artifact: str) -> pd.DataFrame:
    path = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=artifact)
    return checked_predictions(pd.read_parquet(path), f"run {run_id}'s {artifact}")


def checked_predictions(frame: pd.DataFrame, what: str) -> pd.DataFrame:
    """``frame`` if it is a predictions table of ``NUM_CLASSES`` classes; else StoreDataError naming ``what``."""
    missing = [column for column in PREDICTION_COLUMNS if column not in frame]
    if missing:
        raise StoreDataError(f"{what} lacks the columns {', '.join(missing)} (a model of another number of classes, "
                             f"or not written by mnist_ablation); expected {', '.join(PREDICTION_COLUMNS)}.")
    for column in (INDEX_COLUMN, LABEL_COLUMN, PREDICTED_COLUMN):
        values = frame[column]
        if not pd.api.types.is_integer_dtype(values):
            raise StoreDataError(f"{what}: column {column!r} holds {values.dtype} values; expected integers.")
    for column in (LABEL_COLUMN, PREDICTED_COLUMN):
        bad = frame[column][(frame[column] < 0) | (frame[column] >= NUM_CLASSES)]
        if len(bad):
            raise StoreDataError(f"{what}: {column} {int(bad.iloc[0])} is not a class of 0..{NUM_CLASSES - 1}.")
    if (frame[INDEX_COLUMN] < 0).any() or frame[INDEX_COLUMN].duplicated().any():
        raise StoreDataError(f"{what}: the test image indices must be distinct and not negative.")
    probabilities = frame[list(PROBABILITY_COLUMNS)].to_numpy(np.float64)
    if not np.all(np.isfinite(probabilities)) or probabilities.min(initial=0) < 0 or probabilities.max(initial=0) > 1:
        raise StoreDataError(f"{what}: class probabilities must be numbers in [0, 1].")
    return frame


def load_model(run_id: str):
    """The run's logged Keras model (or that of the run it reuses), loaded without running anything the store
    holds; checked before use.

    Only the Keras file (``model/<data>/model.keras``) is read, with Keras' ``safe_mode`` (no Lambda code)
    and ``compile=False``; a TensorFlow SavedModel is never loaded, whatever the ``MLmodel`` file says,
    because loading one runs its initializers. Raises StoreDataError when the model is refused: no Keras
    file, a data path that leaves the model directory, a layer safe mode refuses, an input other than
    (None, 28, 28, 1), an output other than (None, 10), or weights that are not finite numbers.
    """
    import keras
    import yaml

    run_id = reused_run(run_id) or run_id
    where = f"run {run_id}'s model"
    mlmodel = mlflow.artifacts.download_artifacts(f"runs:/{run_id}/{MODEL_NAME}/MLmodel")
    with open(mlmodel) as handle:
        flavor = ((yaml.safe_load(handle) or {}).get("flavors") or {}).get("keras") or {}
    data = str(flavor.get("data", "data"))
    relative = PurePosixPath(data)
    if relative.is_absolute() or ".." in relative.parts or "\\" in data or ":" in data:
        raise StoreDataError(f"{where} is refused: its MLmodel names the data path {data!r}, outside the model "
                             "directory; log the model again with mnist_ablation.")
    try:
        path = mlflow.artifacts.download_artifacts(f"runs:/{run_id}/{MODEL_NAME}/{relative}/{KERAS_MODEL_FILE}")
    except (MlflowException, OSError):
        raise StoreDataError(
            f"{where} is refused: it has no Keras file {MODEL_NAME}/{relative}/{KERAS_MODEL_FILE} (a TensorFlow "
            "SavedModel is never loaded: loading one runs code from the store); log the model with mnist_ablation."
        ) from None
    if not zipfile.is_zipfile(path):
        raise StoreDataError(f"{where} is refused: {KERAS_MODEL_FILE} is not a Keras archive.")
    try:
        model = keras.saving.load_model(path, safe_mode=True, compile=False)
    except Exception as error:  # safe mode's refusal, an unknown layer, a corrupt archive
        raise StoreDataError(f"{where} is refused by Keras' safe loading: "
                             f"{type(error).__name__}: {str(error).splitlines()[0][:300]}") from None
    shapes = (tuple(model.input_shape) if not isinstance(model.input_shape, list) else model.input_shape,
              tuple(model.output_shape) if not isinstance(model.output_shape, list) else model.output_shape)
    if shapes != (MODEL_INPUT_SHAPE, MODEL_OUTPUT_SHAPE):
        raise StoreDataError(f"{where} is refused: it maps {shapes[0]} to {shapes[1]}; expected MNIST images "
                             f"{MODEL_INPUT_SHAPE} to {NUM_CLASSES} class probabilities {MODEL_OUTPUT_SHAPE}.")
    if not all(np.all(np.isfinite(weights)) for weights in model.get_weights()):
        raise StoreDataError(f"{where} is refused: its weights hold NaN or infinite values (a diverged run).")
    return model


def all_runs() -> Iterable[tuple[str, object]]:
    """(experiment name, run) for every run of the store."""
    client = MlflowClient()
    for experiment in client.search_experiments():
        for run in client.search_runs([experiment.experiment_id], max_results=MAX_RESULTS):
            yield experiment.name, run


def redacted_tracking_uri() -> str:
    from .redaction import redact

    return redact(mlflow.get_tracking_uri())


# -- queue rounds (Optuna) --------------------------------------------------------------------------------


def queue_rounds(storage) -> list:
    """Every queue round (an Optuna study named ``ablate/...``) in ``storage``, loaded."""
    import optuna

    from .storage import retrying

    return [retrying(lambda name=s.study_name: optuna.load_study(study_name=name, storage=storage))
            for s in retrying(storage.get_all_studies) if is_queue_round(s.study_name)]


def queue_trials_by_run(storage) -> dict[str, list]:
    """MLflow run id -> [(queue round, trial)] for every queue trial that recorded its run."""
    found: dict[str, list] = {}
    for study in queue_rounds(storage):
        for trial in study.get_trials(deepcopy=False):
            run_id = trial.user_attrs.get(RUN_ID_ATTR)
            if run_id:
                found.setdefault(run_id, []).append((study, trial))
    return found


@dataclass
class LoggedPredictions:
    """The logged test predictions of some runs: the shared labels, each run's predictions, and the tidy frame."""

    labels: np.ndarray | None  # None for no runs
    predicted_by_run: dict[str, np.ndarray]
    correct: pd.DataFrame  # arm, seed, image, correct (bool): what ``stats.compare_to_baseline`` takes


def read_test_predictions(runs: pd.DataFrame) -> LoggedPredictions:
    """Read the predictions of ``runs`` (run_id, arm, seed), each sorted by test image.

    Every run must have predicted the same test images with the same labels; a run that did not is a
    ValueError naming it.
    """
    frames, labels, predicted_by_run = [], None, {}
    for row in runs.itertuples():
        reused = getattr(row, "reuses_run", None)
        if "reuses_run" in runs:  # cell_runs read the tag: no query per run
            predictions = _read_parquet(reused if isinstance(reused, str) and reused else row.run_id,
                                        PREDICTIONS_ARTIFACT)
        else:
            predictions = read_predictions(row.run_id)
        predictions = predictions.sort_values(INDEX_COLUMN)
        if labels is None:
            labels = predictions[LABEL_COLUMN].to_numpy()
        elif not np.array_equal(predictions[LABEL_COLUMN].to_numpy(), labels):
            raise ValueError(f"run {row.run_id} ({row.arm}, seed {row.seed}) predicted a different test set from "
                             "the other runs; runs can only be compared on the same test images.")
        predicted = predictions[PREDICTED_COLUMN].to_numpy()
        predicted_by_run[row.run_id] = predicted
        frames.append(pd.DataFrame({"arm": row.arm, "seed": int(row.seed),
                                    "image": predictions[INDEX_COLUMN].to_numpy(), "correct": predicted == labels}))
    if not frames:
        correct = pd.DataFrame({"arm": pd.Series(dtype=object), "seed": pd.Series(dtype=int),
                                "image": pd.Series(dtype=int), "correct": pd.Series(dtype=bool)})
    else:
        correct = pd.concat(frames, ignore_index=True)
    return LoggedPredictions(labels, predicted_by_run, correct)


def prediction_correctness(runs: pd.DataFrame) -> pd.DataFrame:
    """Per run (``runs``: run_id, arm, seed) and test image, whether the logged prediction was right.

    A tidy frame with columns arm, seed, image, correct (bool): what ``stats.compare_to_baseline`` takes.
    Every run must have predicted the same test images with the same labels.
    """
    return read_test_predictions(runs).correct
