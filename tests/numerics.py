"""Tolerances for float32 results, derived from the arithmetic (see wsi_xr/models/rounding.py).

oneDNN picks different kernels on AVX2, AVX-512, AMX and ARM CPUs, so float32 results
differ in the last bits from one machine to the next. A test compares a float32 result
with the exact (float64) one and allows the float32 rounding bound, value by value; a
failure names the CPU capability.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import numpy as np
import tifffile
import torch

from wsi_xr.models.rounding import Fp32Bound, fp32_mu_bound


def cpu_capability() -> str:
    """What oneDNN dispatches on: ``AVX2``, ``AVX512``, ``AMX``... (``torch.backends.cpu``)."""
    return str(torch.backends.cpu.get_cpu_capability())


def exact_mu(model: torch.nn.Module, tiles: np.ndarray) -> np.ndarray:
    """``mu`` of uint8 ``(N, 64, 64, 3)`` tiles computed in float64 (the reference)."""
    reference = copy.deepcopy(model).double().eval()
    x = torch.from_numpy(np.ascontiguousarray(tiles)).permute(0, 3, 1, 2).double() / 255.0
    with torch.no_grad():
        return reference.features(x).numpy()


def assert_within_bound(actual: np.ndarray, expected: np.ndarray, bound: np.ndarray, what: str) -> None:
    """``|actual - expected| <= bound`` everywhere, or fail naming the worst value and the CPU."""
    error = np.abs(np.asarray(actual, dtype=np.float64) - expected)
    ratio = error / np.maximum(bound, np.finfo(np.float64).tiny)
    worst = np.unravel_index(int(np.argmax(ratio)), ratio.shape)
    assert float(ratio[worst]) <= 1.0, (
        f"{what}: value {worst} is off by {error[worst]:.3g}, more than its float32 rounding bound "
        f"{bound[worst]:.3g} ({ratio[worst]:.3g}x) on this CPU ({cpu_capability()}); "
        f"largest error {error.max():.3g}"
    )


def assert_float32_exact(actual: np.ndarray, bound: Fp32Bound, what: str, *, factor: float = 1.0) -> None:
    """``actual`` is a float32 evaluation of the model behind ``bound`` (``factor`` 2: a difference of two).

    Two criteria, both from the arithmetic: every value within the worst-case bound (a
    theorem: no correct float32 implementation fails it), and the mean of
    ``(error / rms)**2`` at most 1 (its expectation under the probabilistic rounding model;
    bfloat16 arithmetic, or a subtly different model, is off by orders of magnitude).
    """
    assert_within_bound(actual, bound.exact, factor * bound.worst_case, f"{what} (worst case)")
    error = np.abs(np.asarray(actual, dtype=np.float64) - bound.exact)
    mean_square = float(np.mean((error / (factor * bound.rms)) ** 2)) if error.size else 0.0
    assert mean_square <= 1.0, (
        f"{what}: mean (error / rms rounding error)^2 is {mean_square:.3g}, more than 1 on this CPU "
        f"({cpu_capability()}): not float32 rounding; largest error {error.max():.3g}"
    )


def assert_mu_is_float32_exact(actual: np.ndarray, tiles: np.ndarray, model: torch.nn.Module, what: str, *, sample: int = 48) -> None:
    """``actual`` (float32 ``mu`` of ``tiles`` by ``model``) is the model's result up to float32 rounding.

    The rounding bound (:func:`wsi_xr.models.rounding.fp32_mu_bound`, ~25 ms a tile) is
    computed on up to ``sample`` tiles, evenly spread, and checked value by value there.
    Every tile is then held to twice the largest bound of its feature on the sample: the
    bound follows the size of a tile's activations, which varies little between tissue
    tiles (on the 728 tissue tiles of CMU-1 the largest bound of each feature is within 2%
    of the largest over 48 of them, for the shipped and for random weights). A tile
    encoded by another model, or stored at another tile's place, is off by far more.
    """
    actual = np.asarray(actual)
    assert actual.shape == (len(tiles), model.fc1.out_features), f"{what}: shape {actual.shape}"
    if len(tiles) == 0:
        return
    exact = exact_mu(model, tiles)
    picked = np.unique(np.linspace(0, len(tiles) - 1, min(sample, len(tiles))).round().astype(int))
    sampled = fp32_mu_bound(model, tiles[picked])
    np.testing.assert_allclose(sampled.exact, exact[picked], rtol=1e-12)  # one reference
    assert_float32_exact(actual[picked], sampled, f"{what} (sampled tiles)")
    every_tile = np.broadcast_to(2 * sampled.worst_case.max(axis=0), exact.shape)
    assert_within_bound(actual, exact, every_tile, f"{what} (every tile)")


def latent_tolerance(slide: str | Path, weights: Any, tile_mask: np.ndarray, *, sample: int = 48) -> np.ndarray:
    """Per feature: how far two float32 encodings of a level-0 mask's tissue tiles may differ.

    Reads up to ``sample`` of the tissue tiles (64 px, at ``64 * index``) from ``slide``
    (tifffile, level 0) and takes twice (two float32 evaluations) twice (from the sample to
    every tile, see :func:`assert_mu_is_float32_exact`) the largest worst-case rounding
    bound of each feature.
    """
    from wsi_xr.models import load_vae

    rows, cols = np.nonzero(np.asarray(tile_mask))
    model = weights if isinstance(weights, torch.nn.Module) else load_vae(weights)  # a path, None (the default), or a VAE2
    if rows.size == 0:
        return np.zeros(model.z_dim)
    picked = np.unique(np.linspace(0, rows.size - 1, min(sample, rows.size)).round().astype(int))
    pixels = tifffile.imread(slide, level=0)[..., :3]
    tiles = np.stack([pixels[64 * r : 64 * r + 64, 64 * c : 64 * c + 64] for r, c in zip(rows[picked], cols[picked])])
    return 4 * fp32_mu_bound(model, tiles).worst_case.max(axis=0)


def assert_latents_agree(actual: np.ndarray, expected: np.ndarray, tolerance: np.ndarray, what: str) -> None:
    """Two latent cubes: NaN at the same tiles, elsewhere within ``tolerance`` (per feature)."""
    actual, expected = np.asarray(actual), np.asarray(expected)
    np.testing.assert_array_equal(np.isnan(actual), np.isnan(expected), err_msg=f"{what}: NaN (non-tissue) tiles differ")
    valid = ~np.isnan(expected)
    bound = np.broadcast_to(tolerance, expected.shape)
    assert_within_bound(actual[valid], expected[valid].astype(np.float64), bound[valid], what)
