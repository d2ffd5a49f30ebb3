"""The sweep: one cell type, the plan (cells, digest, reuse, the precision rule's next round) and the one rule for
which run of a cell counts, checked pure and against a real tracking store (no training)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from mnist_ablation import stats, sweep
from mnist_ablation.errors import StudyError
from mnist_ablation.studies import STUDIES

CHECKSUMS = {"train": "a", "test": "b"}


def _plan(study="leave-one-out", arms=None, seeds=(0, 1), epochs=2, precision=None) -> sweep.Plan:
    definition = STUDIES[study]
    arms = arms or list(definition.arms)
    return sweep.Plan(definition, {arm: definition.arms[arm].replace(epochs=epochs) for arm in arms}, seeds,
                      CHECKSUMS, precision)


def test_a_plan_names_its_cells_and_a_digest_that_follows_them():
    plan = _plan(arms=["baseline", "no_dropout"])
    assert [c.key for c in plan.initial_cells] == ["baseline-seed0", "baseline-seed1", "no_dropout-seed0",
                                                   "no_dropout-seed1"]
    assert plan.initial_cells[0].config_hash == plan.config_of("baseline", 0).hash(CHECKSUMS)
    assert plan.owns(plan.cell("no_dropout", 5)) and not plan.owns(sweep.Cell("no_dropout", 5, "other"))
    assert plan.digest == _plan(arms=["baseline", "no_dropout"]).digest
    assert plan.digest != _plan(arms=["baseline", "no_dropout"], epochs=3).digest
    rule = sweep.PrecisionRule(0.01, 4)
    assert plan.digest != _plan(arms=["baseline", "no_dropout"], precision=rule).digest
    definition = plan.definition(plan.initial_cells, ["python", "-m", "experiments.ablate"], "here")
    assert [c["seed"] for c in definition["cells"]] == [0, 1, 0, 1] and definition["precision"] is None


def test_identical_arms_train_once_a_factorial_quick_trains_16_of_32_cells():
    plan = _plan("factorial", epochs=2)  # the step schedule never steps in 2 epochs
    cells = plan.with_sources(plan.initial_cells)
    training = [c for c in cells if plan.source_of(c) is None]
    assert len(cells) == 32 and len(training) == 16
    assert plan.source_of(plan.cell("constant_lr", 1)) == plan.cell("baseline", 1)
    # The cells that train come first, so the queue hands them out before the cells that reuse them.
    assert cells[:16] == training
    # A cell that reuses another brings that cell into the plan.
    only = plan.with_sources([plan.cell("no_dropout+constant_lr", 3)])
    assert [c.key for c in only] == ["no_dropout-seed3", "no_dropout+constant_lr-seed3"]
    assert _plan("factorial", epochs=15).source_arm == {}


def test_flag_values_are_checked_where_the_library_receives_them():
    with pytest.raises(StudyError, match=r"expected a fraction in \(0, 1\)"):
        sweep.PrecisionRule.from_options(2.0)
    with pytest.raises(StudyError, match="--max-seeds needs --target-ci-width"):
        sweep.PrecisionRule.from_options(None, 5)
    with pytest.raises(StudyError, match="expected an integer >= 2"):
        sweep.PrecisionRule(0.01, 1)
    assert sweep.PrecisionRule.from_options(0.01).max_seeds == sweep.DEFAULT_MAX_SEEDS
    assert sweep.PrecisionRule.from_options(None) is None
    with pytest.raises(StudyError, match="at least the 3 first seeds"):
        _plan(seeds=range(3), precision=sweep.PrecisionRule(0.01, 2))
    with pytest.raises(StudyError, match="at least one seed"):
        _plan(seeds=range(0))


def _correct(arms: dict[str, float], seeds, n_images=3000, seed=0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    frames = [pd.DataFrame({"arm": arm, "seed": s, "image": np.arange(n_images),
                            "correct": rng.random(n_images) < accuracy})
              for arm, accuracy in arms.items() for s in seeds]
    return pd.concat(frames, ignore_index=True)


def test_the_precision_rule_is_a_pure_function_of_the_results_and_one_stats_call():
    rule = sweep.PrecisionRule(0.0001, 4)  # narrower than any interval: every arm stays open until max seeds
    plan = _plan(arms=["baseline", "no_dropout", "no_batch_norm"], precision=rule)
    planned = plan.initial_cells
    correct = _correct({"baseline": 0.98, "no_dropout": 0.97, "no_batch_norm": 0.95}, (0, 1))
    decided = plan.next_round(planned, correct)
    # The decision is stats.precision_stop_reason's (Stein's rule on the first stage: the plan's 2 first seeds), at
    # the rule's values, with the attempted seeds.
    assert plan.precision.first_stage_seeds == 2
    stages = stats.first_stage_contrasts(correct, 2, "baseline")
    expected = {arm: stats.precision_stop_reason(stage, 2, rule.target_ci_width, rule.max_seeds, rule.confidence)
                for arm, stage in stages.items()}
    assert {arm: d.stop_reason for arm, d in decided.decisions.items()} == expected
    assert decided.open_arms == [arm for arm, reason in expected.items() if reason is None] != []
    assert [c.key for c in decided.additions] == [key for arm in decided.open_arms
                                                  for key in (f"{arm}-seed2", "baseline-seed2")][:3 if len(
                                                      decided.open_arms) > 1 else 2]
    # At the maximum, nothing is added; without a finished baseline, nothing either.
    at_max = [*planned, *[plan.cell(a, s) for a in plan.configs for s in (2, 3)]]
    assert plan.next_round(at_max, correct).additions == []
    assert plan.next_round(planned, correct[correct["arm"] != "baseline"]).additions == []


def _runs() -> pd.DataFrame:
    """A study's runs: a cell run twice (the later counts), a FAILED cell, a cell FINISHED without an accuracy,
    one still RUNNING."""
    rows = [
        ("baseline", 0, "FINISHED", 0.90, 1), ("baseline", 1, "FINISHED", 0.50, 2),
        ("baseline", 1, "FINISHED", 0.92, 9),
        ("no_dropout", 0, "FINISHED", 0.80, 3), ("no_dropout", 1, "FAILED", np.nan, 4),
        ("no_dropout", 2, "KILLED", np.nan, 5), ("no_dropout", 2, "RUNNING", np.nan, 10),
        ("no_batch_norm", 0, "FINISHED", 0.70, 6), ("no_batch_norm", 1, "FINISHED", np.nan, 7),
    ]
    return pd.DataFrame([{"arm": a, "seed": s, "status": st, "test_accuracy": acc, "start_time": t,
                          "run_id": f"{a}-{s}-{t}"} for a, s, st, acc, t in rows])


def test_one_rule_for_which_run_of_a_cell_counts_and_which_cells_failed():
    counted = sweep.usable_runs(_runs())
    assert list(zip(counted.usable["arm"], counted.usable["seed"])) == [
        ("baseline", 0), ("baseline", 1), ("no_dropout", 0), ("no_batch_norm", 0)]
    assert counted.usable.set_index(["arm", "seed"]).loc[("baseline", 1), "test_accuracy"] == 0.92
    assert list(counted.unusable["run_id"]) == ["no_batch_norm-1-7"]
    failures = sweep.failure_counts(_runs()).set_index("arm")
    assert failures.loc["no_dropout"].tolist() == [1, 1] and failures.loc["no_batch_norm"].tolist() == [1, 0]
    assert failures.loc["baseline"].tolist() == [0, 0]
    summary = sweep.study_summary(_runs()).set_index("arm")
    assert summary.loc["baseline", "n"] == 2 and summary.loc["baseline", "test_accuracy_mean"] == pytest.approx(0.91)
    assert summary.loc["no_dropout", "n_failed"] == 1 and summary.loc["no_batch_norm", "n_failed"] == 1
    from mnist_ablation import compare

    assert compare.arm_summary(_runs()).equals(sweep.arm_summary(counted.usable))


def test_predictions_have_one_schema():
    probabilities = np.eye(10, dtype=np.float32)[[3, 1, 4]]
    frame = sweep.predictions_frame(np.array([3, 1, 5]), probabilities)
    assert list(frame.columns) == sweep.PREDICTION_COLUMNS == ["index", "label", "predicted",
                                                               *[f"prob_{k}" for k in range(10)]]
    assert frame["predicted"].tolist() == [3, 1, 4] and frame["index"].tolist() == [0, 1, 2]


# -- summary.csv and ablation_summary.csv agree on the same study ---------------------------------------------

def _log_cell(client, experiment_id, parent, plan, arm, seed, status, correct, labels, start, tmp_path):
    from mnist_ablation import naming

    cell = plan.cell(arm, seed)
    run = client.create_run(experiment_id, run_name=cell.key, start_time=start, tags={
        naming.ROLE_TAG: naming.CELL_ROLE, naming.STUDY_TAG: plan.study.name, naming.ARM_TAG: arm,
        naming.SEED_TAG: str(seed), naming.CONFIG_HASH_TAG: cell.config_hash, naming.PARENT_RUN_TAG: parent})
    if correct is not None:
        predicted = np.where(correct, labels, (labels + 1) % 10)
        path = tmp_path / run.info.run_id / "test_predictions.parquet"
        path.parent.mkdir()
        sweep.predictions_frame(labels, np.eye(10, dtype=np.float32)[predicted]).to_parquet(path, index=False)
        client.log_artifact(run.info.run_id, str(path), "predictions")
        client.log_metric(run.info.run_id, "test_accuracy", float(np.mean(correct)))
    client.set_terminated(run.info.run_id, status, end_time=start + 1)
    return run.info.run_id


def test_summary_csv_and_the_report_count_the_same_runs(tmp_path, tracking_uri):
    import io

    from mlflow.tracking import MlflowClient

    from mnist_ablation import compare, naming, tracking
    from mnist_ablation.ablation import StudyRunner
    from mnist_ablation.report import ablation_summary

    plan = _plan(arms=["baseline", "no_dropout", "no_batch_norm"], seeds=(0, 1, 2))
    data = SimpleNamespace(source="nowhere", checksums=CHECKSUMS)
    runner = StudyRunner(plan, data, tracking_uri, f"sqlite:///{tmp_path / 'optuna.db'}")
    runner.publish_definition(plan.initial_cells)
    client = MlflowClient()
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 10, 400)
    start = 1_700_000_000_000
    for arm, accuracy in (("baseline", 0.95), ("no_dropout", 0.9), ("no_batch_norm", 0.8)):
        for seed in (0, 1, 2):
            start += 10
            status, correct = "FINISHED", rng.random(400) < accuracy
            if arm == "baseline" and seed == 1:  # run twice: an earlier run that must not count
                _log_cell(client, runner.experiment_id, runner.parent_run_id, plan, arm, seed, "FINISHED",
                          rng.random(400) < 0.3, labels, start - 5, tmp_path)
            if arm == "no_dropout" and seed == 2:
                status, correct = "FAILED", None
            _log_cell(client, runner.experiment_id, runner.parent_run_id, plan, arm, seed, status, correct, labels,
                      start, tmp_path)
    summary = compare.study_summary(plan.study.name, plan.baseline)  # what ablate writes as summary.csv
    tracking.log_study_summary(runner.parent_run_id, summary)
    summary = summary.set_index("arm")
    logged = client.download_artifacts(runner.parent_run_id, naming.SUMMARY_ARTIFACT, str(tmp_path))
    assert pd.read_csv(logged).set_index("arm").equals(pd.read_csv(io.StringIO(summary.reset_index().to_csv(
        index=False))).set_index("arm"))
    report = ablation_summary(plan.study.name, tracking_uri=tracking_uri).set_index("arm")  # ablation_summary.csv
    assert summary["n"].to_dict() == report["n_seeds"].to_dict() == {"baseline": 3, "no_dropout": 2,
                                                                      "no_batch_norm": 3}
    assert summary["n_failed"].to_dict() == report["n_failed"].to_dict() == {"baseline": 0, "no_dropout": 1,
                                                                              "no_batch_norm": 0}
    for arm in summary.index:  # the same runs: the report's per-image accuracy is the runs' mean accuracy
        assert report.loc[arm, "test_accuracy_mean"] == pytest.approx(summary.loc[arm, "test_accuracy_mean"])
    parent = client.get_run(runner.parent_run_id)
    assert parent.info.status == "FINISHED"
    assert parent.data.metrics["n/baseline"] == 3 and parent.data.metrics["n_failed/no_dropout"] == 1
    assert compare.study_summary(plan.study.name).equals(summary.reset_index())  # the study's own baseline


def test_cells_that_reuse_a_run_read_the_store_once_per_round_and_once_per_import(tmp_path, tracking_uri,
                                                                                monkeypatch):
    # constant_lr trains what baseline trains at 2 epochs, so its cells reuse the baseline's runs. Those are in the
    # store already: the worker's round and the import only log reusing runs (no training).
    from mlflow.tracking import MlflowClient

    from mnist_ablation import naming, store
    from mnist_ablation.ablation import StudyRunner
    from mnist_ablation.offline_import import import_offline

    client = MlflowClient()
    data = SimpleNamespace(source="nowhere", checksums=CHECKSUMS)
    labels = np.random.default_rng(0).integers(0, 10, 100)
    cell_runs, queries = store.cell_runs, []

    def counted_cell_runs(*args, **kwargs):
        queries.append(args)
        return cell_runs(*args, **kwargs)

    monkeypatch.setattr(store, "cell_runs", counted_cell_runs)
    for seeds, route in (((0, 1, 2), "worker"), ((3, 4, 5), "import")):
        plan = _plan(arms=["baseline", "constant_lr"], seeds=seeds)
        runner = StudyRunner(plan, data, tracking_uri, f"sqlite:///{tmp_path / 'optuna.db'}")
        for seed in seeds:
            source = _log_cell(client, runner.experiment_id, runner.parent_run_id, plan, "baseline", seed, "FINISHED",
                               labels >= 0, labels, 1_700_000_000_000 + seed, tmp_path)
            client.log_dict(source, {"machine": {}}, naming.ENVIRONMENT_ARTIFACT)  # a reusing run copies these
            client.log_metric(source, "val_accuracy", 0.99)
        queries.clear()
        if route == "worker":
            outcome = runner.run_worker()
            assert (outcome.reused, outcome.ran, outcome.failed) == (3, 0, 0)
        else:
            assert import_offline(runner, tmp_path / "no-offline-cells") == (3, 0, [])
        assert len(queries) == 1, f"{route}: {len(queries)} reads of the study's cell runs for 3 reusing cells"
    runs = cell_runs(plan.study.name, all_sweeps=True).set_index("run_name")
    for seed in range(6):
        assert runs.loc[f"constant_lr-seed{seed}", "reuses_run"] == runs.loc[f"baseline-seed{seed}", "run_id"]
        assert runs.loc[f"constant_lr-seed{seed}", "test_accuracy"] == 1.0
