"""Never lose a user's data: ``--overwrite`` (``overwrite=True``) replaces only what wsi_xr
wrote; file outputs replace only a file of their own kind, never a folder.

On 75c0752 ``wsi-xr run SLIDE junk2 --overwrite`` deleted ``junk2/thesis.docx`` without a
word, and so did ``wsi-xr mask``.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tifffile
import xarray as xr

import wsi_xr
from wsi_xr.pipeline import process_slide, write_parquet
from wsi_xr.store import write_zarr

CLI = [sys.executable, "-m", "wsi_xr.cli"]
THESIS = b"PK\x03\x04 a thesis, three years of work"


def _users_folder(path: Path) -> Path:
    path.mkdir()
    (path / "thesis.docx").write_bytes(THESIS)
    return path


def _intact(folder: Path) -> None:
    assert (folder / "thesis.docx").read_bytes() == THESIS, "the user's file was lost"


@pytest.mark.parametrize("command", ["run", "mask"])
def test_overwrite_never_replaces_a_folder_wsi_xr_did_not_write(command: str, synth_slide: Path, weights: Path, tmp_path: Path) -> None:
    junk = _users_folder(tmp_path / "junk2")
    extra = ["--weights", str(weights)] if command == "run" else []
    for flags in ([], ["--overwrite"]):
        done = subprocess.run(
            CLI + [command, str(synth_slide), str(junk), "--scheduler", "threads", "--quiet", *extra, *flags],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert done.returncode == 2, done.stderr
        assert "did not write" in done.stderr and "thesis.docx" in done.stderr
        assert "--overwrite" not in done.stderr, "the message must not suggest the flag that would be refused too"
        _intact(junk)


def test_overwrite_replaces_a_wsi_xr_store_but_not_one_a_user_added_to(synth_slide: Path, weights: Path, tmp_path: Path) -> None:
    store = tmp_path / "out.zarr"
    process_slide(synth_slide, store, weights=weights, chunks=1024, threshold=50, progress=False)
    with pytest.raises(wsi_xr.StoreError, match="different parameters"):
        process_slide(synth_slide, store, weights=weights, chunks=1024, threshold=60, progress=False)
    ds = process_slide(synth_slide, store, weights=weights, chunks=1024, threshold=60, overwrite=True, progress=False)
    assert ds.attrs["threshold"] == 60 and ds.attrs["complete"]  # replaced: it was wsi_xr's
    (store / "notes.txt").write_text("my notes")
    with pytest.raises(wsi_xr.StoreError, match="notes.txt") as refused:
        process_slide(synth_slide, store, weights=weights, chunks=1024, threshold=70, overwrite=True, progress=False)
    assert "--overwrite" not in str(refused.value) and "overwrite=True" not in str(refused.value)
    assert (store / "notes.txt").read_text() == "my notes" and xr.open_zarr(store, consolidated=False).attrs["threshold"] == 60
    (store / "notes.txt").unlink()
    (store / "latent" / "readme.md").write_text("inside an array folder")
    with pytest.raises(wsi_xr.StoreError, match="readme.md"):
        process_slide(synth_slide, store, weights=weights, chunks=1024, threshold=70, overwrite=True, progress=False)


def test_cohort_and_mask_writers_refuse_foreign_data(synth_slide: Path, weights: Path, tmp_path: Path) -> None:
    folder = _users_folder(tmp_path / "cohort.zarr")
    with pytest.raises(wsi_xr.StoreError, match="thesis.docx"):
        wsi_xr.process_slides([synth_slide, synth_slide], folder, weights=weights, overwrite=True, progress=False)
    _intact(folder)
    mask = wsi_xr.tissue_mask(wsi_xr.open_slide(synth_slide), threshold=50).compute()
    with pytest.raises(wsi_xr.StoreError, match="thesis.docx"):
        write_zarr(mask, folder, overwrite=True)
    _intact(folder)
    store = write_zarr(mask, tmp_path / "mask.zarr")
    with pytest.raises(wsi_xr.StoreError, match="already exists"):
        write_zarr(mask, store)
    write_zarr(mask, store, overwrite=True)  # a mask store wsi_xr wrote: replaced
    assert xr.open_zarr(store).wsi.attrs["wsi_xr_mask"]["layout"] >= 2
    other_zarr = tmp_path / "someone-elses.zarr"
    xr.Dataset({"a": ("x", np.arange(3))}).to_zarr(other_zarr, zarr_format=3)
    with pytest.raises(wsi_xr.StoreError, match="not a wsi_xr store"):
        write_zarr(mask, other_zarr, overwrite=True)
    assert xr.open_zarr(other_zarr).a.values.tolist() == [0, 1, 2]


def test_parquet_replaces_a_parquet_file_never_a_folder_or_another_file(synth_slide: Path, weights: Path, tmp_path: Path) -> None:
    store = tmp_path / "s.zarr"
    process_slide(synth_slide, store, weights=weights, chunks=1024, progress=False)
    folder = _users_folder(tmp_path / "rows.parquet")
    with pytest.raises(wsi_xr.StoreError, match="is a folder"):
        write_parquet(store, folder)
    _intact(folder)
    document = tmp_path / "report.parquet"
    document.write_bytes(THESIS)
    with pytest.raises(wsi_xr.StoreError, match="not a parquet file"):
        write_parquet(store, document)
    assert document.read_bytes() == THESIS
    target = tmp_path / "tiles.parquet"
    first = write_parquet(store, target)
    assert write_parquet(store, target) == first > 0  # a Parquet file: replaced


def test_parquet_folder_is_refused_before_any_work(synth_slide: Path, weights: Path, tmp_path: Path) -> None:
    """75c0752 found out only after the whole pipeline had run."""
    folder = _users_folder(tmp_path / "rows.parquet")
    store = tmp_path / "never.zarr"
    start = time.perf_counter()
    done = subprocess.run(
        CLI + ["run", str(synth_slide), str(store), "--weights", str(weights), "--parquet", str(folder), "--quiet"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 2 and "is a folder" in done.stderr, done.stderr
    assert not store.exists() and "Dask dashboard" not in done.stderr
    _intact(folder)
    assert time.perf_counter() - start < 60


@pytest.mark.parametrize(
    "command",
    [
        ["plot", "{store}", "--out", "{target}"],
        ["synth", "{target}", "--width", "300", "--height", "300", "--overwrite"],
        ["train", "{slide}", "--out", "{target}", "--epochs", "1", "--max-tiles", "8"],
    ],
    ids=["plot", "synth", "train"],
)
def test_file_outputs_never_replace_another_kind_of_file(command: list[str], synth_slide: Path, weights: Path, tmp_path: Path) -> None:
    store = tmp_path / "s.zarr"
    process_slide(synth_slide, store, weights=weights, chunks=1024, progress=False)
    target = tmp_path / "thesis.docx"
    target.write_bytes(THESIS)
    args = [part.format(store=store, target=target, slide=synth_slide) for part in command]
    done = subprocess.run(CLI + args, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "not a" in done.stderr, done.stderr
    assert target.read_bytes() == THESIS


def test_hidden_folders_stray_chunk_files_and_lookalike_groups_are_foreign(synth_slide: Path, tmp_path: Path) -> None:
    """Review finds on the first version: a user's hidden folder, a file under an array's
    chunk folder, and another tool's group with a ``slides`` attribute were taken for wsi_xr's."""
    from wsi_xr.store import foreign_content

    mask = wsi_xr.tissue_mask(wsi_xr.open_slide(synth_slide), threshold=50).compute()
    store = write_zarr(mask, tmp_path / "st.zarr")
    assert foreign_content(store) is None
    (store / ".my_notes").mkdir()
    (store / ".my_notes" / "thesis.txt").write_text("mine")
    with pytest.raises(wsi_xr.StoreError, match=".my_notes"):
        write_zarr(mask, store, overwrite=True)
    assert (store / ".my_notes" / "thesis.txt").read_text() == "mine"
    shutil.rmtree(store / ".my_notes")
    stray = store / "tile_mask" / "c" / "extra"
    stray.mkdir(parents=True)
    (stray / "user.txt").write_text("mine")
    with pytest.raises(wsi_xr.StoreError, match="extra"):
        write_zarr(mask, store, overwrite=True)
    assert (stray / "user.txt").exists()
    other = tmp_path / "other.zarr"
    xr.Dataset({"a": ("x", np.arange(3))}, attrs={"slides": ["mine"]}).to_zarr(other, zarr_format=3)
    assert foreign_content(other) is not None


def test_a_running_store_is_never_replaced_by_a_mask(synth_slide: Path, tmp_path: Path) -> None:
    from wsi_xr.store import StoreLock

    mask = wsi_xr.tissue_mask(wsi_xr.open_slide(synth_slide), threshold=50).compute()
    store = write_zarr(mask, tmp_path / "busy.zarr")
    with StoreLock(store):  # a run holds it
        with pytest.raises(wsi_xr.StoreError, match="in use by another wsi_xr run"):
            write_zarr(mask, store, overwrite=True)
    write_zarr(mask, store, overwrite=True)  # released: replaced


def test_an_interrupted_replacement_puts_the_old_store_back(tmp_path: Path) -> None:
    from wsi_xr.store import swap_in

    old = tmp_path / "out.zarr"
    old.mkdir()
    (old / "zarr.json").write_text("{}")
    with pytest.raises(FileNotFoundError):
        swap_in(tmp_path / "missing-new-store", old)  # the second rename fails
    assert (old / "zarr.json").read_text() == "{}" and not list(tmp_path.glob(".out.zarr.replaced-*"))


def test_only_files_wsi_xr_wrote_are_replaced(synth_slide: Path, weights: Path, tmp_path: Path) -> None:
    import pandas as pd

    from wsi_xr.datasets.synth import write_synthetic_slide
    from wsi_xr.outputs import check_output_file

    real = tmp_path / "CMU-1.svs"
    shutil.copy(synth_slide, real)  # stands for a real slide: a TIFF wsi_xr's synth did not write
    tifffile.imwrite(real, np.zeros((64, 64, 3), np.uint8), photometric="rgb", description="Aperio Image Library")
    with pytest.raises(wsi_xr.StoreError, match="not a tiff file that wsi_xr wrote"):
        write_synthetic_slide(real, 300, 300)
    write_synthetic_slide(tmp_path / "s.tif", 300, 300)
    write_synthetic_slide(tmp_path / "s.tif", 300, 300, seed=2)  # a synthetic slide: replaced
    users_table = tmp_path / "table.parquet"
    pd.DataFrame({"patient": [1, 2]}).to_parquet(users_table)
    with pytest.raises(wsi_xr.StoreError, match="not a parquet file that wsi_xr wrote"):
        check_output_file(users_table, "parquet")
    old_rows = tmp_path / "rows-0.2.0.parquet"  # written by 0.2.0: no marker, its columns
    pd.DataFrame({"x": [0], "y": [0], **{f"latent_{i}": [0.0] for i in range(32)}}).to_parquet(old_rows)
    check_output_file(old_rows, "parquet")
    users_model = tmp_path / "model.pt"
    import torch

    torch.save({"state_dict": {}}, users_model)  # someone's checkpoint, not written by wsi_xr
    with pytest.raises(wsi_xr.StoreError, match="not a weights file that wsi_xr wrote"):
        check_output_file(users_model, "weights")
    check_output_file(weights, "weights")  # save_vae's file: replaceable


def test_zarrs_half_written_files_are_not_foreign(synth_slide: Path, tmp_path: Path) -> None:
    """A run killed while zarr wrote a chunk leaves ``<key>.<uuid>.partial``: the rerun must still resume."""
    import uuid

    from wsi_xr.store import foreign_content

    mask = wsi_xr.tissue_mask(wsi_xr.open_slide(synth_slide), threshold=50).compute()
    store = write_zarr(mask, tmp_path / "st.zarr")
    chunk_folder = next(p.parent for p in (store / "tile_mask" / "c").rglob("*") if p.is_file())
    (chunk_folder / f"7.{uuid.uuid4().hex}.partial").write_bytes(b"half")
    (store / "tile_mask" / f"zarr.{uuid.uuid4().hex}.partial").write_text("{")
    assert foreign_content(store) is None
    (chunk_folder / "7.partial").write_bytes(b"not zarr's name")
    assert foreign_content(store) is not None
