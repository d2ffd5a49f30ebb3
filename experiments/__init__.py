"""User-facing commands and study definitions: ``python -m experiments.train|ablate|report|tune|ensemble``."""
