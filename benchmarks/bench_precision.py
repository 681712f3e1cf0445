"""The error of ``precision="bf16"`` against exact fp32 ``mu``, on real and synthetic tissue tiles.

    python -m benchmarks.bench_precision [--weights W]

For the tissue tiles of ``cmu-1-small-region.svs`` (from ``$WSI_XR_TESTDATA``, default
``../shared/data``) and of a synthetic 4096² slide: max and mean absolute difference,
relative (Frobenius) error, and the smallest per-tile cosine similarity. Writes
benchmarks/results/precision.json and precision.md.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import HERE, markdown_table, save, synthetic_slide


def measure(weights: str | None) -> list[dict[str, Any]]:
    from wsi_xr.models import encode_tiles, load_vae
    from wsi_xr.sampling import sample_tissue_tiles

    data = Path(os.environ.get("WSI_XR_TESTDATA", HERE.parent.parent / "shared" / "data"))
    slides = {"cmu-1-small-region.svs (real H&E)": data / "cmu-1-small-region.svs", "synthetic 4096², 30% tissue": synthetic_slide(4096, 0.3)}
    model = load_vae(weights)
    rows = []
    for name, path in slides.items():
        if not Path(path).exists():
            print(f"skipping {name}: {path} not found")
            continue
        tiles, _ = sample_tissue_tiles([path], max_tiles=2000, seed=0)
        exact = encode_tiles(model, tiles, precision="fp32")
        fast = encode_tiles(model, tiles, precision="bf16")
        diff = np.abs(exact - fast)
        cosine = (exact * fast).sum(1) / np.linalg.norm(exact, axis=1) / np.linalg.norm(fast, axis=1)
        rows.append(
            {
                "tiles": name,
                "n": len(tiles),
                "mean_abs_mu": float(np.abs(exact).mean()),
                "max_abs_diff": float(diff.max()),
                "mean_abs_diff": float(diff.mean()),
                "relative_error": float(np.linalg.norm(exact - fast) / np.linalg.norm(exact)),
                "min_cosine": float(cosine.min()),
            }
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", default=None)
    args = parser.parse_args()
    rows = measure(args.weights)
    save(
        "precision",
        {"weights": args.weights or "default", "rows": rows},
        markdown_table(rows, ["tiles", "n", "mean_abs_mu", "max_abs_diff", "mean_abs_diff", "relative_error", "min_cosine"]),
    )


if __name__ == "__main__":
    main()
