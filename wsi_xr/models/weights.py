"""Weight files for :class:`~wsi_xr.models.vae.VAE2`: save, load, inspect, hash.

File format (a regular ``torch.save`` file, readable with ``torch.load(weights_only=True)``)::

    {
        "state_dict": {"module.encoder.0.weight": tensor, ...},   # as nn.DataParallel saves it
        "wsi_xr": {"format": 1, "tile_size": 64, "latent_size": 32, "channels": 3,
                   "wsi_xr_version": "...", "training": {...caller's metadata...}},
    }

The ``state_dict`` part is exactly the reference notebook's checkpoint layout, so files
written here load in the reference code and vice versa. :func:`load_vae` also takes
plain state dicts, with or without the ``module.`` prefix. Files are only ever read with
``weights_only=True``: a file holding arbitrary Python objects is refused, never run.
"""

from __future__ import annotations

import hashlib
import io
import os
import tempfile
import warnings
import zipfile
from collections.abc import Mapping
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import torch

from wsi_xr.errors import InvalidArgumentError, WeightsError
from wsi_xr.models.vae import CHANNELS, LATENT_SIZE, TILE_SIZE, VAE2, torch_device

__all__ = [
    "DEFAULT_WEIGHTS_NAME",
    "FORMAT_VERSION",
    "default_weights_path",
    "load_vae",
    "read_metadata",
    "save_vae",
    "weights_hash",
]

#: File name of the default weights shipped inside the package (``wsi_xr/models/``).
DEFAULT_WEIGHTS_NAME = "default_vae.pt"
#: Version of the ``"wsi_xr"`` metadata block written by :func:`save_vae`.
FORMAT_VERSION = 1

_PREFIXES = ("module.", "_orig_mod.")  # nn.DataParallel / DistributedDataParallel, torch.compile
_FIX = "pass weights saved from wsi_xr's VAE2 (or the reference notebook), or train new ones with `wsi-xr train`"


def _wsi_xr_version() -> str:
    try:
        return version("wsi_xr")
    except PackageNotFoundError:  # running from a source tree
        return "0+unknown"


def default_weights_path() -> Path:
    """Where the package's default weights live (the file may not exist in this build)."""
    return Path(__file__).resolve().with_name(DEFAULT_WEIGHTS_NAME)


def _resolve(path: str | os.PathLike[str] | None) -> Path:
    """The weights file to read, checked to be an existing, non-empty regular file."""
    if path is None:
        p = default_weights_path()
        if not p.is_file():
            raise WeightsError(
                f"the default VAE weights are not shipped with this build of wsi_xr (looked for {p}); "
                "pass the path of a weights file, or train weights with `wsi-xr train`"
            )
        return p
    return existing_file(path, "weights file", "check the path or train weights with `wsi-xr train`")


def existing_file(path: str | os.PathLike[str], what: str, missing: str = "check the path") -> Path:
    """``path`` as an existing, non-empty regular file, or a :class:`WeightsError` naming it
    as ``what`` (``missing``: the advice when it does not exist)."""
    p = Path(os.fspath(path)).expanduser()
    if not p.exists():
        raise WeightsError(f"{what} '{p}' does not exist; {missing}")
    if p.is_dir():
        raise WeightsError(f"{what} '{p}' is a directory, not a file; pass the file inside it")
    try:
        size = p.stat().st_size
    except OSError as err:
        raise WeightsError(f"{what} '{p}' cannot be read ({err.strerror}); check its permissions") from err
    if size == 0:
        raise WeightsError(f"{what} '{p}' is empty (0 bytes): it was not written completely; save or copy it again")
    return p


def _one_line(text: object, limit: int = 160) -> str:
    line = " ".join(str(text).split())
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _check_zip(p: Path) -> None:
    """Verify every record's CRC of a zip-format torch file (torch itself does not)."""
    try:
        with zipfile.ZipFile(p) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as err:
        raise WeightsError(f"weights file '{p}' is a damaged or truncated PyTorch file ({_one_line(err, 80)}); copy or save it again") from err
    if bad is not None:
        raise WeightsError(f"weights file '{p}' is damaged: its record '{bad}' fails its checksum; copy or save it again")


def _torch_detail(err: BaseException) -> str:
    """The informative part of a torch.load error, on one short line."""
    text = str(err)
    if "WeightsUnpickler error:" in text:
        text = text.split("WeightsUnpickler error:", 1)[1]
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    first = lines[0].split(". ")[0] if lines else "no detail"
    return f"{type(err).__name__}: {_one_line(first, 100)}"


def _read_checkpoint(p: Path) -> Any:
    """``torch.load(p, weights_only=True)`` on the CPU, every failure as a WeightsError."""
    try:
        with open(p, "rb") as fh:
            magic = fh.read(4)
    except OSError as err:
        raise WeightsError(f"weights file '{p}' cannot be read ({err.strerror}); check its permissions") from err
    if magic == b"PK\x03\x04":
        _check_zip(p)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. "Detected pickle protocol 4 in the checkpoint"
            return torch.load(p, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises RuntimeError, UnpicklingError, EOFError, KeyError, ...
        text = str(err)
        if "Unsupported global" in text:
            name = text.split("Unsupported global:", 1)[1].split(" was not", 1)[0].replace("GLOBAL", "").strip()
            raise WeightsError(
                f"weights file '{p}' holds Python objects ({_one_line(name, 80)}), not just tensors, and wsi_xr "
                "does not unpickle those (they could run code); re-save only the weights, e.g. "
                "torch.save({'state_dict': model.state_dict()}, path)"
            ) from err
        if magic == b"PK\x03\x04":
            raise WeightsError(f"weights file '{p}' is a damaged PyTorch file ({_torch_detail(err)}); copy or save it again") from err
        raise WeightsError(
            f"weights file '{p}' is not a PyTorch weights file, or is damaged ({_torch_detail(err)}); pass a .pt file written by torch.save"
        ) from err


def _extract_state_dict(obj: Any, p: Path) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint, keys stripped of DataParallel / compile prefixes."""
    if not isinstance(obj, Mapping):
        raise WeightsError(f"weights file '{p}' holds a {type(obj).__name__}, not a state dict of tensors; {_FIX}")
    inner = obj.get("state_dict")
    if isinstance(inner, Mapping):
        obj = inner
    tensors: dict[str, torch.Tensor] = {}
    for key, value in obj.items():
        if isinstance(key, str) and isinstance(value, torch.Tensor):
            name = key
            stripped = True
            while stripped:
                stripped = False
                for prefix in _PREFIXES:
                    if name.startswith(prefix):
                        name, stripped = name[len(prefix) :], True
            if name in tensors:
                raise WeightsError(f"weights file '{p}' holds the parameter '{name}' twice (as '{key}'); {_FIX}")
            tensors[name] = value
    if not tensors:
        keys = ", ".join(repr(k) for k in list(obj.keys())[:5])
        raise WeightsError(f"weights file '{p}' holds no tensors (top-level keys: {keys or 'none'}); {_FIX}")
    return tensors


def _check_against(model: VAE2, tensors: dict[str, torch.Tensor], p: Path) -> None:
    """Raise a WeightsError naming the first few keys / shapes that do not fit ``model``."""
    expected = model.state_dict()
    # BatchNorm's counter is absent from very old checkpoints; it has no effect in eval mode.
    missing = [k for k in expected if k not in tensors and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in tensors if k not in expected]
    mismatched = [
        f"{k} {tuple(tensors[k].shape)} vs {tuple(v.shape)}"
        for k, v in expected.items()
        if k in tensors and tuple(tensors[k].shape) != tuple(v.shape)
    ]
    problems = []
    if mismatched:
        shown = ", ".join(mismatched[:3])
        problems.append(f"shapes differ in {len(mismatched)} tensors (file vs model): {shown}")
    if missing:
        problems.append(f"missing keys ({len(missing)}): " + ", ".join(missing[:3]))
    if unexpected:
        problems.append(f"unexpected keys ({len(unexpected)}): " + ", ".join(unexpected[:3]))
    if problems:
        raise WeightsError(
            f"weights file '{p}' was made for another model, not VAE2 (64x64 RGB tiles, {LATENT_SIZE} latents): " + "; ".join(problems) + f"; {_FIX}"
        )
    bad = [k for k, t in tensors.items() if k in expected and (t.is_floating_point() or t.is_complex()) and not bool(torch.isfinite(t).all())]
    if bad:
        shown = ", ".join(bad[:3]) + (", ..." if len(bad) > 3 else "")
        raise WeightsError(
            f"weights file '{p}' holds NaN or infinite values (in {shown}); training diverged or the file "
            "is damaged: use another checkpoint or train again with a lower lr"
        )
    wrong_kind = [k for k, t in tensors.items() if expected[k].is_floating_point() and not t.is_floating_point()]
    if wrong_kind:
        shown = ", ".join(wrong_kind[:3])
        raise WeightsError(f"weights file '{p}' holds integer tensors where VAE2 has weights ({shown}); {_FIX}")


def load_vae(path: str | os.PathLike[str] | None = None, *, device: str | torch.device = "cpu") -> VAE2:
    """Load VAE2 weights and return the model in eval mode on ``device``.

    Parameters
    ----------
    path
        A weights file: one written by :func:`save_vae`, a reference checkpoint
        ``{"state_dict": ...}`` saved from ``nn.DataParallel`` (keys ``module.*``), or a
        plain state dict with or without that prefix. ``None`` loads the default weights
        shipped in the package.
    device
        Where to put the model (``"cpu"``, ``"cuda"``, ``"cuda:1"``, ...).

    Raises
    ------
    WeightsError
        The file is missing, a directory, empty, not a PyTorch file, damaged, holds
        Python objects other than tensors, was made for another model, or holds
        non-finite values. The message names the file and says what to do.
    InvalidArgumentError
        ``device`` is not a valid or available torch device.
    """
    dev = torch_device(device)
    p = _resolve(path)
    return _build_model(_extract_state_dict(_read_checkpoint(p), p), p, dev)


def load_vae_bytes(data: bytes, *, device: str | torch.device = "cpu", label: str = "weights in memory") -> VAE2:
    """:func:`load_vae` from the bytes of a weights file (as :func:`vae_bytes` or reading a file gives them).

    This is how a model travels to Dask workers: as bytes in the graph, never as a path
    that only the client can see. ``label`` names the weights in error messages.
    """
    dev = torch_device(device)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as err:
        raise WeightsError(f"{label}: not a readable PyTorch weights file ({_torch_detail(err)})") from err
    return _build_model(_extract_state_dict(obj, Path(label)), Path(label), dev)


def _build_model(tensors: dict[str, torch.Tensor], p: Path, dev: torch.device) -> VAE2:
    """A VAE2 holding ``tensors``, in eval mode on ``dev`` (``p`` names them in errors)."""
    model = VAE2()
    _check_against(model, tensors, p)
    try:
        model.load_state_dict(tensors, strict=False)
    except RuntimeError as err:  # e.g. a dtype that cannot be copied into a float parameter
        detail = _one_line(str(err), 120)
        raise WeightsError(f"weights file '{p}' cannot be loaded into VAE2 ({detail}); {_FIX}") from err
    model.eval()
    try:
        return model.to(dev)
    except (RuntimeError, AssertionError) as err:  # AssertionError: "Torch not compiled with CUDA enabled"
        raise InvalidArgumentError(f"cannot move the model to device {str(dev)!r} ({_one_line(str(err), 100)}); use device='cpu'") from err


def read_metadata(path: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """The ``"wsi_xr"`` metadata block of a weights file (``{}`` for reference checkpoints).

    ``None`` reads the default weights shipped in the package. Raises :class:`WeightsError`
    as :func:`load_vae` does when the file cannot be read.
    """
    p = _resolve(path)
    obj = _read_checkpoint(p)
    meta = obj.get("wsi_xr") if isinstance(obj, Mapping) else None
    return dict(meta) if isinstance(meta, Mapping) else {}


def weights_hash(path: str | os.PathLike[str] | None = None) -> str:
    """SHA-256 (hex) of the weights file's bytes, for provenance. ``None``: the default weights."""
    return sha256_of_file(_resolve(path))


def sha256_of_file(p: Path) -> str:
    """SHA-256 (hex) of an existing file's bytes, read in 1 MiB blocks.

    Raises
    ------
    WeightsError
        If the file cannot be read.
    """
    digest = hashlib.sha256()
    try:
        with open(p, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
    except OSError as err:
        raise WeightsError(f"weights file '{p}' cannot be read ({err.strerror}); check its permissions") from err
    return digest.hexdigest()


def _plain(value: Any, where: str) -> Any:
    """``value`` as plain JSON-like Python (dict / list / str / int / float / bool / None)."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, Mapping):
        return {str(k): _plain(v, f"{where}[{k!r}]") for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v, f"{where}[{i}]") for i, v in enumerate(value)]
    item = getattr(value, "item", None)  # NumPy scalars, 0-d arrays and tensors
    if callable(item) and getattr(value, "ndim", 0) == 0:
        return _plain(item(), where)
    tolist = getattr(value, "tolist", None)  # small NumPy arrays / tensors
    if callable(tolist):
        return _plain(tolist(), where)
    raise InvalidArgumentError(f"metadata value {where} is a {type(value).__name__}; use numbers, strings, lists and dicts only")


def is_weights_file(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a file ``torch.save`` wrote: a zip archive holding ``<name>/data.pkl``, or a legacy pickle.

    (A .docx is a zip archive too: the layout tells them apart.)
    """
    import zipfile

    try:
        with open(path, "rb") as fh:
            head = fh.read(4)
        if head.startswith(b"\x80"):
            return True
        if not head.startswith(b"PK\x03\x04"):
            return False
        with zipfile.ZipFile(path) as archive:
            return any(name.endswith("/data.pkl") for name in archive.namelist())
    except (OSError, zipfile.BadZipFile):
        return False


def vae_bytes(model: VAE2, *, metadata: Mapping[str, Any] | None = None) -> bytes:
    """The bytes :func:`save_vae` writes for ``model`` and ``metadata`` (identical inputs, identical bytes)."""
    training = _plain(dict(metadata or {}), "metadata")
    module = getattr(model, "module", model)  # accept an nn.DataParallel wrapper too
    state = {"module." + k: v.detach().to("cpu", copy=True).contiguous() for k, v in module.state_dict().items()}
    meta = {
        "format": FORMAT_VERSION,
        "model": type(module).__name__,
        "tile_size": TILE_SIZE,
        "latent_size": int(getattr(module, "z_dim", LATENT_SIZE)),
        "channels": int(getattr(module, "image_channels", CHANNELS)),
        "wsi_xr_version": _wsi_xr_version(),
        "training": training,
    }
    buffer = io.BytesIO()  # the archive's inner folder name comes from the file name: keep it fixed
    torch.save({"state_dict": state, "wsi_xr": meta}, buffer)
    return buffer.getvalue()


def save_vae(model: VAE2, path: str | os.PathLike[str], *, metadata: Mapping[str, Any] | None = None) -> Path:
    """Write ``model``'s weights (reference checkpoint layout) plus wsi_xr metadata to ``path``.

    The state dict is saved with ``module.``-prefixed keys, as the reference notebook's
    ``nn.DataParallel`` checkpoints are, so the file loads in either code base. The
    ``"wsi_xr"`` block records the tile size, latent size, channels, the wsi_xr version
    and, under ``"training"``, whatever the caller passes as ``metadata`` (slides, epochs,
    validation loss, seed, ...; JSON-like values only). The file is written atomically
    (a temporary file in the same folder, then :func:`os.replace`), and identical weights
    and metadata give byte-identical files: :func:`vae_bytes`.

    Returns the path written.
    """
    target = Path(os.fspath(path)).expanduser()
    if target.is_dir():
        raise InvalidArgumentError(f"cannot save weights to '{target}': it is a directory; pass a file name (.pt)")
    if target.is_file() and not is_weights_file(target):  # replace only a weights file
        raise InvalidArgumentError(f"cannot save weights to '{target}': it exists and is not a weights file; choose another path")
    data = vae_bytes(model, metadata=metadata)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes 0600 files; weights are meant to be shared
        os.replace(tmp, target)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return target
