"""The `ovseg` command line: `segment`, `eval`, `train`, `methods`, and the curation loop: `label`, `review`,
`export`, `retrain`, `checkpoints`.

Errors the user can fix come out as one line on stderr (exit status 2), never a traceback; `--debug` shows
the traceback of an unexpected error.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys
import tempfile
from pathlib import Path

log = logging.getLogger("ovseg")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ovseg", description="Open-vocabulary segmentation workbench.")
    p.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("segment", help="segment words in one image; write overlays, masks and a JSON summary")
    s.add_argument("image", help="an image file (JPEG, PNG, ...)")
    s.add_argument("words", help="comma-separated words, e.g. 'dog, frisbee, -person' ('-' marks a negative; "
                                 "a list may start with one: '-person,dog')")
    s.add_argument("--out", required=True, help="output folder (created if missing)")
    s.add_argument("--methods", default="fused",
                   help="comma-separated method specs (default fused; see `ovseg methods`), e.g. 'fused,cam,xpm'")
    s.add_argument("--caption", default=None, help="an optional caption of the image")
    s.add_argument("--threshold", type=float, default=None, help="mask threshold in [0, 1] (method default)")
    s.add_argument("--device", default="cpu", help="cpu, cuda or auto (default: cpu)")

    e = sub.add_parser("eval", help="score methods on a COCO folder (DESIGN.md's protocol)")
    e.add_argument("coco_dir", help="a folder with images/, instances.json and optionally captions.json")
    e.add_argument("--methods", default="fused",
                   help="comma-separated method specs: names, optionally with options, "
                        "e.g. 'cam,cls_saliency[variant=sem1c,grabcut=off]'")
    e.add_argument("--ablation", action="store_true",
                   help="Golub et al.'s ablation: cam and cls_saliency's variants with and without GrabCut "
                        "(replaces --methods; implies --base-on-held-out)")
    e.add_argument("--base-on-held-out", action="store_true",
                   help="segment base classes only on the images `ovseg train` held out")
    e.add_argument("--no-captions", action="store_true",
                   help="do not give the methods each image's captions (captions.json)")
    e.add_argument("--held-out-only", action="store_true",
                   help="only the images `ovseg train` held out (every class; every figure a held-out one)")
    e.add_argument("--out", required=True, help="output folder for metrics.json, report.md and plots")
    e.add_argument("--limit", type=int, default=None, help="only the first N images (for a quick look)")
    e.add_argument("--device", default="cpu", help="cpu, cuda or auto (default: cpu)")
    e.add_argument("--no-reference", action="store_true", help="skip timing the CLIPSeg architecture")

    t = sub.add_parser("train", help="train a method's heads (writes a checkpoint folder)")
    tsub = t.add_subparsers(dest="method", required=True)
    from ovseg.train.registry import trainers

    for trainer in trainers().values():  # each trainer module registers itself
        trainer.add_arguments(tsub.add_parser(trainer.name, help=trainer.help))

    sc = sub.add_parser("scaling", help="train a method on 25/50/100%% of the training images and plot held-out mIoU")
    sc.add_argument("method", help="a trainer that takes --fraction (see `ovseg train -h`)")
    sc.add_argument("--fractions", default="0.25,0.5,1", help="shares of the training split (default 0.25,0.5,1)")
    sc.add_argument("--coco", default="../shared/data/coco_dev", help="the COCO folder whose held-out images score")
    sc.add_argument("--out", default="runs/scaling", help="folder of the study (one subfolder per method, scaling.png)")
    sc.add_argument("--train-args", default="",
                    help="flags for `ovseg train METHOD`, quoted (e.g. --train-args \"--no-ablation --no-eval\")")

    lb = sub.add_parser("label", help="pseudo-label a folder of images (or a COCO folder) into a FiftyOne dataset")
    lb.add_argument("source", help="a folder of images, or a COCO folder (images/ + captions.json)")
    lb.add_argument("--dataset", required=True, help="the FiftyOne dataset to create or extend")
    lb.add_argument("--words", default=None, help="comma-separated words to look for in every image")
    lb.add_argument("--captions", action="store_true", help="also label each image's caption object nouns")
    lb.add_argument("--methods", default=None, help="comma-separated method specs (default: fused)")
    lb.add_argument("--batch-size", type=int, default=None, help="images per database write (default 8)")
    lb.add_argument("--limit", type=int, default=None, help="only the first N images of SOURCE with something to label")
    lb.add_argument("--split", default="all", choices=("all", "train", "held-out"),
                    help="a COCO folder's images: all, or the part `ovseg train` trains on / holds out")
    lb.add_argument("--device", default="cpu", help="cpu, cuda or auto (default: cpu)")
    lb.add_argument("--shard", default=None, metavar="K/N",
                    help="label only the images K, K+N, ... as one of N workers (under torchrun: RANK/WORLD_SIZE)")
    lb.add_argument("--db-dir", default=None, help="the FiftyOne database folder (default: see README)")

    rv = sub.add_parser("review", help="open the FiftyOne App on a labelled dataset, with its review views")
    rv.add_argument("dataset", help="the FiftyOne dataset")
    rv.add_argument("--view", default=None, help="open this saved view (least-reliable, disagreements, to-review, ...)")
    rv.add_argument("--port", type=int, default=5151, help="the App's port (default 5151)")
    rv.add_argument("--address", default="127.0.0.1", help="the App's address (default 127.0.0.1)")
    rv.add_argument("--oracle", default=None, metavar="COCO_DIR",
                    help="instead of opening the App, tag every label approved/rejected by its IoU with this COCO "
                         "folder's ground truth (a scripted reviewer, to measure the loop)")
    rv.add_argument("--min-iou", type=float, default=0.5, help="the oracle's approval IoU (default 0.5)")
    rv.add_argument("--db-dir", default=None, help="the FiftyOne database folder")

    ex = sub.add_parser("export", help="export a dataset's reviewed labels as a COCO folder")
    ex.add_argument("dataset", help="the FiftyOne dataset")
    ex.add_argument("--tags", default="approved", help="comma-separated tags of the labels to export (default approved)")
    ex.add_argument("--out", required=True, help="the COCO folder to write (replaced whole when done)")
    ex.add_argument("--db-dir", default=None, help="the FiftyOne database folder")

    rt = sub.add_parser("retrain", help="fine-tune XPM's student and the class-agnostic segmenter on a dataset's "
                                        "curated labels (new checkpoint versions)")
    rt.add_argument("dataset", help="the FiftyOne dataset")
    rt.add_argument("--coco", default=None, help="COCO folder with the base training data and held-out images "
                                                 "(default: the dataset's source)")
    rt.add_argument("--tags", default="approved", help="comma-separated tags of the labels to train on")
    rt.add_argument("--epochs", type=int, default=3, help="fine-tuning epochs (default 3)")
    rt.add_argument("--no-eval", action="store_true", help="skip the before/after evaluation")
    rt.add_argument("--no-segmenter", action="store_true",
                    help="retrain XPM's student only, not cls_saliency's class-agnostic segmenter")
    rt.add_argument("--segmenter-eval-images", type=int, default=30,
                    help="held-out images the segmenter is evaluated on before and after (default 30; guided "
                         "backprop costs seconds an image)")
    rt.add_argument("--db-dir", default=None, help="the FiftyOne database folder")

    ck = sub.add_parser("checkpoints", help="list a method's checkpoint versions, or choose the one in use")
    ck.add_argument("method", nargs="?", default="xpm", choices=("xpm", "cls_saliency"),
                    help="the method (default xpm; cls_saliency: its class-agnostic segmenter)")
    ck.add_argument("--use", default=None, help="make this version current: v1, v2, ... or packaged")

    x = sub.add_parser("proxies", help="the ImageNet classes each mapper relates to words (Golub et al.'s Table 2)")
    x.add_argument("words", nargs="+", help="words, e.g. car dog sofa")
    x.add_argument("-k", type=int, default=5, help="proxy labels per word and mapper (default 5)")

    sub.add_parser("methods", help="list the available methods")

    bn = sub.add_parser("bench", help="time a method on one image for one word and for five (and CLIPSeg's forward)")
    bn.add_argument("--image", default=None, help="an image (default: the bundled coffee photo)")
    bn.add_argument("--size", default="640x480", help="resize the image to WxH first (default 640x480; 'none' keeps it)")
    bn.add_argument("--methods", default="fused,cam", help="comma-separated method specs (default fused,cam)")
    bn.add_argument("--runs", type=int, default=7, help="timed runs per setting, after one warm-up (default 7)")
    bn.add_argument("--device", default="cpu", help="cpu, cuda or auto (default: cpu)")
    bn.add_argument("--no-reference", action="store_true", help="skip timing the CLIPSeg architecture")
    return p


def _threshold_options(methods: list[str], threshold: float | None) -> dict:
    if threshold is None:
        return {}
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"--threshold must lie in [0, 1], got {threshold}")
    from ovseg.core.registry import split_method_spec

    return {split_method_spec(m)[0]: {"threshold": threshold} for m in methods}


def cmd_segment(args) -> int:
    from tqdm import tqdm

    from ovseg.app.render import (colour, file_stems, mask_overlay, prior_overlay, pseudo_label_overlay, save_png,
                                  sparse_saliency)
    from ovseg.core.cache import atomic_write_json
    from ovseg.core.concepts import parse_concepts
    from ovseg.core.predictor import Predictor
    from ovseg.core.registry import parse_methods

    methods = parse_methods(args.methods)
    positives, negatives = parse_concepts(args.words)  # a bad word list fails before any model loads
    negatives = [n for n in negatives if n not in positives]  # as predict() does with the whole list
    predictor = Predictor(device=args.device, method_options=_threshold_options(methods, args.threshold))
    predictor.set_image(args.image)
    print(f"models loaded in {predictor.models.load():.1f} s; set_image {predictor.last_set_image_ms:.0f} ms",
          flush=True)
    # one (method spec, word) at a time, with a progress bar on stderr (words done, rate, time left)
    tasks = [(spec, word) for spec in methods for word in positives]
    results, prediction = [], None
    for spec, word in tqdm(tasks, desc="segment", unit="word", file=sys.stderr, dynamic_ncols=True,
                           disable=len(tasks) < 2):
        prediction = predictor.predict([word], negatives=negatives, caption=args.caption, methods=[spec])
        results += [(spec, word, r) for r in prediction.results]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    image = predictor.image
    save_png(out / "image.png", image)
    summary = {"image": str(Path(args.image).resolve()), "size": list(prediction.image_size),
               "words": args.words, "negatives": list(prediction.negatives), "caption": prediction.caption,
               "set_image_ms": round(predictor.last_set_image_ms, 2), "results": []}
    # file names: distinct per word and per method spec, readable ('hot-dog' and 'hot dog' differ)
    word_stems, spec_stems = file_stems(positives), file_stems(methods)
    print(f"{'word':<16} {'method':<14} {'score':>6} {'present':>7} {'area':>6} {'ms':>7}")
    for i, (spec, word, r) in enumerate(results):
        stem = f"{word_stems[word]}_{spec_stems[spec]}"
        files = {"mask": f"{stem}_mask.png", "mask_overlay": f"{stem}_mask_overlay.png"}
        save_png(out / files["mask"], r.mask)
        save_png(out / files["mask_overlay"], mask_overlay(image, r.mask, tuple(colour(i))))
        kinds = [p.kind for p in r.priors]
        for prior in r.priors:  # a kind a result shows twice (fused's evidence maps) is told apart by its label
            key = prior.kind if kinds.count(prior.kind) == 1 else re.sub(r"[^A-Za-z0-9]+", "_", prior.label).strip("_")
            files[key] = f"{stem}_{key}.png"
            save_png(out / files[key], prior_overlay(image, prior.map, prior.kind, sparse_saliency(r.details))[0])
        instances = []
        for k, pl in enumerate(r.pseudo_labels, 1):  # XPM's instance pseudo-masks, each with its noise map
            name = f"{stem}_pseudo{k}.png"
            save_png(out / name, pseudo_label_overlay(image, pl, colour_scale=False))  # aligned with the image
            instances.append({"box": [round(v, 1) for v in pl.box], "score": round(pl.score, 5),
                              "reliability": None if pl.reliability is None else round(pl.reliability, 5),
                              "area": round(float(pl.mask.mean()), 5), "file": name})
        area = float(r.mask.mean())
        summary["results"].append({"word": r.concept, "method": r.method, "spec": spec,
                                   "score": round(r.score, 5), "present": bool(r.present), "mask_area": round(area, 5),
                                   "ms": round(r.ms, 2), "files": files, "details": r.details,
                                   "pseudo_labels": instances})
        print(f"{r.concept:<16} {spec:<14} {r.score:>6.3f} {('yes' if r.present else 'no'):>7} "
              f"{area:>6.1%} {r.ms:>7.1f}")
    atomic_write_json(out / "summary.json", summary, default=str)
    print(f"wrote {len(results)} result(s) to {out}/ (summary.json, *_mask.png, *_attention.png)")
    return 0


def cmd_eval(args) -> int:
    from ovseg.train.evaluate import ABLATION, evaluate
    from ovseg.app.report import format_table, write_report
    from ovseg.core.registry import parse_methods

    methods = parse_methods(ABLATION if args.ablation else args.methods)
    if args.limit is not None and args.limit < 1:
        raise ValueError(f"--limit must be at least 1, got {args.limit}")
    metrics, curves = evaluate(args.coco_dir, methods, limit=args.limit, device=args.device,
                               reference=not args.no_reference,
                               base_on_held_out=args.ablation or args.base_on_held_out,
                               held_out_only=args.held_out_only, captions=not args.no_captions)
    paths = write_report(args.out, metrics, curves)
    print(format_table(metrics))
    print(f"wrote {', '.join(str(p) for p in paths.values())}")
    return 0


def cmd_train(args) -> int:
    import os

    from ovseg.train.registry import trainers

    trainer = trainers()[args.method]
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not trainer.distributed:
        able = ", ".join(n for n, t in trainers().items() if t.distributed)
        raise ValueError(f"`ovseg train {args.method}` does not run under torchrun ({world} processes would "
                         f"each train and write the whole model): run it as one process. Trainers that do: {able}")
    out = trainer.run(args)
    if out is not None:  # None: a torchrun process other than rank 0, which writes nothing
        print(f"wrote {out}/ ({', '.join(sorted(p.name for p in out.iterdir()))})")
    return 0


def cmd_proxies(args) -> int:
    """Without an image there is no likelihood to prune by: WordNet's related classes are listed nearest to
    the word (by the text encoder) first, as the paper's Table 2 orders them by semantic similarity."""
    from ovseg.core.models.imagenet import imagenet_classes
    from ovseg.core.models import Models
    from ovseg.core.methods.cls_saliency.proxy_labels import text_related, wordnet_related

    if args.k < 1:
        raise ValueError(f"-k must be at least 1, got {args.k}")
    models = Models("cpu")
    names = [c.name for c in imagenet_classes()]
    print("| word | WordNet proxy labels (ours) | text-encoder proxy labels |\n|---|---|---|")
    for word in args.words:
        related, source = wordnet_related(models.lexicon, word)
        if related:
            sims = models.class_similarity(word)[list(related)]
            ranked = [related[i] for i in sims.argsort(descending=True)[: args.k].tolist()]
            wn = ", ".join(names[i] for i in ranked) + (f" ({len(related)} related)" if len(related) > args.k else "")
            wn += " (via hypernym)" if source == "wordnet-hypernym" else ""
        else:
            wn = "none: falls back to the text encoder"
        text = ", ".join(names[i] for i in text_related(models, word, args.k))
        print(f"| {word} | {wn} | {text} |")
    return 0


def cmd_scaling(args) -> int:
    from ovseg.train.scaling import parse_fractions, study

    import shlex

    extra = shlex.split(args.train_args)
    record = study(args.method, parse_fractions(args.fractions), args.out, args.coco, extra)
    print("| share | images | strict mIoU target | strict mIoU base | train s |\n|---|---|---|---|---|")
    for r in sorted(record["rows"].values(), key=lambda r: r["fraction"]):
        seconds = "" if r["train_seconds"] is None else f"{r['train_seconds']:.0f}"
        print(f"| {r['fraction']:.0%} | {r['images']} | {r['miou_target']:.3f} | {r['miou_base']:.3f} | {seconds} |")
    print(f"plot: {Path(args.out) / 'scaling.png'}")
    return 0


def cmd_label(args) -> int:
    from ovseg.app.curate.label import DEFAULT_BATCH, DEFAULT_METHODS, label, parse_shard, worker_device

    shard = parse_shard(args.shard)
    out = label(args.source, args.dataset, words=args.words, captions=args.captions,
                methods=args.methods or DEFAULT_METHODS, device=worker_device(args.device),
                batch_size=args.batch_size or DEFAULT_BATCH, limit=args.limit, split=args.split, db_dir=args.db_dir,
                shard=shard)
    rate = f", {out['images_per_second']} images/s" if out["images_per_second"] else ""
    where = f" (shard {out['shard'][0]}/{out['shard'][1]})" if out["shard"] else ""
    print(f"{out['dataset']}{where}: {out['samples_added']} sample(s) added from {out['labelled_images']} image(s) in "
          f"{out['seconds']} s{rate}; {out['skipped_images']} image(s) already labelled; {out['samples']} in all")
    for key, why in out["failed"]:
        print(f"skipped {key}: {why}", file=sys.stderr)
    return 0


def cmd_review(args) -> int:
    from ovseg.app.curate.review import oracle_review, review

    if args.oracle:
        out = oracle_review(args.dataset, args.oracle, args.min_iou, db_dir=args.db_dir)
        print(f"{args.dataset}: {out['approved']} approved, {out['rejected']} rejected of {out['labels']} labels "
              f"(IoU >= {out['min_iou']}; mean IoU {out['mean_iou']:.3f}; {out['no_class']} name no COCO class)")
        return 0
    review(args.dataset, port=args.port, address=args.address, view=args.view, db_dir=args.db_dir)
    return 0


def cmd_export(args) -> int:
    from ovseg.app.curate.export import export

    out = export(args.dataset, args.out, [t for t in args.tags.split(",")], db_dir=args.db_dir)
    print(f"wrote {out['out']}/ (instances.json, captions.json, images/): {out['annotations']} masks on "
          f"{out['images']} images, {out['categories']} categories, {out['captions']} captions")
    return 0


def cmd_retrain(args) -> int:
    from ovseg.app.curate.retrain import RetrainConfig, retrain

    if args.epochs < 1:
        raise ValueError(f"--epochs must be at least 1, got {args.epochs}")
    if args.segmenter_eval_images < 1:
        raise ValueError(f"--segmenter-eval-images must be at least 1, got {args.segmenter_eval_images}")
    cfg = RetrainConfig(dataset=args.dataset, coco_dir=args.coco, tags=tuple(t.strip() for t in args.tags.split(",")),
                        epochs=args.epochs, evaluate=not args.no_eval, segmenter=not args.no_segmenter,
                        segmenter_eval_images=args.segmenter_eval_images)
    out = retrain(cfg, db_dir=args.db_dir)
    c = out["curated"]
    print(f"xpm {out['version']} (from {out['from']}) in {out['folder']}: {c['labels']} curated labels on "
          f"{c['images']} images ({c['dropped_on_held_out']} on held-out images left out), "
          f"{len(c['new_words'])} new words; now in use")
    _print_evaluation(out)
    seg = out.get("segmenter")
    if seg and "error" in seg:
        print(f"cls_saliency segmenter not retrained: {seg['error']}")
    elif seg:
        p = seg["pairs"]
        print(f"cls_saliency segmenter {seg['version']} (from {seg['from']}) in {seg['folder']}: {p['curated']} "
              f"curated (image, word) pairs and {p['base_replayed']} base pairs on {p['images']} images; now in use")
        _print_evaluation(seg)
    return 0


def _print_evaluation(out: dict) -> None:
    if "evaluation" in out:
        ev = out["evaluation"]
        print(f"  held-out concept mIoU ({ev['images']} images): target {ev['before']['target_miou']:.3f} -> "
              f"{ev['after']['target_miou']:.3f}, base {ev['before']['base_miou']:.3f} -> {ev['after']['base_miou']:.3f}")


def cmd_checkpoints(args) -> int:
    from ovseg.core.checkpoints import describe, use

    if args.use:
        print(f"{args.method}: now using {use(args.method, args.use)}")
    for row in describe(args.method):
        ev = row["summary"].get("evaluation", {})
        fig = (f"held-out target mIoU {ev['before']['target_miou']:.3f} -> {ev['after']['target_miou']:.3f}"
               if ev else "")
        src = f"from {row['summary'].get('dataset')!r}" if row["summary"] else "shipped with ovseg"
        print(f"{'*' if row['current'] else ' '} {row['version']:<9} {src:<28} {fig}")
    return 0


def cmd_bench(args) -> int:
    import cv2

    from ovseg.app.bench import bench, format_bench
    from ovseg.core.image_io import load_image
    from ovseg.core.registry import parse_methods

    methods = parse_methods(args.methods)
    if args.runs < 1:
        raise ValueError(f"--runs must be at least 1, got {args.runs}")
    if args.image is None:
        from importlib import resources

        args.image = str(resources.files("ovseg.assets").joinpath("examples", "coffee.jpg"))
    image = load_image(args.image)
    if args.size.lower() != "none":
        try:
            w, h = (int(v) for v in args.size.lower().split("x"))
        except ValueError:
            raise ValueError(f"--size reads WxH (e.g. 640x480) or none, got {args.size!r}") from None
        image = cv2.resize(image, (w, h), interpolation=cv2.INTER_AREA)
    print(format_bench(bench(image, methods, runs=args.runs, device=args.device, reference=not args.no_reference)))
    return 0


def cmd_methods(args) -> int:
    from ovseg.core.registry import available_methods, get_method

    for name in available_methods():
        cls = get_method(name)
        print(f"{name:<14} {'trained ' if cls.trained else 'training-free'}  {cls.summary}")
    return 0


def _words_not_options(argv: list[str]) -> list[str]:
    """argparse takes any argument that starts with '-' for an option, so a word list that starts with a
    negative ("-dog,cat") would be answered with the usage text. No option of ovseg holds a comma: such an
    argument gets a leading space, which argparse reads as a value (the word parser strips it). The value of
    `ovseg scaling --train-args` is glued to it with "=" for the same reason."""
    out = [" " + a if a.startswith("-") and not a.startswith("--") and "," in a else a for a in argv]
    # `--train-args --no-ablation`: its value is itself a flag, which argparse would take for an option.
    for i in range(len(out) - 1):
        if out[i] == "--train-args" and out[i + 1].startswith("-"):
            out[i : i + 2] = [f"--train-args={out[i + 1]}", None]
    return [a for a in out if a is not None]


def check_output_folder(path, option: str = "--out") -> Path:
    """Refuse, before any work starts, an output folder that cannot be written: an existing file, a path
    below a file, a folder (or the nearest existing folder above it) this user cannot create files in.
    Nothing is created. Raises OvsegError with one line naming the option and the path."""
    from ovseg.core.errors import OvsegError

    out = Path(path).expanduser()
    if out.exists() and not out.is_dir():
        raise OvsegError(f"{option} {out} is a file, not a folder: name a folder (it is created if missing)")
    nearest = out
    while not nearest.exists() and nearest.parent != nearest:
        nearest = nearest.parent
    if not nearest.is_dir():
        raise OvsegError(f"{option} {out} cannot be created: {nearest} is a file, not a folder")
    try:  # os.access is not enough: root passes it on read-only file systems
        fd, probe = tempfile.mkstemp(prefix=".ovseg-write-test-", dir=nearest)
    except OSError as exc:
        raise OvsegError(f"{option} {out} is not writable: cannot create files in {nearest} "
                         f"({exc.strerror or exc})") from None
    os.close(fd)
    os.unlink(probe)
    return out


# The options naming a folder a command writes (its results, or FiftyOne's database), checked before it runs.
OUTPUT_OPTIONS = (("out", "--out"), ("db_dir", "--db-dir"))


def main(argv=None) -> int:
    args = _parser().parse_args(_words_not_options(sys.argv[1:] if argv is None else list(argv)))
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # no weight-loading progress bars
    from ovseg.core.errors import OvsegError

    command = {"segment": cmd_segment, "eval": cmd_eval, "train": cmd_train, "proxies": cmd_proxies,
               "methods": cmd_methods, "scaling": cmd_scaling, "label": cmd_label, "review": cmd_review,
               "export": cmd_export,
               "retrain": cmd_retrain, "checkpoints": cmd_checkpoints, "bench": cmd_bench}[args.command]
    try:
        for attr, option in OUTPUT_OPTIONS:
            if getattr(args, attr, None):
                check_output_folder(getattr(args, attr), option)
        return command(args)
    except (OvsegError, ValueError, FileNotFoundError, NotADirectoryError) as exc:
        if args.debug:
            raise
        print(f"ovseg {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"ovseg {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # an unexpected failure: one line, the traceback behind --debug
        if args.debug:
            raise
        print(f"ovseg {args.command}: unexpected error: {type(exc).__name__}: {exc} (rerun with --debug)",
              file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
