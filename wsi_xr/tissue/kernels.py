"""Pure array kernels: per-tile and per-patch pixel variance from one block.

The statistic is the reference one: the population variance of all uint8 values of a
tile (both spatial axes and all channels together). It is computed exactly, in integer
arithmetic, from the per-tile sums ``S1 = sum(v)`` and ``S2 = sum(v**2)``:
``var = (n*S2 - S1**2) / n**2``. A patch's variance comes from the sums of its tiles,
so one read of a block gives both statistics.

The kernels use only the Python array API (``xp.sum``, ``xp.astype``, ``xp.reshape``)
on the namespace of the block they get, so the same code runs on NumPy blocks (CPU),
CuPy blocks (GPU) and any other array-API array; nothing here imports CuPy.
"""

from __future__ import annotations

import sys
from types import ModuleType
from typing import Any

import numpy as np


def array_namespace(block: Any) -> ModuleType:
    """The array-API namespace of ``block`` (NumPy, CuPy, array_api_strict, ...)."""
    if isinstance(block, np.ndarray):
        return np
    module = type(block).__module__.split(".")[0]
    if module == "cupy":  # CuPy's main namespace follows the array API (cupy >= 13)
        return sys.modules["cupy"]
    get_namespace = getattr(block, "__array_namespace__", None)
    if get_namespace is None:
        raise TypeError(f"{type(block).__name__} is not an array-API array; cannot compute statistics on it.")
    return get_namespace()


def to_numpy(array: Any) -> np.ndarray:
    """Copy a small result array to host NumPy memory, whatever its namespace."""
    if isinstance(array, np.ndarray):
        return array
    if hasattr(array, "get"):  # CuPy
        return array.get()
    return np.from_dlpack(array)


#: Size of the uint16 temporary :func:`tile_moments` works on at a time (a row of tiles
#: of a 2048-px block is larger, and goes alone).
MOMENT_STEP_BYTES = 512 * 1024


def tile_moments(block: Any, tile: int) -> tuple[Any, Any]:
    """Per-tile sums of values and of squared values, over full tiles only.

    Parameters
    ----------
    block
        ``(h, w, c)`` uint8 array (any array-API namespace).
    tile
        Tile side in pixels. Rows/columns past the last full tile are ignored.

    Returns
    -------
    (S1, S2)
        ``int64`` arrays ``(h // tile, w // tile)`` in the block's namespace.
    """
    xp = array_namespace(block)
    height, width, channels = block.shape
    nty, ntx = height // tile, width // tile
    if nty == 0 or ntx == 0:
        return xp.zeros((nty, ntx), dtype=xp.int64), xp.zeros((nty, ntx), dtype=xp.int64)
    # A few tile rows at a time keep the uint16 temporary cache-sized (one row of tiles
    # of a wide block; all of a narrow one). Each step sums down the tile's rows first
    # (a vectorised add of whole pixel rows), then across each tile's tile*channels
    # contiguous columns.
    row_values = tile * ntx * tile * channels
    step = max(1, MOMENT_STEP_BYTES // (2 * row_values))
    # a tile's sum of squares: up to tile * tile * channels * 255**2, which passes uint32 for
    # tiles over 147 px (an encoder's 224-px tiles): sum those in uint64
    acc = xp.uint32 if tile * tile * channels * 255**2 < 2**32 else xp.uint64
    sums = xp.zeros((nty, ntx), dtype=acc)
    sums2 = xp.zeros((nty, ntx), dtype=acc)
    for r in range(0, nty, step):
        n = min(step, nty - r)
        # widened first, then reshaped: a view, also when ``block`` is a column range
        # of a larger array (reshaping that first would copy the uint8 pixels once more)
        wide = xp.reshape(xp.astype(block[r * tile : (r + n) * tile, : ntx * tile, :], xp.uint16), (n, tile, ntx * tile * channels))
        columns = xp.sum(wide, axis=1, dtype=xp.uint32)
        columns2 = xp.sum(wide * wide, axis=1, dtype=xp.uint32)  # 255**2 fits in uint16
        sums[r : r + n, :] = xp.sum(xp.reshape(columns, (n, ntx, tile * channels)), axis=2, dtype=acc)
        sums2[r : r + n, :] = xp.sum(xp.reshape(columns2, (n, ntx, tile * channels)), axis=2, dtype=acc)
    return xp.astype(sums, xp.int64), xp.astype(sums2, xp.int64)


def variance_from_moments(s1: Any, s2: Any, count: Any) -> Any:
    """Population variance from sums over ``count`` values each (exact integer numerator).

    ``count`` may be an array (per element); where it is 0 the result is NaN.
    """
    xp = array_namespace(s1)
    count = xp.asarray(count, dtype=xp.int64)
    largest = int(xp.max(count)) if count.ndim and count.size else int(count) if not count.ndim else 0
    if largest * largest * 255**2 < 2**63:  # exact: count * s2 <= count**2 * 255**2 fits int64
        numerator = xp.astype(count * s2 - s1 * s1, xp.float64)
    else:  # patches over ~1990 px: float64 (relative error ~1e-16 of count**2 * 255**2)
        c, f1, f2 = (xp.astype(a, xp.float64) for a in (count, s1, s2))
        numerator = c * f2 - f1 * f1
    denominator = xp.astype(count * count, xp.float64)
    safe = xp.where(denominator > 0, denominator, xp.asarray(1.0, dtype=xp.float64))
    return xp.where(denominator > 0, numerator / safe, xp.asarray(float("nan"), dtype=xp.float64))


def block_statistics(block: Any, tile: int, patch: int, excluded: Any = None) -> tuple[Any, Any]:
    """Tile variances and, for each tile, the variance of the patch that holds it.

    Patches are ``patch // tile`` tiles on a side, counted from the block's top-left
    corner (blocks start on patch borders). A patch is scored over the pixels of its
    full, not-excluded tiles: partial tiles at the slide edge and tiles flagged in
    ``excluded`` (damaged data) never enter any statistic.

    Parameters
    ----------
    block
        ``(h, w, 3)`` uint8 pixels.
    tile, patch
        Sides in pixels; ``patch`` is a multiple of ``tile``.
    excluded
        Optional bool ``(h // tile, w // tile)``: tiles to leave out (same namespace).

    Returns
    -------
    (tile_variance, patch_variance)
        float64 ``(h // tile, w // tile)`` each; a tile's ``patch_variance`` is its
        patch's. Excluded tiles get NaN tile variance; a patch with no usable tile, NaN.
    """
    xp = array_namespace(block)
    s1, s2 = tile_moments(block, tile)
    usable = xp.ones(s1.shape, dtype=xp.bool) if excluded is None else ~xp.asarray(excluded, dtype=xp.bool)
    return statistics_from_moments(s1, s2, usable, tile * tile * block.shape[2], patch // tile)


def statistics_from_moments(s1: Any, s2: Any, usable: Any, values_per_tile: int, k: int) -> tuple[Any, Any]:
    """Tile variances and each tile's patch variance from per-tile moments.

    ``s1``, ``s2``: int64 ``(tiles_y, tiles_x)`` sums of values and squared values (as
    :func:`tile_moments` gives); ``usable``: bool, the tiles that enter the statistics
    (the others count for nothing: their moments are ignored); ``values_per_tile``:
    values in a tile; ``k``: tiles per patch side. Returns ``(tile_variance,
    patch_variance)`` as :func:`block_statistics` does (NaN where nothing is usable).
    """
    xp = array_namespace(s1)
    nty, ntx = s1.shape
    zero = xp.zeros((), dtype=xp.int64)
    s1 = xp.where(usable, s1, zero)
    s2 = xp.where(usable, s2, zero)
    counts = xp.astype(usable, xp.int64) * values_per_tile
    tile_var = variance_from_moments(s1, s2, counts)

    npy, npx = -(-nty // k), -(-ntx // k)
    pad_y, pad_x = npy * k - nty, npx * k - ntx

    def patch_sums(values: Any) -> Any:
        if pad_y or pad_x:
            padded = xp.zeros((npy * k, npx * k), dtype=values.dtype)
            padded[:nty, :ntx] = values
            values = padded
        return xp.sum(xp.reshape(values, (npy, k, npx, k)), axis=(1, 3))

    patch_var = variance_from_moments(patch_sums(s1), patch_sums(s2), patch_sums(counts))
    # broadcast each patch's value to its tiles
    per_tile = xp.reshape(patch_var, (npy, 1, npx, 1))
    per_tile = xp.broadcast_to(per_tile, (npy, k, npx, k))
    per_tile = xp.reshape(per_tile, (npy * k, npx * k))[:nty, :ntx]
    return tile_var, per_tile
