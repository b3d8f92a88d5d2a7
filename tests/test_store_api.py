"""kdserve.store exports exactly what other code imports from it, each documented."""

import inspect

import kdserve.store


def test_all_matches_public_names():
    public = {
        name
        for name, value in vars(kdserve.store).items()
        if not name.startswith("_") and not inspect.ismodule(value) and name != "annotations"
    }
    assert set(kdserve.store.__all__) == public


def test_every_export_resolves_and_is_documented():
    for name in kdserve.store.__all__:
        value = getattr(kdserve.store, name)
        if inspect.isclass(value) or inspect.isfunction(value):
            assert inspect.getdoc(value), f"{name} has no docstring"
