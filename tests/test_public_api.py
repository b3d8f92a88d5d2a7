"""The package root exports exactly its public API."""

import inspect

import kdserve


def test_all_matches_public_names():
    public = {
        name
        for name, value in vars(kdserve).items()
        if not name.startswith("_") and not inspect.ismodule(value)
    }
    assert set(kdserve.__all__) == public | {"__version__"}


def test_every_export_resolves_and_is_documented():
    for name in kdserve.__all__:
        value = getattr(kdserve, name)
        if inspect.isclass(value) or inspect.isfunction(value):
            assert inspect.getdoc(value), f"{name} has no docstring"
