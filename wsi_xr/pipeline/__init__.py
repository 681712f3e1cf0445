"""The end-to-end job: slide(s) in, a Zarr store with the tile mask and latent cube out.

Each chunk of the slide is read **once**; the one read feeds the variance statistics
(and the pen-ink check) and the encoder. Results are written chunk by chunk into Zarr
regions, and a chunk is marked done only after its data are written, so a run killed at
any moment and started again computes only the missing chunks. The store is created
under a temporary name and renamed into place (so it is recognisable as wsi_xr's from
the moment it exists), and marked ``complete`` only after every chunk is done and the
mask is finalised.

With ``threshold="auto"`` the threshold is known only once every tile variance is
known; so each chunk encodes every *candidate* tile (one that passes the lowest
threshold "auto" can choose), and finalising blanks the latents of tiles below the
chosen threshold. No pixel is read twice.

One module a job:

- :mod:`.options`: the run's settings (:class:`RunOptions`, over :class:`~wsi_xr.tissue.MaskParams`), checked once;
- :mod:`.chunks`: a slide's plan (:func:`~wsi_xr.tissue.plan_mask`) and its chunk tasks (the tissue and encoder cores);
- :mod:`.finalize`: the threshold, masks, blanking and provenance;
- :mod:`.run`: the checks before any work, computing slides together, cohorts;
- :mod:`.export`: DataFrames and Parquet.
"""

from wsi_xr.pipeline.chunks import ChunkJob, RunPlan, chunk_graph, plan_run
from wsi_xr.pipeline.export import to_dataframe, write_parquet
from wsi_xr.pipeline.finalize import finalize, maybe_encoded
from wsi_xr.pipeline.options import (
    CANDIDATE_FLOOR,
    READ_CHECKS,
    RunOptions,
    candidate_floor,
    check_slide_options,
    run_fingerprint,
    validate_run_options,
)
from wsi_xr.pipeline.run import RunTarget, check_run_target, group_names, process_slide, process_slides

__all__ = [
    "CANDIDATE_FLOOR",
    "READ_CHECKS",
    "ChunkJob",
    "RunOptions",
    "RunPlan",
    "RunTarget",
    "candidate_floor",
    "check_run_target",
    "check_slide_options",
    "chunk_graph",
    "finalize",
    "group_names",
    "maybe_encoded",
    "plan_run",
    "process_slide",
    "process_slides",
    "run_fingerprint",
    "to_dataframe",
    "validate_run_options",
    "write_parquet",
]
