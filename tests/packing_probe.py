"""Run by tests/test_packing.py with KERAS_BACKEND=jax: a pack and the unpacked runs of the same configs.

    python tests/packing_probe.py OUT.json

Writes what the test compares: per member, hashes of the initial weights and of the batches both routes train
on, the largest differences of the weights after training, the histories, test probabilities and outcomes.
"""

from __future__ import annotations

import hashlib
import json
import sys

import keras
import numpy as np

from mnist_ablation.config import BASELINE
from mnist_ablation.data import build_split, load_mnist
from mnist_ablation.packed import PackedSteps, batch_draws, epoch_rows, train_pack
from mnist_ablation.train import AugmentedBatches, DivergenceGuard, TrainingDiverged, row_numbers, train

# SGD, whose update is linear in the gradient, so float rounding of the augmented pixels stays float rounding
# (Adam's first step divides each gradient by its own size, which turns rounding of a near-zero gradient into a
# full-size step). Three members: the seed's augmentation and schedule; no augmentation, another schedule and an
# early stop after the first epoch; a learning rate that diverges (batch norm holds the seed's network together
# for a few steps at any rate, so the guard's threshold is lowered, for both routes alike).
SHARED = dict(train_subset=96, epochs=2, steps_per_execution=1, optimizer="sgd", validation_size=500)
CONFIGS = [
    BASELINE.replace(seed=0, learning_rate=0.01, **SHARED),
    BASELINE.replace(seed=1, augmentation=False, lr_schedule="constant", learning_rate=0.02, **SHARED),
    BASELINE.replace(seed=2, learning_rate=10.0, **SHARED),
]
STOPS_EARLY = 1  # the member whose callback stops training after its first epoch
DivergenceGuard.MAX_HEALTHY_LOSS = 8.0  # member 2 reaches 11 in its first epoch, the others stay near 2.3


def digest(arrays) -> str:
    sha = hashlib.sha256()
    for array in arrays:
        sha.update(np.ascontiguousarray(np.asarray(array)).tobytes())
    return sha.hexdigest()


class Watch(keras.callbacks.Callback):
    """Records the initial and final weights; optionally stops training after the first epoch."""

    def __init__(self, record: dict, stop: bool = False):
        super().__init__()
        self.record, self.stop = record, stop

    def on_train_begin(self, logs=None):
        self.record["initial"] = [np.asarray(v.value).copy() for v in self.model.weights]

    def on_epoch_end(self, epoch, logs=None):
        self.record["final"] = [np.asarray(v.value).copy() for v in self.model.weights]
        if self.stop:
            self.model.stop_training = True


def main(out: str) -> None:
    data = load_mnist()
    packed_records = [{} for _ in CONFIGS]
    packed = train_pack(CONFIGS, data, callbacks=[[Watch(r, k == STOPS_EARLY)] for k, r in enumerate(packed_records)])
    members = []
    for k, config in enumerate(CONFIGS):
        record: dict = {}
        try:
            alone = train(config, data, callbacks=[Watch(record, k == STOPS_EARLY)], verbose=0)
        except TrainingDiverged as error:
            alone = error
        member = {"outcome": type(packed[k]).__name__, "alone_outcome": type(alone).__name__}
        if isinstance(alone, TrainingDiverged):
            member["message"], member["alone_message"] = str(packed[k]), str(alone)
        else:
            member.update(
                initial=digest(packed_records[k]["initial"]),
                initial_difference=max(float(np.max(np.abs(a - b)))
                                       for a, b in zip(packed_records[k]["initial"], record["initial"], strict=True)),
                weights_difference=max(float(np.max(np.abs(a - b)))
                                       for a, b in zip(packed_records[k]["final"], record["final"], strict=True)),
                weights_change=max(float(np.max(np.abs(a - b)))
                                   for a, b in zip(record["final"], record["initial"], strict=True)),
                history=packed[k].history, alone_history=alone.history,
                probabilities_difference=float(np.max(np.abs(packed[k].test_probabilities
                                                             - alone.test_probabilities))),
                test_accuracy=packed[k].test_accuracy, alone_test_accuracy=alone.test_accuracy,
            )
        members.append(member)
    # The batches: what the packed step gathers and augments on the device, against the unpacked sequence.
    rows = build_split(row_numbers(data), "split", 500, 0, 96)
    steps = PackedSteps(packed[0].model, CONFIGS, data.x_train, rows.x_train, rows.y_train)
    for epoch in range(2):
        for step in range(3):
            size = 32
            indices = np.stack([epoch_rows(c, epoch, 96)[step * size:(step + 1) * size] for c in CONFIGS])
            draws = np.stack([batch_draws(c, epoch, step, size) for c in CONFIGS])
            x, y = (np.asarray(a) for a in steps.inputs(indices.astype(np.int32), draws, steps.resident))
            for k, config in enumerate(CONFIGS):
                alone = AugmentedBatches(config, data.x_train, rows.y_train, rows=rows.x_train)
                alone_x, alone_y = alone[epoch * 3 + step]
                plain = data.x_train[rows.x_train[indices[k]]]
                alone_plain = AugmentedBatches(config.replace(augmentation=False), data.x_train, rows.y_train,
                                               rows=rows.x_train)[epoch * 3 + step][0]
                batch = members[k].setdefault("batches", [])
                batch.append({"rows": digest([plain]), "alone_rows": digest([alone_plain]),
                              "labels": digest([y[k]]), "alone_labels": digest([alone_y]),
                              "pixels_difference": float(np.max(np.abs(x[k] - alone_x)))})
    with open(out, "w") as handle:
        json.dump({"backend": keras.backend.backend(), "members": members, "first_update": first_update(data)},
                  handle)


def first_update(data) -> list[dict]:
    """Per member of an augmented one-step pack: how the weights after the first update differ from unpacked."""
    configs = [BASELINE.replace(seed=seed, train_subset=32, epochs=1, validation_size=500, rotation_range=rotation)
               for seed, rotation in ((0, 10.0), (4, 25.0))]
    packed_records, differences = [{} for _ in configs], []
    train_pack(configs, data, callbacks=[[Watch(r)] for r in packed_records])
    for config, packed_record in zip(configs, packed_records, strict=True):
        record: dict = {}
        train(config, data, callbacks=[Watch(record)], verbose=0)
        gaps = np.concatenate([np.abs(a - b).ravel() for a, b in zip(packed_record["final"], record["final"],
                                                                     strict=True)])
        differences.append({"largest": float(gaps.max()), "share_above_1e-6": float(np.mean(gaps > 1e-6))})
    return differences


if __name__ == "__main__":
    main(sys.argv[1])
