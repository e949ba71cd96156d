"""Settings: URIs, environment, and errors that say what to fix."""

from __future__ import annotations

from pathlib import Path

import pytest

from bincount.config import Settings, SettingsError


def test_paths_become_file_uris_and_overrides_beat_environment(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setenv("BINCOUNT_ARTIFACT_ROOT", "s3://from-env/prefix/")
    assert Settings.load().artifact_root == "s3://from-env/prefix"
    settings = Settings.load(artifact_root=str(tmp_path), source_uri=None)
    assert settings.artifact_root == tmp_path.as_uri()
    assert settings.source_uri == "s3://aft-vbi-pds"
    assert settings.artifact_uri("datasets", "abid") == f"{tmp_path.as_uri()}/datasets/abid"


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"profile": "gcp"}, "profile"),
        ({"artifact_root": "gs://bucket"}, "only file:// and s3://"),
        ({"source_uri": "s3://"}, "names no bucket"),
        ({"s3_endpoint_url": "localhost:9000"}, "must look like http://host:port"),
    ],
)
def test_bad_settings_say_what_to_fix(override: dict, message: str) -> None:
    with pytest.raises(SettingsError, match=message):
        Settings.load(**override)
