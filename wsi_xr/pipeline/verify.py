"""Checking a store after the fact: every chunk read and checksummed, every invariant re-derived.

:func:`verify_store` (``wsi-xr verify STORE``) reads every chunk of every array of every slide
group and checks its CRC32C, then checks what the pipeline promises:

- every chunk that must exist does (a deleted chunk file reads as the fill value in plain
  xarray; here it is a problem): the masks, ``read_error`` and ``chunk_done`` everywhere, the
  variances of every chunk marked done;
- ``chunk_done`` agrees with what is stored; a complete store has every chunk done;
- the masks follow from the stored variances, ``read_error``, pen marks and the threshold;
- latents are finite exactly on the tissue tiles (NaN elsewhere);
- a Parquet file, if given, holds exactly the store's tissue rows.

:func:`damaged_chunks` is the part a rerun uses to repair a store: the slide chunks whose data
fail a check are recomputed from the slide, then the store is finalised again.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from wsi_xr.store import RUN_ATTR, slide_groups, zarr_array
from wsi_xr.store.attrs import decode_attrs
from wsi_xr.tissue.core import two_stage_rule

__all__ = ["Problem", "VerifyReport", "check_written", "damaged_chunks", "verify_group", "verify_store"]

#: Arrays with one chunk per slide chunk: a problem in chunk (i, j) means slide chunk (i, j) is recomputed.
PER_CHUNK = ("tile_variance", "patch_variance", "latent", "chunk_done", "pen_mask", "subtile_variance")
#: Arrays finalising writes whole: rewritten by the next finalisation.
FINALISED = ("tile_mask", "patch_mask", "tissue_fraction")
#: Arrays every stored chunk of which must exist once the group exists.
ALWAYS_STORED = ("read_error", "chunk_done", "tile_y", "tile_x", "patch_y", "patch_x", "chunk_y", "chunk_x", "feature", "subtile")


@dataclass(frozen=True)
class Problem:
    """One thing wrong in a store: where (group, variable, chunk) and what."""

    group: str | None
    variable: str
    chunk: tuple[int, ...] | None
    what: str

    def line(self, store: Path) -> str:
        where = f"{store}/{self.group}" if self.group else str(store)
        chunk = f" chunk {'.'.join(map(str, self.chunk))}" if self.chunk is not None else ""
        return f"{where}: {self.variable}{chunk}: {self.what}"


@dataclass
class VerifyReport:
    """What :func:`verify_store` found."""

    store: Path
    problems: list[Problem] = field(default_factory=list)
    groups: int = 0
    chunks_read: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems

    def lines(self) -> list[str]:
        return [p.line(self.store) for p in self.problems]


def _arrays(group: zarr.Group) -> dict[str, zarr.Array]:
    return {name: array for name, array in group.arrays()}


def _stored_chunk_keys(folder: Path, array: zarr.Array) -> set[str]:
    """The chunk keys (``c/0/1``) with a file in the store: one directory walk per array."""
    root = folder / array.basename
    keys: set[str] = set()
    for directory, _, files in os.walk(root / "c"):
        relative = Path(directory).relative_to(root)
        keys.update(str(relative / name) for name in files)
    return keys


def _block(array: zarr.Array, coords: tuple[int, ...]) -> tuple[slice, ...]:
    return tuple(slice(c * size, min((c + 1) * size, extent)) for c, size, extent in zip(coords, array.chunks, array.shape))


@dataclass
class _Contents:
    """What one group holds: per array, which chunks are stored and readable, and its values
    (a damaged or missing chunk reads as the fill value)."""

    present: dict[str, dict[tuple[int, ...], bool]] = field(default_factory=dict)
    values: dict[str, np.ndarray] = field(default_factory=dict)


def _read_chunks(folder: Path, group_name: str | None, group: zarr.Group, report: VerifyReport | None) -> tuple[list[Problem], _Contents]:
    """Read every stored chunk of every array; problems (missing where required, failing
    checksum or decoding, no checksum at all) and what was read.

    Each array is read whole (zarr fetches and decodes its chunks concurrently); only an
    array with a chunk that fails is read again chunk by chunk, to name the chunk.
    """
    problems: list[Problem] = []
    contents = _Contents()
    for name, array in _arrays(group).items():
        codecs = [codec.to_dict()["name"] for codec in getattr(array.metadata, "codecs", ())]  # v3 metadata: wsi_xr writes v3
        if "crc32c" not in codecs:
            problems.append(Problem(group_name, name, None, "written without checksums (before wsi_xr 0.3.0): damage to it cannot be detected"))
        stored = _stored_chunk_keys(folder, array)
        present = {coords: array.metadata.encode_chunk_key(coords) in stored for coords in np.ndindex(*array.cdata_shape)}
        try:
            values = np.asarray(array[...])
        except Exception:  # a crc32c mismatch, a truncated or garbled chunk: find which
            values = np.full(array.shape, array.fill_value, dtype=array.dtype)
            for coords in [c for c, here in present.items() if here]:
                try:
                    values[_block(array, coords)] = array.get_block_selection(coords)
                except Exception as err:
                    present[coords] = False
                    problems.append(Problem(group_name, name, coords, f"cannot be read ({type(err).__name__}: {str(err).splitlines()[0][:120]})"))
        contents.present[name] = present
        contents.values[name] = values
        if report is not None:
            report.chunks_read += sum(present.values())
    return problems, contents


def _checksum_matches(data: bytes) -> bool:
    """Whether a chunk's stored bytes end with the CRC32C of the bytes before it (the layout
    zarr v3's ``crc32c`` codec writes when it is the last codec, as in every wsi_xr array)."""
    import google_crc32c  # zarr's crc32c codec computes with it

    return len(data) >= 4 and google_crc32c.value(data[:-4]) == int.from_bytes(data[-4:], "little")


def check_written(folder: Path, group_name: str | None, latent_chunks: set[tuple[int, int]]) -> list[Problem]:
    """What finalising checks before it marks a group complete: every chunk that must be
    stored is (those of :data:`ALWAYS_STORED`, the masks, the variances, and the ``latent``
    chunks in ``latent_chunks``: those with tissue), and every stored chunk's bytes on disk
    match their CRC32C.

    The bytes are checked without decoding them (no zarr round trip per chunk: at 49152²,
    0.1 s where reading every chunk back through zarr takes about 2 s); the values finalising
    derived (masks, blanked latents) come from arrays it read through zarr, which checked
    their checksums on the way. ``wsi-xr verify`` decodes everything.
    """
    group = zarr.open_group(folder, mode="r", zarr_format=3, use_consolidated=False)
    problems: list[Problem] = []
    for name, array in _arrays(group).items():
        codecs = [codec.to_dict()["name"] for codec in getattr(array.metadata, "codecs", ())]
        if not codecs or codecs[-1] != "crc32c":
            problems.append(Problem(group_name, name, None, "written without checksums (before wsi_xr 0.3.0): damage to it cannot be detected"))
            continue
        for coords in np.ndindex(*array.cdata_shape):
            path = folder / array.basename / array.metadata.encode_chunk_key(coords)
            try:
                data = path.read_bytes()
            except FileNotFoundError:
                required = name in (*ALWAYS_STORED, *FINALISED, "tile_variance", "patch_variance", "subtile_variance") or (
                    name == "latent" and (coords[0], coords[1]) in latent_chunks
                )
                if required:
                    problems.append(Problem(group_name, name, coords, "chunk missing"))
                continue
            if not _checksum_matches(data):
                problems.append(Problem(group_name, name, coords, "checksum does not match: the chunk was damaged after it was written"))
    return problems


def verify_group(folder: Path, group_name: str | None, report: VerifyReport | None = None, *, finalised: bool | None = None) -> list[Problem]:
    """Every problem of one slide group (see the module docstring).

    ``finalised`` checks the group as a finished one (every chunk done, masks and latents
    consistent) whatever its ``complete`` attribute says: finalising checks before it
    writes ``complete``. None: as the attribute says.
    """
    group = zarr.open_group(folder, mode="r", zarr_format=3, use_consolidated=False)
    attrs: dict[str, Any] = decode_attrs(group.attrs)  # dicts and bools as written, by this release or an earlier one
    if RUN_ATTR not in attrs:
        return [Problem(group_name, "(group)", None, "not a slide group written by wsi-xr run")]
    problems, contents = _read_chunks(folder, group_name, group, report)
    present = contents.present
    bad = {(p.variable, p.chunk) for p in problems}
    complete = attrs.get("complete") is True if finalised is None else finalised
    for name in ALWAYS_STORED + (FINALISED if complete else ()):
        for coords, stored in present.get(name, {}).items():
            if not stored and (name, coords) not in bad:
                problems.append(Problem(group_name, name, coords, "chunk missing"))
    unreadable = bool(problems)
    if all(present.get("chunk_done", {}).values()):
        done = contents.values["chunk_done"]
        for name in ("tile_variance", "patch_variance", "subtile_variance"):
            for coords, stored in present.get(name, {}).items():
                if done[coords[0], coords[1]] and not stored and (name, coords) not in bad:
                    problems.append(Problem(group_name, name, coords, "chunk missing, though chunk_done says this chunk was written"))
        if complete and not done.all():
            problems.append(Problem(group_name, "chunk_done", None, f"{int((~done).sum())} chunk(s) not done in a store marked complete"))
    if unreadable or problems or not complete:
        return problems  # the checks below read the data: they mean nothing on damaged or missing chunks
    problems += _check_masks_and_latents(group, group_name, attrs, contents.values)
    return problems


def _tile_chunks(array: zarr.Array) -> tuple[int, int]:
    return int(array.chunks[0]), int(array.chunks[1])


def _chunks_of(cells: np.ndarray, chunks: tuple[int, int]) -> dict[tuple[int, int], int]:
    """How many of the True ``cells`` (a 2-D mask) fall in each chunk of shape ``chunks``."""
    rows, cols = np.nonzero(cells)
    found: dict[tuple[int, int], int] = {}
    for key in zip((rows // chunks[0]).tolist(), (cols // chunks[1]).tolist()):
        found[key] = found.get(key, 0) + 1
    return found


def _check_masks_and_latents(group: zarr.Group, group_name: str | None, attrs: dict[str, Any], values: dict[str, np.ndarray]) -> list[Problem]:
    problems: list[Problem] = []
    tile_var, patch_var, tile_mask = values["tile_variance"], values["patch_variance"], values["tile_mask"]
    threshold = float(attrs["threshold"])
    k = int(attrs["patch"]) // int(attrs["tile"])
    nty, ntx = tile_var.shape
    patch_of_tile = np.repeat(np.repeat(patch_var, k, axis=0), k, axis=1)[:nty, :ntx]
    expected = two_stage_rule(tile_var, patch_of_tile, values["read_error"], threshold)
    if "pen_mask" in values:
        expected &= ~values["pen_mask"]
    tile_chunks = _tile_chunks(zarr_array(group, "tile_mask"))
    for i, j in _chunks_of(expected != tile_mask, tile_chunks):
        problems.append(Problem(group_name, "tile_mask", (i, j), "does not follow from the stored variances and threshold"))
    with np.errstate(invalid="ignore"):
        expected_patches = patch_var > threshold
    for i, j in _chunks_of(expected_patches != values["patch_mask"], _tile_chunks(zarr_array(group, "patch_mask"))):
        problems.append(Problem(group_name, "patch_mask", (i, j), "does not follow from the stored patch variances and threshold"))
    finite = np.isfinite(values["latent"])
    for (i, j), count in _chunks_of(tile_mask & ~finite.all(axis=-1), tile_chunks).items():
        problems.append(Problem(group_name, "latent", (i, j, 0), f"{count} tissue tile(s) without latents"))
    for i, j in _chunks_of(~tile_mask & finite.any(axis=-1), tile_chunks):
        problems.append(Problem(group_name, "latent", (i, j, 0), "latents on tiles that are not tissue"))
    return problems


def _check_parquet(store: Path, parquet: Path, groups: list[str]) -> list[Problem]:
    import pandas as pd
    import xarray as xr

    from wsi_xr.store import tile_rows

    try:
        rows = pd.read_parquet(parquet)
    except Exception as err:
        return [Problem(None, str(parquet), None, f"cannot be read as Parquet ({type(err).__name__}: {err})")]
    expected = []
    for name in groups or [None]:  # type: ignore[list-item]
        expected.append(tile_rows(xr.open_zarr(store, group=name, consolidated=False), slide=name))
    want = pd.concat(expected, ignore_index=True) if expected else pd.DataFrame()
    if list(rows.columns) != list(want.columns) or len(rows) != len(want):
        return [Problem(None, str(parquet), None, f"{len(rows)} rows, the store has {len(want)} tissue tiles (or other columns)")]
    key = ["slide", "y", "x"] if "slide" in want else ["y", "x"]
    a = rows.sort_values(key).reset_index(drop=True)
    b = want.sort_values(key).reset_index(drop=True)
    if not a.astype(str).equals(b.astype(str)):  # exact: the same float32 values, the same tiles
        return [Problem(None, str(parquet), None, "rows differ from the store's tissue tiles")]
    return []


def verify_store(store: str | os.PathLike[str], *, parquet: str | os.PathLike[str] | None = None) -> VerifyReport:
    """Read and check a whole store (a slide, or every group of a cohort); see the module docstring.

    Returns a :class:`VerifyReport`; ``report.ok`` is True when nothing is wrong, and
    ``report.lines()`` gives one line per problem naming the variable and chunk.
    """
    from wsi_xr.errors import StoreError

    path = Path(store)
    if not (path / "zarr.json").is_file():
        raise StoreError(f"{path}: not a Zarr store (no zarr.json); check the path.")
    report = VerifyReport(path)
    groups = slide_groups(path)
    if groups:
        for name in groups:
            report.problems += verify_group(path / name, name, report)
            report.groups += 1
    else:
        report.problems += verify_group(path, None, report)
        report.groups = 1
    if parquet is not None and report.ok:
        report.problems += _check_parquet(path, Path(parquet), groups)
    return report


def damaged_chunks(folder: Path, group_name: str | None) -> tuple[set[tuple[int, int]], list[Problem]]:
    """The slide chunks a rerun must recompute, and every problem found.

    A slide chunk is recomputed when any of its per-chunk arrays (variances, latents, pen
    marks, ``chunk_done``, ``read_error``) fails to read or misses a chunk it must have, or
    when it is marked done but tiles that must have latents lack them: the candidates above
    the encoding floor (judged from its stored variances) while the run is open, the tissue
    tiles once it was finalised. Masks are rewritten by finalising anyway.
    """
    from wsi_xr.pipeline.options import CANDIDATE_FLOOR

    group = zarr.open_group(folder, mode="r", zarr_format=3, use_consolidated=False)
    attrs: dict[str, Any] = decode_attrs(group.attrs)  # dicts and bools as written, by this release or an earlier one
    run: dict[str, Any] = attrs.get(RUN_ATTR) or {}
    problems, contents = _read_chunks(folder, group_name, group, None)
    present, values = contents.present, contents.values
    for name in ALWAYS_STORED:
        for coords, stored in present.get(name, {}).items():
            if not stored and not any(p.variable == name and p.chunk == coords for p in problems):
                problems.append(Problem(group_name, name, coords, "chunk missing"))
    redo = {(p.chunk[0], p.chunk[1]) for p in problems if p.chunk is not None and p.variable in (*PER_CHUNK, "read_error")}
    if not present.get("chunk_done"):
        return redo, problems
    setting = run.get("threshold_setting", "auto")
    floor = float(attrs["threshold"]) if attrs.get("complete") is True else (CANDIDATE_FLOOR if setting == "auto" else float(setting))
    k = int(run.get("patch", 256)) // int(run.get("tile", 64))
    tile_var = values["tile_variance"]
    nty, ntx = tile_var.shape
    patch_of_tile = np.repeat(np.repeat(values["patch_variance"], k, axis=0), k, axis=1)[:nty, :ntx]
    need = two_stage_rule(tile_var, patch_of_tile, values["read_error"], floor)
    if "pen_mask" in values:
        need &= ~values["pen_mask"]
    lacking = _chunks_of(need & ~np.isfinite(values["latent"]).all(axis=-1), _tile_chunks(zarr_array(group, "tile_variance")))
    done = values["chunk_done"]
    for coords in np.ndindex(*done.shape):
        if coords in redo or not present["chunk_done"].get(coords) or not bool(done[coords]):
            continue
        subtiles = present.get("subtile_variance")
        if (
            not present["tile_variance"].get(coords)
            or not present["patch_variance"].get(coords)
            or (subtiles is not None and not subtiles.get((*coords, 0)))
        ):
            problems.append(Problem(group_name, "tile_variance", coords, "chunk missing, though chunk_done says this chunk was written"))
            redo.add((coords[0], coords[1]))
        elif (coords[0], coords[1]) in lacking:
            problems.append(Problem(group_name, "latent", (*coords, 0), "tiles that must have latents lack them"))
            redo.add((coords[0], coords[1]))
    return redo, problems
