"""The model explorer: MNIST preprocessing of drawings, the Explainer on every architecture and on JAX, run
selection, request validation, and the JSON API of a real server.

Pure tests build untrained models or talk to the app in process (no model is ever loaded for a refused
request). The ``slow`` tests talk over HTTP to ``python -m experiments.serve`` serving four tiny trained
runs, one of them a pooling-free net and one with an arm named in HTML markup (tests/explorer_fixtures.py).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from mnist_ablation.preprocess import (
    BOX_SIZE,
    CENTER,
    area_resize,
    area_resize_matrix,
    bounding_box,
    center_of_mass,
    mnist_preprocess,
)

from explorer_fixtures import ALLOWED_HOST, ARMS, MARKUP_ARM, NO_POOL_ARM

REPO_ROOT = Path(__file__).resolve().parent.parent
PROBABILITY_COLUMNS = [f"prob_{k}" for k in range(10)]


# ---------- MNIST preprocessing of drawings (pure) ----------
def _ink_box(image: np.ndarray) -> tuple[int, int]:
    top, bottom, left, right = bounding_box(image, threshold=0.0)
    return bottom - top, right - left


def test_blank_drawing_gives_a_blank_image():
    image = mnist_preprocess(np.zeros((100, 80)))
    assert image.shape == (28, 28) and image.dtype == np.float32
    assert not image.any()


def test_small_square_far_off_centre_is_scaled_to_20_and_centred_by_mass():
    drawing = np.zeros((200, 200))
    drawing[150:170, 5:25] = 1.0  # a 20x20 blob in a corner of a large canvas
    image = mnist_preprocess(drawing)
    assert _ink_box(image) == (BOX_SIZE, BOX_SIZE)
    row, column = center_of_mass(image)
    assert abs(row - CENTER[0]) <= 0.5 and abs(column - CENTER[1]) <= 0.5
    assert image.max() == pytest.approx(1.0)


def test_aspect_ratio_is_kept_and_longer_side_becomes_20():
    drawing = np.zeros((120, 120))
    drawing[10:90, 50:70] = 1.0  # 80 tall, 20 wide: scale 1/4 gives 20 x 5
    image = mnist_preprocess(drawing)
    assert _ink_box(image) == (20, 5)
    wide = mnist_preprocess(drawing.T)
    assert _ink_box(wide) == (5, 20)


def test_centring_is_by_centre_of_mass_not_by_bounding_box():
    # An L: heavy vertical bar on the left, thin foot. Its mass sits left of its bounding box's middle.
    drawing = np.zeros((60, 60))
    drawing[0:40, 0:10] = 1.0
    drawing[34:40, 0:30] = 1.0
    image = mnist_preprocess(drawing)
    row, column = center_of_mass(image)
    assert abs(row - CENTER[0]) <= 0.5 and abs(column - CENTER[1]) <= 0.5
    top, bottom, left, right = bounding_box(image, threshold=0.0)
    box_middle_column = (left + right - 1) / 2
    assert box_middle_column > CENTER[1] + 1.5, "the box must be shifted right so the mass is centred"


def test_a_lopsided_digit_is_shifted_only_as_far_as_the_field_allows():
    # Mass far to the left of a 20x20 box: centring it exactly would push the box off the field.
    drawing = np.zeros((40, 40))
    drawing[:, 0:8] = 1.0
    drawing[38:40, :] = 1.0
    image = mnist_preprocess(drawing)
    top, bottom, left, right = bounding_box(image, threshold=0.0)
    assert (bottom - top, right - left) == (BOX_SIZE, BOX_SIZE)
    assert right == 28, "the box is pushed as far right as it fits, not cut"
    assert center_of_mass(image)[1] < CENTER[1] - 0.5


def test_position_and_size_of_the_drawing_do_not_matter():
    stroke = np.zeros((40, 40))
    stroke[5:35, 18:24] = 1.0
    stroke[5:11, 8:24] = 1.0  # a crude "7"
    here = np.zeros((300, 300))
    here[20:60, 200:240] = stroke
    there = np.zeros((300, 300))
    there[150:190, 30:70] = stroke
    assert np.array_equal(mnist_preprocess(here), mnist_preprocess(there))
    doubled = np.zeros((300, 300))
    doubled[100:180, 100:180] = np.kron(stroke, np.ones((2, 2)))
    assert np.abs(mnist_preprocess(doubled) - mnist_preprocess(here)).max() < 1e-6


def test_mnist_digits_pass_through_nearly_unchanged(mnist):
    # MNIST digits were made by this recipe, so re-applying it must (almost) leave them alone.
    images = mnist.x_test[:300, :, :, 0]
    again = np.stack([mnist_preprocess(image) for image in images])
    assert np.abs(again - images).mean() < 0.01
    assert np.mean(np.abs(again - images).max(axis=(1, 2)) < 1e-3) > 0.8


def test_area_resize_keeps_mean_intensity_and_rows_sum_to_one():
    matrix = area_resize_matrix(112, 20)
    assert matrix.shape == (20, 112)
    np.testing.assert_allclose(matrix.sum(axis=1), 1.0)
    image = np.random.default_rng(0).random((112, 84))
    assert area_resize(image, 20, 15).mean() == pytest.approx(image.mean(), rel=1e-9)


@pytest.mark.parametrize("drawing, message", [
    (np.full((10, 10), 1.5), "in [0, 1]"),
    (np.full((10, 10), -0.1), "in [0, 1]"),
    (np.full((10, 10), np.nan), "finite"),
    (np.zeros((2, 3, 4)), "2-D"),
])
def test_bad_drawings_are_refused_with_a_reason(drawing, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        mnist_preprocess(drawing)


# ---------- the Explainer on every architecture (untrained models; pure) ----------
EXPLAINED_ARCHITECTURES = {  # architecture -> (overrides, feature layers, their (height, width, channels))
    "seed": ({}, ["block1_conv", "block2_conv", "block3_conv"], [(26, 26, 32), (24, 24, 64), (10, 10, 64)]),
    "extra_block": ({"architecture": "extra_block"}, ["block1_conv", "block2_conv", "block3_conv", "block4_conv"],
                    [(26, 26, 32), (24, 24, 64), (10, 10, 64), (10, 10, 128)]),
    "no_pool_3x3": ({"architecture": "no_pool_3x3", "conv_filters": (4, 6, 8)},
                    ["block1_relu", "block2_relu", "block3_relu"], [(26, 26, 4), (24, 24, 6), (22, 22, 8)]),
    "no_pool_5x5": ({"architecture": "no_pool_5x5", "conv_filters": (4, 8)},
                    ["block1_relu", "block2_relu"], [(24, 24, 4), (20, 20, 8)]),
    "no_pool_7x7": ({"architecture": "no_pool_7x7", "conv_filters": (4, 8), "batch_norm": False},
                    ["block1_relu", "block2_relu"], [(22, 22, 4), (16, 16, 8)]),
}


@pytest.mark.parametrize("architecture", EXPLAINED_ARCHITECTURES)
def test_explainer_finds_the_logits_and_explains_every_architecture(architecture, mnist):
    import keras

    from mnist_ablation.config import BASELINE
    from mnist_ablation.explain import Explainer
    from mnist_ablation.model import build_model

    overrides, layers, shapes = EXPLAINED_ARCHITECTURES[architecture]
    keras.utils.set_random_seed(0)
    model = build_model(BASELINE.replace(**overrides))
    explainer = Explainer(model)
    image = mnist.x_test[0, :, :, 0]
    logits = explainer.logits(image)
    probabilities = np.asarray(model.predict_on_batch(image[None, :, :, None]))
    # The logits are the softmax's input: softmax(logits) is the model's output.
    np.testing.assert_allclose(np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True), probabilities, atol=1e-5)

    result = explainer.explain(image)
    assert result.predicted_class == result.target_class == int(np.argmax(probabilities))
    np.testing.assert_allclose(result.probabilities, probabilities[0], atol=1e-5)
    assert result.saliency.shape == result.gradcam.shape == (28, 28)
    assert np.isfinite(result.saliency).all() and result.saliency.max() == pytest.approx(1.0)
    assert result.gradcam.min() >= 0 and result.gradcam.max() <= 1
    assert [a.layer for a in result.activations] == layers and result.gradcam_layer == layers[-1]
    assert [a.maps.shape for a in result.activations] == shapes
    assert all(a.maps.min() >= 0 for a in result.activations), "maps are taken after the ReLU"
    other = explainer.explain(image, target_class=(result.predicted_class + 1) % 10)
    assert not np.array_equal(other.saliency, result.saliency)
    with pytest.raises(ValueError, match="not a class"):
        explainer.explain(image, target_class=10)


def test_explainer_refuses_a_model_without_a_softmax_output():
    import keras

    from mnist_ablation.explain import Explainer

    inputs = keras.Input((28, 28, 1))
    features = keras.layers.Flatten()(keras.layers.Conv2D(2, 3, activation="relu")(inputs))
    model = keras.Model(inputs, keras.layers.Dense(10, name="scores")(features))
    with pytest.raises(ValueError, match="must end in a softmax .* its output layer is Dense 'scores'"):
        Explainer(model)


JAX_EXPLAIN_SCRIPT = """
import json, sys
import keras, numpy as np
from mnist_ablation.explain import Explainer
assert keras.backend.backend() == "jax", keras.backend.backend()
image = np.load(sys.argv[1])
for path in sys.argv[2:]:
    result = Explainer(keras.saving.load_model(path)).explain(image)
    np.savez(path + ".jax.npz", probabilities=result.probabilities, saliency=result.saliency, gradcam=result.gradcam,
             last_maps=result.activations[-1].maps, predicted=result.predicted_class)
print(json.dumps({"tensorflow_imported": "tensorflow" in sys.modules}))
"""


def test_explainer_on_the_jax_backend_matches_tensorflow(tmp_path, mnist):
    """Saliency and Grad-CAM of the same weights on JAX (a subprocess) and TensorFlow agree."""
    import keras

    from mnist_ablation.config import BASELINE
    from mnist_ablation.explain import Explainer
    from mnist_ablation.model import build_model

    keras.utils.set_random_seed(1)
    image = mnist.x_test[1, :, :, 0]
    np.save(tmp_path / "image.npy", image)
    expected = {}
    for name, overrides in (("seed", {}), ("no_pool", {"architecture": "no_pool_5x5", "conv_filters": (4, 8)})):
        path = tmp_path / f"{name}.keras"
        model = build_model(BASELINE.replace(**overrides))
        model.save(path)
        expected[path] = Explainer(model).explain(image)
    environment = {**os.environ, "KERAS_BACKEND": "jax", "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO_ROOT)}
    completed = subprocess.run([sys.executable, "-c", JAX_EXPLAIN_SCRIPT, str(tmp_path / "image.npy"),
                                *map(str, expected)], capture_output=True, text=True, env=environment, timeout=300)
    assert completed.returncode == 0, completed.stderr[-4000:]
    assert json.loads(completed.stdout.strip().splitlines()[-1]) == {"tensorflow_imported": False}
    for path, tensorflow in expected.items():
        jax = np.load(f"{path}.jax.npz")
        assert int(jax["predicted"]) == tensorflow.predicted_class
        np.testing.assert_allclose(jax["probabilities"], tensorflow.probabilities, atol=1e-5)
        np.testing.assert_allclose(jax["last_maps"], tensorflow.activations[-1].maps, atol=1e-4)
        assert np.isfinite(jax["saliency"]).all() and jax["saliency"].shape == (28, 28)
        np.testing.assert_allclose(jax["saliency"], tensorflow.saliency, atol=1e-3)
        np.testing.assert_allclose(jax["gradcam"], tensorflow.gradcam, atol=1e-3)


# ---------- which runs a study offers (real MLflow records, no training) ----------
def _cell_run(client, experiment_id, arm, seed, val_accuracy, status="FINISHED", test_accuracy=0.9, study="pick",
              config_hash=None, start_time=None):
    run = client.create_run(experiment_id, run_name=f"{arm}-seed{seed}", start_time=start_time,
                            tags={"study": study, "arm": arm, "seed": str(seed),
                                  "config_hash": config_hash or f"hash-{arm}", "mnist_ablation.role": "cell"})
    client.log_metric(run.info.run_id, "val_accuracy", val_accuracy - 0.2, step=0)
    client.log_metric(run.info.run_id, "val_accuracy", val_accuracy, step=1)  # the final epoch's value counts
    if test_accuracy is not None:
        client.log_metric(run.info.run_id, "test_accuracy", test_accuracy)
    client.set_terminated(run.info.run_id, status)
    return run.info.run_id


def test_study_offers_best_finished_seed_per_arm_baseline_first(tracking_uri):
    from mlflow.tracking import MlflowClient

    from mnist_ablation.explorer import study_runs_to_offer

    client = MlflowClient()
    experiment_id = client.create_experiment("ablation/pick")
    factorial_arm = "no_augmentation+no_batch_norm"
    _cell_run(client, experiment_id, factorial_arm, 0, 0.95)
    best_factorial = _cell_run(client, experiment_id, factorial_arm, 1, 0.97)
    _cell_run(client, experiment_id, factorial_arm, 2, 0.99, status="FAILED")  # failed runs are not offered
    baseline = _cell_run(client, experiment_id, "baseline", 0, 0.96)
    _cell_run(client, experiment_id, "baseline", 1, 0.94)
    augmentation_only = _cell_run(client, experiment_id, "augmentation_only", 0, 0.90)  # sorts before "baseline"
    client.create_run(experiment_id, run_name="pick", tags={"mnist_ablation.role": "study", "study": "pick"})

    offered = study_runs_to_offer("pick")
    assert [(run.label, run.run_id) for run in offered] == [
        ("baseline", baseline), ("augmentation_only", augmentation_only), (factorial_arm, best_factorial)]
    assert offered[2].val_accuracy == pytest.approx(0.97) and offered[2].seed == "1"

    every = study_runs_to_offer("pick", best_per_arm=False)
    assert len(every) == 5 and every[0].run_id == baseline and every[0].label == "baseline (seed 0)"
    assert [run.arm for run in every] == ["baseline", "baseline", "augmentation_only", factorial_arm, factorial_arm]


def test_study_offers_each_cells_usable_run_with_its_own_baseline_arm_first(tracking_uri):
    # The one rule for which run of a cell counts (sweep.usable_runs), and the baseline arm the study.json names.
    from mlflow.tracking import MlflowClient

    from mnist_ablation import naming, sweep
    from mnist_ablation.config import BASELINE
    from mnist_ablation.explorer import study_runs_to_offer
    from mnist_ablation.studies import Study

    study = Study("ref", "Does a wider dense layer beat the reference?",
                  {"wide": BASELINE.replace(dense_units=256), "reference": BASELINE}, baseline_arm="reference")
    plan = sweep.Plan(study, study.arms, range(3), {"train": "a", "test": "b"})
    client = MlflowClient()
    experiment_id = client.create_experiment(naming.ablation_experiment(study.name))
    parent = client.create_run(experiment_id, run_name=study.name,
                               tags={naming.ROLE_TAG: naming.STUDY_ROLE, naming.STUDY_TAG: study.name})
    client.log_dict(parent.info.run_id, plan.definition(plan.initial_cells, ["python"], "here"),
                    naming.STUDY_DEFINITION_ARTIFACT)
    start = 1_700_000_000_000

    def cell(arm, seed, val_accuracy, test_accuracy, status="FINISHED"):
        nonlocal start
        start += 10
        return _cell_run(client, experiment_id, arm, seed, val_accuracy, status, test_accuracy, study.name,
                         plan.cell(arm, seed).config_hash, start)

    reference = cell("reference", 0, 0.96, 0.95)
    cell("reference", 1, 0.94, 0.93)
    cell("wide", 0, 0.999, float("nan"))  # FINISHED without a test accuracy: a failed cell, not a result
    cell("wide", 1, 0.99, 0.98)  # the cell ran again: only its latest FINISHED run counts
    rerun = cell("wide", 1, 0.95, 0.94)
    cell("wide", 2, 0.93, 0.92)
    cell("wide", 2, 0.999, None, status="FAILED")  # a failed rerun: the cell's FINISHED run still counts

    offered = study_runs_to_offer(study.name)
    assert [(run.label, run.run_id) for run in offered] == [("reference", reference), ("wide", rerun)]
    assert offered[1].val_accuracy == pytest.approx(0.95) and offered[1].test_accuracy == pytest.approx(0.94)
    every = study_runs_to_offer(study.name, best_per_arm=False)
    assert [(run.arm, run.seed) for run in every] == [("reference", "0"), ("reference", "1"), ("wide", "1"),
                                                      ("wide", "2")]
    assert every[2].run_id == rerun


def test_unknown_study_and_run_fail_with_what_exists(tracking_uri):
    from mlflow.tracking import MlflowClient

    from mnist_ablation.explorer import ExplorerError, UnknownRunError, runs_by_id, study_runs_to_offer

    MlflowClient().create_experiment("ablation/leave-one-out")
    with pytest.raises(ExplorerError, match="Studies found there: leave-one-out"):
        study_runs_to_offer("no-such-study")
    with pytest.raises(ExplorerError, match="has no FINISHED runs"):
        study_runs_to_offer("leave-one-out")
    with pytest.raises(UnknownRunError, match="not in the tracking store"):
        runs_by_id(["0123456789abcdef0123456789abcdef"])


def test_command_refuses_an_unknown_study_with_exit_code_2(tracking_uri, capsys):
    from mlflow.tracking import MlflowClient

    from experiments.cli import run_command
    from experiments.serve import main

    MlflowClient().create_experiment("ablation/leave-one-out")
    with pytest.raises(SystemExit) as exited:  # the command runs through run_command like every other
        run_command(lambda: main(["--study", "nope", "--tracking-uri", tracking_uri, "--port", "8765"]))
    assert exited.value.code == 2
    error = capsys.readouterr().err
    assert "no study 'nope'" in error and "leave-one-out" in error


def test_library_import_changes_nothing_and_the_documented_module_command_still_runs():
    # Importing the library must not set environment variables or pull in the command layer.
    probe = ("import os, sys; before = dict(os.environ); import mnist_ablation.serve; "
             "print(dict(os.environ) == before, any(m.split('.')[0] == 'experiments' for m in sys.modules))")
    environment = {key: value for key, value in os.environ.items()
                   if key not in ("TF_CPP_MIN_LOG_LEVEL", "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR")}
    environment["PYTHONPATH"] = str(REPO_ROOT)
    imported = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=environment,
                              cwd=REPO_ROOT, timeout=120)
    assert imported.stdout.split() == ["True", "False"], imported.stderr[-3000:]
    usage = subprocess.run([sys.executable, "-m", "experiments.serve", "--help"], capture_output=True, text=True,
                           env=environment, cwd=REPO_ROOT, timeout=120)
    assert usage.returncode == 0, usage.stderr[-3000:]
    assert "--allowed-host" in usage.stdout and "--study" in usage.stdout
    former = subprocess.run([sys.executable, "-m", "mnist_ablation.serve", "--help"], capture_output=True, text=True,
                            env=environment, cwd=REPO_ROOT, timeout=120)
    assert former.returncode != 0 and "python -m experiments.serve" in former.stderr, "it says where the command is"


def test_static_files_ship_with_the_package():
    import tomllib

    from mnist_ablation.serve import STATIC_DIR

    for name in ("index.html", "app.js", "style.css"):
        assert (STATIC_DIR / name).is_file()
    package_data = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    assert "static/*" in package_data["mnist_ablation"]


def test_page_has_no_inline_script_or_style_and_never_parses_html_from_strings():
    from mnist_ablation.serve import STATIC_DIR

    page = (STATIC_DIR / "index.html").read_text()
    assert re.findall(r"<script(?![^>]*\bsrc=)[^>]*>", page) == [], "inline scripts are refused by the page's CSP"
    assert "<style" not in page and " style=" not in page and not re.search(r"\son[a-z]+=", page)
    script = (STATIC_DIR / "app.js").read_text()
    for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(", "setAttribute(\"style"):
        assert sink not in script.replace("innerHTML and friends", ""), f"app.js uses {sink}"


# ---------- request and response models, in process (no model is loaded for a refused request) ----------
FAKE_RUN_ID = "f" * 32
JSON = {"Content-Type": "application/json"}  # the only Content-Type a POST may have (issue 24, finding 9)


@pytest.fixture(scope="module")
def app_client():
    from fastapi.testclient import TestClient

    from mnist_ablation.explorer import ModelExplorer, OfferedRun
    from mnist_ablation.serve import create_app

    run = OfferedRun(FAKE_RUN_ID, "baseline", "baseline-seed0", "1", "baseline", "0", 0.99, 0.99)
    with TestClient(create_app(ModelExplorer([run]), allowed_hosts=["testserver"])) as client:
        yield client


def _image(value=0.0, rows=28, columns=28):
    return [[value] * columns for _ in range(rows)]


def _image_text(token: str, row: int = 0, column: int = 3) -> bytes:
    """A 28x28 image as JSON text with one pixel written as ``token`` (NaN, 1e400...)."""
    rows = [[token if (r, c) == (row, column) else "0.0" for c in range(28)] for r in range(28)]
    return ('{"image": [' + ",".join("[" + ",".join(values) + "]" for values in rows) + "]}").encode()


ODD_BODIES = [  # (name, body, status, words the detail must contain)
    ("deep nesting", b'{"image": ' + b"[" * 5000 + b"]" * 5000 + b"}", 400, "recursion limit exceeded"),
    ("deep nesting, no object", b"[" * 100_000, 400, "not valid JSON"),
    ("5,000-digit number", b'{"image": [[' + b"9" * 5000 + b"]]}", 400, "number out of range"),
    ("5,000-digit target", b'{"image": [], "run_id": ' + b"1" * 5000 + b"}", 400, "number out of range"),
    ("1e400", _image_text("1e400"), 422, "NaN or infinite values (first at row 0, column 3)"),
    ("NaN token", _image_text("NaN", 4, 5), 422, "NaN or infinite values (first at row 4, column 5)"),
    ("Infinity token", _image_text("-Infinity"), 422, "NaN or infinite"),
    ("empty drawing", b'{"drawing": []}', 422, "'drawing': List should have at least 1 item"),
    ("drawing of empty rows", b'{"drawing": [[], []]}', 422, "'drawing' row 0: List should have at least 1 item"),
    ("ragged drawing", b'{"drawing": [[0.1, 0.2], [0.3]]}', 422, "row 1 has 1 values but row 0 has 2"),
    ("empty body", b"", 400, "not valid JSON"),
    ("non-JSON", b"\x89PNG not json", 400, "not valid JSON"),
    ("JSON array", b"[1, 2, 3]", 400, "must be a JSON object, got a JSON array"),
    ("JSON string", b'"image"', 400, "must be a JSON object, got a JSON string"),
    ("wrong row count", json.dumps({"image": _image(rows=27)}).encode(), 422, "'image': List should have at least 28"),
    ("wrong row length", json.dumps({"image": _image()[:27] + [[0.0] * 30]}).encode(), 422,
     "'image' row 27: List should have at most 28"),
    ("pixel above 1", json.dumps({"image": _image(255.0)}).encode(), 422, "Divide 0-255 pixel values by 255"),
    ("negative pixel", json.dumps({"image": _image(-0.5)}).encode(), 422, "found -0.5 at row 0, column 0"),
    ("string pixel", json.dumps({"image": _image()[:5] + [["x"] * 28] + _image()[6:]}).encode(), 422,
     "'image' row 5, column 0: Input should be a valid number, got 'x'"),
    ("numeric string pixel", json.dumps({"image": [["0.5"] * 28] * 28}).encode(), 422, "got '0.5'"),
    ("boolean pixel", json.dumps({"image": [[True] * 28] * 28}).encode(), 422, "valid number, got True"),
    ("flat list", json.dumps({"image": [0.0] * 28}).encode(), 422, "'image' row 0: Input should be a valid array"),
    ("image as a string", json.dumps({"image": "zeros"}).encode(), 422, "'image': Input should be a valid array"),
    ("neither image nor drawing", b"{}", 422, "send exactly one of 'image'"),
    ("both image and drawing", json.dumps({"image": _image(), "drawing": _image()}).encode(), 422,
     "send exactly one of 'image'"),
    ("misspelt field", json.dumps({"image": _image(), "runid": "x"}).encode(), 422, "'runid': Extra inputs"),
    ("run id a number", json.dumps({"image": _image(), "run_id": 5}).encode(), 422, "'run_id': Input should be a "
                                                                                    "valid string, got 5"),
    ("unknown run", json.dumps({"image": _image(), "run_id": "feedface"}).encode(), 404, "not offered by this server"),
    ("drawing too tall", json.dumps({"drawing": _image(rows=600, columns=2)}).encode(), 422, "at most 560 items"),
    ("oversized body", b"[" + b"0," * 1_200_000 + b"0]", 413, "larger than the limit of 2000000 bytes"),
]


@pytest.mark.parametrize("name, body, status, words", ODD_BODIES, ids=[b[0] for b in ODD_BODIES])
def test_odd_predict_bodies_get_a_4xx_naming_the_problem(app_client, name, body, status, words):
    answer = app_client.post("/api/predict", content=body, headers={"Content-Type": "application/json"})
    assert answer.status_code == status, answer.text
    assert words in answer.json()["detail"]


@pytest.mark.parametrize("path, body, words", [
    ("/api/saliency", {"image": _image(), "target_class": 10}, "'target_class': Input should be less than or equal"),
    ("/api/saliency", {"image": _image(), "target_class": 2.0}, "'target_class': Input should be a valid integer"),
    ("/api/saliency", {"image": _image(), "target_class": True}, "valid integer, got True"),
    ("/api/saliency", {"image": _image(), "run_id": "ensemble"}, "explanations are per model"),
    ("/api/activations", {"image": _image(), "max_channels": 0}, "'max_channels': Input should be greater than"),
    ("/api/activations", {"image": _image(), "max_channels": 65}, "'max_channels': Input should be less than"),
    ("/api/preprocess", {"image": _image()}, "'drawing': Field required"),
    ("/api/preprocess", {"drawing": [[2.0]]}, "'drawing' pixels must lie in [0, 1]"),
])
def test_odd_explanation_and_preprocess_bodies_get_a_422(app_client, path, body, words):
    answer = app_client.post(path, json=body)
    assert answer.status_code == 422, answer.text
    assert words in answer.json()["detail"]


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data",
                                          None])
def test_bodies_must_be_sent_as_json(app_client, content_type):
    # Issue 24, finding 9: a page on any site may POST text/plain or a form here without a CORS preflight.
    drawing = np.zeros((30, 30))
    drawing[5:25, 12:16] = 1.0
    body = json.dumps({"drawing": drawing.tolist()})
    headers = {} if content_type is None else {"Content-Type": content_type}
    refused = app_client.post("/api/preprocess", content=body, headers=headers)
    assert refused.status_code == 415, refused.text
    assert "Content-Type: application/json" in refused.json()["detail"]
    answer = app_client.post("/api/preprocess", content=body,
                             headers={"Content-Type": "application/json; charset=utf-8"})
    assert answer.status_code == 200, answer.text
    np.testing.assert_allclose(answer.json()["image"], mnist_preprocess(drawing), atol=1e-4)


def test_bad_query_parameters_get_a_422_naming_them(app_client):
    answer = app_client.get(f"/api/runs/{FAKE_RUN_ID}/examples", params={"sort": "random"})
    assert answer.status_code == 422
    assert answer.json()["detail"] == ("query parameter 'sort': Input should be 'confidence', 'true_probability' "
                                       "or 'index', got 'random'")
    assert app_client.get(f"/api/runs/{FAKE_RUN_ID}/examples", params={"label": 10}).status_code == 422
    assert app_client.get("/api/runs/feedface/confusion").status_code == 404


def test_openapi_documents_every_request_and_response_body(app_client):
    spec = app_client.get("/api/openapi.json").json()
    schemas = spec["components"]["schemas"]

    def resolve(schema):
        return schemas[schema["$ref"].rsplit("/", 1)[1]] if "$ref" in schema else schema

    expected_bodies = {"/api/predict": {"image", "drawing", "run_id"}, "/api/preprocess": {"drawing"},
                       "/api/saliency": {"image", "drawing", "run_id", "target_class"},
                       "/api/activations": {"image", "drawing", "run_id", "target_class", "max_channels"}}
    for path, fields in expected_bodies.items():
        operation = spec["paths"][path]["post"]
        body = resolve(operation["requestBody"]["content"]["application/json"]["schema"])
        assert set(body["properties"]) == fields and body["additionalProperties"] is False
        assert {"400", "413", "422"} <= set(operation["responses"])
    image = spec["paths"]["/api/predict"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    image_rows = next(s for s in image["properties"]["image"]["anyOf"] if s["type"] == "array")
    assert image_rows["minItems"] == image_rows["maxItems"] == 28
    assert image_rows["items"]["items"] == {"type": "number", "minimum": 0, "maximum": 1}
    for path, item in spec["paths"].items():
        for method, operation in item.items():
            answer = resolve(operation["responses"]["200"]["content"]["application/json"]["schema"])
            assert answer.get("properties"), f"{method.upper()} {path} has no response schema"
    assert "predicted_class" in schemas["PredictResponse"]["properties"]


def test_docs_page_is_served_with_a_policy_admitting_exactly_its_own_inline_script(app_client):
    page = app_client.get("/api/docs")
    assert page.status_code == 200 and "/api/openapi.json" in page.text
    policy = page.headers["content-security-policy"]
    for script in re.findall(r"<script>(.*?)</script>", page.text, flags=re.DOTALL):
        digest = base64.b64encode(hashlib.sha256(script.encode()).digest()).decode()
        assert f"'sha256-{digest}'" in policy
    assert "'unsafe-inline'" not in policy.split("script-src", 1)[1].split(";", 1)[0]


# ---------- the JSON API of a real server (four tiny trained runs) ----------
@pytest.fixture(scope="module")
def client(explorer_server):
    with httpx.Client(base_url=explorer_server.url, timeout=120) as http:
        yield http


@pytest.fixture(scope="module")
def logged_predictions(explorer_store):
    """Each arm's logged test predictions, read straight from the store."""
    import mlflow

    from mnist_ablation import store

    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(explorer_store["uri"])
    try:
        return {arm: store.read_predictions(run_id) for arm, run_id in explorer_store["runs"].items()}
    finally:
        mlflow.set_tracking_uri(previous)


@pytest.mark.slow
def test_health_lists_the_study_runs_with_baseline_loaded(client, explorer_store):
    health = client.get("/api/health").json()
    assert health["status"] == "ok"
    assert [model["label"] for model in health["models"]] == list(ARMS)
    assert health["default_run_id"] == explorer_store["runs"]["baseline"]
    assert health["models"][0]["loaded"] is True


@pytest.mark.slow
@pytest.mark.parametrize("arm", ARMS)
def test_predict_on_test_images_matches_the_logged_predictions(client, mnist, explorer_store, logged_predictions,
                                                               arm):
    for index in (0, 1, 4321, 9999):
        image = mnist.x_test[index, :, :, 0].tolist()
        answer = client.post("/api/predict", json={"image": image, "run_id": explorer_store["runs"][arm]})
        assert answer.status_code == 200, answer.text
        body = answer.json()
        logged = logged_predictions[arm].set_index("index").loc[index]
        np.testing.assert_allclose(body["probabilities"], logged[PROBABILITY_COLUMNS].to_numpy(float), atol=1e-5)
        assert body["predicted_class"] == int(logged["predicted"])
        assert sum(body["probabilities"]) == pytest.approx(1.0, abs=1e-4)
        assert "image" not in body and "members" not in body  # an MNIST image is used as is


@pytest.mark.slow
def test_predict_on_a_drawing_applies_mnist_preprocessing(client):
    drawing = np.zeros((112, 112))
    drawing[10:100, 60:72] = 1.0  # a "1" off to the right
    answer = client.post("/api/predict", json={"drawing": drawing.tolist()}).json()
    expected = mnist_preprocess(drawing)
    np.testing.assert_allclose(answer["image"], expected, atol=1e-4)
    same = client.post("/api/predict", json={"image": answer["image"]}).json()
    np.testing.assert_allclose(same["probabilities"], answer["probabilities"], atol=1e-4)


@pytest.mark.slow
def test_ensemble_averages_every_offered_run(client, mnist, explorer_store):
    image = mnist.x_test[7, :, :, 0].tolist()
    members = [client.post("/api/predict", json={"image": image, "run_id": run_id}).json()["probabilities"]
               for run_id in explorer_store["runs"].values()]
    ensemble = client.post("/api/predict", json={"image": image, "run_id": "ensemble"}).json()
    np.testing.assert_allclose(ensemble["probabilities"], np.mean(members, axis=0), atol=1e-6)
    assert sorted(ensemble["members"]) == sorted(explorer_store["runs"].values())


@pytest.mark.slow
def test_server_answers_odd_bodies_with_a_4xx_and_keeps_serving(client):
    def chunks():  # no Content-Length: the limit must hold while the body streams in
        for _ in range(300):
            yield b"0" * 10_000

    odd = [
        (client.post("/api/predict", content=b'{"image": ' + b"[" * 5000 + b"]" * 5000 + b"}", headers=JSON), 400),
        (client.post("/api/predict", content=b'{"image": [[' + b"9" * 5000 + b"]]}", headers=JSON), 400),
        (client.post("/api/saliency", content=_image_text("1e400"), headers=JSON), 422),
        (client.post("/api/activations", content=_image_text("NaN"), headers=JSON), 422),
        (client.post("/api/predict", json={"drawing": []}), 422),
        (client.post("/api/predict", content=b"{broken", headers=JSON), 400),
        (client.post("/api/predict", content=chunks(), headers=JSON), 413),
        (client.post("/api/predict", content=b"[" + b"0," * 1_200_000 + b"0]", headers=JSON), 413),
    ]
    for answer, status in odd:
        assert answer.status_code == status, answer.text
        assert answer.json()["detail"]
    assert client.get("/api/health").json()["status"] == "ok"
    assert client.post("/api/predict", json={"image": _image()}).status_code == 200


@pytest.mark.slow
@pytest.mark.parametrize("arm, gradcam_layer", [("baseline", "block3_conv"), (NO_POOL_ARM, "block3_relu")])
def test_saliency_and_gradcam_explain_the_predicted_or_chosen_class(client, mnist, explorer_store, arm, gradcam_layer):
    run_id = explorer_store["runs"][arm]
    image = mnist.x_test[3, :, :, 0].tolist()
    predicted = client.post("/api/predict", json={"image": image, "run_id": run_id}).json()["predicted_class"]
    answer = client.post("/api/saliency", json={"image": image, "run_id": run_id})
    assert answer.status_code == 200, answer.text
    answer = answer.json()
    assert answer["predicted_class"] == answer["target_class"] == predicted
    saliency, gradcam = np.array(answer["saliency"]), np.array(answer["gradcam"])
    assert saliency.shape == gradcam.shape == (28, 28)
    assert saliency.min() >= 0 and saliency.max() == 255  # scaled so the strongest pixel is 255
    assert gradcam.min() >= 0 and gradcam.max() <= 255
    assert answer["gradcam_layer"] == gradcam_layer
    other = (predicted + 1) % 10
    chosen = client.post("/api/saliency", json={"image": image, "target_class": other, "run_id": run_id}).json()
    assert chosen["target_class"] == other and chosen["saliency"] != answer["saliency"]


@pytest.mark.slow
@pytest.mark.parametrize("arm, layers", [
    ("baseline", [("block1_conv", [26, 26, 32]), ("block2_conv", [24, 24, 64]), ("block3_conv", [10, 10, 64])]),
    (NO_POOL_ARM, [("block1_relu", [24, 24, 8]), ("block2_relu", [20, 20, 16]), ("block3_relu", [16, 16, 16])]),
])
def test_activations_give_each_conv_layer_strongest_channels(client, mnist, explorer_store, arm, layers):
    image = mnist.x_test[0, :, :, 0].tolist()
    answer = client.post("/api/activations", json={"image": image, "max_channels": 5,
                                                   "run_id": explorer_store["runs"][arm]})
    assert answer.status_code == 200, answer.text
    answer = answer.json()
    assert [(layer["layer"], layer["shape"]) for layer in answer["layers"]] == layers
    for layer in answer["layers"]:
        means = [channel["mean"] for channel in layer["channels"]]
        assert len(means) == 5 and means == sorted(means, reverse=True)
        height, width, _ = layer["shape"]
        assert np.array(layer["channels"][0]["map"]).shape == (height, width)


@pytest.mark.slow
def test_confusion_matrix_is_the_runs_logged_predictions(client, explorer_store, logged_predictions):
    run_id = explorer_store["runs"][NO_POOL_ARM]
    answer = client.get(f"/api/runs/{run_id}/confusion").json()
    frame = logged_predictions[NO_POOL_ARM]
    expected = np.zeros((10, 10), int)
    np.add.at(expected, (frame["label"], frame["predicted"]), 1)
    assert np.array_equal(answer["matrix"], expected)
    assert answer["total"] == 10_000
    assert answer["accuracy"] == pytest.approx(float(np.mean(frame["label"] == frame["predicted"])))


@pytest.mark.slow
def test_examples_of_a_cell_sorted_by_confidence_with_mnist_pixels(client, mnist, explorer_store, logged_predictions):
    run_id = explorer_store["runs"]["baseline"]
    frame = logged_predictions["baseline"]
    mistakes = frame[frame["label"] != frame["predicted"]]
    label, predicted = mistakes.groupby(["label", "predicted"]).size().idxmax()  # the biggest mistake cell
    answer = client.get(f"/api/runs/{run_id}/examples",
                        params={"label": label, "predicted": predicted, "limit": 30}).json()
    cell = frame[(frame["label"] == label) & (frame["predicted"] == predicted)]
    assert answer["total"] == len(cell)
    examples = answer["examples"]
    assert len(examples) == min(30, len(cell))
    assert all(e["label"] == label and e["predicted"] == predicted for e in examples)
    confidences = [e["confidence"] for e in examples]
    assert confidences == sorted(confidences, reverse=True)
    assert confidences[0] == pytest.approx(float(cell[PROBABILITY_COLUMNS].max(axis=1).max()), abs=1e-6)
    first = examples[0]
    np.testing.assert_array_equal(first["image"], np.rint(mnist.x_test[first["index"], :, :, 0] * 255))

    hardest = client.get(f"/api/runs/{run_id}/examples",
                         params={"label": label, "predicted": predicted, "sort": "true_probability"}).json()
    true_probabilities = [e["true_probability"] for e in hardest["examples"]]
    assert true_probabilities == sorted(true_probabilities)

    page_two = client.get(f"/api/runs/{run_id}/examples",
                          params={"label": label, "predicted": predicted, "limit": 2, "offset": 2}).json()
    assert [e["index"] for e in page_two["examples"]] == [e["index"] for e in examples[2:4]]
    assert client.get("/api/runs/feedface/examples").status_code == 404


@pytest.mark.slow
def test_run_details_have_curves_metrics_and_the_mlflow_link(client, explorer_store):
    run_id = explorer_store["runs"]["baseline"]
    details = client.get(f"/api/runs/{run_id}").json()
    assert details["label"] == "baseline"
    assert details["mlflow_url"] == f"http://mlflow.example:5001/#/experiments/{details['experiment_id']}/runs/{run_id}"
    assert [point["epoch"] for point in details["history"]["val_accuracy"]] == [0]
    assert 0 < details["metrics"]["test_accuracy"] <= 1
    assert details["params"]["train_subset"] == "300" and details["params"]["batch_norm"] == "True"
    offered = client.get("/api/runs").json()
    assert offered["ensemble"] == "ensemble" and [r["label"] for r in offered["runs"]] == list(ARMS)


@pytest.mark.slow
def test_a_run_named_in_markup_is_returned_verbatim_as_json(client, explorer_store):
    run_id = explorer_store["runs"][MARKUP_ARM]
    offered = {run["run_id"]: run for run in client.get("/api/runs").json()["runs"]}
    assert offered[run_id]["label"] == offered[run_id]["arm"] == MARKUP_ARM
    assert offered[run_id]["run_name"] == f"{MARKUP_ARM}-seed0"
    details = client.get(f"/api/runs/{run_id}")
    assert details.headers["content-type"] == "application/json"
    assert details.json()["label"] == MARKUP_ARM and details.json()["params"]["architecture"] == "no_pool_7x7"


@pytest.mark.slow
def test_host_header_must_name_this_server(client, explorer_server):
    assert client.get("/api/health", headers={"Host": "evil.example"}).status_code == 400
    assert client.get("/", headers={"Host": f"evil.example:{explorer_server.port}"}).status_code == 400
    for host in (f"127.0.0.1:{explorer_server.port}", f"localhost:{explorer_server.port}", ALLOWED_HOST):
        assert client.get("/api/health", headers={"Host": host}).status_code == 200, host


@pytest.mark.slow
def test_every_answer_carries_the_content_security_policy_and_nosniff(client):
    for answer in (client.get("/"), client.get("/static/app.js"), client.get("/api/runs"),
                   client.post("/api/predict", content=b"{")):
        policy = answer.headers["content-security-policy"]
        assert "script-src 'self';" in policy and "unsafe-inline" not in policy and "frame-ancestors 'none'" in policy
        assert answer.headers["x-content-type-options"] == "nosniff"


@pytest.mark.slow
def test_page_and_static_files_are_served(client):
    page = client.get("/")
    assert page.status_code == 200 and '<canvas id="pad"' in page.text
    script = client.get("/static/app.js")
    assert script.status_code == 200 and "/api/predict" in script.text


@pytest.mark.slow
def test_prediction_answers_well_under_50_ms(client, mnist):
    image = {"image": mnist.x_test[11, :, :, 0].tolist()}
    for _ in range(5):
        client.post("/api/predict", json=image)
    latencies = []
    for _ in range(60):
        start = time.perf_counter()
        assert client.post("/api/predict", json=image).status_code == 200
        latencies.append((time.perf_counter() - start) * 1000)
    median = float(np.median(latencies))
    assert median < 50, f"median prediction latency {median:.1f} ms (all: {sorted(latencies)})"

