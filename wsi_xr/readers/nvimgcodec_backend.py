"""nvImageCodec reader: a window's JPEG / JPEG 2000 tiles decoded on the GPU in one call.

For each window, :class:`wsi_xr.readers.tiff_tiles.TiffTiles` locates the TIFF tiles
it touches, leaves out the damaged ones (the integrity scan), and turns each sound
tile into a complete stream (JPEGTables merged in; an Adobe "RGB" marker on RGB-coded
JPEG such as Aperio's). Those streams go to ``nvidia.nvimgcodec.Decoder.decode`` as one
batch (nvJPEG, incl. the hardware JPEG decoder of A100/H100-class GPUs, and
nvJPEG2000), the decoded tiles stay in device memory (``__cuda_array_interface__`` ->
``cupy.asarray``) and are pasted into one preallocated CuPy window. The result is a
CuPy uint8 ``(h, w, 3)`` array on the GPU.

What the GPU does not decode goes through the CPU decoders and is copied over: tiles
nvImageCodec returns no image for (or an image of the wrong shape), levels it cannot
take (other compressions, stripped levels: tifffile), and every tile of a level whose
first GPU-decoded tile disagrees with the CPU decode (see "Agreement check"). Damaged
tiles are never decoded: their pixels are zero and :meth:`NvImageCodecReader.read_with_damage`
lists them.

Agreement check
    JPEG decoders may round differently (IDCT, chroma upsampling) by a few levels, but
    a wrong colour transform is off by tens. The first batch of each level decodes its
    first tile on the GPU and on the CPU: the GPU is used for the level only when the
    mean absolute difference is at most :data:`AGREEMENT_MEAN_LEVELS`. RGB-coded JPEG
    tiles are tried first as interleaved sRGB output of the Adobe-marked stream, then
    as raw planar components (``ColorSpec.SYCC`` / planar YCC output, i.e. no colour
    transform, 4:4:4 tiles only). The measured differences are in
    :attr:`NvImageCodecReader.report`.

Nothing here imports CuPy or nvImageCodec at module import time.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import threading
import warnings
from typing import Any, ClassVar

import numpy as np

from wsi_xr.errors import InvalidArgumentError
from wsi_xr.readers.probe import SlideInfo
from wsi_xr.readers.tiff_tiles import (
    JPEG,
    JPEG2000_COMPRESSIONS,
    DamagedTile,
    TiffTiles,
    TileBatch,
    TilePlacement,
    decode_tile_cpu,
    paste,
)

__all__ = ["AGREEMENT_MEAN_LEVELS", "NvImageCodecReader", "nvimgcodec_available", "nvimgcodec_file_problem"]

#: Largest mean absolute difference (8-bit levels) between the GPU and the CPU decode
#: of a level's first tile for the GPU to be used on that level.
AGREEMENT_MEAN_LEVELS = 2.0
#: Decoder options: libjpeg-style interpolated chroma upsampling, as imagecodecs does.
DEFAULT_OPTIONS = ":fancy_upsampling=1"
#: How to install what is missing.
_INSTALL = "pip install -e '.[gpu]' (CuPy and nvidia-nvimgcodec-cu13 with nvJPEG and nvJPEG2000)"


def nvimgcodec_available() -> tuple[bool, str]:
    """Whether the nvImageCodec backend can run in this process, and if not, why.

    Checks, in order: CuPy imports; a CUDA GPU is visible; nvImageCodec is installed;
    and a GPU decoder of nvImageCodec decodes a small JPEG (so a missing nvJPEG
    library is caught too). CuPy and nvImageCodec are imported only here, and
    nvImageCodec only after a GPU was found. The answer is computed once per process.

    Returns
    -------
    tuple of (bool, str)
        ``(True, "")`` or ``(False, reason)``, the reason saying what to do.
    """
    return _availability()


@functools.lru_cache(maxsize=1)
def _availability() -> tuple[bool, str]:
    try:
        import cupy
    except Exception as err:  # ImportError, or a CUDA library that fails to load
        return False, f"CuPy cannot be imported ({type(err).__name__}: {err}); {_INSTALL}"
    try:
        devices = int(cupy.cuda.runtime.getDeviceCount())
    except Exception as err:  # no driver, driver too old, no device
        return False, f"no CUDA GPU visible ({type(err).__name__}: {err})"
    if devices < 1:
        return False, "no CUDA GPU visible (0 devices)"
    try:
        if importlib.util.find_spec("nvidia.nvimgcodec") is None:
            return False, f"nvImageCodec is not installed; {_INSTALL}"
        from nvidia import nvimgcodec
    except Exception as err:
        return False, f"nvImageCodec cannot be imported ({type(err).__name__}: {err}); {_INSTALL}"
    return _gpu_jpeg_probe(nvimgcodec)


def _gpu_jpeg_probe(nvimgcodec: Any) -> tuple[bool, str]:
    """Decode a 16x16 JPEG with nvImageCodec's GPU backends only."""
    import imagecodecs

    sample = imagecodecs.jpeg8_encode(np.full((16, 16, 3), 128, dtype=np.uint8), level=90)
    try:
        kinds = [nvimgcodec.BackendKind.GPU_ONLY, nvimgcodec.BackendKind.HYBRID_CPU_GPU, nvimgcodec.BackendKind.HW_GPU_ONLY]
        decoder = nvimgcodec.Decoder(backends=[nvimgcodec.Backend(kind) for kind in kinds])
        images = decoder.decode([nvimgcodec.CodeStream(bytes(sample))])
    except Exception as err:
        return False, f"nvImageCodec could not decode on the GPU ({type(err).__name__}: {err}); {_INSTALL}"
    if len(images) != 1 or images[0] is None:
        return False, f"nvImageCodec has no working GPU JPEG decoder (is nvJPEG installed?); {_INSTALL}"
    return True, ""


def nvimgcodec_file_problem(info: SlideInfo) -> str | None:
    """Why the nvimgcodec backend should not read this file, or None when it may.

    It reads TIFF files that tifffile reads (its tile table is tifffile's) and is only
    worth choosing when some level is stored in JPEG or JPEG 2000 tiles; whether a GPU
    is here is :func:`nvimgcodec_available`'s question, not the file's.
    """
    tifffile_problem = info.problem("tifffile")
    if tifffile_problem is not None:
        return f"its tiles are located with tifffile, which cannot read this file ({tifffile_problem})"
    batchable = {JPEG} | set(JPEG2000_COMPRESSIONS)
    if not any(lv.tiled and lv.compression in batchable for lv in info.levels):
        return "no level is stored in JPEG or JPEG 2000 tiles (nothing for a GPU decoder to do)"
    return None


def _gpu_modules() -> tuple[Any, Any]:
    """CuPy and nvImageCodec, imported on first use (the tests substitute fakes here)."""
    import cupy
    from nvidia import nvimgcodec

    return cupy, nvimgcodec


class NvImageCodecReader:
    """Reads windows with nvImageCodec batched GPU decoding into CuPy arrays.

    Parameters
    ----------
    info : SlideInfo
        The probed slide (as every reader takes it).
    device_id : int
        CUDA device to decode on and to allocate the windows on.
    verify : bool
        Run the agreement check of each level's first tile (see the module docstring).
    cpu_threads : int or None
        Host threads of each nvImageCodec decoder (one decoder per calling thread);
        ``None``: half the host's cores, at most 8.
    options : str
        nvImageCodec decoder options.

    Raises
    ------
    InvalidArgumentError
        CuPy, nvImageCodec (with nvJPEG) or a CUDA GPU is missing.
    """

    name: ClassVar[str] = "nvimgcodec"

    def __init__(
        self,
        info: SlideInfo,
        *,
        device_id: int = 0,
        verify: bool = True,
        cpu_threads: int | None = None,
        options: str = DEFAULT_OPTIONS,
    ) -> None:
        ok, reason = nvimgcodec_available()
        if not ok:
            raise InvalidArgumentError(
                f"{info.path}: backend 'nvimgcodec' cannot run here: {reason}. Use backend='auto' (or 'cucim'/'tifffile') on this machine."
            )
        self.info = info
        self.device_id = device_id
        self.verify = verify
        self._cp, self._nv = _gpu_modules()
        self._options = options
        self._cpu_threads = cpu_threads if cpu_threads is not None else max(1, min(8, (os.cpu_count() or 2) // 2))
        self._tiles = TiffTiles(info.path)
        self._local = threading.local()
        self._lock = threading.Lock()
        self._modes: dict[int, str | None] = {}
        #: Per level: the decode mode chosen, the agreement measured, and why not GPU.
        self.report: dict[int, dict[str, Any]] = {}
        #: Tiles decoded on the GPU, on the CPU (GPU failed or level not agreed),
        #: through tifffile (not batchable), and left out as damaged.
        self.counters = {"gpu_tiles": 0, "cpu_tiles": 0, "fallback_tiles": 0, "damaged_tiles": 0}
        self._decoder()  # fail now, not in the first task, if the decoder cannot be made

    # -- nvImageCodec calls -------------------------------------------------------------

    def _decoder(self) -> Any:
        """This thread's decoder (nvImageCodec decoders are not shared between threads)."""
        decoder = getattr(self._local, "decoder", None)
        if decoder is None:
            decoder = self._nv.Decoder(device_id=self.device_id, max_num_cpu_threads=self._cpu_threads, options=self._options)
            self._local.decoder = decoder
        return decoder

    def _params(self, mode: str) -> Any:
        """DecodeParams of a mode: "srgb" (interleaved RGB) or "planar" (raw components)."""
        nv = self._nv
        if mode == "srgb":  # the enum member is SRGB in nvImageCodec 0.9, RGB in early releases
            spec = nv.ColorSpec.SRGB if hasattr(nv.ColorSpec, "SRGB") else nv.ColorSpec.RGB
            return nv.DecodeParams(color_spec=spec, allow_any_depth=False, apply_exif_orientation=False)
        # "planar": the components as coded, no colour transform (for RGB-coded JPEG):
        # YCC colour spec with planar YCC (= YUV) output, shape (3, h, w)
        spec = nv.ColorSpec.SYCC if hasattr(nv.ColorSpec, "SYCC") else nv.ColorSpec.YCC
        fmt = nv.SampleFormat.P_YCC if hasattr(nv, "SampleFormat") else nv.P_YUV
        return nv.DecodeParams(color_spec=spec, allow_any_depth=False, apply_exif_orientation=False, sample_format=fmt)

    def _decode_gpu(self, streams: list[bytes], mode: str) -> list[Any]:
        """One batched decode; a CuPy ``(h, w, c)`` view per stream, ``None`` where it failed."""
        cp, nv = self._cp, self._nv
        images = self._decoder().decode([nv.CodeStream(s) for s in streams], params=self._params(mode), cuda_stream=cp.cuda.get_current_stream().ptr)
        if len(images) != len(streams):  # old nvImageCodec dropped failed images from the list
            return [None] * len(streams)
        out: list[Any] = []
        for image in images:
            if image is None:
                out.append(None)
                continue
            array = cp.asarray(image)  # zero-copy through __cuda_array_interface__ (keeps image alive)
            if mode == "planar":
                array = array.transpose(1, 2, 0) if array.ndim == 3 and array.shape[0] == 3 else None
            out.append(array)
        return out

    # -- agreement check ----------------------------------------------------------------

    def _mode(self, batch: TileBatch) -> str | None:
        """The decode mode of ``batch.level`` (chosen on its first batch), or None for CPU."""
        level = batch.level
        if level in self._modes:
            return self._modes[level]
        with self._lock:
            if level in self._modes:
                return self._modes[level]
            candidates = ["srgb"] + (["planar"] if batch.codec == "jpeg" and batch.colorspace == "rgb" else [])
            entry: dict[str, Any] = {"codec": batch.codec, "colorspace": batch.colorspace, "tried": {}}
            chosen: str | None = candidates[0]
            if self.verify:
                chosen = None
                for mode in candidates:
                    entry["tried"][mode] = agreement = self._agreement(batch, mode)
                    if isinstance(agreement, dict) and agreement["mean_diff"] <= AGREEMENT_MEAN_LEVELS:
                        chosen = mode
                        entry.update(agreement)
                        break
                if chosen is None:
                    warnings.warn(
                        f"{self.info.path}: level {level}: nvImageCodec's decode of the first tile does not agree "
                        f"with the CPU decode ({entry['tried']}); this level is decoded on the CPU.",
                        RuntimeWarning,
                        stacklevel=4,
                    )
            entry["mode"] = chosen
            self.report[level] = entry
            self._modes[level] = chosen
            return chosen

    def _agreement(self, batch: TileBatch, mode: str) -> dict[str, float] | str:
        """GPU vs CPU decode of the batch's first tile the GPU decodes (of up to three)."""
        failure = "no image (or one of the wrong shape) from nvImageCodec"
        for stream in batch.streams[:3]:
            try:
                got = self._decode_gpu([stream], mode)[0]
            except Exception as err:  # an nvImageCodec error type, a CUDA error
                return f"{type(err).__name__}: {err}"
            reference = decode_tile_cpu(stream, batch.codec or "", batch.colorspace).astype(np.int16)
            if got is None or tuple(got.shape[:2]) != reference.shape[:2] or got.ndim != 3 or got.shape[2] < 3:
                continue
            diff = np.abs(self._cp.asnumpy(got[..., :3]).astype(np.int16) - reference)
            return {"max_diff": int(diff.max()), "mean_diff": float(diff.mean())}
        return failure

    # -- reading ------------------------------------------------------------------------

    def _count(self, **add: int) -> None:
        with self._lock:
            for key, value in add.items():
                self.counters[key] += value

    def read_with_damage(
        self, level: int, y: int, x: int, height: int, width: int, decode: np.ndarray | None = None
    ) -> tuple[Any, list[DamagedTile]]:
        """Decode a window into a CuPy array, and list the damaged tiles left at zero.

        Parameters
        ----------
        level, y, x, height, width : int
            The window ``[y:y+height, x:x+width]`` of ``level``, in level pixels, inside
            the level.
        decode : numpy.ndarray of bool, optional
            Over the TIFF tiles the window touches (the shape of
            ``SegmentGrid.window(y, x, height, width)``): only tiles marked True are read
            and decoded, the others stay zero (all of them in one batched call).

        Returns
        -------
        tuple of (cupy.ndarray, list of DamagedTile)
            uint8 ``(height, width, 3)`` on the GPU; the tiles not decoded (damaged in the
            file, or refused by every decoder) with their reasons.
        """
        cp = self._cp
        batch = self._tiles.batch(level, y, x, height, width, decode)
        damaged = list(batch.damaged)
        gpu = cpu = 0
        with cp.cuda.Device(self.device_id):
            host = self._tiles.read_fallback(batch)
            if host is not None and not batch.placements and not batch.damaged and batch.complete:
                self._count(fallback_tiles=len(batch.fallback))
                return cp.asarray(host), damaged
            out = cp.zeros((height, width, 3), dtype=cp.uint8)
            if batch.streams:
                mode = self._mode(batch)
                tiles: list[Any] = [None] * len(batch.streams)
                if mode is not None:
                    try:
                        tiles = self._decode_gpu(batch.streams, mode)
                    except Exception as err:  # keep going on the CPU, but say so once per reader
                        self._warn_once(f"nvImageCodec batch decode failed ({type(err).__name__}: {err}); using the CPU")
                for p, stream, tile in zip(batch.placements, batch.streams, tiles):
                    if tile is not None and _fits(tile, p):
                        paste(out, p, tile)
                        gpu += 1
                        continue
                    try:
                        decoded = decode_tile_cpu(stream, batch.codec or "", batch.colorspace)
                        if not _fits(decoded, p):
                            raise ValueError(f"decoded tile has shape {decoded.shape}")
                        out[p.dst] = cp.asarray(np.ascontiguousarray(decoded[p.src][..., :3]))
                        cpu += 1
                    except Exception as err:
                        damaged.append(DamagedTile(p, f"no decoder could decode the tile ({type(err).__name__}: {err})"))
            if host is not None:
                for p in batch.fallback:
                    out[p.dst] = cp.asarray(np.ascontiguousarray(host[p.dst]))
        self._count(gpu_tiles=gpu, cpu_tiles=cpu, fallback_tiles=len(batch.fallback), damaged_tiles=len(damaged))
        return out, damaged

    def use_damage(self, level: int, grid: Any) -> None:
        """Use a damage grid scanned elsewhere (e.g. ``OpenedSlide.damage(level)``) for ``level``.

        Otherwise the reader scans the level itself on first use (the same scan).
        """
        self._tiles.set_damage(level, grid)

    def read(self, level: int, y: int, x: int, height: int, width: int) -> Any:
        """Decode a window of ``level`` into a CuPy uint8 ``(height, width, 3)`` array.

        Damaged tiles are zero; :meth:`read_with_damage` also says which they are.
        """
        return self.read_with_damage(level, y, x, height, width)[0]

    def _warn_once(self, message: str) -> None:
        if not getattr(self, "_warned", False):
            self._warned = True
            warnings.warn(f"{self.info.path}: {message}", RuntimeWarning, stacklevel=3)

    def close(self) -> None:
        """Close the file and drop this thread's decoder."""
        self._tiles.close()
        self._local = threading.local()


def _fits(tile: Any, p: TilePlacement) -> bool:
    """Whether a decoded tile is large enough for its placement (and RGB)."""
    return tile.ndim == 3 and tile.shape[0] >= p.src_y + p.height and tile.shape[1] >= p.src_x + p.width and tile.shape[2] >= 3
