"""Choosing where Dask runs: the local threaded scheduler, a LocalCluster, a
LocalCUDACluster, or an existing cluster by address. Imports only dask/distributed."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from typing import Any, Iterator

import dask
from dask.diagnostics import ProgressBar

log = logging.getLogger("wsi_xr")


def gpu_count() -> int:
    """Number of CUDA GPUs visible (0 without CuPy or without a GPU)."""
    try:
        import cupy

        return int(cupy.cuda.runtime.getDeviceCount())
    except Exception:
        return 0


@contextlib.contextmanager
def dask_client(
    scheduler: str | None = None,
    *,
    workers: int | None = None,
    threads_per_worker: int | None = None,
    processes: bool = False,
    cuda: bool | None = None,
) -> Iterator[Any]:
    """Yield a ``distributed.Client`` (or ``None`` for the local threaded scheduler).

    Parameters
    ----------
    scheduler
        ``"tcp://host:port"`` of an existing cluster, ``"threads"`` for dask's local
        threaded scheduler (no distributed, no dashboard), or None: a LocalCluster sized
        for this machine (a LocalCUDACluster, one worker per GPU, when GPUs and
        dask-cuda exist).
    workers, threads_per_worker, processes
        LocalCluster shape. Default: one worker holding a thread per core, in this
        process -- measured fastest here (benchmarks/RESULTS.md): cuCIM, NumPy and
        torch release the GIL, and threads share decoded blocks without copies.
    cuda
        Force (True) or forbid (False) a LocalCUDACluster; None decides by GPU count.
    """
    if scheduler == "threads":
        yield None
        return
    from distributed import Client, LocalCluster

    if scheduler:
        with Client(scheduler) as client:
            print(f"connected to {scheduler} (dashboard: {client.dashboard_link})", file=sys.stderr)
            yield client
        return
    if cuda is None:
        cuda = gpu_count() > 0
    if cuda:
        from dask_cuda import LocalCUDACluster

        cluster_cm: Any = LocalCUDACluster(threads_per_worker=threads_per_worker or 2, dashboard_address=":0")
    else:
        cluster_cm = LocalCluster(
            n_workers=workers or 1,
            threads_per_worker=threads_per_worker or (os.cpu_count() or 1),
            processes=processes,
            dashboard_address=":0",
        )
    with cluster_cm as cluster, Client(cluster) as client:
        print(f"Dask dashboard: {client.dashboard_link}", file=sys.stderr)
        yield client


def compute(*collections: Any, client: Any = None, progress: bool = True) -> tuple[Any, ...]:
    """Compute dask collections on ``client`` (or the threaded scheduler), with a progress bar."""
    if client is None:
        with dask.config.set(scheduler="threads"):
            if progress:
                with ProgressBar(minimum=1.0):
                    return dask.compute(*collections)
            return dask.compute(*collections)
    futures = client.compute(list(collections))
    if progress:
        from distributed import progress as show_progress

        show_progress(futures)
        print()
    return tuple(client.gather(futures))
