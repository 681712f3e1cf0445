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
from dask.base import tokenize

from wsi_xr.errors import InvalidArgumentError
from wsi_xr.tissue.kernels import array_namespace

__all__ = ["PRECISIONS", "ModelRef", "check_precision", "encode", "encode_block", "model_ref"]

#: Accepted ``precision=`` values: exact float32 (default), or bfloat16 autocast (opt-in).
PRECISIONS = ("fp32", "bf16")


@dataclass(frozen=True)
class ModelRef:
    """What a task needs to load the model in its own process."""

    path: str
    sha256: str
    device: str = "cpu"
    precision: str = "fp32"


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith(("flags", "Features")):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def check_precision(precision: str, device: str = "cpu") -> None:
    """Refuse a precision this machine cannot run fast, with a clear error.

    ``"bf16"`` needs bfloat16 arithmetic in hardware: on the CPU AVX512-BF16 or AMX
    (x86) or the BF16 extension (ARM); on CUDA a GPU torch reports bf16 support for
    (Ampere or newer). Without it autocast would run, only slower than fp32.
    """
    if precision not in PRECISIONS:
        raise InvalidArgumentError(f"precision={precision!r}: use one of {', '.join(PRECISIONS)}.")
    if precision == "fp32":
        return
    import torch

    if device == "cuda":
        if not torch.cuda.is_available() or not torch.cuda.is_bf16_supported():
            raise InvalidArgumentError(
                "precision='bf16' on device 'cuda' needs a GPU with bfloat16 support (Ampere or newer) "
                "and a CUDA build of torch; use precision='fp32'."
            )
        return
    flags = _cpu_flags()
    if not flags & {"avx512_bf16", "amx_bf16", "bf16"}:
        raise InvalidArgumentError(
            "precision='bf16' needs a CPU with bfloat16 instructions (x86 AVX512-BF16 or AMX, ARM BF16); "
            f"this CPU has none ({torch.backends.cpu.get_cpu_capability()}), so bf16 would run slower than fp32. "
            "Use precision='fp32'."
        )


def model_ref(model: Any = None, *, device: str = "cpu", precision: str = "fp32") -> ModelRef:
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
        return ModelRef(str(path), sha, device, precision)
    path = Path(model) if model is not None else default_weights_path()
    from wsi_xr.models import load_vae

    load_vae(path, device="cpu")  # validate here, in the client, with a clear error
    return ModelRef(str(Path(path).resolve()), weights_hash(path), device, precision)


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


#: Keep the model's weights in channels-last memory for inference, like its input: as fast
#: as NCHW weights in fp32 and 10-15% faster in bf16 (benchmarks/RESULTS.md, "Encoder").
INFERENCE_CHANNELS_LAST = True


def torch_channels_last() -> Any:
    import torch

    return torch.channels_last


def worker_model(ref: ModelRef) -> Any:
    """The model for ``ref``, loaded once per process (eval mode)."""
    with _models_lock:
        model = _models.get(ref)
        if model is None:
            from wsi_xr.models import load_vae

            _set_torch_threads()
            model = load_vae(ref.path, device=ref.device)
            if INFERENCE_CHANNELS_LAST:
                model = model.to(memory_format=torch_channels_last())
            _models[ref] = model
        return model


def encode_block(pixels: Any, tissue: np.ndarray, ref: ModelRef, *, tile: int = 64, batch_size: int | None = None) -> np.ndarray:
    """Latents ``(tiles_y, tiles_x, feature)`` float32 of one block; NaN where ``tissue`` is False.

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
        latents = encode_tiles(model, tiles, batch_size=batch_size, precision=ref.precision)
    else:
        import torch

        tensor = torch.from_dlpack(xp.ascontiguousarray(tiles))
        latents = encode_tiles(model, tensor, batch_size=batch_size, precision=ref.precision).cpu().numpy()
    out[rows, cols] = latents
    return out


def _encode_task(pixels: Any, tissue: np.ndarray, *, ref: ModelRef, tile: int, batch_size: int | None) -> np.ndarray:
    return encode_block(pixels, np.asarray(tissue)[..., 0], ref, tile=tile, batch_size=batch_size)


def encode(
    image: xr.DataArray,
    mask: xr.Dataset,
    model: Any = None,
    *,
    batch_size: int | None = None,
    device: str = "cpu",
    precision: str = "fp32",
) -> xr.DataArray:
    """The latent cube of the tissue tiles of ``image``, lazily, with ``map_blocks``.

    Parameters
    ----------
    image
        ``(y, x, c)`` slide image (from :func:`wsi_xr.open_slide`).
    mask
        Its :func:`wsi_xr.tissue_mask` Dataset (same tile size).
    model
        Weights file path, a :class:`~wsi_xr.models.VAE2`, or None for the shipped default.
    precision
        ``"fp32"`` (exact) or ``"bf16"`` (opt-in autocast; recorded in ``attrs``).

    Returns
    -------
    xr.DataArray
        ``latent (tile_y, tile_x, feature)`` float32, NaN where not tissue.

    Note: this reads the image blocks again if the mask was computed separately; the
    pipeline (:func:`wsi_xr.process_slide`) fuses both into one read.
    """
    from wsi_xr.models import LATENT_SIZE

    tile = int(mask.attrs.get("tile", 64))
    if batch_size is not None and (not isinstance(batch_size, int) or batch_size < 1):
        raise InvalidArgumentError(f"batch_size={batch_size}: must be an integer >= 1 (or None: the measured default).")
    data = image.data if isinstance(image.data, da.Array) else da.from_array(image.data, chunks=(2048, 2048, -1))
    tile_chunks = (tuple(c // tile for c in data.chunks[0]), tuple(c // tile for c in data.chunks[1]))
    tissue = mask["tile_mask"].data
    tissue = tissue.rechunk(tile_chunks) if isinstance(tissue, da.Array) else da.from_array(np.asarray(tissue), chunks=tile_chunks)
    check_precision(precision, device)
    ref = model_ref(model, device=device, precision=precision)
    tissue = tissue[..., None]
    # Named from a token of the pixels, the tissue tiles, the model (its weights' hash), the
    # device, precision and batch: two encodings never share a key in one dask.compute.
    token = tokenize(data.name, tissue.name, ref, tile, batch_size)
    latents = da.map_blocks(
        _encode_task,
        data,
        tissue,
        chunks=tile_chunks + ((LATENT_SIZE,),),
        dtype=np.float32,
        meta=np.empty((0, 0, 0), dtype=np.float32),
        ref=ref,
        tile=tile,
        batch_size=batch_size,
        name=f"wsi-encode-{token}",
    )
    return xr.DataArray(
        latents,
        dims=("tile_y", "tile_x", "feature"),
        coords={"tile_y": mask.tile_y.values, "tile_x": mask.tile_x.values, "feature": np.arange(LATENT_SIZE)},
        name="latent",
        attrs={"weights": ref.path, "weights_sha256": ref.sha256, "precision": precision},
    )
