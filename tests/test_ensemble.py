"""Ensembles of study runs: member selection on validation only, averaged probabilities, the logged run."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from mnist_ablation import ensemble
from mnist_ablation.config import FIELD_NAMES
from mnist_ablation.naming import ROLE_TAG

from helpers import command_env, run_module

REPO_ROOT = Path(__file__).resolve().parent.parent


# -- selection on a DataFrame (pure, fast) -----------------------------------------------------------------

def _runs(**columns) -> pd.DataFrame:
    return pd.DataFrame({"validation": "split", **columns})


def test_selection_follows_validation_not_test_accuracy():
    # Test accuracy ranks the runs in the opposite order: it must not matter.
    runs = _runs(
        run_id=["a", "b", "c", "d"], arm=["x", "x", "y", "y"], seed=[0, 1, 0, 1],
        val_accuracy=[0.90, 0.95, 0.80, 0.99], val_loss=[0.3, 0.2, 0.5, 0.1],
        test_accuracy=[0.99, 0.80, 0.995, 0.70],
    )
    chosen = ensemble.select_members(runs, top_k=2)
    assert list(chosen["run_id"]) == ["d", "b"]
    # Changing test accuracy alone changes nothing.
    shuffled = runs.assign(test_accuracy=[0.1, 0.2, 0.3, 0.4])
    assert list(ensemble.select_members(shuffled, top_k=2)["run_id"]) == ["d", "b"]


def test_selection_breaks_ties_by_validation_loss_then_run_id():
    runs = _runs(run_id=["b", "a", "c"], arm=["x"] * 3, seed=[0, 1, 2],
                 val_accuracy=[0.9, 0.9, 0.9], val_loss=[0.2, 0.2, 0.1], test_accuracy=[0.5, 0.6, 0.7])
    assert list(ensemble.select_members(runs, top_k=3)["run_id"]) == ["c", "a", "b"]


def test_selection_by_arm_and_seed():
    runs = _runs(run_id=["a", "b", "c", "d"], arm=["x", "x", "y", "y"], seed=[0, 1, 0, 1],
                 val_accuracy=[0.90, 0.95, 0.80, 0.99], val_loss=[0.3, 0.2, 0.5, 0.1])
    assert list(ensemble.select_members(runs, arm="x")["run_id"]) == ["b", "a"]
    assert list(ensemble.select_members(runs, top_k=1, seed=0)["run_id"]) == ["a"]
    with pytest.raises(ensemble.EnsembleError, match="arm 'z'.*x, y"):
        ensemble.select_members(runs, arm="z")


def test_selection_errors_are_loud():
    runs = _runs(run_id=["a", "b"], arm=["x", "x"], seed=[0, 1], val_accuracy=[0.9, 0.8], val_loss=[0.1, 0.2])
    with pytest.raises(ensemble.EnsembleError, match="top_k=3 but only 2"):
        ensemble.select_members(runs, top_k=3)
    with pytest.raises(ensemble.EnsembleError, match="top_k=0"):
        ensemble.select_members(runs, top_k=0)
    with pytest.raises(ensemble.EnsembleError, match="no finished runs"):
        ensemble.select_members(runs.iloc[:0], top_k=1)
    # validation="test" means val_accuracy IS test accuracy: choosing by it would tune on the test set.
    with pytest.raises(ensemble.EnsembleError, match="validation='test'"):
        ensemble.select_members(runs.assign(validation=["split", "test"]), top_k=1)
    with pytest.raises(ensemble.EnsembleError, match="no final val_accuracy"):
        ensemble.select_members(runs.assign(val_accuracy=[0.9, np.nan]), top_k=1)


def test_average_predictions_checks_the_images_match():
    def frame(labels, probabilities):
        data = {"index": np.arange(len(labels)), "label": labels, "predicted": np.argmax(probabilities, 1)}
        data.update({f"prob_{k}": probabilities[:, k] for k in range(10)})
        return pd.DataFrame(data)

    first = np.eye(10, dtype=np.float32)[[1, 2, 3]]
    second = np.full((3, 10), 0.1, dtype=np.float32)
    labels, mean = ensemble.average_predictions([frame(np.array([1, 2, 3]), first),
                                                 frame(np.array([1, 2, 3]), second)])
    np.testing.assert_allclose(mean, (first + second) / 2, rtol=1e-6)
    assert list(labels) == [1, 2, 3]
    with pytest.raises(ensemble.EnsembleError, match="same test set"):
        ensemble.average_predictions([frame(np.array([1, 2, 3]), first), frame(np.array([1, 2, 4]), first)])



def test_ensemble_loss_is_keras_categorical_cross_entropy():
    # results.categorical_loss holds Keras' epsilon as a constant (the ensemble loads no Keras); it must stay Keras'.
    import keras

    from mnist_ablation.results import PROBABILITY_EPSILON, categorical_loss

    labels = np.array([0, 1, 2, 3])
    probabilities = np.full((4, 10), 0.1, dtype=np.float32)
    probabilities[1] = np.eye(10, dtype=np.float32)[1]  # certain and right: clipped below 1
    probabilities[2] = np.eye(10, dtype=np.float32)[5]  # certain and wrong: p(true) = 0, clipped to epsilon
    expected = keras.losses.CategoricalCrossentropy()(np.eye(10, dtype=np.float32)[labels], probabilities)
    assert keras.config.epsilon() == PROBABILITY_EPSILON
    assert ensemble.categorical_loss is categorical_loss
    np.testing.assert_allclose(categorical_loss(labels, probabilities), float(expected), rtol=1e-5)

# -- a tiny real study, then the command -------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_study(tmp_path_factory, data_dir):
    """Two arms x two seeds of leave-one-out on 200 images for 1 epoch (with one TTA view), in a temp store."""
    store = tmp_path_factory.mktemp("ensemble_store")
    uri = f"sqlite:///{store / 'mlflow.db'}"
    env = command_env(uri, data_dir)
    run_module("experiments.ablate", "--study", "leave-one-out", "--arms", "baseline,no_dropout", "--seeds", "2",
               "--train-subset", "200", "--epochs", "1", "--no-report", "--set", "tta_views=1", env=env)
    return uri, env


def _cell_runs(client: MlflowClient, experiment_id: str):
    return client.search_runs([experiment_id], filter_string=f"tags.`{ROLE_TAG}` = 'cell'")


def _mean_probabilities(run_ids, artifact="predictions/test_predictions.parquet"):
    frames = [pd.read_parquet(mlflow.artifacts.download_artifacts(run_id=r, artifact_path=artifact)) for r in run_ids]
    labels = frames[0]["label"].to_numpy()
    for frame in frames:
        assert np.array_equal(frame["label"].to_numpy(), labels)
    columns = [f"prob_{k}" for k in range(10)]
    return labels, np.mean([frame[columns].to_numpy(np.float64) for frame in frames], axis=0)


@pytest.mark.slow
def test_ensemble_command_logs_a_traceable_run(tiny_study):
    uri, env = tiny_study
    completed = run_module("experiments.ensemble", "--study", "leave-one-out", "--top-k", "3", env=env, timeout=300)
    assert "logged as run" in completed.stdout

    mlflow.set_tracking_uri(uri)
    client = MlflowClient()
    experiment = client.get_experiment_by_name("ablation/leave-one-out")
    cells = _cell_runs(client, experiment.experiment_id)
    assert len(cells) == 4
    # The top 3 by final val_accuracy (ties: lower val_loss, then run id), computed from MLflow directly.
    ranked = sorted(cells, key=lambda r: (-r.data.metrics["val_accuracy"], r.data.metrics["val_loss"], r.info.run_id))
    expected_members = [r.info.run_id for r in ranked[:3]]

    ensembles = client.search_runs([experiment.experiment_id], filter_string=f"tags.`{ROLE_TAG}` = 'ensemble'")
    assert len(ensembles) == 1
    run = ensembles[0]
    assert run.info.status == "FINISHED"
    assert run.data.tags["arm"] == "ensemble-top3"
    assert run.data.tags["study"] == "leave-one-out"
    assert run.data.tags["member_run_ids"].split(",") == expected_members
    assert run.data.params["member_run_ids"] == run.data.tags["member_run_ids"]
    assert run.data.params["ensemble_size"] == "3"
    assert run.data.metrics["ensemble_size"] == 3
    assert "val_accuracy" not in run.data.metrics  # not computable: members' val predictions are not logged
    parent = client.search_runs([experiment.experiment_id], filter_string=f"tags.`{ROLE_TAG}` = 'study'")[0]
    assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
    # No config params: grouping the cells by a param in the MLflow UI must never mix the ensemble in.
    # The config all members share (they differ only in dropout and seed here) is in ensemble.json.
    assert not set(run.data.params) & set(FIELD_NAMES)
    record = json.loads(Path(mlflow.artifacts.download_artifacts(run_id=run.info.run_id,
                                                                  artifact_path="ensemble.json")).read_text())
    assert record["shared_config"]["train_subset"] == "200" and "seed" not in record["shared_config"]

    labels, mean = _mean_probabilities(expected_members)
    assert run.data.metrics["test_accuracy"] == pytest.approx(float(np.mean(mean.argmax(1) == labels)), abs=1e-12)
    logged = pd.read_parquet(mlflow.artifacts.download_artifacts(run_id=run.info.run_id,
                                                                 artifact_path="predictions/test_predictions.parquet"))
    assert len(logged) == 10_000
    np.testing.assert_allclose(logged[[f"prob_{k}" for k in range(10)]].to_numpy(), mean, atol=1e-6)
    assert np.array_equal(logged["predicted"].to_numpy(), logged[[f"prob_{k}" for k in range(10)]].to_numpy().argmax(1))
    # Every member ran one TTA view, so the ensemble averages their TTA predictions too.
    labels, tta_mean = _mean_probabilities(expected_members, "predictions/test_predictions_tta.parquet")
    assert run.data.metrics["test_accuracy_tta"] == pytest.approx(float(np.mean(tta_mean.argmax(1) == labels)))
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "plots")}
    assert {"plots/confusion_matrix.png", "plots/members_val_accuracy.png"} <= artifacts
    assert "ensemble.json" in {a.path for a in client.list_artifacts(run.info.run_id)}

    # The study's cell table does not mistake the ensemble for a cell; ensemble_runs lists it.
    from mnist_ablation import compare

    assert len(compare.study_runs("leave-one-out")) == 4
    table = ensemble.ensemble_runs("leave-one-out")
    assert list(table["run_id"]) == [run.info.run_id]
    assert table.loc[0, "test_accuracy"] == run.data.metrics["test_accuracy"]


@pytest.mark.slow
def test_ensemble_of_one_arm_and_rerun_reuses(tiny_study, capsys):
    uri, _ = tiny_study
    from experiments import ensemble as command

    assert command.main(["--study", "leave-one-out", "--arm", "no_dropout", "--tracking-uri", uri]) == 0
    first = capsys.readouterr().out
    assert command.main(["--study", "leave-one-out", "--arm", "no_dropout", "--tracking-uri", uri]) == 0
    second = capsys.readouterr().out
    assert "already logged as run" in second and "already logged" not in first

    client = MlflowClient()
    experiment = client.get_experiment_by_name("ablation/leave-one-out")
    runs = client.search_runs([experiment.experiment_id], filter_string="tags.arm = 'ensemble-no_dropout'")
    assert len(runs) == 1
    members = runs[0].data.tags["member_run_ids"].split(",")
    arms = {client.get_run(m).data.tags["arm"] for m in members}
    assert arms == {"no_dropout"} and len(members) == 2
    assert "dropout" not in runs[0].data.params
    shared = json.loads(Path(mlflow.artifacts.download_artifacts(run_id=runs[0].info.run_id,
                                                                  artifact_path="ensemble.json")).read_text())
    assert shared["shared_config"]["dropout"] == "False"

    # One seed across arms: a repeat of the ensemble, tagged with that seed.
    logged = ensemble.log_study_ensemble("leave-one-out", top_k=2, seed=1, tracking_uri=uri)
    tags = client.get_run(logged.run_id).data.tags
    assert tags["seed"] == "1" and tags["mlflow.runName"] == "ensemble-top2-seed1"
    assert {client.get_run(m).data.tags["seed"] for m in tags["member_run_ids"].split(",")} == {"1"}
