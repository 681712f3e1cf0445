"""xarray conventions: stores write with plain ``ds.to_netcdf`` and read back with their attribute
types (resume, ownership and migration of earlier stores unchanged); slides and tile grids draw
with y downward and extents on pixel edges, so overlays align."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import xarray as xr
import zarr
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

import wsi_xr
from wsi_xr.datasets.synth import write_synthetic_slide
from wsi_xr.pipeline import process_slide, process_slides
from wsi_xr.store import ATTR_TYPES, LAYOUT_VERSION, decode_attrs, encode_attrs, migrate_store, open_store, update_attrs, write_zarr

WIDTH, HEIGHT = 700, 600  # not multiples of the 64-px tile: partial edge tiles are dropped from the grid
SETTINGS: dict[str, Any] = {"chunks": 256, "reject_pen": True, "progress": False}


@pytest.fixture(scope="module")
def slide(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A slide whose file does not state its mpp (``attrs["mpp"]`` is None)."""
    path = tmp_path_factory.mktemp("conventions") / "no-mpp.tif"
    write_synthetic_slide(path, WIDTH, HEIGHT, seed=11, tissue_fraction=0.5, mpp=None)
    return path


@pytest.fixture(scope="module")
def run(slide: Path, weights: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, xr.Dataset]:
    """A pipeline store of ``slide``, and what ``process_slide`` returned."""
    store = tmp_path_factory.mktemp("conventions") / "s.zarr"
    return store, process_slide(slide, store, weights=weights, **SETTINGS)


def _assert_same_data(a: xr.Dataset, b: xr.Dataset) -> None:
    """Every variable and coordinate: same dims, dtype and values (NaN where NaN)."""
    assert set(a.variables) == set(b.variables)
    for name in a.variables:
        x, y = a[name].values, b[name].values
        assert a[name].dims == b[name].dims and x.dtype == y.dtype, (name, x.dtype, y.dtype)
        np.testing.assert_array_equal(x, y, err_msg=str(name))  # NaN equals NaN here


def _written_by_0_2_0(folder: Path) -> None:
    """Rewrite a group's attributes as wsi_xr 0.2.0 wrote them: JSON natives (a dict, bools, null)."""
    meta = folder / "zarr.json"
    doc = json.loads(meta.read_text())
    attrs = doc["attributes"]
    for name, kind in json.loads(attrs.pop(ATTR_TYPES)).items():
        attrs[name] = json.loads(attrs[name]) if kind == "json" else bool(attrs[name]) if kind == "bool" else None
    meta.write_text(json.dumps(doc))
    assert isinstance(attrs["wsi_xr_run"], dict) and attrs["complete"] is True and attrs["reject_pen"] is True


# ----------------------------------------------------------------------------- netCDF


def test_store_writes_to_netcdf_and_reads_back_with_its_attribute_types(slide: Path, run: tuple[Path, xr.Dataset], tmp_path: Path) -> None:
    store, returned = run
    opened = xr.open_zarr(store)
    assert isinstance(opened.attrs["wsi_xr_run"], str)  # stored as JSON text...
    assert opened.attrs["complete"] == 1 and "mpp" not in opened.attrs  # ...a bool as 1, None left out
    written = []
    for number, ds in enumerate((opened, returned, open_store(store))):  # every way a user gets the Dataset
        path = tmp_path / f"x{number}.nc"
        ds.to_netcdf(path)  # plain xarray, default engine
        written.append(path)
    assert written[0].read_bytes()[:8] == b"\x89HDF\r\n\x1a\n"  # netCDF-4: int64 coordinates need it
    back = wsi_xr.open_store(written[0])  # the package-level name
    _assert_same_data(opened.compute(), back.compute())
    assert back.tile_mask.dtype == bool and back.tile_y.dtype == np.int64 and back.latent.dtype == np.float32
    assert np.isnan(back.latent.values).any() and bool(back.tile_mask.any())  # the round trip carried NaN and True
    attrs = back.wsi.attrs
    assert attrs == opened.wsi.attrs  # the same from the netCDF file as from the store
    assert attrs["complete"] is True and attrs["reject_pen"] is True and attrs["mpp"] is None
    assert type(attrs["tile"]) is int and type(attrs["threshold"]) is float and attrs["tile"] == 64
    run_attrs = attrs["wsi_xr_run"]
    assert isinstance(run_attrs, dict) and run_attrs["layout"] == LAYOUT_VERSION and run_attrs["source"] == str(slide.resolve())
    assert run_attrs["chunks"] == [[256, 256, 88], [256, 256, 188]]  # lists stay lists (WIDTH 700, HEIGHT 600)
    assert attrs["tissue_tiles"] == int(back.tile_mask.sum())
    assert ATTR_TYPES not in attrs
    again = tmp_path / "again.nc"
    back.to_netcdf(again)  # what wsi_xr read back writes again
    assert open_store(again).wsi.attrs == attrs


def test_resume_and_ownership_checks_read_both_encodings(slide: Path, weights: Path, run: tuple[Path, xr.Dataset], tmp_path: Path) -> None:
    store, _ = run
    # the fingerprint is compared decoded: the same run resumes (nothing to do), another is refused
    assert process_slide(slide, store, weights=weights, **SETTINGS).wsi.attrs["complete"] is True
    with pytest.raises(wsi_xr.StoreError, match=r"different parameters \(patch differ\)"):
        process_slide(slide, store, weights=weights, patch=128, **SETTINGS)
    # a store as 0.2.0 wrote it (a dict, bools, None): resumed, checked, and netCDF-safe from then on
    old = tmp_path / "old.zarr"
    process_slide(slide, old, weights=weights, **SETTINGS)
    _written_by_0_2_0(old)
    with pytest.raises(TypeError, match="Invalid value for attr 'wsi_xr_run'"):
        xr.open_zarr(old, consolidated=False).to_netcdf(tmp_path / "fails.nc")  # the issue, as it was
    assert wsi_xr.verify_store(old).ok
    with pytest.raises(wsi_xr.StoreError, match="different parameters"):
        process_slide(slide, old, weights=weights, **{**SETTINGS, "reject_pen": False})
    resumed = process_slide(slide, old, weights=weights, **SETTINGS)
    assert isinstance(resumed.attrs["wsi_xr_run"], str) and resumed.wsi.attrs == xr.open_zarr(store).wsi.attrs  # same slide, same run
    resumed.to_netcdf(tmp_path / "resumed.nc")
    assert wsi_xr.verify_store(old).ok


def test_migrate_encodes_the_attributes_of_0_2_0_stores(slide: Path, weights: Path, tmp_path: Path) -> None:
    other = tmp_path / "other.tif"
    write_synthetic_slide(other, 320, 320, seed=12, tissue_fraction=0.6)
    cohort = tmp_path / "cohort.zarr"
    process_slides([slide, other], cohort, weights=weights, **SETTINGS)
    for name in ("no-mpp", "other"):
        _written_by_0_2_0(cohort / name)
    root = zarr.open_group(cohort, mode="r+", zarr_format=3, use_consolidated=False)
    root.attrs.put({"wsi_xr_cohort": {"layout": LAYOUT_VERSION}, "slides": {"no-mpp": str(slide), "other": str(other)}})  # 0.2.0's root
    assert sorted(migrate_store(cohort)) == ["/", "no-mpp", "other"]
    assert migrate_store(cohort) == []  # once is enough
    tree = xr.open_datatree(cohort, engine="zarr")
    tree.to_netcdf(tmp_path / "cohort.nc")  # every group and the root: netCDF-safe
    back = open_store(tmp_path / "cohort.nc", group="other")
    assert back.wsi.attrs["complete"] is True and back.wsi.attrs["mpp"] == 0.5
    _assert_same_data(xr.open_zarr(cohort, group="other").compute(), back.compute())


def test_a_cohort_writes_to_netcdf_as_a_tree(slide: Path, weights: Path, tmp_path: Path) -> None:
    other = tmp_path / "other.tif"
    write_synthetic_slide(other, 320, 320, seed=13, tissue_fraction=0.6)
    tree = process_slides([slide, other], tmp_path / "cohort.zarr", weights=weights, **SETTINGS)
    tree.to_netcdf(tmp_path / "cohort.nc")  # the root's `slides` and marker too
    back = xr.open_datatree(tmp_path / "cohort.nc")
    assert decode_attrs(back.attrs)["slides"] == {"no-mpp": str(slide.resolve()), "other": str(other.resolve())}
    for name in ("no-mpp", "other"):
        _assert_same_data(tree[name].to_dataset().compute(), open_store(tmp_path / "cohort.nc", group=name).compute())


def test_mask_stores_write_to_netcdf_too(slide: Path, tmp_path: Path) -> None:
    mask = wsi_xr.tissue_mask(wsi_xr.open_slide(slide), threshold=100.0).compute()
    assert mask.attrs["reject_pen"] is False  # the in-memory mask holds Python types
    store = write_zarr(mask, tmp_path / "m.zarr")
    xr.open_zarr(store).to_netcdf(tmp_path / "m.nc")
    back = open_store(tmp_path / "m.nc")
    assert back.wsi.attrs["wsi_xr_mask"] == {"layout": LAYOUT_VERSION} and back.wsi.attrs["reject_pen"] is False
    assert back.wsi.attrs["mpp"] is None and float(back.threshold) == 100.0
    _assert_same_data(xr.open_zarr(store).compute(), back.compute())


def test_attribute_encoding_round_trips_every_json_type_through_a_real_netcdf_file(tmp_path: Path) -> None:
    original = {
        "flag": True,
        "off": False,
        "nothing": None,
        "run": {"chunks": [[256, 88]], "layout": 2, "nested": {"a": None}},
        "one": [5],  # netCDF gives a one-element list back as a scalar: encoded, it is a list again
        "words": ["a", "b"],
        "pair": (1, 2),
        "huge": 2**70,
        "count": np.int64(7),
        "share": np.float32(0.25),
        "text": "plain",
        "empty": "",
        "nan": math.nan,
    }
    encoded = encode_attrs(original)
    assert encode_attrs(encoded) == encoded  # encoding twice changes nothing
    path = tmp_path / "a.nc"
    xr.Dataset({"v": ("x", np.arange(3))}, attrs=encoded).to_netcdf(path)
    with xr.open_dataset(path) as ds:
        decoded = decode_attrs(ds.attrs)
    expected = {**original, "pair": [1, 2], "count": 7, "share": 0.25, "nan": decoded["nan"]}
    assert decoded == expected and math.isnan(decoded["nan"])
    assert type(decoded["count"]) is int and type(decoded["flag"]) is bool and type(decoded["share"]) is float
    # what earlier releases wrote (no record of types) passes through
    assert decode_attrs({"wsi_xr_run": {"layout": 2}, "complete": True}) == {"wsi_xr_run": {"layout": 2}, "complete": True}
    # updating keeps the record right: None becomes a string, a string becomes a bool
    target = dict(encoded)
    update_attrs(target, {"nothing": "now/a/path", "text": True})
    types = json.loads(target[ATTR_TYPES])
    assert "nothing" not in types and types["text"] == "bool" and target["nothing"] == "now/a/path" and target["text"] == 1
    assert decode_attrs(target) == {**expected, "nothing": "now/a/path", "text": True, "nan": decode_attrs(target)["nan"]}
    with pytest.raises(wsi_xr.StoreError, match=ATTR_TYPES):
        decode_attrs({ATTR_TYPES: "{not json", "x": 1})
    with pytest.raises(wsi_xr.StoreError, match="attribute 'where'.*Path"):
        encode_attrs({"where": Path("/tmp")})


def test_open_store_names_a_file_that_is_neither(tmp_path: Path) -> None:
    bogus = tmp_path / "notes.nc"
    bogus.write_text("not a netCDF file")
    with pytest.raises(wsi_xr.StoreError, match=r"notes\.nc: a file, but neither a netCDF file nor a Zarr store"):
        open_store(bogus)
    with pytest.raises(wsi_xr.StoreError, match="no such store or netCDF file"):
        open_store(tmp_path / "missing.nc")


# ----------------------------------------------------------------------------- drawing


def _image(level_shape: tuple[int, int], downsample: int, seed: int = 0) -> xr.DataArray:
    """A random RGB level ``(y, x, c)`` with level-0 coordinates, as ``open_slide`` gives."""
    pixels = np.random.default_rng(seed).integers(0, 256, (*level_shape, 3), dtype=np.uint8)
    ny, nx = level_shape
    coords = {"y": np.arange(ny) * downsample, "x": np.arange(nx) * downsample, "c": ["R", "G", "B"]}
    return xr.DataArray(pixels, dims=("y", "x", "c"), coords=coords, attrs={"downsample": float(downsample)})


def _canvas(width: int, height: int) -> tuple[Figure, Any]:
    """Axes filling a figure of ``width`` x ``height`` screen pixels, no frame: one screen pixel per level-0 px."""
    fig = Figure(figsize=(width / 100, height / 100), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_axes((0, 0, 1, 1))
    ax.set_axis_off()
    return fig, ax


def test_image_and_tile_overlay_align_on_pixel_edges_y_downward(slide: Path, run: tuple[Path, xr.Dataset]) -> None:
    store, _ = run
    ds = xr.open_zarr(store)
    image = wsi_xr.open_slide(slide, level=1)  # 350 x 300 px, each covering 2 x 2 level-0 px
    artist = image.wsi.plot()
    ax = artist.axes
    assert artist.get_extent() == [0, WIDTH, HEIGHT, 0]  # level-0 pixel edges: [0, 700) x [0, 600)
    overlay = ds.wsi.plot("tile_mask", ax=ax)
    ntx, nty = WIDTH // 64, HEIGHT // 64  # whole tiles only
    assert overlay.get_extent() == [0, ntx * 64, nty * 64, 0]
    # each tile border falls on an image pixel edge: tile j spans [64 j, 64 (j + 1)), i.e. image pixels 32 j ... 32 j + 31
    left, right, bottom, top = overlay.get_extent()
    x_borders = left + np.arange(ntx + 1) * (right - left) / ntx
    y_borders = top + np.arange(nty + 1) * (bottom - top) / nty
    np.testing.assert_array_equal(x_borders, np.append(ds.tile_x.values, ds.tile_x.values[-1] + 64))
    np.testing.assert_array_equal(y_borders, np.append(ds.tile_y.values, ds.tile_y.values[-1] + 64))
    image_left, _, _, image_top = artist.get_extent()
    step = image.attrs["downsample"]
    assert np.all((x_borders - image_left) % step == 0) and np.all((y_borders - image_top) % step == 0)
    # y increases downward: the axis is inverted, and y = 0 is drawn above y = 100
    assert ax.yaxis_inverted() and ax.get_ylim() == (HEIGHT, 0) and ax.get_xlim() == (0, WIDTH)
    assert ax.transData.transform((0, 0))[1] > ax.transData.transform((0, 100))[1]
    # plain xarray centres pixels on their coordinates: the tile mask lands half a tile off
    _, plain_ax = _canvas(WIDTH, HEIGHT)
    plain = ds.tile_mask.plot.imshow(ax=plain_ax, yincrease=False, add_colorbar=False)
    assert plain.get_extent()[0] == -32
    # ... unless its coordinates are moved to the centres first (the README's recipe)
    half = ds.tile_mask.assign_coords(tile_x=ds.tile_x + 32, tile_y=ds.tile_y + 32)
    assert half.plot.imshow(ax=plain_ax, yincrease=False, add_colorbar=False).get_extent() == overlay.get_extent()
    centred = image.assign_coords(x=image.x + step / 2, y=image.y + step / 2).plot.imshow(ax=plain_ax, yincrease=False)
    assert centred.get_extent() == artist.get_extent()


def test_rendered_overlay_covers_exactly_its_tiles() -> None:
    """Drawn at one screen pixel per level-0 px, screen pixel (row r, column c) must show level-0
    pixel (x=c, y=r): the level-1 image pixel (r // 2, c // 2), painted over where tile
    (r // 64, c // 64) is True."""
    image = _image((HEIGHT // 2, WIDTH // 2), downsample=2, seed=1)
    nty, ntx = HEIGHT // 64, WIDTH // 64
    mask = np.random.default_rng(2).random((nty, ntx)) > 0.5
    grid = xr.Dataset(
        {"tile_mask": (("tile_y", "tile_x"), mask)}, coords={"tile_y": np.arange(nty) * 64, "tile_x": np.arange(ntx) * 64}, attrs={"tile": 64}
    )
    fig, ax = _canvas(WIDTH, HEIGHT)
    image.wsi.plot(ax=ax)
    grid.wsi.plot(ax=ax, colour="#ff0000", alpha=1.0)
    fig.canvas.draw()
    drawn = np.asarray(fig.canvas.buffer_rgba())[..., :3]  # type: ignore[attr-defined]
    r, c = np.mgrid[0:HEIGHT, 0:WIDTH]
    expected = image.values[r // 2, c // 2].copy()
    on_grid = (r < nty * 64) & (c < ntx * 64)
    painted = np.zeros((HEIGHT, WIDTH), dtype=bool)
    painted[on_grid] = mask[r[on_grid] // 64, c[on_grid] // 64]
    expected[painted] = (255, 0, 0)
    assert drawn.shape == expected.shape
    assert int((drawn != expected).any(axis=-1).sum()) == 0


def test_plot_refuses_what_it_cannot_draw_and_names_the_fix(run: tuple[Path, xr.Dataset]) -> None:
    store, _ = run
    ds = xr.open_zarr(store)
    with pytest.raises(wsi_xr.InvalidArgumentError, match=r"sel\(feature=0\)"):
        ds.latent.wsi.plot()
    with pytest.raises(wsi_xr.InvalidArgumentError, match="tile or patch grids"):
        ds.wsi.plot("chunk_done")
    with pytest.raises(wsi_xr.InvalidArgumentError, match="no variable 'tissue'"):
        ds.wsi.plot("tissue")
    with pytest.raises(wsi_xr.InvalidArgumentError, match=r"coarser pyramid level .*max_pixels=None"):
        _image((300, 350), downsample=1).wsi.plot(max_pixels=1000)
    with pytest.raises(wsi_xr.InvalidArgumentError, match="extent= is set from the coordinates"):
        _image((3, 3), downsample=1).wsi.plot(extent=(0, 1, 1, 0))
    # a latent map slice is a float grid with NaN off tissue: drawn with a colour bar, NaN transparent
    artist = ds.latent.sel(feature=0).wsi.plot()
    assert artist.get_extent() == [0, WIDTH // 64 * 64, HEIGHT // 64 * 64, 0] and len(artist.figure.axes) == 2
    # one tile: its size comes from the Dataset's attributes
    one = ds.isel(tile_y=[1], tile_x=[2])
    assert one.wsi.plot("tile_variance").get_extent() == [128, 192, 128, 64]


def test_plot_takes_levels_with_a_non_integer_downsample() -> None:
    """An Aperio level at downsample 4.0005 has integer coordinates whose steps alternate
    (1792, 1793 for 448-px tiles): still a regular grid, drawn on its mean step."""
    import numpy as np
    import xarray as xr

    from wsi_xr.plot import cell_size

    coords = np.round(np.arange(6) * 448 * 4.0005).astype(np.int64)
    assert set(np.diff(coords)) == {1792, 1793}
    grid = xr.DataArray(np.zeros((6, 6), dtype=bool), dims=("tile_y", "tile_x"), coords={"tile_y": coords, "tile_x": coords})
    assert cell_size(grid, "tile_x") == pytest.approx(448 * 4.0005, abs=0.5)
    uneven = grid.assign_coords(tile_x=np.array([0, 10, 20, 40, 50, 60]))
    with pytest.raises(wsi_xr.InvalidArgumentError, match="not evenly spaced"):
        cell_size(uneven, "tile_x")
