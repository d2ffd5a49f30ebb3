"""The seed's own training code as a pipeline of its own: ``pipeline="seed_script"`` trains a cell with it.

The seed trains with (its sections 3-6)::

    model = Sequential([...])
    datagen = ImageDataGenerator(rotation_range=10, width_shift_range=0.1, height_shift_range=0.1,
                                 zoom_range=0.1, shear_range=0.1)
    datagen.fit(train_images)
    model.compile(optimizer='adam', loss='categorical_crossentropy', metrics=['accuracy'])
    history = model.fit(datagen.flow(train_images, train_labels, batch_size=32), epochs=15,
                        validation_data=(test_images, test_labels), callbacks=[lr_schedule])

``train_seed_script`` runs those lines as written, on the split, subset, epochs and seed of any cell, and returns a
``train.RunResult``, so the cell is logged exactly like one of the trainer's (``tracking.run_training``, ``offline``)
and the report compares the two. It is the reference arm of the ``parity`` study. What the seed's code fixes (model,
augmentation, batch size, optimizer, schedule) is no knob here: config validation rejects any other value of those
fields (``SEED_SCRIPT_FIXED_FIELDS``).

This module registers the pipeline in ``pipelines.PIPELINES`` when the package loads (``mnist_ablation/__init__``);
``train.train`` hands a run to the one its config names. Keras is imported inside the functions, so config validation
reads the registry without loading a backend.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

from .pipelines import DEFAULT_PIPELINE, PIPELINES, Pipeline, register_pipeline

if TYPE_CHECKING:
    import keras

    from .config import TrainConfig
    from .data import Mnist
    from .train import RunResult

__all__ = ["DEFAULT_PIPELINE", "PIPELINES", "SEED_SCRIPT", "SEED_SCRIPT_FIXED_FIELDS", "SEED_SCRIPT_VARIABLE_FIELDS",
           "lr_scheduler", "seed_image_data_generator", "train_seed_script"]
SEED_SCRIPT = "seed_script"

_MODEL = "its Sequential model"
_SCHEDULE = "its lr_scheduler function"
# Every config field the seed's code fixes, and where; the other fields (SEED_SCRIPT_VARIABLE_FIELDS) vary per cell.
SEED_SCRIPT_FIXED_FIELDS: dict[str, str] = {
    "batch_size": "datagen.flow(..., batch_size=32)",
    "augmentation": "ImageDataGenerator(...)",
    "rotation_range": "ImageDataGenerator(rotation_range=10, ...)",
    "width_shift_range": "ImageDataGenerator(width_shift_range=0.1, ...)",
    "height_shift_range": "ImageDataGenerator(height_shift_range=0.1, ...)",
    "zoom_range": "ImageDataGenerator(zoom_range=0.1, ...)",
    "shear_range": "ImageDataGenerator(shear_range=0.1)",
    "architecture": _MODEL,
    "conv_filters": _MODEL,
    "dense_units": _MODEL,
    "batch_norm": _MODEL,
    "dropout": _MODEL,
    "conv_dropout_rate": _MODEL,
    "dense_dropout_rate": _MODEL,
    "optimizer": "model.compile(optimizer='adam', ...)",
    "weight_decay": "model.compile(optimizer='adam', ...)",
    "label_smoothing": "model.compile(loss='categorical_crossentropy', ...)",
    "learning_rate": _SCHEDULE,
    "lr_schedule": _SCHEDULE,
    "lr_step_boundaries": _SCHEDULE,
    "lr_step_factors": _SCHEDULE,
    "min_learning_rate": _SCHEDULE,
}
# What a seed_script cell may set like any cell. steps_per_execution is accepted and has no effect (the seed's compile
# runs one step per call); threads sets TensorFlow's thread pools as for the trainer; tta_views is evaluation only.
SEED_SCRIPT_VARIABLE_FIELDS = ("seed", "epochs", "validation", "validation_size", "split_seed", "train_subset",
                               "tta_views", "steps_per_execution", "threads", "pipeline")


def lr_scheduler(epoch):
    """The seed's schedule function, verbatim."""
    if epoch < 5:
        return 0.001
    elif epoch < 10:
        return 0.0005
    else:
        return 0.0001


def seed_image_data_generator():
    """The seed's ``ImageDataGenerator``, as its text builds it.

    Keras 3 keeps the class in its legacy module (``keras.src.legacy.preprocessing.image``: NumPy and SciPy's
    ``ndimage.affine_transform``, no TensorFlow) and exports it only under the tf.keras namespace
    ``keras._tf_keras.keras.preprocessing.image``, the module the seed's ``tensorflow.keras.preprocessing.image``
    resolves to (``keras.preprocessing.image`` has no ImageDataGenerator in Keras 3). Imported from there, it is the
    seed's very class, and it runs on any Keras backend, JAX without TensorFlow included.
    """
    from keras._tf_keras.keras.preprocessing.image import ImageDataGenerator

    return ImageDataGenerator(
        rotation_range=10,
        width_shift_range=0.1,
        height_shift_range=0.1,
        zoom_range=0.1,
        shear_range=0.1,
    )


def train_seed_script(config: TrainConfig, data: Mnist, callbacks: Sequence[keras.callbacks.Callback] = (),
                      checkpoint_dir: str | os.PathLike | None = None, verbose: int | str = 2) -> RunResult:
    """Train and evaluate one run of ``config`` with the seed's code as written; ``train.train``'s signature.

    The split is ``data.build_split`` with the config's protocol (``validation="test"`` is the seed's own), as for
    any cell. ``keras.utils.set_random_seed(config.seed)`` seeds Python's and NumPy's global generators, which are
    the seed's only sources of randomness besides the backend's: the flow (called, as in the seed, without a
    ``seed=``) shuffles and augments from NumPy's, ``model.fit`` shuffles the order of the flow's batches with
    Python's. A ``flow(seed=s)`` would reseed NumPy with ``s + batches seen`` before every batch, so cells of seeds
    s and s + 1 would draw the same augmentation one batch apart.

    ``callbacks`` observe training after the pipeline's own (epoch timer, the seed's LearningRateScheduler, the
    history), so their logs include ``learning_rate`` and ``epoch_seconds``. ``checkpoint_dir`` is ignored: the
    seed's flow keeps its place in NumPy's global generator, which no checkpoint holds, so a killed cell restarts
    from epoch 0 (its config hash differs from the trainer's, so a trainer checkpoint is never loaded for it).
    """
    from keras.callbacks import LearningRateScheduler
    from keras.utils import to_categorical

    from .data import NUM_CLASSES, build_split
    from .model import seed_sequential_model
    from .train import EpochTimer, HistoryRecorder, configure_runtime, evaluate

    del checkpoint_dir  # nothing to resume from (see the docstring)
    configure_runtime(config)
    split = build_split(data, config.validation, config.validation_size, config.split_seed, config.train_subset)
    train_images, train_labels = split.x_train, to_categorical(split.y_train, NUM_CLASSES)
    validation_data = (split.x_val, to_categorical(split.y_val, NUM_CLASSES))

    model = seed_sequential_model()
    datagen = seed_image_data_generator()
    datagen.fit(train_images)
    model.compile(optimizer="adam", loss="categorical_crossentropy", metrics=["accuracy"])
    history: dict[str, list[float]] = {}
    own_callbacks: list[keras.callbacks.Callback] = [
        EpochTimer(),
        LearningRateScheduler(lr_scheduler),
        HistoryRecorder(history),
    ]
    start = time.perf_counter()
    model.fit(datagen.flow(train_images, train_labels, batch_size=32),
              epochs=config.epochs, validation_data=validation_data,
              callbacks=own_callbacks + list(callbacks), verbose=verbose)
    train_seconds = time.perf_counter() - start
    return evaluate(config, model, split, history, train_seconds, initial_epoch=0)


register_pipeline(SEED_SCRIPT, Pipeline("the seed's script", train_seed_script, SEED_SCRIPT_FIXED_FIELDS))
