"""Why a model decided: gradient saliency, Grad-CAM and conv activation maps, on TensorFlow or JAX.

Works on every architecture the studies train (``model.ARCHITECTURES``). Their output layer, named
``predictions``, is a softmax: a ``Dense`` with softmax activation (seed, extra_block) or an
``Activation("softmax")`` after Dense ``logits`` (+ BatchNormalization ``logits_bn``) (no_pool_*).
Explanations use the pre-softmax score (logit) of a class, as Grad-CAM prescribes: a probe model outputs
the softmax's input, and for a softmax ``Dense`` the logits are computed from its kernel and bias.

Everything is ``keras.ops`` except taking a gradient, the one backend-specific step (``gradient``).
Prediction needs none of this: call the model itself (``model.predict_on_batch``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import keras
import numpy as np

from .model import OUTPUT_LAYER

IMAGE_SIZE = 28
GRADIENT_BACKENDS = ("tensorflow", "jax")


def as_batch(images: np.ndarray) -> np.ndarray:
    """A (28, 28) or (N, 28, 28[, 1]) array as a float32 (N, 28, 28, 1) batch."""
    array = np.asarray(images, dtype=np.float32)
    if array.ndim == 2:
        array = array[None]
    if array.ndim == 3:
        array = array[..., None]
    if array.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE, 1):
        raise ValueError(f"expected images of shape (28, 28) or (N, 28, 28, 1), got {np.asarray(images).shape}.")
    return array


def gradient(function: Callable, x):
    """d function(x) / dx for a scalar-valued ``function`` of one tensor, on the active Keras backend.

    The only backend-specific code of the explorer: Keras 3 has no backend-neutral gradient.
    """
    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        x = tf.convert_to_tensor(x)
        with tf.GradientTape() as tape:
            tape.watch(x)
            value = function(x)
        return tape.gradient(value, x)
    if backend == "jax":
        import jax

        return jax.grad(function)(x)
    raise ValueError(f"explanations need gradients, which are implemented for the Keras backends "
                     f"{', '.join(GRADIENT_BACKENDS)}, not {backend!r}; set KERAS_BACKEND to one of them.")


@dataclass
class Activations:
    """The feature maps of one conv layer for one image, after its ReLU."""

    layer: str  # the layer whose output the maps are: the conv itself, or the ReLU that follows it
    maps: np.ndarray  # (height, width, channels) float32


@dataclass
class Explanation:
    """Why the model gave one image its class: both heat maps are 28x28 in [0, 1]."""

    predicted_class: int
    target_class: int  # the class explained
    probabilities: np.ndarray  # (10,) float32
    saliency: np.ndarray  # |d logit / d pixel|, scaled so the strongest pixel is 1
    gradcam: np.ndarray  # Grad-CAM on ``gradcam_layer``, upsampled to 28x28
    gradcam_layer: str
    activations: list[Activations]


def _activation_name(activation) -> str:
    return getattr(activation, "__name__", "")


def _is_softmax(activation) -> bool:
    return activation is keras.activations.softmax or _activation_name(activation) == "softmax"


def _is_linear(activation) -> bool:
    return activation is None or activation is keras.activations.linear or _activation_name(activation) == "linear"


def output_layer(model: keras.Model) -> keras.layers.Layer:
    """The model's softmax output layer: the one named ``predictions``, else the last layer."""
    names = {layer.name for layer in model.layers}
    return model.get_layer(OUTPUT_LAYER) if OUTPUT_LAYER in names else model.layers[-1]


def feature_layers(model: keras.Model) -> list[keras.layers.Layer]:
    """Per Conv2D, the layer whose output is its rectified feature maps.

    A conv with its own ReLU (seed, extra_block) is its own; a linear conv (no_pool_*: conv, BN, ReLU) is
    followed by an ``Activation``/``ReLU`` layer before the next conv, flatten or dense layer.
    """
    boundaries = (keras.layers.Conv2D, keras.layers.Flatten, keras.layers.Dense)
    layers = model.layers
    chosen = []
    for index, layer in enumerate(layers):
        if not isinstance(layer, keras.layers.Conv2D):
            continue
        feature = layer
        if _is_linear(layer.activation):
            for following in layers[index + 1:]:
                if isinstance(following, boundaries):
                    break
                if isinstance(following, (keras.layers.Activation, keras.layers.ReLU)):
                    feature = following
                    break
        chosen.append(feature)
    return chosen


class Explainer:
    """Saliency, Grad-CAM and activations of one trained model (built once per model, reused per request)."""

    def __init__(self, model: keras.Model):
        self.model = model
        final = output_layer(model)
        if isinstance(final, keras.layers.Dense) and _is_softmax(final.activation):
            self._dense = final  # logits = input @ kernel + bias
        elif isinstance(final, keras.layers.Activation) and _is_softmax(final.activation):
            self._dense = None  # logits = the activation's input
        else:
            raise ValueError(
                f"model {model.name!r} must end in a softmax (a Dense with softmax activation, or an "
                f"Activation('softmax') layer) named {OUTPUT_LAYER!r} to explain its logits; its output layer is "
                f"{type(final).__name__} {final.name!r}."
            )
        features = feature_layers(model)
        if not features:
            raise ValueError(f"model {model.name!r} has no Conv2D layer to explain.")
        self.feature_layer_names = [layer.name for layer in features]
        image = model.inputs[0]
        classifier_input = final.input
        # One forward pass gives every feature map and the softmax's input; the head maps the last feature
        # map to the softmax's input, for Grad-CAM's gradient with respect to that map.
        self._probe = keras.Model(image, [layer.output for layer in features] + [classifier_input],
                                  name="explain_probe")
        self._head = keras.Model(features[-1].output, classifier_input, name="explain_head")

    def _logits(self, classifier_input):
        if self._dense is None:
            return classifier_input
        logits = keras.ops.matmul(classifier_input, self._dense.kernel)
        return logits if self._dense.bias is None else logits + self._dense.bias

    def logits(self, images: np.ndarray) -> np.ndarray:
        """Pre-softmax scores, (N, 10) float32, for (28, 28) or (N, 28, 28[, 1]) images."""
        outputs = self._probe(keras.ops.convert_to_tensor(as_batch(images)), training=False)
        return keras.ops.convert_to_numpy(self._logits(outputs[-1]))

    def explain(self, image: np.ndarray, target_class: int | None = None) -> Explanation:
        """Saliency, Grad-CAM and conv activations for one 28x28 image in [0, 1].

        ``target_class`` defaults to the predicted class. Saliency is |d logit / d pixel|; Grad-CAM weights
        the last conv layer's rectified maps by their mean gradient, keeps the positive part and upsamples
        it bilinearly to the input size.
        """
        ops = keras.ops
        batch, feature_maps, logits = self._forward(image)
        predicted = int(np.argmax(logits))
        target = predicted if target_class is None else int(target_class)
        if not 0 <= target < logits.shape[-1]:
            raise ValueError(f"target_class={target_class} is not a class; expected 0..{logits.shape[-1] - 1}.")

        def input_score(x):
            return self._logits(self._probe(x, training=False)[-1])[0, target]

        def feature_score(last_maps):
            return self._logits(self._head(last_maps, training=False))[0, target]

        pixel_gradient = ops.convert_to_numpy(gradient(input_score, batch))[0, :, :, 0]
        last_maps = feature_maps[-1]
        channel_weights = ops.mean(gradient(feature_score, last_maps)[0], axis=(0, 1))
        cam = ops.relu(ops.sum(last_maps[0] * channel_weights, axis=-1))
        cam = ops.image.resize(cam[None, :, :, None], (IMAGE_SIZE, IMAGE_SIZE), interpolation="bilinear")
        probabilities = ops.convert_to_numpy(ops.softmax(ops.convert_to_tensor(logits)))
        return Explanation(
            predicted_class=predicted,
            target_class=target,
            probabilities=probabilities.astype(np.float32),
            saliency=_unit_range(np.abs(pixel_gradient)),
            gradcam=_unit_range(ops.convert_to_numpy(cam)[0, :, :, 0]),
            gradcam_layer=self.feature_layer_names[-1],
            activations=self._activations(feature_maps),
        )

    def activations(self, image: np.ndarray) -> tuple[int, list[Activations]]:
        """The predicted class and every conv layer's feature maps for one 28x28 image: one forward pass, no
        gradients (``explain`` returns the same maps along with saliency and Grad-CAM)."""
        _, feature_maps, logits = self._forward(image)
        return int(np.argmax(logits)), self._activations(feature_maps)

    def _forward(self, image: np.ndarray):
        """(input batch, each conv layer's feature maps, the logits of the one image) from one probe pass."""
        batch = keras.ops.convert_to_tensor(as_batch(image))
        *feature_maps, classifier_input = self._probe(batch, training=False)
        return batch, feature_maps, keras.ops.convert_to_numpy(self._logits(classifier_input))[0]

    def _activations(self, feature_maps) -> list[Activations]:
        return [Activations(name, keras.ops.convert_to_numpy(maps)[0].astype(np.float32))
                for name, maps in zip(self.feature_layer_names, feature_maps, strict=True)]


def _unit_range(values: np.ndarray) -> np.ndarray:
    """``values`` divided by their maximum (all zeros stay zeros), as float32."""
    peak = float(np.max(values)) if values.size else 0.0
    return (values / peak if peak > 0 else np.zeros_like(values)).astype(np.float32)
