"""The GPU path (CuPy chunks, cuCIM GPU decode, DLPack into torch), run where a GPU exists.

Skipped without CuPy or without a CUDA device; the CPU suite proves the kernels
namespace-generic with array_api_strict instead.
"""

from __future__ import annotations

import os
from pathlib import Path

import dask
import numpy as np
import pytest

import wsi_xr
from wsi_xr.datasets.synth import write_synthetic_slide
from wsi_xr.tissue import block_statistics, tissue_mask

cupy = pytest.importorskip("cupy")
try:
    _GPUS = cupy.cuda.runtime.getDeviceCount()
except Exception:  # no driver / no device
    _GPUS = 0
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(_GPUS == 0, reason="needs a CUDA GPU")]


@pytest.fixture(scope="module")
def gpu_slide(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A JPEG synthetic slide: made here when imagecodecs exists, else from WSI_XR_GPU_SLIDE."""
    given = os.environ.get("WSI_XR_GPU_SLIDE")
    if given:
        return Path(given)
    pytest.importorskip("imagecodecs", reason="writing a JPEG slide needs imagecodecs (or set WSI_XR_GPU_SLIDE)")
    path = tmp_path_factory.mktemp("gpu") / "gpu-slide.tif"
    write_synthetic_slide(path, 3000, 2600, seed=5)
    return path


def test_kernel_on_cupy_equals_numpy() -> None:
    rng = np.random.default_rng(3)
    block = rng.integers(0, 256, (1024, 768, 3), dtype=np.uint8)
    cpu = block_statistics(block, 64, 256)
    gpu = block_statistics(cupy.asarray(block), 64, 256)
    assert isinstance(gpu[0], cupy.ndarray)
    for a, b in zip(cpu, gpu):
        np.testing.assert_allclose(a, b.get(), rtol=1e-12)


def test_cuda_blocks_are_cupy_and_equal_cpu(gpu_slide: Path) -> None:
    image = wsi_xr.open_slide(gpu_slide, chunks=1024, device="cuda")
    assert isinstance(image.data._meta, cupy.ndarray)
    with dask.config.set(scheduler="threads"):
        block = image.data.blocks[1, 1].compute()
    assert isinstance(block, cupy.ndarray)
    cpu = wsi_xr.open_slide(gpu_slide, chunks=1024).data.blocks[1, 1].compute()
    np.testing.assert_array_equal(block.get(), cpu)


def test_tissue_mask_on_gpu_equals_cpu(gpu_slide: Path) -> None:
    with dask.config.set(scheduler="threads"):
        gpu = tissue_mask(wsi_xr.open_slide(gpu_slide, chunks=512, device="cuda"), threshold="auto").compute()
        cpu = tissue_mask(wsi_xr.open_slide(gpu_slide, chunks=512), threshold="auto").compute()
    np.testing.assert_array_equal(gpu.tile_mask.values, cpu.tile_mask.values)
    np.testing.assert_allclose(gpu.tile_variance.values, cpu.tile_variance.values, rtol=1e-6)
    assert float(gpu.threshold) == pytest.approx(float(cpu.threshold))


def test_pipeline_on_gpu_equals_cpu(gpu_slide: Path, tmp_path: Path) -> None:
    import torch

    from wsi_xr.models import VAE2, save_vae
    from wsi_xr.pipeline import process_slide

    torch.manual_seed(0)
    weights = tmp_path / "w.pt"
    save_vae(VAE2().eval(), weights)
    with dask.config.set(scheduler="threads"):
        gpu = process_slide(gpu_slide, tmp_path / "gpu.zarr", weights=weights, chunks=512, device="cuda", progress=False).compute()
        cpu = process_slide(gpu_slide, tmp_path / "cpu.zarr", weights=weights, chunks=512, progress=False).compute()
    np.testing.assert_array_equal(gpu.tile_mask.values, cpu.tile_mask.values)
    np.testing.assert_allclose(gpu.latent.values, cpu.latent.values, atol=2e-3, equal_nan=True)
