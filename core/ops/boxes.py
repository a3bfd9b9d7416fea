"""Box operations in plain torch (no torchvision here): IoU, greedy non-maximum suppression, RoIAlign, and
pasting a box-sized mask back into an image. Boxes are (x1, y1, x2, y2) in pixels, x2/y2 exclusive edges.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def box_area(boxes: torch.Tensor) -> torch.Tensor:
    return (boxes[:, 2] - boxes[:, 0]).clamp(min=0) * (boxes[:, 3] - boxes[:, 1]).clamp(min=0)


def box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(N, 4), (M, 4) -> (N, M) intersection over union (0 where both boxes are empty)."""
    lt = torch.maximum(a[:, None, :2], b[None, :, :2])
    rb = torch.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = (rb - lt).clamp(min=0).prod(dim=2)
    union = box_area(a)[:, None] + box_area(b)[None, :] - inter
    return inter / union.clamp(min=1e-9)


def nms(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float, max_keep: int | None = None) -> torch.Tensor:
    """Greedy NMS: indices of the kept boxes, highest score first. A box is dropped when its IoU with a kept,
    higher-scoring box exceeds `iou_threshold`."""
    if boxes.numel() == 0:
        return torch.zeros(0, dtype=torch.long, device=boxes.device)
    order = torch.argsort(scores, descending=True)
    iou = box_iou(boxes[order], boxes[order]).cpu().numpy()
    suppressed = np.zeros(len(order), dtype=bool)
    keep = []
    for i in range(len(order)):
        if suppressed[i]:
            continue
        keep.append(i)
        if max_keep is not None and len(keep) >= max_keep:
            break
        suppressed |= iou[i] > iou_threshold
    return order[torch.as_tensor(keep, dtype=torch.long, device=boxes.device)]


def batched_nms(boxes: torch.Tensor, scores: torch.Tensor, labels: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """NMS within each label (boxes of different labels never suppress each other); highest score first."""
    if boxes.numel() == 0:
        return torch.zeros(0, dtype=torch.long, device=boxes.device)
    offset = labels.to(boxes.dtype)[:, None] * (boxes.max() + 1.0)
    return nms(boxes + offset, scores, iou_threshold)


def roi_align(features: torch.Tensor, boxes: torch.Tensor, output_size: int, spatial_scale: float,
              sampling_ratio: int = 2) -> torch.Tensor:
    """RoIAlign (Mask R-CNN, with the half-pixel alignment of Detectron2's `aligned=True`) of one image.

    features: (C, H, W); boxes: (R, 4) in input pixels; spatial_scale: feature cells per input pixel (1/stride).
    Each of the output_size x output_size bins averages sampling_ratio^2 bilinear samples at evenly spaced
    points inside the bin. A feature cell's centre sits at its integer index: the box edge x maps to
    x * spatial_scale - 0.5. Samples are clamped to the feature map (a box reaching past the edge reads the
    edge values), except that samples more than one cell outside read 0 (as torchvision's kernel).
    Returns (R, C, output_size, output_size); differentiable in `features`.
    """
    C, H, W = features.shape
    R = boxes.shape[0]
    if R == 0:
        return features.new_zeros((0, C, output_size, output_size))
    n = output_size * sampling_ratio
    b = boxes.to(features.dtype) * spatial_scale - 0.5
    steps = (torch.arange(n, device=features.device, dtype=features.dtype) + 0.5) / n  # (n,) in (0, 1)
    ys = b[:, 1:2] + steps[None] * (b[:, 3:4] - b[:, 1:2])  # (R, n)
    xs = b[:, 0:1] + steps[None] * (b[:, 2:3] - b[:, 0:1])
    valid_y = (ys >= -1.0) & (ys <= H)
    valid_x = (xs >= -1.0) & (xs <= W)
    ys = ys.clamp(0, H - 1)
    xs = xs.clamp(0, W - 1)
    y0 = ys.floor().long().clamp(max=H - 1)
    x0 = xs.floor().long().clamp(max=W - 1)
    y1 = (y0 + 1).clamp(max=H - 1)
    x1 = (x0 + 1).clamp(max=W - 1)
    ly, lx = ys - y0, xs - x0
    hy, hx = 1 - ly, 1 - lx
    flat = features.reshape(C, H * W)

    def gather(yi, xi):  # (R, n), (R, n) -> (C, R, n, n)
        idx = (yi[:, :, None] * W + xi[:, None, :]).reshape(-1)
        return flat[:, idx].reshape(C, R, n, n)

    wy0, wy1 = hy[:, :, None], ly[:, :, None]
    wx0, wx1 = hx[:, None, :], lx[:, None, :]
    out = (gather(y0, x0) * (wy0 * wx0) + gather(y0, x1) * (wy0 * wx1)
           + gather(y1, x0) * (wy1 * wx0) + gather(y1, x1) * (wy1 * wx1))
    out = out * (valid_y[:, :, None] & valid_x[:, None, :]).to(out.dtype)
    out = out.reshape(C, R, output_size, sampling_ratio, output_size, sampling_ratio).mean(dim=(3, 5))
    return out.permute(1, 0, 2, 3).contiguous()


def paste_masks(masks: torch.Tensor, boxes: torch.Tensor, image_hw: tuple[int, int]) -> torch.Tensor:
    """Box-frame maps (R, m, m) -> image-frame maps (R, H, W): each map is resized bilinearly onto its box
    (in image pixels) and is 0 outside it. The inverse of `roi_align` on a single-channel map."""
    H, W = image_hw
    R = masks.shape[0]
    out = masks.new_zeros((R, H, W))
    for i in range(R):
        x1, y1, x2, y2 = boxes[i].tolist()
        # the pixels whose centres fall inside the box
        c0, c1 = max(0, int(np.ceil(x1 - 0.5))), min(W, int(np.ceil(x2 - 0.5)))
        r0, r1 = max(0, int(np.ceil(y1 - 0.5))), min(H, int(np.ceil(y2 - 0.5)))
        if c1 <= c0 or r1 <= r0:
            continue
        # sample the box-frame map at each pixel centre (grid_sample's align_corners=False frame of the box)
        gx = ((torch.arange(c0, c1, dtype=masks.dtype, device=masks.device) + 0.5 - x1) / max(x2 - x1, 1e-6)) * 2 - 1
        gy = ((torch.arange(r0, r1, dtype=masks.dtype, device=masks.device) + 0.5 - y1) / max(y2 - y1, 1e-6)) * 2 - 1
        grid = torch.stack(torch.meshgrid(gy, gx, indexing="ij")[::-1], dim=-1)[None]
        out[i, r0:r1, c0:c1] = F.grid_sample(masks[i][None, None], grid, mode="bilinear", padding_mode="border",
                                             align_corners=False)[0, 0]
    return out


def rescale_boxes(boxes: torch.Tensor, from_hw: tuple[int, int], to_hw: tuple[int, int]) -> torch.Tensor:
    """Boxes in an image of size from_hw (H, W) -> the same boxes in the image resized to to_hw."""
    scale = torch.tensor([to_hw[1] / from_hw[1], to_hw[0] / from_hw[0]] * 2, dtype=boxes.dtype, device=boxes.device)
    return boxes * scale


def clip_boxes(boxes: torch.Tensor, image_hw: tuple[int, int]) -> torch.Tensor:
    H, W = image_hw
    x = boxes[:, 0::2].clamp(0, W)
    y = boxes[:, 1::2].clamp(0, H)
    return torch.stack([x[:, 0], y[:, 0], x[:, 1], y[:, 1]], dim=1)


def flip_boxes(boxes: torch.Tensor, width: float) -> torch.Tensor:
    """Mirror boxes left-right in an image of this width."""
    return torch.stack([width - boxes[:, 2], boxes[:, 1], width - boxes[:, 0], boxes[:, 3]], dim=1)


def box_region(box, hw: tuple[int, int], grow: float = 0.25) -> tuple[slice, slice]:
    """(row slice, column slice) of an (x0, y0, x1, y1) pixel box enlarged by `grow` of its sides (half on each
    side), clipped to an image of size hw."""
    H, W = hw
    x0, y0, x1, y1 = (float(v) for v in box)
    dx, dy = grow * (x1 - x0) / 2, grow * (y1 - y0) / 2
    return (slice(max(0, int(y0 - dy)), min(H, int(np.ceil(y1 + dy)))),
            slice(max(0, int(x0 - dx)), min(W, int(np.ceil(x1 + dx)))))
