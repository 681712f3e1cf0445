"""Data made by wsi_xr itself, with ground truth: synthetic H&E-like slides and pen-ink strokes.

- :mod:`.synth`: :func:`write_synthetic_slide` (a deterministic pyramidal JPEG-tiled TIFF,
  written tile by tile), :func:`tissue_truth`, :func:`tile_truth`;
- :mod:`.ink`: marker-ink strokes with their own ground truth.

The tests, the demo and the benchmarks use these; so can anyone who wants a slide with
known tissue.
"""

from wsi_xr.datasets.synth import SynthSpec, render_region, tile_truth, tissue_truth, write_synthetic_slide

__all__ = ["SynthSpec", "render_region", "tile_truth", "tissue_truth", "write_synthetic_slide"]
