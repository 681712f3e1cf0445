"""Store attributes in a form netCDF can hold, and back: plain ``ds.to_netcdf(path)`` works on any
Dataset opened from a wsi_xr store.

netCDF attributes are strings, numbers and 1-D arrays of one type: no mappings, no nested
lists, no booleans and no ``None`` (xarray refuses ``Invalid value for attr 'wsi_xr_run':
{...}``; the netCDF4 and HDF5 libraries refuse a bool). So wsi_xr writes every store
attribute as one of those, and records what each value was in one more attribute,
:data:`ATTR_TYPES`:

============================  =====================================  ==============
value                         stored as                              recorded type
============================  =====================================  ==============
``str``, ``int``, ``float``   itself (a NumPy scalar as Python's)    --
``bool``                      ``1`` / ``0`` (truthy as before)       ``"bool"``
``None``                      left out (``attrs.get(name)`` is None)  ``"null"``
``dict``, ``list``, ``tuple`` JSON text                              ``"json"``
an ``int`` beyond int64       JSON text                              ``"json"``
============================  =====================================  ==============

:func:`decode_attrs` gives the original values back (``ds.wsi.attrs`` does it for a Dataset
from a store or from a netCDF file written from one). It also reads what earlier releases
wrote (dicts and bools as such, no :data:`ATTR_TYPES`): values that are not encoded pass
through unchanged, so stores of 0.1.0 and 0.2.0 are resumed, checked and migrated as before.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, MutableMapping
from typing import Any

import numpy as np

from wsi_xr.errors import StoreError

__all__ = ["ATTR_TYPES", "decode_attrs", "encode_attrs", "normalise_attrs", "update_attrs"]

#: The attribute recording, as JSON text, the original type of each encoded attribute
#: (``{"complete": "bool", "mpp": "null", "wsi_xr_run": "json"}``).
ATTR_TYPES = "wsi_xr_attr_types"

_INT64 = (-(2**63), 2**63 - 1)


def _scalar(value: Any) -> Any:
    """A NumPy scalar (what netCDF files give back) as the Python value it holds; anything else unchanged."""
    return value.item() if isinstance(value, np.generic) else value


def _json_default(value: Any) -> Any:
    """NumPy values inside a mapping or list, for :func:`json.dumps`."""
    if isinstance(value, np.generic | np.ndarray):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def _encode_value(name: str, value: Any) -> tuple[Any, str | None]:
    """``(stored value, recorded type)``; the stored value is None for a left-out ``None``."""
    value = value.tolist() if isinstance(value, np.ndarray) else _scalar(value)
    if isinstance(value, bool):
        return int(value), "bool"
    if value is None:
        return None, "null"
    if isinstance(value, str | float):
        return value, None
    if isinstance(value, int) and _INT64[0] <= value <= _INT64[1]:
        return value, None
    try:
        return json.dumps(value, default=_json_default), "json"
    except (TypeError, ValueError) as err:
        raise StoreError(
            f"attribute {name!r}: a {type(value).__name__} cannot be stored in a Zarr or netCDF attribute ({err}); "
            "convert it to a str, number, list or dict first."
        ) from err


def _types_of(attrs: Mapping[str, Any]) -> dict[str, str]:
    """The recorded types of ``attrs`` (empty when it has no :data:`ATTR_TYPES`)."""
    text = attrs.get(ATTR_TYPES)
    if text is None:
        return {}
    try:
        types = json.loads(text) if isinstance(text, str) else text
    except ValueError as err:
        raise StoreError(
            f"attribute {ATTR_TYPES!r} is not JSON text ({err}): the attributes were edited by hand. "
            f"Delete {ATTR_TYPES!r} (its encoded attributes then read as stored), or rerun with --overwrite."
        ) from err
    if not isinstance(types, dict):
        raise StoreError(f"attribute {ATTR_TYPES!r} must be a JSON object of attribute name -> type, got {text!r}.")
    return {str(k): str(v) for k, v in types.items()}


def encode_attrs(attrs: Mapping[str, Any]) -> dict[str, Any]:
    """``attrs`` as netCDF-safe values, with :data:`ATTR_TYPES` recording what was encoded (see the
    module docstring). Encoding what is encoded already changes nothing."""
    known = _types_of(attrs)
    out: dict[str, Any] = {}
    types: dict[str, str] = {}
    for name, value in decode_attrs(attrs).items() if known else attrs.items():
        if name == ATTR_TYPES:
            continue
        stored, kind = _encode_value(name, value)
        if kind is not None:
            types[name] = kind
        if kind != "null":
            out[name] = stored
    if types:
        out[ATTR_TYPES] = json.dumps(dict(sorted(types.items())))
    return out


def decode_attrs(attrs: Mapping[str, Any]) -> dict[str, Any]:
    """The original values of attributes written by :func:`encode_attrs`, as Python types
    (NumPy scalars from a netCDF file become ``int``/``float``); attributes that were not
    encoded (what earlier releases wrote, or what a user added) pass through."""
    types = _types_of(attrs)
    out: dict[str, Any] = {}
    for name, value in attrs.items():
        if name == ATTR_TYPES:
            continue
        value = _scalar(value)
        kind = types.get(name)
        if kind == "json" and isinstance(value, str):
            try:
                value = json.loads(value)
            except ValueError:
                pass  # replaced by a plain string since: taken as it is
        elif kind == "bool" and isinstance(value, int) and not isinstance(value, bool):
            value = bool(value)
        out[name] = value
    for name, kind in types.items():
        if kind == "null" and name not in out:
            out[name] = None
    return out


def update_attrs(target: MutableMapping[str, Any], values: Mapping[str, Any]) -> None:
    """Set ``values`` (original types) in ``target`` (a Zarr group's or a Dataset's attributes) in
    encoded form, keeping :data:`ATTR_TYPES` right for the attributes already there; one write
    for a Zarr group."""
    merged = {**decode_attrs(target), **values}
    new = encode_attrs(merged)
    if dict(target) == new:
        return
    put = getattr(target, "put", None)
    if callable(put):  # zarr.Attributes: replace all at once (one metadata write)
        put(new)
    else:
        target.clear()
        target.update(new)


def normalise_attrs(target: MutableMapping[str, Any]) -> bool:
    """Rewrite ``target``'s attributes in encoded form (a store of an earlier release, or values
    written directly); True when anything changed."""
    before = dict(target)
    update_attrs(target, {})
    return dict(target) != before
