"""End-to-end pipeline: latents vs a direct encoder call, one decode per pixel, Parquet,
cohorts, resume after SIGKILL, refusal of mismatched/locked stores, a real distributed
cluster."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import dask
import numpy as np
import pandas as pd
import pytest
import tifffile
import xarray as xr
import zarr

import wsi_xr
from tests.numerics import assert_latents_agree, assert_mu_is_float32_exact, latent_tolerance
from wsi_xr.datasets.synth import write_synthetic_slide
from wsi_xr.models import load_vae
from wsi_xr.pipeline import process_slide, process_slides, to_dataframe, write_parquet
from wsi_xr.readers import read_stats, reset_read_stats
from wsi_xr.store import StoreLock

CLI = [sys.executable, "-m", "wsi_xr.cli"]


def _check_latents_against_direct_encoder(ds: xr.Dataset, slide: Path, weights: Path) -> None:
    pixels = tifffile.imread(slide, level=0)[..., :3]  # an independent read of the slide
    mask = ds.tile_mask.values
    rows, cols = np.nonzero(mask)
    ys, xs = ds.tile_y.values[rows], ds.tile_x.values[cols]
    tiles = np.stack([pixels[y : y + 64, x : x + 64] for y, x in zip(ys, xs)])
    latent = ds.latent.values
    assert_mu_is_float32_exact(latent[rows, cols], tiles, load_vae(weights), "pipeline latents")
    assert np.isnan(latent[~mask]).all()
    frame = to_dataframe(ds)
    assert len(frame) == int(mask.sum())
    assert (frame["x"].values == xs).all() and (frame["y"].values == ys).all()
    np.testing.assert_array_equal(frame[[f"latent_{i}" for i in range(32)]].values, latent[rows, cols])  # the stored values


def test_latents_equal_direct_encoder_on_cmu(cmu: Path, weights: Path, tmp_path: Path) -> None:
    ds = process_slide(cmu, tmp_path / "cmu.zarr", weights=weights, chunks=512, progress=False).compute()
    assert ds.attrs["complete"] and ds.attrs["weights_sha256"] and ds.attrs["source"] == str(cmu.resolve())
    assert 500 < ds.attrs["tissue_tiles"] < 1000
    _check_latents_against_direct_encoder(ds, cmu, weights)


def test_pipeline_matches_tissue_mask_and_reads_once(synth_slide: Path, weights: Path, tmp_path: Path) -> None:
    reset_read_stats()
    with dask.config.set(scheduler="threads"):
        ds = process_slide(synth_slide, tmp_path / "s.zarr", weights=weights, chunks=512, coarse="none", progress=False)
    stats = read_stats()
    assert stats.pixels_requested == 3000 * 2600, "each level-0 pixel must be decoded once for mask + latents"
    assert stats.calls == 6 * 6
    ds = ds.compute()
    mask = wsi_xr.tissue_mask(wsi_xr.open_slide(synth_slide, chunks=512), threshold=ds.attrs["threshold"], coarse="none").compute()
    np.testing.assert_array_equal(ds.tile_mask.values, mask.tile_mask.values)
    np.testing.assert_array_equal(ds.patch_mask.values, mask.patch_mask.values)
    np.testing.assert_allclose(ds.tile_variance.values, mask.tile_variance.values, rtol=1e-6)
    _check_latents_against_direct_encoder(ds, synth_slide, weights)


def test_store_rewritten_with_other_chunks_in_one_process_gets_fresh_arrays(synth_slide: Path, weights: Path, tmp_path: Path) -> None:
    # Chunk tasks reuse the arrays they opened for a store, group and layout (opening them
    # is ~40% of a task's writes): a store overwritten at the same path with another chunk
    # grid must be written with its own metadata, not the first run's.
    store, fresh = tmp_path / "same.zarr", tmp_path / "fresh.zarr"
    with dask.config.set(scheduler="threads"):
        process_slide(synth_slide, store, weights=weights, chunks=1024, progress=False)
        with pytest.raises(wsi_xr.StoreError, match=r"other chunks \(1024-px\).*--chunk 1024"):  # how to resume it
            process_slide(synth_slide, store, weights=weights, chunks=512, progress=False)
        rewritten = process_slide(synth_slide, store, weights=weights, chunks=512, overwrite=True, progress=False)
        expected = process_slide(synth_slide, fresh, weights=weights, chunks=512, progress=False)
    assert wsi_xr.verify_store(store).ok
    assert zarr.open_group(store, mode="r")["latent"].chunks[:2] == (8, 8)
    np.testing.assert_array_equal(rewritten.tile_mask.values, expected.tile_mask.values)
    np.testing.assert_array_equal(rewritten.latent.values, expected.latent.values)


def test_finalize_blanks_only_encoded_non_tissue_and_checks_what_it_reads(synth_slide: Path, weights: Path, tmp_path: Path) -> None:
    from wsi_xr.pipeline import CANDIDATE_FLOOR
    from wsi_xr.tissue.mask import two_stage_rule

    store = tmp_path / "s.zarr"
    ds = process_slide(synth_slide, store, weights=weights, chunks=512, progress=False).compute()
    tv, mask, latent = ds.tile_variance.values, ds.tile_mask.values, ds.latent.values
    # encoded as candidates (tile and patch above the floor), then blanked: what finalising handles
    k = ds.attrs["patch"] // ds.attrs["tile"]
    patch_of_tile = np.repeat(np.repeat(ds.patch_variance.values, k, axis=0), k, axis=1)[: tv.shape[0], : tv.shape[1]]
    blanked = two_stage_rule(tv, patch_of_tile, ds.read_error.values, CANDIDATE_FLOOR) & ~mask
    assert blanked.any(), "the synthetic slide must have candidates below the auto threshold, or this tests nothing"
    assert np.isnan(latent[~mask]).all() and not np.isnan(latent[mask]).any()
    # a tissue latent lost from a chunk that finalising rewrites: found before anything is
    # derived from it, that chunk recomputed, the store complete again (0.2.0: "run again", forever)
    group = zarr.open_group(store, mode="r+", use_consolidated=False)
    tcy, tcx = group["latent"].chunks[:2]
    ty, tx = np.argwhere(blanked)[0] // (tcy, tcx) * (tcy, tcx)
    rows, cols = np.nonzero(mask[ty : ty + tcy, tx : tx + tcx])
    assert rows.size, "pick a chunk with both tissue and blanked tiles"
    values = group["latent"][...]
    values[ty + rows[0], tx + cols[0]] = np.nan
    group["latent"][...] = values
    group.attrs["complete"] = False
    repaired = process_slide(synth_slide, store, weights=weights, chunks=512, progress=False).compute()
    assert repaired.wsi.attrs["complete"] is True
    np.testing.assert_array_equal(repaired.tile_mask.values, mask)
    assert np.isfinite(repaired.latent.values[ty + rows[0], tx + cols[0]]).all()
    assert np.isnan(repaired.latent.values[~mask]).all() and not np.isnan(repaired.latent.values[mask]).any()


@pytest.mark.parametrize("threshold", [3, 100])  # 3: the synthetic slide has 186 tissue tiles at or below 10
def test_whole_number_thresholds_encode_every_tissue_tile(synth_slide: Path, weights: Path, tmp_path: Path, threshold: int) -> None:
    """A given int threshold is the encoding floor (it was 10 before, leaving tissue tiles
    between the threshold and 10 without latents)."""
    ds = process_slide(synth_slide, tmp_path / "s.zarr", weights=weights, chunks=512, threshold=threshold, progress=False).compute()
    mask, latent, tv = ds.tile_mask.values, ds.latent.values, ds.tile_variance.values
    if threshold < 10:
        assert (mask & (tv <= 10)).any(), "the slide must have tissue tiles at or below 10 at this threshold, or this tests nothing"
    assert not np.isnan(latent[mask]).any() and np.isnan(latent[~mask]).all()


def test_maybe_encoded_survives_float32_rounding() -> None:
    """The tasks compare float64 variances with the floor; finalising sees them as float32."""
    from wsi_xr.pipeline import maybe_encoded as _maybe_encoded
    from wsi_xr.tissue.mask import two_stage_rule

    for floor, above in ((10.0, 10 + 4e-7), (10.1, 10.1 + 1e-7)):  # each stored as float32(floor)
        tile64 = np.array([[above, floor, floor - 1e-4, 12.0, np.nan]])
        patch64 = np.full(tile64.shape, 20.0)
        none = np.zeros(tile64.shape, dtype=bool)
        assert two_stage_rule(tile64, patch64, none, floor).tolist() == [[True, False, False, True, False]]  # what the tasks encoded
        tile32, patch32 = tile64.astype(np.float32), patch64.astype(np.float32)
        assert tile32[0, 0] == np.float32(floor)
        assert two_stage_rule(tile32, patch32, none, floor).tolist() == [[False, False, False, True, False]]  # would miss one
        assert _maybe_encoded(tile32, patch32, none, floor).tolist() == [[True, True, False, True, False]]  # a superset
        assert not _maybe_encoded(tile32, patch32, np.ones(tile64.shape, dtype=bool), floor).any()


def test_cohort_groups_datatree_and_parquet(synth_slide: Path, cmu: Path, weights: Path, tmp_path: Path) -> None:
    store = tmp_path / "cohort.zarr"
    tree = process_slides([synth_slide, cmu, synth_slide], store, weights=weights, progress=False)
    names = [Path(synth_slide).stem, cmu.stem, Path(synth_slide).stem + "-2"]
    assert sorted(tree.children) == sorted(names)
    reopened = xr.open_datatree(store, engine="zarr")
    assert int(reopened[names[1]].tile_mask.sum()) == reopened[names[1]].attrs["tissue_tiles"]
    rows = write_parquet(store, tmp_path / "cohort.parquet")
    back = pd.read_parquet(tmp_path / "cohort.parquet")
    assert list(back.columns[:3]) == ["slide", "x", "y"] and len(back) == rows
    assert rows == sum(int(reopened[n].tile_mask.sum()) for n in names)
    assert back.groupby("slide").size().to_dict() == {n: int(reopened[n].tile_mask.sum()) for n in names}


def test_mismatched_and_locked_store_refused(synth_slide: Path, cmu: Path, weights: Path, tmp_path: Path) -> None:
    store = tmp_path / "one.zarr"
    process_slide(synth_slide, store, weights=weights, progress=False)
    with pytest.raises(wsi_xr.StoreError, match="different slide or with different parameters"):
        process_slide(cmu, store, weights=weights, progress=False)
    with pytest.raises(wsi_xr.StoreError, match="threshold_setting"):
        process_slide(synth_slide, store, weights=weights, threshold=50.0, progress=False)
    replaced = process_slide(cmu, store, weights=weights, overwrite=True, progress=False)
    assert replaced.attrs["source"] == str(cmu.resolve())
    lock = store.parent / f".{store.name}.lock"
    with StoreLock(store):  # a live owner (an OS lock: another open file, here in this process)
        with pytest.raises(wsi_xr.StoreError, match="in use by another wsi_xr run"):
            process_slide(cmu, store, weights=weights, progress=False)
    lock.write_text(f"999999999 {socket.gethostname()}")  # what a killed run leaves: no OS lock, so free
    process_slide(cmu, store, weights=weights, progress=False)
    assert not lock.exists()


def _done_chunks(store: Path) -> int:
    """Chunks marked done in ``store`` (every chunk of chunk_done is stored from the start: read the flags)."""
    from wsi_xr.store import chunks_done

    try:
        return chunks_done(store)
    except Exception:  # the store is being created: nothing done yet
        return 0


def test_resume_after_sigkill(tmp_path: Path, weights: Path) -> None:
    slide = tmp_path / "resume.tif"
    write_synthetic_slide(slide, 4096, 4096, seed=21, tissue_fraction=0.5)
    args = [str(slide), "--weights", str(weights), "--chunk", "256", "--coarse", "none", "--quiet"]
    reference = tmp_path / "reference.zarr"
    subprocess.run(CLI + ["run", *args[:1], str(reference), *args[1:]], check=True, capture_output=True)

    store = tmp_path / "killed.zarr"
    proc = subprocess.Popen(CLI + ["run", *args[:1], str(store), *args[1:]], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while _done_chunks(store) < 20 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, "the run finished before it could be killed; make the slide larger"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = _done_chunks(store)
    assert 0 < killed_at < 256
    partial = xr.open_zarr(store, consolidated=False)
    assert partial.wsi.attrs["complete"] is False  # never marked complete with chunks missing

    reset_read_stats()
    rerun = subprocess.run(CLI + ["run", *args[:1], str(store), *args[1:]], capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr
    a, b = xr.open_zarr(reference).compute(), xr.open_zarr(store).compute()
    assert b.wsi.attrs["complete"] is True
    for name in ("tile_mask", "patch_mask", "read_error", "tile_variance", "patch_variance", "latent"):
        np.testing.assert_array_equal(a[name].values, b[name].values, err_msg=name)
    assert a.attrs["threshold"] == b.attrs["threshold"]


def test_cli_run_rejects_bad_input(tmp_path: Path, synth_slide: Path) -> None:
    missing = subprocess.run(CLI + ["run", str(tmp_path / "nope.svs"), str(tmp_path / "o.zarr")], capture_output=True, text=True)
    assert missing.returncode == 2 and "nope.svs" in missing.stderr and "Traceback" not in missing.stderr
    junk = tmp_path / "junk.pt"
    junk.write_text("not a model")
    bad = subprocess.run(CLI + ["run", str(synth_slide), str(tmp_path / "o.zarr"), "--weights", str(junk)], capture_output=True, text=True)
    assert bad.returncode == 2 and "junk.pt" in bad.stderr and "Traceback" not in bad.stderr
    assert not (tmp_path / "o.zarr").exists()


def test_distributed_cluster_by_address(synth_slide: Path, weights: Path, tmp_path: Path) -> None:
    pytest.importorskip("distributed")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    address = f"tcp://127.0.0.1:{port}"
    bin_dir = Path(sys.executable).parent
    worker_tmp = tmp_path / "worker-tmp"  # the workers' temp folder is not the client's
    worker_tmp.mkdir()
    env = {**os.environ, "DASK_DISTRIBUTED__WORKER__DAEMON": "False", "TMPDIR": str(worker_tmp)}
    scheduler = subprocess.Popen(
        [str(bin_dir / "dask"), "scheduler", "--host", "127.0.0.1", "--port", str(port), "--no-dashboard"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    workers = []
    try:
        for _ in range(2):
            workers.append(
                subprocess.Popen(
                    [str(bin_dir / "dask"), "worker", address, "--nthreads", "1", "--no-dashboard"],
                    env=env,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            )
        from distributed import Client

        with Client(address, timeout=60) as client:
            client.wait_for_workers(2, timeout=60)
        out = tmp_path / "dist.zarr"
        run = subprocess.run(
            CLI + ["run", str(synth_slide), str(out), "--weights", str(weights), "--chunk", "512", "--scheduler", address, "--quiet"],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert run.returncode == 0, run.stderr
        local = process_slide(synth_slide, tmp_path / "local.zarr", weights=weights, chunks=512, progress=False).compute()
        remote = xr.open_zarr(out).compute()
        for name in ("tile_mask", "tile_variance"):  # integer statistics: identical
            np.testing.assert_array_equal(remote[name].values, local[name].values, err_msg=name)
        tolerance = latent_tolerance(synth_slide, weights, local.tile_mask.values)
        assert_latents_agree(remote.latent.values, local.latent.values, tolerance, "latents of a remote cluster's run")
        # A model object travels as bytes: the workers never see a path, and no file is left behind.
        model = load_vae(weights)
        client_tmp = set(Path(tempfile.gettempdir()).iterdir())
        with Client(address, timeout=60) as client:
            from_object = process_slide(synth_slide, tmp_path / "object.zarr", weights=model, chunks=512, client=client).compute()
        assert from_object.wsi.attrs["weights"] is None and from_object.attrs["weights_sha256"]
        assert_latents_agree(from_object.latent.values, local.latent.values, tolerance, "latents of a model object on a remote cluster")
        assert set(Path(tempfile.gettempdir()).iterdir()) == client_tmp, "a temp file was left behind"
        assert not list(worker_tmp.rglob("*.pt"))
    finally:
        for proc in workers + [scheduler]:
            proc.terminate()
        for proc in workers + [scheduler]:
            proc.wait(timeout=30)


def test_one_run_probes_and_scans_each_file_once(synth_slide: Path, weights: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The probe, the backend decision and each level's damage scan happen once per run
    (in the client) and travel down with the opened slide: counted with spies that
    delegate to the real functions."""
    from wsi_xr import readers
    from wsi_xr.readers import opened as opened_module
    from wsi_xr.readers import windows

    calls = {"probe": 0, "scan": []}
    real_probe, real_scan = opened_module.probe, windows.level_damage

    def counting_probe(path):  # type: ignore[no-untyped-def]
        calls["probe"] += 1
        return real_probe(path)

    def counting_scan(info, level):  # type: ignore[no-untyped-def]
        calls["scan"].append(level)
        return real_scan(info, level)

    readers.clear_caches()
    for module in (opened_module, windows):
        monkeypatch.setattr(module, "probe", counting_probe)
    monkeypatch.setattr(opened_module, "level_damage", counting_scan)
    with dask.config.set(scheduler="threads"):
        ds = process_slide(synth_slide, tmp_path / "once.zarr", weights=weights, chunks=512, progress=False)
    assert ds.attrs["complete"] and ds.attrs["coarse_level"] > 0
    assert calls["probe"] == 1, f"probed {calls['probe']} times"
    assert sorted(calls["scan"]) == sorted({0, ds.attrs["coarse_level"]}), f"damage scans: {calls['scan']}"
