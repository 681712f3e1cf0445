"""The error of ``precision="bf16"`` and ``"int8"`` against exact fp32 ``mu``, on real and synthetic tissue tiles.

    python -m benchmarks.bench_precision [--weights W]

For the tissue tiles of ``cmu-1-small-region.svs`` (from ``$WSI_XR_TESTDATA``, default
``../shared/data``) and of a synthetic 4096² slide, for each approximate precision: max and
mean absolute difference, relative (Frobenius) error, the smallest per-tile cosine
similarity, and the encoder's speed on those tiles against fp32 (one torch thread, best of 3;
the CPU capability is named). Writes benchmarks/results/precision.json and precision.md.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import HERE, markdown_table, save, synthetic_slide


def _tiles_per_s(encode: Any, tiles: np.ndarray) -> float:
    from benchmarks.common import timed

    return len(tiles) / float(timed(encode, repeat=3)["min_s"])


def measure(weights: str | None) -> list[dict[str, Any]]:
    import torch

    from wsi_xr.models import encode_tiles, load_vae
    from wsi_xr.models.vae import torch_threads_scope
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
        with torch_threads_scope(1):
            exact = encode_tiles(model, tiles, precision="fp32")
            exact_speed = _tiles_per_s(lambda: encode_tiles(model, tiles, precision="fp32"), tiles)
            for precision in ("bf16", "int8"):
                fast = encode_tiles(model, tiles, precision=precision)
                diff = np.abs(exact - fast)
                cosine = (exact * fast).sum(1) / np.linalg.norm(exact, axis=1) / np.linalg.norm(fast, axis=1)
                rows.append(
                    {
                        "tiles": name,
                        "precision": precision,
                        "n": len(tiles),
                        "mean_abs_mu": float(np.abs(exact).mean()),
                        "max_abs_diff": float(diff.max()),
                        "mean_abs_diff": float(diff.mean()),
                        "relative_error": float(np.linalg.norm(exact - fast) / np.linalg.norm(exact)),
                        "min_cosine": float(cosine.min()),
                        "speed_vs_fp32": round(_tiles_per_s(lambda p=precision: encode_tiles(model, tiles, precision=p), tiles) / exact_speed, 3),
                        "cpu": str(torch.backends.cpu.get_cpu_capability()),
                    }
                )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", default=None)
    parser.add_argument("--name", default="precision", help="results file name in benchmarks/results")
    args = parser.parse_args()
    rows = measure(args.weights)
    save(
        args.name,
        {"weights": args.weights or "default", "rows": rows},
        markdown_table(
            rows, ["tiles", "precision", "n", "mean_abs_mu", "max_abs_diff", "mean_abs_diff", "relative_error", "min_cosine", "speed_vs_fp32", "cpu"]
        ),
    )


if __name__ == "__main__":
    main()
