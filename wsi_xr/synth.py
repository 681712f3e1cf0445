"""Deprecated alias of :mod:`wsi_xr.datasets.synth` (moved in 0.3.0; see CHANGELOG.md).

``import wsi_xr.synth`` gives that module itself, with a DeprecationWarning.
"""

import sys
import warnings

from wsi_xr.datasets import synth as _module

warnings.warn("wsi_xr.synth moved to wsi_xr.datasets.synth; import it from there.", DeprecationWarning, stacklevel=2)
sys.modules[__name__] = _module
