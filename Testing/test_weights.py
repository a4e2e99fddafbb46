"""Weights load only when the file and its card agree; every failure is a clear WeightsError."""

import json
import shutil
import subprocess
import sys

import pytest
import torch

from conftest import REPO

from weakicl.errors import WeightsError
from weakicl.weights import card_path, load_weights, save_weights, sha256_of


def test_round_trip(tiny_weights, tiny_model):
    model, card = load_weights(tiny_weights)
    assert card["name"] == "tiny-test" and card["parameters"] == sum(p.numel() for p in tiny_model.parameters())
    for (name, a), b in zip(model.state_dict().items(), tiny_model.state_dict().values()):
        assert (a == b).all(), name


@pytest.fixture()
def copy(tiny_weights, tmp_path):
    target = tmp_path / "w.safetensors"
    shutil.copy(tiny_weights, target)
    shutil.copy(card_path(tiny_weights), card_path(target))
    return target


def test_corrupt_file_fails_the_checksum(copy):
    data = bytearray(copy.read_bytes())
    data[-10] ^= 0xFF
    copy.write_bytes(bytes(data))
    with pytest.raises(WeightsError, match="sha256"):
        load_weights(copy)


def test_missing_card(copy):
    card_path(copy).unlink()
    with pytest.raises(WeightsError, match="card missing"):
        load_weights(copy)


def test_missing_file(tmp_path):
    with pytest.raises(WeightsError, match="not found"):
        load_weights(tmp_path / "nothing.safetensors")


def test_not_a_safetensors_file(copy):
    copy.write_bytes(b"\x80\x04pickle-ish garbage")
    card = json.loads(card_path(copy).read_text())
    card["sha256"] = sha256_of(copy)
    card_path(copy).write_text(json.dumps(card))
    with pytest.raises(WeightsError, match="cannot load"):
        load_weights(copy)


def test_card_describing_another_network(copy):
    card = json.loads(card_path(copy).read_text())
    card["architecture"]["channels"] = [8, 16, 32]
    card_path(copy).write_text(json.dumps(card))
    with pytest.raises(WeightsError, match=r"does not fit the network its card describes: \S+ \(\d+(, \d+)*\) where the network has"):
        load_weights(copy)  # names the first tensor that does not fit (it said only "Error(s) in loading state_dict")


def test_the_card_given_as_weights_says_so(copy):
    with pytest.raises(WeightsError, match="w.json is a model card: give the .safetensors weights file beside it"):
        load_weights(card_path(copy))


def test_a_card_without_sha256_is_refused_not_trusted(copy):
    """Audit D6: without the key the check was skipped, and weights with a flipped byte loaded."""
    data = bytearray(copy.read_bytes())
    data[-10] ^= 0xFF
    copy.write_bytes(bytes(data))
    card = json.loads(card_path(copy).read_text())
    card.pop("sha256")
    card_path(copy).write_text(json.dumps(card))
    with pytest.raises(WeightsError, match="model card w.json has no sha256, so w.safetensors cannot be checked"):
        load_weights(copy)


def test_a_card_that_is_not_an_object_is_a_weights_error(copy):
    """Audit D7: a card holding a JSON list was an internal error (AttributeError)."""
    card_path(copy).write_text("[1, 2]")
    with pytest.raises(WeightsError, match="model card w.json is not a JSON object"):
        load_weights(copy)


def test_weights_with_nan_are_refused(tiny_model, tmp_path):
    """Audit D6: all-NaN weights (a diverged run) with a matching card gave an empty mask and exit 0."""
    import copy as copying

    broken = copying.deepcopy(tiny_model)
    with torch.no_grad():
        next(broken.parameters()).fill_(float("nan"))
    path = save_weights(broken, tmp_path / "nan.safetensors", {"name": "diverged"})
    with pytest.raises(WeightsError, match=r"nan.safetensors: 1 of \d+ tensors hold NaN or infinite values \(.+ first"):
        load_weights(path)


def test_average_weights_script_writes_the_mean_network_and_names_its_sources(tiny_weights, tmp_path):
    """scripts/average_weights.py is the command behind the model-soup numbers in docs/TRAINING.md."""
    model, _ = load_weights(tiny_weights)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(1.0)
    shifted = save_weights(model, tmp_path / "shifted.safetensors", {"name": "tiny-shifted"})
    out = tmp_path / "soup.safetensors"
    done = subprocess.run([sys.executable, str(REPO / "scripts" / "average_weights.py"), str(tiny_weights), str(shifted),
                           "--out", str(out)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    soup, card = load_weights(out)
    original, _ = load_weights(tiny_weights)
    for (name, averaged), source in zip(soup.named_parameters(), original.parameters()):
        assert torch.allclose(averaged, source + 0.5, atol=1e-6), name
    assert [entry["file"] for entry in card["averaged_from"]] == ["tiny.safetensors", "shifted.safetensors"]
    assert card["averaged_from"][1]["sha256"] == sha256_of(shifted)


def test_average_weights_script_refuses_one_file(tiny_weights, tmp_path):
    done = subprocess.run([sys.executable, str(REPO / "scripts" / "average_weights.py"), str(tiny_weights),
                           "--out", str(tmp_path / "soup.safetensors")], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "at least two" in done.stderr and not (tmp_path / "soup.safetensors").exists()
