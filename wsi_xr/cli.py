"""The ``wsi-xr`` command line.

Every sub-command is a small function ``cmd_NAME(args) -> int``; user errors
(:class:`~wsi_xr.WsiXrError`) end with a one-line message on stderr and exit code 2,
never a traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Sequence

from wsi_xr.errors import InvalidArgumentError, WsiXrError

log = logging.getLogger("wsi_xr")

#: Exit code for user errors (bad file, bad argument, store in the wrong state).
EXIT_USER_ERROR = 2


def cmd_info(args: argparse.Namespace) -> int:
    """Print what the probe learns about a slide (levels, mpp, backend, tiles)."""
    from wsi_xr.readers import choose_backend, probe

    info = probe(args.slide)
    backend = choose_backend(info, "auto")
    if args.json:
        print(json.dumps({**info.to_dict(), "backend": backend}, indent=2))
        return 0
    print(f"{info.path}")
    print(f"  vendor      {info.vendor}")
    print(f"  size        {info.width} x {info.height} px (level 0)")
    print(f"  mpp         {info.mpp if info.mpp is not None else 'unknown'}")
    print(f"  backend     {backend}" + (f"  (cuCIM avoided: {info.cucim_unsafe_reason})" if backend != "cucim" else ""))
    print(f"  photometric {info.photometric}")
    print("  level  width x height   downsample  tile      compression")
    for lv in info.levels:
        tile = f"{lv.tile_width}x{lv.tile_height}" if lv.tiled else "stripped"
        print(f"  {lv.index:>5}  {lv.width:>6} x {lv.height:<7}  {lv.downsample:>10.3f}  {tile:<9} {lv.compression_name}")
    return 0


def cmd_synth(args: argparse.Namespace) -> int:
    """Write a synthetic H&E-like pyramidal slide."""
    from wsi_xr.synth import write_synthetic_slide

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
        progress=not args.quiet,
    )
    print(f"wrote {out} ({spec.width} x {spec.height}, seed {spec.seed}) in {time.perf_counter() - start:.1f} s")
    return 0


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
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("info", help="describe a slide: levels, mpp, backend, tiles")
    p.add_argument("slide")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("synth", help="write a synthetic H&E-like slide with known tissue")
    p.add_argument("out")
    p.add_argument("--width", type=_positive_int, default=8192)
    p.add_argument("--height", type=_positive_int, default=8192)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tissue-fraction", type=float, default=0.3)
    p.add_argument("--compression", choices=["jpeg", "deflate", "none"], default="jpeg")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_synth)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``wsi-xr`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    try:
        return int(args.func(args) or 0)
    except WsiXrError as err:
        print(f"wsi-xr {args.command}: error: {err}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print(f"wsi-xr {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
