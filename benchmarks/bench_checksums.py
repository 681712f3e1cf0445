"""What a store you can trust costs: chunk checksums, the check before ``complete``, the slide's identity.

    python -m benchmarks.bench_checksums [--sizes 16384,49152] [--rounds 2]

On the same synthetic 30%-tissue slides as ``bench_scale``, in fresh processes, alternated:

- ``process_slide`` as shipped (every chunk CRC32C-checksummed, everything written read back
  and checked before ``complete``, the slide's content fingerprint taken at the start and again
  before ``complete``), against the same call with the checksum codec left out, the
  read-back check skipped and no fingerprint (what 0.2.0 did): their ratio is the cost;
- ``verify_store`` on the finished store (``wsi-xr verify``);
- ``content_fingerprint`` of the slide, cold (first in a process) and warm.

Writes benchmarks/results/checksums.json and .md. Every figure names the CPU capability.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.common import markdown_table, save, synthetic_slide

MODULE = "benchmarks.bench_checksums"


def case_run(slide: str, store: str, checked: bool) -> dict[str, Any]:
    import importlib

    import dask

    import wsi_xr
    from wsi_xr.store import layout

    finalize_module = importlib.import_module("wsi_xr.pipeline.finalize")  # the module, not the function of that name

    if not checked:  # 0.2.0's stores: no checksum codec, no read-back before complete
        plain = layout.checksummed

        def without_crc() -> dict[str, Any]:
            settings = plain()
            settings["compressors"] = [c for c in settings["compressors"] if type(c).__name__ != "Crc32cCodec"]
            return settings

        layout.checksummed = without_crc  # type: ignore[assignment]
        finalize_module.check_written = lambda *args, **kwargs: []  # type: ignore[assignment]
        # and no content fingerprint (0.2.0 knew the slide by path, size and mtime)
        opened_module = importlib.import_module("wsi_xr.readers.opened")
        opened_module.content_fingerprint = finalize_module.content_fingerprint = lambda info: "unchecked"  # type: ignore[assignment]
    start = time.perf_counter()
    with dask.config.set(scheduler="threads"):
        ds = wsi_xr.process_slide(slide, store, overwrite=True, torch_threads="auto")
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "tissue_tiles": int(ds.attrs["tissue_tiles"])}


def case_verify(store: str) -> dict[str, Any]:
    from wsi_xr.pipeline.verify import verify_store

    start = time.perf_counter()
    report = verify_store(store)
    return {"seconds": time.perf_counter() - start, "ok": report.ok, "chunks_read": report.chunks_read}


def case_fingerprint(slide: str) -> dict[str, Any]:
    from wsi_xr.readers import probe
    from wsi_xr.readers.identity import content_fingerprint

    info = probe(slide)
    start = time.perf_counter()
    content_fingerprint(info)
    cold = time.perf_counter() - start
    start = time.perf_counter()
    content_fingerprint(info)
    return {"cold_s": cold, "warm_s": time.perf_counter() - start}


def _in_process(*args: str) -> dict[str, Any]:
    done = subprocess.run([sys.executable, "-m", MODULE, *args], capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--case")
    parser.add_argument("--slide")
    parser.add_argument("--store")
    parser.add_argument("--checked", type=int, default=1)
    parser.add_argument("--sizes", default="16384,49152")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    if args.case:
        cases = {
            "run": lambda: case_run(args.slide, args.store, bool(args.checked)),
            "verify": lambda: case_verify(args.store),
            "fingerprint": lambda: case_fingerprint(args.slide),
        }
        print(json.dumps(cases[args.case]()))
        return
    import torch

    capability = str(torch.backends.cpu.get_cpu_capability())
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-checksums-") as scratch:
        for size in [int(s) for s in args.sizes.split(",") if s]:
            slide = str(synthetic_slide(size, 0.3))
            fingerprint = _in_process("--case", "fingerprint", "--slide", slide)
            times: dict[bool, list[float]] = {True: [], False: []}
            for _ in range(args.rounds):
                for checked in (False, True):  # alternated, fresh processes
                    store = str(Path(scratch) / f"s{size}-{int(checked)}.zarr")
                    times[checked].append(_in_process("--case", "run", "--slide", slide, "--store", store, "--checked", str(int(checked)))["seconds"])
            verify = _in_process("--case", "verify", "--store", str(Path(scratch) / f"s{size}-1.zarr"))
            plain, checked = min(times[False]), min(times[True])
            rows.append(
                {
                    "size": size,
                    "cpu": capability,
                    "without_checks_s": round(plain, 2),
                    "with_checks_s": round(checked, 2),
                    "cost": round(checked / plain - 1, 4),
                    "runs": {"without": [round(t, 2) for t in times[False]], "with": [round(t, 2) for t in times[True]]},
                    "verify_s": round(verify["seconds"], 2),
                    "verify_ok": verify["ok"],
                    "verify_chunks": verify["chunks_read"],
                    "fingerprint_cold_s": round(fingerprint["cold_s"], 3),
                    "fingerprint_warm_s": round(fingerprint["warm_s"], 3),
                }
            )
    columns = ["size", "cpu", "without_checks_s", "with_checks_s", "cost", "verify_s", "verify_chunks", "fingerprint_cold_s", "fingerprint_warm_s"]
    note = (
        "process_slide with checksums, the read-back check and the identity fingerprint, against the same call without "
        f"checksums or read-back; fastest of {args.rounds} alternated fresh-process runs each. cost = with / without - 1."
    )
    save("checksums", {"rows": rows, "cpu": capability}, note + "\n\n" + markdown_table(rows, columns))


if __name__ == "__main__":
    main()
