"""Manifests: the seed format, malformed input, and labels built from metadata."""

from __future__ import annotations

import json

import pytest

from bincount.manifest import ManifestError, build_manifest, dump_manifest, parse_manifest
from bincount.storage import Storage


def test_seed_format_round_trips() -> None:
    text = json.dumps({"1": ["data/metadata/00010.json"], "3": ["data/metadata/00002.json", "metadata/00007.json"]})
    manifest = parse_manifest(text)
    assert manifest == {"00010": 1, "00002": 3, "00007": 3}
    assert parse_manifest(dump_manifest(manifest)) == manifest


@pytest.mark.parametrize(
    ("document", "message"),
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "must be a JSON object"),
        ('{"6": ["data/metadata/00001.json"]}', "class key '6' is not one of"),
        ('{"1": "data/metadata/00001.json"}', r"manifest\['1'\] must be a list"),
        ('{"2": ["data/metadata/00001.json", "images/00002.jpg"]}', r"manifest\['2'\]\[1\] = 'images/00002.jpg'"),
        (
            '{"1": ["data/metadata/00001.json"], "4": ["data/metadata/00001.json"]}',
            r"id 00001 is listed twice \(also at manifest\['1'\]\[0\]\)",
        ),
        ("{}", "lists no images"),
    ],
)
def test_malformed_manifest_names_the_entry(document: str, message: str) -> None:
    with pytest.raises(ManifestError, match=message):
        parse_manifest(document, name="manifest")


def test_build_from_ids_uses_expected_quantity_and_lists_what_it_leaves_out(abid_dir) -> None:
    bucket = (abid_dir / "bucket").as_uri()
    sample = parse_manifest((abid_dir / "file_list.sample.json").read_text())
    in_manifest = list(sample)[:20]
    outside = []  # ids of the sample bucket whose count is not 1-5 (the manifest leaves them out)
    for path in sorted((abid_dir / "bucket" / "metadata").glob("0000*.json")):
        if path.stem not in sample:
            outside.append(path.stem)
    built = build_manifest(Storage(), bucket, [*in_manifest, *outside[:5], "99999999"])
    assert built.manifest == {image_id: sample[image_id] for image_id in in_manifest}
    assert set(built.left_out) == {*outside[:5], "99999999"}
    assert "no file" in built.left_out["99999999"]
    assert all("outside" in built.left_out[image_id] for image_id in outside[:5])
