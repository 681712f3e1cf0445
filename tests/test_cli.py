"""The ``wsi-xr`` commands end to end: info, synth, train, plot-recon, demo."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import xarray as xr

from wsi_xr.models import encode_tiles, load_vae, read_metadata

CLI = [sys.executable, "-m", "wsi_xr.cli"]
PNG = b"\x89PNG\r\n\x1a\n"


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(CLI + list(args), capture_output=True, text=True, timeout=600)


def test_info_json(cmu: Path) -> None:
    out = run("info", str(cmu), "--json")
    assert out.returncode == 0, out.stderr
    info = json.loads(out.stdout)
    assert info["vendor"] == "aperio" and info["backend"] == "cucim" and abs(info["mpp"] - 0.499) < 1e-9
    assert info["levels"][0] == {
        "level": 0,
        "width": 2220,
        "height": 2967,
        "downsample": 1.0,
        "tile_width": 240,
        "tile_height": 240,
        "compression": "jpeg",
    }
    text = run("info", str(cmu))
    assert "2220 x 2967" in text.stdout and "240x240" in text.stdout


def test_synth_then_train_then_plot_recon(tmp_path: Path) -> None:
    slide = tmp_path / "s.tif"
    assert run("synth", str(slide), "--width", "1536", "--height", "1536", "--seed", "4", "--quiet").returncode == 0
    weights = tmp_path / "w.pt"
    trained = run("train", str(slide), "--out", str(weights), "--epochs", "2", "--max-tiles", "96", "--batch-size", "32", "--seed", "1", "--quiet")
    assert trained.returncode == 0, trained.stderr
    assert "validation loss" in trained.stdout
    meta = read_metadata(weights)["training"]
    assert meta["epochs"] == 2 and meta["n_train"] + meta["n_val"] == 96 and meta["slides"] == ["s.tif"]
    mu = encode_tiles(load_vae(weights), np.full((2, 64, 64, 3), 200, dtype=np.uint8))
    assert mu.shape == (2, 32) and np.isfinite(mu).all()
    figure = tmp_path / "recon.png"
    drawn = run("plot-recon", str(weights), str(slide), "--out", str(figure), "--n", "6")
    assert drawn.returncode == 0, drawn.stderr
    assert figure.read_bytes()[:8] == PNG
    glass = run("plot-recon", str(weights), str(slide), "--out", str(tmp_path / "none.png"), "--region", "0,0,64,64")
    assert glass.returncode == 2 and "within the given regions" in glass.stderr  # the region is what is sampled
    held = run("plot-recon", str(weights), str(slide), "--out", str(figure), "--n", "4", "--region", "0,768,1536,768")
    assert held.returncode == 0, held.stderr


def test_train_fine_tunes_from_weights_on_shifted_windows(tmp_path: Path, synth_slide: Path) -> None:
    """`train --init W --stride S`: starts from W (its first validation loss is W's, far
    below a fresh model's), trains on the grid tiles and their shifted windows, records both."""
    import torch

    from wsi_xr.models import VAE2, weights
    from wsi_xr.models.train import _evaluate
    from wsi_xr.sampling import sample_tissue_tiles

    start = Path(weights.__file__).parent / weights.DEFAULT_WEIGHTS_NAME
    tuned = tmp_path / "tuned.pt"
    done = run(
        "train",
        str(synth_slide),
        "--out",
        str(tuned),
        "--epochs",
        "1",
        "--max-tiles",
        "256",
        "--batch-size",
        "64",
        "--stride",
        "16",
        "--init",
        str(start),
        "--lr",
        "1e-5",
        "--loss",
        "mse",
        "--quiet",
    )
    assert done.returncode == 0, done.stderr
    meta = read_metadata(tuned)["training"]
    assert meta["stride"] == 16 and meta["init"] == weights.DEFAULT_WEIGHTS_NAME and meta["tiles"] == 256
    tiles, origins = sample_tissue_tiles([synth_slide], max_tiles=256, seed=0, stride=16)
    assert sum(bool(o["x"] % 64 or o["y"] % 64) for o in origins) > 128  # mostly shifted windows
    val_idx = np.sort(np.random.default_rng(0).permutation(len(tiles))[: meta["n_val"]])  # train_vae's split
    evaluate = dict(batch_size=64, device=torch.device("cpu"), kl_weight=1.0, loss="mse")
    torch.manual_seed(0)
    from_start = _evaluate(load_vae(start), tiles, val_idx, **evaluate)
    torch.manual_seed(0)
    fresh = _evaluate(VAE2(), tiles, val_idx, **evaluate)
    assert from_start < fresh / 5
    assert abs(meta["initial_val_loss"] - from_start) < 0.02 * from_start  # z is sampled: not bit-equal
    bad = run("train", str(synth_slide), "--out", str(tmp_path / "x.pt"), "--stride", "48", "--quiet")
    assert bad.returncode == 2 and "stride=48" in bad.stderr


def test_demo_writes_everything(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    done = run("demo", "--out", str(out), "--size", "2048")
    assert done.returncode == 0, done.stderr
    ds = xr.open_zarr(out / "result.zarr")
    assert ds.wsi.attrs["complete"] is True and ds.attrs["tissue_tiles"] > 0
    rows = pd.read_parquet(out / "tiles.parquet")
    assert len(rows) == ds.attrs["tissue_tiles"] and list(rows.columns[:2]) == ["x", "y"]
    for name in ("mask-overlay.png", "latent-map.png"):
        assert (out / name).read_bytes()[:8] == PNG
    assert str(out / "result.zarr") in done.stdout


def test_run_checks_everything_before_starting_a_cluster(tmp_path: Path, synth_slide: Path) -> None:
    """Bad options, a missing slide or bad weights fail at once, before any Dask cluster
    starts (no dashboard line), and leave nothing behind."""
    out = tmp_path / "o.zarr"
    junk = tmp_path / "junk.pt"
    junk.write_text("not a model")
    cases = {
        "chunk not a multiple of the patch": ([str(synth_slide), str(out), "--chunk", "300"], "multiples of patch=256"),
        "missing slide": ([str(tmp_path / "nope.svs"), str(out)], "nope.svs"),
        "bad weights": ([str(synth_slide), str(out), "--weights", str(junk)], "junk.pt"),
    }
    for name, (args, message) in cases.items():
        run = subprocess.run(CLI + ["run", *args], capture_output=True, text=True, timeout=120)
        assert run.returncode == 2, (name, run.stderr)
        assert message in run.stderr and "Traceback" not in run.stderr, (name, run.stderr)
        assert "dashboard" not in run.stderr.lower(), f"{name}: a cluster was started before the arguments were checked"
        assert not out.exists()


def test_slide_dependent_options_are_checked_without_reading_pixels(synth_slide: Path) -> None:
    import pytest

    from wsi_xr import InvalidArgumentError
    from wsi_xr.pipeline import RunOptions, check_slide_options
    from wsi_xr.readers import open_file, read_stats, reset_read_stats

    reset_read_stats()
    with pytest.raises(InvalidArgumentError, match=r"level=9 does not exist; the slide has levels 0\.\."):
        check_slide_options(open_file(synth_slide), RunOptions(level=9))
    assert read_stats().calls == 0


def test_bench_exits_non_zero_when_every_case_fails(synth_slide: Path, tmp_path: Path) -> None:
    run = subprocess.run(
        CLI + ["bench", str(synth_slide), "--chunks", "300", "--stage", "mask", "--repeat", "1"], capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 1 and "every case failed" in run.stderr, run.stderr
    ok = subprocess.run(
        CLI + ["bench", str(synth_slide), "--chunks", "512", "--stage", "read", "--repeat", "1"], capture_output=True, text=True, timeout=300
    )
    assert ok.returncode == 0, ok.stderr


def test_bench_shows_dask_cluster_logs_only_with_verbose(tmp_path: Path) -> None:
    """75c0752: ~20 lines of distributed INFO ("Nanny asking worker to close", ...) after a bench with processes."""
    from wsi_xr.datasets.synth import write_synthetic_slide

    slide = tmp_path / "b.tif"
    write_synthetic_slide(slide, 1024, 1024, seed=2)
    args = ["bench", str(slide), "--chunks", "512", "--scheduler", "threads,processes", "--repeat", "1"]
    quiet = subprocess.run(CLI + args, capture_output=True, text=True, timeout=300)
    assert quiet.returncode == 0, quiet.stderr
    assert quiet.stderr.strip() == "", quiet.stderr
    assert "processes" in quiet.stdout
    verbose = subprocess.run(CLI + ["-v", *args], capture_output=True, text=True, timeout=300)
    assert verbose.returncode == 0 and "Nanny" in verbose.stderr, verbose.stderr


def test_every_command_and_option_says_what_it_does() -> None:
    """`wsi-xr COMMAND --help` has a description, and every argument and option a help text."""
    import argparse

    from wsi_xr.cli import build_parser

    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    undocumented = {
        name: [a.option_strings[-1] if a.option_strings else a.dest for a in sub._actions if not a.help] for name, sub in commands.choices.items()
    }
    assert not {k: v for k, v in undocumented.items() if v}, undocumented
    assert all(sub.description for sub in commands.choices.values())
    assert commands.choices["run"].format_usage().strip() == "usage: wsi-xr run [options] SLIDE [SLIDE ...] OUT.zarr"
