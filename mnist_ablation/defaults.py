"""The statistical defaults and the checks of their values, one home each.

Import-light (no SciPy, pandas or a framework): the commands show these defaults in ``--help`` and check a
flag before anything runs with the same function the statistics call when they receive the value. A bad
value raises ``StudyError`` (a ``ValueError``, and a user error the commands print as one line).
"""

from __future__ import annotations

from .errors import StudyError

CONFIDENCE = 0.95  # level of every interval
EQUIVALENCE_MARGIN = 0.001  # the equivalence test's margin, "negligible" within it: +-0.1 points of accuracy
POWER = 0.8  # power of the smallest visible effect and of seed planning
LEARNING_CURVE_THRESHOLD = 0.99  # validation accuracy for "epochs to reach" in the learning-curve summary
MAX_SEEDS = 10  # the precision rule's cap on seeds per arm when none is given


def check_confidence(confidence: float, name: str = "confidence") -> float:
    if not 0 < confidence < 1:
        raise StudyError(f"{name} {confidence!r}: expected a level strictly between 0 and 1, e.g. {CONFIDENCE}.")
    return confidence


def check_equivalence_margin(margin: float, name: str = "equivalence_margin") -> float:
    if not 0 < margin < 1:
        raise StudyError(f"{name} {margin!r}: expected a positive fraction of accuracy below 1, e.g. "
                         f"{EQUIVALENCE_MARGIN} for +-{100 * EQUIVALENCE_MARGIN:.1f} points.")
    return margin


def check_smallest_effect(effect: float, name: str = "smallest effect") -> float:
    """The smallest difference worth detecting, which the report's seed plans are for (default: the margin)."""
    if not (isinstance(effect, (int, float)) and 0 < effect < 1):
        raise StudyError(f"{name} {effect!r}: expected a fraction of accuracy in (0, 1), e.g. {EQUIVALENCE_MARGIN} "
                         f"for {100 * EQUIVALENCE_MARGIN:.1f} points (--smallest-effect {EQUIVALENCE_MARGIN}).")
    return float(effect)


def check_threshold(threshold: float, name: str = "threshold") -> float:
    if not 0 < threshold <= 1:
        raise StudyError(f"{name} {threshold!r}: expected a validation accuracy in (0, 1], e.g. "
                         f"{LEARNING_CURVE_THRESHOLD}.")
    return threshold


def check_target_ci_width(width: float, name: str = "target CI width") -> float:
    if not 0 < width < 1:
        raise StudyError(f"{name} {width!r}: expected a fraction in (0, 1), e.g. 0.002 for an interval 0.2 points "
                         "wide.")
    return width
