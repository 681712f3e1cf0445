"""Benchmark scripts (``python -m benchmarks.NAME``); see benchmarks/RESULTS.md."""

import os

# The benchmarks call cuCIM directly too (the raw-reader baselines): with a CUDA build of torch
# imported first and no GPU driver, cuFile would write cufile.log into the current folder.
os.environ.setdefault("CUFILE_LOGFILE_PATH", os.devnull)
