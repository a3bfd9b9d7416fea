"""How results become a FiftyOne sample's fields: one pseudo-mask per instance, none for a word the method
judges absent (a reviewer's time goes to labels the engine believes in)."""

import numpy as np
import pytest

from ovseg.app.curate.schema import LABEL_FIELD, sample_fields
from ovseg.core.types import ConceptResult, Prior, PseudoLabel


@pytest.fixture(scope="module")
def fo():
    """FiftyOne as ovseg configures it (its database and plugin folders set before the first import: a bare
    `import fiftyone` here would fix FiftyOne's settings for every later test in the process)."""
    from ovseg.app.curate.fo import fiftyone

    return fiftyone()


def _mask(x0, x1):
    m = np.zeros((20, 30), bool)
    m[5:15, x0:x1] = True
    return m


def _result(method, present, instances=()):
    mask = _mask(0, 20)
    prior = Prior(mask.astype(np.float32), method, "dog", "attention", 0.5)
    labels = [PseudoLabel(_mask(a, b), "dog", 0.9, method, reliability=0.7) for a, b in instances]
    return ConceptResult("dog", method, mask, 0.9 if present else 0.01, present, [prior], labels)


def test_instances_become_one_detection_each_and_absent_words_none(fo):
    fields = sample_fields(fo, [("fused", _result("fused", True, [(0, 8), (12, 20)])),
                                ("cam", _result("cam", False))])
    dets = fields[LABEL_FIELD].detections
    assert [d.method for d in dets] == ["fused", "fused"]  # cam judged dog absent: no label from it
    assert [round(d.bounding_box[2] * 30) for d in dets] == [8, 8]
    assert fields["reliability"] == pytest.approx(0.7)
    assert fields["score"] == pytest.approx(0.9)
    assert fields["agreement"] == pytest.approx(1.0)  # both concept masks are the same here
    assert "attention_cam" in fields and "attention_fused" in fields


def test_a_present_word_without_instances_gets_its_concept_mask(fo):
    dets = sample_fields(fo, [("cam", _result("cam", True))])[LABEL_FIELD].detections
    assert len(dets) == 1 and dets[0].method == "cam" and dets[0].present is True
