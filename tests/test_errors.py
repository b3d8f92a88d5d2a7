"""One exception tree, drawn in the errors module's docstring."""

import inspect

import kdserve
from kdserve import errors


def _classes():
    members = inspect.getmembers(errors, inspect.isclass)
    return [c for _, c in members if c.__module__ == errors.__name__]


def test_every_error_is_a_kdserve_error_and_exported():
    for cls in _classes():
        assert issubclass(cls, kdserve.KdserveError)
        assert getattr(kdserve, cls.__name__) is cls


def test_docstring_tree_draws_every_class_under_its_parent():
    doc = errors.__doc__
    lines = [line for line in doc.splitlines() if "Error" in line and line.startswith("    ")]
    depth = {}
    for line in lines:
        stripped = line.strip().lstrip("│├└─ ")
        name = stripped.split()[0]
        depth[name] = len(line) - len(line.lstrip(" │├└─"))
    for cls in _classes():
        assert cls.__name__ in depth, f"{cls.__name__} missing from the tree"
        parent = cls.__mro__[1]
        if parent is not Exception:
            assert depth[cls.__name__] > depth[parent.__name__]


def test_errors_carry_their_context():
    err = kdserve.AlignmentError("x", teachers=("a", "b"), sample_ids=(1, 2))
    assert err.teachers == ("a", "b") and err.sample_ids == (1, 2)
    assert kdserve.StoreError("x", path="/s").path == "/s"
    locked = kdserve.StoreLockedError("x", path="/s", pid=7, host="h")
    assert isinstance(locked, kdserve.StoreError)
    assert (locked.path, locked.pid, locked.host) == ("/s", 7, "h")
    repeated = kdserve.AlignmentError("x", teacher="t", teachers=("t", "t"), sample_ids=(4, 5, 9))
    assert repeated.teacher == "t" and repeated.sample_ids == (4, 5, 9)
    assert kdserve.CodecError("x", field="f", codec="fp16").field == "f"
    assert isinstance(kdserve.SchemaError("x"), ValueError)
