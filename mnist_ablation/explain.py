"""Why a model decided: fast prediction, gradient saliency, Grad-CAM and conv activation maps.

Works on any Keras functional model whose last layer is a softmax ``Dense`` (the seed's CNN and its
variants); explanations use the pre-softmax score (logit) of the class, as Grad-CAM prescribes.
"""

from __future__ import annotations

from dataclasses import dataclass

import keras
import numpy as np
import tensorflow as tf

IMAGE_SIZE = 28


def _as_batch(image: np.ndarray) -> tf.Tensor:
    """A (28, 28) or (N, 28, 28[, 1]) array as a float32 (N, 28, 28, 1) tensor."""
    array = np.asarray(image, dtype=np.float32)
    if array.ndim == 2:
        array = array[None]
    if array.ndim == 3:
        array = array[..., None]
    if array.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE, 1):
        raise ValueError(f"expected images of shape (28, 28) or (N, 28, 28, 1), got {np.asarray(image).shape}.")
    return tf.constant(array)


@dataclass
class Activations:
    """The output of one conv layer for one image."""

    layer: str
    maps: np.ndarray  # (height, width, channels) float32, after the layer's ReLU


class Explainer:
    """Wraps one trained model: compiled prediction plus the extra outputs explanations need."""

    def __init__(self, model: keras.Model):
        self.model = model
        self.conv_layers = [layer for layer in model.layers if isinstance(layer, keras.layers.Conv2D)]
        if not self.conv_layers:
            raise ValueError(f"model {model.name!r} has no Conv2D layer to explain.")
        final = model.layers[-1]
        if not isinstance(final, keras.layers.Dense) or final.activation is not keras.activations.softmax:
            raise ValueError(
                f"model {model.name!r} must end in a softmax Dense layer to explain its logits; "
                f"its last layer is {type(final).__name__} {final.name!r}."
            )
        self._final = final
        # Everything explanations need in one forward pass: each conv output and the classifier's input.
        self._probe = keras.Model(
            model.inputs, [layer.output for layer in self.conv_layers] + [final.input], name="explain_probe"
        )
        # A traced graph answers in a millisecond or two; eager Keras calls cost ~10x more per image.
        self._predict = tf.function(
            lambda images: model(images, training=False),
            input_signature=[tf.TensorSpec([None, IMAGE_SIZE, IMAGE_SIZE, 1], tf.float32)],
            reduce_retracing=True,
        )

    def warm_up(self) -> None:
        """Trace the graph now so the first real request is fast."""
        self.predict(np.zeros((IMAGE_SIZE, IMAGE_SIZE), np.float32))

    def predict(self, images: np.ndarray) -> np.ndarray:
        """Class probabilities, (N, 10) float32, for (28, 28) or (N, 28, 28[, 1]) images in [0, 1]."""
        return self._predict(_as_batch(images)).numpy()

    def _logits(self, classifier_input: tf.Tensor) -> tf.Tensor:
        return tf.matmul(classifier_input, self._final.kernel) + self._final.bias

    def explain(self, image: np.ndarray, target_class: int | None = None) -> dict:
        """Saliency, Grad-CAM (both 28x28 in [0, 1]) and conv activations for one image.

        ``target_class`` defaults to the predicted class. Saliency is |d logit / d pixel|; Grad-CAM
        weights the last conv layer's maps by their mean gradient, keeps the positive part and
        upsamples it to the input size.
        """
        batch = _as_batch(image)
        with tf.GradientTape(persistent=True) as tape:
            tape.watch(batch)
            *conv_outputs, classifier_input = self._probe(batch, training=False)
            logits = self._logits(classifier_input)
            predicted = int(tf.argmax(logits[0]))
            target = predicted if target_class is None else int(target_class)
            if not 0 <= target < logits.shape[-1]:
                raise ValueError(f"target_class={target_class} is not a class; expected 0..{logits.shape[-1] - 1}.")
            score = logits[0, target]
        pixel_gradient = tape.gradient(score, batch)[0, :, :, 0].numpy()
        last_conv = conv_outputs[-1]
        conv_gradient = tape.gradient(score, last_conv)[0]
        del tape
        channel_weights = tf.reduce_mean(conv_gradient, axis=(0, 1))
        cam = tf.nn.relu(tf.reduce_sum(last_conv[0] * channel_weights, axis=-1))
        cam = tf.image.resize(cam[None, :, :, None], (IMAGE_SIZE, IMAGE_SIZE), method="bilinear")[0, :, :, 0]
        probabilities = tf.nn.softmax(logits[0]).numpy()
        return {
            "predicted_class": predicted,
            "target_class": target,
            "probabilities": probabilities,
            "saliency": _unit_range(np.abs(pixel_gradient)),
            "gradcam": _unit_range(cam.numpy()),
            "gradcam_layer": self.conv_layers[-1].name,
            "activations": [
                Activations(layer.name, output[0].numpy()) for layer, output in zip(self.conv_layers, conv_outputs)
            ],
        }


def _unit_range(values: np.ndarray) -> np.ndarray:
    """``values`` divided by their maximum (all zeros stay zeros), as float32."""
    peak = float(np.max(values)) if values.size else 0.0
    return (values / peak if peak > 0 else np.zeros_like(values)).astype(np.float32)
