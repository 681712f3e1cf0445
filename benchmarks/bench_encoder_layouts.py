"""Which encoder set-up is fastest, and how far each is from the plain eager model.

    python -m benchmarks.bench_encoder_layouts [--tiles 4096] [--rounds 3]

Memory layout (NCHW input and weights; channels-last input; channels-last input and
weights) x precision (fp32, bf16 autocast) x batch size x threading (the pipeline's
"2 Python threads x 1 torch thread" and "1 stream x 2 torch threads"), on real-looking
synthetic tissue tiles, in ``torch.inference_mode``. Each cell is the best of
``--rounds`` interleaved rounds (the least disturbed by other load), with the max
absolute difference of ``mu`` from the eager NCHW fp32 model. Writes
benchmarks/results/encoder_layouts.json and .md; the pipeline's defaults
(``wsi_xr.encode.INFERENCE_CHANNELS_LAST``, ``wsi_xr.models.vae.DEFAULT_BATCH_SIZE``)
come from this table.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import torch

from benchmarks.common import markdown_table, save

LAYOUTS = ("nchw", "channels-last input", "channels-last input+weights")


def _tiles(n: int) -> np.ndarray:
    from wsi_xr.datasets.synth import SynthSpec, render_region

    region = render_region(SynthSpec(2048, 2048, seed=5, tissue_fraction=0.6), 0, 0, 1024, 1024)[..., :3]
    unique = region.reshape(16, 64, 16, 64, 3).transpose(0, 2, 1, 3, 4).reshape(-1, 64, 64, 3)
    return np.ascontiguousarray(np.resize(unique, (n, 64, 64, 3)))


def _encoder(model: torch.nn.Module, layout: str, precision: str, batch: int) -> Callable[[np.ndarray], torch.Tensor]:
    channels_last = layout != "nchw"

    def encode(tiles: np.ndarray) -> torch.Tensor:
        out = []
        autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16")
        with torch.inference_mode(), autocast:
            for start in range(0, len(tiles), batch):
                x = torch.from_numpy(tiles[start : start + batch]).permute(0, 3, 1, 2)
                x = x.to(torch.float32, memory_format=torch.channels_last) if channels_last else x.float().contiguous()
                out.append(model.features(x.div_(255.0)).float())
        return torch.cat(out)

    return encode


def run(n_tiles: int, rounds: int, batches: list[int]) -> list[dict[str, Any]]:
    from wsi_xr.models import load_vae

    tiles = _tiles(n_tiles)
    models = {
        "nchw": load_vae(),
        "channels-last input": load_vae(),
        "channels-last input+weights": load_vae().to(memory_format=torch.channels_last),
    }
    torch.set_num_threads(2)
    reference = _encoder(models["nchw"], "nchw", "fp32", 256)(tiles)
    cells = [
        (layout, precision, batch, threading)
        for precision in ("fp32", "bf16")
        for layout in LAYOUTS
        for batch in batches
        for threading in ("2 threads x 1", "1 x 2 torch threads")
    ]
    best: dict[tuple[str, str, int, str], dict[str, Any]] = {}
    for _ in range(rounds):
        for layout, precision, batch, threading in cells:
            encode = _encoder(models[layout], layout, precision, batch)
            if threading.startswith("2 threads"):
                torch.set_num_threads(1)
                parts = np.array_split(tiles, 2)

                def go() -> torch.Tensor:
                    with ThreadPoolExecutor(2) as pool:
                        return torch.cat(list(pool.map(encode, parts)))
            else:
                torch.set_num_threads(2)

                def go() -> torch.Tensor:
                    return encode(tiles)

            go()  # warm-up: oneDNN prepares its kernels per shape
            start = time.perf_counter()
            mu = go()
            rate = n_tiles / (time.perf_counter() - start)
            key = (layout, precision, batch, threading)
            if key not in best or rate > best[key]["tiles_per_s"]:
                best[key] = {
                    "layout": layout,
                    "precision": precision,
                    "batch": batch,
                    "threading": threading,
                    "tiles_per_s": rate,
                    "max_abs_diff_vs_eager_fp32": float((mu - reference).abs().max()),
                }
    return sorted(best.values(), key=lambda r: -r["tiles_per_s"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiles", type=int, default=4096)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batches", default="64,128,256")
    args = parser.parse_args()
    rows = run(args.tiles, args.rounds, [int(b) for b in args.batches.split(",")])
    save(
        "encoder_layouts",
        {"tiles": args.tiles, "rounds": args.rounds, "rows": rows},
        markdown_table(rows, ["precision", "layout", "batch", "threading", "tiles_per_s", "max_abs_diff_vs_eager_fp32"]),
    )


if __name__ == "__main__":
    main()
