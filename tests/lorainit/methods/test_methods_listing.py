"""``lorainit.methods()``: the documented listing, the registry's ``methods``; the package stays a package."""
import importlib
import sys

import lorainit
from lorainit import registry


def test_calling_the_package_forwards_to_the_registry_listing():
    assert lorainit.methods() == registry.methods()
    names = [m["name"] for m in lorainit.methods()]
    assert names == sorted(names) and {"lora_da", "hrp", "lora", "eva"} <= set(names)
    assert all({"name", "paper"} <= set(m) for m in lorainit.methods())


def test_registered_methods_appear_in_the_listing(monkeypatch):
    import dataclasses

    spec = dataclasses.replace(registry.get_method("lora"), name="zz_listed")
    monkeypatch.setitem(registry._REGISTERED, "zz_listed", spec)
    assert lorainit.methods()[-1]["name"] == "zz_listed"


def test_the_methods_package_is_an_ordinary_package_for_imports():
    import lorainit.methods.eva as eva

    assert sys.modules["lorainit.methods"] is lorainit.methods
    assert importlib.import_module("lorainit.methods.eva") is eva is lorainit.methods.eva
    assert hasattr(lorainit.methods, "__path__")
