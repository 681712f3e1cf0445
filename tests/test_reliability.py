"""Reliability: fuzzed slide files, bad input everywhere, faults during a run.

Everything here uses real files, real cuCIM/tifffile and real processes:

* **Fuzzing** mutates a real Aperio slide and a synthetic one in seeded ways and runs
  open -> tissue_mask -> encode on every mutant in its own process. No mutant may kill
  the process or hang it; each must end in a clean ``WsiXrError`` naming the file, or
  in a result that agrees exactly with the clean file everywhere outside the TIFF tiles
  that the mutation touched, with structurally damaged tiles flagged in ``read_error``.
  ``WSI_XR_FUZZ_COUNT`` sets the number of mutants (default 24; try 200 or 2000).
* **Bad input**: every CLI command and public function, given missing / empty / wrong
  files and absurd arguments, fails with one clear line and leaves no output behind.
* **Faults during a run**: a Dask worker killed mid-run, a store that stops accepting
  writes, two runs on one store.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import tifffile

import wsi_xr
from tests.conftest import data_file
from tests.numerics import assert_latents_agree, latent_tolerance

CLI = [sys.executable, "-m", "wsi_xr.cli"]
FUZZ_COUNT = int(os.environ.get("WSI_XR_FUZZ_COUNT", "24"))
FUZZ_SEED = int(os.environ.get("WSI_XR_FUZZ_SEED", "20260524"))
FUZZ_TIMEOUT_S = 60.0
THRESHOLD = 60.0


# =============================================================================== fuzzing
#
# One runner process (``sys.executable -c``) imports wsi_xr, torch and cuCIM once and
# then forks a fresh child per mutant: every mutant gets its own address space (a
# segfault or abort kills only that child, and is reported with its signal), its own
# timeout, and no state left from another mutant -- without paying ~4 s of imports per
# mutant. The runner starts no thread before forking (asserted), so forking is safe.

_FUZZ_RUNNER = textwrap.dedent(
    r"""
    import json, os, signal, sys, threading, time, traceback
    import numpy as np
    import dask, torch  # noqa: F401  (imported once, before forking)
    import wsi_xr
    from wsi_xr.readers.cstdio import c_output, fd_output_captured
    with c_output(), fd_output_captured():  # after torch, cuCIM's import prints cuFile's start-up noise
        import cucim  # noqa: F401
    from wsi_xr.encode import encode

    spec = json.load(open(sys.argv[1]))
    assert threading.active_count() == 1, "the runner must not fork with threads running"

    def describe(path):
        import tifffile
        try:
            with tifffile.TiffFile(path) as tf:
                page = tf.series[0].levels[0].keyframe
                signature = (page.shape, page.tilelength, page.tilewidth, int(page.compression),
                             int(page.photometric), int(page.planarconfig), page.bitspersample,
                             page.samplesperpixel, page.jpegtables, page.tags.valueof("YCbCrSubSampling"))
                return {"signature": repr(signature), "offsets": [int(v) for v in page.dataoffsets],
                        "counts": [int(v) for v in page.databytecounts]}
        except Exception as err:
            return {"error": f"{type(err).__name__}: {err}"[:300]}

    def oracle(job):
        # Which touched TIFF tiles an independent JPEG decoder (imagecodecs) rejects;
        # in a forked grandchild: a decoder crash there is not wsi_xr's.
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:
            import imagecodecs
            data = open(job["path"], "rb").read()
            tables = data[slice(*job["oracle"]["tables"])] if job["oracle"]["tables"] else None
            rejected = []
            for index, offset, count in job["oracle"]["segments"]:
                try:
                    imagecodecs.jpeg8_decode(data[offset : offset + count], tables=tables)
                except Exception:
                    rejected.append(index)
            os.write(write, json.dumps(rejected).encode())
            os._exit(0)
        os.close(write)
        text = b""
        while chunk := os.read(read, 65536):
            text += chunk
        os.waitpid(pid, 0)
        return json.loads(text) if text else "decoder crashed"

    def child(job):
        torch.set_num_threads(1)
        try:
            image = wsi_xr.open_slide(job["path"], damaged="fill")
            mask = wsi_xr.tissue_mask(image, threshold=spec["threshold"], coarse="none")
            latent = encode(image, mask, spec["weights"], batch_size=128)
            with dask.config.set(scheduler="synchronous"):
                mask, latent = dask.compute(mask, latent)
            np.savez(job["out"], tile_variance=mask.tile_variance.values, read_error=mask.read_error.values,
                     tile_mask=mask.tile_mask.values, latent=latent.values)
            outcome = {"kind": "result", "backend": image.attrs["backend"],
                       "damaged_file_tiles": int(mask.attrs["damaged_file_tiles"])}
        except wsi_xr.WsiXrError as err:
            outcome = {"kind": "error", "type": type(err).__name__, "message": str(err)}
        except BaseException as err:
            outcome = {"kind": "unexpected", "type": type(err).__name__, "message": str(err)[:500],
                       "traceback": traceback.format_exc()[-3000:]}
        if job.get("describe"):
            outcome["tifffile"] = describe(job["path"])
        if job.get("oracle"):
            outcome["rejected"] = oracle(job)
        with open(job["out"] + ".json", "w") as fh:
            json.dump(outcome, fh)

    jobs = list(spec["jobs"])
    running = {}
    while jobs or running:
        while jobs and len(running) < spec["parallel"]:
            job = jobs.pop(0)
            pid = os.fork()
            if pid == 0:
                code = 0
                try:
                    fd = os.open(job["out"] + ".stderr", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                    os.dup2(fd, 1)
                    os.dup2(fd, 2)
                    child(job)
                except BaseException:
                    traceback.print_exc()
                    code = 3
                finally:
                    sys.stdout.flush()
                    sys.stderr.flush()
                    os._exit(code)
            running[pid] = (job, time.monotonic())
        pid, status = os.waitpid(-1, os.WNOHANG)
        if pid == 0:
            for other, (job, start) in list(running.items()):
                if time.monotonic() - start > spec["timeout"]:
                    os.kill(other, signal.SIGKILL)
                    os.waitpid(other, 0)
                    del running[other]
                    print(json.dumps({"id": job["id"], "status": "timeout", "seconds": spec["timeout"]}), flush=True)
            time.sleep(0.01)
            continue
        job, start = running.pop(pid)
        report = {"id": job["id"], "seconds": round(time.monotonic() - start, 2)}
        if os.WIFSIGNALED(status):
            report.update(status="signal", signal=os.WTERMSIG(status))
        else:
            report.update(status="exit", code=os.WEXITSTATUS(status))
        print(json.dumps(report), flush=True)
    """
)


def _run_fuzz_jobs(jobs: list[dict], weights: Path, workdir: Path, parallel: int = 2) -> dict[str, dict]:
    """Run every job in a forked child of one runner process; return per-id reports + outcomes."""
    spec = workdir / "spec.json"
    spec.write_text(json.dumps({"jobs": jobs, "weights": str(weights), "threshold": THRESHOLD, "timeout": FUZZ_TIMEOUT_S, "parallel": parallel}))
    budget = 120 + FUZZ_TIMEOUT_S * len(jobs) / parallel
    run = subprocess.run([sys.executable, "-c", _FUZZ_RUNNER, str(spec)], capture_output=True, text=True, timeout=budget)
    assert run.returncode == 0, f"fuzz runner failed: rc={run.returncode}\n{run.stderr[-3000:]}"
    reports = {}
    for line in run.stdout.splitlines():
        report = json.loads(line)
        out = Path(next(j["out"] for j in jobs if j["id"] == report["id"]))
        outcome_file = Path(str(out) + ".json")
        report["outcome"] = json.loads(outcome_file.read_text()) if outcome_file.exists() else None
        stderr_file = Path(str(out) + ".stderr")
        report["stderr"] = stderr_file.read_text(errors="replace")[-2000:] if stderr_file.exists() else ""
        reports[report["id"]] = report
    assert sorted(reports) == sorted(j["id"] for j in jobs), "the runner lost track of some mutants"
    return reports


@dataclass
class Level0:
    """Where the level-0 TIFF tiles and the IFD of a clean slide file lie."""

    data: bytes
    height: int
    width: int
    seg_h: int
    seg_w: int
    offsets: np.ndarray
    counts: np.ndarray
    ifd: list[tuple[int, int]]  # byte ranges of the TIFF header, IFD entries and tag values
    tables: tuple[int, int] | None  # byte range of the JPEGTables tag value

    @property
    def grid(self) -> tuple[int, int]:
        return -(-self.height // self.seg_h), -(-self.width // self.seg_w)


def _level0(path: Path) -> Level0:
    data = path.read_bytes()
    with tifffile.TiffFile(path) as tf:
        page = tf.series[0].levels[0].keyframe
        entry = 20 if tf.is_bigtiff else 12
        head = 16 if tf.is_bigtiff else 8
        ifd = [(0, head), (page.offset, page.offset + 2 + entry * len(page.tags) + 4)]
        tables = None
        inline = 8 if tf.is_bigtiff else 4
        for tag in page.tags.values():
            if tag.valuebytecount > inline:  # the value is stored outside the IFD entry
                ifd.append((tag.valueoffset, tag.valueoffset + tag.valuebytecount))
                if tag.code == 347:
                    tables = (tag.valueoffset, tag.valueoffset + tag.valuebytecount)
        return Level0(
            data,
            int(page.imagelength),
            int(page.imagewidth),
            int(page.tilelength),
            int(page.tilewidth),
            np.asarray(page.dataoffsets, dtype=np.int64),
            np.asarray(page.databytecounts, dtype=np.int64),
            ifd,
            tables,
        )


def _jpeg_marks(stream: bytes) -> tuple[list[tuple[int, bool]], int, int]:
    """Markers of a JPEG stream's header: [(position, has a length field)], scan start, EOI position."""
    marks = [(0, False)]
    i = 2
    while i + 4 <= len(stream) and stream[i] == 0xFF:
        marker = stream[i + 1]
        if marker == 0xFF:
            i += 1
            continue
        marks.append((i, True))
        i += 2 + int.from_bytes(stream[i + 2 : i + 4], "big")
        if marker == 0xDA:
            break
    eoi = len(stream) - 2
    if stream[eoi:] == b"\xff\xd9":
        marks.append((eoi, False))
    return marks, i, eoi


#: Mutations whose damage the file structure reveals: it must be flagged (or an error),
#: never a silent change of pixels.
STRUCTURAL = ("marker_flip", "marker_overwrite", "zero_tile", "truncate", "tables_flip")
#: Mutations that may leave a valid JPEG stream that decodes to other pixels (JPEG has no
#: checksum; a flipped quantisation or Huffman table value is still a valid table): the
#: TIFF tiles they touch may change silently -- unless an independent decoder
#: (imagecodecs' libjpeg-turbo) rejects the stream: then the damage is structural after
#: all and must be flagged. ``ifd_flip`` may move tiles or change the image's layout.
UNDETECTABLE = ("scan_flip", "header_flip", "ifd_flip")


def _flip(buf: bytearray, pos: int, rng: np.random.Generator) -> None:
    buf[pos] ^= 1 << int(rng.integers(8))


def _mutate(kind: str, lv: Level0, rng: np.random.Generator) -> tuple[bytes, set[int] | None, str]:
    """A mutant of ``lv.data``: (bytes, indices of the level-0 TIFF tiles it touched, description).

    The touched set is None when the mutation hit the file structure (IFD, tables):
    the caller then works out from the mutant what changed.
    """
    buf = bytearray(lv.data)
    tiles = np.flatnonzero(lv.counts > 0)
    t = int(rng.choice(tiles))
    off, cnt = int(lv.offsets[t]), int(lv.counts[t])
    marks, scan_start, eoi = _jpeg_marks(lv.data[off : off + cnt])
    if kind == "scan_flip":
        pos = int(rng.integers(scan_start, eoi))
        _flip(buf, off + pos, rng)
        return bytes(buf), {t}, f"tile {t} scan byte {pos}"
    if kind == "header_flip":
        pos = int(rng.integers(0, scan_start))
        _flip(buf, off + pos, rng)
        return bytes(buf), {t}, f"tile {t} header byte {pos}"
    if kind == "marker_flip":
        pos, has_length = marks[int(rng.integers(len(marks)))]
        byte = pos + int(rng.integers(4 if has_length else 2))
        _flip(buf, off + byte, rng)
        return bytes(buf), {t}, f"tile {t} header byte {byte} (marker at {pos})"
    if kind == "marker_overwrite":
        pos, _ = marks[int(rng.integers(len(marks)))]
        new = bytes(lv.data[off + pos : off + pos + 2])
        while new == lv.data[off + pos : off + pos + 2]:
            new = rng.integers(0, 256, 2, dtype=np.uint8).tobytes()
        buf[off + pos : off + pos + 2] = new
        return bytes(buf), {t}, f"tile {t} marker at {pos} -> {new.hex()}"
    if kind == "zero_tile":
        buf[off : off + cnt] = bytes(cnt)
        return bytes(buf), {t}, f"tile {t} zeroed"
    if kind == "truncate":
        size = int(rng.integers(1, len(buf)))
        touched = set(np.flatnonzero(lv.offsets + lv.counts > size).tolist())
        return bytes(buf[:size]), touched, f"truncated to {size} of {len(buf)} bytes"
    if kind == "ifd_flip":
        sizes = np.array([b - a for a, b in lv.ifd])
        r = int(rng.choice(len(lv.ifd), p=sizes / sizes.sum()))
        pos = int(rng.integers(*lv.ifd[r]))
        _flip(buf, pos, rng)
        return bytes(buf), None, f"IFD/tag byte {pos}"
    if kind == "tables_flip":
        assert lv.tables is not None
        start, stop = lv.tables
        tmarks, _, _ = _jpeg_marks(lv.data[start:stop])
        tmarks.append((stop - start - 2, False))  # the tables' own EOI
        pos, has_length = tmarks[int(rng.integers(len(tmarks)))]
        byte = pos + int(rng.integers(4 if has_length else 2))
        _flip(buf, start + byte, rng)
        return bytes(buf), None, f"JPEGTables byte {byte} (marker at {pos})"
    raise AssertionError(kind)


def _tiles_touching(lv: Level0, touched: set[int], shape: tuple[int, int], tile: int = 64) -> np.ndarray:
    """Bool (tile_y, tile_x): 64-px tiles with any pixel in one of the ``touched`` TIFF tiles."""
    grid_w = lv.grid[1]
    hit = np.zeros(shape, dtype=bool)
    for t in touched:
        row, col = divmod(int(t), grid_w)
        y0, y1 = row * lv.seg_h // tile, -(-(row + 1) * lv.seg_h // tile)
        x0, x1 = col * lv.seg_w // tile, -(-(col + 1) * lv.seg_w // tile)
        hit[y0:y1, x0:x1] = True
    return hit


def _same(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Elementwise equality where NaN equals NaN."""
    return (a == b) | (np.isnan(a) & np.isnan(b))


@dataclass
class Verdict:
    category: str  # crash | error | exact | flagged | silent | silent+rejected | changed-layout
    problems: list[str] = field(default_factory=list)
    silent_tiles: int = 0


def _judge(kind: str, name: str, touched: set[int] | None, lv: Level0, clean: dict, clean_describe: dict, report: dict, npz: Path) -> Verdict:
    """Check one mutant's outcome against the clean file's (see the module docstring)."""
    if report["status"] != "exit" or report.get("code") != 0:
        return Verdict("crash", [f"{report['status']} {report.get('signal', report.get('code', ''))}: {report['stderr'][-800:]}"])
    outcome = report["outcome"]
    if outcome is None or outcome["kind"] == "unexpected":
        return Verdict("crash", [f"not a WsiXrError: {outcome}"])
    if outcome["kind"] == "error":
        if name not in outcome["message"] or "\n" in outcome["message"].strip():
            return Verdict("error", [f"error message does not name {name} on one line: {outcome['message']!r}"])
        return Verdict("error")
    rejected = set(outcome["rejected"]) if isinstance(outcome.get("rejected"), list) else set()
    # A decoder rejecting a damaged *header* means the damage was structural; a decoder
    # rejecting damaged *scan data* (e.g. a flip that makes FF00 a marker) cannot be seen
    # without reading every byte of every tile, which the integrity check does not do.
    strict = set(touched or ()) if kind in STRUCTURAL else rejected if kind == "header_flip" else set()
    if kind == "tables_flip":
        touched = strict = set(range(len(lv.offsets)))  # every tile decodes through the tables
    elif touched is None:  # the IFD was hit: see what tifffile makes of the mutant
        described = outcome.get("tifffile", {})
        if described.get("signature") != clean_describe["signature"]:
            got = np.load(npz)
            if got["tile_variance"].shape != clean["tile_variance"].shape:
                return Verdict("changed-layout")
            silent = int((~_same(got["tile_variance"], clean["tile_variance"]) & ~got["read_error"]).sum())
            return Verdict("changed-layout", silent_tiles=silent)
        else:
            before = zip(clean_describe["offsets"], clean_describe["counts"])
            after = list(zip(described["offsets"], described["counts"]))
            touched = {i for i, pair in enumerate(before) if i >= len(after) or after[i] != pair}
    got = np.load(npz)
    var, err, mask, latent = got["tile_variance"], got["read_error"], got["tile_mask"], got["latent"]
    if var.shape != clean["tile_variance"].shape:
        return Verdict("silent", [f"tile grid {var.shape} differs from the clean file's {clean['tile_variance'].shape}"])
    problems = []
    damaged = _tiles_touching(lv, touched, var.shape)
    k = 4  # patch / tile: the patch statistic of a damaged tile's neighbours changes too
    patches = np.zeros((-(-var.shape[0] // k), -(-var.shape[1] // k)), dtype=bool)
    for i, j in zip(*np.nonzero(damaged)):
        patches[i // k, j // k] = True
    near = np.repeat(np.repeat(patches, k, axis=0), k, axis=1)[: var.shape[0], : var.shape[1]]
    same_var = _same(var, clean["tile_variance"])
    if not same_var[~damaged].all():
        problems.append(f"{int((~same_var & ~damaged).sum())} tiles outside the damaged TIFF tiles changed variance")
    if (err & ~damaged).any():
        problems.append(f"{int((err & ~damaged).sum())} tiles flagged outside the damaged TIFF tiles")
    if (mask & err).any() or not np.isnan(latent[err]).all():
        problems.append("a flagged tile was scored as tissue or encoded")
    if not (mask == clean["tile_mask"])[~near].all():
        problems.append("tile_mask differs outside the patches of the damaged TIFF tiles")
    far = ~near
    difference = np.abs(np.where(far[..., None], latent, 0) - np.where(far[..., None], clean["latent"], 0))
    same_nan = np.array_equal(np.isnan(latent) & far[..., None], np.isnan(clean["latent"]) & far[..., None])
    if not same_nan or not (np.nan_to_num(difference) <= clean["latent_tolerance"]).all():  # float32 rounding
        problems.append("latents differ outside the patches of the damaged TIFF tiles")
    silent = damaged & ~err & ~same_var
    invalid = _tiles_touching(lv, strict, var.shape)
    if (silent & invalid).any():
        problems.append(
            f"{int((silent & invalid).sum())} tiles changed silently (not in read_error) in TIFF tiles "
            f"{sorted(strict)[:8]} whose damage is structural (or that a JPEG decoder rejects)"
        )
    if kind in ("zero_tile", "truncate") and not err[damaged].all():
        problems.append(f"{int((damaged & ~err).sum())} tiles of missing/zeroed TIFF data are not flagged")
    category = "silent" if silent.any() else "flagged" if err.any() else "exact"
    if category == "silent" and (silent & _tiles_touching(lv, rejected, var.shape)).any():
        category = "silent+rejected"  # a decoder would refuse the tile, wsi_xr scored its pixels
    return Verdict(category, problems, int(silent.sum()))


KINDS = ("scan_flip", "header_flip", "marker_flip", "marker_overwrite", "zero_tile", "truncate", "ifd_flip", "tables_flip")


@pytest.fixture(scope="module")
def vae_weights(weights: Path) -> Path:
    """A randomly initialised VAE2 (the fuzz and fault tests need a model, not a trained one)."""
    return weights


def test_fuzzed_slides_never_crash_and_never_lie(tmp_path: Path, vae_weights: Path) -> None:
    from wsi_xr.datasets.synth import write_synthetic_slide

    synth = tmp_path / "synth.tif"
    write_synthetic_slide(synth, 1024, 768, seed=11, progress=False)
    sources = {"cmu": data_file("cmu-1-small-region.svs"), "synth": synth}
    layouts = {name: _level0(path) for name, path in sources.items()}
    work = tmp_path / "work"
    work.mkdir()
    clean_jobs = [{"id": f"clean-{n}", "path": str(p), "out": str(work / f"clean-{n}.npz"), "describe": True} for n, p in sources.items()]
    reports = _run_fuzz_jobs(clean_jobs, vae_weights, work)
    clean, described = {}, {}
    for n in sources:
        rep = reports[f"clean-{n}"]
        assert rep["status"] == "exit" and rep["outcome"]["kind"] == "result", rep
        clean[n] = dict(np.load(work / f"clean-{n}.npz"))
        clean[n]["latent_tolerance"] = latent_tolerance(sources[n], vae_weights, clean[n]["tile_mask"])  # float32 rounding
        described[n] = rep["outcome"]["tifffile"]
        assert not clean[n]["read_error"].any() and clean[n]["tile_mask"].sum() > 10

    assert sorted(KINDS) == sorted(STRUCTURAL + UNDETECTABLE)
    counts: Counter = Counter()
    by_kind: Counter = Counter()
    silent_tiles = 0
    failures = []
    batch = 48
    for start in range(0, FUZZ_COUNT, batch):
        mutants, jobs = {}, []
        for i in range(start, min(FUZZ_COUNT, start + batch)):
            name = ("cmu", "synth")[i % 2]
            lv = layouts[name]
            kinds = KINDS if lv.tables is not None else KINDS[:-1]
            kind = kinds[(i // 2) % len(kinds)]
            data, touched, note = _mutate(kind, lv, np.random.default_rng([FUZZ_SEED, i]))
            path = work / f"m{i:05d}-{name}-{kind}{sources[name].suffix}"
            path.write_bytes(data)
            mutants[f"m{i}"] = (name, kind, touched, note, path)
            job = {"id": f"m{i}", "path": str(path), "out": str(work / f"m{i}.npz"), "describe": touched is None}
            if touched and kind not in STRUCTURAL:  # ask a decoder which touched tiles are invalid JPEG
                segments = [(t, int(lv.offsets[t]), int(lv.counts[t])) for t in sorted(touched)]
                job["oracle"] = {"segments": segments, "tables": list(lv.tables) if lv.tables else None}
            jobs.append(job)
        reports = _run_fuzz_jobs(jobs, vae_weights, work)
        for mid, (name, kind, touched, note, path) in mutants.items():
            verdict = _judge(kind, path.name, touched, layouts[name], clean[name], described[name], reports[mid], work / f"{mid}.npz")
            counts[verdict.category] += 1
            by_kind[(kind, verdict.category)] += 1
            silent_tiles += verdict.silent_tiles
            if verdict.problems:
                failures.append(f"{mid} {name} {kind} ({note}): {verdict.category}: {'; '.join(verdict.problems)}")
            for suffix in ("", ".json", ".stderr"):
                Path(str(work / f"{mid}.npz") + suffix).unlink(missing_ok=True)
            path.unlink()
    lines = [
        f"fuzz: {FUZZ_COUNT} mutants (seed {FUZZ_SEED}): " + ", ".join(f"{c} {n}" for c, n in sorted(counts.items())),
        "  (error: a WsiXrError naming the file; exact: same as the clean file; flagged: damaged tiles in "
        "read_error, all else the same; silent: a still-valid JPEG tile decoded to other pixels, all else "
        "the same; silent+rejected: the same, but a decoder refuses the tile (damaged entropy-coded data); "
        "changed-layout: an IFD flip made another image)",
    ]
    for kind in KINDS:
        row = {c: n for (k, c), n in by_kind.items() if k == kind}
        if row:
            lines.append(f"  {kind:<17} " + ", ".join(f"{c} {n}" for c, n in sorted(row.items())))
    lines.append(f"  tiles changed silently inside mutated TIFF tiles: {silent_tiles}")
    print("\n".join(lines))
    assert not failures, f"{len(failures)} of {FUZZ_COUNT} mutants misbehaved:\n" + "\n".join(failures[:30]) + "\n" + "\n".join(lines)


# =========================================================================== bad input
#
# Every CLI command and public function, given a bad file or an absurd argument, must
# fail with one line naming the problem (CLI: exit 2, "wsi-xr CMD: error: ..." on
# stderr, no traceback), never a signal, and must leave nothing behind that could pass
# for output.


@pytest.fixture(scope="module")
def bad(tmp_path_factory: pytest.TempPathFactory, vae_weights: Path) -> dict[str, Path]:
    """Bad inputs of every kind, and a few good ones to combine them with."""
    import torch

    folder = tmp_path_factory.mktemp("bad-inputs")
    cmu = data_file("cmu-1-small-region.svs")
    (folder / "folder.svs").mkdir()
    (folder / "empty.svs").write_bytes(b"")
    (folder / "notes.svs").write_text("these are not the pixels you are looking for\n" * 20)
    (folder / "truncated.svs").write_bytes(cmu.read_bytes()[:1_000_000])  # the IFDs are at the end
    (folder / "a-file").write_text("a regular file, not a folder")
    torch.manual_seed(0)
    torch.save(torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.Linear(8, 2)).state_dict(), folder / "other-model.pt")
    (folder / "truncated-vae.pt").write_bytes(vae_weights.read_bytes()[:5000])
    store = folder / "good.zarr"
    done = subprocess.run(
        CLI + ["mask", str(cmu), str(store), "--threshold", "60", "--coarse", "none", "--quiet"], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    return {
        "missing": folder / "missing.svs",
        "directory": folder / "folder.svs",
        "empty": folder / "empty.svs",
        "text": folder / "notes.svs",
        "truncated": folder / "truncated.svs",
        "damaged": data_file("bad/corrupt-jpeg-tile.svs"),
        "unsupported": data_file("bad/unknown-compression.tiff"),
        "cmu": cmu,
        "file": folder / "a-file",
        "other-model": folder / "other-model.pt",
        "truncated-vae": folder / "truncated-vae.pt",
        "weights": vae_weights,
        "store": store,
    }


BAD_SLIDES = ("missing", "directory", "empty", "text", "truncated", "unsupported")

#: (command line, what the error must name). ``{X}`` is an input from :func:`bad`,
#: ``{out}`` a fresh empty folder that must stay empty. Every bad slide goes through the
#: same probe in every command, and the public-function tests below try each on each
#: function; here every kind meets two or more commands, and every command its own
#: absurd arguments -- each call costs a Python start (~1-3 s).
_SLIDE_COMMANDS = {
    "info {slide}": ("missing", "directory", "empty", "text"),
    "mask {slide} {out}/o.zarr --threshold 60 --quiet": ("text", "truncated", "unsupported"),
    "run {slide} {out}/o.zarr --weights {weights} --scheduler threads --quiet": ("empty", "unsupported"),
    "train {slide} --out {out}/w.pt --epochs 1 --max-tiles 16 --quiet": ("truncated",),
    "bench {slide} --repeat 1 --chunks 256 --out {out}/b.json": ("missing", "directory"),
}
CLI_CASES = [(cmd.replace("{slide}", "{" + kind + "}"), "{" + kind + "}") for cmd, kinds in _SLIDE_COMMANDS.items() for kind in kinds] + [
    ("plot {missing} --out {out}/p.png", "{missing}"),
    ("plot {file} --out {out}/p.png", "{file}"),
    ("plot {store} --slide {text} --out {out}/p.png", "{text}"),
    ("plot {store} --out /proc/p.png", "/proc"),
    ("mask {cmu} {out}/o.zarr --tile 0", "--tile"),
    ("mask {cmu} {out}/o.zarr --patch 100", "patch=100"),
    ("mask {cmu} {out}/o.zarr --chunk 128", "patch=256"),
    ("mask {cmu} {out}/o.zarr --threshold -5", "threshold=-5"),
    ("mask {cmu} /proc/o.zarr --quiet", "/proc"),
    ("run {cmu} {out}/o.zarr --tile 32 --weights {weights}", "tile=32"),  # with the default LocalCluster
    ("run {cmu} /proc/o.zarr --weights {weights} --scheduler threads --quiet", "/proc/o.zarr"),
    ("run {cmu} {out}/o.zarr --weights {other-model} --scheduler threads --quiet", "{other-model}"),
    ("run {cmu} --weights {weights}", "OUT.zarr"),
    ("train {cmu} --out /proc/w.pt --epochs 1 --max-tiles 16 --quiet", "/proc"),
    ("plot-recon {other-model} {cmu} --out {out}/r.png", "{other-model}"),
    ("plot-recon {missing} {cmu} --out /proc/r.png", "/proc"),
    ("bench {cmu} --chunks 0", "--chunks"),
    ("bench {cmu} --repeat 1 --chunks 1024 --out /proc/b.json", "/proc/b.json"),
]


def _fill(template: str, inputs: dict[str, Path], out: Path) -> str:
    text = template.replace("{out}", str(out))
    for key, path in inputs.items():
        text = text.replace("{" + key + "}", str(path))
    return text


def _check_cli_error(argv: list[str], run: subprocess.CompletedProcess, name: str) -> list[str]:
    """Problems with how a failing command ended (empty: it failed as it should)."""
    command = argv[0]
    problems = []
    if run.returncode != 2:
        problems.append(f"exit code {run.returncode} (want 2)")
    if "Traceback" in run.stderr:
        problems.append("a traceback on stderr")
    lines = [line for line in run.stderr.splitlines() if line.strip()]
    errors = [i for i, line in enumerate(lines) if line.startswith(f"wsi-xr {command}: error: ")]
    # before the error line, only argparse's usage or the dashboard link of a started cluster
    before = lines[: errors[0]] if errors else []
    if len(errors) != 1 or errors[0] != len(lines) - 1:
        problems.append("stderr does not end in one 'wsi-xr CMD: error:' line")
    elif before and not (before[0].startswith("usage:") or (len(before) == 1 and before[0].startswith("Dask dashboard:"))):
        problems.append("stderr holds more than the error line")
    elif name not in lines[-1]:
        problems.append(f"the error does not name {name!r}")
    return problems


def test_cli_rejects_bad_input_everywhere(bad: dict[str, Path], tmp_path: Path) -> None:
    from concurrent.futures import ThreadPoolExecutor

    def one(index: int, template: str, name_template: str) -> str | None:
        out = tmp_path / f"case-{index}"
        out.mkdir()
        argv = _fill(template, bad, out).split()
        name = _fill(name_template, bad, out)
        start = time.monotonic()
        run = subprocess.run(CLI + argv, capture_output=True, text=True, timeout=300, cwd=out, env=env)
        print(f"{time.monotonic() - start:5.1f} s  {template}")
        problems = _check_cli_error(argv, run, name)
        left = sorted(p.name for p in out.iterdir())
        if left:
            problems.append(f"left output behind: {left}")
        if problems:
            return f"wsi-xr {' '.join(argv)}\n    -> {'; '.join(problems)}\n    stderr: {run.stderr.strip()[-600:]}"
        return None

    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # several at once: no torch thread pools fighting over the cores
    slow_first = sorted(enumerate(CLI_CASES), key=lambda case: case[1][0].split()[0] not in ("run", "plot-recon", "train"))
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        results = list(pool.map(lambda case: one(case[0], *case[1]), slow_first))
    failures = [r for r in results if r]
    assert not failures, f"{len(failures)} of {len(CLI_CASES)} commands mishandled bad input:\n" + "\n".join(failures)


def test_cli_reports_damaged_tiles_instead_of_failing(bad: dict[str, Path], tmp_path: Path) -> None:
    """A slide with a damaged tile is not an error: the mask says so (read errors), exit 0."""
    out = tmp_path / "m.zarr"
    run = subprocess.run(CLI + ["mask", str(bad["damaged"]), str(out), "--threshold", "60", "--quiet"], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and "Traceback" not in run.stderr, run.stderr
    assert "(1 damaged TIFF tiles)" in run.stdout
    import xarray as xr

    assert xr.open_zarr(out).attrs["damaged_file_tiles"] == 1


#: public function -> how to call it with a slide (or weights) path and an output folder
PUBLIC = {
    "open_slide": lambda path, out, b: wsi_xr.open_slide(path),
    "open_pyramid": lambda path, out, b: wsi_xr.open_pyramid(path),
    "tissue_mask": lambda path, out, b: wsi_xr.tissue_mask(wsi_xr.open_slide(path), threshold=60.0),
    "process_slide": lambda path, out, b: wsi_xr.process_slide(path, out / "o.zarr", weights=b["weights"], progress=False),
    "load_vae": lambda path, out, b: wsi_xr.load_vae(path),
}


@pytest.mark.parametrize(
    ("function", "kind"),
    [(f, k) for f in sorted(PUBLIC) for k in BAD_SLIDES] + [("load_vae", "other-model"), ("load_vae", "truncated-vae")],
)
def test_public_functions_reject_bad_files(function: str, kind: str, bad: dict[str, Path], tmp_path: Path) -> None:
    path = bad[kind]
    with pytest.raises(wsi_xr.WsiXrError) as caught:
        PUBLIC[function](path, tmp_path, bad)
    message = str(caught.value)
    print(f"{function}({kind}): {type(caught.value).__name__}: {message}")
    assert path.name in message and "\n" not in message.strip(), message
    assert not any(tmp_path.iterdir()), "a failed call left output behind"


#: (call, what the message must mention) with absurd arguments on a good slide
ABSURD = {
    "chunks 0": (lambda b, out: wsi_xr.open_slide(b["cmu"], chunks=0), "chunks=0"),
    "chunks (256, -5)": (lambda b, out: wsi_xr.open_slide(b["cmu"], chunks=(256, -5)), "chunks="),
    "level 5": (lambda b, out: wsi_xr.open_slide(b["cmu"], level=5), "level=5"),
    "backend gpu": (lambda b, out: wsi_xr.open_slide(b["cmu"], backend="gpu"), "backend='gpu'"),
    "device tpu": (lambda b, out: wsi_xr.open_pyramid(b["cmu"], device="tpu"), "device='tpu'"),
    "tile 0": (lambda b, out: wsi_xr.tissue_mask(wsi_xr.open_slide(b["cmu"]), tile=0), "tile=0"),
    "patch 100": (lambda b, out: wsi_xr.tissue_mask(wsi_xr.open_slide(b["cmu"]), patch=100), "patch=100"),
    "chunk < patch": (lambda b, out: wsi_xr.tissue_mask(wsi_xr.open_slide(b["cmu"], chunks=128)), "patch=256"),
    "threshold -1": (lambda b, out: wsi_xr.tissue_mask(wsi_xr.open_slide(b["cmu"]), threshold=-1.0), "threshold=-1"),
    "threshold nan": (lambda b, out: wsi_xr.tissue_mask(wsi_xr.open_slide(b["cmu"]), threshold=float("nan")), "threshold=nan"),
    "threshold otsu": (lambda b, out: wsi_xr.tissue_mask(wsi_xr.open_slide(b["cmu"]), threshold="otsu"), "threshold='otsu'"),
    "coarse level 7": (lambda b, out: wsi_xr.tissue_mask(wsi_xr.open_slide(b["cmu"]), coarse=7), "coarse=7"),
    "pipeline tile 32": (lambda b, out: wsi_xr.process_slide(b["cmu"], out / "o.zarr", weights=b["weights"], tile=32, patch=128), "tile=32"),
    "pipeline chunk 100": (lambda b, out: wsi_xr.process_slide(b["cmu"], out / "o.zarr", weights=b["weights"], chunks=100), "100"),
    "pipeline batch 0": (lambda b, out: wsi_xr.process_slide(b["cmu"], out / "o.zarr", weights=b["weights"], batch_size=0), "batch_size=0"),
    "pipeline threshold -1": (lambda b, out: wsi_xr.process_slide(b["cmu"], out / "o.zarr", weights=b["weights"], threshold=-1.0), "threshold=-1"),
    "pipeline level 3": (lambda b, out: wsi_xr.process_slide(b["cmu"], out / "o.zarr", weights=b["weights"], level=3), "level=3"),
    "store in /proc": (lambda b, out: wsi_xr.process_slide(b["cmu"], "/proc/o.zarr", weights=b["weights"], progress=False), "/proc/o.zarr"),
    "store under a file": (lambda b, out: wsi_xr.process_slide(b["cmu"], b["file"] / "o.zarr", weights=b["weights"], progress=False), "a-file"),
    "store is a file": (lambda b, out: wsi_xr.process_slide(b["cmu"], b["file"], weights=b["weights"], progress=False), "a-file"),
    "weights of another model": (lambda b, out: wsi_xr.process_slide(b["cmu"], out / "o.zarr", weights=b["other-model"]), "other-model.pt"),
    "a slide as weights": (lambda b, out: wsi_xr.process_slide(b["cmu"], out / "o.zarr", weights=b["cmu"]), "cmu-1-small-region.svs"),
    "weights on cuda:7": (lambda b, out: wsi_xr.load_vae(b["weights"], device="cuda:7"), "cuda:7"),
}


@pytest.mark.parametrize("case", sorted(ABSURD))
def test_public_functions_reject_absurd_arguments(case: str, bad: dict[str, Path], tmp_path: Path) -> None:
    call, mention = ABSURD[case]
    with pytest.raises(wsi_xr.WsiXrError) as caught:
        call(bad, tmp_path)
    message = str(caught.value)
    print(f"{case}: {type(caught.value).__name__}: {message}")
    assert mention in message and "\n" not in message.strip(), message
    assert not any(tmp_path.iterdir()), "a failed call left output behind"
    assert bad["file"].is_file() and bad["file"].read_text().startswith("a regular file")


# ===================================================================== faults during a run

RUN_OPTIONS = {"chunks": 256, "coarse": "none", "threshold": THRESHOLD, "progress": False}


@pytest.fixture(scope="module")
def run_slide(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 3072 x 3072 synthetic slide: 144 chunks of 256 px, long enough to interrupt."""
    from wsi_xr.datasets.synth import write_synthetic_slide

    path = tmp_path_factory.mktemp("fault") / "fault-3072.tif"
    write_synthetic_slide(path, 3072, 3072, seed=21, tissue_fraction=0.5, progress=False)
    return path


@pytest.fixture(scope="module")
def reference(run_slide: Path, vae_weights: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, np.ndarray]:
    """The uninterrupted run (dask's threaded scheduler), as arrays."""
    import dask

    store = tmp_path_factory.mktemp("fault-ref") / "reference.zarr"
    with dask.config.set(scheduler="threads"):
        ds = wsi_xr.process_slide(run_slide, store, weights=vae_weights, **RUN_OPTIONS).compute()
    assert ds.wsi.attrs["complete"] is True and ds.attrs["tissue_tiles"] > 300
    arrays = {name: ds[name].values for name in ("tile_mask", "tile_variance", "patch_mask", "read_error", "latent")}
    return {**arrays, "latent_tolerance": latent_tolerance(run_slide, vae_weights, ds.tile_mask.values)}


def _done_chunks(store: Path) -> int:
    """Chunks marked done in ``store`` (every chunk of chunk_done is stored from the start: read the flags)."""
    from wsi_xr.store import chunks_done

    try:
        return chunks_done(store)
    except Exception:  # the store is being created: nothing done yet
        return 0


def _same_as_reference(store: Path, reference: dict[str, np.ndarray]) -> None:
    import xarray as xr

    ds = xr.open_zarr(store, consolidated=False).compute()
    assert ds.wsi.attrs["complete"] is True
    for name in ("tile_mask", "patch_mask", "read_error"):
        np.testing.assert_array_equal(ds[name].values, reference[name], err_msg=name)
    np.testing.assert_array_equal(ds.tile_variance.values, reference["tile_variance"])
    assert_latents_agree(ds.latent.values, reference["latent"], reference["latent_tolerance"], "latents after recovery")


def _run_in_thread(**kwargs) -> tuple[threading.Thread, dict]:
    result: dict = {}

    def target() -> None:
        try:
            result["ds"] = wsi_xr.process_slide(**kwargs)
        except BaseException as err:
            result["error"] = err

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread, result


def _wait_for_chunks(store: Path, n: int, thread: threading.Thread, timeout: float = 180) -> int:
    deadline = time.monotonic() + timeout
    while _done_chunks(store) < n and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.02)
    done = _done_chunks(store)
    assert thread.is_alive() and done >= n, f"the run ended (or stalled) before {n} chunks were done ({done})"
    return done


def test_worker_killed_mid_run_still_gives_identical_results(run_slide: Path, vae_weights: Path, reference: dict, tmp_path: Path) -> None:
    distributed = pytest.importorskip("distributed")
    store = tmp_path / "killed-worker.zarr"
    with (
        distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster,
        distributed.Client(cluster) as client,
    ):
        pids = client.run(os.getpid)
        assert len(pids) == 2
        thread, result = _run_in_thread(path=run_slide, store=store, weights=vae_weights, client=client, **RUN_OPTIONS)
        done_at_kill = _wait_for_chunks(store, 12, thread)
        victim = sorted(pids.values())[0]
        os.kill(victim, signal.SIGKILL)
        thread.join(timeout=300)
        assert not thread.is_alive(), "the run hung after a worker was killed"
        assert "error" not in result, f"the run failed after a worker was killed: {result.get('error')!r}"
        survivors = set(client.run(os.getpid).values())
        assert victim not in survivors, "the killed worker is still there"
    print(f"killed worker {victim} after {done_at_kill}/144 chunks; the run completed on the others")
    assert done_at_kill < 144
    _same_as_reference(store, reference)


def _block_with_a_file(folder: Path, moved: Path) -> None:
    """Put a file where ``folder`` was; chunks the run writes meanwhile (it recreates the folder) join ``moved``."""
    for attempt in range(100):
        try:
            folder.write_text("in the way")
            return
        except IsADirectoryError:
            late = moved.parent / f"late-{attempt}"
            os.replace(folder, late)
            for chunk in sorted(p for p in late.rglob("*") if p.is_file()):
                target = moved / chunk.relative_to(late)
                target.parent.mkdir(parents=True, exist_ok=True)
                os.replace(chunk, target)
    raise AssertionError(f"{folder} kept coming back")


def test_store_unwritable_mid_run_is_a_clear_error_and_resumable(run_slide: Path, vae_weights: Path, reference: dict, tmp_path: Path) -> None:
    """The latent array's chunk folder turns into a file mid-run (permissions do not stop root)."""
    import dask
    import xarray as xr

    store = tmp_path / "unwritable.zarr"
    with dask.config.set(scheduler="threads"):
        thread, result = _run_in_thread(path=run_slide, store=store, weights=vae_weights, **RUN_OPTIONS)
        _wait_for_chunks(store, 6, thread)
        chunks_dir = store / "latent" / "c"
        moved = tmp_path / "latent-chunks"
        os.replace(chunks_dir, moved)
        _block_with_a_file(chunks_dir, moved)
        thread.join(timeout=300)
    assert not thread.is_alive()
    err = result.get("error")
    assert isinstance(err, wsi_xr.StoreError), f"want a StoreError, got {err!r}"
    assert str(store) in str(err) and "not marked complete" in str(err)
    assert xr.open_zarr(store, consolidated=False).wsi.attrs["complete"] is False
    assert not (store.parent / f".{store.name}.lock").exists(), "the lock outlived the failed run"
    # the fault fixed, the same call finishes the job, and nothing differs
    chunks_dir.unlink()
    os.replace(moved, chunks_dir)
    with dask.config.set(scheduler="threads"):
        wsi_xr.process_slide(run_slide, store, weights=vae_weights, **RUN_OPTIONS)
    _same_as_reference(store, reference)


def _can_mount_tmpfs(where: Path) -> bool:
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    where.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "wsi-xr-test", str(where)], capture_output=True)
    return done.returncode == 0


def test_full_disk_mid_run_is_a_clear_error_and_resumable(run_slide: Path, vae_weights: Path, reference: dict, tmp_path: Path) -> None:
    """A store on a tiny tmpfs fills up mid-run (needs root and mount; skipped otherwise)."""
    import dask
    import xarray as xr

    disk = tmp_path / "disk"
    if not _can_mount_tmpfs(disk):
        pytest.skip("mounting a small tmpfs needs root and a mount-capable sandbox")
    try:
        store = disk / "full.zarr"
        # creation stores every chunk of read_error and chunk_done (~1.2 MB in 4-KiB tmpfs pages), each
        # chunk task 3 more pages: 2200k fills about half-way through the chunks
        subprocess.run(["mount", "-o", "remount,size=2200k", str(disk)], check=True)
        with dask.config.set(scheduler="threads"), pytest.raises(wsi_xr.StoreError) as caught:
            wsi_xr.process_slide(run_slide, store, weights=vae_weights, **RUN_OPTIONS)
        message = str(caught.value)
        assert str(store) in message and ("No space left" in message or "space" in message.lower()), message
        assert 0 < _done_chunks(store) < 144, "the disk did not fill mid-run"
        assert xr.open_zarr(store, consolidated=False).wsi.attrs["complete"] is False
        subprocess.run(["mount", "-o", "remount,size=64m", str(disk)], check=True)  # space freed
        with dask.config.set(scheduler="threads"):
            wsi_xr.process_slide(run_slide, store, weights=vae_weights, **RUN_OPTIONS)
        _same_as_reference(store, reference)
    finally:
        subprocess.run(["umount", str(disk)], capture_output=True)


def test_second_run_on_a_busy_store_names_the_owner(run_slide: Path, vae_weights: Path, tmp_path: Path) -> None:
    import xarray as xr

    store = tmp_path / "busy.zarr"
    args = [
        "run",
        str(run_slide),
        str(store),
        "--weights",
        str(vae_weights),
        "--chunk",
        "256",
        "--coarse",
        "none",
        "--threshold",
        str(THRESHOLD),
        "--scheduler",
        "threads",
        "--quiet",
    ]
    first = subprocess.Popen(CLI + args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while _done_chunks(store) < 1 and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        first.send_signal(signal.SIGSTOP)  # hold it mid-run (alive, lock held) for as long as the checks take
        assert first.poll() is None and 0 < _done_chunks(store) < 144, "the first run was not caught mid-run"
        with pytest.raises(wsi_xr.StoreError, match=rf"in use by another wsi_xr run \(PID {first.pid} "):
            wsi_xr.process_slide(run_slide, store, weights=vae_weights, **RUN_OPTIONS)
        second = subprocess.run(CLI + args, capture_output=True, text=True, timeout=120)
        assert second.returncode == 2 and "Traceback" not in second.stderr, second.stderr
        assert second.stderr.strip().startswith("wsi-xr run: error: ") and f"PID {first.pid}" in second.stderr
        # the refusals left the first run's lock and store alone
        assert (store.parent / f".{store.name}.lock").read_text().split()[0] == str(first.pid)
        assert xr.open_zarr(store, consolidated=False).wsi.attrs["complete"] is False
    finally:
        first.kill()
        first.wait()


def test_cucim_backend_on_deflate_tiles_is_an_error_not_a_crash() -> None:
    """cuCIM segfaults opening a Deflate-tiled TIFF; asking for it must be refused first."""
    path = data_file("bad/deflate-tiled.tiff")
    with pytest.raises(wsi_xr.InvalidArgumentError, match="deflate-tiled.tiff.*cuCIM cannot read this file safely"):
        wsi_xr.open_slide(path, backend="cucim")
    with pytest.raises(wsi_xr.InvalidArgumentError, match="deflate-tiled.tiff"):
        wsi_xr.open_pyramid(path, backend="cucim")
    image = wsi_xr.open_slide(path)  # auto: the tifffile fallback reads it, in this very process
    assert image.attrs["backend"] == "tifffile"
    np.testing.assert_array_equal(image.values, tifffile.imread(path)[..., :3])
