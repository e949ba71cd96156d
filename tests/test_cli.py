"""The `bincount` command as a person runs it: `--help` and the listings load only what they need (never torch,
the SageMaker SDK or Prefect), and `make-demo-data --add` grows a demo bucket without touching its photos."""

from __future__ import annotations

import hashlib
import io
import json
import os
import socket
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
from PIL import Image
from test_registry import GROUP, spec

from bincount.config import Settings
from bincount.contracts.serving import EndpointRecord, Rollout, RolloutStep, RolloutStrategy
from bincount.demo_data import generate_demo_bucket
from bincount.endpoints import EndpointRecords
from bincount.manifest import parse_manifest
from bincount.registry import StorageModelRegistry
from bincount.storage import Storage

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "torchvision", "sagemaker", "prefect", "smdebug", "openvino", "nncf", "optuna")

PROBE = """
import json, sys
from flows.cli import main
try:
    main(sys.argv[1:])
    code = 0
except SystemExit as exit_:
    code = exit_.code
loaded = sorted(name for name in {heavy!r} if name in sys.modules)
print(json.dumps({{"code": code, "loaded": loaded}}))
"""


def closed_port() -> int:
    """A loopback port nothing listens on (an endpoint that does not answer)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def bincount(argv: list[str], env: dict[str, str] | None = None) -> tuple[dict, str]:
    """Run ``bincount <argv>`` in a fresh interpreter; return its exit code and the heavy modules it imported
    (``{"code": ..., "loaded": [...]}``), and what it printed before that."""
    done = subprocess.run(
        [sys.executable, "-c", PROBE.format(heavy=HEAVY), *argv],
        env={**os.environ, **(env or {})},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    *printed, last = done.stdout.splitlines()
    return json.loads(last), "\n".join(printed) + done.stderr


@pytest.mark.parametrize("argv", [["--help"], ["models", "--help"], ["endpoints", "describe", "--help"]])
def test_help_imports_no_pipeline(argv: list[str]) -> None:
    probe, printed = bincount(argv)
    assert probe == {"code": 0, "loaded": []}, printed
    assert "usage: bincount" in printed


@pytest.fixture
def artifact_root(tmp_path: Path) -> str:
    """An artifact root holding one registered version, served by a recorded endpoint that does not answer."""
    root = tmp_path.as_uri()
    settings = Settings.load(artifact_root=root)
    registry = StorageModelRegistry.from_settings(settings)
    registry.register(GROUP, spec(1))
    EndpointRecords(settings, registry.storage).write(
        EndpointRecord(
            name="bincount", url=f"http://127.0.0.1:{closed_port()}", model_uri=spec(1).model_uri,
            version="0123456789ab", arch="resnet18", image_size=64, classes=[1, 2, 3, 4, 5], backend="local",
            deployed_at="2026-11-30T19:00:00+00:00",
        )
    )  # fmt: skip
    return root


@pytest.mark.parametrize(
    "argv",
    [
        ["models", "list"],
        ["models", "show", "bincount:1"],
        ["endpoints", "list"],
        ["endpoints", "describe", "bincount"],
    ],
)
def test_listings_import_neither_torch_nor_sagemaker_nor_prefect(argv: list[str], artifact_root: str) -> None:
    probe, printed = bincount(argv, {"BINCOUNT_ARTIFACT_ROOT": artifact_root})
    assert probe == {"code": 0, "loaded": []}, printed
    assert "bincount" in printed and ("bincount:1" in printed or "not answering" in printed), printed


def objects(folder: Path) -> dict[str, str]:
    return {
        path.relative_to(folder).as_posix(): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in folder.rglob("*")
        if path.is_file() and path.name != "file_list.json"
    }


def test_make_demo_data_add_grows_the_bucket_and_its_manifest(tmp_path: Path) -> None:
    bucket = tmp_path / "demo-bucket"
    generate_demo_bucket(Storage(), bucket.as_uri(), images=40, seed=0, size=48)
    before, listed = objects(bucket), parse_manifest((bucket / "file_list.json").read_text())

    probe, printed = bincount(["make-demo-data", str(bucket), "--add", "15"])
    assert probe["code"] == 0, printed
    grown = parse_manifest((bucket / "file_list.json").read_text())
    new_ids = [f"{number:05d}" for number in range(41, 56)]
    assert sorted(set(grown) - set(listed)) == new_ids and len(grown) == len(listed) + 15
    assert all(grown[image_id] == count for image_id, count in listed.items()), "the old labels stay"
    after = objects(bucket)
    assert {key: after[key] for key in before} == before, "every old photo and metadata object is untouched"
    assert set(after) - set(before) == {f"{folder}/{i}.{ext}" for i in new_ids for folder, ext in
                                        (("bin-images", "jpg"), ("metadata", "json"))}  # fmt: skip
    assert Image.open(io.BytesIO((bucket / "bin-images" / "00041.jpg").read_bytes())).size == (48, 48)
    metadata = json.loads((bucket / "metadata" / "00050.json").read_text())
    assert metadata["EXPECTED_QUANTITY"] == grown["00050"], "each new photo's metadata gives its label"
    assert f"Added 15 photos (00041 to 00055); the manifest lists {len(listed) + 15}" in printed

    bincount(["make-demo-data", str(bucket), "--add", "5"])
    again = parse_manifest((bucket / "file_list.json").read_text())
    assert sorted(set(again) - set(grown)) == ["00056", "00057", "00058", "00059", "00060"]


def test_make_demo_data_add_without_a_bucket_says_how_to_make_one(tmp_path: Path) -> None:
    probe, printed = bincount(["make-demo-data", str(tmp_path / "nothing"), "--add", "3"])
    assert probe["code"] == 2
    assert "no demo bucket at" in printed and "make one first with `bincount make-demo-data" in printed, printed
    assert not (tmp_path / "nothing").exists(), "nothing is written"


def recorded_rollout(root: str, strategy: dict) -> None:
    """The endpoint ``bincount`` under ``root`` as its last rollout left it, with ``strategy``."""
    settings = Settings.load(artifact_root=root)
    records = EndpointRecords(settings, StorageModelRegistry.from_settings(settings).storage)
    record = records.read("bincount")
    assert record is not None
    steps = tuple(RolloutStep("2026-01-01T00:00:00+00:00", action, 100) for action in ("started", "promoted"))
    rollout = Rollout(RolloutStrategy(**strategy), "completed", "all traffic moved", steps)
    records.write(replace(record, rollout=rollout))


ALL_AT_ONCE = {
    "kind": "all-at-once", "traffic_percent": 10, "bake_seconds": 60.0, "min_requests": 20,
    "max_error_rate_increase": 0.01, "max_latency_ratio": 1.5,
}  # fmt: skip


def test_describe_shows_no_canary_settings_for_an_all_at_once_endpoint(artifact_root: str) -> None:
    recorded_rollout(artifact_root, ALL_AT_ONCE)
    probe, printed = bincount(["endpoints", "describe", "bincount"], {"BINCOUNT_ARTIFACT_ROOT": artifact_root})
    assert probe == {"code": 0, "loaded": []}, printed
    assert "rollout          all-at-once (blue/green" in printed, printed
    assert "last rollout     completed: all traffic moved (2 steps)" in printed
    for canary_word in ("traffic_percent", "bake", "10%", "60 s"):
        assert canary_word not in printed, canary_word


def test_describe_shows_a_canarys_settings(artifact_root: str) -> None:
    recorded_rollout(artifact_root, {**ALL_AT_ONCE, "kind": "canary"})
    _, printed = bincount(["endpoints", "describe", "bincount"], {"BINCOUNT_ARTIFACT_ROOT": artifact_root})
    assert "rollout          canary: 10% of requests for 60 s, rolled back when its error rate rises by over 0.01" in (
        printed
    ), printed
