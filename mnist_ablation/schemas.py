"""The explorer's request and response models: every body is checked here before it reaches the explorer.

Pydantic models only (no HTTP, no model work): ``serve`` validates bodies against the request models and
documents answers with the response models; ``explorer`` computes the answers.
"""

from __future__ import annotations

from typing import Annotated, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, Strict, WithJsonSchema, model_validator

from .explorer import ENSEMBLE
from .preprocess import FIELD_SIZE, mnist_preprocess

MAX_DRAWING_SIDE = 560  # twice the page's canvas; larger drawings should be downscaled by the client
MAX_EXAMPLES = 200  # test images per page of the browser
MAX_ACTIVATION_CHANNELS = 64
MAX_RUN_ID_LENGTH = 64  # MLflow run ids are 32 hex digits
Sort = Literal["confidence", "true_probability", "index"]  # orders of the test-set browser


# -- request models ------------------------------------------------------------------------------------------

# Strict: true, "0.5" and null are not pixels. Range and finiteness are checked per array (one message, fast).
Pixel = Annotated[float, Strict(), WithJsonSchema({"type": "number", "minimum": 0, "maximum": 1})]
ImageRow = Annotated[list[Pixel], Field(min_length=FIELD_SIZE, max_length=FIELD_SIZE)]
DrawingRow = Annotated[list[Pixel], Field(min_length=1, max_length=MAX_DRAWING_SIDE)]
ImageRows = Annotated[list[ImageRow], Field(
    min_length=FIELD_SIZE, max_length=FIELD_SIZE,
    description="28x28 pixels in [0, 1], white digit on black (as MNIST); used as is")]
DrawingRows = Annotated[list[DrawingRow], Field(
    min_length=1, max_length=MAX_DRAWING_SIDE,
    description=f"HxW pixels in [0, 1] (H, W <= {MAX_DRAWING_SIDE}), white ink on black; preprocessed like MNIST "
                "(bounding box scaled to 20x20, centre of mass at the centre of 28x28)")]
RunId = Annotated[str, Strict(), Field(min_length=1, max_length=MAX_RUN_ID_LENGTH,
                                       description=f"an offered run's id, or {ENSEMBLE!r}; default: the first run")]
ClassIndex = Annotated[int, Strict(), Field(ge=0, le=9)]


def _pixel_array(rows: list[list[float]], name: str) -> np.ndarray:
    """``rows`` as a 2-D float64 array, or ValueError naming what is wrong (ragged, non-finite, out of range)."""
    width = len(rows[0])
    for index, row in enumerate(rows):
        if len(row) != width:
            raise ValueError(f"'{name}' row {index} has {len(row)} values but row 0 has {width}; "
                             "every row must have the same length.")
    array = np.asarray(rows, dtype=np.float64)
    if not np.all(np.isfinite(array)):
        where = np.argwhere(~np.isfinite(array))[0]
        raise ValueError(f"'{name}' holds NaN or infinite values (first at row {where[0]}, column {where[1]}); "
                         "pixels must be numbers in [0, 1].")
    if array.min() < 0 or array.max() > 1:
        where = np.argwhere((array < 0) | (array > 1))[0]
        raise ValueError(
            f"'{name}' pixels must lie in [0, 1] (white digit on black, as MNIST); found "
            f"{array[tuple(where)]:g} at row {where[0]}, column {where[1]} (values span "
            f"[{array.min():g}, {array.max():g}]). Divide 0-255 pixel values by 255."
        )
    return array


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid")  # a misspelt field is an error, not silently ignored


class ModelInput(StrictModel):
    """Exactly one of ``image`` (28x28, used as is) or ``drawing`` (HxW, preprocessed like MNIST)."""

    image: ImageRows | None = None
    drawing: DrawingRows | None = None
    _pixels: np.ndarray = PrivateAttr()  # the checked image or drawing as an array

    @model_validator(mode="after")
    def _one_checked_input(self):
        if (self.image is None) == (self.drawing is None):
            raise ValueError("send exactly one of 'image' (a 28x28 array in [0, 1], used as is) or 'drawing' "
                             "(any HxW array in [0, 1], preprocessed like MNIST).")
        self._pixels = _pixel_array(*((self.image, "image") if self.image is not None else (self.drawing, "drawing")))
        return self

    @property
    def preprocessed(self) -> bool:
        return self.drawing is not None

    def model_image(self) -> np.ndarray:
        """The 28x28 float32 image the model sees: ``image`` as is, or ``drawing`` through MNIST preprocessing."""
        return mnist_preprocess(self._pixels) if self.preprocessed else self._pixels.astype(np.float32)


class PredictRequest(ModelInput):
    """``image`` or ``drawing``, and the run to ask (a run id, ``ensemble``, or the default run)."""

    run_id: RunId | None = None


class SaliencyRequest(ModelInput):
    """``image`` or ``drawing``, the run to explain, and the class to explain (default: the predicted one)."""

    run_id: RunId | None = None
    target_class: ClassIndex | None = None


class ActivationsRequest(SaliencyRequest):
    """As for saliency, plus how many of each conv layer's most active channels to return."""

    max_channels: Annotated[int, Strict(), Field(ge=1, le=MAX_ACTIVATION_CHANNELS)] = 16


class PreprocessRequest(StrictModel):
    """A drawing to put through MNIST's preprocessing."""

    drawing: DrawingRows
    _pixels: np.ndarray = PrivateAttr()

    @model_validator(mode="after")
    def _checked_drawing(self):
        self._pixels = _pixel_array(self.drawing, "drawing")
        return self

    def model_image(self) -> np.ndarray:
        return mnist_preprocess(self._pixels)


# -- response models -------------------------------------------------------------------------------------------


class ValidationProblem(BaseModel):
    loc: list[str | int] = Field(description="where: body, query or path, then the field and indices")
    type: str
    msg: str


class ErrorResponse(BaseModel):
    detail: str = Field(description="what is wrong and how to fix it")
    errors: list[ValidationProblem] | None = Field(None, description="422 from validation: the first 20 problems")


class ModelStatus(BaseModel):
    run_id: str
    label: str
    loaded: bool


class HealthResponse(BaseModel):
    status: Literal["ok"]
    default_run_id: str
    models: list[ModelStatus]
    test_images_loaded: bool


class RunSummary(BaseModel):
    run_id: str
    label: str = Field(description="the arm in a study, else the run name")
    run_name: str
    experiment_id: str
    arm: str | None
    seed: str | None
    val_accuracy: float | None = Field(description="final validation accuracy")
    test_accuracy: float | None
    mlflow_url: str = Field(description="the run in the MLflow UI")


class RunsResponse(BaseModel):
    default_run_id: str
    ensemble: str | None = Field(description=f"{ENSEMBLE!r} when more than one run is offered")
    runs: list[RunSummary]


class HistoryPoint(BaseModel):
    epoch: int
    value: float | None


class RunDetails(RunSummary):
    status: str
    metrics: dict[str, float | None]
    params: dict[str, str]
    history: dict[str, list[HistoryPoint]] = Field(description="per-epoch loss, accuracy, val_*, learning_rate")


class ConfusionResponse(BaseModel):
    run_id: str
    matrix: list[list[int]] = Field(description="10x10 counts; rows: true label, columns: predicted class")
    total: int
    accuracy: float


class Example(BaseModel):
    index: int = Field(description="position in the MNIST test set")
    label: int
    predicted: int
    confidence: float = Field(description="probability of the predicted class")
    true_probability: float = Field(description="probability of the true label")
    probabilities: list[float]
    image: list[list[int]] = Field(description="28x28 pixels, 0-255")


class ExamplesResponse(BaseModel):
    run_id: str
    label: int | None
    predicted: int | None
    sort: Sort
    total: int = Field(description="test images in the cell (or row, or column)")
    offset: int
    examples: list[Example]


class PredictResponse(BaseModel):
    run_id: str
    predicted_class: int
    probabilities: list[float] = Field(description="ten class probabilities")
    members: list[str] | None = Field(None, description="for the ensemble: the runs averaged")
    image: list[list[float]] | None = Field(None, description="for a drawing: the 28x28 image the model saw")


class PreprocessResponse(BaseModel):
    image: list[list[float]] = Field(description="the 28x28 image the model would see, in [0, 1]")


class SaliencyResponse(BaseModel):
    run_id: str
    predicted_class: int
    target_class: int = Field(description="the class explained")
    probabilities: list[float]
    image: list[list[int]] = Field(description="the 28x28 model input, 0-255")
    saliency: list[list[int]] = Field(description="|d logit / d pixel|, 28x28, 0-255")
    gradcam: list[list[int]] = Field(description="Grad-CAM on gradcam_layer, upsampled to 28x28, 0-255")
    gradcam_layer: str


class ChannelMap(BaseModel):
    channel: int
    mean: float
    max: float
    map: list[list[int]] = Field(description="the channel's map scaled so its maximum is 255")


class LayerActivations(BaseModel):
    layer: str
    shape: list[int] = Field(description="height, width, channels")
    channels: list[ChannelMap]


class ActivationsResponse(BaseModel):
    run_id: str
    predicted_class: int
    layers: list[LayerActivations]
