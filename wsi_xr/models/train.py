"""Training VAE2 on tiles, and judging its reconstructions against plain downsampling.

:func:`train_vae` takes tissue tiles already in memory (``(N, 64, 64, 3)`` uint8, e.g.
sampled from a few slides), holds out a validation set, trains with random flips and
90-degree rotations, and returns the model with its loss history. It is deterministic
for a given seed on the CPU (with the same number of torch threads) and leaves the global
torch RNG as it found it. On CUDA the seed fixes the split, shuffles, augmentation and
initial weights, but cuDNN's convolution gradients are not bitwise reproducible, so two
runs end with slightly different weights.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from wsi_xr.errors import InvalidArgumentError
from wsi_xr.models.vae import CHANNELS, TILE_SIZE, VAE2, tiles_to_tensor, torch_device, vae_loss

__all__ = ["TrainResult", "reconstruction_errors", "train_vae"]

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    """What :func:`train_vae` returns.

    Attributes
    ----------
    model
        The trained model, in eval mode, on the training device.
    history
        One dict per epoch: ``{"epoch": 1.., "train_loss": ..., "val_loss": ...}``; losses
        are per tile (the summed VAE loss divided by the number of tiles). ``train_loss``
        is averaged over the epoch's batches in train mode with augmentation.
    val_loss
        Validation loss per tile after the last epoch.
    initial_val_loss
        Validation loss per tile of the model before training.
    n_train, n_val
        Number of training and validation tiles.
    seed
        The seed of the split, the shuffles, the augmentation and the initial weights.
    settings
        The other arguments (epochs, batch size, learning rate, KL weight, ...).
    """

    model: VAE2
    history: list[dict[str, float]]
    val_loss: float
    initial_val_loss: float
    n_train: int
    n_val: int
    seed: int
    settings: dict[str, Any] = field(default_factory=dict)

    def metadata(self) -> dict[str, Any]:
        """A JSON-like description of this run, for :func:`~wsi_xr.models.weights.save_vae`."""
        return {
            **self.settings,
            "seed": self.seed,
            "n_train": self.n_train,
            "n_val": self.n_val,
            "initial_val_loss": self.initial_val_loss,
            "val_loss": self.val_loss,
            "history": [dict(h) for h in self.history],
        }


def _check_tiles(tiles: Any, name: str = "tiles") -> np.ndarray:
    arr = np.asarray(tiles)
    if arr.dtype != np.uint8 or arr.ndim != 4 or arr.shape[1:] != (TILE_SIZE, TILE_SIZE, CHANNELS):
        raise InvalidArgumentError(
            f"{name} must be a uint8 array of shape (N, {TILE_SIZE}, {TILE_SIZE}, {CHANNELS}), "
            f"got {arr.dtype} {arr.shape}"
        )
    return arr


def _dihedral(batch: torch.Tensor, codes: np.ndarray) -> torch.Tensor:
    """Apply one of the 8 flips/rotations to each tile of an ``(n, H, W, C)`` batch.

    Code ``c``: mirror left-right when ``c & 4``, then rotate by ``(c & 3) * 90`` degrees.
    """
    out = torch.empty_like(batch)
    for code in range(8):
        sel = np.flatnonzero(codes == code)
        if sel.size == 0:
            continue
        index = torch.from_numpy(sel).to(batch.device)
        part = batch.index_select(0, index)
        if code & 4:
            part = torch.flip(part, dims=(2,))
        if code & 3:
            part = torch.rot90(part, k=code & 3, dims=(1, 2))
        out[index] = part
    return out


def _batch(tiles: np.ndarray, idx: np.ndarray, device: torch.device) -> torch.Tensor:
    """uint8 ``(n, H, W, C)`` tensor of ``tiles[idx]`` on ``device`` (the gather reads in file order)."""
    return torch.from_numpy(tiles[np.sort(idx)]).to(device, non_blocking=True)


def _evaluate(
    model: VAE2, tiles: np.ndarray, idx: np.ndarray, *, batch_size: int, device: torch.device, kl_weight: float
) -> float:
    """Mean VAE loss per tile over ``tiles[idx]`` in eval mode, no augmentation."""
    model.eval()
    total = 0.0
    with torch.no_grad():
        for start in range(0, idx.size, batch_size):
            x = tiles_to_tensor(_batch(tiles, idx[start : start + batch_size], device))
            recon, mu, logvar = model(x)
            if not bool(torch.isfinite(recon).all()):
                raise InvalidArgumentError(
                    "the model output on the validation tiles is NaN (training diverged, or the starting "
                    "model holds NaN weights); train again with a lower lr or from fresh weights"
                )
            loss, _, _ = vae_loss(recon, x, mu, logvar, kl_weight=kl_weight)
            total += float(loss)
    return total / idx.size


def train_vae(
    train_tiles: np.ndarray,
    *,
    val_fraction: float = 0.1,
    epochs: int = 10,
    batch_size: int = 128,
    lr: float = 1e-3,
    seed: int = 0,
    device: str | torch.device = "cpu",
    kl_weight: float = 1.0,
    progress: bool = True,
    model: VAE2 | None = None,
) -> TrainResult:
    """Train a :class:`VAE2` on ``(N, 64, 64, 3)`` uint8 tiles with Adam and the reference loss.

    A fraction ``val_fraction`` of the tiles (chosen with ``np.random.default_rng(seed)``)
    is held out; the rest is shuffled every epoch and augmented per tile with one of the
    8 dihedral transforms (flips and 90-degree rotations). Tiles are converted to float one
    batch at a time, so memory stays at the uint8 tiles plus a few batches. The validation
    loss is computed in eval mode without augmentation (``z`` is sampled, as in the
    reference ``forward``).

    Parameters
    ----------
    train_tiles
        Tiles, uint8 RGB, channels last.
    val_fraction
        Share of tiles held out for validation, in ``(0, 1)``; at least one tile is held
        out and at least one is trained on.
    epochs
        Passes over the training tiles (``>= 1``).
    batch_size, lr
        Mini-batch size and Adam learning rate.
    seed
        Seeds the split, shuffles, augmentation, initial weights and the sampling of
        ``z``. The global torch RNG state is restored on return.
    device
        Torch device to train on (``"cpu"``, ``"cuda"``).
    kl_weight
        Weight of the (reference-scaled) KL term, see :func:`~wsi_xr.models.vae.vae_loss`.
    progress
        Show a tqdm progress bar with the train / validation losses.
    model
        Start from this model (it is trained in place and moved to ``device``) instead of
        freshly initialised weights.

    Returns
    -------
    TrainResult
        The model in eval mode, the per-epoch history and the final validation loss.
    """
    tiles = _check_tiles(train_tiles, "train_tiles")
    n = tiles.shape[0]
    if n < 2:
        raise InvalidArgumentError(f"train_tiles holds {n} tiles; at least 2 are needed (to train and to validate)")
    if not 0.0 < float(val_fraction) < 1.0:
        raise InvalidArgumentError(f"val_fraction must be between 0 and 1 (exclusive), got {val_fraction}")
    if int(epochs) != epochs or epochs < 1:
        raise InvalidArgumentError(f"epochs must be a positive integer, got {epochs}")
    if int(batch_size) != batch_size or batch_size < 1:
        raise InvalidArgumentError(f"batch_size must be a positive integer, got {batch_size}")
    if not (math.isfinite(lr) and lr > 0):
        raise InvalidArgumentError(f"lr must be a positive number, got {lr}")
    if not (math.isfinite(kl_weight) and kl_weight >= 0):
        raise InvalidArgumentError(f"kl_weight must be a number >= 0, got {kl_weight}")
    if int(seed) != seed or seed < 0:
        raise InvalidArgumentError(f"seed must be an integer >= 0, got {seed}")
    epochs, batch_size, seed = int(epochs), int(batch_size), int(seed)
    dev = torch_device(device)

    rng = np.random.default_rng(seed)
    order = rng.permutation(n)
    n_val = min(max(1, round(n * float(val_fraction))), n - 1)
    val_idx, train_idx = np.sort(order[:n_val]), order[n_val:]
    n_train = train_idx.size
    n_batches = math.ceil(n_train / batch_size)

    cuda_devices = []  # fork_rng saves and restores the RNG of the CUDA device trained on
    if dev.type == "cuda":
        cuda_devices = [dev.index if dev.index is not None else torch.cuda.current_device()]
    history: list[dict[str, float]] = []
    with torch.random.fork_rng(devices=cuda_devices):
        torch.manual_seed(seed)
        if model is None:
            model = VAE2()
        model = model.to(dev)
        optimizer = torch.optim.Adam(model.parameters(), lr=lr)
        evaluate = dict(batch_size=batch_size, device=dev, kl_weight=kl_weight)
        initial_val_loss = _evaluate(model, tiles, val_idx, **evaluate)
        val_loss = initial_val_loss
        log.info("training VAE2 on %d tiles (%d held out) for %d epochs", n_train, n_val, epochs)
        log.info("initial validation loss %.2f per tile", val_loss)
        bar = tqdm(total=epochs * n_batches, desc="train VAE", unit="batch", disable=not progress)
        try:
            bar.set_postfix(val=f"{val_loss:.1f}")
            for epoch in range(1, epochs + 1):
                model.train()
                shuffled = rng.permutation(train_idx)
                codes = rng.integers(0, 8, size=n_train)
                total = 0.0
                for b in range(n_batches):
                    sl = slice(b * batch_size, (b + 1) * batch_size)
                    x = tiles_to_tensor(_dihedral(_batch(tiles, shuffled[sl], dev), codes[sl]))
                    recon, mu, logvar = model(x)
                    if not bool(torch.isfinite(recon).all()):  # checked before the BCE asserts on it
                        raise InvalidArgumentError(
                            f"training diverged at epoch {epoch}, batch {b + 1} (the model output became NaN); "
                            f"train again with a lower lr than {lr}"
                        )
                    loss, _, _ = vae_loss(recon, x, mu, logvar, kl_weight=kl_weight)
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    total += float(loss.detach())
                    bar.update(1)
                    seen = min(n_train, (b + 1) * batch_size)
                    bar.set_postfix(epoch=epoch, train=f"{total / seen:.1f}", val=f"{val_loss:.1f}")
                train_loss = total / n_train
                val_loss = _evaluate(model, tiles, val_idx, **evaluate)
                history.append({"epoch": epoch, "train_loss": train_loss, "val_loss": val_loss})
                bar.set_postfix(epoch=epoch, train=f"{train_loss:.1f}", val=f"{val_loss:.1f}")
                log.info("epoch %d/%d: train loss %.2f, val loss %.2f", epoch, epochs, train_loss, val_loss)
        finally:
            bar.close()
    model.eval()
    settings = {
        "epochs": epochs,
        "batch_size": batch_size,
        "lr": float(lr),
        "kl_weight": float(kl_weight),
        "val_fraction": float(val_fraction),
        "augmentation": "dihedral8",
        "device": str(dev),
    }
    return TrainResult(
        model=model,
        history=history,
        val_loss=val_loss,
        initial_val_loss=initial_val_loss,
        n_train=n_train,
        n_val=n_val,
        seed=seed,
        settings=settings,
    )


def reconstruction_errors(
    model: VAE2, tiles: np.ndarray, *, factor_values: int = 27, batch_size: int = 256
) -> dict[str, float]:
    """Mean squared reconstruction error of the VAE vs plain downsampling, on held-out tiles.

    The VAE reconstruction is ``decode(mu)`` in eval mode. The baseline keeps about as
    many numbers per tile as the latent: an area average down to ``s x s x 3`` values
    (``s = round(sqrt(factor_values / 3))``, so 3x3x3 = 27 for the default, close to the 32
    latents), upsampled back to 64x64 bilinearly. For context the 1x1 (mean colour) and
    ``2s x 2s`` baselines are reported too. Errors are in ``[0, 1]`` intensity units.

    Returns
    -------
    dict
        ``n_tiles``, ``latent_size``, ``vae_mse``, ``downsample_side``,
        ``downsample_values``, ``downsample_mse`` (the matched baseline) and
        ``downsample_{k}x{k}_mse`` for every side ``k`` computed.
    """
    arr = _check_tiles(tiles)
    if arr.shape[0] == 0:
        raise InvalidArgumentError("tiles is empty; pass at least one held-out tile")
    if int(factor_values) != factor_values or factor_values < CHANNELS:
        raise InvalidArgumentError(f"factor_values must be an integer >= {CHANNELS}, got {factor_values}")
    if batch_size < 1:
        raise InvalidArgumentError(f"batch_size must be >= 1, got {batch_size}")
    side = max(1, round(math.sqrt(factor_values / CHANNELS)))
    sides = sorted({1, side, 2 * side})
    dev = next(model.parameters()).device
    was_training = model.training
    model.eval()
    vae_sum = 0.0
    down_sum = dict.fromkeys(sides, 0.0)
    try:
        with torch.no_grad():
            for start in range(0, arr.shape[0], batch_size):
                x = tiles_to_tensor(arr[start : start + batch_size]).to(dev)
                recon = model.decode(model.features(x))
                vae_sum += float(torch.sum((recon - x) ** 2, dtype=torch.float64))
                for k in sides:
                    small = F.adaptive_avg_pool2d(x, k)
                    up = F.interpolate(small, size=x.shape[-2:], mode="bilinear", align_corners=False)
                    down_sum[k] += float(torch.sum((up - x) ** 2, dtype=torch.float64))
    finally:
        model.train(was_training)
    count = arr.shape[0] * CHANNELS * TILE_SIZE * TILE_SIZE
    result: dict[str, float] = {
        "n_tiles": arr.shape[0],
        "latent_size": model.z_dim,
        "vae_mse": vae_sum / count,
        "downsample_side": side,
        "downsample_values": CHANNELS * side * side,
        "downsample_mse": down_sum[side] / count,
    }
    for k in sides:
        result[f"downsample_{k}x{k}_mse"] = down_sum[k] / count
    return result
