"""The code paths that can train a run, by name: ``config.pipeline`` picks one, ``train.train`` runs it.

The trainer (``train.train``'s own loop) is the default. Other pipelines register themselves here from their own
module (``seed_pipeline`` registers ``"seed_script"``, the seed's code as written), so neither the config nor the
trainer imports them: config validation reads a pipeline's name and the fields its code fixes from this registry,
and ``train.train`` hands a run to the registered ``train`` function. Import-light: no Keras.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .registry import Registry

if TYPE_CHECKING:
    from .train import RunResult

DEFAULT_PIPELINE = "trainer"


@dataclass(frozen=True)
class Pipeline:
    """Code that trains a run: ``train`` (None for ``train.train``'s own loop) and the fields its code fixes."""

    title: str
    train: Callable[..., RunResult] | None = None
    fixed_fields: Mapping[str, str] = field(default_factory=dict)  # field -> where the code fixes it


PIPELINES: Registry[Pipeline] = Registry("pipeline", {DEFAULT_PIPELINE: Pipeline("the trainer")})


def register_pipeline(name: str, pipeline: Pipeline) -> None:
    """Add a pipeline under ``name`` (its module calls this once, when imported)."""
    PIPELINES.register(name, pipeline)
