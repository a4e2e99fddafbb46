"""In-context tuning: tokens fitted on the references to find the structure alone, used where a whole
volume has no registered context, and only there."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import ellipsoid
from weakicl import context_tuning, session
from weakicl.context_tuning import SEARCH_TUNING_MAX_SIDE, SearchReference, search_tokens
from weakicl.session import Segmenter
from weakicl.simulation import slice_boxes
from weakicl.volume import Geometry, Volume


@pytest.fixture()
def segmenter(tiny_model):
    return Segmenter(model=tiny_model, device="cpu")


def reference_loss(model, reference: SearchReference, tokens: torch.Tensor) -> float:
    """The tuning objective: foreground and background labels weigh half each."""
    labels = torch.from_numpy(reference.labels[None, None])
    foreground, background = (labels == 1).float(), (labels == 0).float()
    with torch.no_grad():
        logits = model.decode(model.encode_image(torch.from_numpy(reference.image[None, None])), tokens, None)
        loss = F.binary_cross_entropy_with_logits(logits, foreground, reduction="none")
    return float(0.5 * (loss * foreground).sum() / foreground.sum() + 0.5 * (loss * background).sum() / background.sum())


def test_tuned_tokens_fit_what_the_references_boxes_say_and_are_tuned_once(segmenter, phantom, monkeypatch):
    monkeypatch.setattr(context_tuning, "SEARCH_TUNING_STEPS", 8)
    volume, truth = phantom
    task = segmenter.encode_context([(volume, slice_boxes(truth))])
    (reference,) = task.references[0]
    assert set(np.unique(reference.labels)) == {-1, 0, 1}  # box centres, a band around the boxes, the rest unknown
    assert reference.image.shape == reference.labels.shape
    assert reference.tuned is None  # nothing is tuned until a whole volume without a prior asks
    tuned = search_tokens(segmenter.model, reference, "cpu")
    before, after = (reference_loss(segmenter.model, reference, tokens) for tokens in (reference.tokens, tuned))
    assert after < 0.95 * before  # 1.03 -> 0.90 in 8 steps
    assert search_tokens(segmenter.model, reference, "cpu") is tuned
    assert all(parameter.requires_grad for parameter in segmenter.model.parameters())  # left as it was


def test_a_dense_reference_labels_every_voxel_and_one_label_kind_keeps_the_tokens(segmenter, phantom):
    volume, truth = phantom
    (reference,) = segmenter.encode_context([(volume, truth)]).references[0]
    assert set(np.unique(reference.labels)) <= {-1, 0, 1} and (reference.labels == 1).sum() > 0
    inside = tuple(slice(s // 2 - 2, s // 2 + 2) for s in reference.labels.shape)
    assert np.all(reference.labels[inside] >= 0)
    alone = SearchReference(reference.image, np.ones_like(reference.labels), reference.tokens)
    assert search_tokens(segmenter.model, alone, "cpu") is reference.tokens


def test_a_large_reference_is_tuned_on_a_coarser_crop(segmenter):
    geometry = Geometry((1.0, 1.0, 1.0), (0.0, 0.0, 0.0), np.eye(3), (100, 150, 150))
    truth = ellipsoid(geometry.shape_kji, (50, 75, 75), (35, 55, 55))
    volume = Volume((100 * truth).astype(np.float32), geometry, "CT")
    (reference,) = segmenter.encode_context([(volume, truth)]).references[0]
    assert max(reference.image.shape) <= SEARCH_TUNING_MAX_SIDE
    assert (reference.labels == 1).any() and (reference.labels == 0).any()


def test_only_a_whole_volume_without_registered_context_starts_from_tuned_tokens(segmenter, phantom, monkeypatch):
    monkeypatch.setattr(session, "OWN_BOX_LEVEL", None)  # the first pass alone
    monkeypatch.setattr(context_tuning, "SEARCH_TUNING_STEPS", 3)
    volume, truth = phantom
    target = Volume(np.roll(volume.array, 2, axis=1).copy(), volume.geometry, "MR")
    task = segmenter.encode_context([(volume, slice_boxes(truth))])
    (reference,) = task.references[0]
    first_pass, seen = Segmenter._first_pass, []
    monkeypatch.setattr(Segmenter, "_first_pass", lambda self, image, spacing, searching, *rest, **named: seen.append(
        searching.tokens) or first_pass(self, image, spacing, searching, *rest, **named))
    segmenter.segment(target, task)
    segmenter.segment(target, task, align_context=False, network_only=True)  # the network-only ablation: as encoded
    assert reference.tuned is None and all(torch.equal(tokens, task.tokens) for tokens in seen)
    heard = []
    segmenter.segment(target, task, align_context=False, progress=lambda fraction, message: heard.append((fraction, message)))
    assert torch.equal(seen[-1], reference.tuned) and not torch.equal(reference.tuned, task.tokens)
    fractions = [fraction for fraction, _ in heard]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    tuning = [fraction for fraction, message in heard if message.startswith("tuning the task")]
    assert len(tuning) == 3 and max(tuning) <= session.ALIGNMENT_SHARE

