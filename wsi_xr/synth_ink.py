"""Deprecated alias of :mod:`wsi_xr.datasets.ink` (moved in 0.3.0; see CHANGELOG.md).

``import wsi_xr.synth_ink`` gives that module itself, with a DeprecationWarning.
"""

import sys
import warnings

from wsi_xr.datasets import ink as _module

warnings.warn("wsi_xr.synth_ink moved to wsi_xr.datasets.ink; import it from there.", DeprecationWarning, stacklevel=2)
sys.modules[__name__] = _module
