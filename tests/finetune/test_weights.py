"""Pretrained weights, strictly offline: the cache folder, hash checks, import, fetch from a local mirror,
and user weight files (safetensors, tensors-only .pth)."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torchvision import models as tvm

from finetune import weights
from finetune.errors import WeightsError, WeightsNotCachedError
from finetune.models import build_model

FILENAME = "resnet18-f37072fd.pth"  # torchvision's name; "f37072fd" is a prefix of the real file's SHA-256


@pytest.fixture(scope="module")
def resnet18_state() -> dict[str, torch.Tensor]:
    """A randomly initialised ImageNet-shaped (1000 classes) ResNet-18 state dict."""
    torch.manual_seed(0)
    return {k: v.clone() for k, v in tvm.resnet18(weights=None).state_dict().items()}


@pytest.fixture
def resnet18_pth(tmp_path: Path, resnet18_state: dict[str, torch.Tensor]) -> Path:
    path = tmp_path / "downloads" / FILENAME
    path.parent.mkdir()
    torch.save(dict(resnet18_state), path)
    return path


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def published_hash_is(monkeypatch: pytest.MonkeyPatch) -> Callable[[Path], str]:
    """Make torchvision's published hash for resnet18 that of a file we made: no test file can match the
    real prefix, and the success paths (verified import, fetch) need one that does."""
    real = weights.imagenet_weights

    def use(path: Path) -> str:
        filename = f"resnet18-{_sha256(path)[:8]}.pth"

        class Published:  # the two things weights.py reads from torchvision's enum member
            url = f"https://download.pytorch.org/models/{filename}"

            def __str__(self) -> str:
                return "ResNet18_Weights.IMAGENET1K_V1"

        monkeypatch.setattr(weights, "imagenet_weights", lambda arch: Published() if arch == "resnet18" else real(arch))
        return filename

    return use


def test_missing_weights_fail_fast_with_instructions(tmp_path: Path) -> None:
    folder = tmp_path / "weights"
    with pytest.raises(WeightsNotCachedError) as e:
        build_model("resnet18", 3, "imagenet", weights_dir=folder)
    message = str(e.value)
    assert FILENAME in message
    assert str(folder) in message
    assert f"https://download.pytorch.org/models/{FILENAME}" in message
    assert "finetune weights fetch resnet18" in message
    assert "finetune weights import resnet18 FILE" in message
    assert not folder.exists()  # nothing was created, nothing downloaded


def test_status_of_an_empty_cache(tmp_path: Path) -> None:
    rows = weights.status_all(tmp_path)
    assert [r.arch for r in rows] == list(weights.PRETRAINED_ARCHITECTURES)
    assert all(not r.present and r.verified is None and r.size is None for r in rows)
    r18 = next(r for r in rows if r.arch == "resnet18")
    assert r18.filename == FILENAME and r18.path == str(tmp_path / FILENAME)


def test_import_refuses_a_hash_mismatch_then_accepts_when_told(
    tmp_path: Path, resnet18_pth: Path, resnet18_state: dict[str, torch.Tensor]
) -> None:
    cache = tmp_path / "cache"
    with pytest.raises(WeightsError, match=r"does not match torchvision's published hash .*--accept-unverified"):
        weights.import_file("resnet18", resnet18_pth, cache)
    assert not (cache / FILENAME).exists()

    path = weights.import_file("resnet18", resnet18_pth, cache, accept_unverified=True)
    assert path == cache / FILENAME and _sha256(path) == _sha256(resnet18_pth)
    st = weights.status("resnet18", cache)
    assert (st.present, st.verified, st.accepted_unverified) == (True, False, True)
    assert st.size == resnet18_pth.stat().st_size

    torch.manual_seed(1)
    built = build_model("resnet18", 3, "imagenet", weights_dir=cache)
    state = built.model.state_dict()
    assert torch.equal(state["conv1.weight"], resnet18_state["conv1.weight"])
    assert torch.equal(state["layer4.1.bn2.running_var"], resnet18_state["layer4.1.bn2.running_var"])
    assert state["fc.weight"].shape == (3, 512)  # a new head for 3 classes
    assert built.weights_source == "imagenet:ResNet18_Weights.IMAGENET1K_V1"


def test_a_cached_file_that_was_changed_is_refused(tmp_path: Path, resnet18_pth: Path) -> None:
    cache = tmp_path / "cache"
    weights.import_file("resnet18", resnet18_pth, cache, accept_unverified=True)
    with open(cache / FILENAME, "ab") as f:  # no longer the file that was accepted
        f.write(b"\0")
    st = weights.status("resnet18", cache)
    assert (st.present, st.verified, st.accepted_unverified) == (True, False, False)
    with pytest.raises(WeightsError, match="does not match torchvision's published hash"):
        build_model("resnet18", 3, "imagenet", weights_dir=cache)


def test_import_checks_the_tensors_fit(tmp_path: Path) -> None:
    src = tmp_path / "wrong.pth"
    torch.save({"conv1.weight": torch.zeros(1)}, src)
    with pytest.raises(WeightsError, match="weights do not fit resnet18"):
        weights.import_file("resnet18", src, tmp_path / "cache", accept_unverified=True)
    assert not (tmp_path / "cache" / FILENAME).exists()
    with pytest.raises(WeightsError, match="does not exist"):
        weights.import_file("resnet18", tmp_path / "nope.pth", tmp_path / "cache")


def test_verified_import_and_status(
    tmp_path: Path, resnet18_pth: Path, published_hash_is: Callable[[Path], str]
) -> None:
    filename = published_hash_is(resnet18_pth)
    cache = tmp_path / "cache"
    path = weights.import_file("resnet18", resnet18_pth, cache)
    assert path.name == filename
    st = weights.status("resnet18", cache)
    assert (st.present, st.verified, st.accepted_unverified) == (True, True, False)
    assert not (cache / (filename + ".accepted.json")).exists()


def test_fetch_from_a_local_mirror_checks_the_hash(
    tmp_path: Path,
    resnet18_pth: Path,
    published_hash_is: Callable[[Path], str],
    resnet18_state: dict[str, torch.Tensor],
) -> None:
    cache = tmp_path / "cache"
    # The real published hash: our file does not match it, so the download is refused and not kept.
    with pytest.raises(WeightsError, match="failed its hash check"):
        weights.fetch("resnet18", cache, url=resnet18_pth.as_uri(), progress=False)
    assert list(cache.iterdir()) == []

    filename = published_hash_is(resnet18_pth)
    path = weights.fetch("resnet18", cache, url=resnet18_pth.as_uri(), progress=False)
    assert path == cache / filename and _sha256(path) == _sha256(resnet18_pth)
    assert [p.name for p in cache.iterdir()] == [filename]  # no partial file left behind
    assert weights.status("resnet18", cache).verified is True
    built = build_model("resnet18", 4, "imagenet", weights_dir=cache)
    assert torch.equal(built.model.state_dict()["layer1.0.conv1.weight"], resnet18_state["layer1.0.conv1.weight"])


def test_fetch_from_a_missing_mirror_is_a_weights_error(tmp_path: Path) -> None:
    with pytest.raises(WeightsError, match=r"could not download .*finetune weights import resnet18"):
        weights.fetch("resnet18", tmp_path / "cache", url=(tmp_path / "absent.pth").as_uri(), progress=False)


# -- user weight files -----------------------------------------------------------------------------------


def test_weights_from_a_safetensors_file_and_a_pth(tmp_path: Path, resnet18_state: dict[str, torch.Tensor]) -> None:
    st_path = tmp_path / "mine.safetensors"
    save_file({k: v.contiguous() for k, v in resnet18_state.items()}, str(st_path))
    pth_path = tmp_path / "mine.pth"
    torch.save({"state_dict": {"module." + k: v for k, v in resnet18_state.items()}}, pth_path)  # DDP-style
    for path in (st_path, pth_path):
        built = build_model("resnet18", 2, str(path))
        state = built.model.state_dict()
        assert built.weights_source == f"file:{path}"
        assert torch.equal(state["layer2.0.downsample.0.weight"], resnet18_state["layer2.0.downsample.0.weight"])
        assert state["fc.weight"].shape == (2, 512)


def test_a_file_that_does_not_fit_lists_the_mismatches(tmp_path: Path, resnet18_state: dict[str, torch.Tensor]) -> None:
    state = dict(resnet18_state)
    del state["layer3.0.conv1.weight"]
    state["layer9.weight"] = torch.zeros(3)
    state["conv1.weight"] = torch.zeros(64, 3, 3, 3)
    path = tmp_path / "bad.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    with pytest.raises(WeightsError) as e:
        build_model("resnet18", 3, str(path))
    message = str(e.value)
    assert "(3 mismatches)" in message
    assert "missing: layer3.0.conv1.weight" in message
    assert "unexpected: layer9.weight" in message
    assert "shape of conv1.weight: file has (64, 3, 3, 3), resnet18 needs (64, 3, 7, 7)" in message


def test_weights_of_another_architecture_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "lenet.pth"
    torch.save(build_model("lenet", 3, "none").model.state_dict(), path)
    with pytest.raises(WeightsError, match=r"weights do not fit resnet18 \(\d+ mismatches\).*\.\.\. and \d+ more"):
        build_model("resnet18", 3, str(path))


class _Payload:
    """Unpickling this would create a file: proof that arbitrary pickled objects are not loaded."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return (open, (str(self.marker), "w"))


def test_a_pth_with_pickled_objects_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    torch.save({"conv1.weight": torch.zeros(1), "payload": _Payload(marker)}, path)
    with pytest.raises(WeightsError, match="weights_only=True"):
        build_model("resnet18", 3, str(path))
    assert not marker.exists()


@pytest.mark.parametrize(
    ("name", "content", "match"),
    [
        ("w.pth", {"conv1.weight": 1.5}, "does not hold a state dict of tensors"),
        ("w.pth", [torch.zeros(1)], "does not hold a state dict of tensors"),
        ("w.safetensors", b"garbage", "not a valid safetensors file"),
        ("w.pth", b"garbage", "weights_only=True"),
        ("w.onnx", b"garbage", "must be a .safetensors file"),
    ],
)
def test_unusable_weight_files(tmp_path: Path, name: str, content: object, match: str) -> None:
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        torch.save(content, path)
    with pytest.raises(WeightsError, match=match):
        weights.load_state_file(path)


def test_missing_weights_file(tmp_path: Path) -> None:
    with pytest.raises(WeightsError, match="weights file not found"):
        build_model("resnet18", 3, str(tmp_path / "nope.safetensors"))
