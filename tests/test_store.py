"""The pipeline's store: xarray-native names, resume from any kill point (creation, chunk
writes, finalisation), refusal of foreign stores, migration of 0.1.0 stores, streamed
Parquet."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import dask.array
import numpy as np
import pandas as pd
import pytest
import xarray as xr
import zarr

import wsi_xr
from tests.numerics import assert_latents_agree, latent_tolerance
from wsi_xr.datasets.synth import write_synthetic_slide
from wsi_xr.pipeline import process_slide, process_slides, to_dataframe, write_parquet
from wsi_xr.store import LAYOUT_VERSION, decode_attrs, migrate_store

CLI = [sys.executable, "-m", "wsi_xr.cli"]
VARIABLES = ("tile_mask", "patch_mask", "read_error", "tile_variance", "patch_variance", "latent", "chunk_done")


@pytest.fixture(scope="module")
def small_slide(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("slides") / "small.tif"
    write_synthetic_slide(path, 1536, 1280, seed=31, tissue_fraction=0.5)
    return path


def _assert_same_store(a: xr.Dataset, b: xr.Dataset, latent_tolerance: np.ndarray | None = None) -> None:
    """Equal stores: every variable identical, except latents within ``latent_tolerance`` when
    given (float32 rounding, when the two runs encoded with different torch thread counts)."""
    for name in VARIABLES:
        if name == "latent" and latent_tolerance is not None:
            assert_latents_agree(b[name].values, a[name].values, latent_tolerance, "latents")
            continue
        np.testing.assert_array_equal(a[name].values, b[name].values, err_msg=name)
    assert a.wsi.attrs["complete"] is True and b.wsi.attrs["complete"] is True
    assert a.attrs["threshold"] == b.attrs["threshold"] and a.attrs["tissue_tiles"] == b.attrs["tissue_tiles"]


def test_output_is_xarray_native(small_slide: Path, weights: Path, tmp_path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    ds = process_slide(small_slide, tmp_path / "n.zarr", weights=weights, chunks=512, progress=False)
    # every dimension has an index of its own name; no other variable shares a dimension's name
    assert set(ds.indexes) == set(ds.dims)
    for name, variable in ds.variables.items():
        if name in ds.dims:
            assert variable.dims == (name,), f"{name} shares its name with a dimension"
    assert ds.latent.dims == ("tile_y", "tile_x", "feature")
    assert list(ds.feature.values) == list(range(32))
    assert list(ds.chunk_y.values) == [0, 512, 1024] and list(ds.chunk_x.values) == [0, 512, 1024]
    first = ds.latent.sel(feature=0)
    assert first.dims == ("tile_y", "tile_x")
    tissue = ds.tile_mask.values
    assert np.isfinite(first.values[tissue]).all() and np.isnan(first.values[~tissue]).all()
    assert bool(ds.chunk_done.sel(chunk_y=512, chunk_x=1024))
    assert int(ds.tile_variance.sel(tile_y=640, tile_x=128).size) == 1
    frame = ds.to_dataframe()  # every variable broadcast over every dimension: fine for a small slide
    assert len(frame) == np.prod([ds.sizes[d] for d in frame.index.names])
    tiles = ds[["tile_mask", "tile_variance", "read_error"]].to_dataframe()  # the per-tile table
    assert len(tiles) == tissue.size and int(tiles.tile_mask.sum()) == int(tissue.sum())
    ds.tile_variance.plot()
    ds.latent.sel(feature=3).plot()
    matplotlib.pyplot.close("all")


def test_process_slide_takes_an_opened_slide(small_slide: Path, weights: Path, tmp_path: Path) -> None:
    opened = wsi_xr.readers.open_file(small_slide)
    grid = opened.damage(0)
    a = process_slide(opened, tmp_path / "a.zarr", weights=weights, chunks=512, progress=False).compute()
    assert opened.damage(0) is grid  # scanned once, reused
    b = process_slide(small_slide, tmp_path / "b.zarr", weights=weights, chunks=512, progress=False).compute()
    # latents within fp32 rounding: torch's thread count in a Dask thread (left by earlier work in
    # this process) picks the kernels' summation order
    _assert_same_store(a, b, latent_tolerance(small_slide, weights, a.tile_mask.values))
    assert a.attrs["backend"] == "cucim" and "safe" in a.attrs["backend_reason"]


KILL_POINTS = [
    "create-begin",
    "create-attrs",
    "create-array",
    "create-array#3",
    "create-rename",
    "chunk-done#1",
    "chunk-done#5",
    "finalize-masks",
    "finalize-latents",
    "finalize-attrs",
    "finalize-complete",
]


def test_resume_from_any_kill_point(small_slide: Path, weights: Path, tmp_path: Path) -> None:
    """SIGKILL `wsi-xr run` at each named point (creation, chunk writes, finalisation),
    then run again (in this process, to keep the test short): the store ends identical
    to an uninterrupted run, and no half-built copy is left behind."""
    args = ["--weights", str(weights), "--chunk", "512", "--scheduler", "threads", "--quiet"]
    options = {"weights": weights, "chunks": 512, "progress": False}  # torch threads left alone; the CLI sets "auto"
    expected = process_slide(small_slide, tmp_path / "reference.zarr", **options).compute()
    tolerance = latent_tolerance(small_slide, weights, expected.tile_mask.values)
    for point in KILL_POINTS:
        store = tmp_path / f"killed-{point.replace('#', '-')}.zarr"
        env = {**os.environ, "WSI_XR_KILL_AT": point}
        killed = subprocess.run(CLI + ["run", str(small_slide), str(store), *args], env=env, capture_output=True, text=True)
        assert killed.returncode == -9, f"{point}: the run was not killed ({killed.returncode}): {killed.stderr[-500:]}"
        if store.exists():  # from its first moment the store is wsi_xr's, never half-built
            assert "wsi_xr_run" in json.loads((store / "zarr.json").read_text())["attributes"], point
            assert not xr.open_zarr(store, consolidated=False).attrs["complete"] or point == "finalize-complete"
        _assert_same_store(expected, process_slide(small_slide, store, **options).compute(), tolerance)
        assert not list(tmp_path.glob(f".{store.name}.creating-*")), f"{point}: a half-built copy was left behind"


def test_a_foreign_store_is_still_refused(small_slide: Path, weights: Path, tmp_path: Path) -> None:
    foreign = tmp_path / "foreign.zarr"
    zarr.open_group(foreign, mode="w", zarr_format=3).create_array("data", shape=(4,), dtype="int8")
    with pytest.raises(wsi_xr.StoreError, match="did not write"):
        process_slide(small_slide, foreign, weights=weights, progress=False)
    folder = tmp_path / "notes"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")
    with pytest.raises(wsi_xr.StoreError, match="did not write"):
        process_slide(small_slide, folder, weights=weights, progress=False)
    assert (folder / "notes.txt").read_text() == "mine"
    empty = tmp_path / "empty.zarr"
    empty.mkdir()  # an empty folder is fine to write into
    assert process_slide(small_slide, empty, weights=weights, chunks=512, progress=False).attrs["complete"]


def _downgrade_to_layout_1(store: Path) -> None:
    """Rewrite a store into the layout wsi_xr 0.1.0 wrote (a ``latent`` dimension, no index
    for ``latent``/``chunk_*``, no layout version) -- what a user of 0.1.0 has on disk."""
    for name in ("feature", "chunk_y", "chunk_x"):
        shutil.rmtree(store / name)
    meta = store / "latent" / "zarr.json"
    doc = json.loads(meta.read_text())
    doc["dimension_names"] = ["tile_y", "tile_x", "latent"]
    meta.write_text(json.dumps(doc))
    group = zarr.open_group(store, mode="r+", zarr_format=3, use_consolidated=False)
    attrs = decode_attrs(group.attrs)  # as 0.1.0 wrote them: JSON natives (the fingerprint a dict, bools)
    del attrs["wsi_xr_run"]["layout"], attrs["wsi_xr_run"]["precision"], attrs["wsi_xr_run"]["reject_pen"]
    group.attrs.put(attrs)
    zarr.consolidate_metadata(store)


def test_old_stores_get_a_clear_message_and_migrate(small_slide: Path, weights: Path, tmp_path: Path) -> None:
    store = tmp_path / "old.zarr"
    current = process_slide(small_slide, store, weights=weights, chunks=512, progress=False).compute()
    _downgrade_to_layout_1(store)
    with pytest.raises(wsi_xr.StoreError, match="wsi-xr migrate"):
        process_slide(small_slide, store, weights=weights, chunks=512, progress=False)
    run = subprocess.run(CLI + ["migrate", str(store)], capture_output=True, text=True)
    assert run.returncode == 0 and "migrated /" in run.stdout, run.stderr
    migrated = xr.open_zarr(store).compute()
    assert migrated.latent.dims == ("tile_y", "tile_x", "feature") and set(migrated.indexes) == set(migrated.dims)
    np.testing.assert_array_equal(migrated.latent.values, current.latent.values)
    np.testing.assert_array_equal(migrated.chunk_y.values, current.chunk_y.values)
    assert migrated.wsi.attrs["wsi_xr_run"]["layout"] == LAYOUT_VERSION and isinstance(migrated.attrs["wsi_xr_run"], str)
    assert migrate_store(store) == []  # a second time changes nothing


def test_cohort_parquet_streams_every_slide(small_slide: Path, weights: Path, tmp_path: Path) -> None:
    other = tmp_path / "other.tif"
    write_synthetic_slide(other, 1024, 1024, seed=32, tissue_fraction=0.4)
    store = tmp_path / "cohort.zarr"
    tree = process_slides([small_slide, other, small_slide], store, weights=weights, chunks=512, progress=False)
    rows = write_parquet(store, tmp_path / "rows.parquet")
    back = pd.read_parquet(tmp_path / "rows.parquet")
    counts = {name: int(tree[name].tile_mask.sum()) for name in tree.children}
    assert rows == len(back) == sum(counts.values())
    assert back.groupby("slide").size().to_dict() == {k: v for k, v in counts.items() if v}
    import pyarrow.parquet as pq

    assert pq.ParquetFile(tmp_path / "rows.parquet").num_row_groups == 3  # one slide at a time
    first = back[back.slide == "small"].iloc[0]
    ds = tree["small"].to_dataset()
    np.testing.assert_array_equal(  # the stored float32 values, unchanged
        ds.latent.sel(tile_y=first.y, tile_x=first.x).values, first[[f"latent_{i}" for i in range(32)]].to_numpy(dtype=np.float32)
    )


def test_cohort_slides_in_flight_on_a_local_cluster(small_slide: Path, weights: Path, tmp_path: Path) -> None:
    """Several slides computed at once on a real LocalCluster give the stores of
    one-at-a-time runs; their chunk tasks overlap in time (not one slide after another);
    SIGKILL mid-cohort and a rerun finish identically."""
    from distributed import Client, LocalCluster, get_task_stream

    slides = [small_slide]
    for seed in (41, 42):
        path = tmp_path / f"cohort-{seed}.tif"
        write_synthetic_slide(path, 1024, 1024, seed=seed, tissue_fraction=0.5)
        slides.append(path)
    options = {"weights": weights, "chunks": 512, "progress": False}
    alone = {p.stem: process_slide(p, tmp_path / f"alone-{p.stem}.zarr", **options).compute() for p in slides}
    with LocalCluster(n_workers=1, threads_per_worker=2, processes=False, dashboard_address=":0") as cluster, Client(cluster) as client:
        with get_task_stream(client) as recorded:
            tree = process_slides(slides, tmp_path / "together.zarr", client=client, **options)
        stream = recorded.data
    for name, path in zip(alone, slides):  # another scheduler's threads: latents within float32 rounding
        _assert_same_store(alone[name], tree[name].to_dataset().compute(), latent_tolerance(path, weights, alone[name].tile_mask.values))
    spans: dict[str, tuple[float, float]] = {}
    for task in stream:
        key = str(task["key"])
        if "wsi-process-chunk" in key:
            slide = next(n for n in alone if n in key)
            start, stop = task["startstops"][0]["start"], task["startstops"][-1]["stop"]
            lo, hi = spans.get(slide, (start, stop))
            spans[slide] = (min(lo, start), max(hi, stop))
    assert len(spans) == 3
    ordered = sorted(spans.values())
    assert any(ordered[i + 1][0] < ordered[i][1] for i in range(2)), f"slides ran one after another: {spans}"

    store = tmp_path / "killed-cohort.zarr"
    args = [*map(str, slides), str(store), "--weights", str(weights), "--chunk", "512", "--quiet"]
    killed = subprocess.run(CLI + ["run", *args], env={**os.environ, "WSI_XR_KILL_AT": "chunk-done#6"}, capture_output=True, text=True)
    assert killed.returncode == -9, killed.stderr[-500:]
    rerun = subprocess.run(CLI + ["run", *args], capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr[-800:]
    resumed = xr.open_datatree(store, engine="zarr")
    for name, path in zip(alone, slides):  # the CLI sets torch threads ("auto"): latents within float32 rounding
        tolerance = latent_tolerance(path, weights, alone[name].tile_mask.values)
        _assert_same_store(alone[name], resumed[name].to_dataset().compute(), tolerance)


def test_a_slide_without_a_whole_tile_gives_no_rows_in_a_cohort(synth_slide: Path, weights: Path, tmp_path: Path) -> None:
    """A 40 x 30 slide (no 64-px tile) in a cohort: 0 rows for it, the others' rows, a Parquet file (75c0752: ZeroDivisionError)."""
    tiny = tmp_path / "tiny.tif"
    write_synthetic_slide(tiny, 40, 30, seed=1)
    store = tmp_path / "cohort.zarr"
    tree = process_slides([synth_slide, tiny], store, weights=weights, progress=False)
    assert tree["tiny"].to_dataset().sizes["tile_y"] == 0 and tree["tiny"].to_dataset().wsi.attrs["complete"] is True
    empty = to_dataframe(xr.open_zarr(store, group="tiny", consolidated=False))
    assert len(empty) == 0 and list(empty.columns) == ["x", "y", *[f"latent_{i}" for i in range(32)]]
    rows = write_parquet(store, tmp_path / "rows.parquet")
    back = pd.read_parquet(tmp_path / "rows.parquet")
    expected = int(tree[synth_slide.stem].tile_mask.sum())
    assert rows == len(back) == expected > 0 and set(back.slide) == {synth_slide.stem}
    run = subprocess.run(
        CLI
        + [
            "run",
            str(synth_slide),
            str(tiny),
            str(tmp_path / "cli.zarr"),
            "--weights",
            str(weights),
            "--parquet",
            str(tmp_path / "cli.parquet"),
            "--scheduler",
            "threads",
            "--quiet",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    assert len(pd.read_parquet(tmp_path / "cli.parquet")) == expected


def test_tissue_tiles_accessor_selects_the_tissue_tiles_lazily(synth_slide: Path, weights: Path, tmp_path: Path) -> None:
    process_slide(synth_slide, tmp_path / "s.zarr", weights=weights, chunks=512, progress=False)
    ds = xr.open_zarr(tmp_path / "s.zarr", consolidated=False)
    tissue = ds.wsi.tissue_tiles()
    assert tissue.latent.dims == ("tile", "feature") and isinstance(tissue.latent.data, dask.array.Array)  # still lazy
    mask = ds.tile_mask.values
    rows, cols = np.nonzero(mask)
    assert tissue.sizes["tile"] == int(mask.sum()) > 0
    np.testing.assert_array_equal(tissue.tile_y.values, ds.tile_y.values[rows])
    np.testing.assert_array_equal(tissue.tile_x.values, ds.tile_x.values[cols])
    np.testing.assert_array_equal(tissue.latent.values, ds.latent.values[rows, cols])  # an independent indexing
    assert not np.isnan(tissue.latent.values).any()
    # The plain-xarray idiom works once the (small) mask is in memory.
    boxed = ds.latent.where(ds.tile_mask.compute(), drop=True)
    assert int(np.isfinite(boxed.values[..., 0]).sum()) == int(mask.sum())
    one = ds.wsi.tissue_tiles("tile_variance")
    assert list(one.data_vars) == ["tile_variance"] and (one.tile_variance.values > float(ds.attrs["threshold"])).all()
    with pytest.raises(wsi_xr.InvalidArgumentError, match="no variable 'nope'"):
        ds.wsi.tissue_tiles("nope")
