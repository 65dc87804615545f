"""The 0.1.0 import paths of modules that are internal now still work, with a warning."""

from __future__ import annotations

import importlib
import warnings

import pytest

import querywatch
from querywatch import _collection, _reporting


def test_an_old_import_path_forwards_to_the_internal_module_with_a_deprecation_warning() -> None:
    old = importlib.import_module("querywatch.collection")
    with pytest.warns(DeprecationWarning, match=r"import watch from querywatch instead"):
        watch = old.watch
    assert watch is _collection.watch is querywatch.watch


def test_a_name_with_no_public_replacement_says_so() -> None:
    old = importlib.import_module("querywatch.reporting")
    with pytest.warns(DeprecationWarning, match=r"log_report is not public API"):
        assert old.log_report is _reporting.log_report


def test_a_name_the_internal_module_lacks_is_an_attribute_error() -> None:
    old = importlib.import_module("querywatch.metrics")
    with pytest.raises(AttributeError):
        old.no_such_name  # noqa: B018


@pytest.mark.parametrize(
    "name", ["collection", "detection", "instrumentation", "metrics", "reporting"]
)
def test_every_old_module_imports_without_warning(name: str) -> None:
    module = importlib.import_module(f"querywatch.{name}")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        importlib.reload(module)  # runs the module's code again, as a first import would
    assert [w.message for w in caught] == []
