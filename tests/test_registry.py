"""Tests of ovseg.core.registry, and a smoke test of every registered method on a real photograph."""

import numpy as np
import pytest
from PIL import Image

from ovseg.core import registry
from ovseg.core.methods.base import Method
from ovseg.core.methods.cam import CAM
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


@pytest.mark.parametrize("name", ["cam2", "cls_saliency", "a_b_c"])
def test_register_valid_names_are_accepted(name):
    register_method(name)  # only builds the decorator; nothing is registered


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
