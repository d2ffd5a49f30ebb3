"""The seed's pipeline as its text writes it, as one script run (the baseline for study throughput).

    python -m benchmarks.seed_script [--train-subset N] [--epochs N]

Only the data source differs (the local MNIST files instead of Keras' download) and the figures are
saved instead of shown; --train-subset keeps the first N training images for shorter runs.
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.seed_script", description=__doc__)
    parser.add_argument("--train-subset", type=int, default=None)
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--output", default=None, help="directory for the two figures (default: a temp dir)")
    args = parser.parse_args(argv)

    import tempfile

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    import seaborn as sns
    import tensorflow as tf
    from tensorflow.keras.callbacks import LearningRateScheduler
    from tensorflow.keras.preprocessing.image import ImageDataGenerator
    from tensorflow.keras.utils import to_categorical

    from mnist_ablation.data import load_mnist
    from mnist_ablation.model import seed_sequential_model
    from mnist_ablation.seed_pipeline import lr_scheduler  # the seed's schedule function, verbatim

    data = load_mnist(args.data_dir)
    train_images, test_images = data.x_train, data.x_test  # already reshaped and / 255 as the seed does
    train_labels, test_labels = to_categorical(data.y_train), to_categorical(data.y_test)
    if args.train_subset:
        train_images, train_labels = train_images[: args.train_subset], train_labels[: args.train_subset]

    model = seed_sequential_model()  # the seed's Sequential, layer for layer as its text writes it
    datagen = ImageDataGenerator(rotation_range=10, width_shift_range=0.1, height_shift_range=0.1,
                                 zoom_range=0.1, shear_range=0.1)
    datagen.fit(train_images)
    model.compile(optimizer="adam", loss="categorical_crossentropy", metrics=["accuracy"])

    history = model.fit(datagen.flow(train_images, train_labels, batch_size=32), epochs=args.epochs,
                        validation_data=(test_images, test_labels), callbacks=[LearningRateScheduler(lr_scheduler)],
                        verbose=2)
    test_loss, test_acc = model.evaluate(test_images, test_labels)
    print(f"\nTest accuracy: {test_acc}\n")

    output = args.output or tempfile.mkdtemp(prefix="seed_script_")
    plt.figure(figsize=(14, 6))
    plt.subplot(1, 2, 1)
    plt.plot(history.history["accuracy"], label="Train Accuracy")
    plt.plot(history.history["val_accuracy"], label="Validation Accuracy")
    plt.legend()
    plt.subplot(1, 2, 2)
    plt.plot(history.history["loss"], label="Train Loss")
    plt.plot(history.history["val_loss"], label="Validation Loss")
    plt.legend()
    plt.tight_layout()
    plt.savefig(os.path.join(output, "training_curves.png"))
    y_pred_classes = np.argmax(model.predict(test_images), axis=1)
    confusion_mtx = tf.math.confusion_matrix(np.argmax(test_labels, axis=1), y_pred_classes)
    plt.figure(figsize=(10, 8))
    sns.heatmap(confusion_mtx, annot=True, fmt="g", cmap="Blues")
    plt.savefig(os.path.join(output, "confusion_matrix.png"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
