"""The training batches: the seed's pixels exactly, every image once per epoch, reproducible per epoch."""

import numpy as np
import tensorflow as tf

from mnist_ablation.config import TrainConfig
from mnist_ablation.train import build_dataset, steps_per_epoch


def _epoch(dataset, steps):
    xs, ys = zip(*[(x.numpy(), y.numpy()) for x, y in dataset.take(steps)])
    return np.concatenate(xs), np.concatenate(ys)


def test_without_augmentation_batches_are_the_seeds_pixels_bit_for_bit(mnist):
    images, labels = mnist.x_train[:300], mnist.y_train[:300]
    config = TrainConfig(augmentation=False, epochs=2, batch_size=32)
    x, y = _epoch(build_dataset(config, images, labels), steps_per_epoch(300, 32))
    assert x.shape == (300, 28, 28, 1) and x.dtype == np.float32
    # Each batch row is one of the inputs, unchanged: match rows by their label and pixels.
    order = np.array([np.flatnonzero((images == row).all(axis=(1, 2, 3)))[0] for row in x])
    assert sorted(order) == list(range(300)), "every image exactly once per epoch"
    assert np.array_equal(x, images[order]) and np.array_equal(y.argmax(1), labels[order])


def test_epochs_are_reshuffled_and_resume_sees_the_same_stream(mnist):
    images, labels = mnist.x_train[:200], mnist.y_train[:200]
    config = TrainConfig(epochs=3)
    steps = steps_per_epoch(200, 32)
    whole = list(build_dataset(config, images, labels).take(3 * steps))
    resumed = list(build_dataset(config, images, labels, initial_epoch=1).take(2 * steps))
    for (x_whole, _), (x_resumed, _) in zip(whole[steps:], resumed):
        assert np.array_equal(x_whole.numpy(), x_resumed.numpy())
    assert not np.array_equal(whole[0][0].numpy(), whole[steps][0].numpy())
    other_seed = next(iter(build_dataset(config.replace(seed=1), images, labels)))[0]
    assert not np.array_equal(other_seed.numpy(), whole[0][0].numpy())


def test_float_images_that_are_not_bytes_are_kept_as_floats():
    images = np.random.default_rng(0).random((64, 28, 28, 1)).astype(np.float32)
    x, _ = _epoch(build_dataset(TrainConfig(augmentation=False), images, np.arange(64) % 10), 2)
    assert np.allclose(np.sort(x.ravel()), np.sort(images.ravel()))
    assert tf.reduce_max(x) <= 1.0


def test_steps_per_execution_divides_the_epoch():
    from mnist_ablation.train import effective_steps_per_execution

    assert effective_steps_per_execution(1719, 16) == 9  # 55,000 images, batch 32
    assert effective_steps_per_execution(1875, 16) == 15  # the seed's 60,000 images
    assert effective_steps_per_execution(19, 16) == 1 and effective_steps_per_execution(7, 16) == 7
    assert effective_steps_per_execution(32, 16) == 16 and effective_steps_per_execution(100, 1) == 1


def test_every_epoch_trains_exactly_its_own_steps_with_steps_per_execution(mnist):
    """Keras runs whole executions; a non-dividing size used to spill into the next epoch and starve the last."""
    import keras

    from mnist_ablation.train import train

    seen = []

    class LastBatch(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            self.last = batch

        def on_epoch_end(self, epoch, logs=None):
            seen.append((self.last, logs["loss"]))

    config = TrainConfig(epochs=3, train_subset=20 * 32, steps_per_execution=16, augmentation=False)
    result = train(config, mnist, callbacks=[LastBatch()], verbose=0)
    assert [last for last, _ in seen] == [19, 19, 19]
    assert all(loss > 0 for _, loss in seen) and len(result.history["loss"]) == 3
