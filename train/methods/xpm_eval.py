"""XPM's held-out evaluation (seed 003, sec. 4): instance mask mAP@0.5 with pycocotools, constrained and
generalised, target and base classes, and whether reliability ranks pseudo masks by their quality.

* constrained: target (base) AP on the held-out images that hold a target (base) instance, the detector
  choosing among the target (base) class names only;
* generalised: every held-out image, the detector choosing among all 65 scored class names; AP averaged over
  the target and the base classes apart.

Ground truth is read here, after training, for scoring only.
"""

from __future__ import annotations

import contextlib
import io

import numpy as np
import torch

from ovseg.core.ops.boxes import batched_nms, paste_masks, rescale_boxes
from ovseg.core.models.caption_nouns import class_of_noun
from ovseg.core.methods.xpm.losses import mean_noise, reliability
from ovseg.core.methods.xpm.model import XPMNet, word_scores
from ovseg.train.coco import BASE_CLASSES, SCORED_CLASSES, TARGET_CLASSES, CocoConceptDataset

SCORE_THRESHOLD = 0.05
MAX_DETECTIONS = 100
NMS_IOU = 0.5


@torch.no_grad()
def detect(net: XPMNet, pyr: dict, input_hw, image_hw, class_vectors: torch.Tensor,
           score_threshold: float = SCORE_THRESHOLD, max_detections: int = MAX_DETECTIONS) -> dict:
    """Instances over a class vocabulary: proposals -> softmax over (background, classes) of the embedding
    scores -> per-class NMS -> the best `max_detections` -> mask head, pasted at image size (bool)."""
    boxes, _ = net.proposals(pyr, input_hw)
    H, W = image_hw
    empty = {"boxes": torch.zeros((0, 4)), "labels": torch.zeros(0, dtype=torch.long), "scores": torch.zeros(0),
             "masks": np.zeros((0, H, W), bool)}
    if len(boxes) == 0:
        return empty
    probs = torch.softmax(word_scores(net.embed(pyr, boxes), class_vectors), dim=1)[:, 1:]
    r, c = torch.nonzero(probs >= score_threshold, as_tuple=True)
    if len(r) == 0:
        return empty
    b, s = boxes[r], probs[r, c]
    keep = batched_nms(b, s, c, NMS_IOU)[:max_detections]
    b, s, c = b[keep], s[keep], c[keep]
    logits, _ = net.mask_and_noise(pyr, b, with_noise=False)
    b = rescale_boxes(b, input_hw, image_hw)
    masks = paste_masks(torch.sigmoid(logits), b, (H, W)) >= 0.5
    return {"boxes": b, "labels": c, "scores": s, "masks": masks.numpy()}


def _coco_results(image_id: int, det: dict, cat_ids: list[int]) -> list[dict]:
    from pycocotools import mask as mask_utils

    out = []
    for m, c, s in zip(det["masks"], det["labels"].tolist(), det["scores"].tolist()):
        rle = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
        rle["counts"] = rle["counts"].decode("ascii")
        out.append({"image_id": int(image_id), "category_id": int(cat_ids[c]), "segmentation": rle, "score": float(s)})
    return out


def mask_ap50(coco, results: list[dict], image_ids: list[int], cat_ids: list[int]) -> float:
    """pycocotools' segm AP at IoU 0.5 over these images and categories (0 without detections)."""
    from pycocotools.cocoeval import COCOeval

    if not results or not image_ids or not cat_ids:
        return 0.0
    with contextlib.redirect_stdout(io.StringIO()):
        dt = coco.loadRes([dict(r) for r in results])  # loadRes adds keys to the dicts it is given
        ev = COCOeval(coco, dt, "segm")
        ev.params.imgIds = list(image_ids)
        ev.params.catIds = list(cat_ids)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return max(0.0, float(ev.stats[1]))


def instance_map(net: XPMNet, dataset: CocoConceptDataset, held_ids: list[int], feats: dict, models) -> dict:
    """Constrained and generalised mask AP@0.5 of one network on the held-out images."""
    name_to_id = {n: i for i, n in dataset._cat_name.items()}
    vectors = dict(zip(SCORED_CLASSES, models.embed_words(list(SCORED_CLASSES)).float().cpu()))

    def has(image_id, names):
        return any(dataset._cat_name[a["category_id"]] in names and not a.get("iscrowd", 0)
                   for a in dataset.annotations(image_id))

    out = {}
    for setting, names, images in (
            ("constrained_target", TARGET_CLASSES, [i for i in held_ids if has(i, set(TARGET_CLASSES))]),
            ("constrained_base", BASE_CLASSES, [i for i in held_ids if has(i, set(BASE_CLASSES))]),
            ("generalized", SCORED_CLASSES, list(held_ids))):
        cat_ids = [name_to_id[n] for n in names]
        cv = torch.stack([vectors[n] for n in names])
        results = []
        for image_id in images:
            f = feats[image_id]
            pyr = net.pyramid(f["feats"])
            results += _coco_results(image_id, detect(net, pyr, f["input_hw"], f["image_hw"], cv), cat_ids)
        if setting == "generalized":
            out["generalized_target"] = mask_ap50(dataset.coco, results, images, [name_to_id[n] for n in TARGET_CLASSES])
            out["generalized_base"] = mask_ap50(dataset.coco, results, images, [name_to_id[n] for n in BASE_CLASSES])
        else:
            out[setting] = mask_ap50(dataset.coco, results, images, cat_ids)
        out[f"images_{setting}"] = len(images)
    return out


def noun_class(noun: str) -> str | None:
    """The scored COCO class a caption noun names ("puppy" -> dog, "man" -> person); None if none."""
    return class_of_noun(noun, tuple(SCORED_CLASSES))


def reliability_study(pseudo: list[dict]) -> dict:
    """pseudo: dicts with "iou" (with the named class's ground truth) and "reliability". Mean IoU of the
    most and least reliable quarters."""
    if len(pseudo) < 4:
        return {"count": len(pseudo)}
    order = sorted(pseudo, key=lambda p: p["reliability"])
    q = len(order) // 4
    low, high = order[:q], order[-q:]
    rel = np.array([p["reliability"] for p in pseudo])
    iou = np.array([p["iou"] for p in pseudo])
    corr = float(np.corrcoef(rel, iou)[0, 1]) if rel.std() > 0 and iou.std() > 0 else float("nan")
    return {"count": len(pseudo), "quarter": q,
            "mean_iou_most_reliable_25pct": float(np.mean([p["iou"] for p in high])),
            "mean_iou_least_reliable_25pct": float(np.mean([p["iou"] for p in low])),
            "mean_iou_all": float(iou.mean()), "pearson_reliability_iou": corr}


@torch.no_grad()
def pseudo_mask_quality(student: XPMNet, dataset: CocoConceptDataset, ids: list[int], data: dict, eta: float,
                        teacher_masks: bool, embed_words=None, vocab: list[str] | None = None) -> list[dict]:
    """For every pseudo label whose noun names a scored class present in the image: IoU of its mask with that
    class's ground truth (union of instances), and its reliability under the robust student (eq. 7, <= 1
    clipped). teacher_masks: the training pseudo labels (teacher boxes and masks, data[i]["pseudo"]);
    otherwise the student's own alignment (eq. 2 with g_Emb) and mask on held-out images."""
    from ovseg.core.ops.metrics import mask_iou

    out = []
    for image_id in ids:
        d = data[image_id]
        targets = dataset.concept_targets(image_id)
        H, W = targets.shape
        pyr = student.pyramid(d["feats"])
        if teacher_masks:
            p = d.get("pseudo")
            if not p:
                continue
            p = p[0]
            boxes, masks, nouns = p["boxes"], p["masks"].float(), [vocab[i] for i in p["nouns"].tolist()]
        else:
            nouns = d["nouns"]
            if not nouns:
                continue
            boxes_all, _ = student.proposals(pyr, d["input_hw"])
            if len(boxes_all) == 0:
                continue
            v = embed_words(nouns).float().cpu()  # memoised per word
            best = (student.embed(pyr, boxes_all) @ v.T).argmax(dim=0)
            boxes = boxes_all[best]
            masks = None
        logits, variance = student.mask_and_noise(pyr, boxes)
        if masks is None:
            masks = (logits >= 0).float()
        alpha = reliability(mean_noise(variance), eta).clamp(max=1.0)
        pasted = paste_masks(masks, rescale_boxes(boxes, d["input_hw"], (H, W)), (H, W)) >= 0.5
        for k, noun in enumerate(nouns):
            cls = noun_class(noun)
            if cls is None or cls not in targets.gt:
                continue
            out.append({"image_id": image_id, "noun": noun, "class": cls, "target": cls in TARGET_CLASSES,
                        "reliability": float(alpha[k]),
                        "iou": float(mask_iou(pasted[k].numpy(), targets.gt[cls], targets.valid_for(cls)))})
    return out


def evaluate_networks(nets: dict, dataset: CocoConceptDataset, train_view, held_ids: list[int],
                      vocab: list[str], eta: float, models, long_side: int, progress: bool) -> dict:
    """Held-out instance mAP@0.5 of every network and the reliability study. `train_view`: the pseudo-labelled
    training images, a mapping id -> {"feats" (float), "input_hw", "nouns", "pseudo"} (`train.methods.xpm.TrainView`)."""
    from tqdm import tqdm

    from ovseg.core.models.backbone import input_size
    from ovseg.train.methods.xpm import as_float, caption_nouns, image_features

    held = {}
    for image_id in tqdm(held_ids, desc="held-out features", unit="img", disable=not progress):
        rgb = dataset.load_rgb(image_id)
        held[image_id] = {"feats": as_float(image_features(models, rgb, long_side, False)),
                          "input_hw": input_size(rgb.shape[0], rgb.shape[1], long_side),
                          "image_hw": rgb.shape[:2], "nouns": caption_nouns(dataset, image_id)}
    out = {"instance_map50": {}}
    for name, net in nets.items():
        out["instance_map50"][name] = instance_map(net, dataset, held_ids, held, models)
    student = nets["student"]
    training = pseudo_mask_quality(student, dataset, sorted(train_view), train_view, eta, True, vocab=vocab)
    held_out = pseudo_mask_quality(student, dataset, held_ids, held, eta, False, embed_words=models.embed_words)
    out["reliability"] = {
        "training_pseudo_labels": reliability_study(training),
        "training_pseudo_labels_target": reliability_study([p for p in training if p["target"]]),
        "held_out_student_alignment": reliability_study(held_out),
    }
    return out
