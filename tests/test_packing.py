"""Packed training: which configs pack, and each member is the run it would be alone (on Keras' JAX backend)."""

from __future__ import annotations

import contextlib
import json
import sys

import pytest

from mnist_ablation.config import BASELINE, PACK_MEMBER_FIELDS, ConfigError, check_packable, pack_signature

from helpers import REPO_ROOT, command_env

# -- what can pack (pure) ------------------------------------------------------------------------------------


def test_seeds_augmentation_and_schedules_pack_and_graph_fields_do_not():
    members = [BASELINE.replace(seed=1), BASELINE.replace(rotation_range=20.0, augmentation=False),
               BASELINE.replace(lr_schedule="cosine", learning_rate=3e-3), BASELINE.replace(tta_views=2)]
    check_packable(members)
    assert len({pack_signature(c) for c in members}) == 1
    for change in ({"dropout": False}, {"conv_dropout_rate": 0.3}, {"batch_norm": False}, {"epochs": 3},
                   {"optimizer": "sgd"}, {"train_subset": 500}, {"label_smoothing": 0.1}):
        other = BASELINE.replace(**change)
        assert pack_signature(other) != pack_signature(BASELINE)
        with pytest.raises(ConfigError, match=f"{next(iter(change))}=.*differs.*within one pack"):
            check_packable([BASELINE, other])
    assert "seed" in PACK_MEMBER_FIELDS and "dropout" not in PACK_MEMBER_FIELDS


def test_the_seed_script_pipeline_does_not_pack():
    with pytest.raises(ConfigError, match="cannot be packed"):
        check_packable([BASELINE.replace(pipeline="seed_script")])


def test_packing_needs_the_jax_backend_and_says_so(mnist):
    from mnist_ablation.packed import PackBackendError, train_pack

    with pytest.raises(PackBackendError, match="KERAS_BACKEND=jax"):
        train_pack([BASELINE], mnist)


# -- equivalence, member by member (a subprocess on JAX) ----------------------------------------------------------


@pytest.fixture(scope="module")
def probe(tmp_path_factory, data_dir):
    pytest.importorskip("jax")
    import subprocess

    out = tmp_path_factory.mktemp("packing") / "probe.json"
    env = command_env("sqlite:///unused.db", data_dir, KERAS_BACKEND="jax")
    result = subprocess.run([sys.executable, str(REPO_ROOT / "tests" / "packing_probe.py"), str(out)], env=env,
                            cwd=REPO_ROOT, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(out.read_text())


@pytest.mark.slow
def test_each_member_starts_from_its_unpacked_weights_and_trains_on_its_batches(probe):
    assert probe["backend"] == "jax"
    trained = [m for m in probe["members"] if m["alone_outcome"] == "RunResult"]
    assert len(trained) == 2
    initial = [m["initial"] for m in trained]
    for member in trained:
        assert member["initial_difference"] == 0.0  # bit for bit
        for batch in member["batches"]:
            assert batch["rows"] == batch["alone_rows"] and batch["labels"] == batch["alone_labels"]
            assert batch["pixels_difference"] < 1e-5  # the resampling on the device: float rounding
    assert initial[0] != initial[1]  # seeds give their own weights
    # The members' own streams: the non-augmented member's pixels are its rows, bit for bit.
    assert all(b["pixels_difference"] == 0.0 for b in trained[1]["batches"])


@pytest.mark.slow
def test_the_first_update_of_each_augmented_member_equals_its_unpacked_run(probe):
    # The seed's recipe (Adam), augmented on the device with each member's strengths: one step. Adam's first
    # step is about learning_rate * sign(gradient), so where a gradient is near zero, float rounding of the
    # pixels (1e-6) moves that weight by up to a fraction of 1e-3: a few weights in ten thousand.
    assert len(probe["first_update"]) == 2
    for member in probe["first_update"]:
        assert member["largest"] < 5e-4 and member["share_above_1e-6"] < 1e-3, member


@pytest.mark.slow
def test_each_member_trains_as_its_unpacked_run_and_fails_or_stops_alone(probe):
    augmented, early, diverged = probe["members"]
    for member in (augmented, early):
        assert member["outcome"] == member["alone_outcome"] == "RunResult"
        assert member["weights_change"] > 1e-3  # it trained
    # Without augmentation the inputs are the same bits, and so is the run, to float rounding.
    assert early["weights_difference"] < 1e-5 and early["probabilities_difference"] < 1e-5
    for key, values in early["alone_history"].items():
        if key != "epoch_seconds":
            assert early["history"][key] == pytest.approx(values, rel=1e-5, abs=1e-6), key
    # Augmented pixels differ by float rounding (1e-6), which max-pooling and ReLU ties amplify step by step:
    # the first epoch's metrics still agree closely.
    for key in ("loss", "accuracy", "val_loss", "val_accuracy", "learning_rate"):
        assert augmented["history"][key][0] == pytest.approx(augmented["alone_history"][key][0], rel=1e-3), key
    assert len(augmented["history"]["loss"]) == 2 and len(early["history"]["loss"]) == 1  # stopped alone
    assert early["history"]["learning_rate"] == pytest.approx([0.02])  # its own schedule
    assert diverged["outcome"] == diverged["alone_outcome"] == "TrainingDiverged"  # failed alone
    assert diverged["message"] == diverged["alone_message"]


# -- ablate --pack: the same child runs as unpacked, member by member -----------------------------------------------

PACK_STUDY = ("--study", "architecture", "--arms", "baseline", "--seeds", "2", "--train-subset", "200", "--epochs", "1",
              "--no-report")


def _cells(tracking_uri: str) -> dict:
    import mlflow
    from mlflow.tracking import MlflowClient

    from mnist_ablation import naming

    mlflow.set_tracking_uri(tracking_uri)
    client = MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name(naming.ablation_experiment("architecture"))
    runs = client.search_runs([experiment.experiment_id], "tags.`mnist_ablation.role` = 'cell'")
    return {run.info.run_name: {
        "status": run.info.status, "params": run.data.params, "metrics": run.data.metrics, "tags": run.data.tags,
        "artifacts": sorted(a.path for a in client.list_artifacts(run.info.run_id)),
        "history": [m.value for m in client.get_metric_history(run.info.run_id, "val_accuracy")],
    } for run in runs}


@pytest.mark.slow
def test_ablate_pack_logs_the_same_child_runs_as_unpacked(tmp_path, data_dir):
    pytest.importorskip("jax")
    from helpers import run_module

    packed_uri, alone_uri = f"sqlite:///{tmp_path}/packed.db", f"sqlite:///{tmp_path}/alone.db"
    out = run_module("experiments.ablate", *PACK_STUDY, "--pack", "2", env=command_env(packed_uri, data_dir),
                     cwd=tmp_path)
    assert "pack of 2" in out.stdout + out.stderr
    # The unpacked route on the same backend, so that the members' figures are comparable.
    run_module("experiments.ablate", *PACK_STUDY, env=command_env(alone_uri, data_dir, KERAS_BACKEND="jax"),
               cwd=tmp_path)
    packed, alone = _cells(packed_uri), _cells(alone_uri)
    assert sorted(packed) == sorted(alone) == ["baseline-seed0", "baseline-seed1"]
    pack_ids = set()
    for name in packed:
        mine, theirs = packed[name], alone[name]
        assert mine["status"] == theirs["status"] == "FINISHED"
        assert mine["params"] == theirs["params"]
        assert set(mine["metrics"]) == set(theirs["metrics"])
        assert mine["artifacts"] == theirs["artifacts"]
        assert set(mine["tags"]) - set(theirs["tags"]) == {"pack"}
        pack_ids.add(mine["tags"]["pack"].split(":")[1])
        assert mine["tags"]["config_hash"] == theirs["tags"]["config_hash"]
        assert mine["history"] == pytest.approx(theirs["history"], abs=0.02)
        assert mine["metrics"]["test_accuracy"] == pytest.approx(theirs["metrics"]["test_accuracy"], abs=0.02)
    assert len(pack_ids) == 1  # both cells trained in one pack

    # benchmarks.packed_study reads the two stores with the project's tests: per arm and pooled over the cells.
    from benchmarks.packed_study import compare_routes, route_figures, verdict

    (alone_correct, alone_figures), (packed_correct, packed_figures) = (
        route_figures("architecture", uri) for uri in (alone_uri, packed_uri))
    assert alone_figures["cells_trained"] == packed_figures["cells_trained"] == 2
    rows = compare_routes(alone_correct, packed_correct, "pack 2")
    assert [row["cells"] for row in rows] == ["baseline", "all trained cells"]
    for row in rows:
        assert row["n_pairs"] == 2 and abs(row["delta"]) < 0.02  # the same runs to float rounding
        assert row["delta_ci_low"] <= row["delta"] <= row["delta_ci_high"]
        assert verdict(row) != "no estimate"


def _checkpointed(store) -> int:
    """How many cells have a checkpoint of at least one epoch."""
    count = 0
    for state in store.glob("checkpoints/*/state.json"):
        with contextlib.suppress(json.JSONDecodeError, OSError, KeyError):  # being replaced right now
            count += json.loads(state.read_text())["epochs_completed"] >= 1
    return count


@pytest.mark.slow
def test_a_pack_killed_mid_run_resumes_every_member_from_its_own_checkpoint(tmp_path, tracking_uri, data_dir):
    pytest.importorskip("jax")
    import signal
    import time
    from collections import Counter

    from mlflow.tracking import MlflowClient
    from test_reliability import _cells, _wait_for

    from helpers import run_module, start_module

    env = command_env(tracking_uri, data_dir)
    store = tmp_path / "store"
    args = ("--study", "leave-one-out", "--arms", "baseline", "--seeds", "2", "--epochs", "3", "--train-subset", "300",
            "--no-report", "--pack", "2", "--heartbeat-interval", "1", "--grace-period", "4")
    process = start_module("experiments.ablate", *args, env=env, cwd=tmp_path)
    try:
        _wait_for(lambda: _checkpointed(store) == 2, 600, "both members' first checkpoints", process)
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    killed = [r for r in _cells("leave-one-out") if r.info.status == "RUNNING"]
    assert len(killed) == 2, "both members' runs are left RUNNING by SIGKILL"

    time.sleep(5)  # past the grace period: the dead pack's heartbeats are stale, its cells are retried
    rerun = run_module("experiments.ablate", *args, env=env, cwd=tmp_path)
    runs = _cells("leave-one-out")
    finished = Counter(r.data.tags["seed"] for r in runs if r.info.status == "FINISHED")
    assert finished == {"0": 1, "1": 1}, rerun.stdout  # none lost, none twice
    assert all(MlflowClient().get_run(r.info.run_id).info.status != "FINISHED" for r in killed)
    for run in (r for r in runs if r.info.status == "FINISHED"):
        assert int(run.data.tags["resumed_from_epoch"]) >= 1 and "pack" in run.data.tags
        history = MlflowClient().get_metric_history(run.info.run_id, "val_accuracy")
        assert sorted(m.step for m in history) == [0, 1, 2]
    assert not list(store.glob("checkpoints/*/state.json")), "finished runs' checkpoints are removed"


# -- ablate --offline --pack: packed cells saved as folders, imported as their own runs ----------------------------


def test_offline_pack_groups_cells_that_share_a_model_structure():
    from mnist_ablation.offline import pack_groups
    from mnist_ablation.studies import SEED_SCRIPT
    from mnist_ablation.sweep import Cell

    configs = {"a": BASELINE, "b": BASELINE.replace(augmentation=False), "c": BASELINE.replace(batch_norm=False),
               "s": BASELINE.replace(pipeline=SEED_SCRIPT)}
    cells = [Cell(arm, seed, f"{arm}{seed}") for seed in range(2) for arm in configs]
    groups = pack_groups(cells, lambda cell: configs[cell.arm], pack=3)
    assert [[c.key for c in g] for g in groups] == [["a-seed0", "b-seed0", "a-seed1"], ["b-seed1"],
                                                    ["c-seed0", "c-seed1"], ["s-seed0"], ["s-seed1"]]
    assert [len(g) for g in pack_groups(cells, lambda cell: configs[cell.arm], pack=1)] == [1] * 8


@pytest.mark.slow
def test_offline_pack_saves_each_member_as_its_own_cell_and_imports_it_with_its_pack_tag(tmp_path, data_dir):
    pytest.importorskip("jax")
    from mnist_ablation import offline

    from helpers import run_module

    uri, cells = f"sqlite:///{tmp_path}/store.db", tmp_path / "cells"
    env = command_env(uri, data_dir)
    trained = run_module("experiments.ablate", *PACK_STUDY, "--pack", "2", "--offline", str(cells), env=env,
                         cwd=tmp_path)
    assert "pack of 2: baseline-seed0, baseline-seed1" in trained.stdout
    saved = offline.saved_cells(cells)
    assert [path.name for path in saved] == ["baseline-seed0", "baseline-seed1"]
    records = [offline.load_result(path)[1] for path in saved]
    assert [r["pack"].split(":")[0] for r in records] == ["1/2", "2/2"]
    assert len({r["pack"].split(":")[1] for r in records}) == 1  # one pack
    assert all(r["keras_backend"] == "jax" and r["seed"] == i for i, r in enumerate(records))
    assert not any((cells / offline.CHECKPOINTS).glob("*/*")), "a saved member's checkpoint is removed"
    again = run_module("experiments.ablate", *PACK_STUDY, "--pack", "2", "--offline", str(cells), env=env,
                       cwd=tmp_path)
    assert "0 cell(s) to train, 2 already saved" in again.stdout  # nothing trained twice

    run_module("experiments.ablate", *PACK_STUDY, "--import-offline", str(cells), env=env, cwd=tmp_path)
    runs = _cells(uri)
    assert sorted(runs) == ["baseline-seed0", "baseline-seed1"]
    for name, record in zip(sorted(runs), records, strict=True):
        assert runs[name]["status"] == "FINISHED" and runs[name]["tags"]["pack"] == record["pack"]
        assert runs[name]["tags"]["trained_offline"] == "true"
