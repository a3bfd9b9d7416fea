"""GrabCut post-processing (Golub et al., sec. 3.2 / 4.1): zones, refinement, degenerate cases."""

import cv2
import numpy as np
import pytest

from ovseg.core.ops.grabcut import GrabCutConfig, grabcut_refine, grabcut_zones
from ovseg.core.ops.metrics import mask_iou

H, W = 120, 160


def _columns(zones_row: np.ndarray, code: int) -> list[int]:
    return np.flatnonzero(zones_row == code).tolist()


def _check_ramp_zones(zones: np.ndarray) -> None:
    # Column j of the ramp sits at relative position j/99 in the image's range:
    #   j/99 <= 0.15 <=> j <= 14 -> sure bg;  j/99 >= 0.5 <=> j >= 50;  j/99 >= 0.7 <=> j >= 70.
    assert zones.shape == (10, 100) and zones.dtype == np.uint8
    assert (zones == zones[0]).all()  # every row alike
    row = zones[0]
    assert _columns(row, cv2.GC_BGD) == list(range(0, 15))
    assert _columns(row, cv2.GC_PR_BGD) == list(range(15, 50))
    assert _columns(row, cv2.GC_PR_FGD) == list(range(50, 70))
    assert _columns(row, cv2.GC_FGD) == list(range(70, 100))


def test_zones_on_a_ramp():
    ramp = np.tile(np.linspace(0.0, 1.0, 100), (10, 1))
    _check_ramp_zones(grabcut_zones(ramp, GrabCutConfig()))


def test_zones_are_relative_to_the_image_range():
    ramp = np.tile(np.linspace(0.2, 0.6, 100), (10, 1))
    # Absolute thresholds would put every column below 0.7 and none below 0.15; relative ones do not.
    _check_ramp_zones(grabcut_zones(ramp, GrabCutConfig()))
    _check_ramp_zones(grabcut_zones(ramp.astype(np.float32), GrabCutConfig()))


def test_zone_boundaries_are_inclusive():
    # Exact binary fractions: values k/8 on [0, 1], thresholds at 2/8, 4/8, 6/8.
    prob = np.tile(np.arange(9) / 8.0, (3, 1))
    zones = grabcut_zones(prob, GrabCutConfig(t_bg=0.25, t_unk=0.5, t_fg=0.75))
    assert zones[0].tolist() == [0, 0, 0, 2, 3, 3, 1, 1, 1]  # P == bg thr: sure bg; == unk: pr fg; == fg: fg


def test_zones_foreground_wins_ties_and_equals_the_unk_threshold():
    prob = np.tile(np.arange(9) / 8.0, (3, 1))
    zones = grabcut_zones(prob, GrabCutConfig(t_bg=0.5, t_unk=0.5, t_fg=0.5))
    assert zones[0].tolist() == [0, 0, 0, 0, 1, 1, 1, 1, 1]
    rng = np.random.default_rng(1)
    p = rng.uniform(0.1, 0.8, (30, 40))
    for cfg in [GrabCutConfig(), GrabCutConfig(0.6, 0.3, 0.3), GrabCutConfig(1.0, 1.0, 1.0), GrabCutConfig(0, 0, 0)]:
        z = grabcut_zones(p, cfg)
        fg = (z == cv2.GC_FGD) | (z == cv2.GC_PR_FGD)
        np.testing.assert_array_equal(fg, p >= p.min() + cfg.t_unk * (p.max() - p.min()))


def _disk_scene():
    """A bright disk on a dark noisy background, and a blurred, shifted, partly wrong prob map of it."""
    yy, xx = np.mgrid[:H, :W]
    disk = (yy - 60) ** 2 + (xx - 80) ** 2 <= 30**2
    rng = np.random.default_rng(0)
    image = np.where(disk[..., None], 200.0, 40.0) + rng.normal(0.0, 12.0, (H, W, 3))
    image = np.clip(image, 0, 255).astype(np.uint8)
    guess = ((yy - 64) ** 2 + (xx - 87) ** 2 <= 30**2).astype(np.float64)  # shifted by (4, 7)
    guess[(yy > 64) & (xx < 87) & (yy - 64 > 87 - xx)] *= 0.35  # a missed wedge of the disk
    guess[10:35, 10:40] = 0.6  # a false-positive blob on the background
    prob = cv2.GaussianBlur(guess, (0, 0), 6)
    prob = 0.1 + 0.8 * prob / prob.max()
    return image, prob, disk


def test_grabcut_beats_the_plain_threshold():
    image, prob, disk = _disk_scene()
    mask = grabcut_refine(image, prob)
    assert mask.shape == (H, W) and mask.dtype == np.bool_
    iou_gc = mask_iou(mask, disk)
    iou_plain = mask_iou(prob >= 0.5, disk)
    iou_relative = mask_iou(grabcut_refine(image, prob, GrabCutConfig(enabled=False)), disk)
    iou_small = mask_iou(grabcut_refine(image, prob, max_side=80), disk)  # GrabCut at 60x80
    print(f"IoU with the disk: grabcut {iou_gc:.3f} (max_side=80: {iou_small:.3f}), "
          f"threshold 0.5 {iou_plain:.3f}, relative threshold {iou_relative:.3f}")
    assert iou_plain < 0.70 and iou_relative < 0.70
    assert iou_gc > 0.88
    assert iou_gc > iou_plain + 0.2 and iou_gc > iou_relative + 0.2
    assert iou_small > 0.85
    assert not mask[10:35, 10:40].any()  # the false blob is dark like the background: removed


def test_grabcut_keeps_sure_labels():
    image, prob, _ = _disk_scene()
    zones = grabcut_zones(prob)
    for max_side in (512, 50):
        mask = grabcut_refine(image, prob, max_side=max_side)
        assert mask[zones == cv2.GC_FGD].all()
        assert not mask[zones == cv2.GC_BGD].any()


def test_deterministic():
    image, prob, _ = _disk_scene()
    first = grabcut_refine(image, prob)
    cv2.setRNGSeed(1234)
    np.random.seed(5)
    second = grabcut_refine(image, prob)
    np.testing.assert_array_equal(first, second)


@pytest.mark.parametrize("value", [0.0, 0.3, 0.5, 0.9, 1.0])
def test_flat_prob(value):
    image, _, _ = _disk_scene()
    mask = grabcut_refine(image, np.full((H, W), value))
    assert mask.dtype == np.bool_ and mask.shape == (H, W)
    assert (mask == (value >= 0.5)).all()
    assert (grabcut_refine(image, np.full((H, W), value), GrabCutConfig(enabled=False)) == (value >= 0.5)).all()


def test_disabled_uses_the_relative_threshold():
    image, prob, _ = _disk_scene()
    cfg = GrabCutConfig(enabled=False)
    mask = grabcut_refine(image, prob, cfg)
    expected = prob >= prob.min() + 0.5 * (prob.max() - prob.min())
    np.testing.assert_array_equal(mask, expected)
    zones = grabcut_zones(prob, cfg)
    np.testing.assert_array_equal(mask, (zones == cv2.GC_FGD) | (zones == cv2.GC_PR_FGD))


def test_no_background_samples_returns_the_zones_foreground():
    image, prob, _ = _disk_scene()
    # t_unk = 0: every pixel is >= p_min, so every pixel is foreground-ish and GrabCut cannot run.
    mask = grabcut_refine(image, prob, GrabCutConfig(t_bg=0.0, t_unk=0.0, t_fg=0.7))
    assert mask.all()


def test_too_few_foreground_samples_returns_the_zones_foreground():
    image, _, _ = _disk_scene()
    prob = np.zeros((H, W))
    prob[5, 5] = 1.0  # one foreground pixel
    np.testing.assert_array_equal(grabcut_refine(image, prob), prob >= 0.5)
    # Downscaling can drop the only foreground pixels: the full-resolution zones are returned.
    prob = np.zeros((H, W))
    prob[1, 1:5] = 1.0
    np.testing.assert_array_equal(grabcut_refine(image, prob, max_side=16), prob >= 0.5)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(t_fg=0.4, t_unk=0.5),
        dict(t_bg=0.6),
        dict(t_bg=-0.1),
        dict(t_fg=1.5),
        dict(t_unk=float("nan")),
        dict(t_fg="0.7"),
        dict(iterations=0),
        dict(iterations=2.5),
        dict(iterations=True),
    ],
)
def test_invalid_config(kwargs):
    with pytest.raises(ValueError, match="GrabCutConfig"):
        GrabCutConfig(**kwargs)


def test_config_is_frozen():
    cfg = GrabCutConfig()
    assert (cfg.t_fg, cfg.t_unk, cfg.t_bg, cfg.iterations, cfg.enabled) == (0.7, 0.5, 0.15, 5, True)
    with pytest.raises(AttributeError):
        cfg.t_fg = 0.9  # type: ignore[misc]


def test_invalid_inputs():
    image, prob, _ = _disk_scene()
    with pytest.raises(ValueError, match="must match"):
        grabcut_refine(image, prob[:, :-1])
    with pytest.raises(ValueError, match="HxWx3"):
        grabcut_refine(image[..., 0], prob)
    with pytest.raises(ValueError, match="HxWx3"):
        grabcut_refine(np.dstack([image, image[..., :1]]), prob)
    with pytest.raises(TypeError, match="uint8"):
        grabcut_refine(image.astype(np.float32), prob)
    with pytest.raises(TypeError, match="floating"):
        grabcut_refine(image, (prob > 0.5).astype(np.uint8))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        grabcut_refine(image, prob * 3)
    with pytest.raises(ValueError, match="NaN"):
        grabcut_refine(image, np.where(prob > 0.5, np.nan, prob))
    with pytest.raises(ValueError, match="2-D"):
        grabcut_zones(prob[None])
    with pytest.raises(ValueError, match="max_side"):
        grabcut_refine(image, prob, max_side=0)
