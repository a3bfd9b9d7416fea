"""`ovseg review NAME`: the FiftyOne App on a labelled dataset, with its saved review views; and an oracle
reviewer that tags labels by their IoU with COCO ground truth (a scripted stand-in for a person, to measure
the label-review-retrain loop).

In the App, people select pseudo-masks and tag them `approved` or `rejected` (the tag button of the grid or
the sample view); tags are written to the database at once, so closing the App or the process loses nothing.
Masks to fix are edited in ovseg-app's Review tab, which writes back to the same dataset.
"""

from __future__ import annotations

import logging
import time
from urllib.parse import quote

import numpy as np

from ovseg.core.errors import OvsegError

log = logging.getLogger(__name__)


def app_url(address: str, port: int, dataset_name: str) -> str:
    """A URL that opens the App's session on the dataset: its page, the name quoted as the App quotes it
    (encodeURIComponent: 'my data' -> /datasets/my%20data). The App's server decodes the path before routing
    it, so a name with a '/' cannot be a page of its own: then the App's root, which opens the session's
    dataset. An IPv6 address is bracketed."""
    host = f"[{address}]" if ":" in address and not address.startswith("[") else address
    root = f"http://{host}:{int(port)}/"
    return root if "/" in dataset_name else f"{root}datasets/{quote(dataset_name, safe='')}"


def review(dataset_name: str, port: int = 5151, address: str = "127.0.0.1", view: str | None = None,
           db_dir=None, wait: bool = True):
    """Open the App on the dataset (optionally one of its saved views); blocks until Ctrl-C if `wait`."""
    from ovseg.app.curate.fo import launch_app, load_dataset

    ds = load_dataset(dataset_name, db_dir)
    v = None
    if view:
        if not ds.has_saved_view(view):
            raise OvsegError(f"dataset {dataset_name!r} has no saved view {view!r}; it has: "
                             f"{', '.join(ds.list_saved_views()) or 'none'}")
        v = ds.load_saved_view(view)
    session = launch_app(ds, port=port, address=address, view=v)
    url = app_url(address, port, dataset_name)
    print(f"FiftyOne App on {url} (saved views: {', '.join(ds.list_saved_views())}); Ctrl-C to stop", flush=True)
    if wait:
        try:
            while True:
                time.sleep(1.0)
        except KeyboardInterrupt:
            pass
        finally:
            session.close()
    return session


def _class_of(word: str, names: set[str]) -> str | None:
    if word in names:
        return word
    from ovseg.train.methods.xpm_eval import noun_class

    return noun_class(word)


def oracle_review(dataset_name: str, coco_dir, min_iou: float = 0.5, db_dir=None, progress: bool = True) -> dict:
    """Tag every pseudo-mask `approved` when its IoU with the ground truth of the COCO class its word names is
    at least `min_iou` (the best of the class's instances and their union), else `rejected`; words naming
    no COCO class, and images without annotations, are rejected. Returns counts and mean IoUs."""
    from tqdm import tqdm

    from ovseg.app.curate.fo import load_dataset
    from ovseg.app.curate.schema import LABEL_FIELD, mask_from_detection, mask_iou
    from ovseg.train.coco import SCORED_CLASSES, CocoConceptDataset

    if not 0.0 <= min_iou <= 1.0:
        raise ValueError(f"min IoU must lie in [0, 1], got {min_iou}")
    ds = load_dataset(dataset_name, db_dir)
    if "coco_id" not in ds.get_field_schema():
        raise OvsegError(f"dataset {dataset_name!r} has no COCO ids: the oracle needs a dataset labelled from "
                         "a COCO folder")
    coco = CocoConceptDataset(coco_dir)
    names = set(SCORED_CLASSES)
    known = set(coco.image_ids)
    counts = {"approved": 0, "rejected": 0, "no_class": 0}
    ious = []
    for s in tqdm(ds.iter_samples(autosave=True), total=len(ds), desc="oracle review", unit="sample",
                  disable=not progress):
        labels = s[LABEL_FIELD]
        if labels is None or not labels.detections:
            continue
        cls = _class_of(s["word"], names)
        instances = []
        if cls is not None and s["coco_id"] in known:
            for ann in coco.annotations(s["coco_id"]):
                if coco._cat_name[ann["category_id"]] == cls and not ann.get("iscrowd", 0):
                    instances.append(coco.coco.annToMask(ann).astype(bool))
        if instances:
            instances.append(np.logical_or.reduce(instances))
        hw = (s["image_height"], s["image_width"])
        for det in labels.detections:
            tags = [t for t in (det.tags or []) if t not in ("approved", "rejected")]
            if cls is None:
                counts["no_class"] += 1
            iou = max((mask_iou(mask_from_detection(det, hw), g) for g in instances), default=0.0)
            ious.append(iou)
            verdict = "approved" if iou >= min_iou else "rejected"
            counts[verdict] += 1
            det.tags = tags + [verdict]
            det["oracle_iou"] = float(iou)
    return {**counts, "labels": len(ious), "mean_iou": float(np.mean(ious)) if ious else float("nan"),
            "min_iou": min_iou}
