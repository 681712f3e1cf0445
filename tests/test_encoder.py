"""The encoder's fast path is exact: fp32 ``mu`` within the float32 rounding bound of the
exact (float64) model, value by value, on real and synthetic tiles (the bound is derived in
wsi_xr/models/rounding.py and holds on every CPU); bf16 is opt-in, finite, within its
documented tolerance, recorded in attrs, and refused where unsupported."""

from __future__ import annotations

import importlib
from pathlib import Path

import dask
import numpy as np
import pytest
import tifffile
import torch

import wsi_xr
from tests.numerics import assert_float32_exact, assert_within_bound
from wsi_xr.datasets.synth import SynthSpec, render_region
from wsi_xr.encode import check_precision, model_ref, worker_model
from wsi_xr.models import encode_tiles, load_vae
from wsi_xr.models.rounding import fp32_mu_bound
from wsi_xr.pipeline import process_slide

#: Documented bf16 error (README "Precision"): relative error of ``mu`` (Frobenius norm).
BF16_RELATIVE_TOLERANCE = 0.02


def _eager_mu(model: torch.nn.Module, tiles: np.ndarray) -> np.ndarray:
    """The reference computation: NCHW float32, plain eager forward, no fast path."""
    x = torch.from_numpy(tiles).permute(0, 3, 1, 2).float().div(255.0).contiguous()
    with torch.no_grad():
        return model.fc1(model.encoder(x)).numpy()


def _cmu_tiles(cmu: Path, n: int = 300) -> np.ndarray:
    pixels = tifffile.imread(cmu)[..., :3]
    ny, nx = pixels.shape[0] // 64, pixels.shape[1] // 64
    grid = pixels[: ny * 64, : nx * 64].reshape(ny, 64, nx, 64, 3).transpose(0, 2, 1, 3, 4).reshape(-1, 64, 64, 3)
    variance = grid.reshape(len(grid), -1).astype(np.float32).var(axis=1)
    return np.ascontiguousarray(grid[np.argsort(variance)[-n:]])  # the most textured: tissue


def _synthetic_tiles(n: int = 256) -> np.ndarray:
    region = render_region(SynthSpec(2048, 2048, seed=5, tissue_fraction=0.6), 0, 0, 1024, 1024)[..., :3]
    return np.ascontiguousarray(region.reshape(16, 64, 16, 64, 3).transpose(0, 2, 1, 3, 4).reshape(-1, 64, 64, 3)[:n])


@pytest.mark.parametrize("source", ["cmu", "synthetic"])
def test_fast_fp32_path_equals_eager_model(source: str, request: pytest.FixtureRequest) -> None:
    tiles = _cmu_tiles(request.getfixturevalue("cmu"), 128) if source == "cmu" else _synthetic_tiles(128)
    model = load_vae()
    bound = fp32_mu_bound(model, tiles)
    eager = _eager_mu(model, tiles)
    fast = encode_tiles(worker_model(model_ref(None)), tiles, batch_size=128)  # what every chunk task runs
    assert fast.dtype == np.float32
    assert_float32_exact(eager, bound, "eager fp32 model")
    assert_float32_exact(fast, bound, "fast fp32 path")
    # both within the bound of the exact result, so within twice it of each other
    assert_within_bound(fast, eager, 2 * bound.worst_case, "fast fp32 path against the eager model")


@pytest.mark.parametrize("layers", [("conv",) * 4, ("gemm",) * 4, ("gemm", "conv", "gemm", "conv")])
def test_every_layer_choice_is_float32_exact(layers: tuple[str, ...]) -> None:
    """Each convolution as oneDNN's convolution or as im2col + GEMM: the same sums, within fp32 rounding."""
    from wsi_xr.models import tiles_to_tensor
    from wsi_xr.models.gemm import LayeredEncoder

    tiles = _synthetic_tiles(64)
    model = load_vae()
    bound = fp32_mu_bound(model, tiles)
    with torch.inference_mode():
        mu = LayeredEncoder(model, layers)(tiles_to_tensor(tiles)).numpy()
    assert_float32_exact(mu, bound, f"encoder with layers {layers}")
    # a layer computed wrongly (its kernel read transposed) is caught by the same bound
    broken = LayeredEncoder(model, ("gemm",) * 4)
    broken.weights[2] = broken.weights[2].reshape(4, 4, 32, 64).transpose(0, 1).reshape(512, 64).contiguous()
    with torch.inference_mode(), pytest.raises(AssertionError, match="float32 rounding"):
        assert_float32_exact(broken(tiles_to_tensor(tiles)).numpy(), bound, "a transposed kernel")


def test_layer_choice_is_fixed_per_cpu_and_only_from_the_two_kinds() -> None:
    from wsi_xr.models.gemm import KINDS, LAYERS_BY_CAPABILITY, LayeredEncoder, choose_layers, cpu_layers, layered_encoder

    model = load_vae()
    chosen = choose_layers(model)  # a timing on this machine: what the table's entries came from
    assert len(chosen) == 4 and set(chosen) <= set(KINDS)
    assert all(len(v) == 4 and set(v) <= set(KINDS) for v in LAYERS_BY_CAPABILITY.values())
    assert layered_encoder(model) is layered_encoder(model) and layered_encoder(model).layers == cpu_layers()
    with pytest.raises(ValueError, match="layers must be"):
        LayeredEncoder(model, ("conv", "fft", "conv", "conv"))


def test_exactness_criteria_fail_bf16_and_a_subtly_wrong_model(cmu: Path) -> None:
    """The criteria are tight enough to fail bf16 arithmetic, and a model whose BatchNorm epsilon is 1e-3, not 1e-5."""
    tiles = _cmu_tiles(cmu, 32)
    model = load_vae()
    bound = fp32_mu_bound(model, tiles)
    wrong = load_vae()
    wrong.encoder[5].eps = 1e-3
    with pytest.raises(AssertionError, match="float32 rounding"):
        assert_float32_exact(_eager_mu(wrong, tiles), bound, "a model with another BatchNorm epsilon")
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():  # runs (slowly) on any CPU
        bf16 = model.features(torch.from_numpy(tiles).permute(0, 3, 1, 2).float().div(255.0)).float().numpy()
    with pytest.raises(AssertionError, match="float32 rounding"):
        assert_float32_exact(bf16, bound, "bf16 autocast")
    assert float(np.median(bound.worst_case.max(axis=1) / np.abs(bound.exact).max(axis=1))) < 0.02


def test_bf16_is_finite_close_and_recorded(cmu: Path, tmp_path: Path) -> None:
    try:
        check_precision("bf16", "cpu")
    except wsi_xr.InvalidArgumentError as err:
        pytest.skip(f"this CPU cannot run bf16 fast: {err}")
    tiles = _cmu_tiles(cmu)
    model = load_vae()
    fp32 = _eager_mu(model, tiles)
    bf16 = encode_tiles(model, tiles, precision="bf16")
    assert np.isfinite(bf16).all()
    relative = np.linalg.norm(bf16 - fp32) / np.linalg.norm(fp32)
    assert 0 < relative < BF16_RELATIVE_TOLERANCE  # not exact, but close
    ds = process_slide(cmu, tmp_path / "bf16.zarr", precision="bf16", chunks=512, progress=False)
    assert ds.attrs["precision"] == "bf16" and ds.wsi.attrs["wsi_xr_run"]["precision"] == "bf16"
    exact = process_slide(cmu, tmp_path / "fp32.zarr", chunks=512, progress=False)
    assert exact.attrs["precision"] == "fp32"
    tissue = exact.tile_mask.values
    np.testing.assert_array_equal(ds.tile_mask.values, tissue)  # the mask never depends on precision
    a, b = exact.latent.values[tissue], ds.latent.values[tissue]
    assert np.linalg.norm(b - a) / np.linalg.norm(a) < BF16_RELATIVE_TOLERANCE
    with pytest.raises(wsi_xr.StoreError, match="precision"):  # a store is one precision
        process_slide(cmu, tmp_path / "fp32.zarr", precision="bf16", chunks=512, progress=False)


def test_bf16_refused_where_it_would_be_slow(monkeypatch: pytest.MonkeyPatch, synth_slide: Path, tmp_path: Path) -> None:
    encode_module = importlib.import_module("wsi_xr.encode")  # the module (wsi_xr.encode is the function)
    monkeypatch.setattr(encode_module, "_cpu_flags", lambda: {"sse2", "avx2"})  # a CPU without bf16 units
    with pytest.raises(wsi_xr.InvalidArgumentError, match="bfloat16 instructions"):
        process_slide(synth_slide, tmp_path / "x.zarr", precision="bf16", progress=False)
    assert not (tmp_path / "x.zarr").exists()
    if not torch.cuda.is_available():
        with pytest.raises(wsi_xr.InvalidArgumentError, match="cuda"):
            check_precision("bf16", "cuda")
    with pytest.raises(wsi_xr.InvalidArgumentError, match="precision"):
        check_precision("fp16", "cpu")


def test_default_batch_size_per_device_and_precision() -> None:
    from wsi_xr.models import default_batch_size

    assert (default_batch_size("fp32"), default_batch_size("bf16"), default_batch_size("int8")) == (64, 128, 64)  # measured in the CPU pipeline
    assert (default_batch_size("fp32", "cuda"), default_batch_size("bf16", "cuda")) == (128, 256)
    assert default_batch_size("fp32", "mps") == 64  # an unmeasured device type: the CPU's
    with pytest.raises(KeyError):
        default_batch_size("fp16")


#: int8 error bound (relative, Frobenius) of ``mu``: each of the five products rounds its
#: weights to 255 levels per tensor and its activations to 128 levels per batch (fbgemm's
#: reduced range on x86), a relative step of ~1/127 and ~1/64 of the largest value; summed
#: over K = 48...2048 terms the errors average out to ~1% per product and add over the
#: chain. Measured 1.9-2.0% (benchmarks/bench_precision.py, README "Precision"); 5% leaves
#: room for other CPUs' kernels, and a layout mistake (a permuted kernel) is > 50%.
INT8_RELATIVE_TOLERANCE = 0.05


def test_int8_products_are_close_to_fp32_on_real_tiles(cmu: Path) -> None:
    from wsi_xr.encode import encode_block, prepare_model

    tiles = _cmu_tiles(cmu)
    model = load_vae()
    fp32 = _eager_mu(model, tiles)
    int8 = encode_tiles(model, tiles, precision="int8")  # the arithmetic, whatever its speed here
    relative = np.linalg.norm(int8 - fp32) / np.linalg.norm(fp32)
    assert 0 < relative < INT8_RELATIVE_TOLERANCE, f"int8 relative error {relative:.4f} on {torch.backends.cpu.get_cpu_capability()}"
    cosine = (int8 * fp32).sum(1) / np.linalg.norm(int8, axis=1) / np.linalg.norm(fp32, axis=1)
    assert cosine.min() > 0.99
    # a chunk task's path (encode_block with an int8 ModelRef) gives the same values
    block = tiles[:16].reshape(4, 4, 64, 64, 3).transpose(0, 2, 1, 3, 4).reshape(256, 256, 3)
    prepared = prepare_model(None, precision="int8")  # the shipped weights (no speed check: that is check_precision's)
    latents = encode_block(block, np.ones((4, 4), bool), prepared.ref, weights=prepared.data)
    np.testing.assert_array_equal(latents.reshape(16, -1), encode_tiles(model, tiles[:16], precision="int8"))
    with pytest.raises(wsi_xr.InvalidArgumentError, match="VAE2"):  # only the VAE has an int8 path
        from wsi_xr.models.encoders import EncoderSpec, encode_batch

        encode_batch(torch.nn.Flatten().eval(), tiles[:2], EncoderSpec("flat", tile=64), precision="int8")


def test_int8_refused_where_measured_slower_accepted_and_recorded_where_faster(
    monkeypatch: pytest.MonkeyPatch, synth_slide: Path, tmp_path: Path
) -> None:
    from wsi_xr.models import gemm

    fp32_speed, int8_speed = gemm.int8_speed()  # measured on this CPU
    assert fp32_speed > 0 and int8_speed > 0
    if int8_speed <= fp32_speed:
        with pytest.raises(wsi_xr.InvalidArgumentError, match=r"slower than fp32 .*int8 \d+ tiles/s, fp32 \d+ tiles/s"):
            check_precision("int8", "cpu")
    else:
        check_precision("int8", "cpu")
    with pytest.raises(wsi_xr.InvalidArgumentError, match="CPU only"):
        check_precision("int8", "cuda")
    # Either outcome, on any CPU: a slower int8 is refused before anything is written ...
    monkeypatch.setattr(gemm, "int8_speed", lambda tiles=128: (2000.0, 1000.0))
    with pytest.raises(wsi_xr.InvalidArgumentError, match="int8 1000 tiles/s, fp32 2000 tiles/s"):
        process_slide(synth_slide, tmp_path / "slow.zarr", precision="int8", progress=False)
    assert not (tmp_path / "slow.zarr").exists()
    # ... and a faster one runs, is recorded, and keeps the mask of fp32
    monkeypatch.setattr(gemm, "int8_speed", lambda tiles=128: (1000.0, 2000.0))
    with dask.config.set(scheduler="threads"):
        ds = process_slide(synth_slide, tmp_path / "int8.zarr", precision="int8", chunks=1024, progress=False)
        exact = process_slide(synth_slide, tmp_path / "fp32.zarr", chunks=1024, progress=False)
    assert ds.attrs["precision"] == "int8" and ds.wsi.attrs["wsi_xr_run"]["precision"] == "int8"
    tissue = exact.tile_mask.values
    np.testing.assert_array_equal(ds.tile_mask.values, tissue)
    a, b = exact.latent.values[tissue], ds.latent.values[tissue]
    assert np.linalg.norm(b - a) / np.linalg.norm(a) < INT8_RELATIVE_TOLERANCE
