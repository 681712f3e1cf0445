"""Blockwise VAE encoding of tissue tiles into a latent cube.

Tasks never carry a model: they carry a :class:`ModelRef` (weights file path, its
SHA-256 and a device) and each worker process loads the model once into a small cache.
Torch's thread pool is sized so that Dask's worker threads do not oversubscribe the
cores. CuPy chunks go to torch through DLPack, without a host copy.
"""

from __future__ import annotations

import os
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dask.array as da
import numpy as np
import xarray as xr

from wsi_xr.errors import InvalidArgumentError
from wsi_xr.tissue.kernels import array_namespace

__all__ = ["ModelRef", "encode", "encode_block", "model_ref"]


@dataclass(frozen=True)
class ModelRef:
    """What a task needs to load the model in its own process."""

    path: str
    sha256: str
    device: str = "cpu"


def model_ref(model: Any = None, *, device: str = "cpu") -> ModelRef:
    """A :class:`ModelRef` for a weights path, ``None`` (the shipped default) or a VAE2.

    A model object is saved once to a temporary weights file named by its hash, so
    tasks can load it by path.
    """
    from wsi_xr.models import VAE2, default_weights_path, save_vae, weights_hash

    if isinstance(model, VAE2):
        folder = Path(tempfile.gettempdir()) / "wsi_xr-models"
        folder.mkdir(exist_ok=True)
        scratch = folder / f"model-{os.getpid()}-{id(model)}.pt"
        save_vae(model, scratch)
        sha = weights_hash(scratch)
        path = folder / f"{sha}.pt"
        os.replace(scratch, path)
        return ModelRef(str(path), sha, device)
    path = Path(model) if model is not None else default_weights_path()
    from wsi_xr.models import load_vae

    load_vae(path, device="cpu")  # validate here, in the client, with a clear error
    return ModelRef(str(Path(path).resolve()), weights_hash(path), device)


_models: dict[ModelRef, Any] = {}
_models_lock = threading.Lock()
_threads_set = False


def _set_torch_threads() -> None:
    """Give torch ``cores // concurrent tasks`` threads, once per process."""
    global _threads_set
    if _threads_set:
        return
    import torch

    concurrent = None
    try:
        from distributed import get_worker

        concurrent = get_worker().state.nthreads
    except (ImportError, ValueError, AttributeError):
        import dask

        concurrent = dask.config.get("num_workers", None) or os.cpu_count()
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, int(concurrent or 1))))
    _threads_set = True


def worker_model(ref: ModelRef) -> Any:
    """The model for ``ref``, loaded once per process (eval mode)."""
    with _models_lock:
        model = _models.get(ref)
        if model is None:
            from wsi_xr.models import load_vae

            _set_torch_threads()
            model = load_vae(ref.path, device=ref.device)
            _models[ref] = model
        return model


def encode_block(pixels: Any, tissue: np.ndarray, ref: ModelRef, *, tile: int = 64, batch_size: int = 256) -> np.ndarray:
    """Latents ``(tiles_y, tiles_x, latent)`` float32 of one block; NaN where ``tissue`` is False.

    Only the tissue tiles go through the encoder (``mu``, eval mode), in batches.
    ``pixels`` may be NumPy or CuPy; CuPy tiles reach torch through DLPack.
    """
    from wsi_xr.models import LATENT_SIZE, encode_tiles

    nty, ntx = tissue.shape
    out = np.full((nty, ntx, LATENT_SIZE), np.nan, dtype=np.float32)
    rows, cols = np.nonzero(tissue)
    if rows.size == 0:
        return out
    xp = array_namespace(pixels)
    grid = xp.reshape(pixels[: nty * tile, : ntx * tile, :3], (nty, tile, ntx, tile, 3))
    tiles = grid.transpose(0, 2, 1, 3, 4)[xp.asarray(rows), xp.asarray(cols)]  # NumPy or CuPy
    model = worker_model(ref)
    if xp is np:
        latents = encode_tiles(model, tiles, batch_size=batch_size)
    else:
        import torch

        latents = encode_tiles(model, torch.from_dlpack(xp.ascontiguousarray(tiles)), batch_size=batch_size).cpu().numpy()
    out[rows, cols] = latents
    return out


def _encode_task(pixels: Any, tissue: np.ndarray, *, ref: ModelRef, tile: int, batch_size: int) -> np.ndarray:
    return encode_block(pixels, np.asarray(tissue)[..., 0], ref, tile=tile, batch_size=batch_size)


def encode(image: xr.DataArray, mask: xr.Dataset, model: Any = None, *, batch_size: int = 256, device: str = "cpu") -> xr.DataArray:
    """The latent cube of the tissue tiles of ``image``, lazily, with ``map_blocks``.

    Parameters
    ----------
    image
        ``(y, x, c)`` slide image (from :func:`wsi_xr.open_slide`).
    mask
        Its :func:`wsi_xr.tissue_mask` Dataset (same tile size).
    model
        Weights file path, a :class:`~wsi_xr.models.VAE2`, or None for the shipped default.

    Returns
    -------
    xr.DataArray
        ``latent (tile_y, tile_x, latent)`` float32, NaN where not tissue.

    Note: this reads the image blocks again if the mask was computed separately; the
    pipeline (:func:`wsi_xr.process_slide`) fuses both into one read.
    """
    from wsi_xr.models import LATENT_SIZE

    tile = int(mask.attrs.get("tile", 64))
    if batch_size < 1:
        raise InvalidArgumentError(f"batch_size={batch_size}: must be >= 1.")
    data = image.data if isinstance(image.data, da.Array) else da.from_array(image.data, chunks=(2048, 2048, -1))
    tile_chunks = (tuple(c // tile for c in data.chunks[0]), tuple(c // tile for c in data.chunks[1]))
    tissue = mask["tile_mask"].data
    tissue = tissue.rechunk(tile_chunks) if isinstance(tissue, da.Array) else da.from_array(np.asarray(tissue), chunks=tile_chunks)
    ref = model_ref(model, device=device)
    latents = da.map_blocks(
        _encode_task,
        data,
        tissue[..., None],
        chunks=tile_chunks + ((LATENT_SIZE,),),
        dtype=np.float32,
        meta=np.empty((0, 0, 0), dtype=np.float32),
        ref=ref,
        tile=tile,
        batch_size=batch_size,
        name="wsi-encode",
    )
    return xr.DataArray(
        latents,
        dims=("tile_y", "tile_x", "latent"),
        coords={"tile_y": mask.tile_y.values, "tile_x": mask.tile_x.values, "latent": np.arange(LATENT_SIZE)},
        name="latent",
        attrs={"weights": ref.path, "weights_sha256": ref.sha256},
    )
