"""The VAE layer: architecture parity with the reference, weight files, loss, training."""

from __future__ import annotations

import hashlib
import math
import os
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from tests.numerics import assert_float32_exact
from wsi_xr.errors import InvalidArgumentError, WeightsError, WsiXrError
from wsi_xr.models import (
    KLD_SCALE,
    VAE2,
    default_weights_path,
    encode_tiles,
    load_vae,
    read_metadata,
    reconstruction_errors,
    save_vae,
    tiles_to_tensor,
    train_vae,
    vae_loss,
    weights_hash,
)
from wsi_xr.models.rounding import fp32_mu_bound

# --------------------------------------------------------------------------------------
# An independent copy of the reference model, written the classic way (Flatten/UnFlatten
# modules, attribute-by-attribute), to check names, shapes and numbers against.


class Flatten(nn.Module):
    def forward(self, input):
        return input.view(input.size(0), -1)


class UnFlatten(nn.Module):
    def forward(self, input, size=1024):
        return input.view(input.size(0), size, 1, 1)


class VAE(nn.Module):
    def __init__(self, image_channels=3, h_dim=1024, z_dim=32):
        super().__init__()
        self.encoder = nn.Sequential(
            nn.Conv2d(image_channels, 32, kernel_size=4, stride=2),
            nn.ReLU(),
            nn.Conv2d(32, 64, kernel_size=4, stride=2),
            nn.ReLU(),
            nn.Conv2d(64, 128, kernel_size=4, stride=2),
            nn.BatchNorm2d(128),
            nn.ReLU(),
            nn.Conv2d(128, 256, kernel_size=4, stride=2),
            nn.ReLU(),
            Flatten(),
        )
        self.fc1 = nn.Linear(h_dim, z_dim)
        self.fc2 = nn.Linear(h_dim, z_dim)
        self.fc3 = nn.Linear(z_dim, h_dim)
        self.decoder = nn.Sequential(
            UnFlatten(),
            nn.ConvTranspose2d(h_dim, 128, kernel_size=5, stride=2),
            nn.ReLU(),
            nn.ConvTranspose2d(128, 64, kernel_size=5, stride=2),
            nn.BatchNorm2d(64),
            nn.ReLU(),
            nn.ConvTranspose2d(64, 32, kernel_size=6, stride=2),
            nn.ReLU(),
            nn.ConvTranspose2d(32, image_channels, kernel_size=6, stride=2),
            nn.Sigmoid(),
        )

    def reparameterize(self, mu, logvar):
        std = logvar.mul(0.5).exp_()
        esp = torch.randn(*mu.size())
        return mu + std * esp

    def bottleneck(self, h):
        mu, logvar = self.fc1(h), self.fc2(h)
        z = self.reparameterize(mu, logvar)
        return z, mu, logvar

    def encode(self, x):
        h = self.encoder(x)
        return self.bottleneck(h)

    def decode(self, z):
        z = self.fc3(z)
        return self.decoder(z)

    def forward(self, x):
        z, mu, logvar = self.encode(x)
        return self.decode(z), mu, logvar


def _reference_model(seed: int = 1) -> VAE:
    """A reference model with non-trivial BatchNorm statistics (a few train-mode passes)."""
    torch.manual_seed(seed)
    ref = VAE()
    ref.train()
    with torch.no_grad():
        for _ in range(3):
            ref(torch.rand(8, 3, 64, 64) * 0.8 + 0.1)
    return ref.eval()


# --------------------------------------------------------------------------------------
# Synthetic, structured tiles: smooth colour gradients and stripes plus noise.


def structured_tiles(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:64, 0:64].astype(np.float32) / 63.0
    tiles = np.empty((n, 64, 64, 3), dtype=np.uint8)
    for i in range(n):
        base = rng.uniform([150, 60, 120], [240, 170, 220])  # pink / purple, H&E-like
        angle = rng.uniform(0, 2 * np.pi)
        ramp = np.cos(angle) * xx + np.sin(angle) * yy
        freq = rng.uniform(1.0, 4.0)
        stripes = np.sin(2 * np.pi * freq * ramp + rng.uniform(0, 2 * np.pi))
        img = base[None, None, :] * (0.75 + 0.25 * ramp[..., None])
        img = img + rng.uniform(10, 40) * stripes[..., None]
        img = img + rng.normal(0, 6, size=img.shape)
        tiles[i] = np.clip(img, 0, 255).astype(np.uint8)
    return tiles


@pytest.fixture(scope="module")
def tiles() -> np.ndarray:
    return structured_tiles(512, seed=3)


@pytest.fixture(scope="module")
def trained(tiles: np.ndarray):
    return train_vae(tiles, epochs=3, batch_size=64, seed=0, progress=False)


def _same_params(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# --------------------------------------------------------------------------------------
# Architecture


def test_state_dict_matches_reference_names_and_shapes() -> None:
    ours = {k: tuple(v.shape) for k, v in VAE2().state_dict().items()}
    ref = {k: tuple(v.shape) for k, v in VAE().state_dict().items()}
    assert list(ours) == list(ref)
    assert ours == ref
    assert ours["fc1.weight"] == (32, 1024)
    assert ours["decoder.1.weight"] == (1024, 128, 5, 5)


def test_output_shapes() -> None:
    model = VAE2()
    x = torch.rand(5, 3, 64, 64)
    with torch.no_grad():
        recon, mu, logvar = model(x)
        assert recon.shape == (5, 3, 64, 64)
        assert mu.shape == logvar.shape == (5, 32)
        assert float(recon.min()) >= 0.0 and float(recon.max()) <= 1.0
        z, mu2, logvar2 = model.encode(x)
        assert z.shape == mu2.shape == logvar2.shape == (5, 32)
        assert model.decode(z).shape == (5, 3, 64, 64)
        model.eval()
        assert torch.equal(model.features(x), model.encode(x)[1])  # the same operations: identical bits


def test_reparameterize_samples_around_mu() -> None:
    model = VAE2()
    mu = torch.full((4000, 2), 3.0)
    logvar = torch.full((4000, 2), math.log(0.25))  # std 0.5
    z = model.reparameterize(mu, logvar)
    assert abs(float(z.mean()) - 3.0) < 0.05
    assert abs(float(z.std()) - 0.5) < 0.05


def test_same_numbers_as_reference_given_same_weights() -> None:
    ref = _reference_model()
    model = VAE2()
    model.load_state_dict(ref.state_dict())
    model.eval()
    x = torch.rand(6, 3, 64, 64)
    with torch.no_grad():
        _, ref_mu, ref_logvar = ref.encode(x)
        _, mu, logvar = model.encode(x)
        # the same operations on the same numbers in the same order: identical bits
        assert torch.equal(mu, ref_mu)
        assert torch.equal(logvar, ref_logvar)
        assert torch.equal(model.decode(mu), ref.decode(ref_mu))


# --------------------------------------------------------------------------------------
# Loss


def test_loss_matches_hand_computation() -> None:
    recon = torch.tensor([[0.9, 0.2], [0.5, 0.7]], dtype=torch.float64)
    x = torch.tensor([[1.0, 0.0], [0.25, 1.0]], dtype=torch.float64)
    mu = torch.tensor([[0.5, -1.0]], dtype=torch.float64)
    logvar = torch.tensor([[0.0, math.log(4.0)]], dtype=torch.float64)

    r, t = recon.numpy(), x.numpy()
    bce = -np.sum(t * np.log(r) + (1 - t) * np.log(1 - r))
    # KL(N(mu, s^2) || N(0, 1)) = 0.5 * (s^2 + mu^2 - 1 - log s^2), summed over dims
    kld = 0.5 * ((1 + 0.25 - 1 - 0) + (4 + 1 - 1 - math.log(4.0)))

    total, got_bce, got_kld = vae_loss(recon, x, mu, logvar)
    assert float(got_bce) == pytest.approx(bce, rel=1e-12)
    assert float(got_kld) == pytest.approx(kld, rel=1e-12)
    assert float(total) == pytest.approx(bce + kld / (1600 * 32 * 32), rel=1e-12)
    assert KLD_SCALE == 1600 * 32 * 32

    total2, _, _ = vae_loss(recon, x, mu, logvar, kl_weight=KLD_SCALE)
    assert float(total2) == pytest.approx(bce + kld, rel=1e-12)
    total0, _, _ = vae_loss(recon, x, mu, logvar, kl_weight=0.0)
    assert float(total0) == pytest.approx(bce, rel=1e-12)


# --------------------------------------------------------------------------------------
# Tile conversion and encoding


def test_tiles_to_tensor_values_layout_and_inputs() -> None:
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, size=(3, 64, 64, 3), dtype=np.uint8)
    t = tiles_to_tensor(arr)
    assert t.dtype == torch.float32 and t.shape == (3, 3, 64, 64)
    assert t.is_contiguous(memory_format=torch.channels_last)
    expected = np.transpose(arr, (0, 3, 1, 2)).astype(np.float64) / 255.0
    np.testing.assert_allclose(t.numpy(), expected, atol=1e-7)
    assert float(t[1, 2, 5, 7]) == pytest.approx(arr[1, 5, 7, 2] / 255.0)

    readonly = arr.copy()
    readonly.flags.writeable = False
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert torch.equal(tiles_to_tensor(readonly), t)
    assert torch.equal(tiles_to_tensor(torch.from_numpy(arr)), t)
    assert np.array_equal(arr, readonly)  # input untouched

    with pytest.raises(InvalidArgumentError, match="uint8"):
        tiles_to_tensor(arr.astype(np.float32))
    with pytest.raises(InvalidArgumentError, match="shape"):
        tiles_to_tensor(arr[0])
    with pytest.raises(InvalidArgumentError, match="shape"):
        tiles_to_tensor(np.zeros((2, 64, 64, 4), np.uint8))


def test_encode_tiles_equals_features() -> None:
    torch.manual_seed(0)
    model = VAE2().eval()
    arr = structured_tiles(37, seed=1)
    mu = encode_tiles(model, arr, batch_size=16)
    assert isinstance(mu, np.ndarray) and mu.dtype == np.float32 and mu.shape == (37, 32)
    bound = fp32_mu_bound(model, arr)  # float32 rounding, derived: see wsi_xr/models/rounding.py
    assert_float32_exact(mu, bound, "encode_tiles, batches of 16")
    as_tensor = encode_tiles(model, torch.from_numpy(arr), batch_size=100)
    assert isinstance(as_tensor, torch.Tensor)
    assert_float32_exact(as_tensor.numpy(), bound, "encode_tiles on a tensor, one batch")
    assert encode_tiles(model, arr[:0]).shape == (0, 32)
    with pytest.raises(InvalidArgumentError):
        encode_tiles(model, np.zeros((2, 32, 32, 3), np.uint8))


# --------------------------------------------------------------------------------------
# Weight files


def test_reference_dataparallel_checkpoint_loads_with_identical_mu(tmp_path: Path) -> None:
    ref = _reference_model(seed=2)
    dp = nn.DataParallel(ref)  # moves ref to the first GPU when there is one
    path = tmp_path / "reference.pt"
    torch.save({"state_dict": dp.state_dict()}, path)
    assert all(k.startswith("module.") for k in dp.state_dict())
    ref = dp.module.cpu()

    model = load_vae(path)
    assert not model.training
    x = torch.rand(10, 3, 64, 64)
    with torch.no_grad():
        _, ref_mu, _ = ref.encode(x)
        mu = model.features(x)
    assert torch.equal(mu, ref_mu)  # the same weights and operations: identical bits
    assert read_metadata(path) == {}


def test_reference_checkpoint_in_legacy_serialization_loads(tmp_path: Path) -> None:
    ref = _reference_model(seed=4)
    path = tmp_path / "legacy.pth"
    dp = nn.DataParallel(ref)
    torch.save({"state_dict": dp.state_dict()}, path, _use_new_zipfile_serialization=False)
    assert _same_params(load_vae(path), dp.module.cpu())


def test_plain_state_dict_with_and_without_prefix(tmp_path: Path) -> None:
    ref = _reference_model(seed=5)
    plain = tmp_path / "plain.pt"
    torch.save(ref.state_dict(), plain)
    assert _same_params(load_vae(plain), ref)
    prefixed = tmp_path / "prefixed.pt"
    torch.save({"module." + k: v for k, v in ref.state_dict().items()}, prefixed)
    assert _same_params(load_vae(str(prefixed)), ref)


def test_save_load_round_trip_with_metadata(tmp_path: Path) -> None:
    torch.manual_seed(6)
    model = VAE2()
    path = tmp_path / "sub" / "ours.pt"
    written = save_vae(model, path, metadata={"slides": ["a.svs", "b.svs"], "epochs": 3, "val_loss": np.float32(12.5)})
    assert written == path and path.is_file()
    assert [p.name for p in path.parent.iterdir()] == ["ours.pt"]  # no temporary left behind

    loaded = load_vae(path)
    assert _same_params(loaded, model)
    assert not loaded.training

    meta = read_metadata(path)
    assert meta["tile_size"] == 64 and meta["latent_size"] == 32 and meta["channels"] == 3
    assert isinstance(meta["wsi_xr_version"], str) and meta["wsi_xr_version"]
    assert meta["training"] == {"slides": ["a.svs", "b.svs"], "epochs": 3, "val_loss": 12.5}

    # The reference layout: the reference code can read our files.
    raw = torch.load(path, weights_only=True)
    assert set(raw) == {"state_dict", "wsi_xr"}
    ref = VAE()
    ref.load_state_dict({k.removeprefix("module."): v for k, v in raw["state_dict"].items()})
    assert _same_params(ref, model)

    # Same weights and metadata give the same bytes, so the hash identifies the weights.
    again = tmp_path / "again.pt"
    save_vae(model, again, metadata={"slides": ["a.svs", "b.svs"], "epochs": 3, "val_loss": 12.5})
    assert weights_hash(path) == weights_hash(again) == hashlib.sha256(path.read_bytes()).hexdigest()

    save_vae(model, path, metadata={"epochs": 4})  # overwrite in place
    assert read_metadata(path)["training"] == {"epochs": 4}


def test_save_rejects_unserialisable_metadata(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgumentError, match="metadata"):
        save_vae(VAE2(), tmp_path / "x.pt", metadata={"model": object()})
    assert not (tmp_path / "x.pt").exists()


def _write_bad_files(tmp_path: Path) -> dict[str, Path]:
    rng = np.random.default_rng(0)
    files: dict[str, Path] = {}

    files["random bytes"] = tmp_path / "random.pt"
    files["random bytes"].write_bytes(rng.bytes(4096))

    good = tmp_path / "good.pt"
    save_vae(VAE2(), good)
    data = good.read_bytes()
    files["truncated"] = tmp_path / "truncated.pt"
    files["truncated"].write_bytes(data[: len(data) // 2])
    files["zip damaged inside"] = tmp_path / "damaged.pt"
    middle = bytearray(data)
    middle[len(data) // 2 : len(data) // 2 + 4096] = rng.bytes(4096)
    files["zip damaged inside"].write_bytes(bytes(middle))

    files["empty"] = tmp_path / "empty.pt"
    files["empty"].write_bytes(b"")
    files["text"] = tmp_path / "notes.txt"
    files["text"].write_text("these are not weights\n")
    files["directory"] = tmp_path / "a_directory.pt"
    files["directory"].mkdir()
    files["missing"] = tmp_path / "missing.pt"

    files["pickled module"] = tmp_path / "module.pt"
    torch.save(VAE2(), files["pickled module"])
    files["no tensors"] = tmp_path / "notensors.pt"
    torch.save({"state_dict": {"epoch": 3}, "lr": 0.1}, files["no tensors"])
    files["a list"] = tmp_path / "list.pt"
    torch.save([torch.zeros(3)], files["a list"])

    files["z_dim 16"] = tmp_path / "z16.pt"
    torch.save({"state_dict": VAE(z_dim=16).state_dict()}, files["z_dim 16"])
    files["other architecture"] = tmp_path / "other.pt"
    torch.save(nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Linear(8, 2)).state_dict(), files["other architecture"])
    files["missing keys"] = tmp_path / "partial.pt"
    partial = {k: v for k, v in VAE().state_dict().items() if not k.startswith("decoder")}
    torch.save({"state_dict": partial}, files["missing keys"])
    files["extra keys"] = tmp_path / "extra.pt"
    extra = dict(VAE().state_dict())
    extra["fc4.weight"] = torch.zeros(2, 2)
    torch.save(extra, files["extra keys"])

    files["nan weights"] = tmp_path / "nan.pt"
    nan = VAE().state_dict()
    nan["fc1.weight"][0, 0] = float("nan")
    torch.save({"state_dict": nan}, files["nan weights"])
    return files


def test_bad_files_raise_weights_error_naming_the_file(tmp_path: Path) -> None:
    for kind, path in _write_bad_files(tmp_path).items():
        with pytest.raises(WeightsError) as info:
            load_vae(path)
        message = str(info.value)
        assert path.name in message, (kind, message)
        assert "\n" not in message, (kind, message)
        assert isinstance(info.value, WsiXrError)


def test_bad_file_messages_say_what_is_wrong(tmp_path: Path) -> None:
    files = _write_bad_files(tmp_path)

    def message(kind: str) -> str:
        with pytest.raises(WeightsError) as info:
            load_vae(files[kind])
        return str(info.value)

    assert "does not exist" in message("missing")
    assert "directory" in message("directory")
    assert "empty" in message("empty")
    assert "truncated" in message("truncated")
    assert "not a PyTorch weights file" in message("text")
    assert "Python objects" in message("pickled module")
    assert "no tensors" in message("no tensors")
    z16 = message("z_dim 16")
    assert "fc1.weight (16, 1024) vs (32, 1024)" in z16
    assert "missing keys (12): decoder.1.weight" in message("missing keys")
    assert "unexpected keys (1): fc4.weight" in message("extra keys")
    assert "fails its checksum" in message("zip damaged inside")
    assert "NaN" in message("nan weights") and "fc1.weight" in message("nan weights")


def test_hash_and_metadata_of_bad_files_raise_weights_error(tmp_path: Path) -> None:
    files = _write_bad_files(tmp_path)
    for kind in ("missing", "directory", "empty"):
        with pytest.raises(WeightsError, match=files[kind].name):
            weights_hash(files[kind])
    for kind in ("truncated", "text", "pickled module"):
        with pytest.raises(WeightsError, match=files[kind].name):
            read_metadata(files[kind])


def test_default_weights() -> None:
    path = default_weights_path()
    assert path.name == "default_vae.pt" and path.parent.name == "models"
    if path.is_file():
        model = load_vae()
        assert isinstance(model, VAE2) and not model.training
        assert weights_hash() == weights_hash(path)
    else:
        with pytest.raises(WeightsError, match="wsi-xr train"):
            load_vae()


def test_bad_device_is_an_argument_error(tmp_path: Path) -> None:
    path = tmp_path / "w.pt"
    save_vae(VAE2(), path)
    with pytest.raises(InvalidArgumentError):
        load_vae(path, device="not-a-device")


# --------------------------------------------------------------------------------------
# Training


def test_training_lowers_validation_loss(trained, tiles: np.ndarray) -> None:
    assert trained.n_train + trained.n_val == len(tiles)
    assert trained.n_val == round(0.1 * len(tiles))
    assert [h["epoch"] for h in trained.history] == [1, 2, 3]
    assert all(math.isfinite(h["train_loss"]) and math.isfinite(h["val_loss"]) for h in trained.history)
    assert trained.val_loss == trained.history[-1]["val_loss"]
    # Untrained loss is about 12288 * ln 2 per tile (sigmoid(~0) everywhere).
    assert trained.initial_val_loss > 0.9 * 64 * 64 * 3 * math.log(2)
    assert trained.val_loss < trained.initial_val_loss
    assert not trained.model.training
    meta = trained.metadata()
    assert meta["seed"] == 0 and meta["epochs"] == 3 and len(meta["history"]) == 3


def test_trained_model_saves_and_loads(trained, tmp_path: Path) -> None:
    path = tmp_path / "trained.pt"
    save_vae(trained.model, path, metadata=trained.metadata())
    loaded = load_vae(path)
    assert _same_params(loaded, trained.model)
    assert read_metadata(path)["training"]["val_loss"] == trained.val_loss


def test_training_is_deterministic_and_leaves_global_rng_alone(tiles: np.ndarray) -> None:
    small = tiles[:96]
    torch.manual_seed(1234)
    state = torch.get_rng_state()
    a = train_vae(small, epochs=1, batch_size=32, seed=7, progress=False)
    assert torch.equal(torch.get_rng_state(), state)
    b = train_vae(small, epochs=1, batch_size=32, seed=7, progress=False)
    c = train_vae(small, epochs=1, batch_size=32, seed=8, progress=False)
    assert _same_params(a.model, b.model)
    assert a.history == b.history
    assert not _same_params(a.model, c.model)


def test_training_continues_from_given_model(tiles: np.ndarray) -> None:
    torch.manual_seed(0)
    start = VAE2()
    before = {k: v.clone() for k, v in start.state_dict().items()}
    result = train_vae(tiles[:40], epochs=1, batch_size=20, seed=0, progress=False, model=start)
    assert result.model is start
    assert any(not torch.equal(before[k], v) for k, v in start.state_dict().items())


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"val_fraction": 0.0}, "val_fraction"),
        ({"val_fraction": 1.0}, "val_fraction"),
        ({"epochs": 0}, "epochs"),
        ({"batch_size": 0}, "batch_size"),
        ({"lr": -1.0}, "lr"),
        ({"seed": -1}, "seed"),
        ({"kl_weight": float("nan")}, "kl_weight"),
    ],
)
def test_training_argument_errors(kwargs: dict, match: str) -> None:
    with pytest.raises(InvalidArgumentError, match=match):
        train_vae(np.zeros((4, 64, 64, 3), np.uint8), progress=False, **kwargs)


def test_training_divergence_is_reported(tiles: np.ndarray) -> None:
    with pytest.raises(InvalidArgumentError, match="diverged.*lower lr"):
        train_vae(tiles[:48], epochs=2, batch_size=16, lr=1e6, progress=False)


def test_cuda_device_without_cuda_is_an_argument_error(tmp_path: Path) -> None:
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    path = tmp_path / "w.pt"
    save_vae(VAE2(), path)
    with pytest.raises(InvalidArgumentError, match="cuda"):
        load_vae(path, device="cuda")
    with pytest.raises(InvalidArgumentError, match="cuda"):
        train_vae(np.zeros((4, 64, 64, 3), np.uint8), device="cuda", progress=False)


def test_training_rejects_wrong_tiles() -> None:
    with pytest.raises(InvalidArgumentError, match="uint8"):
        train_vae(np.zeros((4, 64, 64, 3), np.float32), progress=False)
    with pytest.raises(InvalidArgumentError, match="shape"):
        train_vae(np.zeros((4, 32, 32, 3), np.uint8), progress=False)
    with pytest.raises(InvalidArgumentError, match="at least 2"):
        train_vae(np.zeros((1, 64, 64, 3), np.uint8), progress=False)


# --------------------------------------------------------------------------------------
# Reconstruction errors


def test_reconstruction_errors_are_finite(trained) -> None:
    held_out = structured_tiles(40, seed=99)
    errors = reconstruction_errors(trained.model, held_out)
    assert errors["n_tiles"] == 40 and errors["latent_size"] == 32
    assert errors["downsample_side"] == 3 and errors["downsample_values"] == 27
    for key in ("vae_mse", "downsample_mse", "downsample_1x1_mse", "downsample_3x3_mse", "downsample_6x6_mse"):
        assert math.isfinite(errors[key]) and 0.0 <= errors[key] <= 1.0, key
    assert errors["downsample_mse"] == errors["downsample_3x3_mse"]
    assert not trained.model.training


def test_reconstruction_errors_of_flat_tiles_are_zero_for_downsampling() -> None:
    flat = np.empty((4, 64, 64, 3), np.uint8)
    flat[:] = np.array([200, 120, 180], np.uint8)
    errors = reconstruction_errors(VAE2(), flat, factor_values=12)
    assert errors["downsample_side"] == 2
    assert errors["downsample_1x1_mse"] < 1e-9
    assert errors["downsample_2x2_mse"] < 1e-9
    assert errors["downsample_4x4_mse"] < 1e-9
    # The untrained decoder outputs about 0.5 everywhere.
    expected = np.mean((np.array([200, 120, 180]) / 255.0 - 0.5) ** 2)
    assert errors["vae_mse"] == pytest.approx(expected, abs=0.02)


def test_models_layer_imports_nothing_else_from_wsi_xr() -> None:
    root = Path(__file__).resolve().parents[1] / "wsi_xr" / "models"
    for source in root.glob("*.py"):
        for line in source.read_text().splitlines():
            stripped = line.strip()
            if stripped.startswith(("import wsi_xr", "from wsi_xr")):
                module = stripped.split()[1]
                assert module == "wsi_xr.errors" or module.startswith("wsi_xr.models"), (source.name, line)
    assert os.path.basename(str(root)) == "models"


# --------------------------------------------------------------------------------------
# GPU (run where CUDA is available)

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.gpu
@needs_cuda
def test_cuda_load_encode_and_train(tmp_path: Path) -> None:
    path = tmp_path / "w.pt"
    save_vae(VAE2(), path)
    gpu, cpu = load_vae(path, device="cuda"), load_vae(path)
    assert next(gpu.parameters()).is_cuda and not gpu.training
    arr = structured_tiles(64, seed=5)
    on_gpu = encode_tiles(gpu, torch.from_numpy(arr).cuda())
    assert on_gpu.is_cuda
    np.testing.assert_allclose(on_gpu.cpu().numpy(), encode_tiles(cpu, arr), atol=1e-3)

    state = torch.cuda.get_rng_state()
    result = train_vae(arr, epochs=1, batch_size=16, device="cuda", progress=False)
    assert torch.equal(torch.cuda.get_rng_state(), state)
    assert next(result.model.parameters()).is_cuda
    assert math.isfinite(result.val_loss)


@pytest.mark.gpu
@needs_cuda
def test_cupy_tiles_through_dlpack_stay_on_the_gpu() -> None:
    cp = pytest.importorskip("cupy")
    arr = structured_tiles(8, seed=6)
    x = tiles_to_tensor(torch.from_dlpack(cp.asarray(arr)))
    assert x.is_cuda and x.shape == (8, 3, 64, 64)
    np.testing.assert_allclose(x.cpu().numpy(), tiles_to_tensor(arr).numpy(), atol=1e-7)


def test_shipped_default_weights_encode_real_tiles() -> None:
    """The default weights ship in the package, load, and give finite 32-dim mu on real tissue."""
    from wsi_xr.models import default_weights_path, load_vae, read_metadata
    from wsi_xr.sampling import sample_tissue_tiles

    from .conftest import data_file

    path = default_weights_path()
    assert path.exists() and path.stat().st_size < 20 * 2**20
    meta = read_metadata(None)
    assert meta["training"]["epochs"] >= 1 and meta["latent_size"] == 32
    tiles, _ = sample_tissue_tiles([data_file("cmu-1-small-region.svs")], max_tiles=64, seed=0)
    mu = encode_tiles(load_vae(), tiles)
    assert mu.shape == (64, 32) and np.isfinite(mu).all()
    assert mu.std(axis=0).mean() > 1e-3  # not a constant map


# --------------------------------------------------------------------------------------
# Training levers (loss, schedule, augmentation, balanced sampling, logvar start)


def test_training_levers_run_and_are_recorded(tiles: np.ndarray) -> None:
    groups = np.repeat([0, 1], [80, 16])
    result = train_vae(
        tiles[:96],
        epochs=2,
        batch_size=32,
        seed=0,
        progress=False,
        loss="mse",
        schedule="cosine",
        warmup=0.1,
        weight_decay=1e-4,
        stain_jitter=0.1,
        zoom=0.25,
        groups=groups,
        balance=1.0,
        init_logvar=-8.0,
        eval_tiles=tiles[200:216],
    )
    meta = result.metadata()
    assert meta["loss"].startswith("mse") and meta["schedule"] == "cosine(warmup=0.1)"
    assert "hed_stain_jitter" in meta["augmentation"] and "zoom" in meta["augmentation"]
    assert meta["balance"] == 1.0 and meta["init_logvar"] == -8.0 and meta["optimizer"].startswith("AdamW")
    assert all(0 < h["eval_mse"] < 1 for h in result.history)
    # Summed squared error per tile: at most 12288 (every pixel off by 1).
    assert 0 < result.val_loss < 64 * 64 * 3
    # The logvar head started constant at -8 and moved only a little in two epochs.
    assert abs(float(result.model.fc2.bias.detach().mean()) + 8.0) < 0.5
    reference = train_vae(tiles[:96], epochs=1, batch_size=32, seed=0, progress=False).metadata()
    assert reference["loss"].startswith("bce") and reference["schedule"] == "constant"
    assert reference["augmentation"] == "dihedral8" and reference["init_logvar"] is None


def test_learning_rate_schedules() -> None:
    from wsi_xr.models.train import _lr_factor

    assert [_lr_factor("constant", s, 100, 0.0) for s in (0, 50, 99)] == [1.0, 1.0, 1.0]
    cosine = [_lr_factor("cosine", s, 100, 0.1) for s in range(100)]
    assert cosine[0] == pytest.approx(0.1) and cosine[9] == pytest.approx(1.0) and cosine[10] == pytest.approx(1.0)
    assert cosine[-1] < 0.001 and all(a >= b for a, b in zip(cosine[10:], cosine[11:]))
    onecycle = [_lr_factor("onecycle", s, 100, 0.2) for s in range(100)]
    assert onecycle[0] == pytest.approx(0.04) and max(onecycle) == pytest.approx(1.0) and onecycle[-1] < 0.001


def test_stain_jitter_and_zoom_keep_tiles_valid() -> None:
    from wsi_xr.models.train import _stain_jitter, _zoom

    x = tiles_to_tensor(structured_tiles(8, seed=4)).contiguous()
    same = _stain_jitter(x, np.random.default_rng(0), 0.0, 0.0)
    np.testing.assert_allclose(same.numpy(), x.clamp_min(1 / 255).numpy(), atol=1e-5)  # no jitter: identity
    jittered = _stain_jitter(x, np.random.default_rng(0), 0.3, 0.05)
    assert jittered.shape == x.shape and float(jittered.min()) >= 0 and float(jittered.max()) <= 1
    assert float((jittered - x).abs().mean()) > 0.01
    zoomed = _zoom(x, np.random.default_rng(0), 0.5)
    assert zoomed.shape == x.shape and float(zoomed.min()) >= 0 and float(zoomed.max()) <= 1
    np.testing.assert_allclose(_zoom(x, np.random.default_rng(0), 1e-9).numpy(), x.numpy(), atol=1e-4)


def test_balanced_sampling_draws_groups_equally() -> None:
    from wsi_xr.models.train import _epoch_order

    groups = np.repeat([0, 1, 2], [900, 90, 10])
    idx = np.arange(1000)
    drawn = _epoch_order(np.random.default_rng(0), idx, groups, 1.0)
    counts = np.bincount(groups[drawn], minlength=3)
    assert drawn.size == 1000 and np.all(np.abs(counts - 333) < 60)
    assert sorted(_epoch_order(np.random.default_rng(0), idx, groups, 0.0).tolist()) == idx.tolist()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"loss": "l1"}, "loss"),
        ({"schedule": "step"}, "schedule"),
        ({"warmup": 1.0}, "warmup"),
        ({"stain_jitter": -0.1}, "stain_jitter"),
        ({"zoom": 1.5}, "zoom"),
        ({"balance": 0.5}, "needs groups"),
        ({"balance": 2.0, "groups": np.zeros(4, np.int64)}, "balance"),
        ({"groups": np.zeros(3, np.int64)}, "groups"),
        ({"init_logvar": 100.0}, "init_logvar"),
        ({"weight_decay": -1.0}, "weight_decay"),
    ],
)
def test_training_lever_argument_errors(kwargs: dict, match: str) -> None:
    with pytest.raises(InvalidArgumentError, match=match):
        train_vae(np.zeros((4, 64, 64, 3), np.uint8), progress=False, **kwargs)
