"""Reconstruction evaluation: hand-computed MSEs, PCA fitted on training tiles only, hold-out
regions, the `wsi-xr eval-vae` command, and the shipped default weights on held-out tiles."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from wsi_xr.errors import InvalidArgumentError
from wsi_xr.models import VAE2, encode_tiles, load_vae, read_metadata
from wsi_xr.models.evaluate import (
    dihedral_copies,
    downsample_reconstruct,
    evaluate_tiles,
    fit_pca,
    mse_downsample,
    mse_pca,
    mse_vae,
)
from wsi_xr.sampling import Region, evaluate_slides, parse_region, parse_slide_region, sample_tissue_tiles

from .conftest import data_file

#: The held-out block of the real slide: never used to train the shipped weights (README).
CMU_HOLDOUT = Region(0, 2048, 2220, 919)


def _constant(values: list[tuple[int, int, int]]) -> np.ndarray:
    tiles = np.empty((len(values), 64, 64, 3), np.uint8)
    tiles[:] = np.array(values, np.uint8)[:, None, None, :]
    return tiles


def _checkerboard() -> np.ndarray:
    yy, xx = np.mgrid[0:64, 0:64]
    board = ((yy + xx) % 2 * 255).astype(np.uint8)
    return np.repeat(board[None, :, :, None], 3, axis=3)


def _halves() -> np.ndarray:
    """Left 32 columns black, right 32 white."""
    tile = np.zeros((1, 64, 64, 3), np.uint8)
    tile[:, :, 32:] = 255
    return tile


def _smooth_tiles(n: int, seed: int, *, vertical: bool) -> np.ndarray:
    """Tiles varying along one axis only (random low-frequency profiles, random colours)."""
    rng = np.random.default_rng(seed)
    t = np.linspace(0, 1, 64)
    tiles = np.empty((n, 64, 64, 3), np.uint8)
    for i in range(n):
        profile = sum(rng.normal() * np.cos(np.pi * f * t) for f in range(1, 4))
        colour = rng.uniform(0.3, 1.0, 3)
        img = 128 + 30 * profile[:, None, None] * colour if vertical else 128 + 30 * profile[None, :, None] * colour
        tiles[i] = np.clip(np.broadcast_to(img, (64, 64, 3)), 0, 255).astype(np.uint8)
    return tiles


# --------------------------------------------------------------------------------------
# Downsampling baselines, by hand


def test_constant_tiles_have_no_downsampling_error() -> None:
    tiles = _constant([(200, 120, 180), (0, 0, 0), (255, 255, 255)])
    for k in (1, 3, 6, 64):
        assert mse_downsample(tiles, k) == 0.0
        np.testing.assert_allclose(downsample_reconstruct(tiles, k), tiles / 255.0, atol=1e-7)


def test_checkerboard_mean_colour_error_is_a_quarter() -> None:
    board = _checkerboard()
    assert mse_downsample(board, 1) == pytest.approx(0.25, abs=1e-12)
    # 3x3 boxes of 21, 21 and 22 pixels: the four 21x21 boxes hold 221 of one colour and 220
    # of the other (variance 220*221/441^2 each pixel), the five others are half and half.
    by_hand = (4 * 441 * (220 * 221 / 441**2) + (4 * 21 * 22 + 22 * 22) * 0.25) / 4096
    assert mse_downsample(board, 3) == pytest.approx(by_hand, rel=1e-12)
    assert mse_downsample(board, 64) == 0.0  # every pixel its own box


def test_two_halves_by_hand() -> None:
    halves = _halves()
    assert mse_downsample(halves, 1) == pytest.approx(0.25)
    assert mse_downsample(halves, 2) == 0.0  # box edge at 32
    # k = 3: columns 0-20 black, 43-63 white, the middle box 21..42 is 11 black + 11 white:
    # 22 of 64 columns are off by 0.5.
    assert mse_downsample(halves, 3) == pytest.approx(22 / 64 * 0.25)
    recon = downsample_reconstruct(halves, 3)
    assert np.all(recon[0, :, :21] == 0) and np.all(recon[0, :, 43:] == 1)
    np.testing.assert_allclose(recon[0, :, 21:43], 0.5)
    per_tile = mse_downsample(np.concatenate([halves, _constant([(9, 9, 9)])]), 1, per_tile=True)
    np.testing.assert_allclose(per_tile, [0.25, 0.0])


def test_downsample_argument_errors() -> None:
    with pytest.raises(InvalidArgumentError, match="k=0"):
        mse_downsample(_halves(), 0)
    with pytest.raises(InvalidArgumentError, match="uint8"):
        mse_downsample(np.zeros((1, 64, 64, 3), np.float32), 3)
    with pytest.raises(InvalidArgumentError, match="empty"):
        mse_downsample(np.zeros((0, 64, 64, 3), np.uint8), 3)


# --------------------------------------------------------------------------------------
# The VAE column


def test_vae_mse_of_a_constant_decoder_by_hand() -> None:
    torch.manual_seed(0)
    model = VAE2()
    with torch.no_grad():  # last layer outputs 0 everywhere: the sigmoid gives 0.5
        model.decoder[8].weight.zero_()
        model.decoder[8].bias.zero_()
    model.train()
    tiles = _constant([(255, 255, 255), (51, 102, 153)])
    expected = [0.25, np.mean((np.array([51, 102, 153]) / 255 - 0.5) ** 2)]
    # The decoder gives exactly 0.5 (sigmoid(0)) and the difference is squared in float64, so the
    # only float32 rounding is x = v / 255 (relative u = 2**-24); (x - 0.5)**2 amplifies it by at
    # most 2 |x| / |x - 0.5| = 12 (v = 153): rtol 1e-6 > 12 u = 7.2e-7, on any CPU.
    np.testing.assert_allclose(mse_vae(model, tiles, per_tile=True), expected, rtol=1e-6)
    assert mse_vae(model, tiles, batch_size=1) == pytest.approx(np.mean(expected), rel=1e-6)
    assert model.training  # mode restored


# --------------------------------------------------------------------------------------
# PCA


def test_pca_agrees_with_an_svd_of_the_centred_data() -> None:
    tiles = np.concatenate([_smooth_tiles(8, 1, vertical=True), _smooth_tiles(8, 2, vertical=False)])
    rng = np.random.default_rng(0)
    tiles = np.clip(tiles + rng.normal(0, 4, tiles.shape), 0, 255).astype(np.uint8)
    held_out = _smooth_tiles(6, 3, vertical=True)
    for dihedral, method in ((False, "svd"), (True, "subspace"), (False, "subspace")):
        pca = fit_pca(tiles, 8, dihedral=dihedral, method=method, tol=1e-9)
        rows = dihedral_copies(tiles) if dihedral else tiles
        x = rows.reshape(len(rows), -1) / 255.0
        mean = x.mean(axis=0)
        _, s, vt = np.linalg.svd(x - mean, full_matrices=False)
        np.testing.assert_allclose(pca.mean, mean, atol=1e-7)
        np.testing.assert_allclose(pca.explained_variance, s[:8] ** 2 / len(x), rtol=1e-5)
        # Same subspace: ||P - P'||_F^2 = 2k - 2 ||V^T V'||_F^2 is ~0 for the two projectors.
        overlap = vt[:8] @ pca.components.T
        assert 2 * 8 - 2 * np.sum(overlap**2) == pytest.approx(0, abs=1e-8)
        h = held_out.reshape(len(held_out), -1) / 255.0
        by_svd = np.clip((h - mean) @ vt[:8].T @ vt[:8] + mean, 0, 1)
        assert mse_pca(pca, held_out) == pytest.approx(np.mean((by_svd - h) ** 2), rel=1e-4)
        assert pca.n_train == len(rows) and pca.dihedral == dihedral


def test_pca_is_fitted_on_training_tiles_only() -> None:
    train = _smooth_tiles(60, 10, vertical=False)  # structure along x only
    evaluation = _smooth_tiles(40, 11, vertical=True)  # structure along y: outside the training span
    on_train = fit_pca(train, 8)
    on_eval = fit_pca(evaluation, 8)
    # Training tiles lie in a low-dimensional span: PCA keeps them almost exactly.
    assert mse_pca(on_train, train) < 1e-4
    # Evaluation tiles outside that span are kept much worse than by a PCA fitted on them.
    assert mse_pca(on_train, evaluation) > 20 * mse_pca(on_eval, evaluation)

    report = evaluate_tiles(None, {"eval": evaluation}, train_tiles=train, n_components=8, dihedral=False)
    assert report.rows["eval"]["pca8"] == pytest.approx(mse_pca(on_train, evaluation), rel=1e-6)
    # The PCA column does not depend on the evaluation tiles: another set gives the same model.
    other = evaluate_tiles(None, {"eval": evaluation[:5]}, train_tiles=train, n_components=8, dihedral=False)
    assert other.rows["eval"]["pca8"] == pytest.approx(mse_pca(on_train, evaluation[:5]), rel=1e-6)


def test_pca_argument_errors() -> None:
    with pytest.raises(InvalidArgumentError, match="more training tiles"):
        fit_pca(_halves(), 32)
    with pytest.raises(InvalidArgumentError, match="n_components"):
        fit_pca(_smooth_tiles(5, 0, vertical=True), 0)


# --------------------------------------------------------------------------------------
# The report


def test_report_rows_overall_table_and_json() -> None:
    sets = {"flat": _constant([(10, 20, 30)] * 3), "halves": _halves()}
    report = evaluate_tiles(None, sets, sides=(1, 2))
    assert report.methods == ["down1", "down2"] and report.values == {"down1": 3, "down2": 12}
    assert report.rows["flat"] == {"n_tiles": 3, "down1": 0.0, "down2": 0.0}
    assert report.rows["halves"]["down1"] == pytest.approx(0.25)
    assert report.overall["n_tiles"] == 4
    assert report.overall["down1"] == pytest.approx(0.25 / 4)  # tile-weighted, tiles pooled
    text = report.table()
    assert "flat" in text and "halves" in text and "overall" in text and "down2 (12)" in text
    data = json.loads(json.dumps(report.to_dict()))
    assert data["sets"]["halves"]["down1"] == pytest.approx(0.25) and data["overall"]["n_tiles"] == 4


# --------------------------------------------------------------------------------------
# Regions: a held-out block and the rest of the slide


def test_region_selection_and_parsing() -> None:
    region = Region(128, 64, 128, 128)
    tx = np.array([128, 192, 224, 0, 320, 64, 320])
    ty = np.array([64, 128, 64, 64, 64, 0, 256])
    assert region.inside(tx, ty, 64).tolist() == [True, True, False, False, False, False, False]
    # Clear of the region by 64 px: x + 64 <= 64 or x >= 320, or y + 64 <= 0 or y >= 256.
    assert region.clear_of(tx, ty, 64, 64).tolist() == [False, False, False, True, True, False, True]
    assert region.clear_of(tx, ty, 64, 0).tolist() == [False, False, False, True, True, True, True]
    assert parse_slide_region("a/b.svs=0,2048,2220,919") == ("a/b.svs", Region(0, 2048, 2220, 919))
    for bad in ("b.svs", "b.svs=1,2,3", "b.svs=0,0,0,5", "b.svs=-1,0,5,5"):
        with pytest.raises(InvalidArgumentError, match="region"):
            parse_slide_region(bad)
    assert parse_region(" 0, 2048,2220 ,919") == Region(0, 2048, 2220, 919)
    for bad in ("1,2,3", "a=1,2,3,4", "0,0,0,5", ""):
        with pytest.raises(InvalidArgumentError, match="region"):
            parse_region(bad)


def test_held_out_block_never_reaches_training(synth_slide: Path) -> None:
    block = Region(0, 1536, 3000, 1064)
    name = synth_slide.name
    held, held_at = sample_tissue_tiles([synth_slide], inside={name: block})
    train, train_at = sample_tissue_tiles([synth_slide], outside={name: block}, margin=64)
    assert len(held) > 20 and len(train) > 20
    assert all(o["y"] >= 1536 and o["y"] + 64 <= 2600 for o in held_at)
    assert all(o["y"] + 64 <= 1536 - 64 for o in train_at)
    with pytest.raises(InvalidArgumentError, match="matches none"):
        sample_tissue_tiles([synth_slide], inside={"other.svs": block})


def test_shifted_windows_are_the_slide_pixels_and_respect_the_hold_out(synth_slide: Path) -> None:
    import dask

    from wsi_xr.slide import open_slide

    name = synth_slide.name
    grid, grid_at = sample_tissue_tiles([synth_slide])
    same, same_at = sample_tissue_tiles([synth_slide], stride=64)
    assert same_at == grid_at and np.array_equal(same, grid)  # stride = tile: the grid itself

    shifted, shifted_at = sample_tissue_tiles([synth_slide], stride=32)
    positions = {(o["x"], o["y"]) for o in shifted_at}
    assert len(positions) == len(shifted_at)  # every window once
    grid_positions = {(o["x"], o["y"]) for o in grid_at}
    assert grid_positions <= positions  # the grid tiles are among them, with 3 shifted copies each
    assert len(positions - grid_positions) > 2.5 * len(grid_positions)
    assert all(o["x"] % 32 == 0 and o["y"] % 32 == 0 for o in shifted_at)
    with dask.config.set(scheduler="threads"):
        image = open_slide(synth_slide).values  # an independent read of the whole slide
    rng = np.random.default_rng(0)
    for i in rng.choice(len(shifted_at), size=60, replace=False):
        x, y = shifted_at[i]["x"], shifted_at[i]["y"]
        assert np.array_equal(shifted[i], image[y : y + 64, x : x + 64])

    block = Region(0, 1536, 3000, 1064)
    _, train_at = sample_tissue_tiles([synth_slide], outside={name: block}, margin=64, stride=16)
    assert len(train_at) > 16 * 20
    assert all(o["y"] + 64 <= 1536 - 64 for o in train_at)  # shifted windows keep clear of the block too
    for bad in (0, 4, 48, 65, True):  # not a divisor, or more than 64 windows a tile
        with pytest.raises(InvalidArgumentError, match="stride"):
            sample_tissue_tiles([synth_slide], stride=bad)


def test_shifted_windows_stay_on_whole_sound_tiles() -> None:
    """By hand, on a 3x3 tile grid whose centre-right tile has a read error: tile (0, 0)
    keeps all 4 windows of stride 32; (1, 1) loses those reaching into (1, 2) and (2, 2)
    is at the grid's last row and column, so only its unshifted window stays."""
    from wsi_xr.sampling import _shifted_windows

    read_error = np.zeros((3, 3), bool)
    read_error[1, 2] = True
    w = _shifted_windows(np.array([0, 1, 2]), np.array([0, 1, 2]), read_error, 32, 64)
    got = sorted(zip(w.row.tolist(), w.col.tolist(), w.dy.tolist(), w.dx.tolist()))
    assert got == [
        (0, 0, 0, 0),
        (0, 0, 0, 32),
        (0, 0, 32, 0),
        (0, 0, 32, 32),
        (1, 1, 0, 0),
        (1, 1, 32, 0),
        (2, 2, 0, 0),
    ]


def test_evaluate_slides_refuses_to_fit_pca_on_evaluation_tiles(synth_slide: Path) -> None:
    with pytest.raises(InvalidArgumentError, match="both an evaluation and a training slide"):
        evaluate_slides(False, [synth_slide], train_slides=[synth_slide])


def test_cli_eval_vae_region_table_and_json(synth_slide: Path, tmp_path: Path, capsys) -> None:
    from wsi_xr.cli import main
    from wsi_xr.models import save_vae

    weights = tmp_path / "w.pt"
    torch.manual_seed(0)
    save_vae(VAE2(), weights)
    out = tmp_path / "eval.json"
    code = main(
        [
            "eval-vae",
            str(weights),
            str(synth_slide),
            "--train-slides",
            str(synth_slide),
            "--region",
            f"{synth_slide.name}=0,1536,3000,1064",
            "--max-tiles",
            "40",
            "--max-train-tiles",
            "80",
            "--pca-components",
            "8",
            "--no-dihedral",
            "--json",
            str(out),
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert "vae (32)" in printed and "pca8 (8)" in printed and "down3 (27)" in printed and "overall" in printed
    data = json.loads(out.read_text())
    (row,) = data["sets"].values()
    assert row["n_tiles"] == 40
    assert set(data["methods"]) == {"vae", "pca8", "down1", "down3", "down6"}
    assert data["settings"]["train_tiles"] == 80 and data["settings"]["regions"]
    assert all(0 < row[m] < 1 for m in data["methods"])
    # A bad region is a one-line user error.
    assert main(["eval-vae", str(weights), str(synth_slide), "--region", "nonsense"]) == 2


# --------------------------------------------------------------------------------------
# The shipped default weights on tiles they never saw


@pytest.fixture(scope="module")
def default_model() -> VAE2:
    return load_vae()


def test_default_weights_metadata_records_the_run() -> None:
    training = read_metadata()["training"]
    for key in ("slides", "holdout", "loss", "schedule", "epochs", "seed", "command", "augmentation"):
        assert key in training, key
    assert training["holdout"]["cmu-1-small-region.svs"] == CMU_HOLDOUT.as_text()
    assert "300" not in json.dumps(training["slides"])  # the held-out synthetic seed is not a training slide


def test_default_weights_beat_downsampling_on_a_held_out_synthetic_slide(default_model: VAE2, tmp_path: Path) -> None:
    from wsi_xr.datasets.synth import write_synthetic_slide

    slide = tmp_path / "synth-300.tif"
    write_synthetic_slide(slide, 2048, 2048, seed=300)  # seed 300: never trained on
    tiles, _ = sample_tissue_tiles([slide], max_tiles=200, seed=0)
    assert len(tiles) >= 100
    assert np.isfinite(encode_tiles(default_model, tiles)).all()
    vae = mse_vae(default_model, tiles)
    assert np.isfinite(vae)
    assert vae < mse_downsample(tiles, 3)


@pytest.fixture(scope="module")
def cmu_split() -> tuple[np.ndarray, np.ndarray]:
    """CMU-1's tissue tiles inside the held-out block, and those 64 px clear of it (read once)."""
    cmu = data_file("cmu-1-small-region.svs")
    tiles, origins = sample_tissue_tiles([cmu])
    x = np.array([o["x"] for o in origins])
    y = np.array([o["y"] for o in origins])
    return tiles[CMU_HOLDOUT.inside(x, y, 64)], tiles[CMU_HOLDOUT.clear_of(x, y, 64, 64)]


def test_default_weights_beat_downsampling_and_pca_on_the_held_out_real_block(default_model: VAE2, cmu_split: tuple[np.ndarray, np.ndarray]) -> None:
    held, rest = cmu_split
    assert len(held) == 274 and len(rest) == 428
    mu = encode_tiles(default_model, held)
    assert mu.shape == (len(held), 32) and np.isfinite(mu).all()
    vae = mse_vae(default_model, held)
    assert vae < mse_downsample(held, 3)
    # and PCA-32 fitted on the rest of the slide with the 8 flips/rotations of each tile
    # (README, "The VAE": 0.0219 vs 0.0229 here)
    assert vae < mse_pca(fit_pca(dihedral_copies(rest), 32), held)
