"""A study's sweep: its cells, their plan, and which of their runs count. Pure: no MLflow, Optuna or Keras.

A *cell* is one arm of a study at one seed and one config (its hash, data checksums included): the unit the
queue hands out, the offline path trains into a folder, the import logs and the summary counts. A *plan*
(``Plan``) is one study at one set of settings: its arms' configs, first seeds and precision rule; it
names the initial cells and their digest, the cell each cell reuses when two arms are the same training
run, and, under a precision rule, the next round's cells as a pure function of the results so far
(``Plan.next_round``). ``usable_runs`` and ``failure_counts`` are the one rule for which run of a cell
counts and which cells failed: ``summary.csv``, the report, the precision rule and the doctor all read
them. ``study_summary`` is ``summary.csv``'s table and ``summary_metrics`` its numbers on the parent run.
``predictions_frame`` is the one schema of a run's per-image predictions file.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from . import defaults, naming, stats
from .config import TrainConfig, effective_settings
from .data import NUM_CLASSES
from .errors import StudyError
from .studies import Study, identical_arms

DEFAULT_MAX_SEEDS = defaults.MAX_SEEDS
MIN_FIRST_STAGE_SEEDS = 2  # the precision rule's first stage: a seed variance needs two seeds

# -- the cell ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Cell:
    """One unit of work of a study: an arm with one seed, at one config (its hash, data checksums included)."""

    arm: str
    seed: int
    config_hash: str

    @property
    def key(self) -> str:
        """``arm-seed{n}``: the cell's MLflow run name, queue key and offline folder name."""
        return cell_key(self.arm, self.seed)

    @property
    def identity(self) -> tuple[str, int, str]:
        """(arm, seed, config_hash): how a finished run is matched to its cell."""
        return self.arm, self.seed, self.config_hash


def cell_key(arm: str, seed: int) -> str:
    return f"{arm}-seed{seed}"


# -- the precision rule -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class PrecisionRule:
    """Give each arm the seeds that make its difference interval at most ``target_ci_width`` wide (a fraction).

    Stein's two-stage rule (``stats.precision_seeds``): each arm's first ``first_stage_seeds`` paired seeds (the
    sweep's first seeds) decide, once, how many seeds it gets; the final interval keeps the first stage's seed
    variance (``stats.two_stage_estimate``), so stopping cannot select a variance that is small by chance.
    The values are checked here, where the library receives them (``--target-ci-width``, ``--max-seeds``).
    """

    target_ci_width: float
    max_seeds: int = DEFAULT_MAX_SEEDS
    confidence: float = stats.DEFAULT_CONFIDENCE
    first_stage_seeds: int = MIN_FIRST_STAGE_SEEDS

    def __post_init__(self) -> None:
        defaults.check_target_ci_width(self.target_ci_width, "--target-ci-width")
        defaults.check_confidence(self.confidence)
        if isinstance(self.max_seeds, bool) or not isinstance(self.max_seeds, int) or self.max_seeds < 2:
            raise StudyError(f"max seeds {self.max_seeds!r} (--max-seeds): expected an integer >= 2 (an interval "
                             "needs two seeds).")

    @classmethod
    def from_options(cls, target_ci_width: float | None, max_seeds: int | None = None) -> PrecisionRule | None:
        """The rule of ``--target-ci-width`` and ``--max-seeds`` (None without a target; max seeds defaults)."""
        if target_ci_width is None:
            if max_seeds is not None:
                raise StudyError(f"--max-seeds needs --target-ci-width W (the interval width that stops adding "
                                 f"seeds); got --max-seeds {max_seeds} alone: add a target, or drop --max-seeds.")
            return None
        return cls(target_ci_width, DEFAULT_MAX_SEEDS if max_seeds is None else max_seeds)

    def to_dict(self) -> dict:
        return {"target_ci_width": self.target_ci_width, "max_seeds": self.max_seeds, "confidence": self.confidence,
                "first_stage_seeds": self.first_stage_seeds}

    @classmethod
    def from_dict(cls, record: Mapping | None) -> PrecisionRule | None:
        """The rule recorded in a study.json (None when the sweep had none)."""
        if not record:
            return None
        return cls(float(record["target_ci_width"]), int(record["max_seeds"]),
                   float(record.get("confidence", stats.DEFAULT_CONFIDENCE)),
                   int(record.get("first_stage_seeds", MIN_FIRST_STAGE_SEEDS)))

    def decide(self, correct, baseline: str, attempted: Mapping[str, int]) -> dict[str, ArmDecision]:
        """Per compared arm, whether it needs another seed: the statistics' call, with this rule's values.

        ``correct`` is the per-image correctness of the usable runs (``stats.compare_to_baseline``'s input);
        ``attempted`` counts each arm's planned seeds, finished or failed, so a failing arm cannot loop.
        """
        table = stats.precision_decisions(correct, self.first_stage_seeds, self.target_ci_width, self.max_seeds,
                                          baseline=baseline, confidence=self.confidence, n_seeds=dict(attempted))
        return {row.arm: ArmDecision(row.arm, row.stop_reason, row.first_stage_width, row.seeds_target)
                for row in table.itertuples()}


@dataclass(frozen=True)
class ArmDecision:
    arm: str
    stop_reason: str | None  # None: the arm gets the next seed
    ci_width: float  # the first stage's interval width
    seeds_target: float = float("nan")  # the seeds the first stage decided (NaN before it is complete)


@dataclass(frozen=True)
class PrecisionRound:
    """What the precision rule decided after a round: per arm, and the cells to add (none: every arm stopped)."""

    decisions: dict[str, ArmDecision]
    additions: list[Cell]
    description: str = ""  # in words: the arms still open, why, and the cells added

    @property
    def open_arms(self) -> list[str]:
        return [arm for arm, decision in self.decisions.items() if decision.stop_reason is None]


# -- the plan ---------------------------------------------------------------------------------------------


class Plan:
    """One sweep of a study: its arms' configs, first seeds and precision rule, and every cell they imply."""

    def __init__(self, study: Study, configs: Mapping[str, TrainConfig], seeds: Iterable[int],
                 checksums: Mapping[str, str], precision: PrecisionRule | None = None):
        self.study = study
        self.configs = dict(configs)
        self.seeds = list(seeds)
        if not self.seeds or min(self.seeds) < 0:
            raise StudyError(f"seeds {self.seeds}: expected at least one seed, each >= 0 (--seeds 1 or more).")
        if precision is not None and precision.max_seeds < len(self.seeds):
            raise StudyError(f"max seeds {precision.max_seeds} (--max-seeds): expected at least the {len(self.seeds)} "
                             "first seeds (--seeds); raise --max-seeds or lower --seeds.")
        if not self.configs:
            raise StudyError(f"study {study.name!r}: no arms selected; pick some of {', '.join(study.arms)}.")
        self.checksums = dict(checksums)
        # The first seeds are the precision rule's first stage (at least 2: a seed variance needs two).
        self.precision = None if precision is None else dataclasses.replace(
            precision, first_stage_seeds=max(len(self.seeds), MIN_FIRST_STAGE_SEEDS))
        self.identical = identical_arms(self.configs)
        # An arm that trains exactly what an earlier arm of its group trains reuses that arm's runs.
        self.source_arm = {arm: group[0] for group in self.identical for arm in group[1:]}
        self.initial_cells = [self.cell(arm, seed) for arm in self.configs for seed in self.seeds]
        text = "|".join(f"{c.key}:{c.config_hash}" for c in self.initial_cells)
        if precision is not None:
            text += f"|precision:{precision.target_ci_width}:{precision.max_seeds}"
        self.digest = hashlib.sha256(text.encode()).hexdigest()[:12]

    @property
    def baseline(self) -> str:
        return self.study.baseline_arm

    def config_of(self, arm: str, seed: int) -> TrainConfig:
        return self.configs[arm].replace(seed=seed)

    def cell(self, arm: str, seed: int) -> Cell:
        return Cell(arm, seed, self.config_of(arm, seed).hash(self.checksums))

    def owns(self, cell: Cell) -> bool:
        """Whether ``cell`` is a cell of this plan (its arm here, at the config hash this plan gives it)."""
        return cell.arm in self.configs and self.cell(cell.arm, cell.seed).config_hash == cell.config_hash

    # -- identical cells are trained once -------------------------------------------------------------

    def source_of(self, cell: Cell) -> Cell | None:
        """The cell whose run ``cell`` reuses (the same training run, by ``studies.identical_arms``), or None."""
        arm = self.source_arm.get(cell.arm)
        return None if arm is None else self.cell(arm, cell.seed)

    def with_sources(self, cells: Iterable[Cell]) -> list[Cell]:
        """``cells`` and every cell one of them reuses; the cells that train first, then those that reuse."""
        cells = list(cells)
        everything = {c.key: c for c in [*cells, *filter(None, map(self.source_of, cells))]}
        return sorted(everything.values(), key=lambda c: (self.source_of(c) is not None, self._order(c)))

    def _order(self, cell: Cell) -> tuple[int, int]:
        arms = list(self.configs)
        return (arms.index(cell.arm) if cell.arm in arms else len(arms), cell.seed)

    # -- what the sweep records -------------------------------------------------------------------------

    def settings(self, data_source: str) -> dict[str, object]:
        """The sweep's settings, the parent run's params (what the MLflow UI shows for the study)."""
        base = self.configs.get(self.baseline) or next(iter(self.configs.values()))
        shared = {k: v for k, v in effective_settings(base).items()
                  if all(effective_settings(c).get(k) == v for c in self.configs.values())}
        settings = {
            "study": self.study.name,
            "baseline_arm": self.baseline,
            "arms": ",".join(self.configs),
            "seeds": len(self.seeds),
            "epochs": base.epochs,
            "train_subset": base.train_subset,
            "validation": base.validation,
            "data_source": data_source,
            "target_ci_width": self.precision.target_ci_width if self.precision else None,
            "max_seeds": self.precision.max_seeds if self.precision else None,
        }
        for name in ("batch_size", "optimizer", "architecture"):
            if name in shared:
                settings[name] = shared[name]
        return settings

    def definition(self, cells: Sequence[Cell], command: Sequence[str], data_source: str) -> dict:
        """``study.json``: the sweep as run now (arms, seeds, overrides, config hashes, the rule, the command)."""
        cells = sorted({cell.key: cell for cell in cells}.values(), key=self._order)
        return {
            "study": self.study.name,
            "description": self.study.description,
            "baseline_arm": self.baseline,
            "factors": self.study.factors,
            naming.RECORDED_DEFINITION_KEY: self.study.definition,
            "command": list(command),
            "sweep": self.digest,
            "precision": None if self.precision is None else self.precision.to_dict(),
            "identical_arms": self.identical,
            "data": {"source": data_source, "sha256": self.checksums},
            "cells": [{"arm": c.arm, "seed": c.seed, "config_hash": c.config_hash,
                       "config": self.config_of(c.arm, c.seed).to_dict()} for c in cells],
        }

    def param_choices(self) -> dict[str, tuple]:
        """Per queue-trial param, its possible values: arm, seed and the settings that differ between arms."""
        settings = {arm: effective_settings(config) for arm, config in self.configs.items()}
        varying = [k for k in settings[next(iter(settings))]
                   if len({json.dumps(s.get(k), sort_keys=True) for s in settings.values()}) > 1]
        max_seeds = self.precision.max_seeds if self.precision else len(self.seeds)
        choices = {"arm": tuple(self.configs), "seed": tuple(range(max(max_seeds, max(self.seeds) + 1)))}
        for name in varying:
            choices[name] = tuple(dict.fromkeys(_param_value(s.get(name)) for s in settings.values()))
        return choices

    def params_of(self, cell: Cell) -> dict[str, object]:
        """The queue trial's params of ``cell`` (its arm, seed and the settings that vary between arms)."""
        settings = effective_settings(self.config_of(cell.arm, cell.seed))
        return {"arm": cell.arm, "seed": cell.seed,
                **{k: _param_value(settings.get(k)) for k in self.param_choices() if k not in ("arm", "seed")}}

    # -- precision-driven seeding -------------------------------------------------------------------------

    def counted_by_the_rule(self, finished: Iterable[Cell]) -> list[Cell]:
        """The finished cells (of any sweep) that this plan's precision rule counts rather than trains again: its
        arms at its configs, at seeds below its maximum."""
        if self.precision is None:
            return []
        return [cell for cell in finished if self.owns(cell) and cell.seed < self.precision.max_seeds]

    def attempted_seeds(self, planned: Iterable[Cell]) -> dict[str, int]:
        """Per arm, its planned seeds (finished or failed alike)."""
        seeds: dict[str, set[int]] = {arm: set() for arm in self.configs}
        for cell in planned:
            seeds.setdefault(cell.arm, set()).add(cell.seed)
        return {arm: len(found) for arm, found in seeds.items()}

    def next_round(self, planned: Sequence[Cell], correct: pd.DataFrame) -> PrecisionRound:
        """The precision rule's decisions and next cells, a pure function of the planned cells and their results.

        ``correct`` is the per-image correctness (arm, seed, image, correct) of the usable runs of ``planned``.
        Each open arm gets its lowest seed not yet attempted, paired with the baseline's run at that seed.
        """
        if self.precision is None or self.baseline not in set(correct["arm"]):
            return PrecisionRound({}, [])
        decisions = self.precision.decide(correct, self.baseline, self.attempted_seeds(planned))
        round_ = PrecisionRound(decisions, [])
        if not round_.open_arms:
            return round_
        attempted = {arm: {c.seed for c in planned if c.arm == arm} for arm in self.configs}
        next_seed = max(max(seeds) for seeds in attempted.values() if seeds) + 1
        additions = []
        for arm in round_.open_arms:
            seed = min(s for s in range(next_seed + 1) if s not in attempted[arm])
            additions.append(self.cell(arm, seed))
            if seed not in attempted[self.baseline]:
                additions.append(self.cell(self.baseline, seed))
        additions = list({c.key: c for c in additions}.values())
        description = (f"arms still open: {', '.join(round_.open_arms)} (seeds their first stage needs for an "
                       f"interval at most {100 * self.precision.target_ci_width:.2f} points wide); adding "
                       f"{', '.join(c.key for c in additions)}")
        return PrecisionRound(decisions, additions, description)


def _param_value(value):
    return value if isinstance(value, (bool, int, float, str)) or value is None else json.dumps(value)


# -- which run of a cell counts -----------------------------------------------------------------------------

FINISHED, RUNNING = "FINISHED", "RUNNING"
FAILED_STATUSES = ("FAILED", "KILLED", FINISHED)  # a cell's latest run in one of these, and no usable run: failed


@dataclass(frozen=True)
class UsableRuns:
    usable: pd.DataFrame  # one run per (arm, seed): its latest FINISHED run, with a finite test accuracy
    unusable: pd.DataFrame  # cells whose latest FINISHED run has no finite test accuracy (counted as failed)


def _by_start(runs: pd.DataFrame) -> pd.DataFrame:
    return runs.sort_values("start_time", kind="stable") if "start_time" in runs else runs


def usable_runs(runs: pd.DataFrame) -> UsableRuns:
    """The one rule for which run of a cell counts: its latest FINISHED run, if that has a finite test accuracy.

    A cell run twice (a retry, a rerun) counts once; a run that FINISHED with a NaN accuracy (a diverged
    evaluation, say) makes its cell a failed cell, not a result. ``runs``: arm, seed, status, test_accuracy
    (and start_time, to tell the latest), e.g. ``store.cell_runs(..., include_unfinished=True)``.
    """
    runs = runs.reset_index(drop=True)
    if runs.empty:
        return UsableRuns(runs, runs)
    finished = runs[runs["status"] == FINISHED]
    latest = _by_start(finished).drop_duplicates(["arm", "seed"], keep="last").index
    finished = finished[finished.index.isin(latest)]  # in the order given (the study's arm order)
    accuracy = pd.to_numeric(finished.get("test_accuracy", pd.Series(np.nan, index=finished.index)), errors="coerce")
    usable = np.isfinite(accuracy.to_numpy(dtype=float))
    return UsableRuns(finished[usable].reset_index(drop=True), finished[~usable].reset_index(drop=True))


def usable_runs_by_cell(runs: pd.DataFrame) -> dict[tuple[str, int, str], pd.Series]:
    """Each cell's usable run (``usable_runs`` within each config hash), by the cell's identity.

    ``runs``: a study's cell runs of every sweep (``store.cell_runs(..., all_sweeps=True)``), read once to look up
    the runs that cells of identical arms reuse, rather than once per reusing cell.
    """
    found: dict[tuple[str, int, str], pd.Series] = {}
    for config_hash, runs_of_config in runs.groupby("config_hash", sort=False):
        for _, run in usable_runs(runs_of_config).usable.iterrows():
            found[(run["arm"], int(run["seed"]), config_hash)] = run
    return found


def failure_counts(runs: pd.DataFrame, usable: pd.DataFrame | None = None) -> pd.DataFrame:
    """Per arm: ``n_failed`` (cells with no usable run whose latest run failed, was killed or finished without an
    accuracy) and ``n_running`` (cells with no usable run whose latest run is still RUNNING)."""
    columns = ["arm", "n_failed", "n_running"]
    if runs.empty:
        return pd.DataFrame(columns=columns).astype({"n_failed": int, "n_running": int})
    usable = usable_runs(runs).usable if usable is None else usable
    done = set(zip(usable["arm"], usable["seed"])) if len(usable) else set()
    others = runs[[(a, s) not in done for a, s in zip(runs["arm"], runs["seed"])]]
    latest = _by_start(others).drop_duplicates(["arm", "seed"], keep="last")
    arms = list(dict.fromkeys(runs["arm"]))
    failed = latest[latest["status"].isin(FAILED_STATUSES)].groupby("arm").size()
    running = latest[latest["status"] == RUNNING].groupby("arm").size()
    return pd.DataFrame({"arm": arms, "n_failed": [int(failed.get(a, 0)) for a in arms],
                         "n_running": [int(running.get(a, 0)) for a in arms]}, columns=columns)


def arm_summary(runs: pd.DataFrame, baseline: str = "baseline", metric: str = "test_accuracy") -> pd.DataFrame:
    """Per arm, over its usable runs: n, mean and standard deviation of ``metric``, and the difference from the
    baseline's mean (``summary.csv``'s first columns)."""
    columns = ["arm", "n", f"{metric}_mean", f"{metric}_std", "delta_vs_baseline"]
    if "status" in runs:
        runs = usable_runs(runs).usable
    if runs.empty:
        return pd.DataFrame(columns=columns)
    grouped = runs.groupby("arm", sort=False)[metric]
    summary = pd.DataFrame({"n": grouped.count(), f"{metric}_mean": grouped.mean(),
                            f"{metric}_std": grouped.std(ddof=1)}).reset_index()
    base = summary.loc[summary["arm"] == baseline, f"{metric}_mean"]
    summary["delta_vs_baseline"] = summary[f"{metric}_mean"] - (base.iloc[0] if len(base) else np.nan)
    return summary[columns]


def study_summary(runs: pd.DataFrame, baseline: str = "baseline") -> pd.DataFrame:
    """``summary.csv``: ``arm_summary`` of the usable runs and each arm's failed cells (arms with only failures
    too, with n 0). ``runs``: every cell run, any status."""
    usable = usable_runs(runs).usable
    summary = arm_summary(usable, baseline)
    failed = failure_counts(runs, usable)[["arm", "n_failed"]]
    failed = failed[failed["n_failed"] > 0]
    summary = summary.merge(failed, on="arm", how="left")  # left keeps the study's arm order
    only_failed = failed[~failed["arm"].isin(summary["arm"])].assign(n=0)
    summary = pd.concat([summary, only_failed], ignore_index=True) if len(only_failed) else summary
    summary["n_failed"] = summary["n_failed"].fillna(0).astype(int)
    return summary


SUMMARY_METRICS = ("n", "test_accuracy_mean", "test_accuracy_std", "delta_vs_baseline", "n_failed")


def summary_metrics(summary: pd.DataFrame) -> dict[str, float]:
    """``study_summary``'s numbers as the parent run's metrics: ``<column>/<arm>`` (``n/baseline``, ...)."""
    metrics = {}
    for row in summary.itertuples():
        for name in SUMMARY_METRICS:
            value = getattr(row, name, None)
            if value is not None and pd.notna(value):
                metrics[_metric_key(name, row.arm)] = float(value)
    return metrics


def _metric_key(name: str, arm: str) -> str:
    # MLflow metric names allow letters, digits, _ - . / and spaces; factorial arms join removals with "+".
    return f"{name}/{arm.replace('+', '_and_')}"


# -- a run's per-image predictions ---------------------------------------------------------------------------

INDEX_COLUMN, LABEL_COLUMN, PREDICTED_COLUMN = "index", "label", "predicted"
PROBABILITY_COLUMNS = [f"prob_{k}" for k in range(NUM_CLASSES)]
PREDICTION_COLUMNS = [INDEX_COLUMN, LABEL_COLUMN, PREDICTED_COLUMN, *PROBABILITY_COLUMNS]


def predictions_frame(labels: np.ndarray, probabilities: np.ndarray) -> pd.DataFrame:
    """One row per test image: its index, true label, predicted class and one probability per class."""
    probabilities = np.asarray(probabilities)
    frame = pd.DataFrame(probabilities.astype(np.float32), columns=PROBABILITY_COLUMNS)
    frame.insert(0, PREDICTED_COLUMN, probabilities.argmax(axis=1).astype(np.int64))
    frame.insert(0, LABEL_COLUMN, np.asarray(labels).astype(np.int64))
    frame.insert(0, INDEX_COLUMN, np.arange(len(labels), dtype=np.int64))
    return frame
