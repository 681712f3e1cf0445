"""How well does a model keep a tile? Reconstruction errors of the VAE and of plain baselines.

Everything here works on tiles already in memory, ``(N, 64, 64, 3)`` uint8, and measures
the mean squared error with pixels scaled to ``[0, 1]`` (mean over tiles, pixels and
channels). Three kinds of reconstruction are compared:

* **VAE** (:func:`mse_vae`): ``decode(mu)`` in eval mode, ``mu`` being the 32 features
  wsi_xr stores.
* **Downsampling** (:func:`mse_downsample`): the tile is cut into ``k x k`` boxes with
  integer edges ``round(i * 64 / k)`` (for k = 3: 21, 21, 22 pixels), each box is
  replaced by its mean colour (area average), and the mean is repeated over the box
  (nearest / box upsampling). That is the best piecewise-constant picture on those
  boxes, and keeps ``3 k^2`` numbers per tile (k = 3: 27, close to 32 latents).
* **PCA** (:func:`fit_pca`, :func:`mse_pca`): a linear code with ``n`` components fitted
  on *training* tiles only (optionally with their 8 flips / 90-degree rotations), then
  applied to the evaluation tiles; its reconstructions are clipped to ``[0, 1]`` (the
  range every pixel is known to lie in), which can only lower its error.

:func:`evaluate_tiles` runs all of them on named sets of evaluation tiles (one set per
slide or region) and returns an :class:`EvalReport` (a table and JSON). Reading tiles
from slides is not this layer's business: :func:`wsi_xr.sampling.evaluate_slides` does
that and calls :func:`evaluate_tiles`.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import numpy as np
import torch

from wsi_xr.errors import InvalidArgumentError
from wsi_xr.models.vae import CHANNELS, LATENT_SIZE, TILE_SIZE, VAE2, tiles_to_tensor

__all__ = [
    "DOWNSAMPLE_SIDES",
    "EvalReport",
    "PCAModel",
    "dihedral_copies",
    "downsample_reconstruct",
    "evaluate_tiles",
    "fit_pca",
    "mse_downsample",
    "mse_pca",
    "mse_vae",
]

#: The downsampling sides reported by default: mean colour, 3x3x3 = 27 values, 6x6x3 = 108.
DOWNSAMPLE_SIDES = (1, 3, 6)
#: Tiles converted to float at a time (keeps memory at a few tens of MB).
_CHUNK = 512
#: Up to this many training rows, :func:`fit_pca` takes an exact SVD of the data in memory.
_SVD_ROWS = 2048


def _check_tiles(tiles: Any, name: str = "tiles", *, allow_empty: bool = False) -> np.ndarray:
    arr = np.asarray(tiles)
    if arr.dtype != np.uint8 or arr.ndim != 4 or arr.shape[1:] != (TILE_SIZE, TILE_SIZE, CHANNELS):
        raise InvalidArgumentError(
            f"{name} must be a uint8 array of shape (N, {TILE_SIZE}, {TILE_SIZE}, {CHANNELS}), "
            f"got {arr.dtype} {arr.shape}; pass RGB tiles as read from a slide"
        )
    if arr.shape[0] == 0 and not allow_empty:
        raise InvalidArgumentError(f"{name} is empty; pass at least one tile")
    return arr


def _as_float(tiles: np.ndarray) -> np.ndarray:
    """uint8 tiles as float32 in ``[0, 1]``."""
    return tiles.astype(np.float32) * np.float32(1.0 / 255.0)


def _chunks(n: int, size: int = _CHUNK) -> Iterator[slice]:
    for start in range(0, n, size):
        yield slice(start, min(n, start + size))


def _per_tile_mse(recon: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Mean squared difference per tile, accumulated in float64."""
    diff = recon.astype(np.float64) - target.astype(np.float64)
    return np.einsum("nyxc,nyxc->n", diff, diff) / (diff[0].size if diff.shape[0] else 1)


def _box_edges(side: int, k: int) -> np.ndarray:
    """Integer box edges ``round(i * side / k)`` (halves rounded up), ``i = 0..k``."""
    return (2 * np.arange(k + 1) * side + k) // (2 * k)


def _check_k(k: int) -> int:
    if isinstance(k, bool) or int(k) != k or not 1 <= int(k) <= TILE_SIZE:
        raise InvalidArgumentError(f"k={k!r}: the downsampled side must be an integer from 1 to {TILE_SIZE}")
    return int(k)


def downsample_reconstruct(tiles: Any, k: int) -> np.ndarray:
    """Tiles reduced to ``k x k x 3`` box means and repeated back to full size.

    Parameters
    ----------
    tiles
        ``(N, 64, 64, 3)`` uint8 tiles.
    k
        Side of the downsampled tile (1 = the mean colour).

    Returns
    -------
    numpy.ndarray
        ``(N, 64, 64, 3)`` float32 in ``[0, 1]``. Box ``(i, j)`` covers rows
        ``e[i]:e[i+1]`` and columns ``e[j]:e[j+1]`` with ``e = round(arange(k+1) * 64 / k)``
        and holds the mean of those pixels (area average), repeated over the box.
    """
    arr = _check_tiles(tiles, allow_empty=True)
    k = _check_k(k)
    edges = _box_edges(TILE_SIZE, k)
    sizes = np.diff(edges)
    out = np.empty(arr.shape, dtype=np.float32)
    for sl in _chunks(arr.shape[0]):
        x = arr[sl].astype(np.float64)
        sums = np.add.reduceat(np.add.reduceat(x, edges[:-1], axis=1), edges[:-1], axis=2)
        means = (sums / (sizes[:, None] * sizes[None, :])[None, :, :, None]).astype(np.float32)
        # Scaled exactly as the tiles themselves are (a constant box reproduces its pixels exactly).
        means *= np.float32(1.0 / 255.0)
        out[sl] = np.repeat(np.repeat(means, sizes, axis=1), sizes, axis=2)
    return out


def mse_downsample(tiles: Any, k: int, *, per_tile: bool = False) -> float | np.ndarray:
    """MSE of :func:`downsample_reconstruct` against the tiles (pixels in ``[0, 1]``).

    Returns the mean over tiles, or the ``(N,)`` per-tile errors with ``per_tile=True``.
    """
    arr = _check_tiles(tiles, allow_empty=per_tile)
    k = _check_k(k)
    errors = np.concatenate([np.zeros(0)] + [_per_tile_mse(downsample_reconstruct(arr[sl], k), _as_float(arr[sl])) for sl in _chunks(arr.shape[0])])
    return errors if per_tile else float(errors.mean())


def mse_vae(model: VAE2, tiles: Any, *, batch_size: int = 256, per_tile: bool = False) -> float | np.ndarray:
    """MSE of the VAE's ``decode(mu)`` against the tiles (pixels in ``[0, 1]``).

    The model runs in eval mode (deterministic BatchNorm, no sampling of ``z``) on its
    own device, without gradients; its mode is restored afterwards.

    Returns the mean over tiles, or the ``(N,)`` per-tile errors with ``per_tile=True``.
    """
    arr = _check_tiles(tiles, allow_empty=per_tile)
    if isinstance(batch_size, bool) or int(batch_size) != batch_size or batch_size < 1:
        raise InvalidArgumentError(f"batch_size={batch_size!r}: give a positive integer")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    errors = np.empty(arr.shape[0], dtype=np.float64)
    try:
        with torch.inference_mode():
            for sl in _chunks(arr.shape[0], int(batch_size)):
                x = tiles_to_tensor(arr[sl]).to(device)
                recon = model.decode(model.features(x))
                diff = (recon.double() - x.double()) ** 2
                errors[sl] = diff.mean(dim=(1, 2, 3)).cpu().numpy()
    finally:
        model.train(was_training)
    return errors if per_tile else float(errors.mean())


def dihedral_copies(tiles: Any) -> np.ndarray:
    """The 8 flips / 90-degree rotations of every tile: ``(8 N, 64, 64, 3)``, copy ``g`` of all tiles first."""
    arr = _check_tiles(tiles, allow_empty=True)
    out = []
    for flip in (False, True):
        base = arr[:, :, ::-1] if flip else arr
        for quarter in range(4):
            out.append(np.rot90(base, k=quarter, axes=(1, 2)))
    return np.ascontiguousarray(np.concatenate(out))


@dataclass(frozen=True)
class PCAModel:
    """A linear code for tiles: ``code = (x - mean) @ components.T``, ``x' = mean + code @ components``.

    ``x`` is a tile flattened in ``(y, x, c)`` order with pixels in ``[0, 1]``.

    Attributes
    ----------
    mean
        ``(12288,)`` float64 mean tile of the training data.
    components
        ``(n, 12288)`` float64, orthonormal rows, by decreasing explained variance.
    explained_variance
        ``(n,)`` variance of the training data along each component.
    total_variance
        Total variance of the training data (sum over all 12288 dimensions).
    n_train
        Number of training rows the fit saw (8 per tile with ``dihedral=True``).
    dihedral
        Whether the 8 flips / rotations of every training tile were included.
    """

    mean: np.ndarray
    components: np.ndarray
    explained_variance: np.ndarray
    total_variance: float
    n_train: int
    dihedral: bool

    @property
    def n_components(self) -> int:
        """Number of components kept."""
        return int(self.components.shape[0])

    def reconstruct(self, tiles: Any, *, clip: bool = True) -> np.ndarray:
        """``(N, 64, 64, 3)`` float32 reconstructions of uint8 tiles (clipped to ``[0, 1]`` by default)."""
        arr = _check_tiles(tiles, allow_empty=True)
        out = np.empty(arr.shape, dtype=np.float32)
        for sl in _chunks(arr.shape[0]):
            x = _as_float(arr[sl]).reshape(arr[sl].shape[0], -1).astype(np.float64) - self.mean
            recon = (x @ self.components.T) @ self.components + self.mean
            if clip:
                np.clip(recon, 0.0, 1.0, out=recon)
            out[sl] = recon.reshape(arr[sl].shape)
        return out


def _dihedral_columns(q: np.ndarray, code: int, inverse: bool) -> np.ndarray:
    """Apply dihedral transform ``code`` (or its inverse) to each column of ``q`` (a flattened tile)."""
    img = q.T.reshape(-1, TILE_SIZE, TILE_SIZE, CHANNELS)
    flip, quarter = code >= 4, code % 4
    if inverse:
        img = np.rot90(img, k=-quarter, axes=(1, 2))
        if flip:
            img = img[:, :, ::-1]
    else:
        if flip:
            img = img[:, :, ::-1]
        img = np.rot90(img, k=quarter, axes=(1, 2))
    return np.ascontiguousarray(img.reshape(img.shape[0], -1).T)


def fit_pca(
    train_tiles: Any,
    n_components: int = LATENT_SIZE,
    *,
    dihedral: bool = False,
    oversample: int = 16,
    max_iter: int = 40,
    tol: float = 1e-7,
    seed: int = 0,
    method: str = "auto",
) -> PCAModel:
    """Principal components of training tiles (pixels in ``[0, 1]``), with NumPy only.

    The top components of the centred data ``X`` (rows = flattened tiles, with their
    dihedral copies when asked) are its top right singular vectors. Up to 2048 rows,
    ``method="auto"`` takes them from ``numpy.linalg.svd`` of ``X`` (exact). Beyond that,
    holding ``X`` in memory would cost 100 kB per row, so they are found by block subspace
    iteration on ``X^T X`` with ``n_components + oversample`` vectors and a Rayleigh-Ritz
    step (exact eigen-decomposition inside that subspace), until the kept eigenvalues
    change by less than ``tol`` (relative); the data are streamed in blocks of 512 tiles,
    so memory is the uint8 tiles plus ``12288 x (n + oversample)`` floats. Both give the
    same components (tested).

    Parameters
    ----------
    train_tiles
        ``(N, 64, 64, 3)`` uint8 training tiles. Never pass evaluation tiles here.
    n_components
        Components to keep (default 32, the VAE's latent size).
    dihedral
        Also fit on the 8 flips / 90-degree rotations of every tile (as the VAE's
        augmentation does). Implemented by transforming the iteration vectors rather
        than the data, so it costs 8x the arithmetic but no extra memory.
    oversample, max_iter, tol, seed
        Extra subspace vectors, the iteration cap, the convergence tolerance and the
        seed of the random starting subspace (subspace iteration only).
    method
        ``"auto"`` (SVD up to 2048 rows, subspace iteration beyond), ``"svd"`` or
        ``"subspace"``.

    Raises
    ------
    InvalidArgumentError
        On malformed tiles or an impossible number of components.
    """
    arr = _check_tiles(train_tiles, "train_tiles")
    dim = TILE_SIZE * TILE_SIZE * CHANNELS
    n_rows = arr.shape[0] * (8 if dihedral else 1)
    if isinstance(n_components, bool) or int(n_components) != n_components or n_components < 1:
        raise InvalidArgumentError(f"n_components={n_components!r}: give a positive integer")
    n_components = int(n_components)
    if n_components > min(n_rows - 1, dim):
        raise InvalidArgumentError(
            f"n_components={n_components} needs more training tiles: {arr.shape[0]} tiles "
            f"({n_rows} rows) give at most {max(0, min(n_rows - 1, dim))} components; pass more tiles"
        )
    if int(oversample) != oversample or oversample < 0 or int(max_iter) != max_iter or max_iter < 1:
        raise InvalidArgumentError(f"oversample={oversample!r}, max_iter={max_iter!r}: give integers >= 0 and >= 1")
    if not (math.isfinite(tol) and tol > 0):
        raise InvalidArgumentError(f"tol={tol!r}: give a small positive number such as 1e-7")
    if method not in ("auto", "svd", "subspace"):
        raise InvalidArgumentError(f"method={method!r}: choose 'auto', 'svd' or 'subspace'")
    width = min(n_components + int(oversample), n_rows - 1, dim)
    codes = range(8) if dihedral else range(1)
    if method == "svd" or (method == "auto" and n_rows <= _SVD_ROWS):
        rows = dihedral_copies(arr) if dihedral else arr
        x = _as_float(rows).reshape(n_rows, dim).astype(np.float64)
        mean = x.mean(axis=0)
        x -= mean
        _, singular, vt = np.linalg.svd(x, full_matrices=False)
        return PCAModel(
            mean=mean,
            components=np.ascontiguousarray(vt[:n_components]),
            explained_variance=singular[:n_components] ** 2 / n_rows,
            total_variance=float(np.sum(singular**2) / n_rows),
            n_train=n_rows,
            dihedral=bool(dihedral),
        )

    # Mean (over the dihedral copies too) and total variance, in float64.
    total = np.zeros(dim)
    sq_total = 0.0
    for sl in _chunks(arr.shape[0]):
        x = _as_float(arr[sl]).astype(np.float64)
        for code in codes:
            total += _dihedral_columns(x.reshape(x.shape[0], -1).T, code, inverse=False).sum(axis=1)
        sq_total += len(codes) * float(np.einsum("nyxc,nyxc->", x, x))
    mean = total / n_rows
    total_variance = (sq_total - n_rows * float(mean @ mean)) / n_rows

    def times_gram(q: np.ndarray) -> np.ndarray:
        """``X^T X q`` for centred ``X`` (all dihedral copies), streamed over blocks of tiles."""
        # Copy g of tile t is G t; (G t - m)^T q = t^T (G^T q) - m^T q, so transform q, not the data.
        qs = [_dihedral_columns(q, code, inverse=True) for code in codes]
        stacked = np.concatenate(qs, axis=1)  # (dim, len(codes) * width)
        mean_q = mean @ q  # (width,)
        out = np.zeros_like(stacked)
        for sl in _chunks(arr.shape[0]):
            x = _as_float(arr[sl]).reshape(arr[sl].shape[0], -1).astype(np.float64)
            proj = x @ stacked
            for g in range(len(codes)):  # centre: subtract m^T q from each copy's projection
                proj[:, g * width : (g + 1) * width] -= mean_q
            out += x.T @ proj
        result = np.zeros_like(q)
        for g, code in enumerate(codes):
            part = out[:, g * width : (g + 1) * width]
            # sum_t (G t - m)(G t - m)^T q = G sum_t t p_t^T - m sum_t p_t^T, p_t = (G t - m)^T q
            result += _dihedral_columns(part, code, inverse=False)
        # The mean term: - m * (sum over all rows of p) = - m * (n_rows * (m^T q) - n_rows * m^T q) = 0,
        # because the centred projections sum to zero over all rows; nothing to subtract.
        return result

    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.standard_normal((dim, width)))
    previous = None
    for _ in range(int(max_iter)):
        y = times_gram(q)
        ritz = q.T @ y
        values, vectors = np.linalg.eigh((ritz + ritz.T) / 2)
        order = np.argsort(values)[::-1]
        values, vectors = values[order], vectors[:, order]
        top = values[:n_components]
        components = (q @ vectors[:, :n_components]).T
        if previous is not None and np.all(np.abs(top - previous) <= tol * max(float(top[0]), 1e-300)):
            break
        previous = top
        q, _ = np.linalg.qr(y)
    return PCAModel(
        mean=mean,
        components=components,
        explained_variance=np.maximum(top, 0.0) / n_rows,
        total_variance=float(total_variance),
        n_train=n_rows,
        dihedral=bool(dihedral),
    )


def mse_pca(pca: PCAModel, tiles: Any, *, clip: bool = True, per_tile: bool = False) -> float | np.ndarray:
    """MSE of the PCA reconstruction against the tiles (pixels in ``[0, 1]``).

    ``pca`` comes from :func:`fit_pca` on *other* tiles. Returns the mean over tiles, or
    the ``(N,)`` per-tile errors with ``per_tile=True``.
    """
    arr = _check_tiles(tiles, allow_empty=per_tile)
    errors = np.concatenate([np.zeros(0)] + [_per_tile_mse(pca.reconstruct(arr[sl], clip=clip), _as_float(arr[sl])) for sl in _chunks(arr.shape[0])])
    return errors if per_tile else float(errors.mean())


@dataclass
class EvalReport:
    """Reconstruction MSEs per evaluation set (slide or region) and overall.

    Attributes
    ----------
    methods
        Column names, e.g. ``["vae", "pca32", "down1", "down3", "down6"]``.
    values
        Numbers per method: ``{"vae": 32, "pca32": 32, "down3": 27, ...}``.
    rows
        ``{set name: {"n_tiles": N, method: mse, ...}}`` in the order given.
    overall
        The same over all evaluation tiles pooled (a tile-weighted mean).
    settings
        How the numbers were made (PCA training tiles, dihedral, downsampling rule, ...).
    """

    methods: list[str]
    values: dict[str, int]
    rows: dict[str, dict[str, float]]
    overall: dict[str, float]
    settings: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-serialisable dict."""
        return {
            "metric": "mean squared error, pixels in [0, 1], mean over tiles, pixels and channels",
            "methods": list(self.methods),
            "values_per_tile": dict(self.values),
            "sets": {k: dict(v) for k, v in self.rows.items()},
            "overall": dict(self.overall),
            "settings": dict(self.settings),
        }

    def table(self) -> str:
        """A fixed-width text table: one row per set plus ``overall``, the best method marked ``*``."""
        names = [*self.rows, "overall"]
        label = max(12, *(len(n) for n in names))
        head = f"{'tiles':<{label}}  {'n':>6}  " + "  ".join(f"{m + f' ({self.values[m]})':>13}" for m in self.methods)
        lines = [head, "-" * len(head)]
        for name in names:
            row = self.overall if name == "overall" else self.rows[name]
            best = min(self.methods, key=lambda m: row[m])
            cells = "  ".join(f"{row[m]:>12.5f}{'*' if m == best else ' '}" for m in self.methods)
            lines.append(f"{name:<{label}}  {int(row['n_tiles']):>6}  {cells}")
        return "\n".join(lines)


def evaluate_tiles(
    model: VAE2 | None,
    eval_sets: Mapping[str, Any],
    *,
    train_tiles: Any | None = None,
    pca: PCAModel | None = None,
    n_components: int = LATENT_SIZE,
    dihedral: bool = True,
    sides: Sequence[int] = DOWNSAMPLE_SIDES,
    batch_size: int = 256,
) -> EvalReport:
    """MSE of the VAE, of PCA and of ``k x k x 3`` downsampling on each set of evaluation tiles.

    Parameters
    ----------
    model
        The VAE (any mode; evaluated in eval mode). ``None`` leaves the ``vae`` column out.
    eval_sets
        ``{name: (N, 64, 64, 3) uint8 tiles}``, e.g. one entry per held-out slide or block.
    train_tiles
        Tiles to fit the PCA on (never the evaluation tiles). ``None`` with ``pca=None``
        leaves the PCA column out.
    pca
        An already fitted :class:`PCAModel` instead of ``train_tiles``.
    n_components, dihedral
        PCA size and whether its fit includes the 8 dihedral copies of each training tile.
    sides
        Downsampling sides ``k`` (default 1, 3, 6).
    batch_size
        VAE batch size.

    Returns
    -------
    EvalReport
        Per-set and overall (tiles pooled) MSEs.
    """
    if not eval_sets:
        raise InvalidArgumentError("eval_sets is empty; pass {name: tiles} with at least one set of tiles")
    sets = {str(name): _check_tiles(tiles, f"eval_sets[{name!r}]") for name, tiles in eval_sets.items()}
    sides = [_check_k(k) for k in sides]
    if pca is None and train_tiles is not None:
        pca = fit_pca(train_tiles, n_components, dihedral=dihedral)
    methods: list[str] = []
    values: dict[str, int] = {}
    if model is not None:
        methods.append("vae")
        values["vae"] = int(model.z_dim)
    if pca is not None:
        name = f"pca{pca.n_components}"
        methods.append(name)
        values[name] = pca.n_components
    for k in sides:
        methods.append(f"down{k}")
        values[f"down{k}"] = CHANNELS * k * k
    per_tile: dict[str, dict[str, np.ndarray]] = {}
    for set_name, tiles in sets.items():
        errs: dict[str, np.ndarray] = {}
        if model is not None:
            errs["vae"] = cast(np.ndarray, mse_vae(model, tiles, batch_size=batch_size, per_tile=True))
        if pca is not None:
            errs[f"pca{pca.n_components}"] = cast(np.ndarray, mse_pca(pca, tiles, per_tile=True))
        for k in sides:
            errs[f"down{k}"] = cast(np.ndarray, mse_downsample(tiles, k, per_tile=True))
        per_tile[set_name] = errs
    rows = {name: {"n_tiles": int(sets[name].shape[0]), **{m: float(errs[m].mean()) for m in methods}} for name, errs in per_tile.items()}
    overall = {
        "n_tiles": int(sum(t.shape[0] for t in sets.values())),
        **{m: float(np.concatenate([errs[m] for errs in per_tile.values()]).mean()) for m in methods},
    }
    settings: dict[str, Any] = {
        "downsample": "box means on integer edges round(i*64/k), repeated (nearest/box upsampling)",
        "vae": "decode(mu), eval mode" if model is not None else None,
    }
    if pca is not None:
        settings["pca"] = {
            "n_components": pca.n_components,
            "dihedral": pca.dihedral,
            "train_rows": pca.n_train,
            "explained_variance_ratio": float(pca.explained_variance.sum() / max(pca.total_variance, 1e-300)),
            "clipped_to_0_1": True,
        }
    return EvalReport(methods=methods, values=values, rows=rows, overall=overall, settings=settings)
