"""Throughput at real-slide scale on the CPU, against each stage's own limit and against
the previous release, all in one run.

    python -m benchmarks.bench_scale [--sizes 16384,49152] [--previous 0a09678]
                                     [--fractions 0.05,0.1,0.3,0.6] [--cohort 8] [--batch-rounds 3]

Every case runs in a fresh process (its own peak RSS, nothing cached), on the threaded
scheduler with one thread per core, on the same synthetic slides (30% tissue):

- ``decode``: every level-0 pixel decoded once (cuCIM, default chunks): the decode limit;
- ``encoder``: the encoder alone on preloaded tiles, as the pipeline runs it (one torch
  thread per worker thread, every core busy), fp32 and bf16, at each batch of
  ``BATCH_SWEEP``: the best is the encoder limit;
- ``batch``: the pipeline on a 16384² slide (``--batch-sweep-size``) at each batch of
  ``BATCH_SWEEP``, rounds alternated, its encoder's tissue tiles per encode
  thread-second (the default batch comes from this; ``--batch-sweep-only`` runs just this);
- ``peak``: the machine's own arithmetic limit: a 4096² matrix product with every core
  (fp32 and bf16 GFLOP/s, the fastest of 10), and the encoder's FLOPs per tile (torch's
  ``FlopCounterMode``). ``tissue tiles x FLOPs / peak`` is the least time any pipeline can take on this CPU,
  so ``previous / that`` bounds the speed-up any change can reach;
- ``pipeline``: ``wsi_xr.process_slide`` with its defaults (coarse skip, auto threshold),
  fp32 and bf16, with the thread-seconds of each stage (decode, statistics, encode,
  write) from the pipeline's own counters;
- ``previous``: the same call to the previous release, imported from a ``git worktree``
  of its commit (same venv, same slide, the same weights file), and the max difference
  of its latents;
- ``mask``: the tissue mask with and without the coarse skip on 16384² slides of several
  tissue fractions, with the TIFF tiles decoded; timed in a fresh process ("cold": the
  first mask of a session, imports included), and in one process after a mask of another
  slide, caches cleared before each, full and coarse alternated 7 times ("warm": what every
  further slide costs; the median of the 7 paired ratios, with their range), plus the
  thread-seconds of the Dask tasks (the decode and statistics work, without the serial
  parts);
- ``parquet``: peak traced memory (tracemalloc) of ``write_parquet`` on a cohort store of
  1 and of N slides (copies of one slide's group).

Writes benchmarks/results/scale.json and scale.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import CACHE, HERE, isolated, markdown_table, save, self_peak_mb, synthetic_slide

WORKERS = os.cpu_count() or 1
MODULE = "benchmarks.bench_scale"
#: Full/coarse mask pairs timed in one warm process (the median ratio is reported).
MASK_ROUNDS = 7
#: Encoder batch sizes compared, alone and in the 16384² pipeline (alternated rounds).
BATCH_SWEEP = {"fp32": (32, 64, 128), "bf16": (64, 128, 256)}


# ------------------------------------------------------------------ cases (one process each)


def _import_wsi_xr(tree: str | None) -> Any:
    if tree:
        sys.path.insert(0, tree)  # the previous release, from its own worktree
    import wsi_xr

    if tree:
        assert wsi_xr.__file__.startswith(tree), f"imported {wsi_xr.__file__}, not the release in {tree}"
    return wsi_xr


def case_decode(slide: str) -> dict[str, Any]:
    import dask

    wsi_xr = _import_wsi_xr(None)
    image = wsi_xr.open_slide(slide)
    start = time.perf_counter()
    with dask.config.set(scheduler="threads", num_workers=WORKERS):
        image.data.map_blocks(lambda b: b[:1, :1, :1].copy(), chunks=(1, 1, 1), dtype=np.uint8).compute()
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "megapixels": image.sizes["y"] * image.sizes["x"] / 1e6}


def case_encoder(n_tiles: int, precision: str, batch_size: int | None) -> dict[str, Any]:
    """The encoder alone, as the pipeline runs it: WORKERS threads, each encoding its share
    with one torch thread (the pipeline's torch threads = cores / Dask threads)."""
    from concurrent.futures import ThreadPoolExecutor

    import torch

    from wsi_xr.encode import model_ref, worker_model
    from wsi_xr.models import encode_tiles

    torch.set_num_threads(max(1, (os.cpu_count() or 1) // WORKERS))
    model = worker_model(model_ref(None))
    tiles = np.random.default_rng(0).integers(0, 256, (n_tiles, 64, 64, 3), dtype=np.uint8)
    parts = np.array_split(tiles, WORKERS)
    encode_tiles(model, tiles[:512], batch_size=batch_size, precision=precision)  # warm-up
    start = time.perf_counter()
    with ThreadPoolExecutor(WORKERS) as pool:
        list(pool.map(lambda part: encode_tiles(model, part, batch_size=batch_size, precision=precision), parts))
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "tiles_per_s": n_tiles / seconds}


def case_peak() -> dict[str, Any]:
    """Matrix-product GFLOP/s with every core (fp32, bf16) and the encoder's FLOPs per tile."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from wsi_xr.models import VAE2

    torch.set_num_threads(os.cpu_count() or 1)
    result: dict[str, Any] = {}
    side, repeats = 4096, 10
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        a, b = torch.rand(side, side, dtype=dtype), torch.rand(side, side, dtype=dtype)
        torch.mm(a, b)  # warm-up
        fastest = float("inf")
        for _ in range(repeats):  # a peak: the fastest product (a noisy machine only slows some)
            start = time.perf_counter()
            torch.mm(a, b)
            fastest = min(fastest, time.perf_counter() - start)
        result[f"matmul_{name}_gflops"] = 2 * side**3 / fastest / 1e9
    model, x = VAE2().eval(), torch.rand(64, 3, 64, 64)
    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        model.fc1(model.encoder(x))  # what the pipeline runs: the encoder and the mu head
    result["encoder_mflop_per_tile"] = counter.get_total_flops() / x.shape[0] / 1e6
    return result


def case_pipeline(slide: str, precision: str, tree: str | None, out: str, weights: str, batch_size: int | None = None) -> dict[str, Any]:
    import dask

    wsi_xr = _import_wsi_xr(tree)
    # this tree: torch threads as `wsi-xr run` sets them (0.2.0 set them itself, in every task's process)
    extra = {} if tree else {"precision": precision, "batch_size": batch_size, "torch_threads": "auto"}
    if not tree:
        from wsi_xr._timing import reset_stage_seconds

        reset_stage_seconds()
    start = time.perf_counter()
    with dask.config.set(scheduler="threads", num_workers=WORKERS):
        ds = wsi_xr.process_slide(slide, out, weights=weights, overwrite=True, progress=False, **extra)
    seconds = time.perf_counter() - start
    result: dict[str, Any] = {"seconds": seconds, "tissue_tiles": int(ds.attrs["tissue_tiles"]), "code": wsi_xr.__file__}
    if not tree:
        from wsi_xr._timing import stage_seconds

        result["stage_seconds"] = stage_seconds()
        result["file_tiles_decoded"] = ds.attrs["file_tiles_decoded"]
        result["file_tiles_total"] = ds.attrs["file_tiles_total"]
    return result


def case_compare(current: str, previous: str) -> dict[str, Any]:
    import xarray as xr
    import zarr

    a = xr.open_zarr(current)
    group = zarr.open_group(previous, mode="r")  # 0.1.0's layout: read its arrays directly
    mask_a = a.tile_mask.values
    mask_b = np.asarray(group["tile_mask"][...])
    both = mask_a & mask_b
    la = a.latent.values[both]
    lb = np.asarray(group["latent"][...])[both]
    return {
        "same_mask": bool((mask_a == mask_b).all()),
        "tiles_compared": int(both.sum()),
        "max_abs_latent_difference": float(np.abs(la - lb).max()) if both.any() else 0.0,
    }


def _timed_mask(wsi_xr: Any, path: str, coarse: str) -> tuple[float, Any]:
    """One tissue mask (threshold 100), caches cleared first: seconds and the result."""
    import dask

    from wsi_xr.readers import clear_caches

    clear_caches()
    start = time.perf_counter()
    with dask.config.set(scheduler="threads", num_workers=WORKERS):
        mask = wsi_xr.tissue_mask(wsi_xr.open_slide(path), coarse=coarse, threshold=100.0).compute()
    return time.perf_counter() - start, mask


def case_mask(slide: str, coarse: str) -> dict[str, Any]:
    """The first mask of a fresh process ("cold")."""
    wsi_xr = _import_wsi_xr(None)
    cold, mask = _timed_mask(wsi_xr, slide, coarse)
    return {
        "seconds": cold,
        "tiles_decoded": mask.attrs["file_tiles_decoded"],
        "tiles_total": mask.attrs["file_tiles_total"],
        "tissue_tiles": int(mask.tile_mask.sum()),
    }


def case_mask_pair(slide: str, rounds: int) -> dict[str, Any]:
    """Full vs coarse mask in one warm process, alternated ``rounds`` times (so a drift in
    the machine's speed hits both alike): median times, median of the paired ratios, and
    the Dask tasks' thread-seconds of one more run of each."""
    from dask.diagnostics import Profiler

    wsi_xr = _import_wsi_xr(None)
    for coarse in ("none", "auto"):  # another slide first: imports and first calls paid
        _timed_mask(wsi_xr, str(synthetic_slide(2048, 0.3)), coarse)
    times: dict[str, list[float]] = {"none": [], "auto": []}
    for _ in range(rounds):
        for coarse in times:
            times[coarse].append(_timed_mask(wsi_xr, slide, coarse)[0])
    work = {}
    for coarse in times:
        with Profiler() as profiler:
            _timed_mask(wsi_xr, slide, coarse)
        work[coarse] = sum(r.end_time - r.start_time for r in profiler.results)
    full, skip = np.array(times["none"]), np.array(times["auto"])
    return {
        "rounds": rounds,
        "full_warm_s": float(np.median(full)),
        "coarse_warm_s": float(np.median(skip)),
        "ratio_warm": float(np.median(skip / full)),
        "ratio_warm_spread": [float((skip / full).min()), float((skip / full).max())],
        "ratio_task_seconds": work["auto"] / work["none"],
    }


def case_parquet(store: str) -> dict[str, Any]:
    import tracemalloc

    from wsi_xr.pipeline import write_parquet

    out = Path(tempfile.mkdtemp()) / "rows.parquet"
    tracemalloc.start()
    start = time.perf_counter()
    rows = write_parquet(store, out)
    seconds = time.perf_counter() - start
    _, peak = tracemalloc.get_traced_memory()
    return {"rows": rows, "seconds": seconds, "traced_peak_mb": peak / 1e6}


# ----------------------------------------------------------------------------- the run


def previous_tree(commit: str) -> Path:
    """A git worktree of the previous release (made once, in benchmarks/.cache)."""
    tree = CACHE / f"release-{commit}"
    if not (tree / "wsi_xr").is_dir():
        CACHE.mkdir(parents=True, exist_ok=True)
        subprocess.run(["git", "worktree", "add", "--detach", str(tree), commit], cwd=HERE.parent, check=True, capture_output=True)
    return tree


def _cohort_store(single: Path, copies: int, folder: Path) -> Path:
    """A cohort store of ``copies`` groups, each a copy of one slide's results."""
    import zarr

    store = folder / f"cohort-{copies}.zarr"
    if store.exists():
        shutil.rmtree(store)
    root = zarr.open_group(store, mode="w", zarr_format=3)
    root.attrs["wsi_xr_cohort"] = {"layout": 2}
    for i in range(copies):
        shutil.copytree(single, store / f"slide-{i}")
    zarr.consolidate_metadata(store)
    return store


def batch_sweep(slide: str, rounds: int, work: Path, weights: str) -> list[dict[str, Any]]:
    """The pipeline's own encoder speed (its stage counter) per batch size, rounds alternated."""
    seen: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for _ in range(rounds):
        for precision, batches in BATCH_SWEEP.items():
            for batch in batches:
                p = isolated(
                    MODULE,
                    "pipeline",
                    "--slide",
                    slide,
                    "--precision",
                    precision,
                    "--batch-size",
                    str(batch),
                    "--out",
                    str(work / "batch.zarr"),
                    "--weights",
                    weights,
                )
                seen.setdefault((precision, batch), []).append(p)
    rows = []
    for (precision, batch), runs in seen.items():
        per_thread = [r["tissue_tiles"] / r["stage_seconds"]["encode"] for r in runs]  # tissue tiles per encode thread-second
        rows.append(
            {
                "precision": precision,
                "batch": batch,
                "encode_tiles_per_s_per_thread": float(np.median(per_thread)),
                "range": [round(min(per_thread)), round(max(per_thread))],
                "pipeline_s": float(np.median([r["seconds"] for r in runs])),
            }
        )
        print(f"batch {precision} {batch}: {rows[-1]}", flush=True)
    return rows


def run(
    sizes: list[int],
    fractions: list[float],
    previous: str | None,
    cohort: int,
    encoder_tiles: int,
    batch_rounds: int = 3,
    batch_sweep_size: int = 16384,
) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="bench-scale-"))
    from wsi_xr.models import default_weights_path

    weights = str(default_weights_path())  # the same weights for both releases: latents comparable
    rows: list[dict[str, Any]] = []
    payload: dict[str, Any] = {"workers": WORKERS, "sizes": sizes, "previous": previous, "rows": rows}
    tree = str(previous_tree(previous)) if previous else None
    peak = isolated(MODULE, "peak")
    payload.update({k: v for k, v in peak.items() if k != "peak_rss_mb"})
    for precision in ("fp32", "bf16"):
        ceiling = peak[f"matmul_{precision}_gflops"] * 1e3 / peak["encoder_mflop_per_tile"]
        payload[f"encoder_ceiling_{precision}_tiles_per_s"] = ceiling
    print(f"peak: {peak}", flush=True)
    for precision in ("fp32", "bf16"):
        alone = {
            batch: isolated(MODULE, "encoder", "--tiles", str(encoder_tiles), "--precision", precision, "--batch-size", str(batch))["tiles_per_s"]
            for batch in BATCH_SWEEP[precision]
        }
        payload[f"encoder_{precision}_by_batch"] = alone
        # the encoder's own limit: its best batch (before the sweep: the default batch's figure)
        payload[f"encoder_{precision}_tiles_per_s"] = max(alone.values())
        payload[f"encoder_{precision}_of_ceiling"] = max(alone.values()) / payload[f"encoder_ceiling_{precision}_tiles_per_s"]
        print(f"encoder alone {precision}: {alone} tiles/s by batch", flush=True)
    if batch_rounds:
        payload["batch_in_pipeline"] = batch_sweep(str(synthetic_slide(batch_sweep_size, 0.3)), batch_rounds, work, weights)
    for size in sizes:
        slide = str(synthetic_slide(size, 0.3))
        decode = isolated(MODULE, "decode", "--slide", slide)
        row: dict[str, Any] = {"size": size, "decode_mp_s": decode["megapixels"] / decode["seconds"]}
        megapixels = decode["megapixels"]
        for precision in ("fp32", "bf16"):
            out = str(work / f"{size}-{precision}.zarr")
            p = isolated(MODULE, "pipeline", "--slide", slide, "--precision", precision, "--out", out, "--weights", weights)
            stages = p["stage_seconds"]
            busy = sum(stages.values())
            row.update(
                {
                    f"{precision}_s": p["seconds"],
                    f"{precision}_tiles_per_s": p["tissue_tiles"] / p["seconds"],
                    f"{precision}_mp_s": megapixels / p["seconds"],
                    f"{precision}_peak_rss_mb": p["peak_rss_mb"],
                    f"{precision}_overlap": busy / (WORKERS * p["seconds"]),
                    **{f"{precision}_share_{k}": v / busy for k, v in stages.items()},
                }
            )
            row["tissue_tiles"] = p["tissue_tiles"]
            row["file_tiles_decoded_fraction"] = p["file_tiles_decoded"] / p["file_tiles_total"]
            print(f"{size}² {precision}: {p['seconds']:.1f} s, {p['tissue_tiles'] / p['seconds']:.0f} tiles/s, stages {stages}", flush=True)
        # the stages' own limits on this slide: decode the pixels the pipeline decodes,
        # encode its tissue-and-candidate tiles
        row["decode_limit_s"] = megapixels * row["file_tiles_decoded_fraction"] / row["decode_mp_s"]
        row["encode_limit_fp32_s"] = row["tissue_tiles"] / payload["encoder_fp32_tiles_per_s"]
        row["fp32_vs_decode_plus_encode_limits"] = (row["decode_limit_s"] + row["encode_limit_fp32_s"]) / row["fp32_s"]
        if tree:
            out = str(work / f"{size}-previous.zarr")
            old = isolated(MODULE, "pipeline", "--slide", slide, "--precision", "fp32", "--tree", tree, "--out", out, "--weights", weights)
            same = isolated(MODULE, "compare", "--current", str(work / f"{size}-fp32.zarr"), "--previous", out)
            row.update(
                {
                    "previous_s": old["seconds"],
                    "previous_peak_rss_mb": old["peak_rss_mb"],
                    "speedup_fp32": old["seconds"] / row["fp32_s"],
                    "speedup_bf16": old["seconds"] / row["bf16_s"],
                    # no pipeline can beat encoding its tissue tiles at the matrix-product peak
                    "max_speedup_fp32": old["seconds"] * payload["encoder_ceiling_fp32_tiles_per_s"] / row["tissue_tiles"],
                    "max_speedup_bf16": old["seconds"] * payload["encoder_ceiling_bf16_tiles_per_s"] / row["tissue_tiles"],
                    **same,
                }
            )
            print(f"{size}² previous ({old['code']}): {old['seconds']:.1f} s; {same}", flush=True)
        rows.append(row)
    if len(rows) > 1:
        payload["rss_ratio_largest_vs_smallest"] = rows[-1]["fp32_peak_rss_mb"] / rows[0]["fp32_peak_rss_mb"]
    coarse_rows = []
    for fraction in fractions:
        slide = str(synthetic_slide(16384, fraction))
        full = isolated(MODULE, "mask", "--slide", slide, "--coarse", "none")
        skip = isolated(MODULE, "mask", "--slide", slide, "--coarse", "auto")
        warm = isolated(MODULE, "mask_pair", "--slide", slide, "--rounds", str(MASK_ROUNDS))
        coarse_rows.append(
            {
                "tissue_fraction": fraction,
                "full_s": full["seconds"],
                "coarse_s": skip["seconds"],
                "ratio": skip["seconds"] / full["seconds"],
                **{k: v for k, v in warm.items() if k != "peak_rss_mb"},
                "tiff_tiles_decoded": skip["tiles_decoded"] / skip["tiles_total"],
                "tissue_tiles_full": full["tissue_tiles"],
                "tissue_tiles_coarse": skip["tissue_tiles"],
            }
        )
        print(
            f"mask at {fraction:.0%} tissue: coarse/full = {skip['seconds'] / full['seconds']:.2f} cold, "
            f"{warm['ratio_warm']:.2f} warm (median of {MASK_ROUNDS} pairs)",
            flush=True,
        )
    payload["coarse"] = coarse_rows
    if cohort:
        single = work / f"{sizes[0]}-fp32.zarr"
        one = isolated(MODULE, "parquet", "--store", str(_cohort_store(single, 1, work)))
        many = isolated(MODULE, "parquet", "--store", str(_cohort_store(single, cohort, work)))
        payload["parquet"] = {"slides_1": one, f"slides_{cohort}": many, "traced_peak_ratio": many["traced_peak_mb"] / one["traced_peak_mb"]}
        print(f"parquet: 1 slide {one['traced_peak_mb']:.1f} MB, {cohort} slides {many['traced_peak_mb']:.1f} MB traced peak", flush=True)
    shutil.rmtree(work, ignore_errors=True)
    return payload


def tables(payload: dict[str, Any]) -> str:
    columns = [
        "size",
        "tissue_tiles",
        "decode_mp_s",
        "fp32_s",
        "fp32_tiles_per_s",
        "fp32_mp_s",
        "bf16_s",
        "bf16_tiles_per_s",
        "previous_s",
        "speedup_fp32",
        "speedup_bf16",
        "max_speedup_fp32",
        "max_speedup_bf16",
        "max_abs_latent_difference",
        "same_mask",
        "fp32_peak_rss_mb",
        "previous_peak_rss_mb",
        "fp32_overlap",
        "fp32_vs_decode_plus_encode_limits",
    ]
    shares = ["size"] + sorted({k for r in payload["rows"] for k in r if "_share_" in k})
    text = [
        f"Encoder alone ({payload['workers']} threads): fp32 {payload['encoder_fp32_tiles_per_s']:.0f} tiles/s, "
        f"bf16 {payload['encoder_bf16_tiles_per_s']:.0f} tiles/s",
        "",
        f"Machine peak (4096² matrix product, {payload['workers']} threads): fp32 {payload['matmul_fp32_gflops']:.0f} GFLOP/s, "
        f"bf16 {payload['matmul_bf16_gflops']:.0f} GFLOP/s; encoder + mu head {payload['encoder_mflop_per_tile']:.2f} MFLOP per tile, "
        f"so at most {payload['encoder_ceiling_fp32_tiles_per_s']:.0f} (fp32) / {payload['encoder_ceiling_bf16_tiles_per_s']:.0f} (bf16) "
        f"tiles/s; the encoder alone reaches {payload['encoder_fp32_of_ceiling']:.0%} / {payload['encoder_bf16_of_ceiling']:.0%} of that. "
        "max_speedup_*: the previous release's time over the time to encode the tissue tiles at that peak, decode free.",
        "",
        markdown_table(payload["rows"], columns),
        "",
        "Stage shares of the pipeline's thread-seconds:",
        "",
        markdown_table(payload["rows"], shares),
        "",
        "Coarse skip vs tissue fraction (16384², mask only, threshold 100):",
        "",
        markdown_table(
            payload["coarse"],
            [
                "tissue_fraction",
                "full_s",
                "coarse_s",
                "ratio",
                "full_warm_s",
                "coarse_warm_s",
                "ratio_warm",
                "ratio_warm_spread",
                "ratio_task_seconds",
                "tiff_tiles_decoded",
                "tissue_tiles_full",
                "tissue_tiles_coarse",
            ],
        ),
    ]
    if "batch_in_pipeline" in payload:
        text += [
            "",
            "Encoder batch in the pipeline (30% tissue; tissue tiles per encode thread-second, median of the rounds):",
            "",
            markdown_table(payload["batch_in_pipeline"], ["precision", "batch", "encode_tiles_per_s_per_thread", "range", "pipeline_s"]),
            "",
            "Encoder alone by batch (tiles/s, 2 threads): "
            + "; ".join(f"{p} " + ", ".join(f"{b}: {v:.0f}" for b, v in payload[f"encoder_{p}_by_batch"].items()) for p in BATCH_SWEEP),
        ]
    if "rss_ratio_largest_vs_smallest" in payload:
        text += ["", f"Peak RSS, largest / smallest slide (fp32): {payload['rss_ratio_largest_vs_smallest']:.2f}"]
    if "parquet" in payload:
        p = payload["parquet"]
        text += [
            "",
            "Parquet of a cohort (traced peak memory of write_parquet): "
            + ", ".join(
                f"{k.replace('slides_', '')} slide(s) {v['traced_peak_mb']:.1f} MB ({v['rows']} rows)"
                for k, v in p.items()
                if k.startswith("slides_")
            )
            + f"; ratio {p['traced_peak_ratio']:.2f}",
        ]
    return "\n".join(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", default=None)
    parser.add_argument("--slide")
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--tree", default=None)
    parser.add_argument("--out")
    parser.add_argument("--coarse", default="auto")
    parser.add_argument("--rounds", type=int, default=MASK_ROUNDS)
    parser.add_argument("--weights", default=None)
    parser.add_argument("--store")
    parser.add_argument("--current")
    parser.add_argument("--previous", default="0a09678", help="commit of the previous release ('' to skip)")
    parser.add_argument("--tiles", type=int, default=20000)
    parser.add_argument("--batch-size", type=int, default=None, help="encoder batch (default: the pipeline's)")
    parser.add_argument("--sizes", default="16384,49152")
    parser.add_argument("--fractions", default="0.05,0.1,0.3,0.6")
    parser.add_argument("--cohort", type=int, default=8)
    parser.add_argument("--batch-rounds", type=int, default=3, help="rounds of the pipeline's batch sweep (0 to skip)")
    parser.add_argument("--batch-sweep-size", type=int, default=16384, help="slide side of the batch sweep")
    parser.add_argument("--batch-sweep-only", action="store_true", help="run only the batch sweep and print it")
    parser.add_argument("--name", default="scale")
    args = parser.parse_args()
    if args.case:
        cases = {
            "decode": lambda: case_decode(args.slide),
            "peak": case_peak,
            "encoder": lambda: case_encoder(args.tiles, args.precision, args.batch_size),
            "pipeline": lambda: case_pipeline(args.slide, args.precision, args.tree, args.out, args.weights, args.batch_size),
            "compare": lambda: case_compare(args.current, args.previous),
            "mask": lambda: case_mask(args.slide, args.coarse),
            "mask_pair": lambda: case_mask_pair(args.slide, args.rounds),
            "parquet": lambda: case_parquet(args.store),
        }
        result = cases[args.case]()
        result["peak_rss_mb"] = self_peak_mb()
        print(json.dumps(result))
        return
    if args.batch_sweep_only:
        from wsi_xr.models import default_weights_path

        rows = batch_sweep(
            str(synthetic_slide(args.batch_sweep_size, 0.3)),
            max(1, args.batch_rounds),
            Path(tempfile.mkdtemp(prefix="bench-batch-")),
            str(default_weights_path()),
        )
        print(markdown_table(rows, ["precision", "batch", "encode_tiles_per_s_per_thread", "range", "pipeline_s"]))
        return
    sizes = [int(s) for s in args.sizes.split(",") if s]
    fractions = [float(f) for f in args.fractions.split(",") if f]
    payload = run(sizes, fractions, args.previous or None, args.cohort, args.tiles, args.batch_rounds, args.batch_sweep_size)
    save(args.name, payload, tables(payload))


if __name__ == "__main__":
    main()
