"""Every Python example in the README runs, in order, on synthetic slides (they make their own).

On 75c0752 ``ds.latent.where(ds.tile_mask, drop=True)``, exactly as the README showed it,
raised ``KeyError: 'Indexing with a boolean dask array is not allowed'``.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks() -> list[str]:
    """The README's fenced ```python blocks, in order."""
    return re.findall(r"^```python\n(.*?)^```", README.read_text(encoding="utf-8"), flags=re.S | re.M)


def test_every_python_example_in_the_readme_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import matplotlib

    matplotlib.use("Agg")  # the examples plot; no screen here
    import matplotlib.pyplot as plt

    blocks = python_blocks()
    assert len(blocks) >= 4
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, object] = {"__name__": "readme"}
    for number, block in enumerate(blocks, 1):
        exec(compile(block, f"README.md python block {number}", "exec"), namespace)
    plt.close("all")
    # what the examples claim, checked on what they made
    ds, tissue, frame = namespace["ds"], namespace["tissue"], namespace["frame"]
    n = int(ds.tile_mask.sum())  # type: ignore[attr-defined]
    assert n > 0 and tissue.sizes["tile"] == n and len(frame) == n  # type: ignore[attr-defined, arg-type]
    boxed = namespace["boxed"]
    assert int(np.isfinite(boxed.values[..., 0]).sum()) == n  # type: ignore[attr-defined]
    assert namespace["rows"] == sum(int(namespace["tree"][g].tile_mask.sum()) for g in ("a", "b"))  # type: ignore[index]
    assert namespace["pens"].wsi.attrs["reject_pen"] is True  # type: ignore[attr-defined]
