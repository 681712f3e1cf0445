"""Any encoder in the pipeline: a torch module or a TorchScript file with its EncoderSpec gives
a feature cube on the encoder's tile grid, each tile's tissue fraction, provenance, resume,
the one-decode rule, and the CLI.

On 75c0752 ``process_slide`` accepted a VAE2 or its weights only.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import dask
import numpy as np
import pandas as pd
import pytest
import tifffile
import torch
import xarray as xr
from torch import nn

import wsi_xr
from tests.numerics import cpu_capability
from wsi_xr.datasets import write_synthetic_slide
from wsi_xr.errors import InvalidArgumentError
from wsi_xr.models.encoders import IMAGENET_MEAN, IMAGENET_STD, EncoderSpec, state_dict_sha256
from wsi_xr.readers import trace_reads
from wsi_xr.resample import resample_tiles
from wsi_xr.store.attrs import decode_attrs

TILE = 224
FEATURES = 6
UNIT = 2.0**-24  # float32 unit roundoff


class PooledLinear(nn.Module):
    """A linear map of the normalised tile: its float32 rounding error has a textbook bound."""

    def __init__(self, tile: int, features: int) -> None:
        super().__init__()
        self.linear = nn.Linear(3 * tile * tile, features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x.flatten(1))


@pytest.fixture(scope="module")
def slide(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("encoders") / "slide.tif"
    write_synthetic_slide(path, 2048, 1792, seed=5, mpp=0.25, levels=1)  # 40x, no pyramid: read at 0.5 µm/px by resampling
    return path


@pytest.fixture(scope="module")
def net() -> PooledLinear:
    torch.manual_seed(0)
    return PooledLinear(TILE, FEATURES).eval()


SPEC = EncoderSpec("pooled-linear", tile=TILE, mean=IMAGENET_MEAN, std=IMAGENET_STD, target_mpp=0.5)


def _expected(net: PooledLinear, tiles: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The features in float64 from the spec's definition, and the float32 rounding bound:
    (x / 255 - mean) / std then W x + b, K = 3 T² products summed; each input picks up 3
    roundings: |error| <= gamma(K + 3) (|W| |x| + |b|), gamma(n) = n u / (1 - n u)."""
    mean, std = np.asarray(IMAGENET_MEAN).reshape(1, 3, 1, 1), np.asarray(IMAGENET_STD).reshape(1, 3, 1, 1)
    x = ((tiles.transpose(0, 3, 1, 2).astype(np.float64) / 255.0 - mean) / std).reshape(len(tiles), -1)
    w = net.linear.weight.detach().double().numpy()
    b = net.linear.bias.detach().double().numpy()
    n = x.shape[1] + 3
    gamma = n * UNIT / (1 - n * UNIT)
    return x @ w.T + b, gamma * (np.abs(x) @ np.abs(w).T + np.abs(b))


def _assert_features(ds: xr.Dataset, slide: Path, net: PooledLinear) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The stored features of the tissue tiles against the definition, on tiles read independently
    (tifffile) and area-averaged from 448 to 224 px; returns the tiles' rows, columns and pixels."""
    pixels = tifffile.imread(slide)
    rows, cols = np.nonzero(ds.tile_mask.values)
    tiles = np.stack([resample_tiles(pixels[y : y + 448, x : x + 448], 448, TILE) for y, x in zip(ds.tile_y.values[rows], ds.tile_x.values[cols])])
    expected, bound = _expected(net, tiles)
    error = np.abs(ds.latent.values[rows, cols].astype(np.float64) - expected)
    assert (error <= bound).all(), f"features beyond the float32 bound on {cpu_capability()}: worst {float((error / bound).max()):.2f} x the bound"
    assert float((error / bound).max()) > 0 or error.max() == 0
    return rows, cols, tiles


def test_a_module_encoder_gives_features_on_its_own_tile_grid(slide: Path, net: PooledLinear, tmp_path: Path) -> None:
    store = tmp_path / "f.zarr"
    with dask.config.set(scheduler="threads"), trace_reads() as calls:
        ds = wsi_xr.process_slide(slide, store, encoder=net, encoder_spec=SPEC)
    ds = ds.compute()
    # the spec's target: 0.5 µm/px from a 0.25 µm/px level, 448 level px per 224-px tile, patches of 4 tiles
    attrs = decode_attrs(ds.attrs)
    assert (attrs["tile"], attrs["patch"], attrs["target_mpp"], attrs["scale_factor"], attrs["level_tile"]) == (TILE, 4 * TILE, 0.5, 2.0, 448)
    assert ds.latent.shape == (1792 // 448, 2048 // 448, FEATURES) and list(ds.feature.values) == list(range(FEATURES))
    np.testing.assert_array_equal(ds.tile_x.values, 448 * np.arange(2048 // 448))  # level-0 pixels
    # one decode of every TIFF tile of the level
    decoded = [(y // 256 + i, x // 256 + j) for lv, y, x, h, w in calls if lv == 0 for i in range(-(-h // 256)) for j in range(-(-w // 256))]
    assert len(decoded) == len(set(decoded)) == 7 * 8
    # provenance
    assert attrs["encoder"] == "pooled-linear" and attrs["encoder_kind"] == "module" and attrs["encoder_tile"] == TILE
    assert attrs["weights_sha256"] == attrs["encoder_sha256"] == state_dict_sha256(net)
    assert attrs["encoder_features"] == FEATURES and list(attrs["encoder_mean"]) == list(IMAGENET_MEAN) and attrs["complete"] is True
    # the features: the spec's normalisation and the module, on tiles read independently (tifffile) and area-averaged
    mask = ds.tile_mask.values
    assert 0 < mask.sum() < mask.size
    assert np.isnan(ds.latent.values[~mask]).all() and np.isfinite(ds.latent.values[mask]).all()
    rows, cols, tiles = _assert_features(ds, slide, net)
    # tissue fraction: the share of each tile's 4 x 4 sub-tiles (56 px) whose variance exceeds the threshold
    threshold = float(attrs["threshold"])
    for r, c, tile in zip(rows[:8], cols[:8], tiles[:8]):
        subs = tile.reshape(4, 56, 4, 56, 3).transpose(0, 2, 1, 3, 4).reshape(16, -1).astype(np.float64)
        assert float(ds.tissue_fraction.values[r, c]) == pytest.approx(float((subs.var(axis=1) > threshold).mean()))
    assert ds.tissue_fraction.values[mask].min() > 0
    assert wsi_xr.verify_store(store).ok
    frame = wsi_xr.to_dataframe(ds)
    assert len(frame) == int(mask.sum()) and "tissue_fraction" in frame
    np.testing.assert_array_equal(frame["tissue_fraction"].values, ds.tissue_fraction.values[rows, cols])
    # resume; another normalisation is another run
    assert decode_attrs(wsi_xr.process_slide(slide, store, encoder=net, encoder_spec=SPEC).attrs)["complete"] is True
    with pytest.raises(wsi_xr.StoreError, match="overwrite"):
        wsi_xr.process_slide(slide, store, encoder=net, encoder_spec=SPEC.replace(mean=(0.5, 0.5, 0.5)))


def test_lazy_encode_with_an_encoder_matches_the_pipeline(slide: Path, net: PooledLinear, tmp_path: Path) -> None:
    ds = wsi_xr.process_slide(slide, tmp_path / "f.zarr", encoder=net, encoder_spec=SPEC, threshold=30.0).compute()
    image = wsi_xr.open_slide(slide)
    mask = wsi_xr.tissue_mask(image, tile=TILE, patch=4 * TILE, threshold=30.0, target_mpp=0.5).compute()
    np.testing.assert_array_equal(mask.tile_mask.values, ds.tile_mask.values)
    with pytest.raises(InvalidArgumentError, match="compute the mask with tissue_mask"):
        wsi_xr.encode(image, wsi_xr.tissue_mask(image), encoder=net, encoder_spec=SPEC)
    # encode() reads level 0 at its own pixels: compare on a mask made at level 0 with 224-px tiles
    level0 = wsi_xr.tissue_mask(image, tile=TILE, patch=4 * TILE, threshold=30.0).compute()
    cube = wsi_xr.encode(image, level0, encoder=net, encoder_spec=SPEC).compute()
    assert cube.attrs["encoder"] == "pooled-linear" and cube.shape[-1] == FEATURES
    pixels = tifffile.imread(slide)
    rows, cols = np.nonzero(level0.tile_mask.values)
    tiles = np.stack([pixels[y : y + TILE, x : x + TILE] for y, x in zip(level0.tile_y.values[rows], level0.tile_x.values[cols])])
    expected, bound = _expected(net, tiles)
    assert (np.abs(cube.values[rows, cols] - expected) <= bound).all()


def test_encoder_arguments_are_checked_before_any_work(slide: Path, net: PooledLinear, tmp_path: Path) -> None:
    with pytest.raises(InvalidArgumentError, match="tile=64: encoder 'pooled-linear' encodes 224x224 tiles"):
        wsi_xr.process_slide(slide, tmp_path / "a.zarr", encoder=net, encoder_spec=SPEC, tile=64)
    with pytest.raises(InvalidArgumentError, match="needs spec="):
        wsi_xr.process_slide(slide, tmp_path / "a.zarr", encoder=net)
    with pytest.raises(InvalidArgumentError, match="not multiples of patch|multiple of tile"):
        wsi_xr.process_slide(slide, tmp_path / "a.zarr", encoder=net, encoder_spec=SPEC, patch=300)
    no_mpp = tmp_path / "no-mpp.tif"
    write_synthetic_slide(no_mpp, 512, 512, mpp=None)
    with pytest.raises(InvalidArgumentError, match="no-mpp.tif: the file states no mpp"):
        wsi_xr.process_slide(no_mpp, tmp_path / "a.zarr", encoder=net, encoder_spec=SPEC)  # the spec's target needs it
    assert not (tmp_path / "a.zarr").exists()


def test_cli_runs_a_torchscript_encoder(slide: Path, net: PooledLinear, tmp_path: Path) -> None:
    torch.jit.save(torch.jit.script(net), tmp_path / "enc.ts")
    base = [sys.executable, "-m", "wsi_xr.cli", "run", str(slide), "out.zarr", "--encoder", "enc.ts", "--quiet"]
    spec = ["--encoder-tile", "224", "--encoder-mean", "0.485,0.456,0.406", "--encoder-std", "0.229,0.224,0.225", "--encoder-mpp", "0.5"]
    missing = subprocess.run(base, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert missing.returncode == 2 and "--encoder-tile" in missing.stderr
    result = subprocess.run([*base, *spec, "--parquet", "rows.parquet"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    stored = xr.open_zarr(tmp_path / "out.zarr")
    attrs = decode_attrs(stored.attrs)
    assert attrs["encoder_kind"] == "torchscript" and attrs["encoder"] == "enc" and attrs["tile"] == TILE and attrs["target_mpp"] == 0.5
    rows = pd.read_parquet(tmp_path / "rows.parquet")
    assert len(rows) == int(stored.tile_mask.sum()) and f"latent_{FEATURES - 1}" in rows
    _assert_features(stored.compute(), slide, net)  # the scripted module: within the same float32 bound


def test_bf16_is_opt_in_refused_without_hardware_and_recorded(slide: Path, net: PooledLinear, tmp_path: Path) -> None:
    """The precision rules hold for any encoder: fp32 by default; bf16 only where the CPU has
    bfloat16 instructions (refused before any work elsewhere), recorded, its error measured."""
    from wsi_xr.encode import _cpu_flags

    has_bf16 = bool(_cpu_flags() & {"avx512_bf16", "amx_bf16", "bf16"})
    store = tmp_path / "bf16.zarr"
    if not has_bf16:
        with pytest.raises(InvalidArgumentError, match="precision='bf16' needs a CPU with bfloat16"):
            wsi_xr.process_slide(slide, store, encoder=net, encoder_spec=SPEC, precision="bf16")
        assert not store.exists()
        return
    ds = wsi_xr.process_slide(slide, store, encoder=net, encoder_spec=SPEC, precision="bf16", threshold=30.0).compute()
    exact = wsi_xr.process_slide(slide, tmp_path / "fp32.zarr", encoder=net, encoder_spec=SPEC, threshold=30.0).compute()
    assert decode_attrs(ds.attrs)["precision"] == "bf16" and decode_attrs(exact.attrs)["precision"] == "fp32"
    mask = exact.tile_mask.values
    np.testing.assert_array_equal(ds.tile_mask.values, mask)
    # bf16 keeps 8 bits of mantissa: each product's inputs (and the bias) are rounded to relative
    # 2**-9, so the error is within 2 * 2**-9 * (|W| |x| + |b|) plus the float32 sums' bounds
    rows, cols, tiles = _assert_features(exact, slide, net)
    _, bound32 = _expected(net, tiles)
    mean, std = np.asarray(IMAGENET_MEAN).reshape(1, 3, 1, 1), np.asarray(IMAGENET_STD).reshape(1, 3, 1, 1)
    x = ((tiles.transpose(0, 3, 1, 2).astype(np.float64) / 255.0 - mean) / std).reshape(len(tiles), -1)
    magnitude = np.abs(x) @ np.abs(net.linear.weight.detach().double().numpy()).T + np.abs(net.linear.bias.detach().double().numpy())
    error = np.abs(ds.latent.values[rows, cols] - exact.latent.values[rows, cols])
    assert (error <= 2 * 2.0**-9 * magnitude + 2 * bound32).all()
    assert error.max() > 0  # it did run in bf16


def test_default_chunks_stay_small_for_encoder_patches() -> None:
    """An encoder's 896-px patch on Aperio's 240-px TIFF tiles meet every 26880 px: such a chunk
    would be 2 GB; the default falls back to whole patches (a reviewer found the 26880)."""
    from wsi_xr.readers.probe import LevelInfo
    from wsi_xr.slide import default_chunk_size

    aperio = LevelInfo(0, 50000, 50000, 1.0, 1.0, 240, 240, 7, "jpeg")
    assert default_chunk_size(aperio, 896) == 3584  # two 1792-px patch pairs: whole patches, about TARGET_CHUNK
    assert default_chunk_size(aperio, 256) == 3840  # the VAE's: still on TIFF tile borders
    assert default_chunk_size(LevelInfo(0, 50000, 50000, 1.0, 1.0, 256, 256, 7, "jpeg"), 896) == 3584  # on 256-px tiles too


def test_the_pipeline_reads_large_levels_in_larger_chunks(synth_slide: Path) -> None:
    """From 32768² on (64 chunks of 4096 px), a run's default chunk is 4096 px on the tile
    borders (each chunk costs ~10 ms of Zarr files); smaller levels keep ~2048, and so do
    Aperio's 240-px tiles (3840 already; 7680 would be too large)."""
    from wsi_xr.pipeline.options import run_chunks, validate_run_options
    from wsi_xr.readers import open_file
    from wsi_xr.readers.probe import LevelInfo
    from wsi_xr.slide import large_level_chunk

    def level(side: int, tile: int) -> LevelInfo:
        return LevelInfo(0, side, side, 1.0, 1.0, tile, tile, 7, "jpeg")

    assert large_level_chunk(level(49152, 256)) == 4096
    assert large_level_chunk(level(32768, 512)) == 4096
    assert large_level_chunk(level(32767, 256)) is None  # fewer than 64 chunks of 4096
    assert large_level_chunk(level(16384, 256)) is None
    assert large_level_chunk(level(49152, 240)) is None  # 7680 would be the aligned side: the default's 3840 stays
    assert large_level_chunk(level(49152, 256), 896) == 5376  # an encoder's 896-px patches: whole patches
    # a run on a small slide keeps the slide's default; given chunks always win
    opened = open_file(synth_slide)
    assert run_chunks(opened, validate_run_options(None)) is None
    assert run_chunks(opened, validate_run_options(None, chunks=512)) == 512


def test_a_lost_subtile_chunk_is_found_and_repaired(slide: Path, net: PooledLinear, tmp_path: Path) -> None:
    store = tmp_path / "f.zarr"
    wsi_xr.process_slide(slide, store, encoder=net, encoder_spec=SPEC, chunks=896)
    reference = xr.open_zarr(store).compute()
    lost = next((store / "subtile_variance" / "c").rglob("*"))
    while lost.is_dir():
        lost = next(lost.iterdir())
    lost.unlink()
    report = wsi_xr.verify_store(store)
    assert not report.ok and any(p.variable == "subtile_variance" for p in report.problems)
    repaired = wsi_xr.process_slide(slide, store, encoder=net, encoder_spec=SPEC, chunks=896).compute()
    assert wsi_xr.verify_store(store).ok and decode_attrs(repaired.attrs)["complete"] is True
    np.testing.assert_array_equal(repaired.tissue_fraction.values, reference.tissue_fraction.values)


def test_mismatched_level_and_resampled_masks_are_refused(slide: Path, net: PooledLinear, tmp_path: Path) -> None:
    with pytest.raises(InvalidArgumentError, match="level=1: encoder 'pooled-linear' works at 0.5"):
        wsi_xr.process_slide(slide, tmp_path / "a.zarr", encoder=net, encoder_spec=SPEC, level=1)
    image = wsi_xr.open_slide(slide)
    resampled = wsi_xr.tissue_mask(image, tile=TILE, patch=4 * TILE, target_mpp=0.5)
    with pytest.raises(InvalidArgumentError, match="encode\\(\\) reads the image's own pixels"):
        wsi_xr.encode(image, resampled, encoder=net, encoder_spec=SPEC)
