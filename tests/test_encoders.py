"""Any encoder (wsi_xr.models.encoders): specs, the four ways to give one, bytes to workers, errors.

Real torch, tiny models. The expected features are computed by hand in each test: ``tile / 255``,
``(x - mean) / std`` per channel, NCHW, the module in eval mode without gradients. The same
float32 operations on the same batch give the same bits, so those comparisons are exact.
The timm tests need timm with a working torchvision; they skip, saying why, without it.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from tests.numerics import assert_float32_exact, assert_within_bound
from wsi_xr.errors import InvalidArgumentError, WeightsError
from wsi_xr.models import VAE2, load_vae
from wsi_xr.models.encoders import (
    ENCODER_CACHE_SIZE,
    IMAGENET_MEAN,
    IMAGENET_STD,
    VAE_SPEC,
    EncoderSpec,
    LoadedEncoder,
    MissingDependencyError,
    _encoders,
    _import_timm,
    encode_batch,
    load_encoder,
    state_dict_sha256,
    timm_encoder,
    torchscript_encoder,
    worker_encoder,
)
from wsi_xr.models.rounding import fp32_mu_bound

# TorchScript is deprecated in torch 2.13 (torch.jit.script / save warn); it is still what users have as files
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit")

HISTO_MEAN, HISTO_STD = (0.70, 0.55, 0.72), (0.15, 0.20, 0.12)  # not ImageNet's: the spec's own numbers are used


def _tiles(n: int, side: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, side, side, 3), dtype=np.uint8)


def _by_hand(module: Any, tiles: np.ndarray, mean: Any, std: Any, batch: int | None = None) -> np.ndarray:
    """What an encoder must give: (tile / 255 - mean) / std, NCHW float32, eval mode, no gradients."""
    module.eval()
    x = torch.from_numpy(tiles).permute(0, 3, 1, 2).float() / 255.0
    x = (x - torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)) / torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
    batch = batch or len(tiles)
    with torch.inference_mode():
        return torch.cat([module(x[i : i + batch]) for i in range(0, len(tiles), batch)]).numpy()


def tiny_cnn(seed: int = 0) -> nn.Module:
    """A small convolutional encoder for 224-px tiles: (N, 3, 224, 224) -> (N, 8)."""
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Conv2d(3, 8, 7, stride=4), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    with torch.no_grad():  # BatchNorm statistics other than 0 / 1, so that eval mode matters
        net[1].running_mean.uniform_(-0.1, 0.1)
        net[1].running_var.uniform_(0.5, 2.0)
    return net


def tiny_vit(seed: int = 0) -> nn.Module:
    """A small vision transformer for 256-px tiles, (N, 3, 256, 256) -> (N, 32), its class defined here
    (as in a notebook: not importable, so it travels by value)."""

    class TinyViT(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.patch = nn.Conv2d(3, 32, 32, stride=32)  # 8 x 8 patches of 32 px
            self.pos = nn.Parameter(torch.randn(1, 64, 32) * 0.02)
            self.block = nn.TransformerEncoderLayer(32, 2, 64, dropout=0.1, batch_first=True)
            self.norm = nn.LayerNorm(32)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            tokens = self.patch(x).flatten(2).transpose(1, 2) + self.pos
            return self.norm(self.block(tokens).mean(dim=1))

    torch.manual_seed(seed)
    return TinyViT()


# ---------------------------------------------------------------------------------------------
# The spec


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"tile": 0}, "tile=0"),
        ({"tile": -224}, "tile=-224"),
        ({"tile": 224.0}, "tile=224.0"),
        ({"tile": True}, "tile=True"),
        ({"mean": (0.5, 0.5)}, "mean"),
        ({"mean": "abc"}, "mean"),
        ({"mean": (0.5, 0.5, None)}, "mean"),
        ({"std": (0.2, 0.2, 0.2, 0.2)}, "std"),
        ({"std": (0.2, 0.0, 0.2)}, "std"),
        ({"std": (0.2, float("nan"), 0.2)}, "std"),
        ({"target_mpp": 0}, "target_mpp"),
        ({"features": 0}, "features"),
        ({"kind": "onnx"}, "kind"),
        ({"name": ""}, "name"),
    ],
)
def test_spec_refuses_bad_values_naming_them(kwargs: dict[str, Any], match: str) -> None:
    arguments: dict[str, Any] = {"name": "enc", "tile": 224, **kwargs}
    with pytest.raises(InvalidArgumentError, match=match):
        EncoderSpec(**arguments)


def test_spec_attrs_are_json_and_read_back() -> None:
    spec = EncoderSpec("uni", tile=224, mean=np.array(HISTO_MEAN), std=torch.tensor(HISTO_STD, dtype=torch.float64), target_mpp=0.5, features=1024)
    assert spec.mean == HISTO_MEAN and isinstance(spec.mean, tuple)
    attrs = json.loads(json.dumps(spec.attrs()))  # JSON-able, as a store keeps it
    assert attrs["encoder"] == "uni" and attrs["encoder_tile"] == 224 and attrs["encoder_target_mpp"] == 0.5
    assert EncoderSpec.from_attrs(attrs) == spec
    with pytest.raises(InvalidArgumentError, match="encoder_tile"):
        EncoderSpec.from_attrs({"encoder": "x"})


def test_vae_spec_is_the_vae_as_wsi_xr_runs_it() -> None:
    assert (VAE_SPEC.tile, VAE_SPEC.features, VAE_SPEC.kind, VAE_SPEC.target_mpp) == (64, 32, "vae", None)
    assert not VAE_SPEC.normalises  # tiles_to_tensor feeds the VAE tile / 255, nothing more


# ---------------------------------------------------------------------------------------------
# The VAE through the encoder interface


def test_vae_encoder_gives_the_encode_paths_features(weights: Path) -> None:
    from wsi_xr.encode import encode_block, prepare_model

    tiles = _tiles(4, 64, seed=3)
    enc = load_encoder(None, weights=weights)
    prepared = prepare_model(weights)
    assert enc.sha256 == prepared.ref.sha256 == hashlib.sha256(weights.read_bytes()).hexdigest()
    assert enc.spec == VAE_SPEC and enc.attrs()["encoder_sha256"] == enc.sha256
    ours = enc.encode(tiles)
    pixels = tiles.reshape(2, 2, 64, 64, 3).transpose(0, 2, 1, 3, 4).reshape(128, 128, 3)  # the tiles in a 2 x 2 grid
    theirs = encode_block(pixels, np.ones((2, 2), bool), prepared.ref, weights=prepared.data).reshape(4, 32)
    bound = fp32_mu_bound(load_vae(weights), tiles)
    assert_float32_exact(ours, bound, "VAE through load_encoder")
    assert_within_bound(ours, theirs.astype(np.float64), 2 * bound.worst_case, "VAE through load_encoder against wsi_xr.encode")
    # a VAE2 object gives the bytes and hash prepare_model gives it
    model = VAE2().eval()
    assert load_encoder(model).sha256 == prepare_model(model).ref.sha256


# ---------------------------------------------------------------------------------------------
# A torch.nn.Module


@pytest.mark.parametrize(("factory", "side"), [(tiny_cnn, 224), (tiny_vit, 256)])
def test_module_encoder_applies_the_spec_normalisation(factory: Any, side: int) -> None:
    module = factory()
    spec = EncoderSpec(f"tiny-{side}", tile=side, mean=HISTO_MEAN, std=HISTO_STD)
    enc = load_encoder(module, spec=spec)
    assert module.training  # the caller's module is left as it was; a copy runs
    assert enc.spec.kind == "module" and enc.spec.features == _by_hand(module, _tiles(1, side), HISTO_MEAN, HISTO_STD).shape[1]
    tiles = _tiles(5, side)
    features = enc.encode(tiles)
    assert features.dtype == np.float32 and features.shape == (5, enc.spec.features)
    np.testing.assert_array_equal(features, _by_hand(module, tiles, HISTO_MEAN, HISTO_STD))
    assert not np.allclose(features, _by_hand(module, tiles, (0, 0, 0), (1, 1, 1)), atol=1e-3)  # the normalisation matters
    # in batches of 2: each batch as the module gets it by hand
    np.testing.assert_array_equal(enc.encode(tiles, batch_size=2), _by_hand(module, tiles, HISTO_MEAN, HISTO_STD, batch=2))


def test_module_sha256_is_of_the_state_dict() -> None:
    a, b = tiny_cnn(seed=1), tiny_cnn(seed=1)
    spec = EncoderSpec("tiny", tile=224)
    assert load_encoder(a, spec=spec).sha256 == load_encoder(b, spec=spec).sha256 == state_dict_sha256(a)
    with torch.no_grad():
        b[0].weight[0, 0, 0, 0] += 1e-6
    assert state_dict_sha256(b) != state_dict_sha256(a)
    assert state_dict_sha256(a.double()) != state_dict_sha256(tiny_cnn(seed=1))  # the dtype counts


def test_module_with_a_weights_file(tmp_path: Path) -> None:
    trained, fresh = tiny_cnn(seed=1), tiny_cnn(seed=2)
    path = tmp_path / "cnn.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in trained.state_dict().items()}}, path)  # as DataParallel saves
    enc = load_encoder(fresh, spec=EncoderSpec("cnn", tile=224), weights=path)
    assert enc.sha256 == hashlib.sha256(path.read_bytes()).hexdigest() and enc.ref.source == str(path.resolve())
    tiles = _tiles(3, 224)
    np.testing.assert_array_equal(enc.encode(tiles), _by_hand(trained, tiles, (0, 0, 0), (1, 1, 1)))


def test_torch_threads_are_left_alone_unless_asked() -> None:
    seen: list[int] = []

    class Probe(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            seen.append(torch.get_num_threads())
            return x.mean(dim=(2, 3))

    before = torch.get_num_threads()
    spec = EncoderSpec("probe", tile=32)
    encode_batch(Probe().eval(), _tiles(2, 32), spec)
    encode_batch(Probe().eval(), _tiles(2, 32), spec, torch_threads=1)
    assert seen == [before, 1] and torch.get_num_threads() == before


def test_bf16_is_opt_in_and_recorded() -> None:
    module, tiles = tiny_cnn(), _tiles(4, 224)
    enc = load_encoder(module, spec=EncoderSpec("tiny", tile=224, mean=IMAGENET_MEAN, std=IMAGENET_STD))
    fp32 = enc.encode(tiles)
    half = enc.with_options(precision="bf16")
    assert half.attrs()["precision"] == "bf16" and enc.attrs()["precision"] == "fp32" and half.data is enc.data
    bf16 = half.encode(tiles)
    assert bf16.dtype == np.float32 and np.isfinite(bf16).all()
    assert not np.array_equal(bf16, fp32)  # autocast ran the convolution in bfloat16
    np.testing.assert_allclose(bf16, fp32, rtol=0, atol=0.05 * np.abs(fp32).max())
    with pytest.raises(InvalidArgumentError, match="precision='fp16'"):
        enc.with_options(precision="fp16")


# ---------------------------------------------------------------------------------------------
# A TorchScript file


def test_torchscript_file_round_trip(tmp_path: Path) -> None:
    scripted = torch.jit.script(tiny_cnn().eval())
    path = tmp_path / "encoder.ts"
    torch.jit.save(scripted, str(path))
    spec = EncoderSpec("ts", tile=224, mean=HISTO_MEAN, std=HISTO_STD, target_mpp=0.5)
    enc = load_encoder(path, spec=spec)
    assert enc.sha256 == hashlib.sha256(path.read_bytes()).hexdigest() == enc.attrs()["encoder_sha256"]
    assert enc.data == path.read_bytes() and enc.spec == spec.replace(kind="torchscript", features=8)
    tiles = _tiles(3, 224)
    np.testing.assert_array_equal(enc.encode(tiles), _by_hand(scripted, tiles, HISTO_MEAN, HISTO_STD))


# ---------------------------------------------------------------------------------------------
# Bytes to workers


def _encode_on_worker(ref: Any, data: bytes, tiles: np.ndarray) -> np.ndarray:
    """A task: the encoder from the bytes that travelled (loaded once in that process), then the tiles."""
    return encode_batch(worker_encoder(ref, data), tiles, ref.spec, precision=ref.precision)


def test_encoders_travel_as_bytes_to_a_distributed_worker_process(weights: Path, tmp_path: Path) -> None:
    distributed = pytest.importorskip("distributed")
    scripted = tmp_path / "cnn.ts"
    torch.jit.save(torch.jit.script(tiny_cnn().eval()), str(scripted))
    encoders = [
        load_encoder(tiny_vit(), spec=EncoderSpec("vit", tile=256, mean=HISTO_MEAN, std=HISTO_STD)),  # class by value
        load_encoder(scripted, spec=EncoderSpec("ts", tile=224)),
        load_encoder(None, weights=weights),
    ]
    # one torch thread, as distributed starts its worker processes (OMP_NUM_THREADS=1): the same sums in the same order
    expected = [enc.encode(_tiles(3, enc.spec.tile), torch_threads=1) for enc in encoders]
    with distributed.LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        with distributed.Client(cluster) as client:
            assert list(client.run(torch.get_num_threads).values()) == [1]
            assert list(client.run(os.getpid).values()) != [os.getpid()]  # another process
            futures = [client.submit(_encode_on_worker, enc.ref, enc.graph_input(client), _tiles(3, enc.spec.tile), pure=False) for enc in encoders]
            results = client.gather(futures)
    for enc, got, want in zip(encoders, results, expected):
        np.testing.assert_array_equal(got, want, err_msg=f"{enc.spec.name} on a worker process")


def test_a_fresh_load_from_bytes_gives_the_same_features() -> None:
    enc = load_encoder(tiny_vit(), spec=EncoderSpec("vit", tile=256))
    tiles = _tiles(2, 256)
    first = enc.encode(tiles)
    _encoders.clear()  # as in a new process
    with pytest.raises(InvalidArgumentError, match="not loaded in this process"):
        worker_encoder(enc.ref)
    np.testing.assert_array_equal(encode_batch(worker_encoder(enc.ref, enc.data), tiles, enc.spec), first)
    other = load_encoder(tiny_cnn(), spec=EncoderSpec("cnn", tile=224)).ref
    _encoders.clear()
    with pytest.raises(WeightsError, match="SHA-256 differs"):
        worker_encoder(other, enc.data)


def test_loaded_encoders_per_process_are_bounded() -> None:
    for seed in range(ENCODER_CACHE_SIZE + 2):
        load_encoder(tiny_cnn(seed), spec=EncoderSpec(f"cnn{seed}", tile=224))
    assert len(_encoders) == ENCODER_CACHE_SIZE


def test_graph_input_is_one_key_named_by_the_encoder() -> None:
    enc = load_encoder(tiny_cnn(), spec=EncoderSpec("cnn", tile=224))
    node = enc.graph_input()
    assert node.key == f"wsi-encoder-{enc.ref.key}" and node.compute() == enc.data


# ---------------------------------------------------------------------------------------------
# Errors


def test_missing_files_are_named(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / "encoder.ts"
    with pytest.raises(WeightsError, match="encoder.ts' does not exist"):
        load_encoder(missing, spec=EncoderSpec("x", tile=224))
    with pytest.raises(WeightsError, match="weights.pth' does not exist"):
        load_encoder(tiny_cnn(), spec=EncoderSpec("x", tile=224), weights=tmp_path / "weights.pth")
    with pytest.raises(WeightsError, match="r50.safetensors' does not exist"):
        load_encoder("resnet50", weights=tmp_path / "r50.safetensors")
    with pytest.raises(InvalidArgumentError, match="never downloads"):
        load_encoder("resnet50")
    with pytest.raises(InvalidArgumentError, match="'vit_small_patch16_224.augreg_in21k' needs weights="):  # a timm name with a tag, not a file
        load_encoder("vit_small_patch16_224.augreg_in21k")


def test_a_file_that_is_not_torchscript(tmp_path: Path) -> None:
    path = tmp_path / "encoder.ts"
    path.write_bytes(b"not a model at all" * 10)
    with pytest.raises(WeightsError, match="is not a TorchScript file"):
        torchscript_encoder(path, EncoderSpec("x", tile=224))
    with pytest.raises(InvalidArgumentError, match="is not TorchScript"):
        load_encoder(path, spec=EncoderSpec("x", tile=224))


def test_weights_that_do_not_fit_name_the_file_and_first_key(tmp_path: Path) -> None:
    other = nn.Sequential(nn.Conv2d(3, 16, 7, stride=4), nn.BatchNorm2d(16), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    path = tmp_path / "other.pth"
    torch.save(other.state_dict(), path)
    with pytest.raises(
        WeightsError, match=r"other.pth' does not fit .*first mismatch '0.weight' \(shape \(16, 3, 7, 7\) in the file, \(8, 3, 7, 7\)"
    ):
        load_encoder(tiny_cnn(), spec=EncoderSpec("x", tile=224), weights=path)
    torch.save({"0.weight": torch.zeros(8, 3, 7, 7)}, path)
    with pytest.raises(WeightsError, match=r"first mismatch '0.bias' \(in the model, not in the file\)"):
        load_encoder(tiny_cnn(), spec=EncoderSpec("x", tile=224), weights=path)


def test_outputs_that_are_not_n_by_d_are_refused_naming_the_encoder() -> None:
    unpooled = nn.Sequential(nn.Conv2d(3, 4, 32, stride=32))  # (N, 4, 7, 7)
    with pytest.raises(InvalidArgumentError, match=r"encoder 'unpooled' maps 1 tiles of 224x224 to shape \(1, 4, 7, 7\), not \(1, D\)"):
        load_encoder(unpooled, spec=EncoderSpec("unpooled", tile=224))

    class Pair(nn.Module):
        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return x.mean(dim=(2, 3)), x

    with pytest.raises(InvalidArgumentError, match="encoder 'pair' returned a tuple"):
        load_encoder(Pair(), spec=EncoderSpec("pair", tile=32))
    fixed = nn.Sequential(nn.Flatten(), nn.Linear(3 * 224 * 224, 4))
    with pytest.raises(InvalidArgumentError, match="encoder 'fixed' fails on a \\(1, 3, 256, 256\\) batch.*tile=256"):
        load_encoder(fixed, spec=EncoderSpec("fixed", tile=256))
    enc = load_encoder(tiny_cnn(), spec=EncoderSpec("cnn", tile=224))
    with pytest.raises(InvalidArgumentError, match=r"encoder 'cnn' takes tiles of shape \(N, 224, 224, 3\), got \(2, 256, 256, 3\)"):
        enc.encode(_tiles(2, 256))
    with pytest.raises(InvalidArgumentError, match="dtype float32"):
        enc.encode(_tiles(2, 224).astype(np.float32))
    with pytest.raises(InvalidArgumentError, match="training mode"):
        encode_batch(tiny_cnn(), _tiles(1, 224), enc.spec)
    with pytest.raises(InvalidArgumentError, match="needs spec="):
        load_encoder(tiny_cnn())


def test_timm_missing_says_how_to_install_it(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    path = tmp_path / "resnet.pth"
    torch.save(tiny_cnn().state_dict(), path)
    monkeypatch.setitem(sys.modules, "timm", None)  # what `import timm` meets where it is not installed
    with pytest.raises(MissingDependencyError, match="pip install timm"):
        load_encoder("resnet18", weights=path)
    with pytest.raises(InvalidArgumentError, match="may not set 'pretrained'"):
        timm_encoder("resnet18", path, timm_kwargs={"pretrained": True})


# ---------------------------------------------------------------------------------------------
# timm (skips where timm cannot be imported, saying why)


def _timm() -> Any:
    try:
        return _import_timm()
    except MissingDependencyError as err:
        pytest.skip(str(err))


def test_timm_resnet_and_vit_by_name_and_local_file(tmp_path: Path) -> None:
    timm = _timm()
    from safetensors.torch import save_file

    torch.manual_seed(0)
    resnet = timm.create_model("resnet18", pretrained=False, num_classes=0, layers=[1, 1, 1, 1])
    torch.save({"state_dict": resnet.state_dict()}, tmp_path / "resnet.pth")
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=256, depth=2)
    save_file(vit.state_dict(), str(tmp_path / "vit.safetensors"))
    cases = [
        ("resnet18", resnet, tmp_path / "resnet.pth", {"layers": [1, 1, 1, 1]}, 224, 512),
        ("timm:vit_tiny_patch16_224", vit, tmp_path / "vit.safetensors", {"img_size": 256, "depth": 2}, 256, 192),
    ]
    for name, model, path, kwargs, side, width in cases:
        enc = load_encoder(name, weights=path, timm_kwargs=kwargs)
        spec = enc.spec
        assert (spec.kind, spec.tile, spec.features) == ("timm", side, width)
        assert (spec.mean, spec.std) == (tuple(model.pretrained_cfg["mean"]), tuple(model.pretrained_cfg["std"]))
        assert enc.sha256 == hashlib.sha256(path.read_bytes()).hexdigest() and enc.data == path.read_bytes()
        assert enc.attrs()["encoder_timm_kwargs"] == kwargs
        tiles = _tiles(3, side)
        np.testing.assert_array_equal(enc.encode(tiles), _by_hand(model, tiles, spec.mean, spec.std), err_msg=name)
        _encoders.clear()  # a worker's fresh load: the model is rebuilt from its name, arguments and the file's bytes
        np.testing.assert_array_equal(enc.encode(tiles), _by_hand(model, tiles, spec.mean, spec.std), err_msg=f"{name} from bytes")


def test_timm_leaves_a_classifier_in_the_file_out(tmp_path: Path) -> None:
    timm = _timm()
    torch.manual_seed(0)
    classifier = timm.create_model("resnet18", pretrained=False, num_classes=10, layers=[1, 1, 1, 1])
    torch.save(classifier.state_dict(), tmp_path / "with-fc.pth")  # fc.weight, fc.bias: not features
    # a name with a pretrained tag is a timm name (not a file), made with pretrained=False all the same
    enc = load_encoder("resnet18.a1_in1k", weights=tmp_path / "with-fc.pth", timm_kwargs={"layers": [1, 1, 1, 1]}, spec=EncoderSpec("r", tile=224))
    assert enc.ref.timm_name == "resnet18.a1_in1k"
    classifier.reset_classifier(0)
    tiles = _tiles(2, 224)
    np.testing.assert_array_equal(enc.encode(tiles), _by_hand(classifier, tiles, (0, 0, 0), (1, 1, 1)))


def test_timm_errors(tmp_path: Path) -> None:
    timm = _timm()
    torch.save(timm.create_model("resnet18", pretrained=False, num_classes=0, layers=[1, 1, 1, 1]).state_dict(), tmp_path / "r.pth")
    with pytest.raises(InvalidArgumentError, match=r"timm has no model 'resnet5o' \(did you mean 'resnet50'.*timm.list_models\('\*resnet\*'\)"):
        load_encoder("resnet5o", weights=tmp_path / "r.pth")
    with pytest.raises(WeightsError, match=r"r.pth' does not fit timm model 'resnet18'.*first mismatch 'layer1.1.conv1.weight' \(in the model"):
        load_encoder("resnet18", weights=tmp_path / "r.pth")  # the file has 1 block per stage, resnet18 2
    with pytest.raises(InvalidArgumentError, match="JSON-able"):
        load_encoder("resnet18", weights=tmp_path / "r.pth", timm_kwargs={"act_layer": nn.GELU})


@pytest.mark.slow
def test_timm_resnet50_builds_from_a_local_file(tmp_path: Path) -> None:
    """The benchmark's encoder: timm 'resnet50', num_classes=0, 224 px, 2048 features."""
    timm = _timm()
    torch.save(timm.create_model("resnet50", pretrained=False, num_classes=0).state_dict(), tmp_path / "resnet50.pth")
    enc = load_encoder("resnet50", weights=tmp_path / "resnet50.pth")
    assert (enc.spec.tile, enc.spec.features, enc.spec.mean) == (224, 2048, IMAGENET_MEAN)
    assert enc.encode(_tiles(2, 224)).shape == (2, 2048)
    assert isinstance(enc, LoadedEncoder)
