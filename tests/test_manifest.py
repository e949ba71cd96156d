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
        ('{"1": ["data/metadata/...json"]}', r"manifest\['1'\]\[0\] = '\.\.' is not an image id"),
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


def test_an_id_file_with_a_path_in_it_is_refused_naming_the_id(abid_dir, tmp_path) -> None:
    """The measured escape: ``../../evil`` beside good ids fetched an object outside bin-images/."""
    sample = list(parse_manifest((abid_dir / "file_list.sample.json").read_text()))[:3]
    ids_file = tmp_path / "ids.txt"
    ids_file.write_text("\n".join([*sample, "../../evil", "a/b"]))
    with pytest.raises(
        ManifestError,
        match=r"2 of 5 ids are not image ids \(image_ids\[3\] = '\.\./\.\./evil'; image_ids\[4\] = 'a/b'\)",
    ):
        build_manifest(Storage(), (abid_dir / "bucket").as_uri(), ids_file.read_text().split())


def test_metadata_over_the_cap_is_left_out_and_listed_never_held(abid_dir, tmp_path) -> None:
    """A huge object under a metadata key (standing for a 5 GB one) costs its id, not the run's memory."""
    good = list(parse_manifest((abid_dir / "file_list.sample.json").read_text()))[:2]
    bucket = tmp_path / "bucket" / "metadata"
    bucket.mkdir(parents=True)
    for image_id in good:
        (bucket / f"{image_id}.json").write_bytes((abid_dir / "bucket" / "metadata" / f"{image_id}.json").read_bytes())
    (bucket / "huge.json").write_bytes(b'{"EXPECTED_QUANTITY": 1, "pad": "' + b"x" * 4096 + b'"}')
    built = build_manifest(Storage(), bucket.parent.as_uri(), [*good, "huge"], max_metadata_bytes=2048)
    assert sorted(built.manifest) == sorted(good)
    assert "metadata/huge.json is 4131 bytes, over the cap of 2048 bytes" in built.left_out["huge"]
