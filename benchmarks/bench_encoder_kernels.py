"""How each encoder convolution runs fastest on this CPU: oneDNN's convolution or im2col + GEMM.

    python -m benchmarks.bench_encoder_kernels [--tiles 4096] [--rounds 3]

For the CPU at hand (run it again under ``ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2
MKL_ENABLE_INSTRUCTIONS=AVX2`` to see an AVX2 CPU's kernels on an AVX-512 one):

- ``choose_layers`` (the timing behind ``wsi_xr.models.gemm.LAYERS_BY_CAPABILITY``) with 1 and
  2 torch threads, and each convolution's time both ways;
- the whole encoder, oneDNN only against the layers the table gives this CPU, as the pipeline
  runs it (2 Python threads x 1 torch thread) and as one stream of 2 torch threads, best of
  ``--rounds``; the largest |difference| of ``mu`` between the two;
- the fp32 peak (4096² matrix product, 2 threads) and the encoder's fraction of it.

Writes benchmarks/results/encoder_kernels.json and .md, naming the CPU capability.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import torch

from benchmarks.common import markdown_table, save, timed

FLOP_PER_TILE = 29.49e6  # the four convolutions and fc1 (bench_scale's figure)


def _tiles(n: int) -> np.ndarray:
    from wsi_xr.datasets.synth import SynthSpec, render_region

    region = render_region(SynthSpec(2048, 2048, seed=5, tissue_fraction=0.6), 0, 0, 1024, 1024)[..., :3]
    unique = region.reshape(16, 64, 16, 64, 3).transpose(0, 2, 1, 3, 4).reshape(-1, 64, 64, 3)
    return np.ascontiguousarray(np.resize(unique, (n, 64, 64, 3)))


def _best(fn: Callable[[], Any], rounds: int) -> float:
    return timed(fn, repeat=rounds)["min_s"]


def _stream(encoder: Callable[[torch.Tensor], torch.Tensor], tiles: np.ndarray, batch: int = 64) -> torch.Tensor:
    from wsi_xr.models import tiles_to_tensor

    with torch.inference_mode():
        return torch.cat([encoder(tiles_to_tensor(tiles[s : s + batch])) for s in range(0, len(tiles), batch)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiles", type=int, default=4096)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--name", help="results file name (default encoder_kernels or encoder_kernels_avx2)")
    args = parser.parse_args()
    from wsi_xr.models import load_vae
    from wsi_xr.models.gemm import CONVS, LayeredEncoder, choose_layers, cpu_layers

    capability = str(torch.backends.cpu.get_cpu_capability())
    model = load_vae().to(memory_format=torch.channels_last)  # as the pipeline holds it
    tiles = _tiles(args.tiles)
    chosen = {}
    for threads in (1, 2):
        torch.set_num_threads(threads)
        chosen[threads] = "/".join(choose_layers(model))
    layers_rows = []
    x = torch.rand((64, 3, 64, 64), generator=torch.Generator().manual_seed(0)).contiguous(memory_format=torch.channels_last)
    both = LayeredEncoder(model, ("gemm",) * len(CONVS))
    with torch.inference_mode():
        h = x
        for index, i in enumerate(CONVS):
            conv = model.encoder[i]
            row: dict[str, Any] = {"layer": f"encoder.{i} {conv.in_channels}->{conv.out_channels}", "cpu": capability}
            for threads in (1, 2):
                torch.set_num_threads(threads)
                row[f"conv_ms_{threads}t"] = round(_best(lambda h=h, conv=conv: conv(h), 20) * 1e3, 3)
                row[f"gemm_ms_{threads}t"] = round(_best(lambda h=h, index=index: both.layer(index, h), 20) * 1e3, 3)
            layers_rows.append(row)
            h = torch.relu(conv(h))
    encoders = {"oneDNN only": model.features, "table (" + "/".join(cpu_layers()) + ")": LayeredEncoder(model, cpu_layers())}
    reference = _stream(model.features, tiles[:512]).numpy()
    rows = []
    torch.set_num_threads(2)
    a, b = torch.randn(4096, 4096), torch.randn(4096, 4096)
    peak = 2 * 4096**3 / _best(lambda: a @ b, 3)
    for name, encoder in encoders.items():
        torch.set_num_threads(2)
        one_stream = _best(lambda encoder=encoder: _stream(encoder, tiles), args.rounds)

        def two_threads(encoder: Any = encoder) -> None:
            def part(chunk: np.ndarray) -> None:
                torch.set_num_threads(1)
                _stream(encoder, chunk)

            with ThreadPoolExecutor(2) as pool:
                list(pool.map(part, np.array_split(tiles, 2)))

        pipeline_like = _best(two_threads, args.rounds)
        torch.set_num_threads(2)
        best = len(tiles) / min(one_stream, pipeline_like)
        rows.append(
            {
                "encoder": name,
                "cpu": capability,
                "tiles_per_s_2x1": round(len(tiles) / pipeline_like),
                "tiles_per_s_1x2": round(len(tiles) / one_stream),
                "fraction_of_peak": round(best * FLOP_PER_TILE / peak, 3),
                "max_abs_diff_vs_oneDNN": float(np.abs(_stream(encoder, tiles[:512]).numpy() - reference).max()),
            }
        )
    note = (
        f"CPU capability {capability}; fp32 peak {peak / 1e9:.0f} GFLOP/s (4096² matmul, 2 threads) = "
        f"{peak / FLOP_PER_TILE:.0f} tiles/s. choose_layers: 1 thread {chosen[1]}, 2 threads {chosen[2]}; "
        f"the table gives {'/'.join(cpu_layers())}."
    )
    payload = {"cpu": capability, "peak_gflops": peak / 1e9, "chosen": chosen, "layers": layers_rows, "encoders": rows}
    table = markdown_table(layers_rows, list(layers_rows[0])) + "\n\n" + markdown_table(rows, list(rows[0]))
    name = args.name or ("encoder_kernels" if capability != "AVX2" else "encoder_kernels_avx2")
    save(name, payload, note + "\n\n" + table)


if __name__ == "__main__":
    main()
