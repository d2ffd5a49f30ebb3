"""Packed training: K runs that share a model structure, trained in one process by one compiled step per batch.

Each member is the run ``train.train`` would make of its config on Keras' JAX backend: its model is built the
same way from its own seed (so the same initial weights and dropout seeds), it walks the same batches (the
row order from ``default_rng([seed, epoch])`` and the augmentation draws from ``default_rng(batch_seed(...))``,
as ``train.AugmentedBatches`` draws them), and it is updated by the model's own stateless ``train_step``
(forward pass, loss, gradients, ``optimizer.stateless_apply``, metrics), here ``jax.vmap``-ed over the members.
Its learning rate is set per epoch from its own schedule, its batch-norm statistics, dropout stream and
optimizer state are its own rows of the stacked state, and its divergence guard, callbacks, early stopping
(``model.stop_training`` set by a callback), checkpoints and final evaluation are its own: a member that
diverges fails alone, a member that stops early is frozen while the others go on.

The data stay on the device: the pixels are one resident array, a batch is gathered there by row number,
and the affine augmentation (``augment.jax_apply_transforms``) is computed there. Only the row orders and
the six uniform draws per image (a few MB an epoch) come from the host, so that every member sees exactly
its unpacked run's batches.

Which config fields may differ between members: ``config.PACK_MEMBER_FIELDS``. Packing needs Keras on JAX
(``KERAS_BACKEND=jax`` before Keras is imported); the command layer starts its pack workers that way.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np

from .augment import AugmentationParams
from .config import TrainConfig, check_packable
from .data import NUM_CLASSES, Mnist, build_split
from .errors import UserError
from .model import build_model
from .schedules import build_schedule
from .train import (
    EPOCH_METRICS,
    EVAL_BATCH_SIZE,
    DivergenceGuard,
    EpochCheckpoint,
    HistoryRecorder,
    RunResult,
    TrainingDiverged,
    batch_seed,
    build_state,
    compile_model,
    configure_runtime,
    effective_steps_per_execution,
    evaluate,
    load_checkpoint,
    row_numbers,
    steps_per_epoch,
)

logger = logging.getLogger(__name__)
BACKEND = "jax"
# Training steps per compiled call. On an accelerator the step is scanned over a chunk of batches (fewer host
# round trips); XLA on the CPU runs the convolutions inside a loop about 30 times slower than alone, so there
# every batch is its own call (measured on a 2-core VM). The divergence guard reads each member's running loss
# at its own execution boundaries either way.
def default_chunk_steps() -> int:
    import jax

    return 1 if jax.default_backend() == "cpu" else 64


class PackBackendError(UserError, RuntimeError):
    """Packing was asked for in a process whose Keras does not run on JAX."""


def require_jax_backend() -> None:
    if keras.backend.backend() != BACKEND:
        raise PackBackendError(
            f"packed training needs Keras on JAX, but this process runs Keras on {keras.backend.backend()!r}. "
            f"Set KERAS_BACKEND={BACKEND} before Keras is imported (the ablate command does this for its pack "
            "workers), or train unpacked (--pack 1)."
        )


@dataclass
class Member:
    """One run of the pack: its config, its own Keras model (built as the unpacked run builds it), its state."""

    index: int
    config: TrainConfig
    model: keras.Model
    history: dict[str, list[float]]
    initial_epoch: int
    recorder: keras.callbacks.Callback
    callbacks: keras.callbacks.CallbackList
    schedule: object
    execution_steps: int
    failure: BaseException | None = None
    stopped: bool = False

    def call(self, hook: str, *args) -> None:
        """Run a callback hook; an exception fails this member alone (as it would end its unpacked run)."""
        if self.failure is not None:
            return
        try:
            getattr(self.callbacks, hook)(*args)
        except Exception as error:  # noqa: BLE001 - recorded as the member's outcome, the others go on
            self.failure = error

    def state(self) -> tuple[list, list, list, list]:
        model = self.model
        return ([v.value for v in model.trainable_variables], [v.value for v in model.non_trainable_variables],
                [v.value for v in model.optimizer.variables], [v.value for v in model.metrics_variables])

    def load_state(self, trainable, non_trainable, optimizer) -> None:
        model = self.model
        for variables, values in ((model.trainable_variables, trainable),
                                  (model.non_trainable_variables, non_trainable),
                                  (model.optimizer.variables, optimizer)):
            for variable, value in zip(variables, values, strict=True):
                variable.assign(value)


def epoch_rows(config: TrainConfig, epoch: int, num_images: int) -> np.ndarray:
    """The order an epoch walks the training rows (``train.AugmentedBatches``' permutation)."""
    return np.random.default_rng([config.seed, epoch]).permutation(num_images)


def batch_draws(config: TrainConfig, epoch: int, step: int, batch: int) -> np.ndarray:
    """The (batch, 6) uniform draws ``augment.numpy_random_transforms`` makes for this batch."""
    rng = np.random.default_rng([int(v) for v in batch_seed(config.seed, epoch, step)])
    return rng.uniform(-1.0, 1.0, size=(batch, 6)).astype(np.float32)


def _member_callbacks(config, model, history, checkpoint_dir, callbacks):
    recorder = (EpochCheckpoint(Path(checkpoint_dir), config, history) if checkpoint_dir is not None
                else HistoryRecorder(history))
    callback_list = keras.callbacks.CallbackList([recorder, *callbacks], model=model)
    return recorder, callback_list


class PackedSteps:
    """The compiled, vmapped steps of one pack: training chunks and validation, over stacked member state."""

    def __init__(self, template: keras.Model, configs: Sequence[TrainConfig], images: np.ndarray, rows: np.ndarray,
                 labels: np.ndarray, member_axis: str = "vmap"):
        import jax
        import jax.numpy as jnp

        from .augment import jax_apply_transforms, jax_transforms_from_uniform

        self.template = template
        fields = [f.name for f in dataclasses.fields(AugmentationParams)]
        # Arguments of the compiled calls, not constants captured in them (XLA would copy the pixels in).
        self.resident = (
            jnp.asarray(images, jnp.float32),  # every pixel once; batches are gathered here by row number
            jnp.asarray(rows, jnp.int32),
            jnp.asarray(np.eye(NUM_CLASSES, dtype=np.float32)[labels]),
            jnp.asarray([[getattr(config, name) for name in fields] for config in configs], jnp.float32),
            jnp.asarray([config.augmentation for config in configs]),
        )
        height, width = images.shape[1], images.shape[2]

        def member_batch(index, draws, strengths, augment, images, rows, one_hot):
            x = images[rows[index]]
            params = AugmentationParams(*(strengths[i] for i in range(len(fields))))
            moved = jax_apply_transforms(x, jax_transforms_from_uniform(draws, height, width, params))
            return jnp.where(augment, moved, x), one_hot[index]

        def member_step(state, index, draws, strengths, augment, images, rows, one_hot):
            return template.train_step(state, member_batch(index, draws, strengths, augment, images, rows, one_hot))

        def inputs(indices, draws, resident):
            # What one step trains on: (K, B) row positions and (K, B, 6) draws -> images and one-hot labels.
            images, rows, one_hot, strengths, augment = resident
            return jax.vmap(member_batch, in_axes=(0, 0, 0, 0, None, None, None))(
                indices, draws, strengths, augment, images, rows, one_hot)

        self.inputs = jax.jit(inputs)

        if member_axis == "vmap":
            step_all = jax.vmap(member_step, in_axes=(0, 0, 0, 0, 0, None, None, None))
        elif member_axis == "map":  # members one after another inside the same compiled step
            def step_all(state, index, draws, strengths, augment, images, rows, one_hot):
                return jax.lax.map(lambda a: member_step(*a, images, rows, one_hot),
                                   (state, index, draws, strengths, augment))
        else:
            raise ValueError(f"member_axis={member_axis!r}: expected 'vmap' or 'map'.")

        def keep_active(active, new, old):
            def pick(n, o):
                return jnp.where(active.reshape((-1,) + (1,) * (n.ndim - 1)), n, o)
            return jax.tree_util.tree_map(pick, new, old)

        def one_step(state, active, index, draws, resident):
            images, rows, one_hot, strengths, augment = resident
            logs, new = step_all(state, index, draws, strengths, augment, images, rows, one_hot)
            return keep_active(active, new, state), (logs["loss"], logs["accuracy"])

        def chunk(state, active, indices, draws, valid, resident):
            # indices (S, K, B), draws (S, K, B, 6), valid (S,): S steps of every member, scanned.
            if indices.shape[0] == 1:  # one step: no loop (XLA on the CPU runs convolutions in loops ~30x slower)
                state, (loss, accuracy) = one_step(state, active & valid[0], indices[0], draws[0], resident)
                return state, (loss[None], accuracy[None])

            def body(carry, step):
                index, draw, ok = step
                return one_step(carry, active & ok, index, draw, resident)

            return jax.lax.scan(body, state, (indices, draws, valid))

        self.chunk = jax.jit(chunk, donate_argnums=0)

        def evaluate(state, x, y):
            # x (N, b, H, W, C), y (N, b, 10): the same validation batches for every member.
            def body(carry, batch):
                logs, new = jax.vmap(template.test_step, in_axes=(0, None))(carry, batch)
                return new, (logs["loss"], logs["accuracy"])

            _, (loss, accuracy) = jax.lax.scan(body, state, (x, y))
            return loss[-1], accuracy[-1]

        self.evaluate = jax.jit(evaluate)


def _stack(values_per_member):
    import jax.numpy as jnp

    return [jnp.stack(column) for column in zip(*values_per_member, strict=True)]


def train_pack(configs: Sequence[TrainConfig], data: Mnist,
               callbacks: Sequence[Sequence[keras.callbacks.Callback]] | None = None,
               checkpoint_dirs: Sequence[str | os.PathLike | None] | None = None,
               chunk_steps: int | None = None, member_axis: str = "vmap",
               report=None) -> list[RunResult | BaseException]:
    """Train every config of ``configs`` as one pack; one RunResult per member, in order.

    A member that failed (diverged) gets its exception in its place instead of a result; the others are
    unaffected. ``callbacks[k]`` observe member k at epoch granularity (on_train_begin, on_epoch_begin,
    on_epoch_end with the unpacked run's logs, on_train_end; batch hooks are not called). With
    ``checkpoint_dirs[k]``, member k is checkpointed there every epoch exactly as ``train.train`` does, and a
    later pack (or an unpacked run) of the same config resumes from it.
    """
    require_jax_backend()
    chunk_steps = chunk_steps or default_chunk_steps()
    configs = list(configs)
    check_packable(configs)
    callbacks = [list(c) for c in callbacks] if callbacks is not None else [[] for _ in configs]
    checkpoint_dirs = list(checkpoint_dirs) if checkpoint_dirs is not None else [None] * len(configs)
    if not len(callbacks) == len(checkpoint_dirs) == len(configs):
        raise ValueError(f"{len(configs)} configs, {len(callbacks)} callback lists and {len(checkpoint_dirs)} "
                         "checkpoint directories: expected one of each per member.")
    shared = configs[0]
    rows = build_split(row_numbers(data), shared.validation, shared.validation_size, shared.split_seed,
                       shared.train_subset)
    x_val = data.x_test if rows.validation_is_test else data.x_train[rows.x_val]
    split = dataclasses.replace(rows, x_train=None, x_test=data.x_test, x_val=None)
    n_train = len(rows.y_train)
    steps = steps_per_epoch(n_train, shared.batch_size)

    members = []
    for index, (config, member_callbacks, directory) in enumerate(zip(configs, callbacks, checkpoint_dirs)):
        configure_runtime(config)  # as train.train: seeds Python, NumPy and Keras before the model is made
        resumed = load_checkpoint(Path(directory) if directory is not None else None, config)
        if resumed is not None:
            model, initial_epoch, history = resumed
        else:
            model, initial_epoch, history = compile_model(build_model(config), config, steps), 0, {}
        build_state(model, x_val)
        history = {key: list(history.get(key, [])) for key in EPOCH_METRICS}
        recorder, callback_list = _member_callbacks(config, model, history, directory, member_callbacks)
        members.append(Member(index, config, model, history, initial_epoch, recorder, callback_list,
                              build_schedule(config), effective_steps_per_execution(steps, config.steps_per_execution)))

    first_epoch = min(m.initial_epoch for m in members)
    start = time.perf_counter()
    if first_epoch < shared.epochs:
        _train_epochs(members, data, rows.x_train, rows.y_train, x_val, rows.y_val, first_epoch, chunk_steps,
                      member_axis, report)
    train_seconds = time.perf_counter() - start
    results: list[RunResult | BaseException] = []
    for member in members:
        if member.failure is not None:
            results.append(member.failure)
            continue
        epochs_trained = len(member.history["loss"]) - member.initial_epoch
        result = evaluate(member.config, member.model, split, member.history, train_seconds, member.initial_epoch)
        if epochs_trained <= 0:
            result.train_seconds, result.train_images_per_second = 0.0, 0.0
        else:
            result.train_images_per_second = n_train * epochs_trained / train_seconds
        results.append(result)
    return results


def _train_epochs(members: list[Member], data: Mnist, train_rows: np.ndarray, train_labels: np.ndarray,
                  x_val: np.ndarray, y_val: np.ndarray, first_epoch: int, chunk_steps: int, member_axis: str,
                  report) -> None:
    import jax.numpy as jnp

    shared = members[0].config
    batch, n_train = shared.batch_size, len(train_labels)
    steps = steps_per_epoch(n_train, batch)
    full_steps, last_batch = divmod(n_train, batch)
    steps_per_call = max(1, min(chunk_steps, full_steps))
    calls = math.ceil(full_steps / steps_per_call) if full_steps else 0
    steps_per_call = math.ceil(full_steps / calls) if calls else 0  # the fewest padded steps
    template = members[0].model
    packed = PackedSteps(template, [m.config for m in members], data.x_train, train_rows, train_labels, member_axis)
    trainable, non_trainable, optimizer, metrics = (
        _stack(column) for column in zip(*(m.state() for m in members), strict=True))
    metrics_reset = [jnp.zeros_like(v) for v in metrics]
    learning_rate_slot = next(i for i, v in enumerate(template.optimizer.variables)
                              if v is template.optimizer._learning_rate)
    val_batches = _eval_batches(x_val, y_val)
    for member in members:
        member.call("on_train_begin")

    for epoch in range(first_epoch, shared.epochs):
        training = [m for m in members if m.failure is None and not m.stopped and m.initial_epoch <= epoch]
        if not training:
            continue
        epoch_start = time.perf_counter()
        active = np.array([m in training for m in members])
        rates = np.array([m.schedule(epoch) if active[m.index] else 0.0 for m in members], np.float32)
        old_rates = optimizer[learning_rate_slot]
        optimizer[learning_rate_slot] = jnp.where(jnp.asarray(active), jnp.asarray(rates, old_rates.dtype), old_rates)
        metrics = [jnp.zeros_like(v) for v in metrics_reset]  # the chunk donates (frees) what it is given
        for member in training:
            member.call("on_epoch_begin", epoch)
        orders = np.stack([epoch_rows(m.config, epoch, n_train) if active[m.index] else np.zeros(n_train, np.int64)
                           for m in members])
        running_loss = np.full((steps, len(members)), np.nan, np.float32)
        running_accuracy = np.full((steps, len(members)), np.nan, np.float32)
        state = (trainable, non_trainable, optimizer, metrics)
        calls = [(start, min(start + steps_per_call, full_steps), steps_per_call)
                 for start in range(0, full_steps, steps_per_call)] if full_steps else []
        if last_batch:
            calls.append((full_steps, full_steps + 1, 1))
        for begin, end, length in calls:
            size = batch if begin < full_steps else last_batch
            indices = np.zeros((length, len(members), size), np.int32)
            draws = np.zeros((length, len(members), size, 6), np.float32)
            for step in range(begin, end):
                for member in training:
                    indices[step - begin, member.index] = orders[member.index, step * batch:step * batch + size]
                    if member.config.augmentation:
                        draws[step - begin, member.index] = batch_draws(member.config, epoch, step, size)
            valid = np.arange(length) < end - begin
            state, (loss, accuracy) = packed.chunk(state, jnp.asarray(active), jnp.asarray(indices),
                                                   jnp.asarray(draws), jnp.asarray(valid), packed.resident)
            running_loss[begin:end] = np.asarray(loss)[:end - begin]
            running_accuracy[begin:end] = np.asarray(accuracy)[:end - begin]
            _guard(training, running_loss, begin, end, epoch, rates)
            active = np.array([m in training and m.failure is None for m in members])
        trainable, non_trainable, optimizer, metrics = state
        val_loss, val_accuracy = packed.evaluate((trainable, non_trainable, metrics_reset),
                                                 *val_batches)
        val_loss, val_accuracy = np.asarray(val_loss), np.asarray(val_accuracy)
        epoch_seconds = time.perf_counter() - epoch_start
        for member in training:
            if member.failure is not None:
                continue
            k = member.index
            member.load_state([v[k] for v in trainable], [v[k] for v in non_trainable], [v[k] for v in optimizer])
            logs = {"loss": float(running_loss[-1, k]), "accuracy": float(running_accuracy[-1, k]),
                    "val_loss": float(val_loss[k]), "val_accuracy": float(val_accuracy[k]),
                    "epoch_seconds": epoch_seconds, "learning_rate": float(rates[k])}
            member.call("on_epoch_end", epoch, logs)
            if member.model.stop_training:
                member.stopped = True
        if report is not None:
            report(f"pack epoch {epoch + 1}/{shared.epochs}: {len(training)} member(s) trained "
                   f"({epoch_seconds:.1f} s)")
    for member in members:
        if member.failure is None:
            member.call("on_train_end")


def _guard(training: list[Member], running_loss: np.ndarray, begin: int, end: int, epoch: int,
           rates: np.ndarray) -> None:
    """The divergence guard of each member, read where its unpacked run reads it: at each execution's end."""
    for member in training:
        if member.failure is not None:
            continue
        for step in range(begin, end):
            if (step + 1) % member.execution_steps:
                continue
            loss = float(running_loss[step, member.index])
            if not math.isfinite(loss) or loss > DivergenceGuard.MAX_HEALTHY_LOSS:
                batch = step  # Keras calls on_train_batch_end with an execution's last step
                member.failure = TrainingDiverged(
                    f"training diverged: loss {loss:.4g} at batch {batch} of epoch {epoch} "
                    f"(learning_rate {float(rates[member.index]):g}); lower learning_rate or check the config."
                )
                break


def _eval_batches(images: np.ndarray, labels: np.ndarray):
    """Validation batches of EVAL_BATCH_SIZE (as the unpacked fit), stacked (N, b, ...); needs N * b images."""
    import jax.numpy as jnp

    count = len(labels)
    if count % EVAL_BATCH_SIZE:
        raise ValueError(f"packed validation needs a multiple of {EVAL_BATCH_SIZE} validation images; "
                         f"got {count}. Use validation_size={count - count % EVAL_BATCH_SIZE} or train unpacked.")
    one_hot = np.eye(NUM_CLASSES, dtype=np.float32)[labels]
    shape = (count // EVAL_BATCH_SIZE, EVAL_BATCH_SIZE)
    return (jnp.asarray(np.asarray(images, np.float32).reshape(shape + images.shape[1:])),
            jnp.asarray(one_hot.reshape(shape + (NUM_CLASSES,))))
