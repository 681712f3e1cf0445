"""Tile truth for the real slides of ../shared/data, made independently of the variance rule.

    python -m tests.data.make_truth [--data ../shared/data] [--figures DIR]

A colour labelling, checked by eye (the figures this writes), for each real slide with whole
64-px tiles. How a tile is labelled (nothing here uses a variance):

1. Each pixel's optical density per channel, ``OD = -log10((I + 1) / 256)`` against the
   slide's glass (the 99th percentile of each channel, so the glass is OD 0).
2. A pixel is *stained* when the dye absorbs some colours more than others,
   ``max(OD) - min(OD) > CHROMA_OD``, and it is not glass, ``sum(OD) > DENSITY_OD``. Dust,
   hairs, smudges, shadows and pen-free glass are grey (equal OD in every channel) or faint, so
   they are not stained: the issue's rule that dust, smudges and faint shadows count as
   background.
3. Stained specks smaller than ``MIN_COMPONENT`` pixels (8-connected) are dropped: coloured
   dust, not tissue.
4. A tile is tissue when at least ``MIN_FRACTION`` of its pixels are stained.

Then every tile whose label differs from the auto threshold's tile mask was looked at in the
figure (``--figures``), and the labels were kept where the colour rule was right; a tile the
rule got wrong by eye would be overridden in ``OVERRIDES`` with the reason (none were needed:
see tests/data/truth/README.md for what was seen).

Writes tests/data/truth/<slide>.npz (``tissue``: bool (tile_y, tile_x); ``stained_fraction``:
float32) and tests/data/truth/README.md is kept by hand.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
TRUTH = HERE / "truth"
TILE = 64
CHROMA_OD = 0.06
DENSITY_OD = 0.12
MIN_COMPONENT = 64
MIN_FRACTION = 0.02
#: (slide name, tile_y index, tile_x index) -> (label, reason): hand corrections after looking.
OVERRIDES: dict[tuple[str, int, int], tuple[bool, str]] = {}


def stained_pixels(pixels: np.ndarray) -> np.ndarray:
    """Bool (h, w): pixels whose colour is stain (see the module's steps 1-3)."""
    from scipy import ndimage

    rgb = pixels[..., :3].astype(np.float64)
    glass = np.percentile(rgb.reshape(-1, 3), 99, axis=0)
    od = -np.log10((rgb + 1.0) / (glass + 1.0))
    od = np.clip(od, 0.0, None)
    stained = (od.max(axis=-1) - od.min(axis=-1) > CHROMA_OD) & (od.sum(axis=-1) > DENSITY_OD)
    labels, n = ndimage.label(stained, structure=np.ones((3, 3)))
    if n:
        sizes = np.bincount(labels.ravel())
        small = sizes < MIN_COMPONENT
        small[0] = False
        stained[small[labels]] = False
    return stained


def tile_truth(pixels: np.ndarray, name: str) -> tuple[np.ndarray, np.ndarray]:
    """(tissue, stained_fraction) per whole 64-px tile, with :data:`OVERRIDES` applied."""
    stained = stained_pixels(pixels)
    nty, ntx = stained.shape[0] // TILE, stained.shape[1] // TILE
    fraction = stained[: nty * TILE, : ntx * TILE].reshape(nty, TILE, ntx, TILE).mean(axis=(1, 3)).astype(np.float32)
    tissue = fraction >= MIN_FRACTION
    for (slide, i, j), (label, _) in OVERRIDES.items():
        if slide == name:
            tissue[i, j] = label
    return tissue, fraction


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=os.environ.get("WSI_XR_TESTDATA", str(HERE.parents[1].parent / "shared" / "data")))
    parser.add_argument("--figures", default=None, help="also draw each slide with truth and auto-threshold tiles here")
    args = parser.parse_args()
    import wsi_xr

    TRUTH.mkdir(exist_ok=True)
    rows = []
    for name in ("cmu-1-small-region.svs", "kidney-48-5.tif", "tiny-16px.svs"):
        path = Path(args.data) / name
        image = wsi_xr.open_slide(path)
        pixels = np.asarray(image.values)
        tissue, fraction = tile_truth(pixels, name)
        np.savez_compressed(TRUTH / f"{name}.npz", tissue=tissue, stained_fraction=fraction)
        computed = wsi_xr.tissue_mask(image).compute()
        mask = computed.tile_mask.values
        rows.append(
            {
                "slide": name,
                "tiles": int(tissue.size),
                "tissue (truth)": int(tissue.sum()),
                "threshold": round(float(computed.threshold), 2),
                "kept": int(mask.sum()),
                "recall": round(float((mask & tissue).sum() / max(tissue.sum(), 1)), 4) if tissue.any() else "-",
                "false positives": int((mask & ~tissue).sum()),
                "false-positive rate": round(float((mask & ~tissue).sum() / max((~tissue).sum(), 1)), 4),
            }
        )
        print(rows[-1])
        if args.figures and tissue.size:
            _figure(pixels, tissue, mask, Path(args.figures) / f"truth-{name}.png")
    import json

    results = HERE.parents[1] / "benchmarks" / "results"
    columns = list(rows[0])
    table = "\n".join(
        ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)] + ["| " + " | ".join(str(r[c]) for c in columns) + " |" for r in rows]
    )
    (results / "threshold-truth.md").write_text("Auto threshold against the colour truth (tests/data/truth/README.md)\n\n" + table + "\n")
    (results / "threshold-truth.json").write_text(json.dumps({"command": "python -m tests.data.make_truth", "rows": rows}, indent=2) + "\n")


def _figure(pixels: np.ndarray, tissue: np.ndarray, mask: np.ndarray, out: Path) -> None:
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    height, width = pixels.shape[:2]
    fig = Figure(figsize=(width / 100, height / 100), dpi=100)
    ax = fig.add_axes((0, 0, 1, 1))
    ax.imshow(pixels[..., :3], extent=(0, width, height, 0))
    for i, j in zip(*np.nonzero(tissue | mask)):
        colour = "lime" if tissue[i, j] and mask[i, j] else ("blue" if tissue[i, j] else "red")  # both / truth only / mask only
        ax.add_patch(Rectangle((j * TILE, i * TILE), TILE, TILE, fill=False, ec=colour, lw=1.0))
    ax.axis("off")
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)


if __name__ == "__main__":
    main()
