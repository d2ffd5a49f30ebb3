"""`python -m experiments.ablate` end to end: layout in MLflow, resume, new cells, errors, pandas."""

import mlflow
import optuna
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from mnist_ablation import compare, naming, store

from helpers import command_env, run_module

TINY = ("--train-subset", "200", "--epochs", "1", "--no-report")


def _children(study):
    experiment = MlflowClient().get_experiment_by_name(naming.ablation_experiment(study))
    return mlflow.search_runs([experiment.experiment_id], filter_string="tags.`mnist_ablation.role` = 'cell'")


@pytest.mark.slow
def test_leave_one_out_lands_as_nested_runs_and_reruns_add_nothing(tmp_path, tracking_uri, data_dir):
    env = command_env(tracking_uri, data_dir)
    first = run_module("experiments.ablate", "--seeds", "2", *TINY, env=env, cwd=tmp_path)
    assert "test accuracy per arm" in first.stdout and "no_batch_norm" in first.stdout

    children = _children("leave-one-out")
    assert len(children) == 10 and set(children["status"]) == {"FINISHED"}
    arms = {"baseline", "no_augmentation", "no_batch_norm", "no_dropout", "constant_lr"}
    assert {(a, s) for a, s in zip(children["tags.arm"], children["tags.seed"])} == {(a, s) for a in arms for s in "01"}
    assert set(children["tags.mlflow.runName"]) == {f"{a}-seed{s}" for a in arms for s in (0, 1)}
    assert children["tags.config_hash"].nunique() == 10
    parent = store.find_parent_run("leave-one-out")
    assert set(children["tags.mlflow.parentRunId"]) == {parent.info.run_id}
    assert parent.info.run_name == "leave-one-out" and parent.info.status == "FINISHED"
    assert "switches off exactly one" in parent.data.tags["mlflow.note.content"]
    parent_artifacts = {a.path for a in MlflowClient().list_artifacts(parent.info.run_id)}
    assert {"study.json", "summary.csv"} <= parent_artifacts
    assert len(store.study_definition("leave-one-out")["cells"]) == 10  # each cell once

    # The arms' toggles are params, so the MLflow UI can group by them.
    by_arm = children.set_index("tags.mlflow.runName")
    assert by_arm.loc["no_batch_norm-seed0", "params.batch_norm"] == "False"
    assert by_arm.loc["constant_lr-seed1", "params.lr_schedule"] == "constant"
    assert by_arm.loc["no_augmentation-seed0", "params.augmentation"] == "False"
    # The study's parent run carries the sweep's settings as params and per-arm results as metrics.
    assert parent.data.params["study"] == "leave-one-out" and parent.data.params["seeds"] == "2"
    assert parent.data.metrics["n/no_batch_norm"] == 2 and "test_accuracy_mean/baseline" in parent.data.metrics

    # In optuna-dashboard the queue round maximises a named val_accuracy objective and each trial shows its cell.
    storage_url = f"sqlite:///{tmp_path / 'store' / 'optuna.db'}"
    [summary_] = optuna.get_all_study_summaries(storage_url)
    round_study = optuna.load_study(study_name=summary_.study_name, storage=storage_url)
    assert round_study.direction == optuna.study.StudyDirection.MAXIMIZE
    assert round_study.metric_names == ["val_accuracy"]
    trial = next(t for t in round_study.trials if t.params["arm"] == "no_batch_norm" and t.params["seed"] == 1)
    assert trial.params["batch_norm"] is False and trial.value == by_arm.loc["no_batch_norm-seed1",
                                                                              "metrics.val_accuracy"]
    assert {t.params["arm"] for t in round_study.trials} == arms

    runs = compare.study_runs("leave-one-out")
    assert len(runs) == 10 and {"study", "arm", "seed", "run_id", "batch_norm", "test_accuracy"} <= set(runs.columns)
    assert runs.loc[runs["arm"] == "no_batch_norm", "batch_norm"].tolist() == [False, False]
    summary = compare.arm_summary(runs)
    assert list(summary["arm"]) == ["baseline", "no_augmentation", "no_batch_norm", "no_dropout", "constant_lr"]
    assert (summary["n"] == 2).all() and summary.loc[0, "delta_vs_baseline"] == 0

    second = run_module("experiments.ablate", "--seeds", "2", *TINY, env=env, cwd=tmp_path)
    assert "skipping 10 of 10 cells" in second.stdout
    assert len(_children("leave-one-out")) == 10


@pytest.mark.slow
def test_changed_config_makes_new_cells_and_keeps_old(tmp_path, tracking_uri, data_dir):
    env = command_env(tracking_uri, data_dir)
    args = ("--study", "dropout-strength", "--arms", "baseline", "--seeds", "1", "--train-subset", "200", "--no-report")
    run_module("experiments.ablate", *args, "--epochs", "1", env=env, cwd=tmp_path)
    run_module("experiments.ablate", *args, "--epochs", "2", env=env, cwd=tmp_path)
    children = _children("dropout-strength")
    assert sorted(children["params.epochs"]) == ["1", "2"] and set(children["status"]) == {"FINISHED"}
    current = compare.study_runs("dropout-strength")
    assert list(current["epochs"]) == [2]
    assert len(compare.study_runs("dropout-strength", all_sweeps=True)) == 2


def test_unknown_study_or_arm_lists_the_known_ones(tmp_path, tracking_uri, data_dir):
    env = command_env(tracking_uri, data_dir)
    result = run_module("experiments.ablate", "--study", "leave-two-out", env=env, cwd=tmp_path, check=False)
    assert result.returncode == 2 and "unknown study 'leave-two-out'" in result.stderr
    assert "leave-one-out" in result.stderr and "factorial" in result.stderr
    result = run_module("experiments.ablate", "--arms", "baseline,no_bn", env=env, cwd=tmp_path, check=False)
    assert result.returncode == 2 and "unknown arm 'no_bn'" in result.stderr and "no_batch_norm" in result.stderr
    assert not (tmp_path / "store" / "artifacts").exists()


def test_list_shows_studies_and_arm_overrides(tmp_path, tracking_uri, data_dir):
    result = run_module("experiments.ablate", "--list", env=command_env(tracking_uri, data_dir), cwd=tmp_path)
    for name in ("leave-one-out", "add-one-in", "factorial", "dropout-strength", "augmentation-strength"):
        assert name in result.stdout
    assert '{"batch_norm": false}' in result.stdout


def test_factorial_has_all_sixteen_combinations():
    from mnist_ablation.studies import get_study

    arms = get_study("factorial").arms
    combos = {(c.augmentation, c.batch_norm, c.dropout, c.lr_schedule) for c in arms.values()}
    assert len(arms) == 16 and len(combos) == 16
    assert arms["baseline"] == get_study("leave-one-out").arms["baseline"]


@pytest.mark.slow
def test_ablate_ends_with_the_report(tmp_path, tracking_uri, data_dir):
    output = tmp_path / "report"
    result = run_module("experiments.ablate", "--study", "lr-schedule", "--arms", "baseline,cosine_lr", "--seeds", "2",
                        "--train-subset", "200", "--epochs", "1", "--output", str(output),
                        env=command_env(tracking_uri, data_dir), cwd=tmp_path)
    assert f"report: {output / 'report.html'}" in result.stdout
    assert (output / "report.html").stat().st_size > 10_000 and (output / "ablation_summary.csv").exists()
    parent = store.find_parent_run("lr-schedule")
    assert "report" in {a.path for a in MlflowClient().list_artifacts(parent.info.run_id)}


@pytest.mark.slow
def test_precision_rule_stops_at_the_target_or_the_maximum_and_the_report_says_why(tmp_path, tracking_uri, data_dir):
    output = tmp_path / "report"
    result = run_module("experiments.ablate", "--arms", "baseline,no_dropout", "--seeds", "2", "--train-subset", "200",
                        "--epochs", "1", "--target-ci-width", "0.5", "--max-seeds", "3", "--output", str(output),
                        env=command_env(tracking_uri, data_dir), cwd=tmp_path)
    summary = pd.read_csv(output / "ablation_summary.csv").set_index("arm")
    reason = summary.loc["no_dropout", "stop_reason"]
    runs = compare.study_runs("leave-one-out")
    cells = sorted(zip(runs["arm"], runs["seed"]))
    width = summary.loc["no_dropout", "delta_ci_high"] - summary.loc["no_dropout", "delta_ci_low"]
    assert reason in ("target width reached", "max seeds reached")
    assert reason == "max seeds reached" or width <= 0.5
    if "round-1" in result.stdout:  # the third seed went to the arm and, paired, to the baseline
        assert "arms still open: no_dropout" in result.stdout
        assert cells == [(arm, seed) for arm in ("baseline", "no_dropout") for seed in (0, 1, 2)]
    else:  # two seeds already gave an interval at most 50 points wide
        assert reason == "target width reached"
        assert cells == [("baseline", 0), ("baseline", 1), ("no_dropout", 0), ("no_dropout", 1)]
    page = (output / "report.html").read_text()
    assert "Precision-driven seeding" in page and "50.00 points" in page and reason in page

    # Another sweep whose seeds already finished (here: 1 seed, at most 2) counts them and trains nothing.
    again = run_module("experiments.ablate", "--arms", "baseline,no_dropout", "--seeds", "1", "--train-subset", "200",
                       "--epochs", "1", "--target-ci-width", "0.5", "--max-seeds", "2", "--no-report",
                       env=command_env(tracking_uri, data_dir), cwd=tmp_path)
    assert "finished baseline-seed" not in again.stdout and "finished no_dropout-seed" not in again.stdout
    assert len(compare.study_runs("leave-one-out", all_sweeps=True)) == len(cells)


def test_precision_flags_are_checked_before_anything_runs(tmp_path, tracking_uri, data_dir):
    env = command_env(tracking_uri, data_dir)
    result = run_module("experiments.ablate", "--max-seeds", "5", env=env, cwd=tmp_path, check=False)
    assert result.returncode == 2 and "--max-seeds needs --target-ci-width" in result.stderr
    result = run_module("experiments.ablate", "--target-ci-width", "2", env=env, cwd=tmp_path, check=False)
    assert result.returncode == 2 and "expected a fraction in (0, 1)" in result.stderr
    for command in ("experiments.ablate", "experiments.report"):
        result = run_module(command, "--smallest-effect", "0", env=env, cwd=tmp_path, check=False)
        assert result.returncode == 2 and "--smallest-effect 0.0: expected a fraction of accuracy" in result.stderr


@pytest.mark.slow
def test_identical_arms_are_trained_once_and_count_for_both(tmp_path, tracking_uri, data_dir):
    env = command_env(tracking_uri, data_dir)
    output = tmp_path / "report"
    args = ("--arms", "baseline,constant_lr,no_dropout", "--seeds", "2", "--train-subset", "200", "--epochs", "1")
    result = run_module("experiments.ablate", *args, "--output", str(output), env=env, cwd=tmp_path)
    assert "they are the same training run" in result.stdout  # the step schedule never steps in one epoch
    assert "reuses baseline-seed0" in result.stdout and "reuses baseline-seed1" in result.stdout
    children = _children("leave-one-out").set_index("tags.mlflow.runName")
    assert len(children) == 6 and set(children["status"]) == {"FINISHED"}
    client = MlflowClient()
    for seed in (0, 1):
        reusing, source = children.loc[f"constant_lr-seed{seed}"], children.loc[f"baseline-seed{seed}"]
        assert reusing[f"tags.{naming.REUSES_RUN_TAG}"] == source["run_id"]
        assert reusing["params.lr_schedule"] == "constant" and reusing["tags.arm"] == "constant_lr"
        assert reusing["metrics.test_accuracy"] == source["metrics.test_accuracy"]
        history = client.get_metric_history(reusing["run_id"], "val_accuracy")
        assert [m.value for m in history] == [m.value for m in client.get_metric_history(source["run_id"],
                                                                                       "val_accuracy")]
        assert not client.list_artifacts(reusing["run_id"], "predictions")  # trained and logged once
        assert store.read_predictions(reusing["run_id"]).equals(store.read_predictions(source["run_id"]))
    assert children[f"tags.{naming.REUSES_RUN_TAG}"].notna().sum() == 2
    # The report counts both arms and keeps naming them identical; its numbers are the baseline's.
    summary = pd.read_csv(output / "ablation_summary.csv").set_index("arm")
    assert summary.loc["constant_lr", "n_seeds"] == 2 and summary.loc["constant_lr", "identical_to_baseline"]
    assert summary.loc["constant_lr", "test_accuracy_mean"] == summary.loc["baseline", "test_accuracy_mean"]
    assert "Identical by construction" in (output / "report.md").read_text()
    # Every cell, the reusing ones too, is one COMPLETE trial of the queue; a rerun adds nothing.
    storage_url = f"sqlite:///{tmp_path / 'store' / 'optuna.db'}"
    [summary_] = optuna.get_all_study_summaries(storage_url)
    trials = optuna.load_study(study_name=summary_.study_name, storage=storage_url).trials
    assert sorted(t.state.name for t in trials) == ["COMPLETE"] * 6
    again = run_module("experiments.ablate", *args, "--no-report", env=env, cwd=tmp_path)
    assert "skipping 6 of 6 cells" in again.stdout and len(_children("leave-one-out")) == 6
