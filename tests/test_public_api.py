"""The package root exports exactly its public API."""

import importlib
import inspect

import pytest

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


USER_API = {
    # teachers: Pantheon's class and the one-call forms
    "Teacher", "dump", "serve", "Service", "Limits",
    # students
    "Student", "Loader", "VocabMap",
    # what knowledge is
    "SAMPLE_ID", "Field", "Schema", "Knowledge", "Ragged", "from_record_batch", "to_record_batch",
    "Codec", "Fp16", "Bf16", "Int8", "TopK",
    "MergeStrategy", "Sum", "Mean", "Max", "Min", "WeightedMean", "Take",
    # stores as files
    "StoreReader", "StoreWriter",
    # errors
    "KdserveError", "AlignmentError", "AuthenticationError", "CodecError", "MergeError",
    "ProtocolError", "SchemaError", "StoreError", "StoreLockedError", "TeacherUnavailableError",
    # status lines on stderr
    "show_status", "__version__",
}  # fmt: skip


def test_the_root_exports_the_users_api_only():
    assert set(kdserve.__all__) == USER_API


@pytest.mark.parametrize(
    ("name", "module"),
    [
        ("Sampler", "kdserve.core.sampler"),
        ("rebatch", "kdserve.core.rebatch"),
        ("Merger", "kdserve.core.merge"),
        ("iter_feed_batches", "kdserve.teacher.feeds"),
    ],
)
def test_plumbing_the_root_used_to_export_still_resolves_with_a_warning(name, module):
    with pytest.warns(DeprecationWarning, match=rf"kdserve\.{name} moved to {module}\.{name}"):
        value = getattr(kdserve, name)
    assert value is getattr(importlib.import_module(module), name)


def test_an_unknown_root_name_is_an_attribute_error():
    with pytest.raises(AttributeError, match="no attribute 'Teachr'"):
        kdserve.Teachr  # noqa: B018


def test_internal_packages_are_not_re_exported():
    for internal in ("TeacherServer", "TeacherClient", "ReplayWindow", "Prefetcher", "Pipeline"):
        assert not hasattr(kdserve, internal)
