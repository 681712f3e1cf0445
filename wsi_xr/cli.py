"""The ``wsi-xr`` command line.

Every sub-command is a small function ``cmd_NAME(args) -> int``; user errors
(:class:`~wsi_xr.WsiXrError`) end with a one-line message on stderr and exit code 2,
never a traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from wsi_xr.errors import InvalidArgumentError, WsiXrError

log = logging.getLogger("wsi_xr")

#: Exit code for user errors (bad file, bad argument, store in the wrong state).
EXIT_USER_ERROR = 2
#: ``wsi-xr run`` on one slide, without --scheduler or --workers, uses Dask's threaded
#: scheduler: a LocalCluster (one worker of threads in this process) computes nothing faster on
#: one machine and costs more: 8.19 against 8.39 s at 16384² (within noise) but 45.5 against
#: 39.6 s at 49152² (AVX512, 2 cores; benchmarks/RESULTS.md, "A peer pipeline"). Cohorts get the
#: cluster, and its dashboard; so do GPU runs (a LocalCUDACluster, one worker per GPU).
SINGLE_SLIDE_SCHEDULER = "threads"


def cmd_info(args: argparse.Namespace) -> int:
    """Print what the probe learns about a slide (format, levels, mpp, backend and why, tiles)."""
    from wsi_xr.readers import open_file

    opened = open_file(args.slide)
    info, choice = opened.info, opened.choice
    if args.json:
        print(json.dumps({**info.to_dict(), "backend": choice.name, "backend_reason": choice.reason}, indent=2))
        return 0
    print(f"{info.path}")
    print(f"  format      {info.format}")
    print(f"  vendor      {info.vendor}")
    print(f"  size        {info.width} x {info.height} px (level 0)")
    print(f"  mpp         {f'{info.mpp} µm/px' if info.mpp is not None else 'unknown (wsi_xr takes --mpp / mpp= for it)'}")
    print(f"  backend     {choice.name} ({choice.reason})")
    print(f"  photometric {info.photometric}")
    print("  level  width x height   downsample  tile      compression")
    for lv in info.levels:
        tile = f"{lv.tile_width}x{lv.tile_height}" if lv.tiled else ("stripped" if info.problem("tifffile") is None else "unknown")
        print(f"  {lv.index:>5}  {lv.width:>6} x {lv.height:<7}  {lv.downsample:>10.3f}  {tile:<9} {lv.compression_name}")
    return 0


def cmd_synth(args: argparse.Namespace) -> int:
    """Write a synthetic H&E-like pyramidal slide."""
    from wsi_xr.datasets.synth import write_synthetic_slide

    out = Path(args.out)
    if out.exists() and not args.overwrite:
        raise InvalidArgumentError(f"{out}: already exists; pass --overwrite to replace it.")
    start = time.perf_counter()
    spec = write_synthetic_slide(
        out,
        args.width,
        args.height,
        seed=args.seed,
        tissue_fraction=args.tissue_fraction,
        compression=args.compression,
        pen_strokes=args.pen_strokes,
        pen_colours=tuple(c.strip() for c in args.pen_colours.split(",")) if args.pen_colours else None,
        jpeg_quality=args.jpeg_quality,
        progress=not args.quiet,
    )
    print(f"wrote {out} ({spec.width} x {spec.height}, seed {spec.seed}) in {time.perf_counter() - start:.1f} s")
    return 0


def _threshold(text: str) -> float | str:
    if text == "auto":
        return text
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is neither 'auto' nor a number") from None


def _coarse(text: str) -> str | int:
    if text in ("auto", "none"):
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: use auto, none or a level number") from None


def cmd_mask(args: argparse.Namespace) -> int:
    """Compute the tissue mask of a slide and write it to Zarr."""
    from wsi_xr.cluster import check_scheduler_address, compute
    from wsi_xr.slide import open_slide
    from wsi_xr.store import check_output, write_zarr
    from wsi_xr.tissue import MaskParams, resolve_threshold, tissue_mask

    params = MaskParams(args.tile, args.patch, args.threshold, args.coarse, args.reject_pen)  # checks every setting
    check_output(args.out, overwrite=args.overwrite)
    if args.scheduler:
        check_scheduler_address(args.scheduler)
    start = time.perf_counter()
    image = open_slide(args.slide, chunks=args.chunk, device=_device(args.device), mpp=args.mpp)
    mask = tissue_mask(
        image,
        tile=params.tile,
        patch=params.patch,
        threshold=params.threshold,
        coarse=params.coarse,
        reject_pen=params.reject_pen,
        target_mpp=_target_mpp(args),
    )
    with _client(args.scheduler or "threads") as client:
        (computed,) = compute(mask, client=client, progress=not args.quiet)
        _end_progress_line(client, args.quiet)
    computed = resolve_threshold(computed)
    write_zarr(computed, args.out, overwrite=args.overwrite)
    tiles = computed.tile_mask
    patches = computed.patch_mask
    fraction = float(tiles.mean()) if tiles.size else 0.0
    print(
        f"{Path(args.slide).name}: patches kept {int(patches.sum())}/{patches.size}, "
        f"tiles kept {int(tiles.sum())}/{tiles.size} ({fraction:.1%}), "
        f"threshold {computed.attrs['threshold']:.2f} ({computed.attrs['threshold_method']}), "
        + (f"pen tiles {int(computed.pen_mask.sum())}, " if args.reject_pen else "")
        + f"read errors {int(computed.read_error.sum())} tiles ({computed.attrs['damaged_file_tiles']} damaged TIFF tiles), "
        f"TIFF tiles decoded {computed.attrs['file_tiles_decoded']}/{computed.attrs['file_tiles_total']}, "
        f"{time.perf_counter() - start:.2f} s -> {args.out}"
    )
    return 0


@contextlib.contextmanager
def _client(scheduler: str | None, **shape: Any) -> Iterator[Any]:
    """:func:`wsi_xr.cluster.dask_client`, saying where its dashboard is (the library prints nothing).

    When the command is interrupted, distributed's own reports of the tasks it cancels
    while shutting down (``CancelledError`` tracebacks) are not shown: the command says
    what happened in one line.
    """
    from wsi_xr.cluster import dask_client

    with dask_client(scheduler, **shape) as client:
        if client is not None and scheduler:
            print(f"connected to {scheduler} (dashboard: {client.dashboard_link})", file=sys.stderr)
        elif client is not None:
            print(f"Dask dashboard: {client.dashboard_link}", file=sys.stderr)
        try:
            yield client
        except KeyboardInterrupt:
            if not log.isEnabledFor(logging.DEBUG):
                logging.getLogger("distributed").setLevel(logging.CRITICAL)
            raise


def _end_progress_line(client: Any, quiet: bool) -> None:
    """End the line distributed's progress bar leaves open (the threaded scheduler's bar ends its own)."""
    if client is not None and not quiet:
        print()


def cmd_plot(args: argparse.Namespace) -> int:
    """Draw the slide thumbnail with the stored tile mask overlaid, or (``--latent``) the latent map."""

    from wsi_xr.outputs import check_output_file
    from wsi_xr.store import open_store, output_groups

    check_output_file(args.out, "png")  # before any work: fail fast on an unwritable path
    from wsi_xr.plot import plot_latent_map, plot_mask_overlay

    if args.group is None:
        groups = output_groups(args.store)
        if groups:
            raise InvalidArgumentError(f"{args.store}: a cohort store of {len(groups)} slides; pass --group NAME, one of: {', '.join(groups)}.")
    ds = open_store(args.store, group=args.group)
    where = f"{args.store} (group {args.group})" if args.group else str(args.store)
    if args.latent and "latent" not in ds:
        raise InvalidArgumentError(
            f"{where}: has no latent cube (a tissue-mask store, from `wsi-xr mask`?); --latent needs a store written by "
            "`wsi-xr run`. Leave out --latent to draw the tile mask."
        )
    slide = args.slide or ds.attrs.get("source")
    if args.latent:
        if args.slide is None and slide and not Path(slide).exists():
            print(
                f"note: {slide} (the slide stored in {where}) not found; drawing the latent map alone (pass --slide SLIDE to draw it beside).",
                file=sys.stderr,
            )
            slide = None
        out = plot_latent_map(ds, args.out, slide=slide or None)
    else:
        if not slide:
            raise InvalidArgumentError(f"{where}: no slide path stored; pass --slide SLIDE.")
        out = plot_mask_overlay(ds, slide, args.out)
    print(f"wrote {out}")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    """Mask and encode slide(s) into a Zarr store (one group per slide for several)."""
    from wsi_xr.cluster import check_scheduler_address
    from wsi_xr.pipeline import check_run_target, group_names, process_slide, process_slides, validate_run_options, write_parquet
    from wsi_xr.readers import open_file

    if len(args.paths) < 2:
        raise InvalidArgumentError("give at least one SLIDE and the output OUT.zarr.")
    *slides, out = args.paths
    if any(str(s).endswith(".zarr") for s in slides):
        store_like = next(s for s in slides if str(s).endswith(".zarr"))
        raise InvalidArgumentError(f"{store_like}: a store given as a slide; the store comes last.")
    if args.parquet:
        from wsi_xr.outputs import check_output_file

        check_output_file(args.parquet, "parquet")  # a Parquet file is replaced, never a folder or another file
    settings = {
        "tile": args.tile,
        "patch": args.patch,
        "threshold": args.threshold,
        "coarse": args.coarse,
        "chunks": args.chunk,
        "batch_size": args.batch_size,
        # the encoder (checked once below; its tile, patch and target mpp resolved there)
        "device": _device(args.device),
        "precision": args.precision,
        "reject_pen": args.reject_pen,
        "torch_threads": "auto",  # cores / concurrent tasks: no oversubscription
        "target_mpp": _target_mpp(args),
    }
    # every argument, weights file, slide and the output are checked before a cluster starts
    if args.scheduler:
        check_scheduler_address(args.scheduler)
    checked = validate_run_options(
        args.weights, encoder=args.encoder, encoder_spec=_encoder_spec(args), encoder_kwargs=args.encoder_kwargs, **settings
    )
    opened = [open_file(s, mpp=args.mpp) for s in slides]
    groups: list[str | None] = [None] if len(opened) == 1 else list(group_names(opened))
    target = check_run_target(out, list(zip(opened, groups)), checked, overwrite=args.overwrite)
    _say_missing_mpp(opened)
    if target.chunks_resumed:
        print(f"resuming: {target.chunks_resumed} of {target.chunks_total} chunks already done", file=sys.stderr)
    options = {**settings, "weights": checked.model, "overwrite": args.overwrite, "progress": not args.quiet}  # checked once
    start = time.perf_counter()
    processes = args.workers is not None and args.workers > 1
    scheduler = args.scheduler
    single = len(opened) == 1 and settings["device"] == "cpu"  # GPUs: a LocalCUDACluster, one worker per GPU
    if scheduler is None and args.workers is None and args.threads_per_worker is None and single:
        scheduler = SINGLE_SLIDE_SCHEDULER  # one slide on this machine: a LocalCluster costs more than it gives
        if not args.quiet:
            print("one slide: Dask's threaded scheduler, no cluster (--workers N starts one, with a dashboard)", file=sys.stderr)
    try:
        with _client(scheduler, workers=args.workers, threads_per_worker=args.threads_per_worker, processes=processes) as client:
            if len(opened) == 1:
                ds = process_slide(opened[0], out, client=client, **options)
                summaries = [(Path(slides[0]).name, ds)]
            else:
                tree = process_slides(opened, out, client=client, **options)
                summaries = [(name, tree[name].to_dataset()) for name in tree.children]
            _end_progress_line(client, args.quiet)
    except KeyboardInterrupt as interrupt:  # Ctrl-C, or SIGTERM from a batch scheduler (see main)
        interrupt.args = (f"interrupted: {target.chunks_done()} of {target.chunks_total} chunks saved; run the same command again to resume",)
        raise
    for name, ds in summaries:
        pen = f", pen tiles removed {ds.attrs['pen_tiles']}" if ds.attrs.get("reject_pen") else ""
        print(
            f"{name}: tissue tiles {ds.attrs['tissue_tiles']}/{ds.tile_mask.size}, threshold "
            f"{ds.attrs['threshold']:.2f} ({ds.attrs['threshold_method']}){pen}, read errors {ds.attrs['read_errors']} tiles "
            f"({ds.attrs['damaged_file_tiles']} damaged TIFF tiles), TIFF tiles decoded "
            f"{ds.attrs['file_tiles_decoded']}/{ds.attrs['file_tiles_total']}, precision {ds.attrs['precision']}"
        )
    if args.parquet:
        rows = write_parquet(out, args.parquet)
        print(f"wrote {rows} rows to {args.parquet}")
    print(f"done in {time.perf_counter() - start:.1f} s -> {out}")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    """Read and check every chunk of a store; one line per problem; exit 0 when sound, else 1."""
    from wsi_xr.pipeline.verify import verify_store

    report = verify_store(args.store, parquet=args.parquet)
    for line in report.lines():
        print(line)
    what = f"{report.groups} slide group(s), {report.chunks_read} chunks read" + (f", {args.parquet} checked" if args.parquet else "")
    if report.ok:
        print(f"{args.store}: sound ({what})")
        return 0
    print(f"{args.store}: {len(report.problems)} problem(s) ({what}); `wsi-xr run` with the same arguments recomputes what fails", file=sys.stderr)
    return 1


def cmd_migrate(args: argparse.Namespace) -> int:
    """Update a store written by wsi_xr 0.1.0 to the current layout, in place."""
    from wsi_xr.store import migrate_store

    changed = migrate_store(args.store)
    print(f"{args.store}: " + (f"migrated {', '.join(changed)}" if changed else "already up to date"))
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    """Train the VAE on tissue tiles of the given slides; write the weights file."""
    from wsi_xr.outputs import check_output_file
    from wsi_xr.sampling import parse_slide_region, sample_tissue_tiles

    check_output_file(args.out, "weights")
    holdout = dict(parse_slide_region(text) for text in args.holdout)
    init_model = None
    if args.init is not None and args.init_logvar is not None:
        raise InvalidArgumentError("--init-logvar sets up a fresh model; it cannot be combined with --init WEIGHTS")
    if args.init is not None:
        from wsi_xr.models import load_vae

        init_model = load_vae(args.init)  # checked before the slides are read
    tiles, origins = sample_tissue_tiles(
        args.slides,
        max_tiles=args.max_tiles,
        seed=args.seed,
        outside=holdout or None,
        margin=args.margin,
        stride=args.stride,
    )
    import numpy as np
    import torch

    from wsi_xr.models import save_vae, train_vae  # torch: only once the inputs are known good
    from wsi_xr.models.vae import TILE_SIZE

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    index = {str(s): i for i, s in enumerate(args.slides)}
    groups = np.array([index[str(o["slide"])] for o in origins], dtype=np.int64)
    per_slide = {Path(s).name: int(np.sum(groups == i)) for i, s in enumerate(args.slides)}
    print(f"{len(tiles)} tissue tiles from {len(args.slides)} slide(s): " + ", ".join(f"{k} {v}" for k, v in per_slide.items()))
    start = time.perf_counter()
    result = train_vae(
        tiles,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        seed=args.seed,
        device=args.device,
        kl_weight=args.kl_weight,
        loss=args.loss,
        schedule=args.schedule,
        warmup=args.warmup,
        weight_decay=args.weight_decay,
        stain_jitter=args.stain_jitter,
        zoom=args.zoom,
        groups=groups,
        balance=args.balance,
        init_logvar=args.init_logvar,
        val_fraction=args.val_fraction,
        progress=not args.quiet,
        model=init_model,
    )
    metadata = {
        **result.metadata(),
        "slides": [Path(s).name for s in args.slides],
        "tiles": len(tiles),
        "tiles_per_slide": per_slide,
        "holdout": {Path(k).name: r.as_text() for k, r in holdout.items()},
        "holdout_rule": f"tiles of a hold-out slide region are never trained on; training tiles keep {args.margin} px clear of it",
        "margin": args.margin,
        "stride": args.stride or TILE_SIZE,
        "init": None if args.init is None else Path(args.init).name,
        "torch_threads": torch.get_num_threads(),
        "train_seconds": round(time.perf_counter() - start, 1),
        "command": "wsi-xr " + " ".join(sys.argv[1:]) if "train" in sys.argv[1:] else "train_vae",
    }
    save_vae(result.model, args.out, metadata=metadata)
    print(f"validation loss per tile {result.val_loss:.2f} after {args.epochs} epochs -> {args.out}")
    return 0


def cmd_eval_vae(args: argparse.Namespace) -> int:
    """Reconstruction MSE of the VAE, PCA and downsampling on tissue tiles of slides; table and JSON."""
    from wsi_xr.sampling import evaluate_slides, parse_slide_region

    regions = dict(parse_slide_region(text) for text in args.region)
    if args.json:
        from wsi_xr.outputs import check_output_file

        check_output_file(args.json, "json")  # fail fast on an unwritable path
    if args.leave_one_out:
        from wsi_xr.loso import fold_table, leave_one_slide_out

        if regions or args.train_slides:
            raise InvalidArgumentError("--leave-one-out holds out whole slides: it takes no --region or --train-slides.")
        folds = leave_one_slide_out(
            [args.weights, *args.slides],
            epochs=args.epochs,
            stride=args.train_stride,
            max_train_tiles=args.max_train_tiles,
            max_eval_tiles=args.max_tiles or 1000,
            seed=args.seed,
        )
        print(fold_table(folds))
        print("MSE of pixels in [0, 1] on the held-out slide's tissue tiles; VAE and PCA-32 fitted on the other slides' tiles only")
        if args.json:
            settings = {"epochs": args.epochs, "stride": args.train_stride, "seed": args.seed, "command": " ".join(sys.argv)}
            Path(args.json).write_text(json.dumps({"folds": [f.to_dict() for f in folds], **settings}, indent=2) + "\n")
            print(f"wrote {args.json}")
        return 0
    report = evaluate_slides(
        args.weights,
        args.slides,
        train_slides=args.train_slides,
        regions=regions,
        margin=args.margin,
        max_tiles=args.max_tiles,
        max_train_tiles=args.max_train_tiles,
        seed=args.seed,
        n_components=args.pca_components,
        dihedral=not args.no_dihedral,
        device=args.device,
        train_stride=args.train_stride,
    )
    print(report.table())
    print("MSE of pixels in [0, 1]; (n) = numbers kept per tile; * = lowest in the row")
    if args.json:
        out = {**report.to_dict(), "weights": args.weights}
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


def cmd_plot_recon(args: argparse.Namespace) -> int:
    """Real tissue tiles above their VAE reconstructions."""
    from wsi_xr.outputs import check_output_file

    check_output_file(args.out, "png")  # before any work: fail fast on an unwritable path
    from wsi_xr.plot import plot_reconstructions

    region = None
    if args.region is not None:
        from wsi_xr.sampling import parse_region

        region = parse_region(args.region)
    out = plot_reconstructions(args.weights, args.slide, args.out, n=args.n, seed=args.seed, region=region)
    print(f"wrote {out}")
    return 0


def _csv(kind: Callable[[str], Any]) -> Any:
    def parse(text: str) -> list[Any]:
        try:
            return [kind(part) for part in text.split(",") if part]
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r}: give a comma-separated list") from None

    return parse


def cmd_bench(args: argparse.Namespace) -> int:
    """Benchmark chunkings, backends and schedulers on a slide (or a synthetic one, deleted afterwards)."""
    import tempfile

    from wsi_xr.bench import HEADER, format_row, plot_report, run_benchmark
    from wsi_xr.datasets.synth import write_synthetic_slide
    from wsi_xr.outputs import check_output_file

    if args.out:
        check_output_file(args.out, "json")
    if args.plot:
        check_output_file(args.plot, "png")
    with tempfile.TemporaryDirectory(prefix="wsi_xr-bench-") as scratch:
        slide = args.slide
        if slide is None:
            slide = str(Path(scratch) / f"synthetic-{args.size}.tif")
            write_synthetic_slide(slide, args.size, args.size, seed=0)
            print(f"benchmarking a synthetic {args.size} x {args.size} slide (deleted afterwards)")
        print(HEADER)
        report = run_benchmark(
            slide,
            chunks=args.chunks,
            stages=args.stage,
            backends=args.backend,
            schedulers=args.scheduler,
            repeat=args.repeat,
            weights=args.weights,
            workdir=scratch,
            on_result=lambda result: print(format_row(result), flush=True),
        )
    if args.out:
        Path(args.out).write_text(report.to_json())
        print(f"wrote {args.out}")
    failed = [r for r in report.results if r.error]
    if failed and len(failed) == len(report.results):
        print(f"wsi-xr bench: error: every case failed (first: {failed[0].error})", file=sys.stderr)
        return 1
    if args.plot:
        print(f"wrote {plot_report(report, args.plot)}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """Synthetic slide -> whole pipeline with the shipped weights -> store, Parquet, figures."""
    from wsi_xr.datasets.synth import write_synthetic_slide
    from wsi_xr.pipeline import process_slide, write_parquet
    from wsi_xr.plot import plot_latent_map, plot_mask_overlay

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    slide = out / "synthetic-slide.tif"
    write_synthetic_slide(slide, args.size, args.size, seed=args.seed)
    print(f"synthetic slide  {slide}  ({args.size} x {args.size}, {time.perf_counter() - start:.1f} s)")
    cmd_info(argparse.Namespace(slide=str(slide), json=False))
    store = out / "result.zarr"
    ds = process_slide(slide, store, overwrite=True, progress=True, precision=args.precision, torch_threads="auto")
    rows = write_parquet(store, out / "tiles.parquet")
    overlay = plot_mask_overlay(ds, slide, out / "mask-overlay.png")
    latent_map = plot_latent_map(ds, out / "latent-map.png", slide=slide)
    print(f"store            {store}  ({ds.attrs['tissue_tiles']} tissue tiles, threshold {ds.attrs['threshold']:.1f})")
    print(f"parquet          {out / 'tiles.parquet'}  ({rows} rows)")
    print(f"figures          {overlay}\n                 {latent_map}")
    print(f"open it:         xr.open_zarr('{store}')")
    print(f"done in {time.perf_counter() - start:.1f} s")
    return 0


def _add_mask_options(p: argparse.ArgumentParser, *, encoder_tiles: bool = False) -> None:
    """The mask's options; ``encoder_tiles``: the tile defaults to the encoder's (``run``)."""
    from wsi_xr.tissue.params import MaskParams  # the defaults live there

    defaults = MaskParams()
    if encoder_tiles:
        p.add_argument("--tile", type=_positive_int, default=None, help=f"tile side in pixels (default: the encoder's, {defaults.tile} for the VAE)")
        p.add_argument("--patch", type=_positive_int, default=None, help=f"patch side in pixels (default: 4 tiles, {defaults.patch} for the VAE)")
    else:
        p.add_argument("--tile", type=_positive_int, default=defaults.tile, help=f"tile side in pixels (default {defaults.tile})")
        p.add_argument("--patch", type=_positive_int, default=defaults.patch, help=f"patch side in pixels (default {defaults.patch})")
    p.add_argument("--threshold", type=_threshold, default=defaults.threshold, help=f"variance threshold, or auto (default {defaults.threshold})")
    p.add_argument(
        "--coarse", type=_coarse, default=defaults.coarse, help=f"auto, none, or the pyramid level for the coarse skip (default {defaults.coarse})"
    )
    p.add_argument(
        "--chunk",
        type=_positive_int,
        default=None,
        help="chunk side in pixels (multiple of --patch; default: ~2048 on the file's tiles, 4096 from 32768² on)",
    )
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="CuPy chunks on the GPU (auto: when a GPU is present)")
    p.add_argument("--reject-pen", action="store_true", help="remove tiles covered by pen ink from the mask (adds pen_mask)")


def _add_scale_options(p: argparse.ArgumentParser) -> None:
    """--mpp, and the target resolution as --target-mpp or --magnification (one of them)."""
    p.add_argument(
        "--mpp",
        type=_positive_float,
        default=None,
        help="microns per level-0 pixel, for slides that lack it or state it wrongly (default: the file's)",
    )
    target = p.add_mutually_exclusive_group()
    target.add_argument(
        "--target-mpp",
        type=_positive_float,
        default=None,
        help="work at this resolution in µm/px: the level at or finer than it is read and area-averaged to it, "
        "so tiles cover the same microns on every slide (default: level 0 as it is)",
    )
    target.add_argument(
        "--magnification",
        type=_positive_float,
        default=None,
        help="the target resolution as an objective power: 20 means --target-mpp 0.5, 40 means 0.25",
    )


def _target_mpp(args: argparse.Namespace) -> float | None:
    from wsi_xr.resample import magnification_mpp

    return magnification_mpp(args.magnification) if args.magnification is not None else args.target_mpp


def _say_missing_mpp(opened: Sequence[Any]) -> None:
    """One line naming the slides whose file states no mpp (their tiles have no known size in microns)."""
    missing = [Path(o.path).name for o in opened if o.info.mpp_source == "missing"]
    if missing:
        print(
            f"no mpp in {', '.join(missing)}: tiles are level pixels of unknown size (stored as mpp_source 'missing'); pass --mpp to state it",
            file=sys.stderr,
        )


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"{text} must be a positive number")
    return value


def _add_encoder_options(p: argparse.ArgumentParser) -> None:
    """--encoder and the spec of an encoder that does not carry one (a TorchScript file)."""
    p.add_argument(
        "--encoder",
        default=None,
        help="another encoder than the VAE: a TorchScript file (with --encoder-tile, -mean, -std) or a timm model name "
        "(timm:NAME, with --weights: a local file; nothing is downloaded)",
    )
    p.add_argument("--encoder-tile", type=_positive_int, default=None, help="the encoder's tile side in pixels (e.g. 224); gives it a spec")
    p.add_argument("--encoder-mean", type=_three_floats, default=None, help="per-channel mean for pixels in [0, 1], R,G,B (default 0,0,0)")
    p.add_argument("--encoder-std", type=_three_floats, default=None, help="per-channel std for pixels in [0, 1], R,G,B (default 1,1,1)")
    p.add_argument("--encoder-mpp", type=_positive_float, default=None, help="the resolution the encoder was trained at, µm/px (its target mpp)")
    p.add_argument(
        "--encoder-kwargs", type=_json_object, default=None, help="a timm model's keyword arguments as JSON, e.g. '{\"init_values\": 1e-5}'"
    )


def _json_object(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise argparse.ArgumentTypeError(f"{text!r} is not JSON ({err.msg})") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"{text!r}: give a JSON object, e.g. '{{\"init_values\": 1e-5}}'")
    return value


def _three_floats(text: str) -> tuple[float, float, float]:
    parts = text.split(",")
    try:
        values = tuple(float(v) for v in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give three numbers R,G,B, e.g. 0.485,0.456,0.406") from None
    if len(values) != 3:
        raise argparse.ArgumentTypeError(f"{text!r}: give three numbers R,G,B, e.g. 0.485,0.456,0.406")
    return values[0], values[1], values[2]


def _encoder_spec(args: argparse.Namespace) -> Any:
    """The EncoderSpec the --encoder-* options describe (None: the encoder's own, or none given)."""
    given = {"mean": args.encoder_mean, "std": args.encoder_std, "target_mpp": args.encoder_mpp}
    if args.encoder_tile is None:
        if any(v is not None for v in given.values()):
            raise InvalidArgumentError("--encoder-mean, --encoder-std and --encoder-mpp describe an encoder with --encoder-tile; give it too.")
        return None
    if args.encoder is None:
        raise InvalidArgumentError("--encoder-tile describes the encoder given with --encoder; give it too (the VAE's tile is 64).")
    from wsi_xr.models.encoders import EncoderSpec

    name = args.encoder[len("timm:") :] if args.encoder.startswith("timm:") else Path(args.encoder).stem
    return EncoderSpec(name, tile=args.encoder_tile, **{k: v for k, v in given.items() if v is not None})


def _add_precision_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--precision",
        choices=["fp32", "bf16", "int8"],
        default="fp32",
        help="encoder arithmetic: fp32 (exact, default), bf16 autocast (faster where the hardware has it) or int8 "
        "(the VAE on a CPU; refused where measured slower than fp32)",
    )


def _device(choice: str) -> str:
    if choice != "auto":
        return choice
    from wsi_xr.cluster import gpu_count

    return "cuda" if gpu_count() > 0 else "cpu"


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{value} must be > 0")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every sub-command."""
    from wsi_xr import __version__

    parser = argparse.ArgumentParser(prog="wsi-xr", description="Whole-slide images as lazy xarray arrays.")
    parser.add_argument("--version", action="version", version=f"wsi_xr {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = parser.add_subparsers(
        dest="command", required=True, metavar="COMMAND", help="one of the commands below; `wsi-xr COMMAND --help` for its options"
    )

    def command(name: str, summary: str, **kwargs: Any) -> argparse.ArgumentParser:
        """A sub-command whose one-line summary is also the first line of its own --help."""
        return sub.add_parser(name, help=summary, description=summary[0].upper() + summary[1:] + ".", **kwargs)

    p = command("info", "describe a slide: levels, mpp, backend, tiles")
    p.add_argument("slide", help="a slide file (.svs, .tif, .ndpi, .mrxs, DICOM, ...)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_info)

    p = command("synth", "write a synthetic H&E-like slide with known tissue")
    p.add_argument("out", help="the pyramidal TIFF to write")
    p.add_argument("--width", type=_positive_int, default=8192, help="level-0 width in px (default 8192)")
    p.add_argument("--height", type=_positive_int, default=8192, help="level-0 height in px (default 8192)")
    p.add_argument("--seed", type=int, default=0, help="random seed: the same seed draws the same slide (default 0)")
    p.add_argument("--tissue-fraction", type=float, default=0.3, help="share of the slide covered by tissue (default 0.3)")
    p.add_argument("--compression", choices=["jpeg", "deflate", "none"], default="jpeg", help="tile compression (default jpeg)")
    p.add_argument("--pen-strokes", type=int, default=0, help="marker-ink strokes to draw, with ground truth (default 0)")
    p.add_argument(
        "--pen-colours",
        default=None,
        help="comma-separated inks the strokes cycle through: blue, green, red, black (the default) and the held-out cyan, navy, orange, violet, pink",
    )
    p.add_argument("--jpeg-quality", type=int, default=90, help="JPEG quality 1-100 (default 90; Aperio scanners write about 70)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_synth)

    p = command("mask", "tissue mask of a slide, written to Zarr")
    p.add_argument("slide", help="a slide file")
    p.add_argument("out", help="output Zarr store (a folder)")
    _add_mask_options(p)
    _add_scale_options(p)
    p.add_argument("--scheduler", default=None, help="address of a Dask scheduler (default: local threads)")
    p.add_argument(
        "--overwrite", action="store_true", help="replace a mask store that wsi_xr wrote; a folder holding anything else is never replaced"
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_mask)

    p = command(
        "run",
        "mask and encode one slide, or a cohort, into a Zarr store (resumable: run the same command again to finish)",
        usage="wsi-xr run [options] SLIDE [SLIDE ...] OUT.zarr",
    )
    p.add_argument("paths", nargs="+", metavar="SLIDE", help="the slide(s), then the output store OUT.zarr (several slides: one group each)")
    p.add_argument("--weights", default=None, help="the encoder's weights file (default: the shipped VAE weights)")
    _add_encoder_options(p)
    p.add_argument("--parquet", default=None, help="also write one row per tissue tile to this Parquet file")
    _add_mask_options(p, encoder_tiles=True)
    _add_scale_options(p)
    p.add_argument("--batch-size", type=_positive_int, default=None, help="encoder batch (default: measured per device; on a CPU 64 fp32, 128 bf16)")
    _add_precision_option(p)
    p.add_argument(
        "--scheduler",
        default=None,
        help="tcp://host:port of an existing Dask cluster, or 'threads' (default: the threaded scheduler for one slide, a LocalCluster for several)",
    )
    p.add_argument("--workers", type=_positive_int, default=None, help="LocalCluster workers (more than 1: separate processes)")
    p.add_argument("--threads-per-worker", type=_positive_int, default=None, help="threads of each LocalCluster worker (default: one per core)")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace a store that wsi_xr wrote (made from another slide or with other parameters); "
        "a folder holding anything wsi_xr did not write is never replaced, and --parquet replaces only a Parquet file",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar, only the summary")
    p.set_defaults(func=cmd_run)

    p = command("train", "train the VAE on tissue tiles of slides")
    p.add_argument("slides", nargs="+", metavar="SLIDE", help="training slides")
    p.add_argument("--out", required=True, help="weights file to write")
    p.add_argument("--epochs", type=_positive_int, default=10, help="passes over the training tiles (default 10)")
    p.add_argument("--max-tiles", type=_positive_int, default=None, help="at most N training tiles (random, --seed; default: all)")
    p.add_argument("--batch-size", type=_positive_int, default=128, help="tiles per step (default 128)")
    p.add_argument("--seed", type=int, default=0, help="seed of tile sampling, initialisation and shuffling (default 0)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="where to train (default cpu)")
    p.add_argument("--lr", type=float, default=1e-3, help="(peak) Adam learning rate (default 1e-3)")
    p.add_argument("--loss", choices=["bce", "mse"], default="bce", help="bce: the reference summed BCE (default); mse: summed squared error")
    p.add_argument("--kl-weight", type=float, default=1.0, help="weight of the KL term, on top of the reference 1/(1600*32*32) (default 1)")
    p.add_argument("--schedule", choices=["constant", "cosine", "onecycle"], default="constant", help="learning-rate schedule (default constant)")
    p.add_argument("--warmup", type=float, default=0.0, help="share of the steps spent warming the learning rate up (cosine, onecycle)")
    p.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay (default 0: Adam)")
    p.add_argument("--stain-jitter", type=float, default=0.0, help="H/E/DAB stain-amount jitter, e.g. 0.1 (default 0: off)")
    p.add_argument("--zoom", type=float, default=0.0, help="zoom half the tiles by up to 1+Z, e.g. 0.25 (default 0: off)")
    p.add_argument(
        "--balance", type=float, default=0.0, help="sample a slide's tiles with weight n_tiles**-B: 1 = slides equally, 0 = by tiles (default)"
    )
    p.add_argument(
        "--init-logvar", type=float, default=None, help="start the logvar head at this constant, e.g. -8 (default: random, as the reference)"
    )
    p.add_argument("--val-fraction", type=float, default=0.1, help="share of the tiles held out for the validation loss (default 0.1)")
    p.add_argument(
        "--holdout",
        action="append",
        default=[],
        metavar="SLIDE=X,Y,W,H",
        help="never train on this level-0 block of SLIDE (nor within --margin px of it); repeatable",
    )
    p.add_argument("--margin", type=int, default=64, help="gap in level-0 px between a --holdout block and training tiles (default 64)")
    p.add_argument("--threads", type=_positive_int, default=None, help="torch CPU threads (results are reproducible for a fixed number)")
    p.add_argument(
        "--stride",
        type=_positive_int,
        default=None,
        help="also train on every tissue tile shifted by multiples of S px (a divisor of 64, e.g. 16: 16 windows per tile); default: the 64-px grid only",
    )
    p.add_argument("--init", default=None, metavar="WEIGHTS", help="start from these weights (fine-tune) instead of a fresh model")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_train)

    p = command("eval-vae", "reconstruction MSE: VAE vs PCA vs downsampling, on held-out tiles")
    p.add_argument("weights", help="VAE weights file")
    p.add_argument("slides", nargs="+", metavar="SLIDE", help="evaluation slides")
    p.add_argument(
        "--train-slides",
        nargs="+",
        default=[],
        metavar="SLIDE",
        help="fit the PCA baseline on these slides' tissue tiles (never on evaluation tiles)",
    )
    p.add_argument(
        "--region",
        action="append",
        default=[],
        metavar="SLIDE=X,Y,W,H",
        help="evaluate SLIDE only on tiles inside this level-0 rectangle; training tiles of SLIDE stay --margin px clear of it (repeatable)",
    )
    p.add_argument("--margin", type=int, default=64, help="gap in level-0 px between a region and training tiles (default 64)")
    p.add_argument("--max-tiles", type=_positive_int, default=None, help="at most N evaluation tiles per slide (random, --seed)")
    p.add_argument("--max-train-tiles", type=_positive_int, default=None, help="at most N PCA training tiles")
    p.add_argument("--pca-components", type=_positive_int, default=32, help="components of the PCA baseline (default 32, as the latents)")
    p.add_argument(
        "--train-stride",
        type=_positive_int,
        default=None,
        help="fit the PCA also on the training tiles shifted by multiples of S px, as `train --stride S` trains on",
    )
    p.add_argument("--no-dihedral", action="store_true", help="fit the PCA without the 8 flips/rotations of each training tile")
    p.add_argument("--seed", type=int, default=0, help="seed of tile sampling (default 0)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="where to run the VAE (default cpu)")
    p.add_argument("--json", default=None, metavar="OUT", help="also write the numbers as JSON")
    p.add_argument(
        "--leave-one-out",
        action="store_true",
        help="WEIGHTS and SLIDEs are all slides: for each, train a VAE (and fit PCA-32) on the others' tissue tiles and score it "
        "on that slide; one row per held-out slide, with the shipped weights beside",
    )
    p.add_argument(
        "--epochs",
        type=_positive_int,
        default=24,
        help="training epochs per fold with --leave-one-out (the shipped recipe's other settings; default 24)",
    )
    p.set_defaults(func=cmd_eval_vae)

    p = command("plot-recon", "tissue tiles above their VAE reconstructions")
    p.add_argument("weights", help="VAE weights file")
    p.add_argument("slide", help="a slide file")
    p.add_argument("--out", required=True, help="PNG file to write")
    p.add_argument("--n", type=_positive_int, default=10, help="tiles to draw (default 10)")
    p.add_argument("--seed", type=int, default=0, help="seed of the tile choice (default 0)")
    p.add_argument("--region", default=None, metavar="X,Y,W,H", help="draw the tiles from inside this level-0 block only (e.g. a held-out block)")
    p.set_defaults(func=cmd_plot_recon)

    p = command("bench", "benchmark chunkings / backends / schedulers")
    p.add_argument("slide", nargs="?", default=None, help="slide to measure (default: a synthetic one)")
    p.add_argument("--size", type=_positive_int, default=8192, help="side of the synthetic slide (default 8192)")
    p.add_argument("--chunks", type=_csv(_positive_int), default=[512, 1024, 2048, 4096], help="chunk sides to compare (default 512,1024,2048,4096)")
    p.add_argument("--stage", type=_csv(str), default=["read"], help="read,mask,pipeline")
    p.add_argument("--backend", type=_csv(str), default=["cucim"], help="cucim,tifffile")
    p.add_argument("--scheduler", type=_csv(str), default=["threads"], help="threads,processes,distributed")
    p.add_argument("--repeat", type=_positive_int, default=3, help="timed repeats of each case, after a warm-up (default 3)")
    p.add_argument("--weights", default=None, help="VAE weights for --stage pipeline")
    p.add_argument("--out", default=None, help="write results as JSON")
    p.add_argument("--plot", default=None, help="write a throughput plot (PNG)")
    p.set_defaults(func=cmd_bench)

    p = command("verify", "read every chunk of a store and check its checksums and invariants (exit 1 on a problem)")
    p.add_argument("store", help="a store written by `wsi-xr run` (one slide or a cohort)")
    p.add_argument("--parquet", default=None, help="also check that this Parquet file holds exactly the store's tissue rows")
    p.set_defaults(func=cmd_verify)

    p = command("migrate", "update a store written by wsi_xr 0.1.0 to the current layout (in place)")
    p.add_argument("store", help="the store to update")
    p.set_defaults(func=cmd_migrate)

    p = command("demo", "run the pipeline on a built-in synthetic slide")
    p.add_argument("--out", default="demo_output", help="folder for the outputs (default demo_output)")
    _add_precision_option(p)
    p.add_argument("--size", type=_positive_int, default=8192, help="side of the synthetic slide (default 8192)")
    p.add_argument("--seed", type=int, default=0, help="seed of the synthetic slide (default 0)")
    p.set_defaults(func=cmd_demo)

    p = command("plot", "thumbnail with the tile mask overlaid (or, with --latent, the latent map), as PNG")
    p.add_argument("store", help="a Zarr store written by `wsi-xr mask` or `wsi-xr run`, or a netCDF file written from one")
    p.add_argument("--slide", default=None, help="the slide (default: the path stored in the store)")
    p.add_argument("--group", default=None, help="group of a cohort store (slide name)")
    p.add_argument(
        "--latent",
        action="store_true",
        help="draw the latent map instead: the first 3 principal components of the tissue tiles' latents as RGB on the tile "
        "grid, beside the slide when it is found (a store written by `wsi-xr run`)",
    )
    p.add_argument("--out", required=True, help="PNG file to write")
    p.set_defaults(func=cmd_plot)
    return parser


#: Loggers of Dask's cluster machinery: their INFO records (workers starting and closing,
#: stale scratch folders purged...) are shown only with ``-v``.
DASK_LOGGERS = ("distributed", "bokeh", "tornado")


@contextlib.contextmanager
def _quiet_dask_logs(quiet: bool) -> Iterator[None]:
    """While a command runs, show only errors of Dask's cluster machinery (unless ``-v``),
    in this process and in the worker processes it starts; restored afterwards.

    distributed sets its loggers' levels from dask's ``logging`` config when it is first
    imported, in this process and in every worker process a LocalCluster spawns (which
    read the environment, not this process's config): so set both, before any import.
    """
    if not quiet:
        yield
        return
    import dask

    saved_env = {name: os.environ.get(f"DASK_LOGGING__{name.upper()}") for name in DASK_LOGGERS}
    saved_levels = {name: logging.getLogger(name).level for name in DASK_LOGGERS}
    for name in DASK_LOGGERS:
        os.environ.setdefault(f"DASK_LOGGING__{name.upper()}", "error")
        if "distributed" in sys.modules:  # imported before (main called from Python): set the level directly
            logging.getLogger(name).setLevel(logging.ERROR)
    try:
        with dask.config.set({"logging": {name: "error" for name in DASK_LOGGERS}}):
            yield
    finally:
        for name, value in saved_env.items():
            if value is None:
                os.environ.pop(f"DASK_LOGGING__{name.upper()}", None)
            else:
                os.environ[f"DASK_LOGGING__{name.upper()}"] = value
        for name, level in saved_levels.items():
            logging.getLogger(name).setLevel(level)


def _output_of(args: argparse.Namespace) -> str | None:
    """What the command writes (a store or file), to name in an error that names no file."""
    if getattr(args, "command", None) == "run" and getattr(args, "paths", None):
        return str(args.paths[-1])
    out = getattr(args, "out", None) or getattr(args, "store", None)
    return str(out) if out else None


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread like Ctrl-C's KeyboardInterrupt (so every ``finally`` and lock release runs)."""

    signum = signal.SIGTERM


def _terminate(signum: int, frame: Any) -> None:
    raise Terminated()


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``wsi-xr`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    if not args.verbose:
        # tifffile logs what it finds wrong in a damaged file; wsi_xr reports that itself,
        # as one error line or as read errors
        logging.getLogger("tifffile").setLevel(logging.ERROR)
    previous = signal.signal(signal.SIGTERM, _terminate)  # batch schedulers send SIGTERM before SIGKILL
    try:
        with _quiet_dask_logs(not args.verbose):
            return int(args.func(args) or 0)
    except WsiXrError as err:
        print(f"wsi-xr {args.command}: error: {err}", file=sys.stderr)
        return EXIT_USER_ERROR
    except OSError as err:  # a file that cannot be read or written (a path, permissions, a full disk)
        where = err.filename or _output_of(args)
        what = f"{where}: " if where else ""
        print(
            f"wsi-xr {args.command}: error: {what}{err.strerror or err}; check that path, its permissions and the free "
            "space there, then run the same command again.",
            file=sys.stderr,
        )
        return EXIT_USER_ERROR
    except KeyboardInterrupt as interrupt:  # Ctrl-C (SIGINT) or SIGTERM: one line, the shell's exit code
        detail = str(interrupt.args[0]) if interrupt.args and isinstance(interrupt.args[0], str) else "interrupted"
        if sys.stdout.isatty():
            print(file=sys.stdout)  # end a progress bar's line
        print(f"wsi-xr {args.command}: {detail}", file=sys.stderr)
        return 128 + (interrupt.signum if isinstance(interrupt, Terminated) else signal.SIGINT)
    finally:
        signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
