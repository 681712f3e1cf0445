"""VAE2's encoder mean as four matrix products: the same arithmetic as the convolutions, laid out for BLAS.

Each of the encoder's 4x4, stride-2, unpadded convolutions is a matrix product: the 4x4 input
windows of every output pixel, gathered into rows (``im2col``), times the kernel reshaped to
``(16 * C_in, C_out)``. On channels-last (NHWC) activations the windows are a strided view of
the input, so gathering is one copy and each product's output is already the next layer's
NHWC input. The products go to torch's ``addmm`` (MKL or oneDNN's GEMM, which reach the
machine's matrix-product peak on every x86 and ARM CPU torch supports), where oneDNN's direct
convolutions for these small channel counts fall well short of it on some CPUs (about 40% of
peak on AVX2-only CPUs; see benchmarks/RESULTS.md, "Encoder on every CPU").

Nothing is folded or reordered in value: the input is divided by 255 as ``tiles_to_tensor``
does, BatchNorm is applied as its own step (eval mode, its running statistics), and the
flattening before ``fc1`` is matched by permuting ``fc1``'s columns. Only the order of the
float32 additions differs from the eager model, so :mod:`wsi_xr.models.rounding`'s bound holds.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

__all__ = ["GemmEncoder"]

#: Kernel side and stride of every encoder convolution of VAE2.
KERNEL, STRIDE = 4, 2


class GemmEncoder:
    """``mu`` of a :class:`~wsi_xr.models.VAE2` in eval mode, from ``(N, 64, 64, 3)`` uint8 tiles, on the CPU.

    Holds its own copies of the weights in GEMM layout (about 3 MB); build one per model and
    call it like a function. float32 only; bf16 runs the convolutions under autocast instead.
    """

    def __init__(self, model: Any) -> None:
        convs = [model.encoder[0], model.encoder[2], model.encoder[4], model.encoder[7]]
        self.norm = model.encoder[5]
        with torch.no_grad():
            # (C_out, C_in, kh, kw) -> (kh, kw, C_in, C_out): rows in the order of the gathered windows
            self.weights = [c.weight.detach().float().cpu().permute(2, 3, 1, 0).reshape(-1, c.out_channels).contiguous() for c in convs]
            self.biases = [c.bias.detach().float().cpu().contiguous() for c in convs]
            channels = convs[-1].out_channels
            side = int(round((model.fc1.in_features // channels) ** 0.5))
            # fc1 reads the (C, H, W) flattening; the products give (H, W, C): permute its columns to match
            fc = model.fc1.weight.detach().float().cpu()
            self.fc_weight = fc.reshape(-1, channels, side, side).permute(0, 2, 3, 1).reshape(fc.shape[0], -1).t().contiguous()
            self.fc_bias = model.fc1.bias.detach().float().cpu().contiguous()

    def __call__(self, tiles: torch.Tensor) -> torch.Tensor:
        """``(N, 64, 64, 3)`` uint8 (a CPU tensor, any strides) to ``mu`` ``(N, z_dim)`` float32."""
        n = tiles.shape[0]
        h = tiles
        for layer, (weight, bias) in enumerate(zip(self.weights, self.biases)):
            _, height, width, channels = h.shape
            out_h, out_w = (height - KERNEL) // STRIDE + 1, (width - KERNEL) // STRIDE + 1
            s_n, s_h, s_w, s_c = h.stride()
            windows = h.as_strided((n, out_h, out_w, KERNEL, KERNEL, channels), (s_n, STRIDE * s_h, STRIDE * s_w, s_h, s_w, s_c))
            rows = windows.reshape(n * out_h * out_w, KERNEL * KERNEL * channels)  # the one copy
            if layer == 0:
                rows = rows.to(torch.float32).div_(255.0)  # as tiles_to_tensor: the same rounded inputs
            z = torch.addmm(bias, rows, weight)
            if layer == 2:  # encoder.5, BatchNorm2d: per channel, which is the last axis here
                norm = self.norm
                z = F.batch_norm(z, norm.running_mean, norm.running_var, norm.weight, norm.bias, False, 0.0, norm.eps)
            h = z.clamp_min_(0.0).view(n, out_h, out_w, -1)
        return torch.addmm(self.fc_bias, h.reshape(n, -1), self.fc_weight)
