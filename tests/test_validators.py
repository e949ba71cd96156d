"""Validators match the whole string: a trailing newline makes an id, a name or a key invalid (issue 24, item 9)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydantic import ValidationError

from bincount.contracts.naming import check_endpoint_name, check_name
from bincount.contracts.registry import InvalidReferenceError, check_group, parse_reference
from bincount.download import image_path
from bincount.ids import UnsafeNameError, check_image_id
from bincount.manifest import ManifestError, build_manifest, image_uri, parse_manifest
from bincount.storage import Storage
from flows.data import DataOptions


@pytest.mark.parametrize("value", ["00710\n", "00710\r\n", "\n00710"])
def test_an_image_id_with_a_newline_is_refused(value: str, tmp_path: Path) -> None:
    assert check_image_id("00710") == "00710"
    with pytest.raises(UnsafeNameError, match=r"is not an image id"):
        check_image_id(value)
    with pytest.raises(UnsafeNameError):
        image_path(tmp_path, value)
    with pytest.raises(UnsafeNameError):
        image_uri("s3://abid-sample", value)


def test_a_manifest_entry_with_a_trailing_newline_is_refused_naming_it() -> None:
    document = json.dumps({"1": ["data/metadata/00710.json", "data/metadata/00711.json\n"]})
    with pytest.raises(ManifestError, match=r"manifest\['1'\]\[1\] = 'data/metadata/00711.json\\n'"):
        parse_manifest(document, name="manifest")


def test_ids_with_a_trailing_newline_are_refused_before_any_request(tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match=r"1 of 2 ids are not image ids \(image_ids\[1\] = '00711\\n'\)"):
        build_manifest(Storage(), tmp_path.as_uri(), ["00710", "00711\n"])


@pytest.mark.parametrize("kind", ["endpoint", "training", "model"])
def test_a_name_with_a_trailing_newline_is_refused(kind: str) -> None:
    assert check_name("bincount", kind) == "bincount"
    with pytest.raises(ValueError, match=r"name 'bincount\\n': use letters, digits and hyphens"):
        check_name("bincount\n", kind)


def test_an_endpoint_or_group_name_with_a_trailing_newline_is_refused() -> None:
    with pytest.raises(ValueError, match="endpoint name"):
        check_endpoint_name("bincount\n")
    with pytest.raises(InvalidReferenceError, match=r"model group 'bincount\\n'"):
        check_group("bincount\n")
    assert str(parse_reference(" bincount:3 ")) == "bincount:3"  # a typed reference is trimmed, then matched whole
    with pytest.raises(InvalidReferenceError):
        parse_reference("bincount:3\nx")


def test_a_dataset_name_with_a_trailing_newline_is_refused() -> None:
    assert DataOptions(dataset="abid").dataset == "abid"
    with pytest.raises(ValidationError, match="dataset"):
        DataOptions(dataset="abid\n")
