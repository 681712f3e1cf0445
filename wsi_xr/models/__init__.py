"""The VAE layer: the reference ``VAE2`` model, its loss, weight files and training.

Depends on torch, NumPy and tqdm only (and :mod:`wsi_xr.errors`).

>>> from wsi_xr.models import load_vae, encode_tiles
>>> model = load_vae("vae.pt")                      # eval mode, on the CPU
>>> mu = encode_tiles(model, tiles)                 # (N, 64, 64, 3) uint8 -> (N, 32) float32
"""

from __future__ import annotations

from wsi_xr.models.evaluate import (
    EvalReport,
    PCAModel,
    evaluate_tiles,
    fit_pca,
    mse_downsample,
    mse_pca,
    mse_vae,
)
from wsi_xr.models.train import LOSSES, SCHEDULES, TrainResult, reconstruction_errors, train_vae
from wsi_xr.models.vae import (
    CHANNELS,
    KLD_SCALE,
    LATENT_SIZE,
    PRECISIONS,
    TILE_SIZE,
    VAE2,
    default_batch_size,
    encode_tiles,
    tiles_to_tensor,
    torch_device,
    vae_loss,
)
from wsi_xr.models.weights import (
    default_weights_path,
    load_vae,
    load_vae_bytes,
    read_metadata,
    save_vae,
    vae_bytes,
    weights_hash,
)

__all__ = [
    "CHANNELS",
    "KLD_SCALE",
    "LATENT_SIZE",
    "LOSSES",
    "PRECISIONS",
    "SCHEDULES",
    "TILE_SIZE",
    "VAE2",
    "EvalReport",
    "PCAModel",
    "TrainResult",
    "default_batch_size",
    "default_weights_path",
    "encode_tiles",
    "evaluate_tiles",
    "fit_pca",
    "load_vae",
    "load_vae_bytes",
    "mse_downsample",
    "mse_pca",
    "mse_vae",
    "read_metadata",
    "reconstruction_errors",
    "save_vae",
    "tiles_to_tensor",
    "torch_device",
    "train_vae",
    "vae_bytes",
    "vae_loss",
    "weights_hash",
]
