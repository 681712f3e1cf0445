"""Composability: any mix of wsi_xr graphs computes correctly in one ``dask.compute``.

Every Dask layer is named from a token of everything that decides its output, so two
different masks, encodings or pipeline runs never share a key. Each test computes a pair
together and compares it with the same two objects computed separately (on 75c0752 the
pairs shared keys and both got one result).
"""

from __future__ import annotations

from pathlib import Path

import dask
import numpy as np
import pytest
import torch
import xarray as xr

import wsi_xr
from tests.numerics import assert_latents_agree, latent_tolerance
from wsi_xr.datasets.synth import write_synthetic_slide
from wsi_xr.models import VAE2, save_vae


@pytest.fixture(scope="module")
def two_slides(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Two 2048² slides of different tissue (60% and 20%), as in the issue's report."""
    folder = tmp_path_factory.mktemp("compose")
    a, b = folder / "a.tif", folder / "b.tif"
    write_synthetic_slide(a, 2048, 2048, seed=1, tissue_fraction=0.6)
    write_synthetic_slide(b, 2048, 2048, seed=7, tissue_fraction=0.2)
    return a, b


@pytest.fixture(scope="module")
def two_models(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("models")
    paths = []
    for seed in (11, 12):
        torch.manual_seed(seed)
        path = folder / f"vae-{seed}.pt"
        save_vae(VAE2().eval(), path)
        paths.append(path)
    return paths[0], paths[1]


def _assert_same(together: xr.Dataset | xr.DataArray, alone: xr.Dataset | xr.DataArray) -> None:
    xr.testing.assert_identical(together, alone)


def _assert_same_latents(together: xr.DataArray, alone: xr.DataArray, slide: Path, model: object, tile_mask: np.ndarray) -> None:
    """The same latent cube: coordinates, attributes and NaN (non-tissue) tiles identical, values
    within float32 rounding. The kernels' summation order follows torch's thread count, which
    earlier work in the process may have left different in Dask's threads; a shared key gives
    another slide's or model's latents, off by orders of magnitude more."""
    xr.testing.assert_identical(together.isnull(), alone.isnull())
    assert together.attrs == alone.attrs
    assert_latents_agree(together.values, alone.values, latent_tolerance(slide, model, tile_mask), "latents computed together")


def test_masks_of_two_slides_computed_together(two_slides: tuple[Path, Path]) -> None:
    ia, ib = (wsi_xr.open_slide(p) for p in two_slides)
    ma, mb = wsi_xr.tissue_mask(ia, threshold=50), wsi_xr.tissue_mask(ib, threshold=50)
    alone_a, alone_b = ma.compute(), mb.compute()
    assert int(alone_a.tile_mask.sum()) != int(alone_b.tile_mask.sum())  # the pair really differs
    together_a, together_b = dask.compute(ma, mb)
    _assert_same(together_a, alone_a)
    _assert_same(together_b, alone_b)


@pytest.mark.parametrize("threshold", [50, "auto"])
def test_two_patch_sizes_computed_together(two_slides: tuple[Path, Path], threshold: float | str) -> None:
    image = wsi_xr.open_slide(two_slides[1])
    m256, m512 = (wsi_xr.tissue_mask(image, patch=p, threshold=threshold) for p in (256, 512))
    alone = (m256.compute(), m512.compute())
    assert alone[0].sizes["patch_y"] != alone[1].sizes["patch_y"]
    together = dask.compute(m256, m512)
    for t, a in zip(together, alone):
        _assert_same(t, a)


def test_pen_rejection_on_and_off_computed_together(tmp_path: Path) -> None:
    slide = tmp_path / "pen.tif"
    write_synthetic_slide(slide, 2048, 2048, seed=4, tissue_fraction=0.4, pen_strokes=3)
    image = wsi_xr.open_slide(slide)
    off, on = wsi_xr.tissue_mask(image, threshold=50), wsi_xr.tissue_mask(image, threshold=50, reject_pen=True)
    alone_off, alone_on = off.compute(), on.compute()
    assert int(alone_on.pen_mask.sum()) > 0 and int(alone_on.tile_mask.sum()) < int(alone_off.tile_mask.sum())
    for first, second in ((off, on), (on, off)):  # in either order (a shared key takes one side's value)
        together = dict(zip(("first", "second"), dask.compute(first, second)))
        _assert_same(together["first"], alone_off if first is off else alone_on)
        _assert_same(together["second"], alone_on if first is off else alone_off)


def test_encodings_of_two_slides_and_two_models_computed_together(two_slides: tuple[Path, Path], two_models: tuple[Path, Path]) -> None:
    ia, ib = (wsi_xr.open_slide(p) for p in two_slides)
    ma, mb = (wsi_xr.tissue_mask(i, threshold=50).compute() for i in (ia, ib))
    pairs = {
        "two slides": ((ia, ma, two_slides[0], two_models[0]), (ib, mb, two_slides[1], two_models[0])),
        "two models": ((ia, ma, two_slides[0], two_models[0]), (ia, ma, two_slides[0], two_models[1])),
    }
    for what, cases in pairs.items():
        first, second = (wsi_xr.encode(image, mask, model) for image, mask, _, model in cases)
        alone = (first.compute(), second.compute())
        assert not np.array_equal(alone[0].values, alone[1].values, equal_nan=True), what
        together = dask.compute(first, second)
        for t, a, (_, mask, slide, model) in zip(together, alone, cases):
            _assert_same_latents(t, a, slide, model, mask.tile_mask.values)


def test_model_objects_computed_together(two_slides: tuple[Path, Path]) -> None:
    image = wsi_xr.open_slide(two_slides[0])
    mask = wsi_xr.tissue_mask(image, threshold=50).compute()
    models = []
    for seed in (21, 22):
        torch.manual_seed(seed)
        models.append(VAE2().eval())
    first, second = (wsi_xr.encode(image, mask, m) for m in models)
    alone = (first.compute(), second.compute())
    together = dask.compute(first, second)
    assert not np.array_equal(alone[0].values, alone[1].values, equal_nan=True)
    for t, a, model in zip(together, alone, models):
        _assert_same_latents(t, a, two_slides[0], model, mask.tile_mask.values)


def test_two_stores_with_the_same_folder_name_on_one_client(two_slides: tuple[Path, Path], two_models: tuple[Path, Path], tmp_path: Path) -> None:
    """Two pipeline runs into ``a/out.zarr`` and ``b/out.zarr``, their chunks in one computation."""
    from distributed import Client, LocalCluster

    from wsi_xr.pipeline import validate_run_options
    from wsi_xr.pipeline.run import _prepare, _run_all

    options = validate_run_options(two_models[0], chunks=1024)
    alone = [
        wsi_xr.process_slide(slide, tmp_path / f"alone-{i}.zarr", weights=two_models[0], chunks=1024, progress=False)
        for i, slide in enumerate(two_slides)
    ]
    stores = [tmp_path / "a" / "out.zarr", tmp_path / "b" / "out.zarr"]
    with LocalCluster(n_workers=1, threads_per_worker=2, processes=False, dashboard_address=":0") as cluster, Client(cluster) as client:
        for store in stores:
            store.parent.mkdir()
        runs = [_prepare(slide, store, None, options, False, "auto", client) for slide, store in zip(two_slides, stores)]
        _run_all(runs, client, progress=False)
    for store, reference, slide in zip(stores, alone, two_slides):
        ds = xr.open_zarr(store, consolidated=False)
        assert ds.attrs["complete"]
        assert ds.attrs["tissue_tiles"] == reference.attrs["tissue_tiles"] > 0
        np.testing.assert_array_equal(ds.tile_mask.values, reference.tile_mask.values)
        tolerance = latent_tolerance(slide, two_models[0], reference.tile_mask.values)
        assert_latents_agree(ds.latent.values, reference.latent.values, tolerance, f"{store}: latents")


def test_every_layer_name_carries_a_token(two_slides: tuple[Path, Path], two_models: tuple[Path, Path]) -> None:
    """No layer of a mask or an encoding has a fixed name (a fixed name is shared by every graph)."""
    image = wsi_xr.open_slide(two_slides[0])
    mask = wsi_xr.tissue_mask(image, threshold=50)
    latent = wsi_xr.encode(image, mask, two_models[0])
    for collection in (mask, latent):
        for name in collection.__dask_graph__().layers:
            prefix, _, token = str(name).rpartition("-")
            assert prefix and len(token) >= 16, f"layer {name!r} is not named from a token"
