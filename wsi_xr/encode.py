"""Blockwise VAE encoding of tissue tiles into a latent cube.

Tasks never carry a model object: they carry a :class:`ModelRef` (the weights' SHA-256,
device, precision) and receive the weights' bytes through one Dask key per model
(:meth:`Model.graph_input`), so a worker on any machine gets them once and loads the
model once into a small cache. Torch threads are opt-in per task (``torch_threads``;
``"auto"``: cores / concurrent tasks, so Dask's threads do not oversubscribe the cores).
CuPy chunks go to torch through DLPack, without a host copy.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import dask.array as da
import numpy as np
import xarray as xr
from dask.base import tokenize

from wsi_xr import accessor as _accessor  # noqa: F401  (registers .wsi on what this module returns)
from wsi_xr.errors import InvalidArgumentError
from wsi_xr.tissue.kernels import array_namespace

if TYPE_CHECKING:
    from wsi_xr.models.encoders import EncoderRef, LoadedEncoder

__all__ = [
    "PRECISIONS",
    "Model",
    "ModelRef",
    "check_precision",
    "check_torch_threads",
    "encode",
    "encode_block",
    "encoder_attrs",
    "features_of",
    "model_ref",
    "prepare_encoder",
    "prepare_model",
    "resolve_torch_threads",
    "torch_threads_scope",
]

#: Accepted ``precision=`` values: exact float32 (default); opt-in approximations: bfloat16
#: autocast, int8 products (the VAE on a CPU).
PRECISIONS = ("fp32", "bf16", "int8")


@dataclass(frozen=True)
class ModelRef:
    """What identifies a model in a task: its weights' SHA-256, the device and precision.

    ``path`` records where the weights came from (provenance; None for a model object);
    tasks do not read it, they get the bytes (:class:`Model`).
    """

    path: str | None
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

    ``"int8"`` (the VAE's products as dynamically quantised int8, on the CPU) is measured
    against fp32 on this CPU once per process (:func:`wsi_xr.models.gemm.int8_speed`, about
    0.5 s) and refused unless it is faster, with both speeds in the message.
    """
    if precision not in PRECISIONS:
        raise InvalidArgumentError(f"precision={precision!r}: use one of {', '.join(PRECISIONS)}.")
    if precision == "fp32":
        return
    import torch

    if precision == "int8":
        _check_int8(device)
        return

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


def _check_int8(device: str) -> None:
    import torch

    if device != "cpu":
        raise InvalidArgumentError(f"precision='int8' runs on the CPU only, not on {device!r}; use precision='fp32' or 'bf16' there.")
    if not {"x86", "fbgemm"} & set(torch.backends.quantized.supported_engines):
        raise InvalidArgumentError(
            f"precision='int8' needs torch's x86/fbgemm quantised engine, which this torch lacks "
            f"({', '.join(torch.backends.quantized.supported_engines)}); use precision='fp32'."
        )
    from wsi_xr.models.gemm import int8_speed

    fp32, int8 = int8_speed()
    if int8 <= fp32:
        raise InvalidArgumentError(
            f"precision='int8' is slower than fp32 on this CPU ({torch.backends.cpu.get_cpu_capability()}, one thread: "
            f"int8 {int8:.0f} tiles/s, fp32 {fp32:.0f} tiles/s, measured now), so it is refused; use precision='fp32' (exact)."
        )


@dataclass(frozen=True, eq=False)
class Model:
    """A model checked in the client, ready to travel: its :class:`ModelRef` and the bytes of its weights.

    Tasks get the bytes through one Dask key named by their SHA-256
    (:meth:`graph_input`), so each worker receives them once, whatever machine it runs on:
    no file path that only the client can see, no temporary file.
    """

    ref: ModelRef
    data: bytes = field(repr=False)

    def graph_input(self, client: Any = None) -> Any:
        """The weights as one Dask key, an argument for map_blocks: with a ``distributed.Client``,
        scattered once to the cluster (by content hash, so the same weights are sent once);
        otherwise ``wsi-weights-<sha256>`` in the graph itself (the threaded scheduler copies nothing)."""
        if client is not None:
            return client.scatter(self.data, hash=True)
        import dask

        return dask.delayed(self.data, name=f"wsi-weights-{self.ref.sha256}", pure=True)


def prepare_model(model: Any = None, *, device: str = "cpu", precision: str = "fp32") -> Model:
    """A :class:`Model` for a weights path, ``None`` (the shipped default) or a VAE2 object.

    A path is loaded once here, in the client, so a bad file fails with a clear error
    before any work; a model object is serialised to the bytes :func:`~wsi_xr.models.save_vae`
    would write. ``ref.path`` records where the weights came from (None for an object).
    """
    import hashlib

    from wsi_xr.models import VAE2, default_weights_path, load_vae, vae_bytes

    if isinstance(model, Model):  # checked already: only the device and precision may change
        return Model(ModelRef(model.ref.path, model.ref.sha256, device, precision), model.data)
    if isinstance(model, VAE2):
        data, path = vae_bytes(model), None
        return Model(ModelRef(path, hashlib.sha256(data).hexdigest(), device, precision), data)
    source = Path(model) if model is not None else default_weights_path()
    data, path = source.read_bytes(), str(source.resolve())
    loaded = load_vae(source, device="cpu")  # validate here, in the client, with a clear error
    ref = ModelRef(path, hashlib.sha256(data).hexdigest(), device, precision)
    if device == "cpu":
        _remember(ref, loaded)  # tasks in this process (the threaded scheduler) use it: loaded once per run
    return Model(ref, data)


def prepare_encoder(
    encoder: Any = None, *, weights: Any = None, spec: Any = None, device: str = "cpu", precision: str = "fp32", timm_kwargs: Any = None
) -> Model | LoadedEncoder:
    """The model an ``encoder=`` argument names, checked in the client and ready to travel.

    ``encoder`` None (or a :class:`Model`): the VAE, from ``weights`` (a path, a VAE2, None
    for the shipped default) through :func:`prepare_model` (its fast CPU path). Anything
    else goes to :func:`wsi_xr.models.encoders.load_encoder` (a ``torch.nn.Module`` with
    ``spec``, a TorchScript file with ``spec``, a timm name with local ``weights``, a
    :class:`~wsi_xr.models.encoders.LoadedEncoder`); a VAE named that way comes back as a
    :class:`Model` too.
    """
    if encoder is None:
        if spec is not None:
            raise InvalidArgumentError("spec= describes an encoder given with encoder=; the default encoder (the VAE) has its own.")
        return prepare_model(weights, device=device, precision=precision)
    if isinstance(encoder, Model):
        return prepare_model(encoder, device=device, precision=precision)
    from wsi_xr.models import VAE2
    from wsi_xr.models.encoders import LoadedEncoder, load_encoder

    if isinstance(encoder, VAE2):
        return prepare_model(encoder, device=device, precision=precision)
    check_precision(precision, device)
    loaded = load_encoder(encoder, spec=spec, weights=weights, timm_kwargs=timm_kwargs, device=device, precision=precision)
    if loaded.spec.kind == "vae":  # VAE weights named by path: the VAE's own path
        return prepare_model(loaded.ref.source, device=device, precision=precision)
    assert isinstance(loaded, LoadedEncoder)
    return loaded


def encoder_attrs(model: Model | LoadedEncoder) -> dict[str, Any]:
    """Provenance of a prepared model for a store's or cube's attrs: ``weights``,
    ``weights_sha256`` (both kinds), and for an encoder other than the VAE its name, kind,
    spec (tile, mean, std, target mpp, features) and source (``encoder_*``)."""
    if isinstance(model, Model):
        return {"encoder": "vae2", "encoder_kind": "vae", "weights": model.ref.path, "weights_sha256": model.ref.sha256}
    return {**model.attrs(), "weights": model.ref.source, "weights_sha256": model.ref.sha256}


def model_ref(model: Any = None, *, device: str = "cpu", precision: str = "fp32") -> ModelRef:
    """The :class:`ModelRef` of :func:`prepare_model` (kept for callers of 0.2.0)."""
    return prepare_model(model, device=device, precision=precision).ref


#: Models loaded in this process, by :class:`ModelRef`: a few, least recently used dropped.
_models: OrderedDict[ModelRef, Any] = OrderedDict()
_models_lock = threading.RLock()  # re-entered by _remember
MODEL_CACHE_SIZE = 4


def resolve_torch_threads(torch_threads: int | str | None) -> int | None:
    """The torch thread count for one encoding task: None (leave torch alone), an int, or
    ``"auto"``: the cores divided by the tasks that run at once here (the Dask worker's
    threads, or dask's ``num_workers``, else one task per core)."""
    if torch_threads is None or isinstance(torch_threads, int):
        return torch_threads
    concurrent = None
    # A task in a distributed worker has distributed imported; elsewhere importing it only
    # to find no worker would cost a small job 0.15-0.3 s.
    distributed = sys.modules.get("distributed")
    if distributed is not None:
        try:
            concurrent = distributed.get_worker().state.nthreads
        except (ValueError, AttributeError):
            pass
    if concurrent is None:
        import dask

        concurrent = dask.config.get("num_workers", None) or os.cpu_count()
    return max(1, (os.cpu_count() or 1) // max(1, int(concurrent or 1)))


@contextlib.contextmanager
def torch_threads_scope(threads: int | None) -> Iterator[None]:
    """:func:`wsi_xr.models.vae.torch_threads_scope` (torch imported only when a count is set)."""
    if threads is None:
        yield
        return
    from wsi_xr.models.vae import torch_threads_scope as scope

    with scope(threads):
        yield


def check_torch_threads(torch_threads: Any) -> None:
    """Raise :class:`InvalidArgumentError` unless ``torch_threads`` is None, ``"auto"`` or an int >= 1."""
    if torch_threads is None or torch_threads == "auto":
        return
    if not isinstance(torch_threads, int) or isinstance(torch_threads, bool) or torch_threads < 1:
        raise InvalidArgumentError(f"torch_threads={torch_threads!r}: use None (leave torch alone), 'auto' or an integer >= 1.")


#: Keep the model's weights in channels-last memory for inference, like its input: as fast
#: as NCHW weights in fp32 and 10-15% faster in bf16 (benchmarks/RESULTS.md, "Encoder").
INFERENCE_CHANNELS_LAST = True


def torch_channels_last() -> Any:
    import torch

    return torch.channels_last


def _remember(ref: ModelRef, model: Any) -> Any:
    """Keep ``model`` (eval mode) as the loaded model of ``ref`` in this process; returns it ready for inference."""
    if INFERENCE_CHANNELS_LAST:
        model = model.to(memory_format=torch_channels_last())  # nn.Module.to takes memory_format (documented)
    with _models_lock:
        _models[ref] = model
        _models.move_to_end(ref)
        while len(_models) > MODEL_CACHE_SIZE:
            _models.popitem(last=False)
    return model


def worker_model(ref: ModelRef, data: bytes | None = None) -> Any:
    """The model for ``ref``, loaded once per process (eval mode) from ``data`` (its weights'
    bytes) or, without them, from ``ref.path``; a few are kept (:data:`MODEL_CACHE_SIZE`)."""
    with _models_lock:
        model = _models.get(ref)
        if model is not None:
            _models.move_to_end(ref)
            return model
        from wsi_xr.models import load_vae, load_vae_bytes

        if data is not None:
            model = load_vae_bytes(data, device=ref.device, label=f"weights {ref.sha256[:12]}")
        elif ref.path is not None:
            model = load_vae(ref.path, device=ref.device)
        else:
            raise InvalidArgumentError("a model given as an object needs its bytes (prepare_model(...).data).")
        return _remember(ref, model)


def features_of(ref: ModelRef | EncoderRef) -> int:
    """The length of the feature vector ``ref``'s model gives (the VAE's: its latent size)."""
    from wsi_xr.models import LATENT_SIZE

    if isinstance(ref, ModelRef):
        return LATENT_SIZE
    assert ref.spec.features is not None, "an EncoderRef made by load_encoder knows its feature length"
    return ref.spec.features


def encode_block(
    pixels: Any,
    tissue: np.ndarray,
    ref: ModelRef | EncoderRef,
    *,
    tile: int = 64,
    batch_size: int | None = None,
    weights: bytes | None = None,
    torch_threads: int | str | None = None,
) -> np.ndarray:
    """Features ``(tiles_y, tiles_x, feature)`` float32 of one block; NaN where ``tissue`` is False.

    Only the tissue tiles go through the encoder, in batches: the VAE (a :class:`ModelRef`:
    ``mu``, eval mode) or any other encoder (an :class:`~wsi_xr.models.encoders.EncoderRef`:
    its spec's normalisation, :func:`~wsi_xr.models.encoders.encode_batch`). ``pixels`` may
    be NumPy or CuPy; CuPy tiles reach torch through DLPack.
    """
    from wsi_xr.models import encode_tiles

    nty, ntx = tissue.shape
    out = np.full((nty, ntx, features_of(ref)), np.nan, dtype=np.float32)
    rows, cols = np.nonzero(tissue)
    if rows.size == 0:
        return out
    xp = array_namespace(pixels)
    grid = xp.reshape(pixels[: nty * tile, : ntx * tile, :3], (nty, tile, ntx, tile, 3))
    tiles = grid.transpose(0, 2, 1, 3, 4)[xp.asarray(rows), xp.asarray(cols)]  # NumPy or CuPy
    with torch_threads_scope(resolve_torch_threads(torch_threads)):
        if xp is not np:
            import torch

            tiles = torch.from_dlpack(xp.ascontiguousarray(tiles))
        if isinstance(ref, ModelRef):
            latents = encode_tiles(worker_model(ref, weights), tiles, batch_size=batch_size, precision=ref.precision)
        else:
            from wsi_xr.models.encoders import encode_batch, worker_encoder

            latents = encode_batch(worker_encoder(ref, weights), tiles, ref.spec, batch_size=batch_size, precision=ref.precision)
    out[rows, cols] = latents if isinstance(latents, np.ndarray) else latents.cpu().numpy()
    return out


def _encode_task(
    pixels: Any,
    tissue: np.ndarray,
    weights: bytes,
    *,
    ref: ModelRef | EncoderRef,
    tile: int,
    batch_size: int | None,
    torch_threads: int | str | None,
) -> np.ndarray:
    return encode_block(pixels, np.asarray(tissue)[..., 0], ref, tile=tile, batch_size=batch_size, weights=weights, torch_threads=torch_threads)


def encode(
    image: xr.DataArray,
    mask: xr.Dataset,
    model: Any = None,
    *,
    batch_size: int | None = None,
    device: str = "cpu",
    precision: str = "fp32",
    torch_threads: int | str | None = None,
    encoder: Any = None,
    encoder_spec: Any = None,
) -> xr.DataArray:
    """The latent cube of the tissue tiles of ``image``, lazily, with ``map_blocks``.

    Parameters
    ----------
    image
        ``(y, x, c)`` slide image (from :func:`wsi_xr.open_slide`).
    mask
        Its :func:`wsi_xr.tissue_mask` Dataset (same tile size).
    model
        Weights file path, a :class:`~wsi_xr.models.VAE2`, or None for the shipped default
        (with ``encoder``: that encoder's weights file).
    encoder, encoder_spec
        Any other encoder (see :func:`prepare_encoder`): a ``torch.nn.Module`` or a
        TorchScript file with its :class:`~wsi_xr.models.encoders.EncoderSpec`, a timm name
        with local weights (``model``), a prepared encoder. The mask's tile must be the
        spec's tile (``tissue_mask(image, tile=spec.tile, patch=4 * spec.tile)``).
    precision
        ``"fp32"`` (exact) or ``"bf16"`` (opt-in autocast; recorded in ``attrs``).
    torch_threads
        Torch threads per encoding task: None (default: torch's own setting), an int, or
        ``"auto"`` (cores / concurrent Dask tasks, what ``wsi-xr run`` uses). Set and put
        back per task.

    Returns
    -------
    xr.DataArray
        ``latent (tile_y, tile_x, feature)`` float32, NaN where not tissue; ``attrs`` hold
        the encoder's provenance (:func:`encoder_attrs`) and the precision.

    Note: this reads the image blocks again if the mask was computed separately; the
    pipeline (:func:`wsi_xr.process_slide`) fuses both into one read.
    """
    tile = int(mask.attrs.get("tile", 64))
    if mask.attrs.get("resampling") == "area" or mask.attrs.get("read_level", image.attrs.get("level")) != image.attrs.get("level"):
        raise InvalidArgumentError(
            "the mask was made at a target mpp (another level, or resampled pixels) but encode() reads the image's own pixels; "
            "use wsi_xr.process_slide(..., target_mpp=...), which encodes the resampled tiles, or a mask of this image without target_mpp."
        )
    if batch_size is not None and (not isinstance(batch_size, int) or batch_size < 1):
        raise InvalidArgumentError(f"batch_size={batch_size}: must be an integer >= 1 (or None: the measured default).")
    data = image.data if isinstance(image.data, da.Array) else da.from_array(image.data, chunks=(2048, 2048, -1))
    tile_chunks = (tuple(c // tile for c in data.chunks[0]), tuple(c // tile for c in data.chunks[1]))
    tissue = mask["tile_mask"].data
    tissue = tissue.rechunk(tile_chunks) if isinstance(tissue, da.Array) else da.from_array(np.asarray(tissue), chunks=tile_chunks)
    check_precision(precision, device)
    check_torch_threads(torch_threads)
    prepared = prepare_encoder(encoder, weights=model, spec=encoder_spec, device=device, precision=precision)
    ref = prepared.ref
    encoder_tile = 64 if isinstance(ref, ModelRef) else ref.spec.tile
    if encoder_tile != tile:
        raise InvalidArgumentError(
            f"the mask's tiles are {tile} px but the encoder takes {encoder_tile} px tiles; "
            f"compute the mask with tissue_mask(image, tile={encoder_tile}, patch={4 * encoder_tile})."
        )
    n_features = features_of(ref)
    tissue = tissue[..., None]
    # Named from a token of the pixels, the tissue tiles, the model (its weights' hash), the
    # device, precision and batch: two encodings never share a key in one dask.compute.
    token = tokenize(data.name, tissue.name, ref, tile, batch_size, torch_threads)
    latents = da.map_blocks(
        _encode_task,
        data,
        tissue,
        prepared.graph_input(),
        chunks=tile_chunks + ((n_features,),),
        dtype=np.float32,
        meta=np.empty((0, 0, 0), dtype=np.float32),
        ref=ref,
        tile=tile,
        batch_size=batch_size,
        torch_threads=torch_threads,
        name=f"wsi-encode-{token}",
    )
    return xr.DataArray(
        latents,
        dims=("tile_y", "tile_x", "feature"),
        coords={"tile_y": mask.tile_y.values, "tile_x": mask.tile_x.values, "feature": np.arange(n_features)},
        name="latent",
        attrs={**encoder_attrs(prepared), "precision": precision},
    )
