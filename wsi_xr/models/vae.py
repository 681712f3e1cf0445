"""The reference convolutional VAE (``VAE2``) for 64x64 RGB tiles, its loss, and tile conversion.

The architecture, parameter names and shapes are exactly those of the reference
notebook's ``VAE2``, so its checkpoints load unchanged (see :mod:`wsi_xr.models.weights`).
Input tiles are ``(N, 3, 64, 64)`` float in ``[0, 1]``; the features wsi_xr stores are the
encoder's ``mu`` (deterministic), a 32-vector per tile.

Layer indices (they are part of the state-dict key names)::

    encoder.0  Conv2d(3, 32, 4, stride=2)       64 -> 31
    encoder.2  Conv2d(32, 64, 4, stride=2)      31 -> 14
    encoder.4  Conv2d(64, 128, 4, stride=2)     14 -> 6
    encoder.5  BatchNorm2d(128)
    encoder.7  Conv2d(128, 256, 4, stride=2)     6 -> 2      flatten: 256 * 2 * 2 = 1024
    fc1 / fc2  Linear(1024, 32)                 mu / logvar
    fc3        Linear(32, 1024)
    decoder.1  ConvTranspose2d(1024, 128, 5, stride=2)   1 -> 5
    decoder.3  ConvTranspose2d(128, 64, 5, stride=2)     5 -> 13
    decoder.4  BatchNorm2d(64)
    decoder.6  ConvTranspose2d(64, 32, 6, stride=2)     13 -> 30
    decoder.8  ConvTranspose2d(32, 3, 6, stride=2)      30 -> 64, then Sigmoid
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from wsi_xr.errors import InvalidArgumentError

__all__ = [
    "CHANNELS",
    "DEFAULT_BATCH_SIZE",
    "KLD_SCALE",
    "LATENT_SIZE",
    "PRECISIONS",
    "TILE_SIZE",
    "VAE2",
    "default_batch_size",
    "encode_tiles",
    "tiles_to_tensor",
    "torch_device",
    "torch_threads_scope",
    "vae_loss",
]

#: Side of the square tiles the model takes, in pixels.
TILE_SIZE = 64
#: Number of colour channels the model takes (RGB).
CHANNELS = 3
#: Length of the latent vector (``mu``) per tile.
LATENT_SIZE = 32
#: The reference divides the KL divergence by this constant before adding it to the BCE.
KLD_SCALE = 1600 * 32 * 32


def torch_device(device: str | torch.device) -> torch.device:
    """``device`` as a :class:`torch.device`, checked to exist on this machine.

    Raises
    ------
    InvalidArgumentError
        For a string torch does not know, or a CUDA device when CUDA is not available.
    """
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise InvalidArgumentError(f"device {device!r} is not a torch device; use e.g. 'cpu' or 'cuda'") from err
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise InvalidArgumentError(f"device {str(dev)!r} asked for, but this torch build sees no CUDA GPU; use device='cpu'")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise InvalidArgumentError(f"device {str(dev)!r} asked for, but only {torch.cuda.device_count()} CUDA GPUs are visible")
    return dev


class _Flatten(nn.Module):
    """``(N, C, H, W) -> (N, C*H*W)``; no parameters (keeps the reference's layer indices)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(x.shape[0], -1)


class _UnFlatten(nn.Module):
    """``(N, size) -> (N, size, 1, 1)``; no parameters (keeps the reference's layer indices)."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self.size = size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(x.shape[0], self.size, 1, 1)


class VAE2(nn.Module):
    """The reference variational autoencoder for 64x64 RGB tiles.

    Parameters
    ----------
    image_channels
        Channels of the input and output images (3 for RGB).
    h_dim
        Length of the flattened encoder output; 1024 (= 256 * 2 * 2) for 64x64 input.
    z_dim
        Length of the latent vector.

    Notes
    -----
    ``forward`` and ``encode`` sample ``z`` from ``N(mu, exp(logvar))`` with
    :func:`torch.randn_like` (in any mode, as the reference does), so they consume the
    global torch RNG. :meth:`features` returns ``mu`` and is deterministic in eval mode.
    """

    def __init__(self, image_channels: int = CHANNELS, h_dim: int = 1024, z_dim: int = LATENT_SIZE) -> None:
        super().__init__()
        self.image_channels = image_channels
        self.h_dim = h_dim
        self.z_dim = z_dim
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
            _Flatten(),
        )
        self.fc1 = nn.Linear(h_dim, z_dim)
        self.fc2 = nn.Linear(h_dim, z_dim)
        self.fc3 = nn.Linear(z_dim, h_dim)
        self.decoder = nn.Sequential(
            _UnFlatten(h_dim),
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

    def reparameterize(self, mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
        """Sample ``z = mu + exp(logvar / 2) * eps``, ``eps ~ N(0, 1)``, on ``mu``'s device."""
        std = torch.exp(0.5 * logvar)
        return mu + std * torch.randn_like(std)

    def bottleneck(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """From the flattened encoder output ``h`` to ``(z, mu, logvar)``."""
        mu, logvar = self.fc1(h), self.fc2(h)
        return self.reparameterize(mu, logvar), mu, logvar

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(N, 3, 64, 64)`` images in ``[0, 1]`` to ``(z, mu, logvar)``, each ``(N, z_dim)``."""
        return self.bottleneck(self.encoder(x))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """``(N, z_dim)`` latents to ``(N, 3, 64, 64)`` images in ``[0, 1]``."""
        return self.decoder(self.fc3(z))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Reconstruct ``x`` through a sampled ``z``: returns ``(recon, mu, logvar)``."""
        z, mu, logvar = self.encode(x)
        return self.decode(z), mu, logvar

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The encoder mean ``mu`` ``(N, z_dim)``: the tile features wsi_xr stores.

        Skips ``logvar`` and sampling. Gradients and the module mode are left to the
        caller (use ``model.eval()`` and :func:`torch.inference_mode` for features).
        """
        return self.fc1(self.encoder(x))


def vae_loss(
    recon: torch.Tensor,
    x: torch.Tensor,
    mu: torch.Tensor,
    logvar: torch.Tensor,
    *,
    kl_weight: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The reference VAE loss, summed over the batch: returns ``(total, bce, kld)``.

    ``bce`` is the binary cross-entropy of ``recon`` against ``x`` summed over every
    pixel, channel and tile; ``kld = -0.5 * sum(1 + logvar - mu**2 - exp(logvar))``
    (unscaled). As in the reference, the KL term enters the total divided by
    :data:`KLD_SCALE` (``1600 * 32 * 32``)::

        total = bce + kl_weight * kld / KLD_SCALE

    so with the default ``kl_weight=1`` the model is very nearly a plain autoencoder
    (the reference's choice). Divide by the batch size for a per-tile loss.
    """
    bce = F.binary_cross_entropy(recon, x, reduction="sum")
    kld = -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp())
    return bce + (kl_weight / KLD_SCALE) * kld, bce, kld


def tiles_to_tensor(tiles: Any) -> torch.Tensor:
    """``(N, H, W, 3)`` uint8 tiles (NumPy or torch) to ``(N, 3, H, W)`` float32 in ``[0, 1]``.

    A torch tensor stays on its device (so CuPy chunks handed over with DLPack are
    converted on the GPU); anything else is read as a NumPy array and gives a CPU
    tensor. The uint8 input is not modified; the result is a new tensor, stored
    channels-last (``torch.channels_last``), which the convolutions prefer; call
    ``.contiguous()`` for NCHW memory.

    Raises
    ------
    InvalidArgumentError
        If the input is not 4-D with 3 channels last, or not uint8.
    """
    if isinstance(tiles, torch.Tensor):
        t = tiles
    else:
        arr = np.asarray(tiles)
        if arr.dtype != np.uint8:
            raise InvalidArgumentError(f"tiles must be uint8 RGB (N, H, W, 3), got dtype {arr.dtype}; convert with .astype(np.uint8)")
        with warnings.catch_warnings():
            # A read-only array (from Dask or Zarr) is fine: it is only read, then copied.
            warnings.simplefilter("ignore", UserWarning)
            t = torch.from_numpy(arr)
    if t.dtype != torch.uint8:
        raise InvalidArgumentError(f"tiles must be uint8 RGB (N, H, W, 3), got dtype {t.dtype}")
    if t.ndim != 4 or t.shape[-1] != CHANNELS:
        raise InvalidArgumentError(f"tiles must have shape (N, H, W, {CHANNELS}) (channels last), got {tuple(t.shape)}")
    # Channels-last memory (NHWC strides, logical shape NCHW): the uint8 layout needs no
    # transpose copy, and the CPU convolutions run about 25% faster on it than on NCHW.
    return t.permute(0, 3, 1, 2).to(torch.float32, memory_format=torch.channels_last).div_(255.0)


#: Accepted ``precision=`` values of inference: exact float32, bfloat16 autocast, or int8
#: products (the VAE on a CPU only: :class:`~wsi_xr.models.gemm.Int8Encoder`).
PRECISIONS = ("fp32", "bf16", "int8")
#: Default encoder batch per device type and precision. CPU: measured in the pipeline on the
#: project's 2-core CPU (one torch thread per Dask thread, each decoding its chunk, then
#: encoding it; ``python -m benchmarks.bench_scale``, "Encoder batch in the pipeline"):
#: small batches keep the layers' temporaries small, so each thread reuses its heap instead
#: of mapping and faulting in fresh memory for every batch. CUDA: not measured on a GPU
#: here; larger batches keep a GPU busy (``benchmarks/bench_gpu.py`` sweeps them).
DEFAULT_BATCH_SIZE = {"cpu": {"fp32": 64, "bf16": 128, "int8": 64}, "cuda": {"fp32": 128, "bf16": 256}}


def default_batch_size(precision: str, device_type: str = "cpu") -> int:
    """The encoder batch :func:`encode_tiles` uses when none is given (:data:`DEFAULT_BATCH_SIZE`)."""
    return DEFAULT_BATCH_SIZE.get(device_type, DEFAULT_BATCH_SIZE["cpu"])[precision]


def encode_tiles(model: VAE2, tiles: Any, *, batch_size: int | None = None, precision: str = "fp32") -> Any:
    """Features (``mu``) of ``(N, 64, 64, 3)`` uint8 tiles, in batches, without gradients.

    Runs the model as it is (call ``model.eval()`` first for deterministic BatchNorm;
    :func:`~wsi_xr.models.weights.load_vae` returns it in eval mode) on the model's
    device, in :func:`torch.inference_mode`, ``batch_size`` tiles at a time (None: the
    measured best for the device and precision, :func:`default_batch_size`). ``precision="bf16"`` runs the convolutions
    under bfloat16 autocast (faster on CPUs with AVX512-BF16/AMX and on recent GPUs; see
    the README for its measured error); ``"fp32"`` is exact. On the CPU in fp32, each encoder
    convolution runs as oneDNN's convolution or as im2col + GEMM, whichever this CPU runs
    faster (:mod:`wsi_xr.models.gemm`): the same sums in another order. ``"int8"`` (CPU only)
    runs every product in int8 (:class:`~wsi_xr.models.gemm.Int8Encoder`), whatever its
    speed: :func:`wsi_xr.encode.check_precision` is where a run refuses it on a CPU where it
    is slower. Returns ``(N, z_dim)`` float32: a NumPy array for NumPy input, a tensor on the
    model's device for tensor input.
    """
    if precision not in PRECISIONS:
        raise InvalidArgumentError(f"precision={precision!r}: use one of {', '.join(PRECISIONS)}")
    device = next(model.parameters()).device
    if precision == "int8" and device.type != "cpu":
        raise InvalidArgumentError(f"precision='int8' runs on the CPU only (the model is on {device.type}); use fp32 or bf16 there.")
    if batch_size is None:
        batch_size = default_batch_size(precision, device.type)
    if batch_size < 1:
        raise InvalidArgumentError(f"batch_size must be >= 1, got {batch_size}")
    as_numpy = not isinstance(tiles, torch.Tensor)
    if as_numpy:
        tiles = np.asarray(tiles)
    expected = (TILE_SIZE, TILE_SIZE, model.image_channels)
    if tiles.ndim != 4 or tuple(tiles.shape[1:]) != expected:
        raise InvalidArgumentError(f"tiles must have shape (N, {TILE_SIZE}, {TILE_SIZE}, {model.image_channels}), got {tuple(tiles.shape)}")
    n = int(tiles.shape[0])
    out = torch.empty((n, model.z_dim), dtype=torch.float32, device=device)
    autocast = torch.autocast(device_type=device.type, dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()
    features = model.features
    if device.type == "cpu" and precision == "fp32" and not model.training:
        from wsi_xr.models.gemm import layered_encoder

        features = layered_encoder(model)  # each convolution as this CPU runs it fastest: the same sums
    elif precision == "int8":
        from wsi_xr.models.gemm import int8_encoder

        features = int8_encoder(model)
    with torch.inference_mode(), autocast:
        for start in range(0, n, batch_size):
            x = tiles_to_tensor(tiles[start : start + batch_size]).to(device, non_blocking=True)
            out[start : start + x.shape[0]] = features(x).float()
    return out.cpu().numpy() if as_numpy else out


@contextlib.contextmanager
def torch_threads_scope(threads: int | None) -> Iterator[None]:
    """Run torch with ``threads`` threads in this thread for the block, then put the setting back.

    Opt-in (None: nothing changes). Torch's thread count is per calling thread for its
    OpenMP regions, so each Dask task sets and restores its own.
    """
    if threads is None:
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
