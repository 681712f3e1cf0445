"""VAE2's encoder mean with each convolution run the way this CPU runs it fastest.

Each of the encoder's 4x4, stride-2, unpadded convolutions can run as oneDNN's direct
convolution (what ``nn.Conv2d`` calls) or as a matrix product: the 4x4 windows of every output
pixel gathered into rows (``im2col``: on channels-last memory a strided view, then one copy),
times the kernel reshaped to ``(16 * C_in, C_out)``, through torch's ``addmm`` (MKL or oneDNN's
GEMM). Which is faster depends on the layer and the CPU: on an AVX-512 CPU oneDNN's convolution
wins for the first three layers and the product is 2.4x faster for the last one (128 -> 256
channels on a 6x6 input); other CPUs differ. :func:`choose_layers` times both for each layer,
for the CPU at hand (``python -m benchmarks.bench_encoder_kernels`` prints its choice), and
:data:`LAYERS_BY_CAPABILITY` records the winners per CPU capability, which
:class:`LayeredEncoder` runs.

Both ways compute the same float32 sums (the same inputs, the same rounded ``tile / 255``,
BatchNorm as its own step); only the order of the additions differs, so
:mod:`wsi_xr.models.rounding`'s bound holds for every choice.
"""

from __future__ import annotations

import copy
import threading
import time
import weakref
from typing import Any

import torch

__all__ = [
    "KINDS",
    "LAYERS_BY_CAPABILITY",
    "Int8Encoder",
    "LayeredEncoder",
    "choose_layers",
    "cpu_layers",
    "int8_encoder",
    "int8_speed",
    "layered_encoder",
]

#: How a convolution may run: oneDNN's direct convolution, or im2col + GEMM.
KINDS = ("conv", "gemm")
#: Kernel side and stride of every encoder convolution of VAE2.
KERNEL, STRIDE = 4, 2
#: A layer runs as GEMM only when that is at least this much faster than the convolution:
#: near-ties keep the convolution, so the choice does not flip between runs.
MARGIN = 0.85
#: Indices in ``VAE2.encoder`` of the convolutions, and of the BatchNorm after the third.
CONVS, NORM = (0, 2, 4, 7), 5


def _gemm_conv(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """The convolution of ``h`` (``(N, C, H, W)``, channels-last memory) as im2col + GEMM;
    ``weight`` ``(16 * C, C_out)``. Returns ``(N, C_out, H', W')`` in channels-last memory."""
    nhwc = h.permute(0, 2, 3, 1)  # a view: channels-last memory is NHWC
    n, height, width, channels = nhwc.shape
    out_h, out_w = (height - KERNEL) // STRIDE + 1, (width - KERNEL) // STRIDE + 1
    s_n, s_h, s_w, s_c = nhwc.stride()
    windows = nhwc.as_strided((n, out_h, out_w, KERNEL, KERNEL, channels), (s_n, STRIDE * s_h, STRIDE * s_w, s_h, s_w, s_c))
    rows = windows.reshape(n * out_h * out_w, KERNEL * KERNEL * channels)  # the one copy
    return torch.addmm(bias, rows, weight).view(n, out_h, out_w, -1).permute(0, 3, 1, 2)


class LayeredEncoder:
    """``mu`` of a :class:`~wsi_xr.models.VAE2` (eval mode, on the CPU) with each encoder
    convolution run as ``layers[i]`` says (``"conv"`` or ``"gemm"``).

    Takes what the model's ``features`` takes: ``(N, 3, 64, 64)`` float32 in ``[0, 1]``
    (:func:`~wsi_xr.models.tiles_to_tensor`'s channels-last tensor is the fast input).
    """

    def __init__(self, model: Any, layers: tuple[str, ...]) -> None:
        if len(layers) != len(CONVS) or any(kind not in KINDS for kind in layers):
            raise ValueError(f"layers must be {len(CONVS)} of {KINDS}, got {layers!r}")
        self.model, self.layers = model, tuple(layers)
        # (C_out, C_in, kh, kw) -> (kh, kw, C_in, C_out): rows in the order of the gathered windows
        self.weights = {
            i: model.encoder[i].weight.detach().permute(2, 3, 1, 0).reshape(-1, model.encoder[i].out_channels).contiguous()
            for i, kind in zip(CONVS, layers)
            if kind == "gemm"
        }

    def layer(self, index: int, h: torch.Tensor) -> torch.Tensor:
        """Convolution ``index`` (0-3) of ``h``, run as chosen, before its activation."""
        conv = self.model.encoder[CONVS[index]]
        if self.layers[index] == "gemm":
            return _gemm_conv(h, self.weights[CONVS[index]], conv.bias.detach())
        return conv(h)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        h = x
        for index in range(len(CONVS)):
            h = self.layer(index, h)
            if CONVS[index] + 1 == NORM:
                h = self.model.encoder[NORM](h)
            h = torch.relu_(h)
        return self.model.fc1(h.reshape(h.shape[0], -1))  # flattened (C, H, W) as the eager model does


def _seconds(fn: Any, repeats: int = 5) -> float:
    fn()  # warm: oneDNN builds its kernel, the allocator its pools
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def choose_layers(model: Any, batch: int = 64) -> tuple[str, ...]:
    """Time each convolution both ways on ``batch`` tiles with torch's current thread count;
    ``"gemm"`` where it is faster by the :data:`MARGIN`, else ``"conv"``. About 0.1-0.3 s."""
    generator = torch.Generator().manual_seed(0)
    x = torch.rand((batch, 3, 64, 64), generator=generator).contiguous(memory_format=torch.channels_last)
    both = LayeredEncoder(model, ("gemm",) * len(CONVS))
    chosen = []
    with torch.inference_mode():
        h = x
        for index, i in enumerate(CONVS):
            conv = model.encoder[i]
            direct = _seconds(lambda h=h, conv=conv: conv(h))
            product = _seconds(lambda h=h, index=index: both.layer(index, h))
            chosen.append("gemm" if product < MARGIN * direct else "conv")
            h = torch.relu(conv(h))
    return tuple(chosen)


#: The layers per CPU capability (``torch.backends.cpu.get_cpu_capability()``), from
#: :func:`choose_layers` on the CPUs measured (benchmarks/RESULTS.md, "Encoder on every CPU"):
#: on AVX512 and on AVX2 (emulated on the same machine) only the last convolution is faster as
#: a GEMM, with 1 and 2 threads alike. A CPU not measured keeps oneDNN's convolutions. A fixed
#: table, not a timing at run time: the same machine always computes the same bits.
LAYERS_BY_CAPABILITY = {
    "AVX512": ("conv", "conv", "conv", "gemm"),
    "AVX2": ("conv", "conv", "conv", "gemm"),
}
DEFAULT_LAYERS = ("conv",) * len(CONVS)

_encoders: weakref.WeakKeyDictionary[Any, LayeredEncoder] = weakref.WeakKeyDictionary()
_lock = threading.Lock()


def cpu_layers() -> tuple[str, ...]:
    """How this CPU runs each encoder convolution (:data:`LAYERS_BY_CAPABILITY`)."""
    return LAYERS_BY_CAPABILITY.get(str(torch.backends.cpu.get_cpu_capability()), DEFAULT_LAYERS)


def layered_encoder(model: Any) -> LayeredEncoder:
    """The :class:`LayeredEncoder` of ``model`` for this CPU (:func:`cpu_layers`), built once per model."""
    with _lock:
        encoder = _encoders.get(model)
        if encoder is None:
            encoder = _encoders[model] = LayeredEncoder(model, cpu_layers())
        return encoder


class Int8Encoder:
    """``mu`` of a :class:`~wsi_xr.models.VAE2` with every matrix product in int8: an opt-in
    approximation (``precision="int8"``), never the default.

    Each convolution runs as im2col + a dynamically quantised linear layer (weights int8 per
    tensor, activations quantised per batch on the fly: torch's ``quantize_dynamic`` on the
    fbgemm/x86 engine), ``fc1`` too; BatchNorm and the activations stay float32. Its error
    against exact fp32 is measured in ``benchmarks/bench_precision.py`` and the README.
    """

    def __init__(self, model: Any) -> None:
        import warnings

        from torch import nn
        from torch.ao.quantization import quantize_dynamic

        products = nn.ModuleList()
        for i in CONVS:
            conv = model.encoder[i]
            linear = nn.Linear(KERNEL * KERNEL * conv.in_channels, conv.out_channels)
            linear.weight.data = conv.weight.detach().permute(0, 2, 3, 1).reshape(conv.out_channels, -1).clone()
            linear.bias.data = conv.bias.detach().clone()
            products.append(linear)
        products.append(model.fc1)
        with warnings.catch_warnings():  # torch marks its quantised tensors as deprecated: said once in the README, not per call
            warnings.simplefilter("ignore")
            self.products = quantize_dynamic(copy.deepcopy(products).eval(), {nn.Linear}, dtype=torch.qint8)
        self.model = model

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        h = x
        for index in range(len(CONVS)):
            nhwc = h.permute(0, 2, 3, 1)
            n, height, width, channels = nhwc.shape
            out_h, out_w = (height - KERNEL) // STRIDE + 1, (width - KERNEL) // STRIDE + 1
            s_n, s_h, s_w, s_c = nhwc.stride()
            windows = nhwc.as_strided((n, out_h, out_w, KERNEL, KERNEL, channels), (s_n, STRIDE * s_h, STRIDE * s_w, s_h, s_w, s_c))
            rows = windows.reshape(n * out_h * out_w, KERNEL * KERNEL * channels)
            h = self.products[index](rows).view(n, out_h, out_w, -1).permute(0, 3, 1, 2)
            if CONVS[index] + 1 == NORM:
                h = self.model.encoder[NORM](h)
            h = torch.relu_(h)
        return self.products[len(CONVS)](h.reshape(h.shape[0], -1))


_int8_encoders: weakref.WeakKeyDictionary[Any, Int8Encoder] = weakref.WeakKeyDictionary()


def int8_encoder(model: Any) -> Int8Encoder:
    """The :class:`Int8Encoder` of ``model``, built once per model."""
    with _lock:
        encoder = _int8_encoders.get(model)
        if encoder is None:
            encoder = _int8_encoders[model] = Int8Encoder(model)
        return encoder


_int8_speed: dict[tuple[str, int], tuple[float, float]] = {}


def int8_speed(tiles: int = 128) -> tuple[float, float]:
    """Tiles per second of the fp32 encoder (as :func:`layered_encoder` runs it) and of the
    int8 one on this CPU, one torch thread, best of 3 on ``tiles`` random tiles of a seeded
    VAE2 (speed does not depend on the weights). Measured once per process and CPU
    capability (about 0.7 s): :func:`wsi_xr.encode.check_precision` refuses int8 where it is
    not faster."""
    from wsi_xr.models.vae import VAE2, torch_threads_scope

    key = (str(torch.backends.cpu.get_cpu_capability()), tiles)
    with _lock:
        if key in _int8_speed:
            return _int8_speed[key]
    with torch.random.fork_rng():  # leaves the caller's random state as it was
        torch.manual_seed(0)
        model = VAE2().eval()
        x = torch.rand((tiles, 3, 64, 64)).contiguous(memory_format=torch.channels_last)
    fp32, int8 = LayeredEncoder(model, cpu_layers()), Int8Encoder(model)
    with torch_threads_scope(1), torch.inference_mode():
        speeds = (tiles / _seconds(lambda: fp32(x), 3), tiles / _seconds(lambda: int8(x), 3))
    with _lock:
        _int8_speed[key] = speeds
    return speeds
