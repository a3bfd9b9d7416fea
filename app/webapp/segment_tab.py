"""The Segment tab: an image, words and a caption in; per word the priors, the mask and its facts out."""

from __future__ import annotations

import math

from ovseg.app.webapp.common import (MAX_WORDS, NO_IMAGE, READY, SALIENCY_CHOICES, check_threshold,
                                     default_threshold, error_status, example_images, has_grabcut, has_option, md)
from ovseg.app.webapp.engine import Engine
from ovseg.core.methods.cls_saliency.method import DEFAULT_SALIENCY
from ovseg.core.concepts import parse_concepts
from ovseg.core.errors import OvsegError
from ovseg.core.registry import available_methods


# details the gallery draws rather than lists (a per-patch map)
DRAWN_DETAILS = ("group_assignment",)


def gallery_items(out, image) -> list[tuple]:
    """Per word: each prior as a heatmap overlay, then the mask overlay, with readable captions."""
    from ovseg.app.render import (NOISY_BELOW, colour, group_overlay, mask_overlay, prior_overlay,
                                  pseudo_label_overlay, side_by_side, sparse_saliency, with_colour_scale,
                                  with_stripe_bars)

    words = list(dict.fromkeys(r.concept for r in out.results))
    items = []
    for r in out.results:
        if "group_assignment" in r.details and r.concept == words[0]:  # OVSegmentor: the groups, once per image
            items.append((group_overlay(image, r.details["group_assignment"], r.details.get("group_legend", [])),
                          f"groups · {len(r.details.get('group_legend', []))} of {r.details.get('groups')} hold "
                          "patches · legend: each group's best words"))
        pair = {p.kind: p for p in r.priors if p.kind in ("saliency_positive", "saliency_negative")}
        sparse = sparse_saliency(r.details)
        if len(pair) == 2:  # Golub et al.'s S+ and S-, side by side: how different they are is the point
            (left, note), (right, _) = (prior_overlay(image, pair[k].map, k, sparse)
                                        for k in ("saliency_positive", "saliency_negative"))
            corr = r.details.get("saliency_correlation")
            footer = f"correlation of S+ and S-: {corr:.2f}" if corr is not None else ""
            items.append((side_by_side(left, right, "S+ (the word)", "S- (distractors)", footer),
                          f"{r.concept} · S+ | S- ({r.details.get('saliency', '')}{', ' + note if note else ''})"
                          + (f" · correlation {corr:.2f}" if corr is not None else "")))
        for prior in r.priors:
            if prior.kind in pair and len(pair) == 2:
                continue
            score = r.score if math.isnan(prior.score) else prior.score
            overlay, note = prior_overlay(image, prior.map, prior.kind, sparse)
            if prior.kind == "noise":
                overlay = with_colour_scale(overlay, "agree", "disagree", "noise")
            if prior.kind == "caption":  # Cap2Seg (and fused with a caption): where the caption puts the word
                own, fused = r.details.get("stripes"), r.details.get("fused_stripes")
                if fused and (prior.label.startswith("fused") or not own):
                    overlay = with_stripe_bars(overlay, fused, "caption + local")
                elif own:
                    overlay = with_stripe_bars(overlay, own)
            kind = prior.label + (f" ({note})" if note else "")
            items.append((overlay, f"{r.concept} · {kind} · score {score:.2f}"))
        rgb = tuple(int(c) for c in colour(words.index(r.concept)))
        items.append((mask_overlay(image, r.mask, rgb), f"{r.concept} · mask · {r.ms:.0f} ms{_verdict(r)}"))
        # each instance pseudo-label (XPM): noise map inside the mask, outline coloured by reliability,
        # the least reliable first so that the noisy ones stand out
        order = sorted(r.pseudo_labels, key=lambda pl: 1.0 if pl.reliability is None else pl.reliability)
        for k, pl in enumerate(order, 1):
            rel = "" if pl.reliability is None else f" · reliability {pl.reliability:.2f}"
            # the flag follows the value shown (0.497 shows as 0.50: not noisy)
            flag = " · NOISY" if pl.reliability is not None and round(pl.reliability, 2) < NOISY_BELOW else ""
            items.append((pseudo_label_overlay(image, pl),
                          f"{r.concept} · pseudo-mask {k} · score {pl.score:.2f}{rel}{flag}"))
    return items


def _verdict(r) -> str:
    """Concept verification against its threshold, for the mask's caption ("" for methods without it)."""
    d = r.details
    if "verification_cosine" not in d:
        return ""
    verdict = "present" if d.get("verified_present") else "absent"
    return (f" · verification {d['verification_cosine']:.2f} vs threshold {d['presence_threshold']:.2f}"
            f" ({d.get('threshold_source', 'shared')}) → {verdict}; {d.get('gate', '')}")


def _cell(value) -> str:
    """A details value as one Markdown table cell."""
    if isinstance(value, bool):
        text = "yes" if value else "no"
    elif isinstance(value, float):
        text = f"{value:.3g}"
    elif isinstance(value, (list, tuple)) and value and all(
            isinstance(v, (list, tuple)) and len(v) == 3 and isinstance(v[2], (list, tuple)) for v in value):
        text = "; ".join(f"{k}: {share:.0%} {'/'.join(words)}" for k, share, words in value)  # OVSegmentor's groups
    elif isinstance(value, (list, tuple)) and all(isinstance(v, (list, tuple)) and len(v) == 2 for v in value):
        text = ", ".join(f"{a} ({b:.3g})" if isinstance(b, float) else f"{a} ({b})" for a, b in value)
    elif isinstance(value, (list, tuple)):
        text = ", ".join(str(v) for v in value)
    else:
        text = str(value)
    return md(text).replace("\n", " ")


def summary(out, image, set_ms, device: str) -> str:
    """The status box: one line about the run, then a small table per word."""
    h, w = image.shape[:2]
    set_text = "already set" if set_ms is None else f"{set_ms:.0f} ms"
    lines = [f"**Done** · image {w}×{h} · set_image {set_text} · device {device}"]
    if out.negatives:
        lines.append(f"\nnegative words: {', '.join(out.negatives)}")
    if out.caption:
        lines.append(f"\ncaption: {_cell(out.caption)}")
    for r in out.results:
        lines += ["", f"| {_cell(r.concept)} | {r.method} |", "|---|---|",
                  f"| presence score | {r.score:.2f} |", f"| present | {'yes' if r.present else 'no'} |",
                  f"| time | {r.ms:.0f} ms |"]
        lines += [f"| {_cell(k.replace('_', ' '))} | {_cell(v)} |" for k, v in r.details.items()
                  if k not in DRAWN_DETAILS]
    return "\n".join(lines)


def check_upload(image):
    """On upload: decode with the engine's loader, so that a bad file is named at once and cleared from
    the image box (no broken preview). -> (image update, status)."""
    import gradio as gr

    from ovseg.core.image_io import load_image

    image = image or {}
    if not image.get("path"):
        return gr.skip(), READY
    try:
        h, w = load_image(image["path"]).shape[:2]
    except Exception as exc:
        return None, error_status(exc, image)
    name = md(image.get("orig_name") or "image")
    return gr.skip(), f"**{name}** · {w}×{h} · now type words and press **Segment**."


def make_handler(engine: Engine):
    """The Segment handler: raw gradio payloads in, (gallery items, status Markdown) out; never raises."""

    def segment(image, words, caption, method, threshold, grabcut=True, saliency=None):
        image = image or {}
        try:
            if not image.get("path"):
                raise OvsegError(NO_IMAGE)
            if method not in available_methods():
                raise OvsegError(f"unknown method {method!r}; available: {', '.join(available_methods())}")
            positives, negatives = parse_concepts(words or "")  # a bad word list is refused before any model loads
            n = len(positives) + len(negatives)
            if n > MAX_WORDS:
                raise OvsegError(f"{n} words in one request: at most {MAX_WORDS} (negatives included); segment "
                                 "them in smaller groups, or a long list with `ovseg segment`")
            out, rgb, set_ms, device = engine.run(
                image["path"], words or "", caption or "", method, check_threshold(threshold), bool(grabcut),
                saliency,
            )
            return gallery_items(out, rgb), summary(out, rgb, set_ms, device)
        except Exception as exc:
            return [], error_status(exc, image)

    return segment


def segment_tab(gr, engine: Engine, methods: list[str], first: str) -> None:
    """The Segment tab: inputs on the left, results on the right."""
    with gr.Row(equal_height=False):
        with gr.Column(scale=2, min_width=320):
            image = gr.Image(type="filepath", image_mode=None, sources=["upload", "clipboard"],
                             label="Image", elem_id="image", height=340)
            gr.Examples([[str(p)] for p in example_images()], inputs=[image], label="Examples",
                        elem_id="examples")
            words = gr.Textbox(label="Words", placeholder="dog, frisbee, -person", elem_id="words",
                               info=f"comma-separated; a leading '-' marks a negative word; at most {MAX_WORDS}")
            caption = gr.Textbox(label="Caption (optional)", elem_id="caption",
                                 placeholder="a dog catching a frisbee in a park")
            with gr.Row():
                method = gr.Dropdown(methods, value=first, label="Method", elem_id="method")
                threshold = threshold_slider(gr, first)
            grabcut = gr.Checkbox(True, label="GrabCut post-processing", elem_id="grabcut",
                                  visible=has_grabcut(first),
                                  info="off: the segmenter's probability >= the mask threshold")
            saliency = gr.Radio(SALIENCY_CHOICES, value=DEFAULT_SALIENCY, label="Saliency priors",
                                elem_id="saliency", visible=has_option(first, "saliency"),
                                info="CAM: the proxy labels' class activation maps (the default, the best on "
                                     "unseen words); CAM-gated: guided backprop weighted by them (both not in "
                                     "the paper)")
            button = gr.Button("Segment", variant="primary", elem_id="segment-btn")
        with gr.Column(scale=3, min_width=360):
            gallery = gr.Gallery(label="Results", elem_id="results", columns=2, interactive=False,
                                 object_fit="contain", height="auto")
            status = gr.Markdown(READY, elem_id="status")
    image.upload(check_upload, image, [image, status], preprocess=False)
    def method_changed(name):
        return (threshold_slider(gr, name, render=False), gr.Checkbox(visible=has_grabcut(name)),
                gr.Radio(visible=has_option(name, "saliency")))

    method.change(method_changed, method, [threshold, grabcut, saliency])
    inputs, outputs = [image, words, caption, method, threshold, grabcut, saliency], [gallery, status]
    gr.on([button.click, words.submit], make_handler(engine), inputs, outputs, preprocess=False)



def threshold_slider(gr, method: str, render: bool = True):
    t = default_threshold(method)
    return gr.Slider(0.0, 1.0, value=0.5 if t is None else t, step=0.01,
                     label="Mask threshold" if t is not None else "Mask threshold (the method's own, per word)",
                     interactive=t is not None, elem_id="threshold", render=render)
