"""Pen-mark (marker ink) rejection: a per-tile kernel on the block the variance kernel sees.

Pathologists' marker ink on the coverslip has a high pixel variance, so the reference
variance rule takes it for tissue. This module flags the tiles that ink covers, from
the same ``(h, w, 3)`` uint8 block as :func:`wsi_xr.tissue.kernels.block_statistics`
(no extra read), with array-API operations on the block's own namespace only: it runs
on NumPy, CuPy and array_api_strict arrays alike and never imports CuPy.

The colour rule (per pixel, in optical density)
-----------------------------------------------
Each sample is turned into absorbance per channel, ``OD_c = ln(256 / (v_c + 1))`` (0 for
white, 5.5 for black), float32. Stains and inks multiply the light, so in OD they add,
and a colour is a direction: comparisons below are between channels of one pixel, so
they do not depend on how dense the stain is or on the slide's white level.

Both H&E stains absorb **green** most: eosin (pink) absorbs green strongly and blue
less; haematoxylin (purple-blue) absorbs red and green about equally and blue less.
On ``cmu-1-small-region.svs`` (real H&E), ``OD_G`` is the largest channel on 95 % of
the stained pixels of its tissue tiles. Marker inks break that pattern:

* **cool ink** (blue, green, teal, violet): red is absorbed more than green,
  ``OD_R - OD_G >= cool`` (0.30). On CMU-1, 95 % of dense purple (haematoxylin)
  pixels have ``OD_R - OD_G <= +0.18`` (median -0.44); the blue marker of
  :mod:`wsi_xr.datasets.ink` sits at +0.55 per unit density, green at +0.95.
* **warm ink** (yellow, orange, yellow-green): blue is absorbed more than green,
  ``OD_B - OD_G >= warm`` (0.25); H&E does not do this.
* **red ink**: dense and saturated, red light passes while green *and* blue are both
  absorbed: ``OD_G >= red_green`` (0.9, G <= 103), ``OD_B >= red_blue * OD_G`` (0.72)
  and ``OD_R <= red_red * OD_G`` (0.30). Eosin is pink because it lets more blue
  through: CMU-1's dense pink pixels have ``OD_B / OD_G`` 0.43-0.74 (5-95 %, median
  0.59) and ``OD_R / OD_G`` 0.21-0.59, so some single dense red-pink pixels do pass,
  but not a tile's worth. A rose/pink ink with ``OD_B / OD_G`` under
  0.72 is not told apart from eosin by colour: that is the rule's known blind spot.
* **black ink**: dark and neutral, ``OD_G >= black_green`` (1.0, G <= 93) with
  ``OD_B`` and ``OD_R`` both ``>= black_ratio * OD_G`` (0.8). Dark haematoxylin is
  dark too but bluish: CMU-1's pixels with ``OD_G >= 1`` have ``OD_B / OD_G``
  0.44-0.75 (median 0.59).

A sample is **stained** (not glass) when its largest ``OD_c >= stained`` (0.25, i.e.
some channel <= 198). The thresholds were set against ``cmu-1-small-region.svs`` (real
H&E): of the stained pixels of its 720 tissue tiles, cool flags 1.6 % (the tiles with
most of them hold the teal material on its margins, i.e. tissue-marking dye), red
0.9 %, black 0.5 %, warm 0.07 %; 2.8 % in all. Single pixels of real tissue can look
like ink: the tile rule below is what keeps tissue.

The tile rule
-------------
Per ``tile`` x ``tile`` tile, over its samples: the tile is **pen** when ink is at
least ``min_share`` (0.5) of its stained samples *and* at least ``min_fraction``
(0.01, 3 of 256 samples) of all its samples. Ink is then most of what is on the tile:
a glass tile crossed by the edge of a stroke is pen (the variance rule would call it
tissue), a tissue tile with a little ink on it stays tissue, and two stray ink-like
samples never make a pen tile. On CMU-1 no tissue tile with real tissue on it comes
near: the largest ink share among tiles with >= 20 % stained samples is 0.40 (teal
dye on the margin); the one tile flagged is a speck of dye on glass (4 % stained).

Sampling: one pixel per ``stride`` x ``stride`` cell (``stride`` 4: 256 samples in a
64-px tile), the one nearest the cell's centre. Marker strokes are hundreds of pixels
wide at level 0, so a tile decision loses little (an ink line thinner than the stride
can fall between samples), and the kernel costs about half the variance kernel
instead of ~10x; ``stride=1`` scores every pixel.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import asdict, dataclass
from typing import Any

from wsi_xr.errors import InvalidArgumentError
from wsi_xr.tissue.kernels import array_namespace

__all__ = ["DEFAULT_PEN_RULE", "PenRule", "ink_fractions", "ink_pixels", "pen_tiles"]

#: ``ln(256)``: the OD of a 0 value (``OD = ln(256) - ln(v + 1)``).
_LN256 = math.log(256.0)
#: Version tag of the colour rule, recorded in attrs with its numbers.
PEN_RULE_VERSION = "od-v1"


@dataclass(frozen=True)
class PenRule:
    """Thresholds of the ink colour rule and the pen-tile rule (see the module docstring).

    Parameters
    ----------
    cool : float
        Cool ink (blue/green) when ``OD_R - OD_G >= cool``.
    warm : float
        Warm ink (yellow/orange) when ``OD_B - OD_G >= warm``.
    red_green, red_blue, red_red : float
        Red ink when ``OD_G >= red_green``, ``OD_B >= red_blue * OD_G`` and
        ``OD_R <= red_red * OD_G``.
    black_green, black_ratio : float
        Black ink when ``OD_G >= black_green`` and ``OD_B``, ``OD_R >= black_ratio * OD_G``.
    stained : float
        A sample is stained (not glass) when its largest ``OD_c >= stained``.
    min_share : float
        A tile is pen when its ink samples are at least ``min_share`` of its stained
        samples ...
    min_fraction : float
        ... and at least ``min_fraction`` of all its samples.
    stride : int
        Sample every ``stride``-th pixel along each axis (1: every pixel). Must divide
        the tile size.

    Raises
    ------
    InvalidArgumentError
        If a value is out of range.
    """

    cool: float = 0.30
    warm: float = 0.25
    red_green: float = 0.9
    red_blue: float = 0.72
    red_red: float = 0.30
    black_green: float = 1.0
    black_ratio: float = 0.8
    stained: float = 0.25
    min_share: float = 0.5
    min_fraction: float = 0.01
    stride: int = 4

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():
            if name == "stride":
                if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < 1:
                    raise InvalidArgumentError(f"stride={value!r}: give a positive integer (1 samples every pixel).")
                continue
            if not isinstance(value, numbers.Real) or isinstance(value, bool) or not math.isfinite(value) or value < 0:
                raise InvalidArgumentError(f"{name}={value!r}: give a finite number >= 0 (default {getattr(PenRule, name)}).")
        for name in ("min_share", "min_fraction", "red_blue", "red_red", "black_ratio"):
            if getattr(self, name) > 1:
                raise InvalidArgumentError(f"{name}={getattr(self, name)!r}: a share/ratio, give a number in [0, 1].")

    def attrs(self) -> dict[str, Any]:
        """The rule as flat attrs for a mask Dataset: ``{"pen_rule": "od-v1", "pen_cool": 0.3, ...}``."""
        return {"pen_rule": PEN_RULE_VERSION, **{f"pen_{k}": v for k, v in asdict(self).items()}}


#: The rule used when none is given.
DEFAULT_PEN_RULE = PenRule()


def ink_pixels(pixels: Any, rule: PenRule = DEFAULT_PEN_RULE) -> tuple[Any, Any]:
    """Per-pixel ink and stained masks of uint8 RGB pixels.

    Parameters
    ----------
    pixels
        ``(..., 3)`` uint8 array (any array-API namespace).
    rule
        Thresholds (:class:`PenRule`; its tile fields are not used here).

    Returns
    -------
    (ink, stained)
        bool arrays of ``pixels.shape[:-1]`` in the same namespace.
    """
    xp = array_namespace(pixels)
    # One contiguous float32 plane per channel: elementwise work on channel-strided views
    # and reductions over a length-3 axis are several times slower (NumPy).
    r, g, b = (_LN256 - xp.log(xp.astype(pixels[..., c], xp.float32) + 1.0) for c in range(3))
    cool = (r - g) >= rule.cool
    warm = (b - g) >= rule.warm
    red = (g >= rule.red_green) & (b >= rule.red_blue * g) & (r <= rule.red_red * g)
    black = (g >= rule.black_green) & (b >= rule.black_ratio * g) & (r >= rule.black_ratio * g)
    stained = xp.maximum(xp.maximum(r, g), b) >= rule.stained
    return cool | warm | red | black, stained


def _check(block: Any, tile: int, rule: PenRule) -> None:
    if not isinstance(tile, numbers.Integral) or isinstance(tile, bool) or tile <= 0:
        raise InvalidArgumentError(f"tile={tile!r}: must be a positive integer number of pixels.")
    if tile % rule.stride:
        raise InvalidArgumentError(f"stride={rule.stride} does not divide tile={tile}; use a PenRule with a stride that divides it (e.g. 4 or 1).")
    shape = getattr(block, "shape", None)
    if shape is None or len(shape) != 3 or shape[2] != 3:
        raise InvalidArgumentError(f"block of shape {shape}: give (h, w, 3) RGB pixels (drop alpha first).")
    xp = array_namespace(block)
    if block.dtype != xp.uint8:
        raise InvalidArgumentError(f"block dtype {block.dtype}: give uint8 pixels, as the slide reader returns them.")


def ink_fractions(block: Any, tile: int, rule: PenRule | None = None) -> tuple[Any, Any]:
    """Per-tile fractions of ink samples and of stained (non-glass) samples.

    Parameters
    ----------
    block
        ``(h, w, 3)`` uint8 pixels (NumPy, CuPy or any array-API array), the block the
        variance kernel gets; its top-left corner is a tile corner.
    tile
        Tile side in pixels, a multiple of ``rule.stride``. Rows/columns past the last
        full tile are ignored (as in :func:`~wsi_xr.tissue.kernels.tile_moments`).
    rule
        Thresholds; :data:`DEFAULT_PEN_RULE` when ``None``.

    Returns
    -------
    (ink, stained)
        float32 ``(h // tile, w // tile)`` each, in the block's namespace: the share of
        the tile's samples that are ink, and that are stained (ink is stained too,
        except a faint ink sample below ``rule.stained``).

    Raises
    ------
    InvalidArgumentError
        If the block is not ``(h, w, 3)`` uint8 or the stride does not divide ``tile``.
    """
    rule = DEFAULT_PEN_RULE if rule is None else rule
    _check(block, tile, rule)
    xp = array_namespace(block)
    nty, ntx = block.shape[0] // tile, block.shape[1] // tile
    if nty == 0 or ntx == 0:
        empty = xp.zeros((nty, ntx), dtype=xp.float32)
        return empty, empty
    step = rule.stride
    first = step // 2  # the sample nearest the centre of each step x step cell
    samples = block[first : nty * tile : step, first : ntx * tile : step, :]
    ink, stained = ink_pixels(samples, rule)
    per = tile // step
    scale = 1.0 / float(per * per)

    def per_tile(mask: Any) -> Any:
        counts = xp.sum(xp.reshape(xp.astype(mask, xp.int32), (nty, per, ntx, per)), axis=(1, 3))
        return xp.astype(counts, xp.float32) * scale

    return per_tile(ink), per_tile(stained)


def pen_tiles(block: Any, tile: int, rule: PenRule | None = None) -> Any:
    """Tiles covered by marker ink: bool ``(h // tile, w // tile)`` in the block's namespace.

    A tile is pen when ink samples are at least ``rule.min_share`` of its stained
    samples and at least ``rule.min_fraction`` of all its samples (see the module
    docstring for the colour rule). Use as ``tile_mask & ~pen`` after the variance rule.

    Parameters
    ----------
    block
        ``(h, w, 3)`` uint8 pixels, the same block :func:`block_statistics` gets.
    tile
        Tile side in pixels, a multiple of ``rule.stride``.
    rule
        Thresholds; :data:`DEFAULT_PEN_RULE` when ``None``.

    Returns
    -------
    Any
        bool ``(h // tile, w // tile)``.

    Raises
    ------
    InvalidArgumentError
        If the block is not ``(h, w, 3)`` uint8 or the stride does not divide ``tile``.
    """
    rule = DEFAULT_PEN_RULE if rule is None else rule
    ink, stained = ink_fractions(block, tile, rule)
    return (ink >= rule.min_share * stained) & (ink >= rule.min_fraction)
