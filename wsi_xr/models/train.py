"""Training VAE2 on tiles, and judging its reconstructions against plain downsampling.

:func:`train_vae` takes tissue tiles already in memory (``(N, 64, 64, 3)`` uint8, e.g.
sampled from a few slides), holds out a validation set, trains with random flips and
90-degree rotations (optionally also stain jitter in HED space and small zooms, and
balanced sampling across slides), and returns the model with its loss history. Its
defaults are the reference recipe (summed BCE + scaled KL, Adam at a constant rate);
``loss="mse"``, ``schedule="cosine"`` and the augmentation options are the levers the
shipped default weights use (see README, "The VAE"). It is deterministic for a given
seed on the CPU (with the same number of torch threads) and leaves the global torch RNG
as it found it. On CUDA the seed fixes the split, shuffles, augmentation and initial
weights, but cuDNN's convolution gradients are not bitwise reproducible, so two runs end
with slightly different weights.
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
from wsi_xr.models.vae import CHANNELS, KLD_SCALE, TILE_SIZE, VAE2, tiles_to_tensor, torch_device, vae_loss

__all__ = ["LOSSES", "SCHEDULES", "TrainResult", "reconstruction_errors", "train_vae"]

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
        raise InvalidArgumentError(f"{name} must be a uint8 array of shape (N, {TILE_SIZE}, {TILE_SIZE}, {CHANNELS}), got {arr.dtype} {arr.shape}")
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


#: Optical densities (per unit of stain, R, G, B) of haematoxylin, eosin and DAB
#: (Ruifrok & Johnston 2001), the basis of the stain jitter.
_STAIN_OD = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]], dtype=np.float64)
_STAIN_OD /= np.linalg.norm(_STAIN_OD, axis=1, keepdims=True)
#: The losses :func:`train_vae` knows: the reference BCE, or the squared error.
LOSSES = ("bce", "mse")
#: Learning-rate schedules :func:`train_vae` knows.
SCHEDULES = ("constant", "cosine", "onecycle")


def _stain_jitter(x: torch.Tensor, rng: np.random.Generator, scale: float, shift: float) -> torch.Tensor:
    """Random per-tile change of H, E and DAB amounts: ``c' = a * c + b`` in optical density.

    ``x`` is ``(n, 3, H, W)`` in ``[0, 1]``; ``a ~ U(1 - scale, 1 + scale)`` and
    ``b ~ U(-shift, shift)`` per tile and stain. Pixels go RGB -> optical density
    ``-ln(max(x, 1/255))`` -> stain amounts (the inverse of the stain matrix) and back.
    """
    n = x.shape[0]
    a = torch.from_numpy(rng.uniform(1 - scale, 1 + scale, size=(n, 3))).to(x)
    b = torch.from_numpy(rng.uniform(-shift, shift, size=(n, 3))).to(x)
    to_od = torch.from_numpy(_STAIN_OD).to(x)  # stains -> OD: od = c @ to_od
    from_od = torch.linalg.inv(to_od)
    od = -torch.log(x.clamp_min(1.0 / 255.0))  # (n, 3, H, W)
    conc = torch.einsum("nchw,cs->nshw", od, from_od)
    conc = conc * a[:, :, None, None] + b[:, :, None, None]
    od2 = torch.einsum("nshw,sc->nchw", conc, to_od)
    return torch.exp(-od2).clamp_(0.0, 1.0)


def _zoom(x: torch.Tensor, rng: np.random.Generator, most: float) -> torch.Tensor:
    """Enlarge each tile by a random factor in ``[1, 1 + most]`` about a random centre (bilinear)."""
    n = x.shape[0]
    s = 1.0 / rng.uniform(1.0, 1.0 + most, size=n)  # the window side, as a fraction of the tile
    tx = rng.uniform(-1, 1, size=n) * (1 - s)
    ty = rng.uniform(-1, 1, size=n) * (1 - s)
    theta = np.zeros((n, 2, 3))
    theta[:, 0, 0], theta[:, 1, 1], theta[:, 0, 2], theta[:, 1, 2] = s, s, tx, ty
    grid = F.affine_grid(torch.from_numpy(theta).to(x), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def _loss(recon: torch.Tensor, x: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor, *, loss: str, kl_weight: float) -> torch.Tensor:
    """Summed batch loss: the reference :func:`vae_loss` (``bce``), or summed squared error + the same KL term."""
    if loss == "bce":
        return vae_loss(recon, x, mu, logvar, kl_weight=kl_weight)[0]
    sse = torch.sum((recon - x) ** 2)
    kld = -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp())
    return sse + (kl_weight / KLD_SCALE) * kld


def _evaluate(
    model: VAE2,
    tiles: np.ndarray,
    idx: np.ndarray,
    *,
    batch_size: int,
    device: torch.device,
    kl_weight: float,
    loss: str = "bce",
) -> float:
    """Mean loss per tile over ``tiles[idx]`` in eval mode, no augmentation."""
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
            total += float(_loss(recon, x, mu, logvar, loss=loss, kl_weight=kl_weight))
    return total / idx.size


def _lr_factor(schedule: str, step: int, total: int, warmup: float) -> float:
    """Multiplier of the base learning rate at optimiser step ``step`` of ``total``."""
    if schedule == "constant":
        return 1.0
    if schedule == "onecycle":  # linear up over the warm-up, then cosine down to 0
        warm = max(1, round(total * warmup))
        if step < warm:
            return 0.04 + 0.96 * step / warm
        return 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, total - warm)))
    warm = round(total * warmup)  # cosine: optional linear warm-up, then cosine decay to 0
    if step < warm:
        return (step + 1) / warm
    return 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, total - warm)))


def _epoch_order(rng: np.random.Generator, train_idx: np.ndarray, groups: np.ndarray | None, balance: float) -> np.ndarray:
    """The training tiles of one epoch: a permutation, or a weighted draw balancing the groups."""
    if groups is None or balance == 0.0:
        return rng.permutation(train_idx)
    g = groups[train_idx]
    _, inverse, counts = np.unique(g, return_inverse=True, return_counts=True)
    weight = counts[inverse].astype(np.float64) ** (-balance)
    return train_idx[rng.choice(train_idx.size, size=train_idx.size, replace=True, p=weight / weight.sum())]


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
    loss: str = "bce",
    schedule: str = "constant",
    warmup: float = 0.0,
    weight_decay: float = 0.0,
    stain_jitter: float = 0.0,
    stain_shift: float | None = None,
    zoom: float = 0.0,
    groups: np.ndarray | None = None,
    balance: float = 0.0,
    eval_tiles: np.ndarray | None = None,
    init_logvar: float | None = None,
) -> TrainResult:
    """Train a :class:`VAE2` on ``(N, 64, 64, 3)`` uint8 tiles with Adam.

    A fraction ``val_fraction`` of the tiles (chosen with ``np.random.default_rng(seed)``)
    is held out; the rest is shuffled every epoch and augmented per tile with one of the
    8 dihedral transforms (flips and 90-degree rotations), then optionally a stain jitter
    and a zoom. Tiles are converted to float one batch at a time, so memory stays at the
    uint8 tiles plus a few batches. The validation loss is computed in eval mode without
    augmentation (``z`` is sampled, as in the reference ``forward``).

    The defaults are the reference recipe: ``loss="bce"`` (summed binary cross-entropy
    plus ``kl_weight * KLD / (1600*32*32)``), constant learning rate, dihedral
    augmentation only.

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
        Mini-batch size and the (peak) Adam learning rate.
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
    loss
        ``"bce"`` (the reference) or ``"mse"``: the summed squared error (pixels in
        ``[0, 1]``) plus the same scaled KL term. The evaluation metric is the MSE.
    schedule, warmup
        Learning-rate schedule over all optimiser steps: ``"constant"`` (reference),
        ``"cosine"`` (linear warm-up over the first ``warmup`` fraction of the steps, then
        cosine decay to 0) or ``"onecycle"`` (linear rise from 4% of ``lr`` over the
        ``warmup`` fraction, at least one step, then cosine decay to 0).
    weight_decay
        Decoupled weight decay (AdamW); 0 is plain Adam.
    stain_jitter, stain_shift
        Colour augmentation in haematoxylin / eosin / DAB optical-density space: each
        tile's stain amounts are multiplied by ``U(1 - stain_jitter, 1 + stain_jitter)``
        and shifted by ``U(-stain_shift, stain_shift)`` (default ``stain_shift =
        stain_jitter / 10``). 0 turns it off.
    zoom
        Enlarge a random half of the tiles by ``U(1, 1 + zoom)`` about a random centre
        (bilinear; pixels stay inside the tile). 0 turns it off.
    groups, balance
        ``groups``: one integer per tile naming its source (e.g. the slide). With
        ``balance > 0`` each epoch draws the training tiles with replacement, a tile of a
        group of ``n`` tiles with weight ``n ** -balance`` (1: every group equally often;
        0.5: in proportion to the square root of its size).
    init_logvar
        Start the ``logvar`` head (``fc2``) at this constant: weights 0, bias
        ``init_logvar`` (e.g. -8: sampling noise of standard deviation 0.02 around ``mu``),
        instead of PyTorch's random initialisation (``None``, the reference), where the
        noise starts at standard deviation ~1 and the decoder first learns from noise. The
        model stays a VAE: ``z`` is still sampled and ``logvar`` still trained. Ignored
        when ``model`` is given.
    eval_tiles
        Optional extra tiles (never trained on) whose reconstruction MSE from ``mu`` is
        recorded after every epoch as ``eval_mse`` in the history. Only recorded, never used
        to choose anything.

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
    if loss not in LOSSES:
        raise InvalidArgumentError(f"loss={loss!r}: choose one of {', '.join(LOSSES)}")
    if schedule not in SCHEDULES:
        raise InvalidArgumentError(f"schedule={schedule!r}: choose one of {', '.join(SCHEDULES)}")
    if not (math.isfinite(warmup) and 0.0 <= warmup < 1.0):
        raise InvalidArgumentError(f"warmup={warmup!r}: give the warm-up share of the steps, in [0, 1)")
    if not (math.isfinite(weight_decay) and weight_decay >= 0):
        raise InvalidArgumentError(f"weight_decay={weight_decay!r}: give a number >= 0")
    if stain_shift is None:
        stain_shift = stain_jitter / 10
    for name, value, top in (("stain_jitter", stain_jitter, 1.0), ("stain_shift", stain_shift, 1.0), ("zoom", zoom, 1.0)):
        if not (math.isfinite(value) and 0.0 <= value < top):
            raise InvalidArgumentError(f"{name}={value!r}: give a number in [0, {top:g}); 0 turns it off")
    if not (math.isfinite(balance) and 0.0 <= balance <= 1.0):
        raise InvalidArgumentError(f"balance={balance!r}: give an exponent in [0, 1] (0: no balancing)")
    group_arr = None
    if groups is not None:
        group_arr = np.asarray(groups)
        if group_arr.shape != (n,) or not np.issubdtype(group_arr.dtype, np.integer):
            raise InvalidArgumentError(f"groups must hold one integer per tile ({n}), got {group_arr.dtype} {group_arr.shape}")
    elif balance > 0:
        raise InvalidArgumentError(f"balance={balance} needs groups (one integer per tile naming its slide)")
    if init_logvar is not None and not (math.isfinite(init_logvar) and -30.0 <= init_logvar <= 5.0):
        raise InvalidArgumentError(f"init_logvar={init_logvar!r}: give a number in [-30, 5] (e.g. -8), or None")
    eval_arr = None if eval_tiles is None else _check_tiles(eval_tiles, "eval_tiles")
    epochs, batch_size, seed = int(epochs), int(batch_size), int(seed)
    dev = torch_device(device)
    model_given = model is not None

    rng = np.random.default_rng(seed)
    order = rng.permutation(n)
    n_val = min(max(1, round(n * float(val_fraction))), n - 1)
    val_idx, train_idx = np.sort(order[:n_val]), order[n_val:]
    n_train = train_idx.size
    n_batches = math.ceil(n_train / batch_size)
    total_steps = epochs * n_batches

    cuda_devices = []  # fork_rng saves and restores the RNG of the CUDA device trained on
    if dev.type == "cuda":
        cuda_devices = [dev.index if dev.index is not None else torch.cuda.current_device()]
    history: list[dict[str, float]] = []
    with torch.random.fork_rng(devices=cuda_devices):
        torch.manual_seed(seed)
        if model is None:
            model = VAE2()
            if init_logvar is not None:
                with torch.no_grad():
                    model.fc2.weight.zero_()
                    model.fc2.bias.fill_(float(init_logvar))
        model = model.to(dev)
        if weight_decay > 0:
            optimizer: torch.optim.Optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
        else:
            optimizer = torch.optim.Adam(model.parameters(), lr=lr)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: _lr_factor(schedule, step, total_steps, float(warmup)))
        evaluate: dict[str, Any] = dict(batch_size=batch_size, device=dev, kl_weight=kl_weight, loss=loss)
        initial_val_loss = _evaluate(model, tiles, val_idx, **evaluate)
        val_loss = initial_val_loss
        log.info("training VAE2 on %d tiles (%d held out) for %d epochs", n_train, n_val, epochs)
        log.info("initial validation loss %.2f per tile", val_loss)
        bar = tqdm(total=total_steps, desc="train VAE", unit="batch", disable=not progress)
        try:
            bar.set_postfix(val=f"{val_loss:.1f}")
            for epoch in range(1, epochs + 1):
                model.train()
                shuffled = _epoch_order(rng, train_idx, group_arr, float(balance))
                codes = rng.integers(0, 8, size=n_train)
                total = 0.0
                for b in range(n_batches):
                    sl = slice(b * batch_size, (b + 1) * batch_size)
                    x = tiles_to_tensor(_dihedral(_batch(tiles, shuffled[sl], dev), codes[sl]))
                    if stain_jitter > 0 or stain_shift > 0:
                        x = _stain_jitter(x, rng, float(stain_jitter), float(stain_shift))
                    if zoom > 0:
                        chosen = np.flatnonzero(rng.random(x.shape[0]) < 0.5)
                        if chosen.size:
                            index = torch.from_numpy(chosen).to(dev)
                            x = x.index_copy(0, index, _zoom(x.index_select(0, index), rng, float(zoom)))
                    recon, mu, logvar = model(x)
                    if not bool(torch.isfinite(recon).all()):  # checked before the BCE asserts on it
                        raise InvalidArgumentError(
                            f"training diverged at epoch {epoch}, batch {b + 1} (the model output became NaN); train again with a lower lr than {lr}"
                        )
                    batch_loss = _loss(recon, x, mu, logvar, loss=loss, kl_weight=kl_weight)
                    optimizer.zero_grad(set_to_none=True)
                    batch_loss.backward()
                    optimizer.step()
                    scheduler.step()
                    total += float(batch_loss.detach())
                    bar.update(1)
                    seen = min(n_train, (b + 1) * batch_size)
                    bar.set_postfix(epoch=epoch, train=f"{total / seen:.1f}", val=f"{val_loss:.1f}")
                train_loss = total / n_train
                val_loss = _evaluate(model, tiles, val_idx, **evaluate)
                entry = {"epoch": epoch, "train_loss": train_loss, "val_loss": val_loss}
                if eval_arr is not None:
                    entry["eval_mse"] = _recon_mse(model, eval_arr, batch_size=batch_size, device=dev)
                history.append(entry)
                bar.set_postfix(epoch=epoch, train=f"{train_loss:.1f}", val=f"{val_loss:.1f}")
                log.info(
                    "epoch %d/%d: train loss %.2f, val loss %.2f%s",
                    epoch,
                    epochs,
                    train_loss,
                    val_loss,
                    f", eval MSE {entry['eval_mse']:.5f}" if "eval_mse" in entry else "",
                )
        finally:
            bar.close()
    model.eval()
    augmentation = ["dihedral8"]
    if stain_jitter > 0 or stain_shift > 0:
        augmentation.append(f"hed_stain_jitter(scale={float(stain_jitter):g},shift={float(stain_shift):g})")
    if zoom > 0:
        augmentation.append(f"zoom(half the tiles, 1..{1 + float(zoom):g}x)")
    settings = {
        "epochs": epochs,
        "batch_size": batch_size,
        "lr": float(lr),
        "kl_weight": float(kl_weight),
        "loss": (
            "bce: summed BCE + kl_weight*KLD/(1600*32*32) (reference)" if loss == "bce" else "mse: summed squared error + kl_weight*KLD/(1600*32*32)"
        ),
        "schedule": schedule if schedule == "constant" else f"{schedule}(warmup={float(warmup):g})",
        "optimizer": f"AdamW(weight_decay={float(weight_decay):g})" if weight_decay > 0 else "Adam",
        "val_fraction": float(val_fraction),
        "augmentation": "+".join(augmentation),
        "balance": float(balance),
        "init_logvar": None if init_logvar is None or model_given else float(init_logvar),
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


def _recon_mse(model: VAE2, tiles: np.ndarray, *, batch_size: int, device: torch.device) -> float:
    """MSE (pixels in [0, 1]) of ``decode(mu)`` in eval mode; leaves the model in eval mode."""
    model.eval()
    total = 0.0
    with torch.no_grad():
        for start in range(0, tiles.shape[0], batch_size):
            x = tiles_to_tensor(torch.from_numpy(tiles[start : start + batch_size]).to(device))
            total += float(torch.sum((model.decode(model.features(x)) - x) ** 2, dtype=torch.float64))
    return total / tiles.size


def reconstruction_errors(model: VAE2, tiles: np.ndarray, *, factor_values: int = 27, batch_size: int = 256) -> dict[str, float]:
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
