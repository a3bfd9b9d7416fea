"""The `@ovseg/curation` FiftyOne plugin: the one-click retrain as an App operator.

`retrain` fine-tunes XPM's student and (unless unticked) cls_saliency's class-agnostic segmenter on the current
dataset's pseudo-masks tagged `approved` (and the base training data of the COCO folder it was labelled from),
writes a new checkpoint version of each that ovseg then uses, and reports the held-out target/base concept
mIoU before and after (see `ovseg.app.curate.retrain`). ovseg puts
this folder on FIFTYONE_PLUGINS_DIR (`ovseg.app.curate.fo.configure`); open the operator browser with the
backtick key and type "retrain".
"""

import fiftyone.operators as foo
import fiftyone.operators.types as types


class Retrain(foo.Operator):
    @property
    def config(self):
        return foo.OperatorConfig(name="retrain", label="ovseg: retrain from approved labels",
                                  description="Fine-tune XPM's student and the class-agnostic segmenter on this "
                                              "dataset's approved pseudo-masks",
                                  allow_immediate_execution=True)

    def resolve_input(self, ctx):
        inputs = types.Object()
        inputs.int("epochs", default=3, label="Epochs", description="fine-tuning epochs (about 1.2 min each on a CPU)")
        inputs.bool("evaluate", default=True, label="Evaluate before and after on the held-out images")
        inputs.str("tags", default="approved", label="Train on the labels tagged")
        inputs.bool("segmenter", default=True, label="Also retrain the class-agnostic segmenter (cls_saliency)")
        return types.Property(inputs, view=types.View(label="Retrain ovseg (XPM student, segmenter)"))

    def execute(self, ctx):
        from ovseg.app.curate.retrain import RetrainConfig, retrain

        epochs = int(ctx.params.get("epochs", 3) or 3)
        tags = tuple(t.strip() for t in str(ctx.params.get("tags", "approved")).split(",") if t.strip())
        cfg = RetrainConfig(dataset=ctx.dataset.name, epochs=max(1, epochs), tags=tags or ("approved",),
                            evaluate=bool(ctx.params.get("evaluate", True)),
                            segmenter=bool(ctx.params.get("segmenter", True)))
        out = retrain(cfg, progress=False)
        result = {"version": out["version"], "labels": out["curated"]["labels"], "images": out["curated"]["images"]}
        ev = out.get("evaluation")
        if ev:
            result.update(target_before=round(ev["before"]["target_miou"], 4),
                          target_after=round(ev["after"]["target_miou"], 4),
                          base_before=round(ev["before"]["base_miou"], 4), base_after=round(ev["after"]["base_miou"], 4))
        seg = out.get("segmenter")
        if seg and "error" not in seg:
            result["segmenter_version"] = seg["version"]
            sev = seg.get("evaluation")
            if sev:
                result.update(segmenter_target_before=round(sev["before"]["target_miou"], 4),
                              segmenter_target_after=round(sev["after"]["target_miou"], 4))
        return result

    def resolve_output(self, ctx):
        outputs = types.Object()
        outputs.str("version", label="New XPM checkpoint (now in use)")
        outputs.int("labels", label="Curated labels trained on")
        outputs.int("images", label="Images they lie on")
        for key, label in (("target_before", "Held-out target mIoU before"), ("target_after", "... after"),
                           ("base_before", "Held-out base mIoU before"), ("base_after", "... after")):
            outputs.float(key, label=label)
        outputs.str("segmenter_version", label="New segmenter checkpoint (now in use)")
        outputs.float("segmenter_target_before", label="Segmenter: held-out target mIoU before")
        outputs.float("segmenter_target_after", label="... after")
        return types.Property(outputs)


def register(p):
    p.register(Retrain)
