"""The Predictor's method instances: one per spec, the least recently used dropped past a bound, all dropped
by reload_methods (after a retrain); and the default method."""

from ovseg.core.predictor import DEFAULT_METHODS, MAX_METHOD_INSTANCES, Predictor


def test_method_instances_are_bounded_and_reloadable(predictor):
    p = Predictor(models=predictor.models, methods=["cam"])
    first = p.method("cam[threshold=0.01]")
    assert p.method("cam[threshold=0.01]") is first  # one instance per spec
    for k in range(MAX_METHOD_INSTANCES + 3):
        p.method(f"cam[threshold={0.1 + k / 100}]")
        p.method("cam[threshold=0.01]")  # kept in use: never the least recently used
    assert len(p._methods) == MAX_METHOD_INSTANCES
    assert p.method("cam[threshold=0.01]") is first
    assert "cam[threshold=0.1]" not in p._methods  # the oldest unused one went
    p.reload_methods()
    assert p.method("cam[threshold=0.01]") is not first


def test_default_methods(predictor, examples_dir):
    assert DEFAULT_METHODS == ("fused",)
    p = Predictor(models=predictor.models, methods="cam, cam[threshold=0.5]")
    p.set_image(examples_dir / "cat.jpg")
    out = p.predict("cat")
    assert [r.method for r in out.results] == ["cam", "cam"]
    assert set(p.presence("cat")) == {"cat"}
