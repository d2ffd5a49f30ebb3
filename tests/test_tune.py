"""Tuning: the search space, studies in real Optuna storages, and ``python -m experiments.tune``.

The distributed tests run real workers (subprocesses) against a real PostgreSQL and a real
``mlflow server`` (tests/servers.py) and check that every trial ran exactly once and landed in both.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import optuna
import pytest
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from mnist_ablation import naming, search_space, tuning
from mnist_ablation.config import BASELINE, ConfigError

from helpers import command_env, start_module

REPO_ROOT = Path(__file__).resolve().parent.parent
TINY = ["--epochs", "1", "--train-subset", "200"]


# -- the search space (fast) -----------------------------------------------------------------------

@pytest.mark.parametrize("base", [
    BASELINE,
    BASELINE.replace(dropout=False, augmentation=False, batch_size=100),
    BASELINE.replace(lr_schedule="cosine", min_learning_rate=1e-5, batch_norm=False),
    BASELINE.replace(lr_step_boundaries=(3,), lr_step_factors=(1.0, 0.2)),
], ids=["seed", "no-dropout-no-augmentation-batch100", "cosine", "one-step"])
def test_baseline_params_reproduce_the_base_config(base):
    assert search_space.config_from_params(search_space.baseline_params(base), base) == base


def test_search_space_yields_valid_configs_that_vary():
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    configs = []
    for _ in range(60):
        trial = study.ask()
        configs.append(search_space.suggest_config(trial, BASELINE))  # an invalid config would raise ConfigError
        study.tell(trial, 0.0)
    for name in ("learning_rate", "lr_schedule", "batch_size", "batch_norm", "dropout", "augmentation",
                 "conv_dropout_rate", "rotation_range", "lr_step_factors", "min_learning_rate"):
        assert len({getattr(c, name) for c in configs}) > 1, f"{name} never varies"
    for config in configs:
        assert config.epochs == BASELINE.epochs and config.validation == "split"
        if not config.dropout:
            assert config.conv_dropout_rate == BASELINE.conv_dropout_rate  # no parameter when switched off


def test_tuning_refuses_the_test_set_as_validation():
    with pytest.raises(ConfigError, match="validation='split'"):
        search_space.check_base_config(BASELINE.replace(validation="test"))


def test_registries_name_the_known_choices():
    with pytest.raises(ValueError, match="known samplers: tpe, random, qmc"):
        search_space.build_sampler("bayes")
    with pytest.raises(ValueError, match="known pruners: median, hyperband, none"):
        search_space.build_pruner("asha", 4)
    assert isinstance(search_space.build_pruner("hyperband", 4), optuna.pruners.HyperbandPruner)


def test_storage_urls():
    from mnist_ablation import storage
    from mnist_ablation.errors import StorageError
    from mnist_ablation.redaction import redact

    assert storage.normalize_url("postgresql://u:secret@h:5432/db").startswith("postgresql+psycopg")
    assert storage.normalize_url("sqlite:///x.db") == "sqlite:///x.db"
    assert "secret" not in redact("postgresql://u:secret@h:5432/db")
    with pytest.raises(StorageError, match="grace_period=10 must exceed heartbeat_interval=10"):
        tuning.open_storage("sqlite:///unused.db", heartbeat_interval=10, grace_period=10)


def test_joining_a_study_with_another_base_config_fails(tmp_path, tracking_uri):
    storage = tuning.open_storage(f"sqlite:///{tmp_path / 'optuna.db'}")
    created = tuning.open_study("s", storage, BASELINE.replace(epochs=2))
    assert created.created and created.study.user_attrs[tuning.PARENT_RUN_ATTR] == created.parent_run_id
    [queued] = created.study.get_trials(states=(TrialState.WAITING,))
    assert queued.system_attrs["fixed_params"] == search_space.baseline_params(BASELINE.replace(epochs=2))
    joined = tuning.open_study("s", storage, BASELINE.replace(epochs=2))
    assert not joined.created and joined.parent_run_id == created.parent_run_id
    assert len(joined.study.trials) == 1  # the joiner enqueued nothing
    with pytest.raises(tuning.TuningError, match="epochs: study 2 vs now 3"):
        tuning.open_study("s", storage, BASELINE.replace(epochs=3))


def test_an_interrupted_trial_is_failed_and_queued_again(tmp_path, tracking_uri, mnist):
    class InterruptedObjective(tuning.Objective):
        def run_trial(self, trial, config, tags):
            raise KeyboardInterrupt  # what Ctrl-C raises in the middle of training

    storage = tuning.open_storage(f"sqlite:///{tmp_path / 'optuna.db'}")
    study = tuning.open_study("interrupted", storage, BASELINE.replace(epochs=1, train_subset=200))
    objective = InterruptedObjective(study.base, mnist, study.name, study.parent_run_id)
    with pytest.raises(KeyboardInterrupt):
        tuning.optimize(study, mnist, n_trials=1, objective=objective)
    interrupted, retry = study.study.get_trials()
    assert interrupted.state == TrialState.FAIL and retry.state == TrialState.WAITING
    assert retry.system_attrs["failed_trial"] == interrupted.number
    assert retry.system_attrs["fixed_params"] == interrupted.params == search_space.baseline_params(study.base)


# -- trials that train (slow) ----------------------------------------------------------------------

@pytest.mark.slow
def test_pruned_trial_stops_early_and_its_run_says_so(tmp_path, tracking_uri, mnist):
    storage = tuning.open_storage(f"sqlite:///{tmp_path / 'optuna.db'}")
    # A threshold no 200-image run reaches after one epoch: the baseline trial is pruned there.
    study = tuning.open_study("prune", storage, BASELINE.replace(epochs=3, train_subset=200),
                              pruner=optuna.pruners.ThresholdPruner(lower=0.999))
    tuning.optimize(study, mnist, n_trials=1)
    [trial] = study.study.trials
    assert trial.state == TrialState.PRUNED
    assert list(trial.intermediate_values) == [0]
    run = MlflowClient().get_run(trial.user_attrs[tuning.RUN_ID_ATTR])
    assert run.info.status == "KILLED"
    assert run.data.tags["optuna_trial_state"] == "PRUNED"
    # It reads as pruned (epoch, value, pruner), never as a crash with a traceback.
    assert "failure_reason" not in run.data.tags
    assert run.data.tags["stopped_early"].startswith("pruned by ThresholdPruner after epoch 1: val_accuracy")
    assert run.data.tags["mlflow.note.content"] == run.data.tags["stopped_early"]
    assert run.data.tags["pruned_at_epoch"] == "1" and run.data.tags["pruner"] == "ThresholdPruner"
    assert float(run.data.tags["pruned_val_accuracy"]) == pytest.approx(trial.intermediate_values[0])
    assert "Traceback" not in str(run.data.tags)
    assert run.data.tags["mlflow.parentRunId"] == study.parent_run_id
    history = MlflowClient().get_metric_history(run.info.run_id, "val_accuracy")
    assert [m.step for m in history] == [0]
    assert history[0].value == pytest.approx(trial.intermediate_values[0])


@pytest.mark.slow
def test_tune_command_end_to_end_and_continues_the_study(tmp_path, tracking_uri, data_dir, monkeypatch, capsys):
    from experiments.tune import main

    monkeypatch.chdir(tmp_path)
    argv = [*TINY, "--study-name", "e2e", "--sampler", "random", "--sampler-seed", "0", "--pruner", "none",
            "--retrain-subset", "200", "--tracking-uri", tracking_uri, "--data-dir", str(data_dir)]
    # A first worker stops after the baseline trial; a second run continues the study and reports.
    assert main(["--n-trials", "1", "--no-final", *argv]) == 0
    from mnist_ablation.storage import default_storage_url
    from mnist_ablation.tracking import local_state_directory

    storage_url = default_storage_url(local_state_directory(tracking_uri))
    assert Path(storage_url[len("sqlite:///"):]).parent == Path(tracking_uri[len("sqlite:///"):]).parent
    study = optuna.load_study(study_name="e2e", storage=storage_url)
    parent_id = study.user_attrs[tuning.PARENT_RUN_ATTR]
    assert MlflowClient().get_run(parent_id).info.status == "RUNNING"  # no report yet
    assert main(["--n-trials", "1", *argv]) == 0

    study = optuna.load_study(study_name="e2e", storage=storage_url)
    trials = study.trials
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 2
    assert study.user_attrs[tuning.PARENT_RUN_ATTR] == parent_id  # the same parent run
    base = BASELINE.replace(epochs=1, train_subset=200)
    assert trials[0].params == search_space.baseline_params(base) and trials[0].user_attrs[tuning.BASELINE_ATTR]
    assert not trials[1].user_attrs.get(tuning.BASELINE_ATTR)  # the baseline is enqueued once only

    client = MlflowClient()
    parent = client.get_run(parent_id)
    assert parent.info.status == "FINISHED" and parent.data.tags[tuning.ROLE_TAG] == "study"
    assert {a.path for a in client.list_artifacts(parent_id)} >= {"best_params.json", "trials.csv", "plots"}
    assert {a.path for a in client.list_artifacts(parent_id, "plots")} == {
        "plots/optimization_history.png", "plots/param_importances.png"}
    assert parent.data.metrics["best_val_accuracy"] == pytest.approx(study.best_value)
    retrain = client.get_run(parent.data.tags["best_retrain_run_id"])
    assert retrain.data.tags[tuning.ROLE_TAG] == "best_retrain" and retrain.info.status == "FINISHED"
    assert retrain.data.tags["trial_number"] == str(study.best_trial.number)
    assert retrain.data.params["train_subset"] == "200" and retrain.data.params["validation"] == "split"
    assert parent.data.metrics["best_retrain_test_accuracy"] == retrain.data.metrics["test_accuracy"]
    for trial in trials:
        run = client.get_run(trial.user_attrs[tuning.RUN_ID_ATTR])
        assert run.info.status == "FINISHED" and run.data.tags["trial_number"] == str(trial.number)
        assert run.data.tags["mlflow.parentRunId"] == parent_id
        assert run.data.metrics["val_accuracy"] == pytest.approx(trial.value)
        assert "test_accuracy" in run.data.metrics
    frame = tuning.trials_frame(study)
    assert list(frame["number"]) == [0, 1]
    assert list(frame["run_id"]) == [t.user_attrs[tuning.RUN_ID_ATTR] for t in trials]
    assert (frame["mlflow_status"] == "FINISHED").all() and frame["test_accuracy"].notna().all()
    assert "best config retrained" in capsys.readouterr().out


# -- distributed: PostgreSQL + mlflow server + worker processes (slow) -----------------------------

def _worker(tmp_path: Path, name: str, storage: str, tracking_uri: str, *arguments: str) -> subprocess.Popen:
    env = command_env(tracking_uri, Path(os.environ["MNIST_DATA_DIR"]), PYTHONPATH=str(REPO_ROOT))
    return start_module("experiments.tune", "--storage", storage, "--tracking-uri", tracking_uri, *arguments,
                        env=env, cwd=tmp_path, log=tmp_path / f"{name}.log")


def _finish(process: subprocess.Popen, tmp_path: Path, name: str, timeout: float = 400) -> str:
    process.wait(timeout=timeout)
    output = (tmp_path / f"{name}.log").read_text()
    assert process.returncode == 0, f"worker {name} exited {process.returncode}:\n{output[-4000:]}"
    return output


def _trial_runs(study_name: str, tracking_uri: str) -> tuple[str, list]:
    """(parent run id, child runs) of a tuning study on the tracking server."""
    client = MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name(naming.tuning_experiment(study_name))
    runs = client.search_runs([experiment.experiment_id], max_results=1000)
    [parent] = [r for r in runs if r.data.tags.get(tuning.ROLE_TAG) == "study"]
    return parent.info.run_id, [r for r in runs if r.data.tags.get(tuning.ROLE_TAG) != "study"]


@pytest.mark.slow
def test_two_workers_share_a_study_and_every_trial_runs_exactly_once(tmp_path, postgres_url, mlflow_server):
    arguments = ["--study-name", "shared", "--n-trials", "2", *TINY, "--pruner", "none", "--no-final",
                 "--heartbeat-interval", "2", "--grace-period", "20"]
    workers = [_worker(tmp_path, f"worker{index}", postgres_url, mlflow_server, *arguments) for index in range(2)]
    outputs = [_finish(worker, tmp_path, f"worker{index}") for index, worker in enumerate(workers)]
    assert sorted("(created)" in output for output in outputs) == [False, True]  # exactly one creator

    study = optuna.load_study(study_name="shared", storage=postgres_url)
    trials = study.trials
    assert len(trials) == 4 and all(t.state == TrialState.COMPLETE for t in trials)
    baseline = [t for t in trials if t.user_attrs.get(tuning.BASELINE_ATTR)]
    assert len(baseline) == 1
    assert baseline[0].params == search_space.baseline_params(BASELINE.replace(epochs=1, train_subset=200))

    parent_id, children = _trial_runs("shared", mlflow_server)
    assert study.user_attrs[tuning.PARENT_RUN_ATTR] == parent_id
    run_ids = [t.user_attrs[tuning.RUN_ID_ATTR] for t in trials]
    assert len(set(run_ids)) == len(run_ids)  # no two trials share a run
    by_id = {r.info.run_id: r for r in children}
    assert set(by_id) == set(run_ids)  # every trial has its run and no run lacks a trial
    for trial in trials:
        run = by_id[trial.user_attrs[tuning.RUN_ID_ATTR]]
        assert run.info.status == "FINISHED"
        assert run.data.tags["trial_number"] == str(trial.number)
        assert run.data.tags["mlflow.parentRunId"] == parent_id
        assert run.data.tags[tuning.ROLE_TAG] == "trial"
        assert run.data.metrics["val_accuracy"] == pytest.approx(trial.value)


@pytest.mark.slow
def test_a_killed_workers_trial_is_failed_and_retried_once(tmp_path, postgres_url, mlflow_server):
    grace_period = 4
    arguments = ["--study-name", "killed", "--n-trials", "1", *TINY,
                 "--pruner", "none", "--no-final", "--heartbeat-interval", "1", "--grace-period", str(grace_period)]
    doomed = _worker(tmp_path, "doomed", postgres_url, mlflow_server, *arguments)
    deadline = time.monotonic() + 300
    while True:  # wait until the doomed worker is inside its trial's MLflow run
        assert doomed.poll() is None, (tmp_path / "doomed.log").read_text()[-4000:]
        assert time.monotonic() < deadline, "the doomed worker never started its trial"
        try:
            trials = optuna.load_study(study_name="killed", storage=postgres_url).trials
        except KeyError:  # the study does not exist yet
            trials = []
        if trials and trials[0].state == TrialState.RUNNING and tuning.RUN_ID_ATTR in trials[0].user_attrs:
            break
        time.sleep(0.2)
    doomed.send_signal(signal.SIGKILL)  # no clean-up at all: only the heartbeat can tell
    doomed.wait(timeout=30)
    time.sleep(grace_period + 1)

    rescuer = _worker(tmp_path, "rescuer", postgres_url, mlflow_server, *arguments)
    _finish(rescuer, tmp_path, "rescuer")

    trials = optuna.load_study(study_name="killed", storage=postgres_url).trials
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.COMPLETE]
    lost, retry = trials
    assert retry.system_attrs["failed_trial"] == lost.number and retry.params == lost.params
    client = MlflowClient(mlflow_server)
    lost_run = client.get_run(lost.user_attrs[tuning.RUN_ID_ATTR])
    assert lost_run.info.status == "KILLED" and "heartbeat" in lost_run.data.tags["failure_reason"]
    retry_run = client.get_run(retry.user_attrs[tuning.RUN_ID_ATTR])
    assert retry_run.info.status == "FINISHED" and retry_run.data.tags["retry_of_trial"] == str(lost.number)
    _, children = _trial_runs("killed", mlflow_server)
    assert {r.info.run_id for r in children} == {lost_run.info.run_id, retry_run.info.run_id}
