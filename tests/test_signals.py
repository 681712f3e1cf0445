"""Batch schedulers send SIGTERM before SIGKILL; people press Ctrl-C. Either way ``wsi-xr run``
prints one line saying how many chunks are saved, exits 143 or 130, leaves no lock, and a
rerun says how many chunks it resumes from.

On 75c0752: SIGTERM ended with rc -15, no message and a lock file left behind; Ctrl-C
printed a ``distributed`` ``CancelledError`` traceback before ``interrupted``.
"""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import xarray as xr

from wsi_xr.datasets.synth import write_synthetic_slide

#: ``wsi-xr`` as a terminal's foreground job gets it: Ctrl-C raises KeyboardInterrupt. A process
#: started in the background (``pytest &``, ``nohup``, some CI runners) inherits SIGINT ignored,
#: and Python, like every POSIX program, keeps ignoring it in its children; so the run is
#: started with SIGINT's default handler put back, whatever this test process inherited.
CLI_WITH_CTRL_C = [
    sys.executable,
    "-c",
    "import signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); from wsi_xr.cli import main; sys.exit(main(sys.argv[1:]))",
]


@pytest.fixture(scope="module")
def slow_slide(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """8192², 30% tissue: 256 chunks of 512 px, a few seconds of work to interrupt."""
    path = tmp_path_factory.mktemp("signals") / "slow.tif"
    write_synthetic_slide(path, 8192, 8192, seed=5)
    return path


def _done_on_disk(store: Path) -> int:
    """Chunks marked done in ``store`` (every chunk of chunk_done is stored from the start: read the flags)."""
    from wsi_xr.store import chunks_done

    try:
        return chunks_done(store)
    except Exception:  # the store is being created: nothing done yet
        return 0


@pytest.mark.parametrize(
    ("sig", "code", "cluster"),
    [(signal.SIGINT, 130, []), (signal.SIGTERM, 143, ["--workers", "1"])],
    ids=["SIGINT-threads", "SIGTERM-LocalCluster"],
)
def test_interrupt_prints_one_line_and_a_rerun_resumes(
    slow_slide: Path, weights: Path, tmp_path: Path, sig: int, code: int, cluster: list[str]
) -> None:
    store = tmp_path / "s.zarr"
    # one slide runs on the threaded scheduler by default; --workers 1 starts a LocalCluster
    args = CLI_WITH_CTRL_C + ["run", str(slow_slide), str(store), "--weights", str(weights), "--chunk", "512", "--quiet", *cluster]
    run = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while _done_on_disk(store) < 8 and run.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert run.poll() is None, "the run ended before it could be interrupted"
    run.send_signal(sig)
    _, err = run.communicate(timeout=120)
    assert run.returncode == code, err
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith("Dask dashboard")]
    assert len(lines) == 1, err
    found = re.fullmatch(r"wsi-xr run: interrupted: (\d+) of 256 chunks saved; run the same command again to resume", lines[0])
    assert found, lines[0]
    assert "Traceback" not in err and "CancelledError" not in err
    assert not (tmp_path / ".s.zarr.lock").exists()
    saved = int(found.group(1))
    on_disk = _done_on_disk(store)
    assert 8 <= saved <= on_disk < 256  # work still in flight may finish after the count
    rerun = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    assert f"resuming: {on_disk} of 256 chunks already done" in rerun.stderr
    ds = xr.open_zarr(store, consolidated=False)
    assert ds.wsi.attrs["complete"] is True and bool(ds.chunk_done.all())
