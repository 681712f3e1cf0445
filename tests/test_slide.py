"""open_slide / open_pyramid / .wsi accessor / xarray backend: laziness, coordinates, schedulers."""

from __future__ import annotations

from pathlib import Path

import dask
import numpy as np
import pytest
import tifffile
import xarray as xr

import wsi_xr
from wsi_xr.readers import read_stats, reset_read_stats
from wsi_xr.slide import default_chunk_size


def test_open_slide_dims_coords_attrs(cmu: Path) -> None:
    image = wsi_xr.open_slide(cmu)
    assert image.dims == ("y", "x", "c") and image.dtype == np.uint8
    assert list(image.c.values) == ["R", "G", "B"]
    assert image.y.dtype == np.int64 and int(image.x[-1]) == 2219
    for key in ("mpp", "level", "downsample", "backend", "vendor", "source"):
        assert key in image.attrs
    assert image.attrs["backend"] == "cucim" and image.attrs["vendor"] == "aperio"
    # default chunks: multiple of 256 and of the 240-px TIFF tile
    side = default_chunk_size(wsi_xr.probe(cmu).levels[0])
    assert side == 3840  # lcm(240, 256): chunk borders fall on TIFF tile borders
    assert image.data.chunks[0] == (2967,)  # one exact block: the slide is smaller
    np.testing.assert_array_equal(image.values, tifffile.imread(cmu))


def test_lower_level_coordinates_are_level0_offsets(synth_slide: Path) -> None:
    tree = wsi_xr.open_pyramid(synth_slide)
    info = wsi_xr.probe(synth_slide)
    assert list(tree.children) == [f"level_{i}" for i in range(len(info.levels))]
    level1 = tree["level_1"]["image"]
    ds = info.levels[1].downsample_x
    assert level1.x.values[5] == round(5 * ds)
    assert level1.attrs["level"] == 1 and level1.attrs["downsample"] == pytest.approx(info.levels[1].downsample)
    # aligned by label: the level-1 pixel at x=10 covers level-0 pixels 10..11
    level0 = tree["level_0"]["image"]
    block0 = level0.sel(y=slice(100, 101), x=slice(10, 11)).astype(float).mean(("y", "x"))
    pixel1 = level1.sel(y=100, x=10).astype(float)
    assert np.abs(block0.values - pixel1.values).max() < 30


@pytest.mark.parametrize("chunks", [512, 1000, (300, 700), {"y": 256, "x": 2048}])
def test_chunks_exact_edges_and_values(synth_slide: Path, chunks: object) -> None:
    image = wsi_xr.open_slide(synth_slide, chunks=chunks)
    chunks_y, chunks_x, _ = image.data.chunks
    assert sum(chunks_y) == 2600 and sum(chunks_x) == 3000  # edge blocks exact, no padding
    np.testing.assert_array_equal(image.values, tifffile.imread(synth_slide, level=0))


def test_one_reader_call_per_block(synth_slide: Path) -> None:
    image = wsi_xr.open_slide(synth_slide, chunks=1024)
    reset_read_stats()
    with dask.config.set(scheduler="threads"):
        image.sum().compute()
    stats = read_stats()
    assert stats.calls == image.data.npartitions
    assert stats.pixels_requested == 3000 * 2600


def test_building_reads_nothing(large_synth_slide: Path) -> None:
    reset_read_stats()
    image = wsi_xr.open_slide(large_synth_slide, chunks=512)
    tree = wsi_xr.open_pyramid(large_synth_slide)
    tiles = image.wsi.tiles(64)
    _ = image[1000:2000, 3000:5000].mean("c")  # slicing and arithmetic stay lazy
    assert image.shape == (16384, 16384, 3) and tiles.shape[:2] == (256, 256)
    assert len(tree.children) >= 6
    assert read_stats().calls == 0
    # a window reads only the blocks it touches
    image[0:10, 0:10].values
    assert read_stats().calls == 1


def test_default_chunks_align_to_tiles(synth_slide: Path) -> None:
    info = wsi_xr.probe(synth_slide)
    side = default_chunk_size(info.levels[0])
    assert side % 256 == 0 and side >= 2048


def test_tiles_accessor(synth_slide: Path) -> None:
    image = wsi_xr.open_slide(synth_slide, chunks=512)
    tiles = image.wsi.tiles(64)
    assert tiles.dims == ("tile_y", "tile_x", "y_in_tile", "x_in_tile", "c")
    assert tiles.shape == (2600 // 64, 3000 // 64, 64, 64, 3)
    assert tiles.tile_x.values[3] == 192 and tiles.tile_y.values[-1] == (2600 // 64 - 1) * 64
    # whole tiles per block: no rechunk (512-px blocks = 8 tiles; the 40/440-px edge
    # blocks keep only their full tiles)
    assert tiles.data.chunks[0] == (8,) * 5 and tiles.data.chunks[1] == (8,) * 5 + (6,)
    full = tifffile.imread(synth_slide, level=0)
    np.testing.assert_array_equal(tiles.isel(tile_y=7, tile_x=11).values, full[7 * 64 : 8 * 64, 11 * 64 : 12 * 64])
    # on level 1 tile coordinates are level-0 offsets
    level1 = wsi_xr.open_slide(synth_slide, level=1).wsi.tiles(64)
    assert level1.tile_x.values[1] == round(64 * 3000 / 1500)
    with pytest.raises(wsi_xr.InvalidArgumentError):
        image.wsi.tiles(0)


def test_xarray_backend_follows_xarrays_conventions(synth_slide: Path) -> None:
    from wsi_xr.readers import clear_caches, trace_reads

    direct = wsi_xr.open_slide(synth_slide)
    lazy = xr.open_dataarray(synth_slide, engine="wsi_xr")  # no chunks=: xarray's lazy indexing, no Dask
    assert not isinstance(lazy.variable._data, dask.array.Array) and lazy.name == "image"
    assert lazy.attrs == direct.attrs and lazy.encoding["source"] == direct.encoding["source"]
    xr.testing.assert_identical(lazy.coords.to_dataset(), direct.coords.to_dataset())
    clear_caches()
    with trace_reads() as calls:
        window = lazy.isel(y=slice(1000, 1300, 2), x=slice(2000, 2100)).values
    assert calls == [(0, 1000, 2000, 299, 100)]  # one read of the covering window, nothing else
    np.testing.assert_array_equal(window, tifffile.imread(synth_slide, level=0)[1000:1300:2, 2000:2100])
    np.testing.assert_array_equal(lazy.isel(y=7, x=slice(30, 10, -3)).values, direct.isel(y=7, x=slice(30, 10, -3)).values)
    chunked = xr.open_dataarray(synth_slide, engine="wsi_xr", chunks={})  # the file's preferred chunks
    assert chunked.chunks == direct.chunks and chunked.encoding["preferred_chunks"]["y"] == direct.chunks[0][0]
    xr.testing.assert_identical(
        chunked.isel(y=slice(0, 700), x=slice(900, 1300)).compute(), direct.isel(y=slice(0, 700), x=slice(900, 1300)).compute()
    )
    assert xr.open_dataarray(synth_slide, engine="wsi_xr", chunks={"y": 4096, "x": 2048}).chunks[:2] == ((2600,), (2048, 952))
    level2 = xr.open_dataarray(synth_slide, engine="wsi_xr", level=2, chunks={})
    xr.testing.assert_identical(level2.compute(), wsi_xr.open_slide(synth_slide, level=2).compute())
    dropped = xr.open_dataset(synth_slide, engine="wsi_xr", drop_variables=["image"])
    assert list(dropped.data_vars) == [] and dropped.sizes["y"] == 2600
    tree = xr.open_datatree(synth_slide, engine="wsi_xr", chunks={})
    pyramid = wsi_xr.open_pyramid(synth_slide)
    assert list(tree.children) == list(pyramid.children) and tree.attrs == pyramid.attrs
    xr.testing.assert_identical(tree["level_1"].image.compute(), pyramid["level_1"].image.compute())


def test_backend_guesses_every_format_the_probe_reads(tmp_path: Path) -> None:
    from wsi_xr.xarray_backend import WsiXrBackendEntrypoint

    entry = WsiXrBackendEntrypoint()
    for name in ("a.svs", "b.NDPI", "c.mrxs", "d.scn", "e.bif", "f.vms", "g.ome.tif", "h.qptiff"):
        assert entry.guess_can_open(tmp_path / name), name
    assert not entry.guess_can_open(tmp_path / "notes.txt") and not entry.guess_can_open(42)
    dicom = tmp_path / "dicom-slide"
    dicom.mkdir()
    (dicom / "level-0.dcm").write_bytes(b"")
    assert entry.guess_can_open(dicom) and not entry.guess_can_open(tmp_path)


def test_the_same_slide_opened_either_way_gives_the_same_mask_from_the_same_reads(tmp_path: Path) -> None:
    """75c0752: masked after xr.open_dataset(..., chunks={}) it read every patch (coarse_level -1)."""
    from wsi_xr.datasets.synth import write_synthetic_slide
    from wsi_xr.readers import clear_caches, trace_reads

    slide = tmp_path / "s4096.tif"
    write_synthetic_slide(slide, 4096, 4096, seed=9, tissue_fraction=0.2)
    results = []
    for image in (wsi_xr.open_slide(slide), xr.open_dataset(slide, engine="wsi_xr", chunks={})["image"]):
        clear_caches()
        with trace_reads() as calls:
            mask = wsi_xr.tissue_mask(image).compute()
        results.append((mask, sorted(calls)))
    (first, first_reads), (second, second_reads) = results
    xr.testing.assert_identical(first, second)
    assert first.attrs["coarse_level"] > 0 and first.attrs["patches_read"] < first.attrs["patches_total"]
    assert first.attrs["file_tiles_total"] > 0
    assert first_reads == second_reads
    modified = xr.open_dataset(slide, engine="wsi_xr", chunks={})["image"].isel(y=slice(0, 2048))  # not the file: read as given
    assert wsi_xr.tissue_mask(modified).attrs["coarse_level"] == -1


def test_invalid_arguments(synth_slide: Path) -> None:
    with pytest.raises(wsi_xr.InvalidArgumentError, match="level=9"):
        wsi_xr.open_slide(synth_slide, level=9)
    with pytest.raises(wsi_xr.InvalidArgumentError, match="chunks"):
        wsi_xr.open_slide(synth_slide, chunks=0)
    with pytest.raises(wsi_xr.InvalidArgumentError, match="backend"):
        wsi_xr.open_slide(synth_slide, backend="no-such-backend")


def test_same_pixels_threads_and_process_cluster(synth_slide: Path) -> None:
    distributed = pytest.importorskip("distributed")
    image = wsi_xr.open_slide(synth_slide, level=0, chunks=1024)
    region = image[500:2300, 700:2900]
    with dask.config.set(scheduler="threads"):
        threaded = region.values
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        with distributed.Client(cluster) as client:
            on_cluster = region.compute().values
            # the reads happened in the worker processes, not here
            worker_calls = client.run(lambda: __import__("wsi_xr.readers", fromlist=["x"]).read_stats().calls)
    np.testing.assert_array_equal(threaded, on_cluster)
    assert sum(worker_calls.values()) >= 1
