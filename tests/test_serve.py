"""The model explorer: MNIST preprocessing of drawings, run selection, and the JSON API of a real server.

The API tests train two tiny runs (300 images, 1 epoch) into a temporary SQLite MLflow store laid out as
an ablation study, start ``python -m mnist_ablation.serve --study ...`` as a real uvicorn process on a
free 127.0.0.1 port, and talk to it over HTTP. ``tests/test_browser.py`` reuses the same store.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from mnist_ablation.preprocess import (BOX_SIZE, CENTER, area_resize, area_resize_matrix, bounding_box,
                                       center_of_mass, mnist_preprocess)
from servers import wait_for_health

REPO_ROOT = Path(__file__).resolve().parent.parent
STUDY = "explorer-test"
ARMS = ("baseline", "no_batch_norm")
SERVER_START_TIMEOUT = 240.0  # TensorFlow import plus model load on a busy 2-core machine


# ---------- helpers shared with test_browser.py ----------
def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def trained_study_store(tmp_path_factory, mnist) -> dict:
    """A SQLite store holding study STUDY with one tiny trained run per arm; built once per session.

    Returns {"uri", "runs": {arm: run_id}}. Both test files call this; the second call reuses the store.
    """
    import mlflow

    from mnist_ablation import tracking
    from mnist_ablation.config import BASELINE

    root = tmp_path_factory.getbasetemp() / "explorer_store"
    manifest = root / "manifest.json"
    if manifest.is_file():
        return json.loads(manifest.read_text())
    root.mkdir(exist_ok=True)
    uri = f"sqlite:///{root / 'mlflow.db'}"
    previous_uri = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)
    try:
        experiment_id = tracking.get_or_create_experiment(f"ablation/{STUDY}")
        with mlflow.start_run(experiment_id=experiment_id, run_name=STUDY,
                              tags={"study": STUDY, "mnist_ablation.role": "study"}) as parent:
            parent_id = parent.info.run_id
        runs = {}
        for arm in ARMS:
            config = BASELINE.replace(train_subset=300, epochs=1, batch_norm=(arm == "baseline"))
            tracked = tracking.run_training(
                config, mnist, experiment_name=f"ablation/{STUDY}", run_name=f"{arm}-seed0",
                tags={"study": STUDY, "arm": arm, "mnist_ablation.role": "cell"}, parent_run_id=parent_id, verbose=0,
            )
            runs[arm] = tracked.run_id
    finally:
        mlflow.set_tracking_uri(previous_uri)
    store = {"uri": uri, "runs": runs}
    manifest.write_text(json.dumps(store))
    return store


class ServerProcess:
    """``python -m mnist_ablation.serve ARGS`` on a free port, waited for until /api/health answers."""

    def __init__(self, arguments: list[str], log_path: Path, data_dir: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        command = [sys.executable, "-m", "mnist_ablation.serve", *arguments, "--host", "127.0.0.1",
                   "--port", str(self.port), "--data-dir", str(data_dir), "--log-level", "warning"]
        environment = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "CUDA_VISIBLE_DEVICES": ""}
        with open(log_path, "w") as log:
            self.process = subprocess.Popen(command, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT,
                                            env=environment)

    def log_tail(self) -> str:
        return self.log_path.read_text()[-4000:]

    def wait_until_healthy(self, timeout: float = SERVER_START_TIMEOUT) -> None:
        wait_for_health(f"{self.url}/api/health", self.process, self.log_path, timeout)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)


def start_study_server(tmp_path_factory, data_dir, store, extra_arguments=()) -> ServerProcess:
    log_path = tmp_path_factory.mktemp("explorer_server") / "server.log"
    server = ServerProcess(["--study", STUDY, "--tracking-uri", store["uri"], *extra_arguments], log_path, data_dir)
    try:
        server.wait_until_healthy()
    except RuntimeError as error:
        server.stop()
        pytest.fail(str(error))
    return server


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
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        mnist_preprocess(drawing)


# ---------- which runs a study offers (real MLflow records, no training) ----------
def _cell_run(client, experiment_id, arm, seed, val_accuracy, status="FINISHED"):
    run = client.create_run(experiment_id, run_name=f"{arm}-seed{seed}",
                            tags={"study": "pick", "arm": arm, "seed": str(seed), "mnist_ablation.role": "cell"})
    client.log_metric(run.info.run_id, "val_accuracy", val_accuracy - 0.2, step=0)
    client.log_metric(run.info.run_id, "val_accuracy", val_accuracy, step=1)  # the final epoch's value counts
    client.set_terminated(run.info.run_id, status)
    return run.info.run_id


def test_study_offers_best_finished_seed_per_arm_baseline_first(tracking_uri):
    from mlflow.tracking import MlflowClient

    from mnist_ablation.serve import study_runs_to_offer

    client = MlflowClient()
    experiment_id = client.create_experiment("ablation/pick")
    _cell_run(client, experiment_id, "no_dropout", 0, 0.95)
    best_no_dropout = _cell_run(client, experiment_id, "no_dropout", 1, 0.97)
    _cell_run(client, experiment_id, "no_dropout", 2, 0.99, status="FAILED")  # failed runs are not offered
    baseline = _cell_run(client, experiment_id, "baseline", 0, 0.96)
    _cell_run(client, experiment_id, "baseline", 1, 0.94)
    client.create_run(experiment_id, run_name="pick", tags={"mnist_ablation.role": "study"})  # the parent

    offered = study_runs_to_offer("pick")
    assert [(run.label, run.run_id) for run in offered] == [("baseline", baseline), ("no_dropout", best_no_dropout)]
    assert offered[1].val_accuracy == pytest.approx(0.97)

    every = study_runs_to_offer("pick", best_per_arm=False)
    assert len(every) == 4 and every[0].arm == "baseline" and every[0].run_id == baseline


def test_unknown_study_and_run_fail_with_what_exists(tracking_uri):
    from mlflow.tracking import MlflowClient

    from mnist_ablation.serve import ExplorerError, runs_by_id, study_runs_to_offer

    MlflowClient().create_experiment("ablation/leave-one-out")
    with pytest.raises(ExplorerError, match="Studies found there: leave-one-out"):
        study_runs_to_offer("no-such-study")
    with pytest.raises(ExplorerError, match="not in the tracking store"):
        runs_by_id(["0123456789abcdef0123456789abcdef"])


def test_static_files_ship_with_the_package():
    import tomllib

    from mnist_ablation.serve import STATIC_DIR

    for name in ("index.html", "app.js", "style.css"):
        assert (STATIC_DIR / name).is_file()
    package_data = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    assert "static/*" in package_data["mnist_ablation"]


# ---------- the JSON API of a real server ----------
@pytest.fixture(scope="module")
def study_store(tmp_path_factory, mnist):
    return trained_study_store(tmp_path_factory, mnist)


@pytest.fixture(scope="module")
def server(tmp_path_factory, data_dir, study_store):
    process = start_study_server(tmp_path_factory, data_dir, study_store,
                                 ["--mlflow-ui-url", "http://mlflow.example:5001/"])
    yield process
    process.stop()


@pytest.fixture(scope="module")
def client(server):
    import httpx

    with httpx.Client(base_url=server.url, timeout=60) as http:
        yield http


@pytest.fixture(scope="module")
def logged_predictions(study_store):
    """Each arm's logged test predictions, read straight from the store."""
    import mlflow

    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(study_store["uri"])
    try:
        from mnist_ablation.store import read_predictions

        return {arm: read_predictions(run_id) for arm, run_id in study_store["runs"].items()}
    finally:
        mlflow.set_tracking_uri(previous)


PROBABILITY_COLUMNS = [f"prob_{k}" for k in range(10)]


@pytest.mark.slow
def test_health_lists_the_study_runs_with_baseline_loaded(client, study_store):
    health = client.get("/api/health").json()
    assert health["status"] == "ok"
    assert [model["label"] for model in health["models"]] == list(ARMS)
    assert health["default_run_id"] == study_store["runs"]["baseline"]
    assert health["models"][0]["loaded"] is True


@pytest.mark.slow
@pytest.mark.parametrize("arm", ARMS)
def test_predict_on_test_images_matches_the_logged_predictions(client, mnist, study_store, logged_predictions, arm):
    for index in (0, 1, 4321, 9999):
        image = mnist.x_test[index, :, :, 0].tolist()
        answer = client.post("/api/predict", json={"image": image, "run_id": study_store["runs"][arm]})
        assert answer.status_code == 200, answer.text
        body = answer.json()
        logged = logged_predictions[arm].set_index("index").loc[index]
        np.testing.assert_allclose(body["probabilities"], logged[PROBABILITY_COLUMNS].to_numpy(float), atol=1e-5)
        assert body["predicted_class"] == int(logged["predicted"])
        assert sum(body["probabilities"]) == pytest.approx(1.0, abs=1e-4)
        assert "image" not in body  # an MNIST image is used as is


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
def test_ensemble_averages_the_runs(client, mnist, study_store):
    image = mnist.x_test[7, :, :, 0].tolist()
    members = [client.post("/api/predict", json={"image": image, "run_id": run_id}).json()["probabilities"]
               for run_id in study_store["runs"].values()]
    ensemble = client.post("/api/predict", json={"image": image, "run_id": "ensemble"}).json()
    np.testing.assert_allclose(ensemble["probabilities"], np.mean(members, axis=0), atol=1e-6)
    assert sorted(ensemble["members"]) == sorted(study_store["runs"].values())


def _image(value=0.0, rows=28, columns=28):
    return [[value] * columns for _ in range(rows)]


BAD_REQUESTS = [
    ("wrong row count", {"json": {"image": _image(rows=27)}}, 422, "27 rows; expected 28"),
    ("wrong row length", {"json": {"image": _image()[:27] + [[0.0] * 30]}}, 422, "row 27 has 30 values"),
    ("value above 1", {"json": {"image": _image(255.0)}}, 422, "must lie in [0, 1]"),
    ("negative value", {"json": {"image": _image(-0.5)}}, 422, "found -0.5 at row 0"),
    ("string pixel", {"json": {"image": _image()[:5] + [["x"] * 28] + _image()[6:]}}, 422, "row 5 holds 'x'"),
    ("boolean pixel", {"json": {"image": [[True] * 28] * 28}}, 422, "not a number"),
    ("NaN pixel", {"content": ('{"image": [' + ",".join(["[" + ",".join(["NaN"] * 28) + "]"] * 28) + "]}").encode()},
     422, "NaN or infinite"),
    ("flat list", {"json": {"image": [0.0] * 784}}, 422, "not a list of numbers"),
    ("neither image nor drawing", {"json": {"pixels": []}}, 422, "exactly one of 'image'"),
    ("both image and drawing", {"json": {"image": _image(), "drawing": _image()}}, 422, "exactly one of 'image'"),
    ("non-JSON body", {"content": b"\x89PNG not json"}, 400, "not valid JSON"),
    ("JSON that is not an object", {"json": [1, 2, 3]}, 400, "must be a JSON object"),
    ("unknown run", {"json": {"image": _image(), "run_id": "feedface"}}, 404, "not offered by this server"),
    ("run id not a string", {"json": {"image": _image(), "run_id": 5}}, 422, "'run_id' must be a string"),
    ("huge drawing", {"json": {"drawing": _image(rows=600, columns=2)}}, 422, "at most 560"),
    ("oversized body", {"content": b"[" + b"0," * 1_200_000 + b"0]"}, 413, "larger than the limit"),
]


@pytest.mark.slow
@pytest.mark.parametrize("name, request_arguments, status, message", BAD_REQUESTS, ids=[b[0] for b in BAD_REQUESTS])
def test_bad_predict_requests_get_a_4xx_naming_the_problem(client, name, request_arguments, status, message):
    answer = client.post("/api/predict", headers={"Content-Type": "application/json"}, **request_arguments)
    assert answer.status_code == status, answer.text
    assert message in answer.json()["detail"]


@pytest.mark.slow
def test_server_keeps_serving_after_bad_requests(client):
    for _ in range(3):
        client.post("/api/predict", content=b"{broken")
        client.post("/api/saliency", json={"image": _image(rows=3)})
    assert client.get("/api/health").json()["status"] == "ok"
    assert client.post("/api/predict", json={"image": _image()}).status_code == 200


@pytest.mark.slow
def test_saliency_and_gradcam_explain_the_predicted_or_chosen_class(client, mnist):
    image = mnist.x_test[3, :, :, 0].tolist()
    predicted = client.post("/api/predict", json={"image": image}).json()["predicted_class"]
    answer = client.post("/api/saliency", json={"image": image}).json()
    assert answer["predicted_class"] == answer["target_class"] == predicted
    saliency, gradcam = np.array(answer["saliency"]), np.array(answer["gradcam"])
    assert saliency.shape == gradcam.shape == (28, 28)
    assert saliency.min() >= 0 and saliency.max() == 255  # scaled so the strongest pixel is 255
    assert 0 <= gradcam.min() and gradcam.max() <= 255
    assert answer["gradcam_layer"] == "block3_conv"
    other = (predicted + 1) % 10
    chosen = client.post("/api/saliency", json={"image": image, "target_class": other}).json()
    assert chosen["target_class"] == other and chosen["saliency"] != answer["saliency"]
    assert client.post("/api/saliency", json={"image": image, "target_class": 10}).status_code == 422
    assert client.post("/api/saliency", json={"image": image, "run_id": "ensemble"}).status_code == 422


@pytest.mark.slow
def test_activations_give_each_conv_layer_strongest_channels(client, mnist):
    image = mnist.x_test[0, :, :, 0].tolist()
    answer = client.post("/api/activations", json={"image": image, "max_channels": 5}).json()
    assert [(layer["layer"], layer["shape"]) for layer in answer["layers"]] == [
        ("block1_conv", [26, 26, 32]), ("block2_conv", [24, 24, 64]), ("block3_conv", [10, 10, 64])]
    for layer in answer["layers"]:
        means = [channel["mean"] for channel in layer["channels"]]
        assert len(means) == 5 and means == sorted(means, reverse=True)
        height, width, _ = layer["shape"]
        assert np.array(layer["channels"][0]["map"]).shape == (height, width)
    assert client.post("/api/activations", json={"image": image, "max_channels": 0}).status_code == 422


@pytest.mark.slow
def test_confusion_matrix_is_the_runs_logged_predictions(client, study_store, logged_predictions):
    run_id = study_store["runs"]["no_batch_norm"]
    answer = client.get(f"/api/runs/{run_id}/confusion").json()
    frame = logged_predictions["no_batch_norm"]
    expected = np.zeros((10, 10), int)
    np.add.at(expected, (frame["label"], frame["predicted"]), 1)
    assert np.array_equal(answer["matrix"], expected)
    assert answer["total"] == 10_000
    assert answer["accuracy"] == pytest.approx(float(np.mean(frame["label"] == frame["predicted"])))


@pytest.mark.slow
def test_examples_of_a_cell_sorted_by_confidence_with_mnist_pixels(client, mnist, study_store, logged_predictions):
    run_id = study_store["runs"]["baseline"]
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

    assert client.get(f"/api/runs/{run_id}/examples", params={"label": 10}).status_code == 422
    assert client.get(f"/api/runs/{run_id}/examples", params={"sort": "random"}).status_code == 422
    assert client.get("/api/runs/feedface/examples").status_code == 404


@pytest.mark.slow
def test_run_details_have_curves_metrics_and_the_mlflow_link(client, study_store):
    run_id = study_store["runs"]["baseline"]
    details = client.get(f"/api/runs/{run_id}").json()
    assert details["label"] == "baseline"
    assert details["mlflow_url"] == f"http://mlflow.example:5001/#/experiments/{details['experiment_id']}/runs/{run_id}"
    assert [point["epoch"] for point in details["history"]["val_accuracy"]] == [0]
    assert 0 < details["metrics"]["test_accuracy"] <= 1
    assert details["params"]["train_subset"] == "300" and details["params"]["batch_norm"] == "True"
    offered = client.get("/api/runs").json()
    assert offered["ensemble"] == "ensemble" and [r["label"] for r in offered["runs"]] == list(ARMS)


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


def test_command_refuses_an_unknown_study_with_exit_code_2(tracking_uri, capsys):
    from mlflow.tracking import MlflowClient

    from mnist_ablation.serve import main

    MlflowClient().create_experiment("ablation/leave-one-out")
    assert main(["--study", "nope", "--tracking-uri", tracking_uri, "--port", str(free_port())]) == 2
    error = capsys.readouterr().err
    assert "no study 'nope'" in error and "leave-one-out" in error
