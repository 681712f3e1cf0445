"""Choosing the variance threshold from the data.

``auto_threshold`` runs Otsu's method on the log of the tile variances: brightfield
background tiles have variances of a few units (sensor and JPEG noise), tissue tiles of
hundreds, so on a log scale the two form separate modes. When the distribution has
only one mode (a slide that is nearly all tissue or nearly all background) Otsu would
split that mode in two; the method then falls back to :data:`DEFAULT_THRESHOLD`.
"""

from __future__ import annotations

import numpy as np

#: Reference-unit threshold used when the data show no background/tissue split.
DEFAULT_THRESHOLD = 100.0
#: Two modes must lie at least this many decades apart to be trusted as bimodal.
MIN_MODE_SEPARATION = 0.8
#: The automatic threshold is kept inside this range (reference units).
THRESHOLD_RANGE = (10.0, 2000.0)


def otsu(values: np.ndarray, bins: int = 256) -> tuple[float, float, float]:
    """Otsu's threshold of ``values``, with the means of the two classes it separates."""
    hist, edges = np.histogram(values, bins=bins)
    centers = (edges[:-1] + edges[1:]) / 2
    weight0 = np.cumsum(hist)
    weight1 = weight0[-1] - weight0
    sum0 = np.cumsum(hist * centers)
    mean0 = sum0 / np.maximum(weight0, 1)
    mean1 = (sum0[-1] - sum0) / np.maximum(weight1, 1)
    between = weight0 * weight1 * (mean0 - mean1) ** 2
    best = int(np.argmax(between[:-1])) if len(between) > 1 else 0
    return float(edges[best + 1]), float(mean0[best]), float(mean1[best])


def auto_threshold(variances: np.ndarray) -> tuple[float, str]:
    """A threshold (reference units) separating background from tissue tiles.

    Parameters
    ----------
    variances
        Tile variances; NaNs (unread or damaged tiles) are ignored.

    Returns
    -------
    (threshold, method)
        ``method`` is ``"otsu"`` or ``"default"`` (no clear second mode).
    """
    values = np.asarray(variances, dtype=np.float64).ravel()
    values = values[np.isfinite(values)]
    if values.size < 2:
        return DEFAULT_THRESHOLD, "default"
    logs = np.log10(1.0 + values)
    if np.ptp(logs) < MIN_MODE_SEPARATION:
        return DEFAULT_THRESHOLD, "default"
    cut, low, high = otsu(logs)
    if high - low < MIN_MODE_SEPARATION:
        return DEFAULT_THRESHOLD, "default"
    # Both classes on the same side of the default: one mode split in two (all tissue
    # with varied texture, or all background with dust), not background vs tissue.
    if 10.0**low - 1.0 > DEFAULT_THRESHOLD or 10.0**high - 1.0 < DEFAULT_THRESHOLD:
        return DEFAULT_THRESHOLD, "default"
    threshold = float(np.clip(10.0**cut - 1.0, *THRESHOLD_RANGE))
    return threshold, "otsu"
