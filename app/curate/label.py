"""`ovseg label SOURCE --dataset NAME`: pseudo-label a folder of images (or a COCO folder with captions)
into a persistent FiftyOne dataset, resumably.

Images are taken in a fixed order (sorted paths, or sorted COCO ids). Each batch of images is run through
the engine and its samples are written to the dataset in one insert; a sample is only ever written whole.
A run that is interrupted (Ctrl-C, a crash, a kill) and started again skips the (image, word) pairs the
dataset already holds (by `ovseg_key`) and continues with the rest in the same order, so it ends with the
same samples, in the same order, as a run that was never interrupted. The methods a dataset was labelled
with are kept in its info; extending it with other methods is refused (the fields would not agree).

Several workers label one dataset together: under `torchrun --nproc_per_node=N` (or `--nnodes` for several
machines, with FIFTYONE_DATABASE_URI pointing every machine at one MongoDB) each process takes the shard of
images RANK, RANK + N, ... (`--shard K/N` does the same without a launcher) and writes its own samples to the
shared dataset. Shards are fixed by image position, so a killed worker's shard resumes when the same
command runs again, and the dataset ends with the same samples as a single worker's (in another order).
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from ovseg.core.errors import OvsegError

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif")
DEFAULT_METHODS = "fused"
DEFAULT_BATCH = 8


@dataclass
class SourceImage:
    key: str  # relative path, or the COCO id as a string
    path: Path
    captions: list[str] = field(default_factory=list)
    coco_id: int | None = None


def coco_split_ids(coco_dir: Path, ids: list[int], split: str) -> list[int]:
    """The images of a split of a COCO folder: "all", or "train"/"held-out" as `ovseg train` splits them."""
    if split == "all":
        return ids
    from ovseg.train.coco import split_image_ids

    train, held = split_image_ids(ids)
    return {"train": train, "held-out": held}[split]


def read_source(source: str | Path, split: str = "all") -> tuple[list[SourceImage], str]:
    """The images of SOURCE and its kind ("coco" or "folder"). A COCO folder has `images/` and a
    `captions.json` or `instances.json` (COCO format); anything else is a folder of images (recursive)."""
    root = Path(source).expanduser()
    if not root.exists():
        raise FileNotFoundError(f"no such folder: {root}")
    if not root.is_dir():
        raise NotADirectoryError(f"SOURCE must be a folder of images or a COCO folder, got the file {root}")
    coco_files = [root / n for n in ("captions.json", "instances.json") if (root / n).is_file()]
    if (root / "images").is_dir() and coco_files:
        return _coco_images(root, coco_files, split), "coco"
    if split != "all":
        raise OvsegError(f"--split {split} needs a COCO folder (images/ and captions.json or instances.json); "
                         f"{root} is a plain folder")
    paths = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()
                   and not any(part.startswith(".") for part in p.relative_to(root).parts))
    if not paths:
        raise OvsegError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in {root}")
    return [SourceImage(p.relative_to(root).as_posix(), p.resolve()) for p in paths], "folder"


def _coco_images(root: Path, files: list[Path], split: str) -> list[SourceImage]:
    images: dict[int, dict] = {}
    captions: dict[int, list[str]] = {}
    for f in files:
        try:
            data = json.loads(f.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise OvsegError(f"cannot read {f}: {exc}") from exc
        for im in data.get("images", []):
            images.setdefault(int(im["id"]), im)
        if f.name == "captions.json":
            for a in data.get("annotations", []):
                captions.setdefault(int(a["image_id"]), []).append(str(a["caption"]).strip())
    ids = coco_split_ids(root, sorted(images), split)
    out = []
    for i in ids:
        path = root / "images" / images[i]["file_name"]
        out.append(SourceImage(str(i), path.resolve(), captions.get(i, []), i))
    return out


def words_of(image: SourceImage, typed: list[str], use_captions: bool) -> list[tuple[str, str]]:
    """[(word, "typed" | "caption")]: the typed words, then the captions' object nouns (lemmas, with spaces
    for multi-word names), each once."""
    out = {w: "typed" for w in typed}
    if use_captions:
        from ovseg.core.models.caption_nouns import object_nouns

        for c in image.captions:
            for n in object_nouns(c):
                out.setdefault(n.lemma.replace("_", " "), "caption")
    return list(out.items())


def parse_shard(text: str | None) -> tuple[int, int] | None:
    """"K/N" -> (K, N), 0 <= K < N; None: torchrun's (RANK, WORLD_SIZE) when it launched several processes,
    else None (one worker)."""
    if text is None:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        return (int(os.environ.get("RANK", "0")), world) if world > 1 else None
    try:
        k, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise ValueError(f"--shard must look like K/N (e.g. 0/4), got {text!r}") from None
    if not 0 <= k < n:
        raise ValueError(f"--shard {text}: K must be in 0..N-1")
    return k, n


def worker_device(device: str) -> str:
    """"cuda" or "auto" in a torchrun process: the GPU of its local rank (LOCAL_RANK), so that N workers on one
    machine use N GPUs; anything else as given."""
    local = os.environ.get("LOCAL_RANK")
    if local is None or device not in ("cuda", "auto"):
        return device
    import torch

    if not torch.cuda.is_available():
        return device  # "auto" -> CPU; "cuda" -> resolve_device's clear error
    return f"cuda:{int(local) % torch.cuda.device_count()}"


def _open_dataset(fo, name: str):
    """Load the dataset, or create it; two workers creating it at once end with the same one."""
    for _ in range(50):
        if fo.dataset_exists(name):
            return fo.load_dataset(name)
        try:
            return fo.Dataset(name, persistent=True)
        except ValueError:  # another worker created it between the check and here
            time.sleep(0.1)
    raise OvsegError(f"could not open or create the dataset {name!r}")


def label(source, dataset_name: str, words: str | None = None, captions: bool = False,
          methods: str = DEFAULT_METHODS, device: str = "cpu", batch_size: int = DEFAULT_BATCH,
          limit: int | None = None, split: str = "all", progress: bool = True, db_dir=None,
          shard: tuple[int, int] | None = None) -> dict:
    """Label SOURCE into the dataset; returns a summary (images, samples added, skipped, seconds, rate).
    shard (K, N): only the images K, K + N, ... of SOURCE (after --limit), as one of N workers."""
    from tqdm import tqdm

    from ovseg.core.concepts import parse_words
    from ovseg.core.predictor import Predictor
    from ovseg.core.registry import parse_methods
    from ovseg.app.curate.fo import fiftyone
    from ovseg.app.curate.schema import sample_fields, sample_key

    if batch_size < 1:
        raise ValueError(f"--batch-size must be at least 1, got {batch_size}")
    if limit is not None and limit < 1:
        raise ValueError(f"--limit must be at least 1, got {limit}")
    typed = parse_words(words) if words else []
    if not typed and not captions:
        raise OvsegError("nothing to label: give --words \"cat, dog\" and/or --captions")
    specs = parse_methods(methods)
    images, kind = read_source(source, split)
    if captions and kind != "coco":
        raise OvsegError(f"--captions needs a COCO folder with captions.json; {source} is a plain folder")
    images = [im for im in images if words_of(im, typed, captions)]  # e.g. no caption and no typed word
    if not images:
        raise OvsegError(f"no image of {source} has anything to label: " + (
            "none has a caption with an object noun" if not typed else "check --words"))
    if limit is not None:
        images = images[:limit]
    if shard is not None:
        k, n = shard
        if not 0 <= k < n:
            raise ValueError(f"shard {k}/{n}: K must be in 0..N-1")
        images = images[k::n]

    fo = fiftyone(db_dir)
    ds = _open_dataset(fo, dataset_name)
    before = ds.info.get("ovseg", {}).get("methods")
    if before and before != specs:
        raise OvsegError(f"dataset {dataset_name!r} was labelled with {','.join(before)}; label it with the "
                         f"same --methods, or into a new dataset")
    info = dict(ds.info.get("ovseg", {}))
    info.update(methods=specs, source=str(Path(source).expanduser().resolve()), source_kind=kind)
    info.setdefault("words", [])
    info["words"] = list(dict.fromkeys(info["words"] + typed))
    info["captions"] = bool(info.get("captions")) or captions
    ds.info["ovseg"] = info
    ds.save()

    done = set(ds.distinct("ovseg_key")) if len(ds) else set()
    todo = [(im, ws) for im in images
            if (ws := [w for w in words_of(im, typed, captions) if sample_key(im.key, w[0]) not in done])]
    skipped = len(images) - len(todo)
    predictor = Predictor(device=device)
    predictor.models.load()
    for spec in specs:
        predictor.method(spec)  # load every checkpoint before the clock starts, and fail early
    t0 = time.perf_counter()
    added, failed = 0, []
    where = f" shard {shard[0]}/{shard[1]}" if shard else ""
    bar = tqdm(total=len(todo), desc=f"label {dataset_name}{where}", unit="img", disable=not progress)
    for start in range(0, len(todo), batch_size):
        batch = []
        for im, ws in todo[start:start + batch_size]:
            try:
                batch.extend(_label_image(fo, predictor, im, ws, specs, sample_fields, sample_key))
            except OvsegError as exc:  # a corrupt or unreadable image: say so, go on with the others
                failed.append((im.key, str(exc)))
                log.warning("skipped %s: %s", im.path, exc)
            bar.update(1)
        if batch:
            _add_samples(ds, batch, shared=shard is not None)
            added += len(batch)
        bar.set_postfix(samples=added)
    bar.close()
    seconds = time.perf_counter() - t0
    if shard is None or shard[0] == 0:  # one worker writes the saved views (queries: they cover every shard)
        ds.reload()
        _save_views(ds)
        _show_in_app(ds)
    n_images = len(todo) - len(failed)
    return {"dataset": dataset_name, "shard": list(shard) if shard else None, "images": len(images),
            "labelled_images": n_images, "skipped_images": skipped,
            "samples_added": added, "samples": len(ds), "failed": failed, "seconds": round(seconds, 2),
            "images_per_second": round(n_images / seconds, 3) if seconds > 0 and n_images else None}


def _add_samples(ds, batch: list, shared: bool) -> None:
    """Insert a batch (whole or not at all). With other workers writing to the dataset, the dataset's media
    type or field schema may have been set by another process since this one loaded it: FiftyOne then refuses
    the insert before writing anything, and it is retried on the reloaded dataset."""
    for attempt in range(10):
        try:
            ds.add_samples(batch, progress=False)
            return
        except ValueError as exc:
            if not shared or attempt == 9:
                raise
            log.debug("retrying an insert after another worker changed the dataset: %s", exc)
            time.sleep(0.1 * (attempt + 1))
            ds.reload()


def _label_image(fo, predictor, im: SourceImage, ws, specs, sample_fields, sample_key) -> list:
    predictor.set_image(im.path, name=str(im.path))
    H, W = predictor.image.shape[:2]
    caption = im.captions[0] if im.captions else None
    prediction = predictor.predict([w for w, _ in ws], caption=caption, methods=specs)
    samples = []
    for word, origin in ws:
        results = list(zip(specs, [r for r in prediction.results if r.concept == word]))
        s = fo.Sample(filepath=str(im.path), image_key=im.key, word=word, word_source=origin,
                      captions=list(im.captions), ovseg_key=sample_key(im.key, word), image_height=H,
                      image_width=W)
        s["metadata"] = fo.ImageMetadata(width=W, height=H, num_channels=3, size_bytes=im.path.stat().st_size)
        if im.coco_id is not None:
            s["coco_id"] = im.coco_id
        for k, v in sample_fields(fo, results).items():
            s[k] = v
        samples.append(s)
    return samples


def saved_views(ds) -> dict:
    """The review views: least reliable first, disagreements between methods, not yet reviewed (the likeliest
    present first: what a reviewer's hour is best spent on), by presence, approved, and one per typed word."""
    from fiftyone import ViewField as F

    from ovseg.app.curate.schema import LABEL_FIELD

    views = {
        "least-reliable": ds.exists("reliability").sort_by("reliability"),
        "disagreements": ds.exists("agreement").sort_by("agreement"),
        "to-review": ds.match(F(f"{LABEL_FIELD}.detections").filter(F("tags").length() == 0).length() > 0)
                       .sort_by("score", reverse=True),
        "by-presence": ds.sort_by("score", reverse=True),
        "approved": ds.select_labels(tags="approved", fields=LABEL_FIELD),
    }
    for w in ds.info.get("ovseg", {}).get("words", []):
        views[f"word-{w}"] = ds.match(F("word") == w)
    return views


def _save_views(ds) -> None:
    from ovseg.app.curate.schema import LABEL_FIELD, method_slug

    if LABEL_FIELD not in ds.get_field_schema():
        return
    for name, view in saved_views(ds).items():
        slug = method_slug(name).replace("_", "-")
        if ds.has_saved_view(slug):
            ds.delete_saved_view(slug)
        ds.save_view(slug, view)


def _show_in_app(ds) -> None:
    """What the App shows when it opens: the pseudo-masks and one attention map (else one noise map); the
    other heatmaps are a checkbox away in the sidebar's LABELS group."""
    from fiftyone.core.odm.dataset import ActiveFields

    from ovseg.app.curate.schema import LABEL_FIELD

    schema = ds.get_field_schema()
    if LABEL_FIELD not in schema:
        return
    heat = [f for f, v in schema.items() if "Heatmap" in str(getattr(v, "document_type", ""))]
    shown = [f for f in heat if f.startswith("attention_")][:1] or [f for f in heat if f.startswith("noise_")][:1]
    ds.app_config.active_fields = ActiveFields(paths=[LABEL_FIELD, *shown])
    ds.save()
