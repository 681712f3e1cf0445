"""wsi_xr against the pipeline a user would write with the usual tools, on the same slide and weights.

    python -m benchmarks.bench_peer [--sizes 16384,49152] [--rounds 2] [--previous 75c0752]

The peer is the CLAM/TRIDENT shape of "tissue tiles -> features" on a CPU:

1. OpenSlide opens the slide; the lowest level at least 1/64 of level 0 is read whole, its HSV
   saturation median-filtered and thresholded with Otsu (CLAM's segmentation);
2. 256² patches of level 0 with tissue in the low-level mask are listed;
3. a ``torch.utils.data.DataLoader`` with 2 worker processes reads each patch with OpenSlide's
   ``read_region`` (one handle per worker) and batches them;
4. the eager VAE2 (``model.features``, fp32, torch's default threads) encodes the 16 tiles of
   64² in every patch.

Against it, ``wsi-xr run SLIDE STORE`` (the default, a LocalCluster on this machine, or the
threaded scheduler when the job is small) and ``wsi-xr run --scheduler threads``, each in a
fresh process, alternated. With ``--previous``, the same ``wsi-xr run`` of that commit too
(from a git worktree), so old and new are compared in the same run. Every figure names the CPU
capability. Writes benchmarks/results/peer.json and .md (``--name`` for another name).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, cast

import numpy as np

from benchmarks.common import CACHE, HERE, markdown_table, save, synthetic_slide

MODULE = "benchmarks.bench_peer"
PATCH = 256
TILE = 64
FLOP_PER_TILE = 29.49e6  # VAE2's encoder and mu head (bench_scale's FlopCounterMode figure)


def _otsu(values: np.ndarray) -> float:
    """Otsu's threshold of uint8 values (the textbook between-class variance maximum)."""
    counts = np.bincount(values.ravel(), minlength=256).astype(np.float64)
    levels = np.arange(256, dtype=np.float64)
    weight_low = np.cumsum(counts)
    weight_high = weight_low[-1] - weight_low
    mean_low = np.cumsum(counts * levels) / np.maximum(weight_low, 1)
    mean_high = (np.sum(counts * levels) - np.cumsum(counts * levels)) / np.maximum(weight_high, 1)
    between = weight_low * weight_high * (mean_low - mean_high) ** 2
    return float(np.argmax(between))


def peer_patches(slide: str) -> list[tuple[int, int]]:
    """Level-0 corners of the 256² patches with tissue, found as CLAM does."""
    import openslide
    from PIL import Image, ImageFilter

    with openslide.OpenSlide(slide) as handle:
        width, height = handle.dimensions
        level = max((i for i, d in enumerate(handle.level_downsamples) if d <= 64), default=0)
        downsample = handle.level_downsamples[level]
        thumb = handle.read_region((0, 0), level, handle.level_dimensions[level]).convert("RGB")
    saturation = np.asarray(thumb.convert("HSV").getchannel("S").filter(ImageFilter.MedianFilter(7)))
    tissue = saturation > _otsu(saturation)
    patches = []
    for y in range(0, height - PATCH + 1, PATCH):
        for x in range(0, width - PATCH + 1, PATCH):
            y0, x0 = int(y / downsample), int(x / downsample)
            y1, x1 = max(y0 + 1, int((y + PATCH) / downsample)), max(x0 + 1, int((x + PATCH) / downsample))
            if tissue[y0:y1, x0:x1].any():
                patches.append((x, y))
    del Image
    return patches


class _Patches:
    """A map-style dataset: patch i read with OpenSlide's ``read_region``, one handle per worker."""

    def __init__(self, slide: str, corners: list[tuple[int, int]]) -> None:
        self.slide, self.corners = slide, corners
        self.handle: Any = None

    def __len__(self) -> int:
        return len(self.corners)

    def __getitem__(self, i: int) -> Any:
        import openslide
        import torch

        if self.handle is None:
            self.handle = openslide.OpenSlide(self.slide)
        region = self.handle.read_region(self.corners[i], 0, (PATCH, PATCH))
        return torch.from_numpy(np.asarray(region)[..., :3].copy())


def case_peer(slide: str, weights: str) -> dict[str, Any]:
    import torch

    from wsi_xr.models import load_vae

    start = time.perf_counter()
    corners = peer_patches(slide)
    segmented = time.perf_counter() - start
    model = load_vae(weights)
    loader = torch.utils.data.DataLoader(_Patches(slide, corners), batch_size=16, num_workers=2, persistent_workers=False)
    tiles = 0
    with torch.inference_mode():
        for batch in loader:  # (B, 256, 256, 3) uint8
            n = batch.shape[0]
            grid = batch.reshape(n, PATCH // TILE, TILE, PATCH // TILE, TILE, 3).permute(0, 1, 3, 5, 2, 4)
            x = grid.reshape(-1, 3, TILE, TILE).float() / 255.0
            model.features(x)
            tiles += x.shape[0]
    return {"seconds": time.perf_counter() - start, "segment_s": segmented, "patches": len(corners), "tiles_encoded": tiles}


def case_wsi_xr(slide: str, weights: str, store: str, scheduler: str | None, tree: str | None) -> dict[str, Any]:
    command = [sys.executable, "-m", "wsi_xr.cli", "run", slide, store, "--weights", weights, "--overwrite", "--quiet"]
    if scheduler:
        command += ["--scheduler", scheduler]
    env = dict(os.environ)
    if tree:
        env["PYTHONPATH"] = tree
    start = time.perf_counter()
    subprocess.run(command, check=True, capture_output=True, text=True, env=env, cwd=tree or HERE.parent)
    seconds = time.perf_counter() - start
    import zarr

    attrs = dict(zarr.open_group(store, mode="r").attrs)
    decoded = attrs.get("file_tiles_decoded"), attrs.get("file_tiles_total")
    fraction = decoded[0] / decoded[1] if decoded[0] is not None and decoded[1] else 1.0  # a release without the attrs: all
    return {"seconds": seconds, "tissue_tiles": int(attrs["tissue_tiles"]), "decoded_fraction": fraction}


def _case(*args: str) -> dict[str, Any]:
    """Run one case in a fresh process; its JSON result, with ``process_s``: that process's wall time."""
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", MODULE, *args], capture_output=True, text=True, cwd=HERE.parent)
    wall = time.perf_counter() - start
    if done.returncode:
        raise RuntimeError(f"{MODULE} {' '.join(args)} failed:\n{done.stderr[-3000:]}")
    return {**json.loads(done.stdout.strip().splitlines()[-1]), "process_s": wall}


#: Each stage's own limit, run as ``python -c`` in a fresh process with the tree under test
#: first on ``sys.path`` (so the previous release measures its own encoder): the fp32 peak (a
#: 4096² matrix product on every core, best of 5), the encoder alone as the pipeline runs it
#: (one torch thread per core, each encoding its half of 4096 tiles in batches of 64, best of
#: 3), the eager model (batch 256, torch's threads, best of 3), and decoding every level-0
#: pixel of the slide (threads, best of 2).
LIMITS = r"""
import json, sys, time
from concurrent.futures import ThreadPoolExecutor
import numpy as np, torch
import wsi_xr
from wsi_xr.models import encode_tiles, load_vae
cores = torch.get_num_threads()
def best(fn, n):
    fn(); times = []
    for _ in range(n):
        t = time.perf_counter(); fn(); times.append(time.perf_counter() - t)
    return min(times)
a = torch.rand(4096, 4096)
peak = 2 * 4096**3 / best(lambda: a @ a, 5) / 1e9
model = load_vae(sys.argv[2])
tiles = np.random.default_rng(0).integers(0, 256, (4096, 64, 64, 3), dtype=np.uint8)
halves = np.array_split(tiles, cores)
def half(x):
    torch.set_num_threads(1)
    return encode_tiles(model, x, batch_size=64)
def both():
    with ThreadPoolExecutor(cores) as pool:
        list(pool.map(half, halves))
alone = len(tiles) / best(both, 3)
torch.set_num_threads(cores)
x = torch.from_numpy(tiles[:1024]).permute(0, 3, 1, 2).float() / 255
def eager():
    with torch.inference_mode():
        for s in range(0, len(x), 256):
            model.features(x[s : s + 256])
eager_rate = len(x) / best(eager, 3)
image = wsi_xr.open_slide(sys.argv[1])
import dask
def decode():
    with dask.config.set(scheduler="threads"):
        image.data.map_blocks(lambda b: b[:1, :1, :1].copy(), chunks=(1, 1, 1), dtype=np.uint8).compute()
decode_s = best(decode, 2) if sys.argv[3] == "decode" else None
print(json.dumps({"peak_gflops": peak, "encoder_tiles_s": alone, "eager_tiles_s": eager_rate, "decode_s": decode_s,
                  "cpu": str(torch.backends.cpu.get_cpu_capability())}))
"""


def _limits(slide: str, weights: str, tree: str | None, decode: bool) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": tree or str(HERE.parent)}
    done = subprocess.run(
        [sys.executable, "-c", LIMITS, slide, weights, "decode" if decode else "-"], capture_output=True, text=True, env=env, cwd=tree or HERE.parent
    )
    if done.returncode:
        raise RuntimeError(f"limits ({tree or 'this tree'}) failed:\n{done.stderr[-3000:]}")
    return cast(dict[str, Any], json.loads(done.stdout.strip().splitlines()[-1]))


def _wall(command: list[str], tree: str | None) -> float:
    env = {**os.environ, "PYTHONPATH": tree} if tree else None
    start = time.perf_counter()
    subprocess.run(command, check=True, capture_output=True, env=env, cwd=tree or HERE.parent)
    return time.perf_counter() - start


def case_task_time(slide: str, weights: str, store: str) -> dict[str, Any]:
    """The thread-seconds of a run's chunk tasks (decode, statistics, encode, write) in this
    process, as ``wsi-xr run`` computes them (threads, one torch thread per task)."""
    from wsi_xr import _timing
    from wsi_xr.pipeline import process_slide

    _timing.reset_stage_seconds()
    process_slide(slide, store, weights=weights, overwrite=True, torch_threads="auto")
    return {"task_s": sum(_timing.stage_seconds().values()), "stages": _timing.stage_seconds()}


def fixed_costs(weights: str, tree: str | None, previous: str, rounds: int, scratch: str) -> list[dict[str, Any]]:
    """`wsi-xr --help` and `wsi-xr run` on CMU-1 (when the test data are there), this tree and
    ``tree``, alternated fresh processes; CMU-1's task time from :func:`case_task_time`."""
    data = Path(os.environ.get("WSI_XR_TESTDATA", HERE.parent.parent / "shared" / "data"))
    cmu = data / "cmu-1-small-region.svs"
    trees = {"this tree": None, **({previous: tree} if tree else {})}
    times: dict[str, list[float]] = {f"{name} {what}": [] for name in trees for what in ("--help", "CMU-1 run")}
    for _ in range(rounds):
        for name, t in trees.items():
            times[f"{name} --help"].append(_wall([sys.executable, "-m", "wsi_xr.cli", "--help"], t))
            if cmu.exists():
                store = str(Path(scratch) / "cmu.zarr")
                run = [sys.executable, "-m", "wsi_xr.cli", "run", str(cmu), store, "--weights", weights, "--overwrite", "--quiet"]
                times[f"{name} CMU-1 run"].append(_wall(run, t))
    rows = [{"what": what, "best_s": round(min(ts), 2), "runs": [round(t, 2) for t in ts]} for what, ts in times.items() if ts]
    if cmu.exists():
        task = _case("--case", "task_time", "--slide", str(cmu), "--weights", weights, "--store", str(Path(scratch) / "cmu-task.zarr"))
        best_run = min(times["this tree CMU-1 run"])
        rows.append({"what": "CMU-1 task time (thread-s of its chunk tasks)", "best_s": round(task["task_s"], 2), "runs": []})
        rows.append({"what": "CMU-1 run / task time", "best_s": round(best_run / task["task_s"], 1), "runs": []})
    return rows


def _previous_tree(commit: str) -> str:
    tree = CACHE / f"release-{commit}"
    if not tree.exists():
        subprocess.run(["git", "worktree", "add", "--detach", "-f", str(tree), commit], check=True, cwd=HERE.parent, capture_output=True)
    return str(tree)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--case")
    parser.add_argument("--slide")
    parser.add_argument("--weights")
    parser.add_argument("--store")
    parser.add_argument("--scheduler", default="")
    parser.add_argument("--tree", default="")
    parser.add_argument("--sizes", default="16384,49152")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--previous", default="", help="a commit whose `wsi-xr run` is timed too")
    parser.add_argument("--name", default="peer", help="results file name in benchmarks/results")
    parser.add_argument("--no-fixed-costs", dest="fixed_costs", action="store_false", help="skip `wsi-xr --help` and CMU-1")
    args = parser.parse_args()
    if args.case == "peer":
        print(json.dumps(case_peer(args.slide, args.weights)))
        return
    if args.case == "wsi_xr":
        print(json.dumps(case_wsi_xr(args.slide, args.weights, args.store, args.scheduler or None, args.tree or None)))
        return
    if args.case == "task_time":
        print(json.dumps(case_task_time(args.slide, args.weights, args.store)))
        return
    import torch

    from wsi_xr.models import default_weights_path

    capability = str(torch.backends.cpu.get_cpu_capability())
    weights = str(default_weights_path())
    tree = _previous_tree(args.previous) if args.previous else None
    variants: dict[str, list[str]] = {"wsi-xr run": [], "wsi-xr run --scheduler threads": ["--scheduler", "threads"]}
    if tree:
        variants[f"{args.previous} wsi-xr run"] = ["--tree", tree]
        variants[f"{args.previous} --scheduler threads"] = ["--tree", tree, "--scheduler", "threads"]
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-peer-") as scratch:
        for size in [int(s) for s in args.sizes.split(",") if s]:
            slide = str(synthetic_slide(size, 0.3))
            times: dict[str, list[float]] = {"peer": [], "peer_work": [], **{name: [] for name in variants}}
            peer: dict[str, Any] = {}
            ours: dict[str, Any] = {}
            limits = _limits(slide, weights, None, decode=True)
            old_limits = _limits(slide, weights, tree, decode=False) if tree else None
            for _ in range(args.rounds):  # alternated, fresh processes
                peer = _case("--case", "peer", "--slide", slide, "--weights", weights)
                # Both sides as a user runs them: a fresh process's wall time, Python's start
                # and imports included (`wsi-xr run` below is timed the same way); the peer's
                # time after its imports is kept as peer_work_s.
                times["peer"].append(peer["process_s"])
                times["peer_work"].append(peer["seconds"])
                for name, extra in variants.items():
                    store = str(Path(scratch) / f"{size}.zarr")
                    ours = _case("--case", "wsi_xr", "--slide", slide, "--weights", weights, "--store", store, *extra)
                    times[name].append(ours["seconds"])
            best = {name: min(t) for name, t in times.items()}
            row: dict[str, Any] = {
                "size": size,
                "cpu": capability,
                "peer_s": round(best["peer"], 2),
                "peer_work_s": round(best["peer_work"], 2),
                "peer_tiles": peer["tiles_encoded"],
                "wsi_xr_tissue_tiles": ours["tissue_tiles"],
                "peak GFLOP/s": round(limits["peak_gflops"]),
                "encoder alone tiles/s": round(limits["encoder_tiles_s"]),
                "encoder % of peak": round(100 * limits["encoder_tiles_s"] * FLOP_PER_TILE / 1e9 / limits["peak_gflops"], 1),
                "eager tiles/s": round(limits["eager_tiles_s"]),
                "encode limit s": round(ours["tissue_tiles"] / limits["encoder_tiles_s"], 2),
                "decode limit s": round(limits["decode_s"] * ours["decoded_fraction"], 2),
            }
            limit = row["encode limit s"] + row["decode limit s"]
            if old_limits:
                row[f"{args.previous} encoder alone tiles/s"] = round(old_limits["encoder_tiles_s"])
                row[f"{args.previous} eager tiles/s"] = round(old_limits["eager_tiles_s"])
            for name in variants:
                row[f"{name} s"] = round(best[name], 2)
                row[f"peer / {name}"] = round(best["peer"] / best[name], 2)
                row[f"{name} / limits"] = round(best[name] / limit, 2)
            row["runs"] = {name: [round(t, 2) for t in ts] for name, ts in times.items()}
            rows.append(row)
            print(json.dumps(row), flush=True)
        fixed = fixed_costs(weights, tree, args.previous, args.rounds, scratch) if args.fixed_costs else []
    columns = [c for c in rows[0] if c != "runs"] if rows else []
    note = (
        f"Fastest of {args.rounds} alternated fresh-process runs each, on 30%-tissue synthetic slides, CPU capability {capability}, "
        f"{os.cpu_count()} cores. Every time is a fresh process's wall time, Python's start and imports included "
        "(peer_work_s: the peer after its imports of torch and wsi_xr's model code). The peer encodes every 64² tile of its Otsu-selected 256² patches (peer_tiles); wsi_xr encodes "
        "its tissue tiles (wsi_xr_tissue_tiles). `peer / X` > 1: X is faster."
    )
    note += (
        " Limits, same run, fresh processes: `encode limit` = tissue tiles / the encoder alone (one torch thread per core, "
        "batch 64); `decode limit` = decoding all of level 0 x the share of the file's tiles the run decoded; "
        "`X / limits` = X's time / (encode + decode limit)."
    )
    table = markdown_table([{k: v for k, v in row.items() if k != "runs"} for row in rows], columns)
    if fixed:
        table += "\n\nFixed costs (fresh processes, best of the rounds):\n\n" + markdown_table(fixed, ["what", "best_s", "runs"])
    save(args.name, {"rows": rows, "fixed_costs": fixed, "cpu": capability, "rounds": args.rounds}, note + "\n\n" + table)


if __name__ == "__main__":
    main()
