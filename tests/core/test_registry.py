"""Tests of ovseg.core.registry, and a smoke test of every registered method on a real photograph."""

import numpy as np
import pytest
from PIL import Image

from ovseg.core import registry
from ovseg.core.methods.base import Method
from ovseg.core.methods.cam.method import CAM
from ovseg.core.registry import available_methods, get_method, parse_methods, register_method


@pytest.fixture()
def private_registry(monkeypatch):
    """Register test classes into a copy of the registry, so that no test leaves a method behind."""
    available_methods()  # the built-in methods first
    monkeypatch.setattr(registry, "_METHODS", dict(registry._METHODS))
    return registry._METHODS


def test_cam_is_registered():
    assert "cam" in available_methods()
    assert get_method("cam") is CAM
    assert CAM.name == "cam"
    assert CAM.summary and CAM.trained is False
    assert available_methods() == sorted(available_methods())


def test_get_method_unknown_names_the_available_ones():
    with pytest.raises(KeyError) as info:
        get_method("nope")
    message = str(info.value)
    assert "unknown method 'nope'" in message
    for name in available_methods():
        assert name in message


def test_parse_methods():
    assert parse_methods("cam, cam") == ["cam"]
    assert parse_methods(" cam ,, ") == ["cam"]
    assert parse_methods(["cam", " cam "]) == ["cam"]
    assert parse_methods(("cam",)) == ["cam"]
    # an empty list is a ValueError or (since UnknownMethodError) a KeyError; either way the message helps
    with pytest.raises((ValueError, KeyError), match="no method named; available: .*cam"):
        parse_methods(" , ")
    with pytest.raises((ValueError, KeyError), match="no method named"):
        parse_methods([])
    with pytest.raises(KeyError, match="unknown method 'nope'"):
        parse_methods("cam, nope")


def test_method_specs_with_options():
    from ovseg.core.registry import format_method_spec, split_method_spec

    assert parse_methods("cam, cls_saliency[variant=sem1c, grabcut=off], cam") == [
        "cam", "cls_saliency[variant=sem1c,grabcut=off]"]
    assert parse_methods("cam[threshold=0.4],cam[ threshold = 0.4 ]") == ["cam[threshold=0.4]"]
    assert split_method_spec("cls_saliency[grabcut=no, threshold=0.25, k=3, mapper=text]") == (
        "cls_saliency", {"grabcut": False, "threshold": 0.25, "k": 3, "mapper": "text"})
    assert split_method_spec("cam") == ("cam", {})
    assert format_method_spec("cls_saliency", {"grabcut": True, "k": 3}) == "cls_saliency[grabcut=on,k=3]"
    for bad, phrase in [("cam[threshold", "unclosed"), ("cam]", "unbalanced"), ("cam[threshold]", "key=value"),
                        ("cam[a=1,a=2]", "given twice"), ("cam[a=1]x", r"name\[key=value"),
                        ("nope[a=1]", "unknown method 'nope'")]:
        with pytest.raises(KeyError, match=phrase):
            parse_methods(bad)


def test_predictor_checks_spec_options_and_shares_image_work(predictor, examples_dir):
    from ovseg.core.errors import OvsegError
    from ovseg.core.predictor import Predictor

    p = Predictor(models=predictor.models)
    with pytest.raises(OvsegError, match="method 'cam' has no option 'colour'; its options: threshold"):
        p.method("cam[colour=red]")
    with pytest.raises(OvsegError, match=r"threshold must lie in \[0, 1\]"):
        p.method("cam[threshold=2]")
    p.set_image(examples_dir / "cat.jpg")
    low, high = p.predict("cat", methods="cam[threshold=0.1], cam[threshold=0.8]").results
    assert low.mask.sum() > high.mask.sum() > 0 and p.method("cam[threshold=0.8]").threshold == 0.8


def test_parse_methods_keeps_order(private_registry):
    @register_method("zz_test_first")
    class First(Method):
        pass

    assert parse_methods("zz_test_first, cam, zz_test_first") == ["zz_test_first", "cam"]
    assert parse_methods("cam,zz_test_first") == ["cam", "zz_test_first"]


def test_register_sets_name_and_is_idempotent_for_the_same_class(private_registry):
    @register_method("zz_test_method")
    class Mine(Method):
        summary = "test"

    assert Mine.name == "zz_test_method"
    assert get_method("zz_test_method") is Mine
    assert "zz_test_method" in available_methods()
    assert register_method("zz_test_method")(Mine) is Mine  # re-registering the same class is harmless


def test_register_a_second_class_under_an_existing_name_raises(private_registry):
    class Impostor(Method):
        pass

    with pytest.raises(ValueError, match="'cam' is already registered by CAM"):
        register_method("cam")(Impostor)
    assert get_method("cam") is CAM
    assert Impostor.name == ""  # not renamed by the failed registration


@pytest.mark.parametrize("name", ["", "Cam", "CAM", "cam-2", "cam 2", "cam.x", "_", "__", "cam!"])
def test_register_invalid_names_raise(name):
    with pytest.raises(ValueError, match="lower-case identifiers"):
        register_method(name)


@pytest.mark.parametrize("name", ["cam2", "zz_saliency", "a_b_c"])
def test_register_valid_names_are_accepted(private_registry, name):
    @register_method(name)
    class Valid(Method):
        pass

    assert Valid.name == name and get_method(name) is Valid and name in available_methods()
    assert parse_methods(f"cam, {name}") == ["cam", name]


@pytest.mark.parametrize("name", ["1cam", "café"])
def test_register_rejects_names_that_are_not_identifiers(name):
    with pytest.raises(ValueError):
        register_method(name)


@pytest.mark.parametrize("name", available_methods())
def test_every_method_runs_on_a_real_image(predictor, examples_dir, name):
    path = examples_dir / "cat.jpg"
    with Image.open(path) as im:
        width, height = im.size
    method = predictor.method(name)
    assert method is predictor.method(name)  # created once
    assert method.name == name
    predictor.set_image(path)
    out = predictor.predict("cat", methods=[name])
    assert out.image_size == (height, width)
    r = out.get("cat", name)
    assert r.method == name and r.concept == "cat"
    assert r.mask.shape == (height, width)
    assert r.mask.dtype == np.bool_
    assert 0.0 <= r.score <= 1.0
    assert isinstance(r.present, bool)
    assert r.priors, "a method explains its mask with at least one prior"
    for prior in r.priors:
        assert prior.map.shape == (height, width)
        assert prior.map.dtype == np.float32
        assert np.isfinite(prior.map).all()
        assert prior.map.min() >= 0.0 and prior.map.max() <= 1.0
        assert prior.method == name and prior.concept == "cat"
    assert r.ms > 0
