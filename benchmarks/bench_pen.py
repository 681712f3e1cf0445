"""Pen-mark rejection: ink kept as tissue, per ink colour, tuned and held out; tissue recall on real slides.

    python -m benchmarks.bench_pen [--slides 8]

Everything goes through :func:`wsi_xr.tissue_mask` with its defaults (auto threshold,
coarse pass), once with ``reject_pen=False`` and once with ``reject_pen=True``:

1. **Synthetic slides with scanner-like marker strokes** (:mod:`wsi_xr.datasets.ink`,
   JPEG quality 75 as scanners write): ``--slides`` slides with the four tuning colours
   (blue, green, red, black) and as many with the held-out colours (cyan, navy, orange,
   violet, pink), which the rule was not tuned on. Per colour: the ink-only tiles (ink
   truth >= 50 % of the tile, no tissue) and the share of them kept as tissue; the
   clean tissue tiles kept; tissue tiles with a little ink (<= 10 %) kept.
2. **Real tissue** (``$WSI_XR_TESTDATA``, default ``../shared/data``): recall against
   the colour-labelled truth of tests/data/truth, with and without pen rejection.
3. **Real tissue under synthetic ink**: CMU-1 with strokes laid over it (absorbance
   added), written again as a JPEG (quality 75) TIFF and read back: ink-only tiles kept
   and real tissue kept, for tuning and held-out colours.

Writes benchmarks/results/pen.json and pen.md.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import CACHE, HERE, markdown_table, save

TILE = 64
JPEG_QUALITY = 75
#: (width, height, tissue fraction) of the synthetic slides, in turn.
SIZES = [(2048, 2048, 0.3), (3072, 2048, 0.5), (2560, 2560, 0.2), (2560, 2560, 0.35)]
SIZES += [(2048, 3072, 0.25), (3072, 3072, 0.4), (2560, 2048, 0.3), (2048, 2048, 0.15)]
REAL_COLUMNS = ["recall (variance only)", "recall (reject_pen)", "false positives (variance only)", "false positives (reject_pen)"]


def masks(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Tile masks of a slide without and with pen rejection (wsi_xr defaults otherwise)."""
    import dask

    import wsi_xr

    with dask.config.set(scheduler="threads"):
        image = wsi_xr.open_slide(path)
        plain = wsi_xr.tissue_mask(image).compute()
        rejected = wsi_xr.tissue_mask(image, reject_pen=True).compute()
    return plain.tile_mask.values, rejected.tile_mask.values


class Tally:
    """Counts of tiles and of those kept as tissue without / with pen rejection."""

    def __init__(self) -> None:
        self.rows: dict[str, list[int]] = {}

    def add(self, key: str, where: np.ndarray, plain: np.ndarray, rejected: np.ndarray) -> None:
        counts = self.rows.setdefault(key, [0, 0, 0])
        counts[0] += int(where.sum())
        counts[1] += int(plain[where].sum())
        counts[2] += int(rejected[where].sum())

    def row(self, key: str, **extra: Any) -> dict[str, Any]:
        n, plain, rejected = self.rows.get(key, [0, 0, 0])
        share = (lambda k: round(k / n, 3)) if n else (lambda k: "")
        return {**extra, "tiles": n, "kept (variance only)": share(plain), "kept (reject_pen)": share(rejected)}


def synthetic(slides: int) -> list[dict[str, Any]]:
    from wsi_xr.datasets.ink import HELD_OUT_COLOURS, TUNING_COLOURS
    from wsi_xr.datasets.synth import ink_tile_fraction, tile_tissue_fraction, write_synthetic_slide

    folder = CACHE / "pen"
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for group, colours, strokes, first_seed in (("tuning", TUNING_COLOURS, 8, 1), ("held out", HELD_OUT_COLOURS, 10, 101)):
        tally = Tally()
        for i in range(slides):
            width, height, fraction = SIZES[i % len(SIZES)]
            seed = first_seed + i
            path = folder / f"pen-{group.replace(' ', '')}-{seed}.tif"
            spec = write_synthetic_slide(
                path, width, height, seed=seed, tissue_fraction=fraction, pen_strokes=strokes, pen_colours=colours, jpeg_quality=JPEG_QUALITY
            )
            plain, rejected = masks(path)
            tissue = tile_tissue_fraction(spec, TILE)
            ink = ink_tile_fraction(spec, TILE)
            per_colour = {c: ink_tile_fraction(spec, TILE, colour=c) for c in colours}
            inks_on_tile = sum((f > 0).astype(int) for f in per_colour.values())
            for colour, fraction_of_colour in per_colour.items():
                ink_only = (fraction_of_colour >= 0.5) & (tissue == 0)
                tally.add(colour, ink_only, plain, rejected)
                tally.add(colour + " (one ink)", ink_only & (inks_on_tile == 1), plain, rejected)
            tally.add("all ink-only", (ink >= 0.5) & (tissue == 0), plain, rejected)
            tally.add("clean tissue", (tissue >= 0.5) & (ink == 0), plain, rejected)
            tally.add("tissue, <= 10 % ink", (tissue >= 0.5) & (ink > 0) & (ink <= 0.1), plain, rejected)
        for colour in colours:
            rows.append(tally.row(colour, set=group, tiles_of=f"{colour} ink-only"))
            rows.append(tally.row(colour + " (one ink)", set=group, tiles_of=f"{colour} ink-only, no other ink"))
        rows.append(tally.row("all ink-only", set=group, tiles_of="ink-only, all colours"))
        rows.append(tally.row("clean tissue", set=group, tiles_of="clean tissue"))
        rows.append(tally.row("tissue, <= 10 % ink", set=group, tiles_of="tissue, <= 10 % ink"))
    return rows


def real(data: Path) -> list[dict[str, Any]]:
    rows = []
    for name in ("cmu-1-small-region.svs", "kidney-48-5.tif"):
        path = data / name
        truth_file = HERE.parent / "tests" / "data" / "truth" / f"{name}.npz"
        if not path.exists():
            print(f"skipping {name}: {path} not found")
            continue
        truth = np.load(truth_file)["tissue"]
        plain, rejected = masks(path)
        ny, nx = truth.shape
        plain, rejected = plain[:ny, :nx], rejected[:ny, :nx]
        tally = Tally()
        tally.add(name, truth, plain, rejected)
        row = tally.row(name, set="real", tiles_of=f"{name} tissue (truth)")
        row["recall (variance only)"] = row.pop("kept (variance only)")
        row["recall (reject_pen)"] = row.pop("kept (reject_pen)")
        row["false positives (variance only)"] = int((plain & ~truth).sum())
        row["false positives (reject_pen)"] = int((rejected & ~truth).sum())
        rows.append(row)
    return rows


def real_under_ink(data: Path) -> list[dict[str, Any]]:
    import tifffile

    from wsi_xr.datasets.ink import HELD_OUT_COLOURS, TUNING_COLOURS, ink_mask_region, ink_od_region, make_strokes

    path = data / "cmu-1-small-region.svs"
    if not path.exists():
        print(f"skipping CMU-1 under ink: {path} not found")
        return []
    pixels = np.ascontiguousarray(tifffile.imread(path, key=0)[..., :3])
    truth = np.load(HERE.parent / "tests" / "data" / "truth" / "cmu-1-small-region.svs.npz")["tissue"]
    height, width = pixels.shape[:2]
    ny, nx = truth.shape

    def on_tissue(x: np.ndarray, y: np.ndarray) -> np.ndarray:
        return truth[np.clip((y // TILE).astype(int), 0, ny - 1), np.clip((x // TILE).astype(int), 0, nx - 1)]

    rows = []
    folder = CACHE / "pen"
    folder.mkdir(parents=True, exist_ok=True)
    for group, colours, seeds in (("tuning", TUNING_COLOURS, (0, 1, 2)), ("held out", HELD_OUT_COLOURS, (10, 11, 12))):
        tally = Tally()
        for seed in seeds:
            strokes = make_strokes(np.random.default_rng(seed), width, height, 6, on_tissue, colours)
            od = ink_od_region(strokes, 0, 0, width, height)
            inked = pixels if od is None else np.clip(pixels * np.exp(-od).transpose(1, 2, 0) + 0.5, 0, 255).astype(np.uint8)
            out = folder / f"cmu-ink-{group.replace(' ', '')}-{seed}.tif"
            jpeg = {"compression": "jpeg", "compressionargs": {"level": JPEG_QUALITY}}  # YCbCr, 2 x 2 chroma subsampling
            tifffile.imwrite(out, inked, photometric="rgb", tile=(256, 256), metadata=None, **jpeg)
            plain, rejected = masks(out)
            plain, rejected = plain[:ny, :nx], rejected[:ny, :nx]
            ink = ink_mask_region(strokes, 0, 0, nx * TILE, ny * TILE).reshape(ny, TILE, nx, TILE).mean(axis=(1, 3))
            tally.add("ink-only", (ink >= 0.5) & ~truth, plain, rejected)
            tally.add("clean tissue", truth & (ink == 0), plain, rejected)
        rows.append(tally.row("ink-only", set=group, tiles_of="CMU-1 under ink: ink-only"))
        rows.append(tally.row("clean tissue", set=group, tiles_of="CMU-1 under ink: clean real tissue"))
    return rows


def main() -> None:
    import torch

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slides", type=int, default=8, help="synthetic slides per colour set (default 8)")
    args = parser.parse_args()
    from wsi_xr.tissue.pen import DEFAULT_PEN_RULE

    data = Path(os.environ.get("WSI_XR_TESTDATA", HERE.parent.parent / "shared" / "data"))
    synthetic_rows = synthetic(args.slides)
    real_rows = real(data)
    under_ink_rows = real_under_ink(data)
    columns = ["set", "tiles_of", "tiles", "kept (variance only)", "kept (reject_pen)"]
    table = "\n\n".join(
        [
            f"Pen rule {DEFAULT_PEN_RULE.attrs()['pen_rule']}; synthetic strokes at JPEG quality {JPEG_QUALITY}; "
            f"CPU capability {torch.backends.cpu.get_cpu_capability()} (the figures do not depend on it).",
            markdown_table(synthetic_rows, columns),
            markdown_table(real_rows, ["tiles_of", "tiles", *REAL_COLUMNS]),
            markdown_table(under_ink_rows, columns),
        ]
    )
    save("pen", {"rule": DEFAULT_PEN_RULE.attrs(), "synthetic": synthetic_rows, "real": real_rows, "real_under_ink": under_ink_rows}, table)


if __name__ == "__main__":
    main()
