"""What "exact" means for the fp32 encoder: a bound on float32 rounding, per value.

Two float32 computations of the same encoder (the plain eager model, wsi_xr's fast path,
oneDNN's AVX2, AVX-512 or AMX kernels, ARM's) add and multiply in different orders, so
their ``mu`` differ in the last bits. How far apart may they be? This module answers
from the arithmetic alone, with no tolerance tuned on one machine.

The derivation (first-order running error analysis, as in Higham, *Accuracy and Stability
of Numerical Algorithms*, §3.1-3.5). Let ``u = 2**-24`` (float32 unit roundoff) and
``γ(n) = n u / (1 - n u)``.

- A convolution or linear output ``z = w · h + b`` is a sum of ``K + 1`` terms (``K`` =
  input channels × kernel area, or input features). Summed in float32 in *any* order, with
  or without FMA, its rounding error is at most ``γ(K + 1) (|w| · |h| + |b|)``.
- Eval-mode BatchNorm (``(x - mean) / sqrt(var + eps) * weight + bias``, a handful of
  roundings) errs by at most ``γ(4) (|a| (|x| + |mean|) + |bias|)``, ``a`` its scale.
- The input ``tile / 255`` is rounded (a division, or a product by a rounded ``1/255``):
  at most ``2 u |x|``.
- Each local error ``δ`` reaches ``mu`` through the rest of the network: to first order,
  through its Jacobian ``J`` (ReLU is 1-Lipschitz). So

      |mu_float32 - mu_exact|_k  <=  Σ_layers Σ_i |J_ki| δ_i          (per tile, per feature k)

  with ``J`` and the activations ``h`` taken from the exact forward pass. First order means
  products of two rounding errors (``u**2``) are left out, and an activation within its own
  error of zero is taken on the side the exact pass puts it.

Every correct float32 implementation, on every CPU and GPU without reduced-precision
arithmetic (TF32/bf16 off), lies within this bound of the exact (float64) result, so two of
them lie within twice it of each other. It is a worst case: on CMU-1 tiles with the shipped
weights it is about 0.6% of a tile's largest ``|mu|``, and the differences actually seen are
10⁻⁴ of it (README, "Precision").
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["FLOAT32_UNIT_ROUNDOFF", "Fp32Bound", "fp32_mu_bound", "gamma"]

#: Unit roundoff of IEEE float32 (round to nearest): half the gap between 1 and the next float.
FLOAT32_UNIT_ROUNDOFF = 2.0**-24


def gamma(n: int) -> float:
    """Higham's ``γ(n) = n u / (1 - n u)``: the relative error bound of an ``n``-term float32 sum."""
    nu = n * FLOAT32_UNIT_ROUNDOFF
    return nu / (1.0 - nu)


def _local_error(layer: Any, h: Any) -> tuple[Any, int]:
    """The bound on the rounding error that ``layer`` adds to its output for input ``h``, and its
    number of rounded operations per output (terms of the sum)."""
    import torch
    from torch.nn import functional

    w, b = layer.weight.detach(), layer.bias.detach()
    if isinstance(layer, torch.nn.Conv2d):
        terms = layer.in_channels // layer.groups * layer.kernel_size[0] * layer.kernel_size[1] + 1
        magnitude = functional.conv2d(h.abs(), w.abs(), b.abs(), layer.stride, layer.padding, layer.dilation, layer.groups)
        return magnitude, terms
    if isinstance(layer, torch.nn.Linear):
        return functional.linear(h.abs(), w.abs(), b.abs()), layer.in_features + 1
    if isinstance(layer, torch.nn.BatchNorm2d):
        running_var, running_mean = layer.running_var, layer.running_mean
        assert running_var is not None and running_mean is not None  # VAE2's BatchNorm tracks its running statistics
        scale = (w / torch.sqrt(running_var + layer.eps)).abs()[None, :, None, None]
        return scale * (h.abs() + running_mean.abs()[None, :, None, None]) + b.abs()[None, :, None, None], 4
    raise TypeError(f"no rounding model for {type(layer).__name__}")


@dataclass(frozen=True)
class Fp32Bound:
    """The exact ``mu`` of some tiles and the size of float32 rounding errors, per value (float64 ``(N, z_dim)``).

    Attributes
    ----------
    exact
        ``mu`` computed in float64: the reference.
    worst_case
        Every float32 evaluation of the model satisfies ``|mu_float32 - exact| <= worst_case``.
    rms
        The standard deviation of the error under the probabilistic model (independent
        rounding errors of mean zero): ``mean((error / rms)**2) <= 1`` is expected over many
        values. A model, not a guarantee: spatially constant inputs make errors correlate.
    """

    exact: np.ndarray
    worst_case: np.ndarray
    rms: np.ndarray


def fp32_mu_bound(model: Any, tiles: np.ndarray, *, batch_size: int = 32) -> Fp32Bound:
    """The exact ``mu`` of ``tiles`` and the size of any float32 computation's rounding error.

    Parameters
    ----------
    model
        A :class:`~wsi_xr.models.VAE2` (its ``encoder`` and ``fc1``; eval-mode BatchNorm).
    tiles
        ``(N, 64, 64, 3)`` uint8.

    Returns
    -------
    Fp32Bound
        The float64 ``mu``, the first-order worst-case bound of the module docstring, and
        the probabilistic error scale.

    Costs 1 float64 forward pass and ``z_dim`` backward passes per batch (about 25 ms a
    tile on two cores): meant for tests and measurements, not for the pipeline.
    """
    import torch

    reference = copy.deepcopy(model).double().eval()
    layers = [*reference.encoder, reference.fc1]
    u = FLOAT32_UNIT_ROUNDOFF
    parts: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    for start in range(0, len(tiles), batch_size):
        x = torch.from_numpy(np.ascontiguousarray(tiles[start : start + batch_size])).permute(0, 3, 1, 2).double() / 255.0
        x.requires_grad_(True)
        # per rounded output: (the tensor, the bound on its magnitude of rounded terms, terms)
        outputs, magnitudes, terms = [x], [2 * x.detach().abs()], [1]
        h = x
        for layer in layers:
            z = layer(h)
            if isinstance(layer, (torch.nn.Conv2d, torch.nn.Linear, torch.nn.BatchNorm2d)):
                magnitude, n = _local_error(layer, h.detach())
                outputs.append(z)
                magnitudes.append(magnitude)
                terms.append(n)
            h = z  # ReLU and flattening add no rounding
        mu = h
        n_tiles, k = mu.shape
        worst = torch.zeros((n_tiles, k), dtype=torch.float64)
        variance = torch.zeros((n_tiles, k), dtype=torch.float64)
        for feature in range(k):
            grads = torch.autograd.grad(mu[:, feature].sum(), outputs, retain_graph=feature < k - 1)
            for grad, magnitude, n in zip(grads, magnitudes, terms):  # tiles are independent: row t is tile t's
                spread = (grad.abs() * magnitude).flatten(1)
                worst[:, feature] += gamma(n) * spread.sum(1)
                # n + 1 roundings (n - 1 additions, n products, or fewer), each at most u times the sum of |terms|
                variance[:, feature] += (n + 1) * u**2 * (spread**2).sum(1)
        parts.append((mu.detach().numpy(), worst.numpy(), np.sqrt(variance.numpy())))
    if not parts:
        empty = np.zeros((0, model.fc1.out_features))
        return Fp32Bound(empty, empty, empty)
    return Fp32Bound(*(np.concatenate(column) for column in zip(*parts)))
