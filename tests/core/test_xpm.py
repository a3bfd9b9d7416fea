"""XPM (seed 003): box operations (RoIAlign, NMS, pasting), the losses against hand computations, proposal
targets, cross-modal alignment (eq. 2), a short real training run that reads no target-class annotation, and
the `xpm` method's pseudo-labels with noise maps and reliability."""

import json
import math

import numpy as np
import pytest
import torch

from ovseg.core.errors import OvsegError
from ovseg.core.ops.boxes import batched_nms, box_iou, nms, paste_masks, roi_align
from ovseg.core.methods.xpm.losses import (classification_loss, cross_modal_loss, mean_noise, noisy_mask_loss,
                                           proposal_targets, reliability)
from ovseg.core.methods.xpm.model import XPMConfig, XPMNet, word_scores
from ovseg.train.coco import TARGET_CLASSES
from helpers import COCO_DEV



def sig(x):
    return 1.0 / (1.0 + math.exp(-x))


# ------------------------------------------------------------------------------------------- RoIAlign

def test_roi_align_samples_bilinearly_at_bin_centres_by_hand():
    # f(y, x) = 4y + x on a 4x4 map; bilinear interpolation of a linear map is exact
    f = (torch.arange(4.0)[:, None] * 4 + torch.arange(4.0)[None, :])[None]
    out = roi_align(f, torch.tensor([[0.0, 0.0, 4.0, 4.0]]), output_size=2, spatial_scale=1.0, sampling_ratio=1)
    # box edges -0.5 .. 3.5 in cell-centre coordinates: bin centres at 0.5 and 2.5
    assert torch.allclose(out[0, 0], torch.tensor([[2.5, 4.5], [10.5, 12.5]]))
    # one sample between four cells averages them: (1 + 2 + 3 + 4) / 4
    g = torch.tensor([[[1.0, 2.0], [3.0, 4.0]]])
    out = roi_align(g, torch.tensor([[0.5, 0.5, 1.5, 1.5]]), output_size=1, spatial_scale=1.0, sampling_ratio=1)
    assert out.item() == pytest.approx(2.5)
    # an off-centre sample by hand: box (0, 0, 1.2, 0.6) -> sample at (x, y) = (0.1, -0.2) -> clamped y = 0
    out = roi_align(g, torch.tensor([[0.0, 0.0, 1.2, 0.6]]), output_size=1, spatial_scale=1.0, sampling_ratio=1)
    assert out.item() == pytest.approx(0.9 * 1.0 + 0.1 * 2.0)


def test_roi_align_of_the_whole_map_with_two_samples_per_bin_is_average_pooling_and_has_gradients():
    f = torch.randn(3, 8, 8, requires_grad=True)
    out = roi_align(f, torch.tensor([[0.0, 0.0, 16.0, 16.0]]), output_size=4, spatial_scale=0.5, sampling_ratio=2)
    assert out.shape == (1, 3, 4, 4)
    assert torch.allclose(out[0], torch.nn.functional.avg_pool2d(f[None], 2)[0], atol=1e-6)
    out.sum().backward()
    assert torch.allclose(f.grad, torch.full_like(f, 0.25))
    assert roi_align(f, torch.zeros((0, 4)), 7, 1.0).shape == (0, 3, 7, 7)


def test_paste_masks_fills_the_box_pixels_and_inverts_roi_align():
    ones = torch.ones(1, 28, 28)
    out = paste_masks(ones, torch.tensor([[10.0, 20.0, 30.0, 40.0]]), (50, 60))
    assert out.shape == (1, 50, 60)
    assert torch.allclose(out[0, 20:40, 10:30], torch.ones(20, 20)) and out.sum().item() == pytest.approx(400)
    # a left/right split survives the round trip through the box frame
    m = torch.zeros(1, 28, 28)
    m[..., 14:] = 1
    pasted = paste_masks(m, torch.tensor([[8.0, 8.0, 40.0, 24.0]]), (32, 48))[0] >= 0.5
    assert pasted[8:24, 24:40].all() and not pasted[8:24, 8:24].any()
    back = roi_align(pasted.float()[None], torch.tensor([[8.0, 8.0, 40.0, 24.0]]), 28, 1.0)[0, 0]
    assert ((back >= 0.5) == m[0].bool()).float().mean() > 0.95


def test_nms_and_iou_on_hand_made_boxes():
    boxes = torch.tensor([[0, 0, 10, 10], [1, 1, 11, 11], [20, 20, 30, 30], [0, 0, 10, 5]], dtype=torch.float32)
    iou = box_iou(boxes[:1], boxes)
    assert iou[0, 0] == 1 and iou[0, 1] == pytest.approx(81 / 119) and iou[0, 2] == 0 and iou[0, 3] == 0.5
    scores = torch.tensor([0.9, 0.8, 0.7, 0.95])
    assert nms(boxes, scores, 0.6).tolist() == [3, 0, 2]  # box 1 overlaps box 0 by 0.68
    assert nms(boxes, scores, 0.4).tolist() == [3, 1, 2]  # box 0 overlaps box 3 by 0.5, box 1 by 0.32
    assert nms(boxes, scores, 0.6, max_keep=1).tolist() == [3]
    # boxes of different labels never suppress each other
    assert sorted(batched_nms(boxes, scores, torch.tensor([0, 1, 0, 0]), 0.6).tolist()) == [0, 1, 2, 3]


# ------------------------------------------------------------------------------------------- losses

def test_noisy_mask_loss_by_hand():
    logits = torch.tensor([[[2.0, -1.0]]])
    variance = torch.tensor([[[0.25, 4.0]]])
    target = torch.tensor([[[1.0, 1.0]]])
    xi = torch.tensor([[[[1.0, 0.5]]], [[[-1.0, -0.5]]]])  # T = 2 samples
    got = noisy_mask_loss(logits, variance, target, xi=xi)
    p0 = -math.log((sig(2.5) + sig(1.5)) / 2)  # sigma 0.5
    p1 = -math.log((sig(-1.0 + 2 * 0.5) + sig(-1.0 - 2 * 0.5)) / 2)  # sigma 2
    assert got.shape == (1,) and got.item() == pytest.approx((p0 + p1) / 2, rel=1e-5)
    # off the mask the sign flips
    got0 = noisy_mask_loss(logits[..., :1], variance[..., :1], torch.zeros(1, 1, 1), xi=xi[..., :1])
    assert got0.item() == pytest.approx(-math.log((sig(-2.5) + sig(-1.5)) / 2), rel=1e-5)
    # no noise: the plain BCE of eq. 5
    z = torch.randn(2, 4, 4)
    t = (torch.rand(2, 4, 4) > 0.5).float()
    plain = torch.nn.functional.binary_cross_entropy_with_logits(z, t, reduction="none").flatten(1).mean(1)
    assert torch.allclose(noisy_mask_loss(z, torch.full_like(z, 1e-12), t), plain, atol=1e-5)


def test_noise_lowers_the_loss_only_where_the_pseudo_mask_disagrees():
    torch.manual_seed(0)
    confident = torch.full((1, 8, 8), 4.0)
    agree, disagree = torch.ones(1, 8, 8), torch.zeros(1, 8, 8)
    for var in (1.0, 9.0):
        v = torch.full((1, 8, 8), var)
        assert noisy_mask_loss(confident, v, disagree, samples=256) < noisy_mask_loss(confident, v * 1e-9, disagree)
        assert noisy_mask_loss(confident, v, agree, samples=256) > noisy_mask_loss(confident, v * 1e-9, agree)
    # the gradient reaches the variance through the reparameterised samples
    for label, sign in ((disagree, -1), (agree, 1)):  # more noise where the label disagrees, less where it agrees
        v = torch.full((1, 8, 8), 1.0, requires_grad=True)
        noisy_mask_loss(confident, v, label, samples=512).sum().backward()
        assert v.grad is not None and sign * v.grad.sum() > 0


def test_reliability_is_eta_over_the_mean_noise():
    variance = torch.tensor([[[0.1, 0.3]], [[0.05, 0.05]]])
    levels = mean_noise(variance)
    assert torch.allclose(levels, torch.tensor([0.2, 0.05]))
    assert torch.allclose(reliability(levels, 0.05), torch.tensor([0.25, 1.0]))


def test_cross_modal_loss_by_hand_and_alpha_sends_no_gradient():
    emb = torch.tensor([[1.0, 0.0], [0.0, 2.0]], requires_grad=True)
    vocab = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    targets = torch.tensor([0, 2])
    l0 = -(1 - math.log(math.exp(1) + 1 + math.exp(1)))
    l1 = -(2 - math.log(1 + math.exp(2) + math.exp(2)))
    assert cross_modal_loss(emb, vocab, targets).item() == pytest.approx((l0 + l1) / 2, rel=1e-5)
    alpha = torch.tensor([0.5, 1.0], requires_grad=True)
    loss = cross_modal_loss(emb, vocab, targets, alpha)
    assert loss.item() == pytest.approx((0.5 * l0 + l1) / 2, rel=1e-5)
    loss.backward()
    assert alpha.grad is None and emb.grad is not None


def test_classification_loss_weights_background_by_0_2():
    scores = word_scores(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([[2.0, 0.0], [0.0, 1.0]]))
    assert torch.allclose(scores, torch.tensor([[0.0, 2.0, 0.0], [0.0, 0.0, 1.0]]))
    labels = torch.tensor([1, 0])  # a region of class 1, a background region
    ce = torch.nn.functional.cross_entropy(scores, labels, reduction="none")
    assert classification_loss(scores, labels).item() == pytest.approx(float((ce[0] + 0.2 * ce[1]) / 1.2))


def test_proposal_targets_mark_the_centre_of_a_box_on_its_level():
    cfg = XPMConfig()
    box = torch.tensor([[16.0, 16.0, 80.0, 48.0]])  # 64 x 32 px: max side distance 32 -> the stride-8 level
    t = proposal_targets(box, {8: (8, 12), 16: (4, 6), 32: (2, 3)}, cfg)
    pos = t[8]["positive"].reshape(8, 12)
    assert pos.any() and not t[16]["positive"].any() and not t[32]["positive"].any()
    ys, xs = torch.nonzero(pos, as_tuple=True)
    centres_x, centres_y = (xs + 0.5) * 8, (ys + 0.5) * 8
    assert ((centres_x - 48).abs() <= 12).all() and ((centres_y - 32).abs() <= 12).all()
    d = t[8]["distances"].reshape(8, 12, 4)[3, 5]  # the cell centred at (44, 28)
    assert torch.allclose(d, torch.tensor([28.0, 12.0, 36.0, 20.0]))
    assert t[8]["centerness"].reshape(8, 12)[3, 5] == pytest.approx(math.sqrt(28 / 36 * 12 / 20))
    # no boxes: no positives
    assert not proposal_targets(torch.zeros((0, 4)), {8: (8, 12), 16: (4, 6), 32: (2, 3)}, cfg)[8]["positive"].any()


# ------------------------------------------------------------------------------------------- alignment

def test_alignment_picks_each_nouns_best_scoring_proposal(monkeypatch):
    import ovseg.train.methods.xpm as train_xpm

    net = XPMNet(XPMConfig(channels=16, word_dim=2, emb_hidden=8, mask_convs=1)).eval()
    boxes = torch.tensor([[0, 0, 16, 16], [16, 0, 32, 16], [0, 16, 32, 32]], dtype=torch.float32)
    emb = torch.tensor([[1.0, 0.0], [0.2, 0.9], [0.6, 0.6]])
    monkeypatch.setattr(net, "proposals", lambda pyr, hw, post_nms=100: (boxes, torch.ones(3)))
    monkeypatch.setattr(net, "embed", lambda pyr, b: emb[: len(b)])
    feats = {"c3": torch.zeros(1, 40, 4, 4).half(), "c4": torch.zeros(1, 112, 2, 2).half(),
             "c5": torch.zeros(1, 320, 1, 1).half()}

    class Store:  # what pseudo_label reads of a training image
        def features(self, image_id, flip):
            assert image_id == 7 and not flip
            return feats

        def input_hw(self, image_id):
            return (32, 32)

    vocab = ["dog", "kite", "zebra"]
    vectors = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.7, 0.7]])
    cfg = train_xpm.TrainConfig(coco_dir="-", out="-")
    pseudo, n = train_xpm.pseudo_label(net, Store(), {7: ["dog", "kite", "zebra"]}, [7], vocab, vectors, cfg,
                                       progress=False)
    p = pseudo[7][0]
    assert n == 3 and p["nouns"].tolist() == [0, 1, 2]
    assert torch.equal(p["boxes"], boxes[[0, 1, 2]])  # dog -> box 0, kite -> box 1, zebra -> box 2 (0.84)
    assert torch.allclose(p["scores"], torch.tensor([1.0, 0.9, 0.84]))
    assert p["masks"].shape == (3, 28, 28) and p["masks"].dtype == torch.bool
    # the mirrored copy: boxes mirrored, masks flipped
    flipped = pseudo[7][1]
    assert torch.equal(flipped["boxes"][0], torch.tensor([16.0, 0.0, 32.0, 16.0]))
    assert torch.equal(flipped["masks"], p["masks"].flip(-1))


def test_save_and_load_round_trip_in_half_precision(tmp_path):
    net = XPMNet(XPMConfig(channels=16, word_dim=8, emb_hidden=8, mask_convs=1, noise=True)).eval()
    net.save(tmp_path / "student.pt", {"eta": 0.1})
    back, extra = XPMNet.load(tmp_path / "student.pt")
    assert extra == {"eta": 0.1} and back.noise is not None
    saved, loaded = net.state_dict(), back.state_dict()
    assert list(loaded) == list(saved)  # every tensor, none missing or extra, in order (zip alone stops short)
    for k, a in saved.items():
        assert loaded[k].shape == a.shape and torch.allclose(a.half().float(), loaded[k]), k


# ------------------------------------------------------------------------------------------- training

@pytest.mark.slow
@pytest.mark.skipif(not COCO_DEV.is_dir(), reason=f"shared data not found at {COCO_DEV}")
def test_a_short_training_run_reads_no_target_annotation_and_loads_as_the_method(tmp_path, monkeypatch, predictor,
                                                                                  examples_dir, decoded_categories):
    import ovseg.train.methods.xpm as train_xpm
    from ovseg.core.methods.xpm.method import XPM

    boxes_read = []
    real = train_xpm.base_annotations

    def spy(dataset, image_id, input_hw):
        out = real(dataset, image_id, input_hw)
        boxes_read.extend(BASE[int(i) - 1] for i in out["labels"])
        return out

    from ovseg.train.coco import BASE_CLASSES as BASE

    monkeypatch.setattr(train_xpm, "base_annotations", spy)
    cfg = train_xpm.TrainConfig(coco_dir=str(COCO_DEV), out=str(tmp_path / "xpm"), max_images=12, teacher_epochs=2,
                                student_epochs=1, eta_epochs=1, evaluate=False)
    out = train_xpm.train(cfg, progress=False)
    assert decoded_categories and not set(decoded_categories) & set(TARGET_CLASSES), decoded_categories
    assert boxes_read and not set(boxes_read) & set(TARGET_CLASSES)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "student.pt", "student_plain.pt", "teacher.pt",
                                                      "training.json"]
    summary = json.loads((out / "training.json").read_text())
    assert summary["images"]["train"] == 12 and summary["pseudo_labels"] > 0
    assert summary["losses"]["teacher"]["loss"]["last"] < summary["losses"]["teacher"]["loss"]["first"]
    assert 0 < summary["eta"] <= summary["noise_levels"]["median"]
    config = json.loads((out / "config.json").read_text())
    assert config["vocab"] and config["eta"] == summary["eta"]

    predictor.set_image(examples_dir / "cat.jpg")
    state = predictor._state
    for network in ("student", "student_plain", "teacher"):
        # the default reliability: the agreement of the network with the other one and both mirrored
        r = XPM(predictor.models, checkpoint=out, network=network, align="always").predict(state, "cat")
        assert r.mask.shape == state.size and 0.0 <= r.score <= 1.0
        assert r.pseudo_labels, "align=always keeps the best region"
        assert [p.kind for p in r.priors] == ["probability", "noise"]
        assert r.details["reliability_from"].startswith("agreement")
        for pl in r.pseudo_labels:
            assert pl.mask.shape == state.size and pl.concept == "cat"
            assert 0.0 <= pl.reliability <= 1.0 and pl.noise_map.shape == state.size
            assert 0.0 <= pl.noise_map.min() and pl.noise_map.max() <= 1.0
        # the paper's g_Noise (eq. 6-7): the robust student only
        if network != "student":
            with pytest.raises(OvsegError, match="no g_Noise"):
                XPM(predictor.models, checkpoint=out, network=network, reliability="g_noise")
            continue
        r = XPM(predictor.models, checkpoint=out, network=network, align="always", reliability="g_noise").predict(state, "cat")
        assert [p.kind for p in r.priors] == ["probability", "noise"]
        for pl in r.pseudo_labels:
            assert 0.0 <= pl.reliability <= 1.0 and pl.noise_map.shape == state.size
            x0, y0, x1, y1 = (int(v) for v in pl.box)
            outside = pl.noise_map.copy()
            outside[max(0, y0 - 2):y1 + 2, max(0, x0 - 2):x1 + 2] = 0
            assert pl.noise_map.max() > 0 and not outside.any()  # noise lives in the region's box


def test_view_noise_is_zero_where_views_agree_and_one_where_they_split_evenly():
    from ovseg.core.methods.xpm.method import view_noise

    a = np.zeros((4, 4), np.float32)
    a[:2] = 1.0
    b = a.copy()
    b[:, :2] = 1.0  # agrees with a on rows 0-1, and on the right half of rows 2-3 (0), not on their left half
    noise = view_noise([a, a, b, b])
    assert noise.dtype == np.float32 and noise.shape == (4, 4)
    assert np.allclose(noise[:2], 0.0) and np.allclose(noise[2:, 2:], 0.0)
    assert np.allclose(noise[2:, :2], 1.0)  # two views say 1, two say 0: the largest spread
    assert np.allclose(view_noise([a, a, a, b])[2:, :2], 2 * np.std([0, 0, 0, 1]))


def test_view_agreement_is_soft_iou_with_each_other_view():
    from ovseg.core.methods.xpm.method import view_agreement

    m = np.zeros((4, 4), np.float32)
    m[:2, :2] = 1.0  # 4 pixels
    same, half, elsewhere = m.copy(), np.zeros_like(m), np.zeros_like(m)
    half[:2, :1] = 1.0  # 2 of its 4 pixels
    elsewhere[3, 3] = 1.0
    assert view_agreement(m, [same]) == 1.0
    assert view_agreement(m, [half]) == pytest.approx(0.5)
    assert view_agreement(m, [elsewhere]) == 0.0  # another view found the word somewhere else
    assert view_agreement(m, [same, half, elsewhere]) == pytest.approx(0.5)
