"""Any tile encoder: the VAE (the default), a ``torch.nn.Module``, a TorchScript file, or a timm model.

An encoder maps ``(N, 3, T, T)`` float tiles to ``(N, D)`` features. What it needs besides its
weights, the tile side ``T``, the input normalisation and the resolution it was trained at, is
an :class:`EncoderSpec`; :data:`VAE_SPEC` describes the shipped VAE.

>>> from wsi_xr.models.encoders import EncoderSpec, load_encoder
>>> enc = load_encoder("resnet50", weights="resnet50.safetensors")          # timm, local weights only
>>> enc = load_encoder("encoder.ts", spec=EncoderSpec("my-encoder", tile=224))  # TorchScript file
>>> features = enc.encode(tiles)                   # (N, 224, 224, 3) uint8 -> (N, D) float32
>>> enc.attrs()                                    # provenance: name, kind, weights SHA-256, spec

How an encoder travels to Dask workers (:meth:`LoadedEncoder.graph_input`): as one bytes object,
sent once per worker, plus a small :class:`EncoderRef` in each task. The bytes are

- VAE, TorchScript and timm: the weights file's own bytes (timm: the model is rebuilt on the
  worker from its name and keyword arguments, kept in the ref, then the file's tensors are loaded);
- a ``torch.nn.Module`` object: the module pickled with :mod:`cloudpickle` (what Dask itself uses
  for tasks), so a class defined in a script or notebook travels by value and one from an
  installed package by reference, as in any Dask task.

Each process loads an encoder once (:func:`worker_encoder`, a small LRU cache keyed by the ref),
and checks the bytes against the ref's SHA-256 first.

Weights hashes (:attr:`EncoderRef.sha256`, for provenance): the SHA-256 of the weights file for
the VAE, TorchScript and timm (and for a module given ``weights=``); for a module object, the
SHA-256 of its state dict, each entry in key order as ``name``, dtype, shape and the tensor's raw
bytes (:func:`state_dict_sha256`: independent of ``torch.save``'s container format).

Precision: float32 by default (the module as it is); ``precision="bf16"`` runs the forward pass
under :func:`torch.autocast` with bfloat16 (opt-in). Nothing is downloaded, ever: timm models are
made with ``pretrained=False`` and get their weights from the local file given.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import difflib
import hashlib
import io
import json
import math
import os
import re
import threading
import warnings
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from wsi_xr.errors import InvalidArgumentError, WeightsError, WsiXrError
from wsi_xr.models.vae import CHANNELS, LATENT_SIZE, PRECISIONS, TILE_SIZE, VAE2, encode_tiles, torch_device, torch_threads_scope
from wsi_xr.models.weights import _one_line, _torch_detail, existing_file, sha256_of_file

__all__ = [
    "DEFAULT_ENCODER_BATCH",
    "ENCODER_CACHE_SIZE",
    "ENCODER_KINDS",
    "FILE_SUFFIXES",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "VAE_SPEC",
    "EncoderRef",
    "EncoderSpec",
    "LoadedEncoder",
    "MissingDependencyError",
    "encode_batch",
    "file_sha256",
    "is_torchscript_file",
    "load_encoder",
    "module_encoder",
    "state_dict_sha256",
    "timm_encoder",
    "torchscript_encoder",
    "vae_encoder",
    "worker_encoder",
]

#: How an encoder was given: the shipped VAE, a module object, a TorchScript file, a timm model name.
ENCODER_KINDS = ("vae", "module", "torchscript", "timm")
#: ImageNet's per-channel mean and standard deviation (for inputs in ``[0, 1]``), timm's default.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: Batch of tiles per forward pass for encoders other than the VAE (which keeps its measured
#: :func:`~wsi_xr.models.default_batch_size`). CPU: measured on a ResNet-50-sized encoder at
#: 224 px (AVX512, 2 threads, 128 tiles, two rounds): batch 8 gave 19.8-21.4 tiles/s, 16
#: 18.1-19.8, 32 15.6-17.1, 64 15.6-16.0 (small batches keep the activations in cache).
#: CUDA: not measured (no GPU lent).
DEFAULT_ENCODER_BATCH = {"cpu": 8, "cuda": 128}
#: Suffixes that make an ``encoder=`` string a file path rather than a timm model name (which may hold a dot).
FILE_SUFFIXES = (".pt", ".pth", ".pt2", ".ts", ".jit", ".torchscript", ".zip", ".bin", ".safetensors", ".ckpt")
#: Encoders kept loaded per process (least recently used dropped).
ENCODER_CACHE_SIZE = 4
#: Version of the recipe behind :attr:`EncoderRef.key` (bump when what the bytes mean changes).
_REF_FORMAT = 1
_PREFIXES = ("module.", "_orig_mod.")  # nn.DataParallel / DistributedDataParallel, torch.compile


class MissingDependencyError(WsiXrError, ImportError):
    """An optional package an encoder needs (timm, safetensors) is not installed or cannot be imported."""


def _three(value: Any, what: str) -> tuple[float, float, float]:
    """``value`` as three finite floats, or an InvalidArgumentError naming ``what``."""
    if isinstance(value, (np.ndarray, torch.Tensor)):
        value = value.tolist()
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise InvalidArgumentError(f"{what}={value!r}: give 3 numbers, one per channel (R, G, B), for inputs scaled to [0, 1]")
    items = list(value)
    if len(items) != CHANNELS or any(isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)) for v in items):
        raise InvalidArgumentError(f"{what}={value!r}: give 3 numbers, one per channel (R, G, B), for inputs scaled to [0, 1]")
    floats = tuple(float(v) for v in items)
    if not all(math.isfinite(v) for v in floats):
        raise InvalidArgumentError(f"{what}={value!r}: the 3 numbers must be finite")
    return floats[0], floats[1], floats[2]


@dataclass(frozen=True)
class EncoderSpec:
    """What an encoder needs besides its weights: its name, tile side, input normalisation and resolution.

    Parameters
    ----------
    name
        The encoder's name, recorded in the store (e.g. ``"resnet50"``, ``"vae2"``).
    tile
        Side ``T`` of the square tiles the encoder takes, in pixels.
    mean, std
        Per-channel (R, G, B) normalisation for pixels scaled to ``[0, 1]``: the encoder sees
        ``(pixel / 255 - mean) / std``. The default ``(0, 0, 0)`` / ``(1, 1, 1)`` is none.
    target_mpp
        Microns per pixel the encoder was trained at (tiles are read at that resolution);
        None: the slide's own level, as for the VAE.
    features
        Length ``D`` of a tile's feature vector; None until known (a loaded encoder fills it).
    kind
        How the encoder was given, one of :data:`ENCODER_KINDS` (the loaders set it).

    Raises
    ------
    InvalidArgumentError
        A tile side that is not a positive integer, a mean or std that is not 3 finite numbers,
        a std that is not positive, a target mpp that is not positive, an unknown kind.
    """

    name: str
    tile: int
    mean: tuple[float, float, float] = (0.0, 0.0, 0.0)
    std: tuple[float, float, float] = (1.0, 1.0, 1.0)
    target_mpp: float | None = None
    features: int | None = None
    kind: str = "module"

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.strip():
            raise InvalidArgumentError(f"encoder name {self.name!r}: give a non-empty string (it is recorded in the store)")
        if isinstance(self.tile, bool) or not isinstance(self.tile, (int, np.integer)) or self.tile < 1:
            raise InvalidArgumentError(f"tile={self.tile!r} for encoder {self.name!r}: the tile side must be a positive integer (pixels)")
        object.__setattr__(self, "tile", int(self.tile))
        object.__setattr__(self, "mean", _three(self.mean, f"mean of encoder {self.name!r}"))
        std = _three(self.std, f"std of encoder {self.name!r}")
        if min(std) <= 0:
            raise InvalidArgumentError(f"std={self.std!r} for encoder {self.name!r}: every channel's std must be > 0")
        object.__setattr__(self, "std", std)
        if self.target_mpp is not None:
            mpp = self.target_mpp
            if isinstance(mpp, bool) or not isinstance(mpp, (int, float, np.integer, np.floating)) or not math.isfinite(mpp) or mpp <= 0:
                raise InvalidArgumentError(f"target_mpp={mpp!r} for encoder {self.name!r}: give microns per pixel > 0, or None (the slide's level)")
            object.__setattr__(self, "target_mpp", float(mpp))
        if self.features is not None:
            if isinstance(self.features, bool) or not isinstance(self.features, (int, np.integer)) or self.features < 1:
                raise InvalidArgumentError(
                    f"features={self.features!r} for encoder {self.name!r}: give a positive integer, or None (found when loaded)"
                )
            object.__setattr__(self, "features", int(self.features))
        if self.kind not in ENCODER_KINDS:
            raise InvalidArgumentError(f"kind={self.kind!r} for encoder {self.name!r}: use one of {', '.join(ENCODER_KINDS)}")

    @property
    def normalises(self) -> bool:
        """Whether the spec changes the ``[0, 1]`` pixels (a mean or std other than 0 / 1)."""
        return self.mean != (0.0, 0.0, 0.0) or self.std != (1.0, 1.0, 1.0)

    def replace(self, **changes: Any) -> EncoderSpec:
        """A copy with ``changes`` (validated again)."""
        return dataclasses.replace(self, **changes)

    def attrs(self) -> dict[str, Any]:
        """The spec as JSON-able store attributes (``encoder``, ``encoder_kind``, ``encoder_tile``, ...)."""
        return {
            "encoder": self.name,
            "encoder_kind": self.kind,
            "encoder_tile": self.tile,
            "encoder_mean": list(self.mean),
            "encoder_std": list(self.std),
            "encoder_target_mpp": self.target_mpp,
            "encoder_features": self.features,
        }

    @classmethod
    def from_attrs(cls, attrs: Mapping[str, Any]) -> EncoderSpec:
        """The spec recorded by :meth:`attrs` (e.g. read back from a store's attributes)."""
        try:
            return cls(
                name=attrs["encoder"],
                tile=attrs["encoder_tile"],
                mean=tuple(attrs["encoder_mean"]),
                std=tuple(attrs["encoder_std"]),
                target_mpp=attrs.get("encoder_target_mpp"),
                features=attrs.get("encoder_features"),
                kind=attrs.get("encoder_kind", "module"),
            )
        except KeyError as err:
            raise InvalidArgumentError(f"the attributes hold no encoder spec: {err.args[0]!r} is missing (written by EncoderSpec.attrs())") from err


#: The shipped VAE: 64-px tiles in ``[0, 1]`` without normalisation (as
#: :func:`~wsi_xr.models.tiles_to_tensor` scales them), at the slide's level, 32 features (``mu``).
VAE_SPEC = EncoderSpec(name="vae2", tile=TILE_SIZE, target_mpp=None, features=LATENT_SIZE, kind="vae")


@dataclass(frozen=True)
class EncoderRef:
    """What identifies an encoder in a task: small, hashable, tokenisable; the bytes travel apart.

    ``key`` names the loaded module (a SHA-256 of the kind, the bytes' hash and the timm name and
    arguments); ``sha256`` is the weights' hash for provenance; ``data_sha256`` the hash of the
    bytes that travel (the same as ``sha256`` for a file). ``source`` records where the weights
    came from (None for an object); tasks never read it.
    """

    spec: EncoderSpec
    key: str
    sha256: str
    data_sha256: str
    source: str | None = None
    timm_name: str | None = None
    timm_kwargs: str = "{}"  # canonical JSON (sorted keys)
    device: str = "cpu"
    precision: str = "fp32"

    def attrs(self) -> dict[str, Any]:
        """Provenance as JSON-able store attributes: the spec's, the weights' SHA-256 and source, the precision."""
        out = self.spec.attrs()
        out["encoder_sha256"] = self.sha256
        out["encoder_source"] = self.source
        if self.timm_name is not None:
            out["encoder_timm_kwargs"] = json.loads(self.timm_kwargs)
        out["precision"] = self.precision
        return out


@dataclass(frozen=True, eq=False)
class LoadedEncoder:
    """An encoder checked in the client, ready to travel: its :class:`EncoderRef` and its bytes.

    Made by :func:`load_encoder` (or :func:`vae_encoder`, :func:`module_encoder`,
    :func:`torchscript_encoder`, :func:`timm_encoder`). Tasks get the bytes through one Dask key
    (:meth:`graph_input`) and the ref as an argument, and call :func:`worker_encoder` and
    :func:`encode_batch`.
    """

    ref: EncoderRef
    data: bytes = field(repr=False)

    @property
    def spec(self) -> EncoderSpec:
        return self.ref.spec

    @property
    def sha256(self) -> str:
        return self.ref.sha256

    def attrs(self) -> dict[str, Any]:
        """Provenance for the store (:meth:`EncoderRef.attrs`)."""
        return self.ref.attrs()

    def with_options(self, *, device: str | None = None, precision: str | None = None) -> LoadedEncoder:
        """The same encoder run on another device or at another precision (the bytes are shared)."""
        device = self.ref.device if device is None else str(torch_device(device))
        precision = self.ref.precision if precision is None else _check_precision(precision, vae=self.spec.kind == "vae")
        return LoadedEncoder(dataclasses.replace(self.ref, device=device, precision=precision), self.data)

    def graph_input(self, client: Any = None) -> Any:
        """The bytes as one Dask key, an argument for ``map_blocks``: with a ``distributed.Client``,
        scattered once (by content hash); otherwise ``wsi-encoder-<key>`` in the graph itself."""
        if client is not None:
            return client.scatter(self.data, hash=True)
        import dask

        return dask.delayed(self.data, name=f"wsi-encoder-{self.ref.key}", pure=True)

    def module(self) -> Any:
        """The loaded module in this process (eval mode, on the ref's device; cached)."""
        return worker_encoder(self.ref, self.data)

    def encode(self, tiles: Any, *, batch_size: int | None = None, torch_threads: int | None = None) -> Any:
        """Features of ``(N, T, T, 3)`` uint8 tiles, ``(N, D)`` float32 (:func:`encode_batch`)."""
        return encode_batch(self.module(), tiles, self.spec, batch_size=batch_size, precision=self.ref.precision, torch_threads=torch_threads)


# ---------------------------------------------------------------------------------------------
# Hashes and file checks


def file_sha256(path: str | os.PathLike[str]) -> str:
    """SHA-256 (hex) of a file's bytes, read in 1 MiB blocks."""
    return sha256_of_file(_existing_file(path, "weights file"))


def state_dict_sha256(state: nn.Module | Mapping[str, torch.Tensor]) -> str:
    """SHA-256 (hex) of a module's state dict (or of a state dict), independent of how it is saved.

    Each entry, in key order, adds ``name``, its dtype, its shape and the tensor's bytes (CPU,
    contiguous), each framed by a NUL-separated header, so equal tensors under equal names give
    the same digest in any process, on any torch version, and any change of a value, a name, a
    dtype or a shape gives another.
    """
    tensors = state.state_dict() if isinstance(state, nn.Module) else state
    digest = hashlib.sha256(b"wsi_xr state dict v1\0")
    for name in sorted(tensors):
        t = tensors[name]
        if not isinstance(t, torch.Tensor):
            continue
        t = t.detach().to("cpu").contiguous()
        raw = t.reshape(-1).view(torch.uint8) if t.numel() else torch.empty(0, dtype=torch.uint8)
        digest.update(f"{name}\0{t.dtype}\0{tuple(t.shape)}\0{raw.numel()}\0".encode())
        digest.update(raw.numpy().tobytes())
    return digest.hexdigest()


def _existing_file(path: str | os.PathLike[str], what: str) -> Path:
    """``path`` as an existing, non-empty regular file (:func:`~wsi_xr.models.weights.existing_file`)."""
    return existing_file(path, what, "check the path (wsi_xr never downloads weights: pass a local file)")


def _read(p: Path, what: str) -> bytes:
    try:
        return p.read_bytes()
    except OSError as err:
        raise WeightsError(f"{what} '{p}' cannot be read ({err.strerror}); check its permissions") from err


def is_torchscript_file(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a TorchScript archive (``torch.jit.save``): a zip holding ``<name>/code/``.

    A ``torch.save`` weights file is a zip too, without the ``code/`` folder.
    """
    import zipfile

    try:
        with zipfile.ZipFile(path) as archive:
            return any("/code/" in name for name in archive.namelist())
    except (OSError, zipfile.BadZipFile):
        return False


def _is_safetensors(data: bytes) -> bool:
    """A safetensors file: an 8-byte little-endian header length, then a JSON object."""
    if len(data) < 10:
        return False
    size = int.from_bytes(data[:8], "little")
    return 0 < size <= len(data) - 8 and data[8:9] == b"{"


def _check_precision(precision: str, *, vae: bool = False) -> str:
    if precision not in PRECISIONS:
        raise InvalidArgumentError(f"precision={precision!r}: use one of {', '.join(PRECISIONS)} (fp32 is exact; bf16 is an opt-in autocast)")
    if precision == "int8" and not vae:
        raise InvalidArgumentError("precision='int8' is built for the VAE (VAE2) only; run other encoders with precision='fp32' or 'bf16'.")
    return precision


def _make_ref(spec: EncoderSpec, data: bytes, sha256: str, source: str | None, device: str, precision: str, **timm: Any) -> EncoderRef:
    """The ref of ``data``: its key covers the kind, the bytes' hash and the timm name and arguments."""
    data_sha256 = sha256 if spec.kind in ("vae", "torchscript", "timm") else hashlib.sha256(data).hexdigest()
    recipe = {"format": _REF_FORMAT, "kind": spec.kind, "data_sha256": data_sha256, **timm}
    key = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()
    return EncoderRef(spec, key, sha256, data_sha256, source, device=device, precision=precision, **timm)


# ---------------------------------------------------------------------------------------------
# State dicts from weights files (torch.save or safetensors), checked against a module


def _state_dict_from_bytes(data: bytes, label: str) -> dict[str, torch.Tensor]:
    """The tensors of a weights file's bytes: safetensors, or ``torch.load(weights_only=True)``.

    A checkpoint dict with a ``"state_dict"`` or ``"model"`` entry gives that entry; key prefixes
    of ``nn.DataParallel`` (``module.``) and ``torch.compile`` (``_orig_mod.``) are removed.
    """
    obj: Any
    if _is_safetensors(data):
        try:
            from safetensors.torch import load as load_safetensors
        except ImportError as err:
            raise MissingDependencyError(
                f"weights file '{label}' is a safetensors file, which needs the safetensors package: pip install safetensors"
            ) from err
        try:
            obj = load_safetensors(data)
        except Exception as err:  # safetensors raises its own SafetensorError
            raise WeightsError(f"weights file '{label}' is a damaged safetensors file ({_one_line(err, 100)}); copy or save it again") from err
    else:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        except Exception as err:  # RuntimeError, UnpicklingError, EOFError, ...
            if "Unsupported global" in str(err):
                raise WeightsError(
                    f"weights file '{label}' holds Python objects, not just tensors, and wsi_xr does not unpickle those "
                    "(they could run code); re-save only the weights: torch.save(model.state_dict(), path)"
                ) from err
            raise WeightsError(
                f"weights file '{label}' is not a PyTorch or safetensors weights file, or is damaged ({_torch_detail(err)}); "
                "pass a file written by torch.save(model.state_dict(), path) or safetensors"
            ) from err
    if isinstance(obj, Mapping):
        for inner in ("state_dict", "model"):
            if isinstance(obj.get(inner), Mapping):
                obj = obj[inner]
                break
    if not isinstance(obj, Mapping):
        raise WeightsError(f"weights file '{label}' holds a {type(obj).__name__}, not a state dict of tensors; save model.state_dict()")
    tensors: dict[str, torch.Tensor] = {}
    for key, value in obj.items():
        if isinstance(key, str) and isinstance(value, torch.Tensor):
            name = key
            while name.startswith(_PREFIXES):
                name = name.split(".", 1)[1]
            tensors[name] = value
    if not tensors:
        raise WeightsError(f"weights file '{label}' holds no tensors; save model.state_dict()")
    return tensors


def _load_into(module: nn.Module, tensors: Mapping[str, torch.Tensor], label: str, arch: str, *, ignore: tuple[str, ...] = ()) -> None:
    """Load ``tensors`` into ``module``, or raise a WeightsError naming the file and the first key that does not fit.

    Keys under an ``ignore`` prefix (a classifier the features do not use) are left out;
    BatchNorm's ``num_batches_tracked`` counters may be absent (they do nothing in eval mode).
    """
    expected = module.state_dict()
    missing = [k for k in expected if k not in tensors and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in tensors if k not in expected and not (ignore and k.startswith(ignore))]
    reshaped = {k for k, v in expected.items() if k in tensors and tuple(tensors[k].shape) != tuple(v.shape)}
    if missing or unexpected or reshaped:
        first = next((k for k in expected if k in reshaped or k in missing), None)
        if first is None:
            first, why = unexpected[0], "in the file, not in the model"
        elif first in reshaped:
            why = f"shape {tuple(tensors[first].shape)} in the file, {tuple(expected[first].shape)} in the model"
        else:
            why = "in the model, not in the file"
        raise WeightsError(
            f"weights file '{label}' does not fit {arch}: first mismatch {first!r} ({why}); "
            f"{len(reshaped)} tensors differ in shape, {len(missing)} are missing, {len(unexpected)} are unexpected. "
            "Pass the weights saved from the same architecture (and the same keyword arguments)"
        )
    bad = [k for k, t in tensors.items() if k in expected and t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:
        raise WeightsError(f"weights file '{label}' holds NaN or infinite values (first in {bad[0]!r}); use another checkpoint")
    try:
        module.load_state_dict({k: v for k, v in tensors.items() if k in expected}, strict=False)
    except RuntimeError as err:  # e.g. a dtype that cannot be copied into a parameter
        raise WeightsError(f"weights file '{label}' cannot be loaded into {arch} ({_one_line(err, 120)})") from err


# ---------------------------------------------------------------------------------------------
# timm (optional)


def _import_timm() -> Any:
    """timm, or a MissingDependencyError saying how to install it (or why it cannot be imported)."""
    try:
        import timm
    except ImportError as err:
        raise MissingDependencyError(
            f"a timm model name needs the timm package, which is not installed ({_one_line(err, 80)}): pip install timm "
            "(with a torchvision built for this torch)"
        ) from err
    except Exception as err:  # e.g. RuntimeError "operator torchvision::nms does not exist"
        raise MissingDependencyError(
            f"timm is installed but cannot be imported ({type(err).__name__}: {_one_line(err, 100)}); its torchvision does not match "
            f"torch {torch.__version__}: install the torchvision release built for this torch (a CPU build of torch needs torchvision's "
            "CPU build), or use a TorchScript file or a torch.nn.Module instead"
        ) from err
    return timm


def _timm_model(name: str, kwargs_json: str) -> nn.Module:
    """``timm.create_model(name, pretrained=False, num_classes=0, **kwargs)``, randomly initialised, no download."""
    timm = _import_timm()
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=3, cutoff=0.6)
        stem = re.match(r"[A-Za-z]*", name).group(0) or name  # type: ignore[union-attr]  # "*" always matches
        hint = f" (did you mean {', '.join(repr(c) for c in close)}?)" if close else ""
        raise InvalidArgumentError(f"timm has no model {name!r}{hint}; list the names with timm.list_models('*{stem}*')")
    kwargs = json.loads(kwargs_json)
    try:
        model = timm.create_model(name, pretrained=False, num_classes=0, **kwargs)
    except (TypeError, ValueError, AssertionError, RuntimeError) as err:
        raise InvalidArgumentError(
            f"timm.create_model({name!r}, num_classes=0, **{kwargs}) fails ({type(err).__name__}: {_one_line(err, 120)}); check the keyword arguments"
        ) from err
    if not isinstance(model, nn.Module):
        raise InvalidArgumentError(f"timm.create_model({name!r}) returned a {type(model).__name__}, not a torch.nn.Module")
    return model


def _timm_classifier(model: nn.Module) -> tuple[str, ...]:
    """Prefixes of the classifier head's keys (``fc.``, ``head.``...), absent with ``num_classes=0``."""
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
    names = cfg.get("classifier") or ()
    names = (names,) if isinstance(names, str) else tuple(names)
    have = model.state_dict()
    return tuple(f"{n}." for n in names if not any(k.startswith(f"{n}.") for k in have))


def _build_timm(name: str, kwargs_json: str, data: bytes, label: str) -> nn.Module:
    model = _timm_model(name, kwargs_json)
    tensors = _state_dict_from_bytes(data, label)
    arguments = "".join(f", {k}={v!r}" for k, v in json.loads(kwargs_json).items())
    _load_into(model, tensors, label, f"timm model {name!r} (num_classes=0{arguments})", ignore=_timm_classifier(model))
    return model


# ---------------------------------------------------------------------------------------------
# The loaded modules of this process


_encoders: OrderedDict[tuple[str, str], Any] = OrderedDict()
_encoders_lock = threading.RLock()


def _remember(ref: EncoderRef, module: Any) -> Any:
    """Keep ``module`` as the loaded encoder of ``ref`` in this process (bounded LRU); returns it."""
    with _encoders_lock:
        _encoders[(ref.key, ref.device)] = module
        _encoders.move_to_end((ref.key, ref.device))
        while len(_encoders) > ENCODER_CACHE_SIZE:
            _encoders.popitem(last=False)
    return module


def _channels_last(model: Any) -> Any:
    """``model`` with channels-last weights (``nn.Module.to`` takes ``memory_format``, documented)."""
    return model.to(memory_format=torch.channels_last)


def _from_bytes(ref: EncoderRef, data: bytes) -> Any:
    """The module ``data`` holds (eval mode, on ``ref.device``), as ``ref.spec.kind`` says."""
    dev = torch_device(ref.device)
    label = ref.source or f"encoder {ref.spec.name!r} ({ref.sha256[:12]})"
    kind = ref.spec.kind
    module: Any
    if kind == "vae":
        from wsi_xr.models.weights import load_vae_bytes

        # channels-last weights, as wsi_xr.encode keeps the VAE for inference (the same results)
        return _channels_last(load_vae_bytes(data, device=dev, label=label).eval())
    if kind == "torchscript":
        try:
            with warnings.catch_warnings():
                # torch 2.13 warns "`torch.jit.load` is deprecated" (DeprecationWarning; 2.14: FutureWarning)
                warnings.filterwarnings("ignore", message=r"`torch\.jit\.\w+` is deprecated")
                module = torch.jit.load(io.BytesIO(data), map_location=dev)
        except Exception as err:
            raise WeightsError(
                f"'{label}' is not a TorchScript file, or is damaged ({_torch_detail(err)}); "
                "save one with torch.jit.save(torch.jit.script(model), path) or torch.jit.trace"
            ) from err
    elif kind == "timm":
        if ref.timm_name is None:
            raise InvalidArgumentError(f"encoder {ref.spec.name!r} of kind 'timm' has no timm model name in its ref")
        module = _build_timm(ref.timm_name, ref.timm_kwargs, data, label)
    else:  # "module": cloudpickle bytes made by module_encoder in the client
        import cloudpickle

        module = cloudpickle.loads(data)
    return module.eval().to(dev)


def worker_encoder(ref: EncoderRef, data: bytes | None = None) -> Any:
    """The module of ``ref``, loaded once per process (eval mode, on ``ref.device``) from ``data``.

    ``data`` is the :attr:`LoadedEncoder.data` that travelled with the task; it is checked against
    ``ref.data_sha256`` before use. Without it, only a module already loaded here is found.
    """
    with _encoders_lock:
        module = _encoders.get((ref.key, ref.device))
        if module is not None:
            _encoders.move_to_end((ref.key, ref.device))
            return module
        if data is None:
            raise InvalidArgumentError(f"encoder {ref.spec.name!r} is not loaded in this process: pass its bytes (LoadedEncoder.data)")
        if hashlib.sha256(data).hexdigest() != ref.data_sha256:
            raise WeightsError(
                f"the bytes given for encoder {ref.spec.name!r} are not the ones its ref names (SHA-256 differs); pass the LoadedEncoder's own data"
            )
        return _remember(ref, _from_bytes(ref, data))


# ---------------------------------------------------------------------------------------------
# Loading, in the client


def _probe(module: Any, spec: EncoderSpec) -> EncoderSpec:
    """Run ``module`` on one mid-grey tile: a clear error now if it does not map ``(1, 3, T, T)`` to ``(1, D)``; ``spec`` with D filled."""
    tile = np.full((1, spec.tile, spec.tile, CHANNELS), 128, dtype=np.uint8)
    try:
        out = encode_batch(module, tile, spec, batch_size=1)
    except InvalidArgumentError:
        raise
    except Exception as err:  # the model's own error: a tile size it does not take, ...
        raise InvalidArgumentError(
            f"encoder {spec.name!r} fails on a (1, 3, {spec.tile}, {spec.tile}) batch ({type(err).__name__}: {_one_line(err, 140)}); "
            f"check the spec's tile={spec.tile} against the input size the model takes"
        ) from err
    return spec.replace(features=int(out.shape[1]))


def _finish(spec: EncoderSpec, data: bytes, sha256: str, source: str | None, module: Any, device: str, precision: str, **timm: Any) -> LoadedEncoder:
    """Check ``module`` (the client's copy, CPU, eval mode) and make the LoadedEncoder."""
    if spec.kind != "vae":
        spec = _probe(module, spec)
    ref = _make_ref(spec, data, sha256, source, device, precision, **timm)
    if device == "cpu":
        _remember(ref, module)  # tasks in this process (the threaded scheduler) use it: loaded once
    return LoadedEncoder(ref, data)


def vae_encoder(weights: str | os.PathLike[str] | VAE2 | None = None, *, device: str = "cpu", precision: str = "fp32") -> LoadedEncoder:
    """The VAE as an encoder: a weights file, a :class:`~wsi_xr.models.VAE2`, or None (the shipped default).

    The bytes and SHA-256 are those :func:`wsi_xr.encode.prepare_model` uses (the file's bytes, or
    :func:`~wsi_xr.models.vae_bytes` of an object), so provenance matches the VAE path's.
    """
    from wsi_xr.models.weights import default_weights_path, load_vae, load_vae_bytes, vae_bytes

    dev = str(torch_device(device))
    _check_precision(precision, vae=True)
    if isinstance(weights, VAE2):
        data, source = vae_bytes(weights), None
        model = load_vae_bytes(data, label="VAE2 object")
    else:
        model = load_vae(weights)  # a clear WeightsError for a missing or wrong file
        p = Path(os.fspath(weights)).expanduser() if weights is not None else default_weights_path()
        data, source = _read(p, "weights file"), str(p.resolve())
    model = _channels_last(model.eval())
    return _finish(VAE_SPEC, data, hashlib.sha256(data).hexdigest(), source, model, dev, precision)


def module_encoder(
    module: nn.Module,
    spec: EncoderSpec,
    *,
    weights: str | os.PathLike[str] | None = None,
    device: str = "cpu",
    precision: str = "fp32",
) -> LoadedEncoder:
    """A ``torch.nn.Module`` mapping ``(N, 3, T, T)`` float to ``(N, D)`` as an encoder.

    The module is not changed: a copy travels, pickled with cloudpickle (its class by value when
    defined in a script or notebook, by reference when importable). ``weights`` (optional) is a
    local state-dict file (``torch.save`` or safetensors) loaded into the copy; the SHA-256 is then
    the file's, else :func:`state_dict_sha256` of the module.
    """
    import cloudpickle

    if not isinstance(module, nn.Module):
        raise InvalidArgumentError(f"encoder {type(module).__name__!r} is not a torch.nn.Module")
    if not isinstance(spec, EncoderSpec):
        raise InvalidArgumentError(f"a torch.nn.Module encoder needs spec=EncoderSpec(name, tile=T, mean=..., std=...), got {spec!r}")
    dev = str(torch_device(device))
    _check_precision(precision)
    spec = spec.replace(kind="module")
    on_cpu = all(t.device.type == "cpu" for t in [*module.parameters(), *module.buffers()])
    source = None
    if weights is not None:
        p = _existing_file(weights, "weights file")
        raw = _read(p, "weights file")
        module = copy.deepcopy(module).cpu()
        _load_into(module, _state_dict_from_bytes(raw, str(p)), str(p), f"module {type(module).__name__} ({spec.name!r})")
        sha256, source = hashlib.sha256(raw).hexdigest(), str(p.resolve())
    else:
        if not on_cpu:
            module = copy.deepcopy(module).cpu()
        sha256 = state_dict_sha256(module)
    try:
        data = cloudpickle.dumps(module)
        local = cloudpickle.loads(data)  # the copy this process runs; also proves the bytes load
    except Exception as err:
        raise InvalidArgumentError(
            f"encoder {spec.name!r} ({type(module).__name__}) cannot be pickled to travel to Dask workers "
            f"({type(err).__name__}: {_one_line(err, 100)}); save it as TorchScript (torch.jit.save) and pass the file"
        ) from err
    return _finish(spec, data, sha256, source, local.eval(), dev, precision)


def torchscript_encoder(path: str | os.PathLike[str], spec: EncoderSpec, *, device: str = "cpu", precision: str = "fp32") -> LoadedEncoder:
    """A TorchScript file (``torch.jit.save``) as an encoder; its bytes travel, its SHA-256 is the file's."""
    if not isinstance(spec, EncoderSpec):
        raise InvalidArgumentError(f"a TorchScript encoder needs spec=EncoderSpec(name, tile=T, mean=..., std=...), got {spec!r}")
    dev = str(torch_device(device))
    _check_precision(precision)
    p = _existing_file(path, "TorchScript file")
    data = _read(p, "TorchScript file")
    spec = spec.replace(kind="torchscript")
    ref = EncoderRef(spec, "", "", "", str(p))
    module = _from_bytes(ref, data)  # on the CPU: a clear error for a file that is not TorchScript
    return _finish(spec, data, hashlib.sha256(data).hexdigest(), str(p.resolve()), module, dev, precision)


def timm_encoder(
    name: str,
    weights: str | os.PathLike[str],
    *,
    spec: EncoderSpec | None = None,
    timm_kwargs: Mapping[str, Any] | None = None,
    device: str = "cpu",
    precision: str = "fp32",
) -> LoadedEncoder:
    """``timm.create_model(name, pretrained=False, num_classes=0, **timm_kwargs)`` with a local weights file.

    Nothing is downloaded. ``weights`` is a ``torch.save`` state dict (``.pth``, ``.bin``, ``.pt``)
    or a ``.safetensors`` file; a classifier head in it is left out (the features are the pooled
    embedding, ``num_classes=0``). Without ``spec``, the tile side comes from ``img_size`` in
    ``timm_kwargs`` or the model's ``input_size``, mean and std from its config (ImageNet's by default).
    ``timm_kwargs`` must be JSON-able: they travel to the workers with the name.
    """
    if not isinstance(name, str) or not name:
        raise InvalidArgumentError(f"timm model name {name!r}: give a name such as 'resnet50' (timm.list_models() lists them)")
    kwargs = dict(timm_kwargs or {})
    for fixed in ("pretrained", "num_classes", "checkpoint_path", "pretrained_cfg", "pretrained_cfg_overlay"):
        if fixed in kwargs:
            raise InvalidArgumentError(
                f"timm_kwargs may not set {fixed!r}: wsi_xr builds timm models with pretrained=False and num_classes=0 "
                "and loads the weights from the local file given as weights="
            )
    try:
        kwargs_json = json.dumps(kwargs, sort_keys=True, allow_nan=False)
    except (TypeError, ValueError) as err:
        raise InvalidArgumentError(
            f"timm_kwargs={kwargs!r} must be JSON-able (numbers, strings, lists, dicts): they travel to the workers ({err})"
        ) from err
    dev = str(torch_device(device))
    _check_precision(precision)
    p = _existing_file(weights, "weights file")
    data = _read(p, "weights file")
    module = _build_timm(name, kwargs_json, data, str(p)).eval()
    if spec is None:
        spec = _timm_spec(name, module, json.loads(kwargs_json))
    elif not isinstance(spec, EncoderSpec):
        raise InvalidArgumentError(f"spec={spec!r}: give an EncoderSpec or None (taken from the timm model's config)")
    spec = spec.replace(kind="timm")
    return _finish(spec, data, hashlib.sha256(data).hexdigest(), str(p.resolve()), module, dev, precision, timm_name=name, timm_kwargs=kwargs_json)


def _timm_spec(name: str, module: nn.Module, kwargs: Mapping[str, Any]) -> EncoderSpec:
    """The spec a timm model's config gives: tile from ``img_size`` or ``input_size``, its mean and std."""
    cfg = getattr(module, "pretrained_cfg", None) or {}
    size: Any = kwargs.get("img_size", cfg.get("input_size", (CHANNELS, 224, 224))[1:])
    if isinstance(size, int):
        side = size
    elif isinstance(size, (list, tuple)) and len(size) == 2 and size[0] == size[1]:
        side = int(size[0])
    else:
        raise InvalidArgumentError(f"timm model {name!r} takes {size} inputs; wsi_xr encodes square tiles: pass spec=EncoderSpec(..., tile=T)")
    return EncoderSpec(name=name, tile=side, mean=tuple(cfg.get("mean", IMAGENET_MEAN)), std=tuple(cfg.get("std", IMAGENET_STD)), kind="timm")


def load_encoder(
    encoder: Any = None,
    *,
    spec: EncoderSpec | None = None,
    weights: str | os.PathLike[str] | None = None,
    timm_kwargs: Mapping[str, Any] | None = None,
    device: str = "cpu",
    precision: str = "fp32",
) -> LoadedEncoder:
    """The encoder an ``encoder=`` argument names, checked in the client and ready to travel.

    Parameters
    ----------
    encoder
        - None: the VAE (``weights``: its weights file; None: the shipped default);
        - a :class:`~wsi_xr.models.VAE2`, or the path of VAE weights (a ``torch.save`` file that is
          not TorchScript): the VAE;
        - a ``torch.nn.Module`` mapping ``(N, 3, T, T)`` float to ``(N, D)``: needs ``spec``;
          ``weights`` (optional) is a state-dict file loaded into a copy;
        - the path of a TorchScript file: needs ``spec``;
        - a timm model name (``"resnet50"`` or ``"timm:resnet50"``): needs ``weights``, a local file;
          ``spec`` optional (from the model's config), ``timm_kwargs`` passed to ``timm.create_model``;
        - a :class:`LoadedEncoder`: itself, on ``device`` at ``precision``.
    spec
        The :class:`EncoderSpec` (tile side, normalisation, target mpp); its ``kind`` is set here.
    device, precision
        Where the tasks run the encoder, and ``"fp32"`` (exact, the default) or ``"bf16"`` (autocast).

    Raises
    ------
    WeightsError
        A file is missing (named), damaged, or does not fit the architecture (the first key named).
    InvalidArgumentError
        A missing or invalid spec, an unknown timm name, a module that does not give ``(N, D)``.
    MissingDependencyError
        timm (or safetensors) is needed and cannot be imported.
    """
    if isinstance(encoder, LoadedEncoder):
        return encoder.with_options(device=device, precision=precision)
    if encoder is None or isinstance(encoder, VAE2):
        if spec is not None and spec.kind != "vae":
            raise InvalidArgumentError(f"spec {spec.name!r} of kind {spec.kind!r} given without an encoder; the default encoder is the VAE")
        return vae_encoder(encoder if isinstance(encoder, VAE2) else weights, device=device, precision=precision)
    if isinstance(encoder, nn.Module):
        if spec is None:
            raise InvalidArgumentError(
                f"a torch.nn.Module encoder ({type(encoder).__name__}) needs spec=EncoderSpec(name, tile=T, mean=..., std=...)"
            )
        return module_encoder(encoder, spec, weights=weights, device=device, precision=precision)
    if not isinstance(encoder, (str, os.PathLike)):
        raise InvalidArgumentError(
            f"encoder={encoder!r}: give None (the VAE), a torch.nn.Module, a TorchScript file, a timm model name with weights=, or a LoadedEncoder"
        )
    text = os.fspath(encoder)
    if isinstance(encoder, str) and encoder.startswith("timm:"):
        return _timm_by_name(encoder[len("timm:") :], spec, weights, timm_kwargs, device, precision)
    p = Path(text).expanduser()
    # a path: it exists, or is given as one, or looks like one; "vit_small_patch16_224.augreg_in21k" is a timm name
    if p.exists() or isinstance(encoder, os.PathLike) or "/" in text or os.sep in text or p.suffix.lower() in FILE_SUFFIXES:
        _existing_file(p, "encoder file")
        if is_torchscript_file(p):
            if spec is None:
                raise InvalidArgumentError(
                    f"the TorchScript file '{p}' needs spec=EncoderSpec(name, tile=T, mean=..., std=...): its tile size and normalisation "
                    "(wsi-xr run: --encoder-tile T, --encoder-mean R,G,B, --encoder-std R,G,B)"
                )
            return torchscript_encoder(p, spec, device=device, precision=precision)
        if spec is not None and spec.kind != "vae":
            raise InvalidArgumentError(
                f"encoder file '{p}' is not TorchScript (no code/ inside), so it is read as VAE weights, but spec {spec.name!r} "
                "is not the VAE's; save the model with torch.jit.save, or pass a torch.nn.Module with weights="
            )
        return vae_encoder(p, device=device, precision=precision)
    return _timm_by_name(text, spec, weights, timm_kwargs, device, precision)


def _timm_by_name(
    name: str, spec: EncoderSpec | None, weights: Any, timm_kwargs: Mapping[str, Any] | None, device: str, precision: str
) -> LoadedEncoder:
    if weights is None:
        raise InvalidArgumentError(
            f"timm model {name!r} needs weights=, a local weights file (.pth, .bin or .safetensors): wsi_xr never downloads weights"
        )
    return timm_encoder(name, weights, spec=spec, timm_kwargs=timm_kwargs, device=device, precision=precision)


# ---------------------------------------------------------------------------------------------
# Encoding


def _module_device(module: Any) -> torch.device:
    for tensor in module.parameters():
        return torch.device(tensor.device)
    for tensor in module.buffers():
        return torch.device(tensor.device)
    return torch.device("cpu")


def _as_tiles(tiles: Any, spec: EncoderSpec) -> tuple[torch.Tensor, bool]:
    """``tiles`` as a uint8 ``(N, T, T, 3)`` tensor (NumPy shares memory), and whether they were NumPy."""
    if isinstance(tiles, torch.Tensor):
        t, as_numpy = tiles, False
    else:
        arr = np.asarray(tiles)
        if arr.dtype != np.uint8:
            raise InvalidArgumentError(f"tiles for encoder {spec.name!r} must be uint8 RGB (N, T, T, 3), got dtype {arr.dtype}")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # a read-only array (Dask, Zarr) is only read
            t, as_numpy = torch.from_numpy(arr), True
    if t.dtype != torch.uint8:
        raise InvalidArgumentError(f"tiles for encoder {spec.name!r} must be uint8 RGB (N, T, T, 3), got dtype {t.dtype}")
    if t.ndim != 4 or tuple(t.shape[1:]) != (spec.tile, spec.tile, CHANNELS):
        raise InvalidArgumentError(f"encoder {spec.name!r} takes tiles of shape (N, {spec.tile}, {spec.tile}, {CHANNELS}), got {tuple(t.shape)}")
    return t, as_numpy


def encode_batch(
    module: Any,
    tiles: Any,
    spec: EncoderSpec,
    *,
    batch_size: int | None = None,
    precision: str = "fp32",
    torch_threads: int | None = None,
) -> Any:
    """Features ``(N, D)`` float32 of ``(N, T, T, 3)`` uint8 tiles by ``module``, described by ``spec``.

    Each batch of ``batch_size`` tiles (None: :data:`DEFAULT_ENCODER_BATCH`, or the VAE's measured
    default) is scaled to ``[0, 1]`` (``tile / 255`` in float32), normalised as
    ``(x - spec.mean) / spec.std`` per channel (skipped for the identity), laid out as
    ``(N, 3, T, T)`` (channels-last memory, which the uint8 tiles have already) on the module's
    device, and run in :func:`torch.inference_mode`. ``precision="bf16"`` runs the module under
    bfloat16 autocast (opt-in); ``"fp32"`` runs it as it is. Torch's thread count is left alone
    unless ``torch_threads`` is given (set for the call, then put back). The VAE (``spec.kind ==
    "vae"``) runs through :func:`~wsi_xr.models.encode_tiles`, exactly as :mod:`wsi_xr.encode` does.

    ``module`` must be in eval mode (what :func:`worker_encoder` returns): in training mode,
    BatchNorm and dropout would make a tile's features depend on its batch. ``tiles`` may be NumPy
    (the result is NumPy) or a torch tensor on any device (the result is a tensor on the module's device).

    Raises
    ------
    InvalidArgumentError
        Tiles of another shape or dtype, a bad batch size or precision, a module in training mode,
        or a module whose output is not ``(N, D)`` (with ``D = spec.features`` when known).
    """
    _check_precision(precision, vae=spec.kind == "vae")
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1):
        raise InvalidArgumentError(f"batch_size={batch_size!r}: must be an integer >= 1 (or None: the default)")
    if getattr(module, "training", False):
        raise InvalidArgumentError(
            f"encoder {spec.name!r} is in training mode: call .eval() first (BatchNorm and dropout would make features depend on the batch)"
        )
    t, as_numpy = _as_tiles(tiles, spec)
    if torch_threads is not None and (isinstance(torch_threads, bool) or not isinstance(torch_threads, int) or torch_threads < 1):
        raise InvalidArgumentError(f"torch_threads={torch_threads!r}: use None (leave torch alone) or an integer >= 1")
    with torch_threads_scope(torch_threads):
        if spec.kind == "vae":
            return encode_tiles(module, tiles, batch_size=batch_size, precision=precision)
        device = _module_device(module)
        if batch_size is None:
            batch_size = DEFAULT_ENCODER_BATCH.get(device.type, DEFAULT_ENCODER_BATCH["cpu"])
        n = int(t.shape[0])
        features = spec.features
        out: torch.Tensor | None = None if features is None else torch.empty((n, features), dtype=torch.float32, device=device)
        mean = std = None
        if spec.normalises:
            mean = torch.tensor(spec.mean, dtype=torch.float32, device=device).view(1, CHANNELS, 1, 1)
            std = torch.tensor(spec.std, dtype=torch.float32, device=device).view(1, CHANNELS, 1, 1)
        autocast = torch.autocast(device_type=device.type, dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()
        with torch.inference_mode():
            for start in range(0, n, batch_size):
                chunk = t[start : start + batch_size].to(device, non_blocking=True)
                x = chunk.permute(0, 3, 1, 2).to(torch.float32, memory_format=torch.channels_last).div_(255.0)
                if mean is not None and std is not None:
                    x = x.sub_(mean).div_(std)
                with autocast:
                    y = module(x)
                y = _check_output(y, int(x.shape[0]), features, spec)
                if out is None:
                    features = int(y.shape[1])
                    out = torch.empty((n, features), dtype=torch.float32, device=device)
                out[start : start + x.shape[0]] = y
        if out is None:  # no tiles and D not known
            out = torch.empty((0, 0), dtype=torch.float32, device=device)
    return out.cpu().numpy() if as_numpy else out


def _check_output(y: Any, n: int, features: int | None, spec: EncoderSpec) -> torch.Tensor:
    if not isinstance(y, torch.Tensor):
        raise InvalidArgumentError(
            f"encoder {spec.name!r} returned a {type(y).__name__}, not an (N, D) tensor of features; "
            "wrap it so that forward returns the feature tensor only"
        )
    if y.ndim != 2 or y.shape[0] != n or (features is not None and y.shape[1] != features):
        want = f"({n}, {features})" if features is not None else f"({n}, D)"
        raise InvalidArgumentError(
            f"encoder {spec.name!r} maps {n} tiles of {spec.tile}x{spec.tile} to shape {tuple(y.shape)}, not {want}; "
            "an encoder must return one feature vector per tile (pool or flatten its output)"
        )
    return y.float()
