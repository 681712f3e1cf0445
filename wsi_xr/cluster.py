"""Choosing where Dask runs: the local threaded scheduler, a LocalCluster, a
LocalCUDACluster, or an existing cluster by address. Imports only dask/distributed."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from typing import Any

import dask
from dask.diagnostics import ProgressBar

from wsi_xr.errors import ClusterError

log = logging.getLogger("wsi_xr")


def check_scheduler_address(scheduler: str) -> None:
    """Raise :class:`ClusterError` unless ``scheduler`` is ``"threads"``, ``PROTOCOL://HOST:PORT`` or
    ``HOST:PORT`` (distributed then assumes tcp)."""
    if scheduler == "threads":
        return
    protocol, sep, rest = scheduler.rpartition("://")
    host, colon, port = rest.rpartition(":")
    if (sep and not protocol) or not host or not colon or not port.isdigit():
        raise ClusterError(
            f"--scheduler {scheduler!r}: give the address of a Dask scheduler as PROTOCOL://HOST:PORT "
            "(e.g. tcp://10.0.0.5:8786, as `dask scheduler` prints it), or 'threads' for the local threaded scheduler."
        )


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
        check_scheduler_address(scheduler)
        from dask.utils import parse_timedelta

        timeout = parse_timedelta(dask.config.get("distributed.comm.timeouts.connect"))  # dask's setting: 30 s unless changed
        try:
            client = Client(scheduler, timeout=timeout)
        except (OSError, TimeoutError) as err:
            raise ClusterError(
                f"could not connect to the Dask scheduler at {scheduler} within {timeout:g} s "
                f"({type(err).__name__}: {err}). Check that the scheduler is running (`dask scheduler` prints its "
                "address), that the host and port are right, and that this machine can reach it (firewall, VPN); "
                "or leave out --scheduler for a local cluster."
            ) from err
        with client:
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
        yield client


def compute(*collections: Any, client: Any = None, progress: bool = True) -> tuple[Any, ...]:
    """Compute dask collections on ``client`` (or the threaded scheduler), with a progress bar."""
    if client is None:
        # The threaded scheduler named by its function: named "threads", dask would first
        # import distributed (0.15-0.3 s of a small job) to look for a client it then ignores.
        import dask.threaded

        if progress:
            with ProgressBar(minimum=1.0):
                return dask.compute(*collections, scheduler=dask.threaded.get)
        return dask.compute(*collections, scheduler=dask.threaded.get)
    futures = client.compute(list(collections))
    if progress:
        from distributed import progress as show_progress

        show_progress(futures)  # the bar's line is left open: the CLI ends it (the library prints nothing)
    return tuple(client.gather(futures))
