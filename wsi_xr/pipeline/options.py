"""A run's settings: checked once, before any work, and the fingerprint that defines its results."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from wsi_xr.encode import Model, ModelRef, check_precision, check_torch_threads, features_of, prepare_encoder
from wsi_xr.errors import InvalidArgumentError
from wsi_xr.readers import GPU_BACKENDS, OpenedSlide
from wsi_xr.resample import ReadScale, check_target_mpp, choose_scale
from wsi_xr.slide import ChunkSpec, large_level_chunk
from wsi_xr.tissue.params import MaskParams
from wsi_xr.tissue.plan import Chunks, plan_chunks
from wsi_xr.tissue.threshold import THRESHOLD_RANGE

if TYPE_CHECKING:
    from wsi_xr.models.encoders import EncoderRef, LoadedEncoder

__all__ = [
    "CANDIDATE_FLOOR",
    "READ_CHECKS",
    "RunOptions",
    "candidate_floor",
    "check_slide_options",
    "run_fingerprint",
    "validate_run_options",
]

#: Version of the checks every read makes (1: tiles the decoder complained about are read
#: errors). A store started with fewer checks is not resumed: its chunks were not checked.
READ_CHECKS = 1

#: The lowest threshold "auto" can choose: tiles above it are encoded as candidates.
CANDIDATE_FLOOR = THRESHOLD_RANGE[0]

_MASK = MaskParams()  # the defaults live in MaskParams


@dataclass(frozen=True)
class RunOptions:
    """The settings of a run that do not depend on the slide (checked before any work).

    The mask's settings (``tile`` ... ``reject_pen``) are a :class:`MaskParams`
    (:attr:`mask`), which holds their defaults and checks; the others are the encoder's
    and the reading's.
    """

    tile: int | None = None
    patch: int | None = None
    threshold: float | str = _MASK.threshold
    coarse: str | int = _MASK.coarse
    chunks: ChunkSpec = None
    level: int = 0
    batch_size: int | None = None
    device: str = "cpu"
    precision: str = "fp32"
    reject_pen: bool = _MASK.reject_pen
    torch_threads: int | str | None = None
    model: Model | LoadedEncoder | None = None
    target_mpp: float | None = None

    def scale(self, opened: OpenedSlide) -> ReadScale | None:
        """How ``opened`` is read at :attr:`target_mpp` (None: at :attr:`level` as it is)."""
        return None if self.target_mpp is None else choose_scale(opened.info, self.target_mpp, self.mask.tile)

    @property
    def mask(self) -> MaskParams:
        """The mask's settings (checked when built; tile and patch: the reference's until resolved)."""
        tile = _MASK.tile if self.tile is None else self.tile
        patch = (_MASK.patch if self.tile is None else 4 * tile) if self.patch is None else self.patch
        return MaskParams(tile, patch, self.threshold, self.coarse, self.reject_pen)

    @property
    def ref(self) -> ModelRef | EncoderRef | None:
        """The model's identity (weights hash, device, precision; an encoder's spec), once validated."""
        return None if self.model is None else self.model.ref

    @property
    def subtiles(self) -> int:
        """Sub-tiles per tile side for ``tissue_fraction``: 0 for the VAE (its 64-px tiles are the
        mask's), else 4 (2, 1) for an encoder tile divisible by it (a 224-px tile: 56-px sub-tiles)."""
        if self.model is None or isinstance(self.model, Model):
            return 0
        tile = self.mask.tile
        return next(n for n in (4, 2, 1) if tile % n == 0)

    @property
    def features(self) -> int:
        """The length of the model's feature vector (the VAE: 32)."""
        assert self.ref is not None
        return features_of(self.ref)


def validate_run_options(
    weights: Any = None, *, encoder: Any = None, encoder_spec: Any = None, encoder_kwargs: Any = None, **settings: Any
) -> RunOptions:
    """Check every slide-independent argument of a run, load-test the encoder, return them.

    Cheap (no pixels are read): the CLI calls it before starting a cluster. ``weights`` is a
    path, a VAE2, a :class:`~wsi_xr.encode.Model` or
    :class:`~wsi_xr.models.encoders.LoadedEncoder` (checked already: reused) or None;
    ``encoder`` and ``encoder_spec`` name another encoder (:func:`~wsi_xr.encode.prepare_encoder`),
    with ``weights`` as its weights file (``encoder_kwargs``: a timm model's keyword arguments). The tile is the encoder's (64 for the VAE), the
    patch 4 tiles unless given, and the target mpp the spec's unless given.
    """
    from wsi_xr.models.encoders import LoadedEncoder  # torch: loading the model imports it anyway

    if encoder is None and isinstance(weights, LoadedEncoder):
        encoder, weights = weights, None
    options = RunOptions(**settings)
    MaskParams(threshold=options.threshold, coarse=options.coarse, reject_pen=options.reject_pen)  # the cheap checks first
    if options.batch_size is not None and (not isinstance(options.batch_size, int) or isinstance(options.batch_size, bool) or options.batch_size < 1):
        raise InvalidArgumentError(f"batch_size={options.batch_size}: must be an integer >= 1 (or None: the measured default).")
    if options.device not in ("cpu", "cuda"):
        raise InvalidArgumentError(f"device={options.device!r}: use 'cpu' or 'cuda'.")
    check_precision(options.precision, options.device)
    check_torch_threads(options.torch_threads)
    target = check_target_mpp(options.target_mpp)
    if target is not None and options.level != 0:
        raise InvalidArgumentError(f"level={options.level} and target_mpp={target}: the target chooses the level to read; give one of them.")
    model = prepare_encoder(
        encoder, weights=weights, spec=encoder_spec, timm_kwargs=encoder_kwargs, device=options.device, precision=options.precision
    )
    encoder_tile, name = (64, "the VAE") if isinstance(model, Model) else (model.spec.tile, f"encoder {model.spec.name!r}")
    if options.tile is not None and options.tile != encoder_tile:
        raise InvalidArgumentError(
            f"tile={options.tile}: {name} encodes {encoder_tile}x{encoder_tile} tiles; leave tile unset (or use tile={encoder_tile})."
        )
    if target is None and not isinstance(model, Model):
        target = model.spec.target_mpp  # the resolution the encoder was trained at
        if target is not None and options.level != 0:
            raise InvalidArgumentError(
                f"level={options.level}: encoder {model.spec.name!r} works at {target} µm/px (its spec's target_mpp), which chooses the level; "
                "leave level unset, or give target_mpp= yourself."
            )
    resolved = RunOptions(**{**options.__dict__, "tile": encoder_tile, "target_mpp": target, "model": model})
    return RunOptions(**{**resolved.__dict__, "patch": resolved.mask.patch})  # checks tile and patch (default: 4 tiles)


def run_chunks(opened: OpenedSlide, options: RunOptions) -> ChunkSpec:
    """The chunks a run reads: ``options.chunks`` when given; else, on a large level,
    :func:`~wsi_xr.slide.large_level_chunk` (4096 px on the file's tile borders from 32768²
    on); else None (the slide's default, ~2048 px).

    A fixed rule of the level's size, not of the machine, so a store resumes on any machine.
    """
    levels = opened.info.levels
    if options.chunks is not None or options.target_mpp is not None or not 0 <= options.level < len(levels):
        return options.chunks  # a level that does not exist is refused by plan_chunks
    return large_level_chunk(levels[options.level], options.mask.patch)


def check_slide_options(opened: OpenedSlide, options: RunOptions) -> Chunks:
    """The checks of a run's options that need the slide (cheap: no pixels are read).

    Returns the slide's chunking (level pixels per chunk along y and x).
    """
    if options.device == "cpu" and opened.backend in GPU_BACKENDS:
        raise InvalidArgumentError(f"{opened.info.path}: backend {opened.backend!r} needs device='cuda'.")
    return plan_chunks(opened, options.level, run_chunks(opened, options), options.mask, options.scale(opened))


def run_fingerprint(opened: OpenedSlide, options: RunOptions, chunks: Chunks) -> dict[str, Any]:
    """The parameters that define a run's results: a store made with others is not resumed."""
    info = opened.info
    assert options.ref is not None
    scale: dict[str, Any] = {}  # only when set: stores made without them still resume
    if info.mpp_source == "user":
        scale["mpp"] = info.mpp
    if options.target_mpp is not None:
        scale["target_mpp"] = options.target_mpp
    if options.model is not None and not isinstance(options.model, Model):  # the spec (normalisation, tile) decides the features too
        scale["encoder"] = options.model.spec.attrs()
    return {
        **scale,
        "source": info.path,
        "file_size": info.file_size,
        "mtime_ns": info.mtime_ns,
        "level": options.level,
        "tile": options.tile,
        "patch": options.patch,
        "threshold_setting": options.threshold,
        "coarse": str(options.coarse),
        "chunks": [list(chunks[0]), list(chunks[1])],
        "weights_sha256": options.ref.sha256,
        "precision": options.precision,
        "reject_pen": options.reject_pen,
        "read_checks": READ_CHECKS,
        "content": opened.content(),  # the slide's identity from its content, not its name and mtime
    }


def candidate_floor(options: RunOptions) -> float:
    """The threshold the chunk tasks encode above: a given one, or the lowest "auto" can choose."""
    return CANDIDATE_FLOOR if options.threshold == "auto" else float(options.threshold)
