"""Leave-one-slide-out validation: each slide scored by a VAE and a PCA fitted on the others only."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from wsi_xr.datasets import write_synthetic_slide
from wsi_xr.loso import fold_table, leave_one_slide_out
from wsi_xr.sampling import sample_tissue_tiles


@pytest.fixture(scope="module")
def slides(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    folder = tmp_path_factory.mktemp("loso")
    paths = [folder / "a.tif", folder / "b.tif", folder / "glass.tif"]
    write_synthetic_slide(paths[0], 768, 768, seed=1, tissue_fraction=0.5)
    write_synthetic_slide(paths[1], 768, 768, seed=2, tissue_fraction=0.5)
    write_synthetic_slide(paths[2], 512, 512, seed=3, tissue_fraction=0.0)  # no tissue: scored by nothing, trains nothing
    return paths


def test_each_slide_is_scored_by_models_fitted_on_the_others(slides: list[Path]) -> None:
    folds = leave_one_slide_out(slides, epochs=1, max_eval_tiles=50, default_weights=False)
    assert [f.held_out for f in folds] == ["a.tif", "b.tif", "glass.tif"]
    a, b, glass = folds
    # the training tiles are exactly the other tissue slides' tiles: the held-out slide is never drawn
    assert a.train_slides == ["b.tif"] and a.train_tiles == len(sample_tissue_tiles([slides[1]])[0])
    assert b.train_slides == ["a.tif"] and b.train_tiles == len(sample_tissue_tiles([slides[0]])[0])
    assert a.eval_tiles == min(50, len(sample_tissue_tiles([slides[0]])[0]))
    for fold in (a, b):
        assert set(fold.mse) == {"vae", "pca32", "down1", "down3", "down6"}
        assert all(np.isfinite(v) and v > 0 for v in fold.mse.values() if v is not None)
        assert fold.beats_pca_by() == pytest.approx(1 - fold.mse["vae"] / fold.mse["pca32"])
    assert glass.note == "no tissue tile to score on" and glass.mse == {}
    table = fold_table(folds)
    assert "| a.tif |" in table and "no tissue tile" in table


def test_cli_leave_one_out(slides: list[Path], tmp_path: Path) -> None:
    out = tmp_path / "folds.json"
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "wsi_xr.cli",
            "eval-vae",
            "--leave-one-out",
            *map(str, slides[:2]),
            "--epochs",
            "1",
            "--max-tiles",
            "20",
            "--json",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr
    folds = json.loads(out.read_text())["folds"]
    assert [f["held_out"] for f in folds] == ["a.tif", "b.tif"] and all(f["mse"]["shipped"] > 0 for f in folds)
    assert "VAE vs PCA-32" in run.stdout
