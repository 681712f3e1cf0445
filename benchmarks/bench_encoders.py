"""Tiles per second of a ResNet-50-sized encoder at 224² on this CPU, alone and in the pipeline.

    python -m benchmarks.bench_encoders [--size 16384] [--tiles 256] [--rounds 3]

In one run, on the same machine:

- ``peak``: the fp32 matrix-product limit (4096² product, every core), GFLOP/s;
- ``encoder alone``: a ResNet-50 (bottleneck blocks [3, 4, 6, 3], 25.6 M parameters, 2048
  features: the architecture of timm's and torchvision's ``resnet50``, written out here in
  plain torch because neither installs beside this project's pinned CPU torch) through
  ``wsi_xr.models.encoders.encode_batch`` on preloaded 224² tiles, the default batch, fp32; its FLOPs
  per tile from torch's ``FlopCounterMode``, so tiles/s x FLOPs / peak is its share of the
  machine;
- ``pipeline``: ``wsi_xr.process_slide(encoder=..., encoder_spec=...)`` on a synthetic
  ``--size``² slide at 0.5 µm/px (the spec's target; the slide's own mpp), tissue tiles per
  second of wall time, and its ratio to the encoder alone.

Writes benchmarks/results/encoders.json and .md, naming the CPU capability.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from benchmarks.common import markdown_table, save, synthetic_slide, timed


class Bottleneck(nn.Module):
    """ResNet's bottleneck block (1x1, 3x3, 1x1 convolutions, expansion 4)."""

    def __init__(self, inplanes: int, planes: int, stride: int) -> None:
        super().__init__()
        out = planes * 4
        self.conv1, self.bn1 = nn.Conv2d(inplanes, planes, 1, bias=False), nn.BatchNorm2d(planes)
        self.conv2, self.bn2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False), nn.BatchNorm2d(planes)
        self.conv3, self.bn3 = nn.Conv2d(planes, out, 1, bias=False), nn.BatchNorm2d(out)
        self.down = None if stride == 1 and inplanes == out else nn.Sequential(nn.Conv2d(inplanes, out, 1, stride, bias=False), nn.BatchNorm2d(out))
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        return self.relu(y + (x if self.down is None else self.down(x)))


def resnet50_features() -> nn.Module:
    """ResNet-50 without its classifier: (N, 3, 224, 224) -> (N, 2048) pooled features."""
    layers: list[nn.Module] = [nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2, 1)]
    inplanes = 64
    for planes, blocks, stride in ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)):
        for i in range(blocks):
            layers.append(Bottleneck(inplanes, planes, stride if i == 0 else 1))
            inplanes = planes * 4
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
    return nn.Sequential(*layers)


def _peak_gflops() -> float:
    a = torch.randn(4096, 4096)
    best = timed(lambda: a @ a, repeat=10)["min_s"]
    return 2 * 4096**3 / best / 1e9


def _flops_per_tile(model: nn.Module, tile: int) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        model(torch.zeros(1, 3, tile, tile))
    return float(counter.get_total_flops())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=16384, help="side of the synthetic slide for the pipeline row")
    parser.add_argument("--tiles", type=int, default=256, help="tiles for the encoder-alone rows")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    from wsi_xr.datasets.synth import SynthSpec, render_region
    from wsi_xr.models.encoders import DEFAULT_ENCODER_BATCH, IMAGENET_MEAN, IMAGENET_STD, EncoderSpec, load_encoder

    capability = str(torch.backends.cpu.get_cpu_capability())
    threads = torch.get_num_threads()
    torch.manual_seed(0)
    net = resnet50_features().eval()
    spec = EncoderSpec("resnet50-sized", tile=224, mean=IMAGENET_MEAN, std=IMAGENET_STD, target_mpp=0.5)
    encoder = load_encoder(net, spec=spec)
    region = render_region(SynthSpec(4096, 4096, seed=5, tissue_fraction=0.6), 0, 0, 2240, 2240)[..., :3]
    unique = region.reshape(10, 224, 10, 224, 3).transpose(0, 2, 1, 3, 4).reshape(-1, 224, 224, 3)
    tiles = np.ascontiguousarray(np.resize(unique, (args.tiles, 224, 224, 3)))
    peak = _peak_gflops()
    flops = _flops_per_tile(net, 224)
    alone = timed(lambda: encoder.encode(tiles), repeat=args.rounds)["min_s"]  # the default batch (DEFAULT_ENCODER_BATCH)
    rows: list[dict[str, Any]] = [
        {"case": "fp32 peak (4096² matmul)", "value": peak, "unit": "GFLOP/s"},
        {
            "case": f"ResNet-50-sized encoder alone, 224², batch {DEFAULT_ENCODER_BATCH['cpu']}",
            "value": args.tiles / alone,
            "unit": "tiles/s",
            "share of peak": args.tiles / alone * flops / 1e9 / peak,
        },
    ]
    slide = synthetic_slide(args.size)
    import wsi_xr

    with tempfile.TemporaryDirectory() as folder:
        start = time.perf_counter()
        ds = wsi_xr.process_slide(slide, Path(folder) / "r50.zarr", encoder=encoder, torch_threads="auto")
        wall = time.perf_counter() - start
        tissue = int(ds.attrs["tissue_tiles"])
    rows.append(
        {
            "case": f"pipeline, {args.size}² slide at 0.5 µm/px, {tissue} tissue tiles of 224²",
            "value": tissue / wall,
            "unit": "tiles/s",
            "vs encoder alone": tissue / wall / (args.tiles / alone),
            "wall s": wall,
        }
    )
    table = f"CPU capability {capability}, {threads} torch threads\n\n" + markdown_table(
        rows, ["case", "value", "unit", "share of peak", "vs encoder alone", "wall s"]
    )
    save("encoders", {"cpu_capability": capability, "torch_threads": threads, "flops_per_tile": flops, "rows": rows}, table)


if __name__ == "__main__":
    main()
