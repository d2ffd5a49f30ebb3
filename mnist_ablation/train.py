"""One readable trainer: ``train(config, data) -> RunResult``. It knows nothing about MLflow or Optuna.

The pipeline is the seed's: augmented batches of 32 from the training images, Adam, categorical
cross-entropy, per-epoch validation and the step learning-rate schedule, then one evaluation on the
test set. Callers observe it through Keras callbacks.

The input pipeline is ``tf.data`` when Keras runs on TensorFlow (the default), and a NumPy
``keras.utils.PyDataset`` with the same augmentation maths on any other Keras backend, so the same
trainer runs with ``KERAS_BACKEND=jax`` on a machine that has JAX and no TensorFlow (a GPU box, say).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import keras
import numpy as np

from .augment import AugmentationParams, augment_batch, numpy_augment_batch
from .config import TrainConfig
from .data import NUM_CLASSES, Mnist, Split, build_split
from .model import build_model
from .optimizers import build_optimizer
from .pipelines import PIPELINES
from .results import EPOCH_METRICS, RunResult, TrainingDiverged, categorical_loss  # their Keras-free home
from .schedules import build_schedule

logger = logging.getLogger(__name__)
# Inference only (validation, test): BN and dropout are in inference mode, so the batch size changes no
# prediction, bit for bit; it sets the activations held at once (~25 MB at 100, ~240 MB at 1000). The
# validation loss is a mean of per-batch means, so its last bits depend on it.
EVAL_BATCH_SIZE = 100


def on_tensorflow() -> bool:
    """Whether Keras runs on TensorFlow (``KERAS_BACKEND``; TensorFlow is Keras' default)."""
    return keras.backend.backend() == "tensorflow"


def configure_runtime(config: TrainConfig) -> None:
    """Seed Python, NumPy and the backend; set TensorFlow's thread pools when asked."""
    keras.utils.set_random_seed(config.seed)
    if config.threads and on_tensorflow():
        import tensorflow as tf

        try:
            tf.config.threading.set_intra_op_parallelism_threads(config.threads)
            tf.config.threading.set_inter_op_parallelism_threads(min(2, config.threads))
        except RuntimeError:
            pass  # TensorFlow already started in this process: its pools are fixed from then on


def steps_per_epoch(num_images: int, batch_size: int) -> int:
    return math.ceil(num_images / batch_size)


def batch_seed(seed, epoch, step):
    """The augmentation seed pair of one batch (ints or tensors): both input pipelines draw from it."""
    return seed + 7919, epoch * 100_003 + step


def build_dataset(config: TrainConfig, images: np.ndarray, labels: np.ndarray, initial_epoch: int = 0,
                  rows: np.ndarray | None = None):
    """Shuffled, augmented, one-hot batches for epochs ``initial_epoch..epochs-1``.

    The training images are ``images[rows]`` (all of ``images`` when ``rows`` is None), labelled ``labels``.

    Shuffling and augmentation draw from stateless seeds derived from (seed, epoch, batch), so the
    stream of batches for epoch k is the same whether or not the run was resumed. A ``tf.data.Dataset``
    on TensorFlow, an ``AugmentedBatches`` PyDataset on other backends.
    """
    if not on_tensorflow():
        return AugmentedBatches(config, images, labels, initial_epoch, rows=rows)
    import tensorflow as tf

    n = len(labels)
    # Each batch is gathered in NumPy from the caller's array, which stays the only copy of the pixels:
    # a tf.constant would add one, and tf.data's graph rewrite serialises captured constants into another.
    source = np.asarray(images, dtype=np.float32)
    rows_t = tf.constant(np.arange(n) if rows is None else rows, tf.int64)
    labels_t = tf.one_hot(tf.constant(labels, dtype=tf.int32), NUM_CLASSES)
    params = AugmentationParams.from_config(config)
    seed = tf.constant(config.seed, tf.int64)

    def one_epoch(epoch):
        order = tf.random.experimental.stateless_shuffle(tf.range(n), seed=tf.stack([seed, epoch]))
        batches = tf.data.Dataset.from_tensor_slices(order).batch(config.batch_size).enumerate()

        def gather(step, index):
            x = tf.numpy_function(lambda r: source[r], [tf.gather(rows_t, index)], tf.float32, stateful=False)
            x.set_shape((None, *source.shape[1:]))
            if config.augmentation:
                x = augment_batch(x, tf.stack(batch_seed(seed, epoch, step)), params)
            return x, tf.gather(labels_t, index)

        return batches.map(gather, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)

    epochs = tf.data.Dataset.range(initial_epoch, config.epochs)
    return epochs.flat_map(one_epoch).prefetch(tf.data.AUTOTUNE)


class AugmentedBatches(keras.utils.PyDataset):
    """``build_dataset`` for backends other than TensorFlow: NumPy batches, whole run as one sequence.

    Batch ``i`` is step ``i % steps`` of epoch ``initial_epoch + i // steps``; its shuffle order and
    augmentation come from NumPy generators seeded by (seed, epoch) and (seed, epoch, step), so any
    worker can build any batch and a resumed run sees the batches an uninterrupted one would. The
    streams differ from the TensorFlow path's (same distributions, another generator).
    """

    def __init__(self, config: TrainConfig, images: np.ndarray, labels: np.ndarray, initial_epoch: int = 0,
                 rows: np.ndarray | None = None, workers: int = 2):
        super().__init__(workers=workers, use_multiprocessing=False, max_queue_size=32)
        self.config = config
        self.pixels = np.asarray(images, dtype=np.float32)  # the caller's array: batches gather images[rows]
        self.rows = np.arange(len(labels)) if rows is None else np.asarray(rows)
        self.one_hot = np.eye(NUM_CLASSES, dtype=np.float32)[np.asarray(labels)]
        self.initial_epoch = initial_epoch
        self.steps = steps_per_epoch(len(labels), config.batch_size)
        self.params = AugmentationParams.from_config(config)
        self._orders: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return self.steps * (self.config.epochs - self.initial_epoch)

    def _order(self, epoch: int) -> np.ndarray:
        if epoch not in self._orders:  # workers racing here only compute the same permutation twice
            self._orders[epoch] = np.random.default_rng([self.config.seed, epoch]).permutation(len(self.one_hot))
        return self._orders[epoch]

    def __getitem__(self, index: int):
        epoch, step = self.initial_epoch + index // self.steps, index % self.steps
        batch = self._order(epoch)[step * self.config.batch_size:(step + 1) * self.config.batch_size]
        x = self.pixels[self.rows[batch]]
        if self.config.augmentation:
            x = numpy_augment_batch(x, batch_seed(self.config.seed, epoch, step), self.params)
        return x, self.one_hot[batch]


def effective_steps_per_execution(steps_in_epoch: int, requested: int) -> int:
    """The largest divisor of ``steps_in_epoch`` that is at most ``requested``.

    Keras runs whole executions: with 19 steps an epoch and 16 steps an execution it trains 32 steps in
    epoch 1, eating into epoch 2's batches, and the last epoch starves. A divisor keeps every epoch
    exactly ``steps_in_epoch`` steps (1719 steps for 55,000 images gives 9; the seed's 1875 gives 15).
    """
    return max(d for d in range(1, min(requested, steps_in_epoch) + 1) if steps_in_epoch % d == 0)


def compile_model(model: keras.Model, config: TrainConfig, steps_in_epoch: int) -> keras.Model:
    model.compile(
        optimizer=build_optimizer(config),
        loss=keras.losses.CategoricalCrossentropy(label_smoothing=config.label_smoothing),
        metrics=["accuracy"],
        steps_per_execution=effective_steps_per_execution(steps_in_epoch, config.steps_per_execution),
    )
    return model


class EpochTimer(keras.callbacks.Callback):
    """Adds ``epoch_seconds`` to each epoch's logs (listed first, so later callbacks see it)."""

    def on_epoch_begin(self, epoch, logs=None):
        self._start = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None:
            logs["epoch_seconds"] = time.perf_counter() - self._start


class EpochEnd(keras.callbacks.Callback):
    """Calls ``report(epoch, logs)`` after each epoch: how a caller follows a run without a Keras class of its own."""

    def __init__(self, report: Callable[[int, dict], None]):
        super().__init__()
        self.report = report

    def on_epoch_end(self, epoch, logs=None):
        self.report(epoch, dict(logs or {}))


class DivergenceGuard(keras.callbacks.Callback):
    """Stop at the first diverged batch by raising TrainingDiverged (not a silent stop).

    Diverged means a non-finite loss, or a running loss above MAX_HEALTHY_LOSS: a 10-class
    cross-entropy starts near ln 10 = 2.3, and Keras computes it from the logits, so a run whose
    weights blew up reports losses in the thousands long before they overflow to NaN.
    """

    MAX_HEALTHY_LOSS = 1000.0

    def on_train_batch_end(self, batch, logs=None):
        loss = (logs or {}).get("loss")
        if loss is None:
            return
        loss = float(loss)
        if not math.isfinite(loss) or loss > self.MAX_HEALTHY_LOSS:
            raise TrainingDiverged(
                f"training diverged: loss {loss:.4g} at batch {batch} of epoch {self._epoch} "
                f"(learning_rate {self._learning_rate:g}); lower learning_rate or check the config."
            )

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch
        self._learning_rate = float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate))


class HistoryRecorder(keras.callbacks.Callback):
    """Appends each epoch's EPOCH_METRICS to ``history`` (which may hold earlier, resumed epochs)."""

    def __init__(self, history: dict[str, list[float]]):
        super().__init__()
        self.history = history

    def on_epoch_end(self, epoch, logs=None):
        for key in EPOCH_METRICS:
            self.history.setdefault(key, []).append(float((logs or {}).get(key, float("nan"))))


class EpochCheckpoint(HistoryRecorder):
    """After every epoch, atomically save the model (with optimizer state) and the history so far."""

    def __init__(self, directory: Path, config: TrainConfig, history: dict[str, list[float]]):
        super().__init__(history)
        self.directory = directory
        self.config = config

    def on_epoch_end(self, epoch, logs=None):
        super().on_epoch_end(epoch, logs)
        self.directory.mkdir(parents=True, exist_ok=True)
        model_tmp = self.directory / "model.tmp.keras"
        self.model.save(model_tmp)
        os.replace(model_tmp, self.directory / "model.keras")
        state = {"epochs_completed": epoch + 1, "config": self.config.to_dict(),
                 "config_hash": self.config.hash(), "history": self.history}
        state_tmp = self.directory / "state.tmp.json"
        state_tmp.write_text(json.dumps(state))
        os.replace(state_tmp, self.directory / "state.json")


def load_checkpoint(directory: Path | None, config: TrainConfig):
    """(model, epochs_completed, history) from a checkpoint of the same config, else None."""
    if directory is None or not (directory / "state.json").is_file():
        return None
    state = json.loads((directory / "state.json").read_text())
    # Same hash = same config up to speed-only fields (threads, steps_per_execution).
    if state.get("config_hash") != config.hash():
        logger.warning("checkpoint in %s is of another config (hash %s, this run %s): starting from epoch 0",
                       directory, state.get("config_hash"), config.hash())
        return None
    if not (directory / "model.keras").is_file():
        logger.warning("checkpoint in %s has no model.keras: starting from epoch 0", directory)
        return None
    model = keras.models.load_model(directory / "model.keras")
    return model, int(state["epochs_completed"]), state["history"]


def build_state(model: keras.Model, images: np.ndarray) -> None:
    """Create every variable ``fit`` would (layers, optimizer, loss and metrics) from one image, without fitting.

    On backends other than TensorFlow, ``fit`` otherwise creates them by peeking at the first batch of the
    ``AugmentedBatches`` sequence, which that sequence then never gives back: every epoch trained its
    batches shifted by one and the run's first batch came last. Building first keeps the stream whole, so a
    run trains batch (epoch, step) at that step, resumed or not, and a packed member matches it.
    """
    model._symbolic_build(data_batch=(images[:1], np.zeros((1, NUM_CLASSES), np.float32)))


def predict_probabilities(model: keras.Model, images: np.ndarray) -> np.ndarray:
    # One batch per call: model.predict runs steps_per_execution batches as one graph, side by side,
    # holding several batches' activations at once (+330-450 MB at batch 1000). Same maths per image.
    return np.concatenate([
        np.asarray(model.predict_on_batch(images[start:start + EVAL_BATCH_SIZE]), dtype=np.float32)
        for start in range(0, len(images), EVAL_BATCH_SIZE)
    ])


def row_numbers(data: Mnist) -> Mnist:
    """``data`` with every image replaced by its row number: build_split on it copies no pixels."""
    return dataclasses.replace(data, x_train=np.arange(len(data.y_train)), x_test=np.arange(len(data.y_test)))


def tta_probabilities(model: keras.Model, images: np.ndarray, config: TrainConfig) -> np.ndarray:
    """Mean probabilities over the plain images and ``config.tta_views`` augmented views."""
    params = AugmentationParams.from_config(config)
    total = predict_probabilities(model, images)
    for view in range(config.tta_views):
        seed = (config.seed + 104_729, view)
        if on_tensorflow():
            import tensorflow as tf

            augmented = augment_batch(tf.constant(images), tf.constant(seed, tf.int64), params).numpy()
        else:
            augmented = numpy_augment_batch(images, seed, params)
        total += predict_probabilities(model, augmented)
    return total / (config.tta_views + 1)


def train(config: TrainConfig, data: Mnist, callbacks: Sequence[keras.callbacks.Callback] = (),
          checkpoint_dir: str | os.PathLike | None = None, verbose: int | str = 2) -> RunResult:
    """Train and evaluate one run of ``config`` on ``data``.

    ``callbacks`` observe training (they run after the trainer's own, so their logs include
    ``learning_rate`` and ``epoch_seconds``). With ``checkpoint_dir``, every epoch is checkpointed
    there and a later call with the same config continues from the last completed epoch.

    A config whose ``pipeline`` names other code (``"seed_script"``: the seed's own) is trained by that code,
    with the same arguments and result (``pipelines.PIPELINES``).
    """
    pipeline = PIPELINES[config.pipeline]
    if pipeline.train is not None:
        return pipeline.train(config, data, callbacks=callbacks, checkpoint_dir=checkpoint_dir, verbose=verbose)
    configure_runtime(config)
    # Split row numbers, not images: indexing the images would copy the 55,000 training ones (172 MB).
    rows: Split = build_split(row_numbers(data), config.validation, config.validation_size, config.split_seed,
                              config.train_subset)
    split = dataclasses.replace(rows, x_train=None, x_test=data.x_test,
                                x_val=data.x_test if rows.validation_is_test else data.x_train[rows.x_val])
    checkpoint_path = Path(checkpoint_dir) if checkpoint_dir is not None else None
    resumed = load_checkpoint(checkpoint_path, config)
    if resumed is not None:
        model, initial_epoch, history = resumed
    else:
        model = compile_model(build_model(config), config,
                              steps_per_epoch(len(split.y_train), config.batch_size))
        initial_epoch, history = 0, {}
    history = {key: list(history.get(key, [])) for key in EPOCH_METRICS}
    if initial_epoch >= config.epochs:
        return evaluate(config, model, split, history, 0.0, initial_epoch)
    if not on_tensorflow():
        build_state(model, split.x_val)
    recorder = EpochCheckpoint(checkpoint_path, config, history) if checkpoint_path else HistoryRecorder(history)
    n_train = len(split.y_train)
    train_batches = build_dataset(config, data.x_train, split.y_train, initial_epoch, rows=rows.x_train)
    validation = validation_data(split)
    split = dataclasses.replace(split, x_val=None)  # the validation data holds its own copy
    own_callbacks = [
        EpochTimer(),
        keras.callbacks.LearningRateScheduler(build_schedule(config)),
        DivergenceGuard(),
        recorder,
    ]
    start = time.perf_counter()
    model.fit(
        train_batches,
        epochs=config.epochs,
        initial_epoch=initial_epoch,
        steps_per_epoch=steps_per_epoch(n_train, config.batch_size),
        validation_data=validation,
        validation_batch_size=None if on_tensorflow() else EVAL_BATCH_SIZE,
        callbacks=own_callbacks + list(callbacks),
        shuffle=False,  # the dataset shuffles itself, reproducibly per epoch
        verbose=verbose,
    )
    train_seconds = time.perf_counter() - start
    return evaluate(config, model, split, history, train_seconds, initial_epoch)


def validation_data(split: Split):
    """The validation images and one-hot labels, in EVAL_BATCH_SIZE batches."""
    one_hot = np.eye(NUM_CLASSES, dtype=np.float32)[split.y_val]
    if not on_tensorflow():
        return split.x_val, one_hot  # fit batches it by validation_batch_size
    import tensorflow as tf

    # No .cache(): from_tensor_slices already holds the tensors in memory, a cache would copy them again.
    return tf.data.Dataset.from_tensor_slices((split.x_val, one_hot)).batch(EVAL_BATCH_SIZE)


def evaluate(config: TrainConfig, model: keras.Model, split: Split, history: dict[str, list[float]],
              train_seconds: float, initial_epoch: int) -> RunResult:
    """The one evaluation on the test set, as every pipeline ends: the ``RunResult`` of a trained ``model``."""
    probabilities = predict_probabilities(model, split.x_test)
    n_train = len(split.y_train)
    epochs_trained = config.epochs - initial_epoch
    result = RunResult(
        config=config,
        model=model,
        history=history,
        test_loss=categorical_loss(split.y_test, probabilities),
        test_accuracy=float(np.mean(probabilities.argmax(axis=1) == split.y_test)),
        test_labels=split.y_test,
        test_probabilities=probabilities,
        train_seconds=train_seconds,
        train_images_per_second=n_train * epochs_trained / train_seconds if train_seconds > 0 else 0.0,
        num_train_images=n_train,
        initial_epoch=initial_epoch,
    )
    if config.tta_views:
        result.tta_probabilities = tta_probabilities(model, split.x_test, config)
        result.extra_metrics["test_accuracy_tta"] = float(
            np.mean(result.tta_probabilities.argmax(axis=1) == split.y_test)
        )
        result.extra_metrics["test_loss_tta"] = categorical_loss(split.y_test, result.tta_probabilities)
    return result
