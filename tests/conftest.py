"""Shared fixtures: real test slides (from ``WSI_XR_TESTDATA``) and synthetic slides."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("WSI_XR_TESTDATA", ROOT.parent / "shared" / "data"))

# Tests that call cuCIM directly (a second reader) after torch start cuFile, which without a
# GPU driver writes cufile.log into the current folder; wsi_xr's own reads keep it out
# (tests/test_decoder_messages.py), these tests' direct calls are sent to /dev/null here.
os.environ.setdefault("CUFILE_LOGFILE_PATH", os.devnull)


def pytest_report_header(config: pytest.Config) -> str:
    """Say which CPU kernels oneDNN dispatches to: float32 results differ in their last bits between them."""
    import torch

    return f"wsi_xr: torch {torch.__version__}, CPU capability {torch.backends.cpu.get_cpu_capability()}"


def data_file(name: str) -> Path:
    """A real slide from the shared test data, or skip the test saying where it looked."""
    path = DATA / name
    if not path.exists():
        pytest.skip(f"real test slide {name} not found in {DATA} (set WSI_XR_TESTDATA to the folder holding it)")
    return path


@pytest.fixture
def cmu() -> Path:
    """Aperio SVS, 2220 x 2967, JPEG 240x240 tiles, mpp 0.499."""
    return data_file("cmu-1-small-region.svs")


@pytest.fixture(scope="session")
def synth_slide(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 3000 x 2600 synthetic pyramidal slide (256-px JPEG tiles, partial edge tiles)."""
    from wsi_xr.datasets.synth import write_synthetic_slide

    path = tmp_path_factory.mktemp("synth") / "synth-3000x2600.tif"
    write_synthetic_slide(path, 3000, 2600, seed=7)
    return path


@pytest.fixture(scope="session")
def large_synth_slide(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 16384 x 16384 synthetic slide, for laziness checks (never fully read in tests)."""
    from wsi_xr.datasets.synth import write_synthetic_slide

    path = tmp_path_factory.mktemp("synth") / "synth-16k.tif"
    write_synthetic_slide(path, 16384, 16384, seed=3, jpeg_quality=60)
    return path


@pytest.fixture(scope="session")
def weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fixed, randomly initialised VAE (exactness of the plumbing does not need training)."""
    import torch

    from wsi_xr.models import VAE2, save_vae

    torch.manual_seed(1234)
    path = tmp_path_factory.mktemp("weights") / "vae.pt"
    save_vae(VAE2().eval(), path)
    return path
