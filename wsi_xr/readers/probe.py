"""Inspect a slide file safely before any decoder touches it.

cuCIM crashes the interpreter on some valid files (a tiled Deflate TIFF segfaults
cucim 26.10 on open) and mis-decodes others. :func:`probe` reads only the file's
structure and records which backends may read it (:attr:`SlideInfo.backend_problems`):

- TIFF-based files (Aperio SVS, Philips TIFF, OME-TIFF with its pyramid in SubIFDs,
  generic TIFF) are described with tifffile: IFDs, tags, the first bytes of one tile.
- Vendor formats that only OpenSlide assembles correctly (Hamamatsu NDPI, Leica SCN,
  Ventana BIF, although they are TIFFs) and everything tifffile cannot open (3DHISTECH
  MRXS, DICOM WSI, Hamamatsu VMS/VMU, Sakura, Zeiss CZI, ...) are described with
  OpenSlide: its levels, tile size and microns per pixel properties.

Nothing here decodes pixels.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import tifffile

from wsi_xr._logging import third_party_logs
from wsi_xr.errors import InvalidArgumentError, SlideOpenError, UnsupportedFormatError

#: TIFF compression codes (tag 259) that cuCIM 26.10 decodes correctly on CPU.
CUCIM_SAFE_COMPRESSIONS = frozenset({1, 7})  # none, JPEG
#: Plausible microns per pixel; resolution tags outside this range are placeholders.
_MPP_RANGE = (0.02, 100.0)


@dataclass(frozen=True)
class LevelInfo:
    """One resolution level of a slide.

    ``downsample`` is the level-0 size divided by this level's size, per axis.
    ``tile_width``/``tile_height`` are the TIFF tile size, 0 for a stripped page (for
    files described with OpenSlide: its ``openslide.level[i].tile-*`` properties, 0 when
    unknown; ``compression`` is then 0, ``compression_name`` ``"unknown"``).
    """

    index: int
    width: int
    height: int
    downsample_x: float
    downsample_y: float
    tile_width: int
    tile_height: int
    compression: int
    compression_name: str

    @property
    def downsample(self) -> float:
        """The mean downsample of both axes (the OpenSlide convention)."""
        return (self.downsample_x + self.downsample_y) / 2.0

    @property
    def tiled(self) -> bool:
        """Whether this level is stored in TIFF tiles (not strips)."""
        return self.tile_width > 0


@dataclass(frozen=True)
class SlideInfo:
    """What :func:`probe` learns about a slide file without decoding pixels."""

    path: str
    file_size: int
    mtime_ns: int
    vendor: str
    levels: tuple[LevelInfo, ...]
    mpp: float | None
    photometric: str
    samples_per_pixel: int
    #: ``(backend, reason)`` pairs: backends that must not read this file, and why.
    #: A backend not listed may read it.
    backend_problems: tuple[tuple[str, str], ...] = ()
    #: What kind of file this is: ``"aperio-svs"``, ``"philips-tiff"``, ``"ome-tiff"``,
    #: ``"generic-tiff"`` (described with tifffile) or ``"mrxs"``, ``"dicom"``, ``"ndpi"``,
    #: ``"scn"``, ``"bif"``, ``"vms"``, ... (described with OpenSlide).
    format: str = "generic-tiff"
    #: Where ``mpp`` comes from: ``"file"`` (the probe read it), ``"user"`` (given with
    #: ``mpp=`` / ``--mpp``, see :func:`~wsi_xr.readers.open_file`) or ``"missing"`` (unknown).
    mpp_source: str = "file"

    def __post_init__(self) -> None:
        if self.mpp is None and self.mpp_source == "file":
            object.__setattr__(self, "mpp_source", "missing")

    def with_mpp(self, mpp: float | None) -> SlideInfo:
        """This description with the user's ``mpp`` (µm per level-0 pixel; None: the file's)."""
        if mpp is None:
            return self
        if isinstance(mpp, bool) or not isinstance(mpp, (int, float)) or not math.isfinite(mpp) or not _MPP_RANGE[0] <= mpp <= _MPP_RANGE[1]:
            raise InvalidArgumentError(
                f"{self.path}: mpp={mpp!r}: give the microns per level-0 pixel, a number from {_MPP_RANGE[0]} to {_MPP_RANGE[1]} "
                "(0.25 for a 40x scan, 0.5 for 20x)."
            )
        if self.mpp is not None and float(mpp) == self.mpp:
            return self  # the file's own value: still the file's (a store made with it resumes)
        return replace(self, mpp=float(mpp), mpp_source="user")

    def problem(self, backend: str) -> str | None:
        """Why ``backend`` must not read this file, or None when it may."""
        return dict(self.backend_problems).get(backend)

    @property
    def cucim_safe(self) -> bool:
        """Whether cuCIM may open this file (it crashes or mis-decodes some valid files)."""
        return self.problem("cucim") is None

    @property
    def cucim_unsafe_reason(self) -> str | None:
        """Why cuCIM must not open this file, or None."""
        return self.problem("cucim")

    @property
    def width(self) -> int:
        """Level-0 width in pixels."""
        return self.levels[0].width

    @property
    def height(self) -> int:
        """Level-0 height in pixels."""
        return self.levels[0].height

    @property
    def tile_size(self) -> tuple[int, int]:
        """Level-0 TIFF tile (height, width); (0, 0) for a stripped file."""
        return self.levels[0].tile_height, self.levels[0].tile_width

    def to_dict(self) -> dict[str, object]:
        """A JSON-ready description (used by ``wsi-xr info --json``)."""
        return {
            "path": self.path,
            "file_size": self.file_size,
            "vendor": self.vendor,
            "mpp": self.mpp,
            "mpp_source": self.mpp_source,
            "photometric": self.photometric,
            "format": self.format,
            "cucim_safe": self.cucim_safe,
            "cucim_unsafe_reason": self.cucim_unsafe_reason,
            "backend_problems": dict(self.backend_problems),
            "levels": [
                {
                    "level": lv.index,
                    "width": lv.width,
                    "height": lv.height,
                    "downsample": round(lv.downsample, 6),
                    "tile_width": lv.tile_width,
                    "tile_height": lv.tile_height,
                    "compression": lv.compression_name,
                }
                for lv in self.levels
            ],
        }


def check_path(path: str | os.PathLike[str]) -> Path:
    """Return ``path`` as an absolute Path, or raise :class:`SlideOpenError` saying why not.

    A folder holding a DICOM WSI series stands for the series: the path of its first
    DICOM file (by name) that OpenSlide recognises is returned (OpenSlide finds the
    other files of the series beside it).
    """
    p = Path(path).expanduser()
    if not p.exists():
        raise SlideOpenError(f"{p}: no such file. Check the path (relative paths are taken from {Path.cwd()}).")
    if p.is_dir():
        dicom = _dicom_file_in(p)
        if dicom is None:
            raise SlideOpenError(
                f"{p}: is a directory without a DICOM WSI series, not a slide file. Pass the path of a "
                ".svs/.tif/.ndpi/.mrxs/... file, or a folder holding the .dcm files of one DICOM slide."
            )
        p = dicom
    if p.stat().st_size == 0:
        raise SlideOpenError(f"{p}: is empty (0 bytes). The file was not copied or written completely.")
    return p.resolve()


@third_party_logs()  # tifffile's warnings about odd tags become wsi_xr INFO records
def probe(path: str | os.PathLike[str]) -> SlideInfo:
    """Inspect a slide file and describe it; decodes no pixels.

    TIFF-based files are described with tifffile, vendor formats with OpenSlide (see
    the module docstring); :attr:`SlideInfo.format` says which kind the file is and
    :attr:`SlideInfo.backend_problems` which backends must not read it, and why.

    Parameters
    ----------
    path
        A slide file, or a folder holding the files of one DICOM WSI series.

    Raises
    ------
    SlideOpenError
        The file is missing, empty, damaged, or in no format wsi_xr reads.
    UnsupportedFormatError
        A TIFF whose pixel layout or compression no backend can decode.
    """
    p = check_path(path)
    stat = p.stat()
    try:
        with tifffile.TiffFile(p) as tf:
            kind = _tiff_kind(tf)
            if kind not in OPENSLIDE_TIFF_KINDS:
                info = _describe(tf, p, stat.st_size, stat.st_mtime_ns, kind)
    except (SlideOpenError, UnsupportedFormatError):
        raise
    except tifffile.TiffFileError as err:
        return _describe_with_openslide(p, stat.st_size, stat.st_mtime_ns, None, f"not a TIFF ({err})")
    except Exception as err:  # damaged structures make tifffile raise many types
        raise SlideOpenError(
            f"{p}: the TIFF structure is damaged ({type(err).__name__}: {err}). "
            "The file is probably truncated or corrupt; copy it again from its source."
        ) from err
    if kind in OPENSLIDE_TIFF_KINDS:
        return _describe_with_openslide(p, stat.st_size, stat.st_mtime_ns, kind, f"a {kind} TIFF")
    problem = _openslide_problem(p, info.levels)
    if problem is None:
        return info
    return replace(info, backend_problems=(*info.backend_problems, ("openslide", problem)))


#: TIFF-based vendor formats that wsi_xr reads with OpenSlide, and why not with cuCIM / tifffile.
OPENSLIDE_TIFF_KINDS: dict[str, dict[str, str]] = {
    "ndpi": {
        "cucim": "Hamamatsu NDPI (cuCIM 26.10 does not read NDPI)",
        "tifffile": "Hamamatsu NDPI (tifffile decodes its restart-interval tiles 4-12x slower than OpenSlide "
        "here, and in wrong colours when the TIFF says RGB)",
    },
    "scn": {
        "cucim": "Leica SCN (several images placed in one frame; only OpenSlide assembles them)",
        "tifffile": "Leica SCN (several images placed in one frame; only OpenSlide assembles them)",
    },
    "bif": {
        "cucim": "Ventana BIF (tiles may overlap, placed by XMP tile-joint data that only OpenSlide uses)",
        "tifffile": "Ventana BIF (tiles may overlap, placed by XMP tile-joint data that only OpenSlide uses)",
    },
}

#: ``format`` of the files OpenSlide describes, by OpenSlide vendor.
_OPENSLIDE_FORMATS = {
    "aperio": "aperio-svs",
    "dicom": "dicom",
    "generic-tiff": "generic-tiff",
    "leica": "scn",
    "mirax": "mrxs",
    "philips": "philips-tiff",
    "sakura": "svslide",
    "trestle": "trestle-tiff",
    "ventana": "bif",
    "zeiss": "czi",
}


def _tiff_kind(tf: tifffile.TiffFile) -> str:
    """The :attr:`SlideInfo.format` of a file that tifffile opened."""
    for kind, flag in (
        ("ndpi", "is_ndpi"),
        ("scn", "is_scn"),
        ("bif", "is_bif"),
        ("aperio-svs", "is_svs"),
        ("philips-tiff", "is_philips"),
        ("ome-tiff", "is_ome"),
    ):
        if getattr(tf, flag, False):
            return kind
    return "generic-tiff"


def _dicom_file_in(folder: Path) -> Path | None:
    """The first file (by name) of ``folder`` that OpenSlide recognises as DICOM WSI, or None."""
    for candidate in sorted(folder.iterdir()):
        try:
            if not candidate.is_file():
                continue
            with candidate.open("rb") as fh:
                head = fh.read(132)
        except OSError:
            continue
        if head[128:132] != b"DICM":
            continue
        try:
            import openslide
        except ImportError:
            return candidate  # the probe then says that OpenSlide is needed
        if openslide.OpenSlide.detect_format(str(candidate)) == "dicom":
            return candidate
    return None


def _import_openslide(p: Path, why: str) -> Any:
    try:
        import openslide
    except ImportError as err:  # openslide-bin missing on this platform
        raise SlideOpenError(
            f"{p}: {why}; wsi_xr reads such files with OpenSlide, which is not installed here ({err}). "
            "Install it with `pip install openslide-python openslide-bin`."
        ) from err
    return openslide


def _describe_with_openslide(p: Path, size: int, mtime_ns: int, kind: str | None, why_not_tiff: str) -> SlideInfo:
    """Describe a file with OpenSlide (its levels, tiles, mpp); decodes no pixels.

    ``kind`` is the format when tifffile recognised a vendor TIFF, None when the file
    is not a TIFF; ``why_not_tiff`` says why tifffile does not read it.
    """
    openslide = _import_openslide(p, why_not_tiff)
    vendor = openslide.OpenSlide.detect_format(str(p))
    if vendor is None:
        raise SlideOpenError(
            f"{p}: not a slide file wsi_xr can read: {why_not_tiff}, and OpenSlide does not recognise it. "
            "wsi_xr reads TIFF-based slides (Aperio SVS, Philips, OME-TIFF, generic tiled TIFF) and what "
            "OpenSlide reads (MRXS, DICOM, NDPI, SCN, BIF, VMS, ...); check that the file is one of "
            "these and that it was copied completely."
        )
    try:
        slide = openslide.OpenSlide(str(p))
    except openslide.OpenSlideError as err:
        raise SlideOpenError(
            f"{p}: OpenSlide recognises a {vendor} slide but cannot open it ({err}). The file (or, for "
            "MRXS, its folder of .dat files; for DICOM, the other files of the series) is probably "
            "incomplete or damaged; copy it again from its source."
        ) from err
    with slide:
        dims = [tuple(int(v) for v in d) for d in slide.level_dimensions]
        props = dict(slide.properties)
    if not dims or dims[0][0] <= 0 or dims[0][1] <= 0:
        raise SlideOpenError(f"{p}: OpenSlide finds no image in this {vendor} slide; copy it again from its source.")
    fmt = kind or _OPENSLIDE_FORMATS.get(vendor, vendor)
    if vendor == "hamamatsu":
        fmt = kind or p.suffix.lower().lstrip(".") or "hamamatsu"
    base_w, base_h = dims[0]
    levels = tuple(
        LevelInfo(
            index=i,
            width=w,
            height=h,
            downsample_x=base_w / w,
            downsample_y=base_h / h,
            tile_width=_int_property(props, f"openslide.level[{i}].tile-width"),
            tile_height=_int_property(props, f"openslide.level[{i}].tile-height"),
            compression=0,
            compression_name="unknown",
        )
        for i, (w, h) in enumerate(dims)
    )
    problems: tuple[tuple[str, str], ...]
    if kind is None:
        problems = (("cucim", f"a {fmt} slide, not a TIFF"), ("tifffile", f"a {fmt} slide, not a TIFF"))
    else:
        problems = tuple(OPENSLIDE_TIFF_KINDS[kind].items())
    return SlideInfo(
        path=str(p),
        file_size=size,
        mtime_ns=mtime_ns,
        vendor=vendor,
        levels=levels,
        mpp=_openslide_mpp(props),
        photometric="rgb",
        samples_per_pixel=3,
        backend_problems=problems,
        format=fmt,
    )


def _int_property(props: dict[str, str], name: str) -> int:
    try:
        return max(0, int(props.get(name, 0)))
    except ValueError:
        return 0


def _openslide_mpp(props: dict[str, str]) -> float | None:
    """µm per level-0 pixel from OpenSlide's ``openslide.mpp-x`` (and ``-y``); None if unknown."""
    values = []
    for axis in ("x", "y"):
        try:
            values.append(float(props.get(f"openslide.mpp-{axis}", "")))
        except ValueError:
            pass
    for mpp in values:
        if _MPP_RANGE[0] <= mpp <= _MPP_RANGE[1]:
            return mpp
    return None


def _openslide_problem(p: Path, levels: tuple[LevelInfo, ...]) -> str | None:
    """Why OpenSlide must not read a TIFF that tifffile described, or None when it may.

    OpenSlide may read it only when it opens it and sees the same levels (an OME-TIFF
    keeps its pyramid in SubIFDs, where OpenSlide sees only level 0).
    """
    try:
        import openslide
    except ImportError:
        return "openslide-python/openslide-bin are not installed (pip install openslide-python openslide-bin)"
    if openslide.OpenSlide.detect_format(str(p)) is None:
        return "OpenSlide does not recognise this TIFF (it reads tiled TIFFs only)"
    try:
        with openslide.OpenSlide(str(p)) as slide:
            dims = [tuple(int(v) for v in d) for d in slide.level_dimensions]
    except openslide.OpenSlideError as err:
        return f"OpenSlide cannot open it ({err})"
    ours = [(lv.width, lv.height) for lv in levels]
    if dims != ours:
        return f"OpenSlide sees {len(dims)} level(s) {dims[:3]}, not the file's {len(ours)} {ours[:3]}"
    return None


def _describe(tf: tifffile.TiffFile, p: Path, size: int, mtime_ns: int, kind: str = "generic-tiff") -> SlideInfo:
    if not tf.series:
        raise SlideOpenError(f"{p}: TIFF without any readable image; the file is probably truncated or damaged. Copy it again from its source.")
    series = tf.series[0]
    pages = [level.keyframe for level in series.levels]
    first = pages[0]
    vendor = {"aperio-svs": "aperio", "philips-tiff": "philips", "ome-tiff": "ome"}.get(kind, "generic-tiff")
    _check_pixel_layout(p, first)

    base_h, base_w = int(first.imagelength), int(first.imagewidth)
    levels = []
    for index, page in enumerate(pages):
        _check_compression(p, page)
        _check_pixel_layout(p, page)
        _check_tile_table(p, page, index)
        h, w = int(page.imagelength), int(page.imagewidth)
        code = int(page.compression)
        levels.append(
            LevelInfo(
                index=index,
                width=w,
                height=h,
                downsample_x=base_w / w,
                downsample_y=base_h / h,
                tile_width=int(page.tilewidth),
                tile_height=int(page.tilelength),
                compression=code,
                compression_name=_compression_name(code),
            )
        )
    reason = _cucim_unsafe_reason(tf, pages)
    top_level = {page.offset for page in tf.pages}
    if reason is None and any(page.offset not in top_level for page in pages):
        reason = "pyramid levels stored in SubIFDs (cuCIM 26.10 reads only top-level pages: level 1+ fail)"
    return SlideInfo(
        path=str(p),
        file_size=size,
        mtime_ns=mtime_ns,
        vendor=vendor,
        levels=tuple(levels),
        mpp=_microns_per_pixel(tf, first),
        photometric=_photometric_name(first),
        samples_per_pixel=int(first.samplesperpixel),
        backend_problems=(() if reason is None else (("cucim", reason),)),
        format=kind,
    )


def _compression_name(code: int) -> str:
    try:
        return tifffile.COMPRESSION(code).name.lower()
    except ValueError:
        return f"unknown-{code}"


def _photometric_name(page: tifffile.TiffPage) -> str:
    try:
        return tifffile.PHOTOMETRIC(int(page.photometric)).name.lower()
    except ValueError:
        return f"unknown-{int(page.photometric)}"


def _check_compression(p: Path, page: tifffile.TiffPage) -> None:
    code = int(page.compression)
    try:
        tifffile.COMPRESSION(code)
        known = code in CUCIM_SAFE_COMPRESSIONS or code in tifffile.TIFF.DECOMPRESSORS
    except (ValueError, KeyError):
        known = False
    if not known:
        raise UnsupportedFormatError(
            f"{p}: TIFF compression {_compression_name(code)} (code {code}) cannot be decoded by "
            "cuCIM or tifffile/imagecodecs. Convert the slide, e.g. with "
            "`tifffile`/`vips tiffsave --compression jpeg --tile --pyramid`."
        )


def _check_pixel_layout(p: Path, page: tifffile.TiffPage) -> None:
    if page.dtype is None or page.dtype.itemsize != 1 or page.dtype.kind != "u":
        raise UnsupportedFormatError(f"{p}: pixels are {page.dtype}, wsi_xr reads 8-bit brightfield RGB slides. Convert the image to 8-bit RGB.")
    if int(page.samplesperpixel) not in (3, 4):
        raise UnsupportedFormatError(f"{p}: {page.samplesperpixel} sample(s) per pixel; wsi_xr reads RGB or RGBA slides. Convert the image to RGB.")


def _check_tile_table(p: Path, page: tifffile.TiffPage, index: int) -> None:
    """A tiled level must have a positive tile size and one offset per tile of its size.

    A damaged IFD (a flipped bit in ImageWidth or TileLength) otherwise describes an image
    of another size, or tiles of size 0, and every later step works on a fiction.
    """
    if not page.is_tiled:
        return
    tile_h, tile_w = int(page.tilelength), int(page.tilewidth)
    if tile_h <= 0 or tile_w <= 0:
        raise SlideOpenError(
            f"{p}: level {index} says its TIFF tiles are {tile_w}x{tile_h} px; the TIFF structure is damaged. Copy the slide again from its source."
        )
    needed = -(-int(page.imagelength) // tile_h) * -(-int(page.imagewidth) // tile_w) * int(page.imagedepth or 1)
    if int(page.planarconfig) == 2:
        needed *= int(page.samplesperpixel)
    if len(page.dataoffsets) != needed or len(page.databytecounts) != needed:
        raise SlideOpenError(
            f"{p}: level {index} ({int(page.imagewidth)}x{int(page.imagelength)} px in {tile_w}x{tile_h} tiles) "
            f"needs {needed} tile offsets but its IFD lists {len(page.dataoffsets)}; the TIFF structure is "
            "damaged. Copy the slide again from its source."
        )


def _cucim_unsafe_reason(tf: tifffile.TiffFile, pages: list[tifffile.TiffPage]) -> str | None:
    """Why cuCIM must not open this file, or ``None`` when it can do so safely."""
    for page in pages:
        code = int(page.compression)
        if code not in CUCIM_SAFE_COMPRESSIONS:
            return f"{_compression_name(code)} compression (cuCIM 26.10 crashes or fails on it)"
        if code == 7 and not page.is_tiled:
            return "JPEG-compressed strips (cuCIM reads only tiled JPEG)"
        if int(page.planarconfig) != 1:
            return "separate colour planes (planar configuration 2)"
        if code == 7 and _photometric_name(page) == "rgb" and _jpeg_stream_is_ycbcr(tf, page):
            return "JPEG tiles hold YCbCr data but the TIFF says RGB (cuCIM decodes wrong colours)"
    return None


def _jpeg_stream_is_ycbcr(tf: tifffile.TiffFile, page: tifffile.TiffPage) -> bool:
    """Whether the first JPEG tile of ``page`` declares YCbCr colour (JFIF or Adobe marker).

    Aperio writes RGB JPEG tiles (component ids 1,2,3 with no colour marker) under an
    RGB photometric tag; decoders honour the tag. A JFIF APP0 or an Adobe APP14 with a
    colour transform says the data are YCbCr, which only tifffile then decodes right.
    """
    offsets, counts = page.dataoffsets, page.databytecounts
    index = next((i for i, n in enumerate(counts) if n > 0), None)
    if index is None:
        return False
    fh = tf.filehandle
    fh.seek(offsets[index])
    head = fh.read(min(int(counts[index]), 4096))
    return _declares_ycbcr(head) or (page.jpegtables is not None and _declares_ycbcr(page.jpegtables))


def _declares_ycbcr(stream: bytes) -> bool:
    i = 2 if stream[:2] == b"\xff\xd8" else 0
    while i + 4 <= len(stream) and stream[i] == 0xFF:
        marker = stream[i + 1]
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:
            i += 2
            continue
        length = int.from_bytes(stream[i + 2 : i + 4], "big")
        body = stream[i + 4 : i + 2 + length]
        if marker == 0xE0 and body.startswith(b"JFIF"):
            return True
        if marker == 0xEE and body.startswith(b"Adobe") and len(body) >= 12:
            return body[11] != 0
        if marker == 0xDA:  # start of scan: no more headers
            break
        i += 2 + length
    return False


_APERIO_MPP = re.compile(r"\|\s*MPP\s*=\s*([0-9.eE+-]+)")


def _microns_per_pixel(tf: tifffile.TiffFile, page: tifffile.TiffPage) -> float | None:
    """µm per level-0 pixel from Aperio, Philips or TIFF resolution tags; None if unknown."""
    candidates: list[float] = []
    match = _APERIO_MPP.search(page.description or "")
    if match:
        candidates.append(float(match.group(1)))
    if tf.is_philips:
        meta = tf.philips_metadata or ""
        spacing = re.search(r'Name="DICOM_PIXEL_SPACING"[^>]*>\s*"?([0-9.eE+-]+)', meta)
        if spacing:
            candidates.append(float(spacing.group(1)) * 1000.0)  # millimetres
    unit = page.tags.get("ResolutionUnit")
    xres = page.tags.get("XResolution")
    if unit is not None and xres is not None:
        num, den = xres.value
        pixels_per_unit = num / den if den else 0.0
        per_unit_um = {2: 25400.0, 3: 10000.0}.get(int(unit.value))
        if per_unit_um and pixels_per_unit > 0:
            candidates.append(per_unit_um / pixels_per_unit)
    for mpp in candidates:
        if _MPP_RANGE[0] <= mpp <= _MPP_RANGE[1]:
            return float(mpp)
    return None
