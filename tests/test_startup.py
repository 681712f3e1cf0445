"""Small jobs pay no fixed costs: ``import wsi_xr`` and ``wsi-xr --help`` import nothing heavy.

Checked by what is imported (deterministic), not by a timer; the times are in the README.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import xarray as xr

HEAVY = ("xarray", "dask.array", "distributed", "torch", "cucim", "zarr", "pandas")


def _imported_after(code: str) -> set[str]:
    probe = f"{code}\nimport json, sys\nprint(json.dumps(sorted(sys.modules)))"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    return set(json.loads(done.stdout.strip().splitlines()[-1]))


def test_import_and_help_load_nothing_heavy() -> None:
    for code in ("import wsi_xr", "import wsi_xr.cli as c\ntry:\n    c.main(['--help'])\nexcept SystemExit:\n    pass"):
        heavy = {name for name in _imported_after(code) if name in HEAVY}
        assert not heavy, f"{code!r} imported {sorted(heavy)}"


def test_info_loads_no_torch_xarray_or_cluster(tmp_path: Path) -> None:
    from wsi_xr.datasets.synth import write_synthetic_slide

    slide = tmp_path / "s.tif"
    write_synthetic_slide(slide, 512, 512, seed=1)
    loaded = _imported_after(f"import wsi_xr.cli as c\nc.main(['info', {str(slide)!r}])")
    assert not loaded & {"torch", "xarray", "distributed"}, sorted(loaded & {"torch", "xarray", "distributed"})


def test_lazy_names_are_the_functions_and_the_accessor_is_there(tmp_path: Path) -> None:
    import wsi_xr
    import wsi_xr.encode  # the submodule, imported: the package's name still means the function

    assert callable(wsi_xr.encode) and wsi_xr.encode is sys.modules["wsi_xr.encode"].encode
    assert wsi_xr.open_slide.__module__ == "wsi_xr.slide"
    store = tmp_path / "plain.zarr"
    xr.Dataset({"tile_mask": (("tile_y", "tile_x"), np.ones((2, 2), bool))}).to_zarr(store, consolidated=False)
    # a fresh process: `import wsi_xr` before xarray, then a store opened with plain xarray has .wsi
    code = f"import wsi_xr\nimport xarray as xr\nds = xr.open_zarr({str(store)!r}, consolidated=False)\nprint(type(ds.wsi).__name__)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.strip(), done.stderr


def test_weights_are_loaded_and_hashed_once_per_run(monkeypatch) -> None:
    """The client checks the weights by loading them; the tasks of a threaded run reuse that model."""
    import hashlib

    import wsi_xr.models.weights as weights_module
    from wsi_xr.encode import prepare_model, worker_model

    loads, hashes = [], []
    real_load, real_sha = weights_module.load_vae, hashlib.sha256
    monkeypatch.setattr(weights_module, "load_vae", lambda *a, **k: loads.append(a) or real_load(*a, **k))
    monkeypatch.setattr(hashlib, "sha256", lambda *a, **k: hashes.append(1) or real_sha(*a, **k))
    import wsi_xr.models

    monkeypatch.setattr(wsi_xr.models, "load_vae", weights_module.load_vae)
    model = prepare_model(None)
    assert worker_model(model.ref, model.data) is worker_model(model.ref, model.data)
    assert len(loads) == 1 and len(hashes) == 1, (len(loads), len(hashes))


def test_one_slide_runs_without_a_cluster(tmp_path: Path) -> None:
    from wsi_xr.datasets.synth import write_synthetic_slide

    slide = tmp_path / "small.tif"
    write_synthetic_slide(slide, 1024, 1024, seed=2)
    cli = [sys.executable, "-m", "wsi_xr.cli", "run", str(slide)]
    small = subprocess.run([*cli, str(tmp_path / "a.zarr")], capture_output=True, text=True, timeout=300)
    assert small.returncode == 0 and "threaded scheduler" in small.stderr and "Dask dashboard:" not in small.stderr, small.stderr
    cluster = subprocess.run([*cli, str(tmp_path / "b.zarr"), "--quiet", "--workers", "1"], capture_output=True, text=True, timeout=300)
    assert cluster.returncode == 0 and "Dask dashboard" in cluster.stderr, cluster.stderr
    a, b = (xr.open_zarr(tmp_path / name, consolidated=False) for name in ("a.zarr", "b.zarr"))
    assert a.attrs["complete"] and int(a.tile_mask.sum()) == int(b.tile_mask.sum()) > 0
