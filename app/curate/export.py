"""`ovseg export NAME --tags approved --out DIR`: the reviewed labels of a dataset as a COCO folder.

DIR gets `instances.json` (one annotation per exported pseudo-mask: lossless compressed RLE of the full
image mask, its bbox and area, the word as the category, plus score, method and reliability), `captions.json`
(COCO captions format) and `images/` (hard links to the originals where the file system allows, else
copies), so that the export is itself a COCO folder that `ovseg label`, `ovseg eval` or pycocotools read.

A pseudo-mask is exported when it carries one of the tags, or its sample does (a sample-level "approved"
approves all its pseudo-masks); a "rejected" tag on the label always wins. The folder is written beside DIR
and swapped in at the end: a crash leaves the previous export intact.
"""

from __future__ import annotations

import os
import shutil
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from ovseg.core.errors import OvsegError


def curated_labels(ds, tags: list[str]) -> list[dict]:
    """[{sample fields, "mask": full-image bool, "det": the Detection}] of every pseudo-mask the tags select."""
    from ovseg.app.curate.schema import LABEL_FIELD, mask_from_detection

    tags = set(tags)
    out = []
    has_coco_id = "coco_id" in ds.get_field_schema()
    for s in ds.iter_samples():
        sample_tagged = bool(tags & set(s.tags))
        labels = s[LABEL_FIELD]
        if labels is None:
            continue
        for det in labels.detections:
            det_tags = set(det.tags or [])
            if "rejected" in det_tags and "rejected" not in tags:
                continue
            if not (sample_tagged or tags & det_tags):
                continue
            hw = (s["image_height"], s["image_width"])
            mask = mask_from_detection(det, hw)
            if not mask.any():
                continue
            out.append({"filepath": s.filepath, "image_key": s["image_key"], "word": det.label,
                        "captions": list(s["captions"] or []), "coco_id": s["coco_id"] if has_coco_id else None,
                        "hw": hw, "mask": mask, "det": det})
    return out


def coco_dicts(labels: list[dict], dataset_name: str, tags: list[str]) -> tuple[dict, dict, dict[int, Path]]:
    """(instances, captions, {image id: source path}) in COCO format."""
    from pycocotools import mask as mask_utils

    images: dict[str, dict] = {}
    paths: dict[int, Path] = {}
    used_ids: set[int] = set()
    for lab in labels:  # image ids: the COCO id when the dataset came from COCO, else 1, 2, ...
        key = lab["filepath"]
        if key in images:
            continue
        cid = lab["coco_id"]
        if cid is None or cid in used_ids:
            cid = max(used_ids, default=0) + 1
        used_ids.add(cid)
        path = Path(lab["filepath"])
        name = f"{cid:012d}{path.suffix.lower()}"
        images[key] = {"id": cid, "file_name": name, "height": lab["hw"][0], "width": lab["hw"][1],
                       "ovseg_image_key": lab["image_key"], "captions": lab["captions"]}
        paths[cid] = path
    words = sorted({lab["word"] for lab in labels})
    cat_id = {w: i + 1 for i, w in enumerate(words)}
    anns = []
    for k, lab in enumerate(labels, 1):
        rle = mask_utils.encode(np.asfortranarray(lab["mask"].astype(np.uint8)))
        x, y, w, h = (float(v) for v in mask_utils.toBbox(rle))
        det = lab["det"]
        anns.append({"id": k, "image_id": images[lab["filepath"]]["id"], "category_id": cat_id[lab["word"]],
                     "segmentation": {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")},
                     "area": float(mask_utils.area(rle)), "bbox": [x, y, w, h], "iscrowd": 0,
                     "score": float(det.confidence) if det.confidence is not None else None,
                     "method": det["method"] if "method" in det else None,
                     "reliability": det["reliability"] if "reliability" in det else None,
                     "tags": sorted(det.tags or [])})
    info = {"description": f"ovseg export of FiftyOne dataset {dataset_name!r}, tags {', '.join(tags)}",
            "date_created": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    image_list = [{k: v for k, v in im.items() if k != "captions"} for im in images.values()]
    instances = {"info": info, "images": image_list, "annotations": anns,
                 "categories": [{"id": i, "name": w, "supercategory": "ovseg"} for w, i in cat_id.items()]}
    caps, n = [], 0
    for im in images.values():
        for c in im["captions"]:
            n += 1
            caps.append({"id": n, "image_id": im["id"], "caption": c})
    captions = {"info": info, "images": image_list, "annotations": caps}
    return instances, captions, paths


def export(dataset_name: str, out: str | Path, tags: list[str] | None = None, db_dir=None) -> dict:
    from ovseg.core.cache import atomic_write_json, replaced_folder
    from ovseg.app.curate.fo import load_dataset

    tags = [t.strip() for t in (tags or ["approved"]) if t.strip()]
    if not tags:
        raise OvsegError("--tags must name at least one tag, e.g. approved")
    ds = load_dataset(dataset_name, db_dir)
    labels = curated_labels(ds, tags)
    if not labels:
        raise OvsegError(f"no pseudo-mask of {dataset_name!r} is tagged {' or '.join(tags)}: review it first "
                         f"(`ovseg review {dataset_name}`) and tag the labels to export")
    instances, captions, paths = coco_dicts(labels, dataset_name, tags)
    out = Path(out).expanduser()
    with replaced_folder(out) as tmp:
        (tmp / "images").mkdir()
        for im in instances["images"]:
            _link_or_copy(paths[im["id"]], tmp / "images" / im["file_name"])
        atomic_write_json(tmp / "instances.json", instances)
        atomic_write_json(tmp / "captions.json", captions)
    return {"out": str(out), "images": len(instances["images"]), "annotations": len(instances["annotations"]),
            "categories": len(instances["categories"]), "captions": len(captions["annotations"])}


def _link_or_copy(src: Path, dst: Path) -> None:
    if not src.is_file():
        raise OvsegError(f"the image {src} of the dataset is missing: cannot export it")
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def read_back(folder: str | Path) -> dict[tuple[int, str], list[np.ndarray]]:
    """{(image id, category name): [bool masks]} of an export, decoded by pycocotools (used by the tests
    and `ovseg retrain` to read curated labels)."""
    from pycocotools.coco import COCO
    import contextlib
    import io

    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO(str(Path(folder) / "instances.json"))
    names = {c["id"]: c["name"] for c in coco.loadCats(coco.getCatIds())}
    out: dict[tuple[int, str], list[np.ndarray]] = {}
    for ann in coco.loadAnns(coco.getAnnIds()):
        out.setdefault((ann["image_id"], names[ann["category_id"]]), []).append(coco.annToMask(ann).astype(bool))
    return out

