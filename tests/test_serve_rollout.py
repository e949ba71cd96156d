"""Rollouts of a local endpoint under load from boto3 clients: canary, linear, shadow, replicas, autoscaling.

Which model answered is read from the answer itself: each test model gives each test image its own
probabilities (computed here in-process from the same model dir).
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import botocore.exceptions
import numpy as np
import pytest
import torch
from prefect.artifacts import Artifact
from test_serve_deploy import deploy_flow
from waiting import wait_until

from bincount.config import Settings
from bincount.contracts.router import ScalingEvent, VariantStatus
from bincount.contracts.serving import DeployError, RolloutStrategy, ScalingConfig, ServingError, ShadowReport
from bincount.demo_data import jpeg_bytes, render_bin_image
from bincount.endpoints import smoke_image
from bincount.local.host import HostOptions
from bincount.local.serving import LocalServingBackend, runtime_client
from bincount.models import write_untrained_model_dir
from sm_scripts import inference
from sm_scripts.model_dir import write_model_dir
from tasks.deploy import endpoint_artifact_key

IMAGE = smoke_image(64)
Prints = dict[str, dict[bytes, list[float]]]  # model name -> image -> its probabilities (where finite)
PHOTOS = [jpeg_bytes(render_bin_image(1 + i % 5, np.random.default_rng(100 + i), size=64)) for i in range(16)]


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """blue and green: tiny and fast; slow: the same network at 192 px, ~36 times the work; three: counts 1-3."""
    root = tmp_path_factory.mktemp("models")
    return {
        "blue": write_untrained_model_dir(root / "blue", "resnet18", 32, seed=1),
        "green": write_untrained_model_dir(root / "green", "resnet18", 32, seed=2),
        "slow": write_untrained_model_dir(root / "slow", "resnet18", 192, seed=3),
        "three": write_untrained_model_dir(root / "three", "resnet18", 32, seed=4, classes=(1, 2, 3)),
    }


def overflowing_model_dir(base: Path, model_dir: Path, smoke: bytes) -> tuple[Path, set[bytes]]:
    """``base`` with one huge finite weight in its head, and the photos of PHOTOS it fails on.

    The weight is float32's largest over ``t``, on one feature in class 1's row: that logit overflows to
    inf (and softmax gives NaN) exactly where the feature's activation passes ``t``. The feature and ``t``
    are picked from the activations of PHOTOS: 20-50% of them pass, the widest gap lies around ``t`` (no
    rounding moves a photo across it), and the smoke image stays below, so the model passes its deploy check.
    """
    model = inference.model_fn(str(base))
    features: list[torch.Tensor] = []
    hook = model.network.fc.register_forward_hook(lambda module, inputs, output: features.append(inputs[0]))
    for photo in (*PHOTOS, smoke):
        inference.predict_fn(inference.input_fn(photo, "image/jpeg"), model)
    hook.remove()
    activations = torch.cat(features).T.tolist()  # [feature][photo..., smoke], >= 0 after the ReLU
    gap, feature, threshold = 0.0, 0, 0.0
    for index, (*column, on_smoke) in enumerate(activations):
        ranked = sorted(column)
        for below, above in itertools.pairwise(ranked):
            share = sum(value > below for value in column) / len(column)
            if 0.2 <= share <= 0.5 and below >= 1.0 and on_smoke < below and above / below > gap:
                gap, feature, threshold = above / below, index, (below * above) ** 0.5
    assert gap > 1.5, f"no feature parts the photos clearly (widest gap x{gap:.2f})"
    state = torch.load(base / "model.pt", weights_only=True)
    state["fc.weight"][0, feature] = torch.finfo(torch.float32).max / threshold  # finite: threshold >= 1
    write_model_dir(model_dir, state, json.loads((base / "model_info.json").read_text()))
    return model_dir, {photo for photo, value in zip(PHOTOS, activations[feature], strict=False) if value > threshold}


@pytest.fixture(scope="module")
def overflowing(models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, set[bytes]]:
    """A fast model that answers most photos and fails (non-finite scores) on 20-50% of them."""
    root = tmp_path_factory.mktemp("overflowing")
    base = write_untrained_model_dir(root / "base", "resnet18", 32, seed=5)
    return overflowing_model_dir(base, root / "overflows", smoke_image(32))


@pytest.fixture(scope="module")
def fingerprints(models: dict[str, Path], overflowing: tuple[Path, set[bytes]]) -> Prints:
    """Each model's probabilities for each test image it answers (the slow one only ever gets IMAGE)."""
    prints: Prints = {}
    for name, model_dir, images in (
        ("blue", models["blue"], (IMAGE, *PHOTOS)),
        ("green", models["green"], (IMAGE, *PHOTOS)),
        ("slow", models["slow"], (IMAGE,)),
        ("overflows", overflowing[0], PHOTOS),
    ):
        model = inference.model_fn(str(model_dir))
        predictions = (inference.predict_fn(inference.input_fn(image, "image/jpeg"), model)[0] for image in images)
        answers = {
            image: list(prediction["probabilities"].values())
            for image, prediction in zip(images, predictions, strict=True)
        }
        prints[name] = {image: answer for image, answer in answers.items() if np.isfinite(answer).all()}
    return prints


@pytest.fixture(scope="module")
def backend(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalServingBackend]:
    settings = Settings.load(artifact_root=str(tmp_path_factory.mktemp("artifacts")))
    serving = LocalServingBackend(settings, host_options=HostOptions(max_batch_size=8, max_wait_ms=5, threads=1))
    yield serving
    for record_file in (Path(settings.artifact_root.removeprefix("file://")) / "endpoints").glob("*.json"):
        serving.delete(record_file.stem)


class Load:
    """Client threads invoking the endpoint with boto3 (no retries) until stopped, each going round ``images``;
    every answer is kept."""

    def __init__(
        self,
        url: str,
        name: str,
        fingerprints: Prints,
        clients: int = 4,
        images: Sequence[bytes] = (IMAGE,),
    ) -> None:
        self.url, self.name, self.fingerprints, self.images = url, name, fingerprints, images
        self.answers: list[tuple[float, str]] = []  # (when, model name)
        self.errors: list[tuple[float, str]] = []
        self.failed_images: list[bytes] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run) for _ in range(clients)]

    def __enter__(self) -> Load:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join()

    def _run(self) -> None:
        client = runtime_client(self.url, max_attempts=1)
        for image in itertools.cycle(self.images):
            if self._stop.is_set():
                return
            try:
                answer = client.invoke_endpoint(EndpointName=self.name, Body=image, ContentType="image/jpeg")
            except botocore.exceptions.ClientError as error:
                self.errors.append((time.monotonic(), str(error)))
                self.failed_images.append(image)
                continue
            probabilities = list(json.loads(answer["Body"].read())["predictions"][0]["probabilities"].values())
            self.answers.append((time.monotonic(), self.which(probabilities, image)))

    def which(self, probabilities: list[float], image: bytes = IMAGE) -> str:
        for name, prints in self.fingerprints.items():
            expected = prints.get(image)
            if expected and max(abs(a - b) for a, b in zip(probabilities, expected, strict=True)) < 2e-3:
                return name
        return "unknown"

    def wait_for(self, count: int, after: float = 0.0, timeout_s: float = 60.0) -> None:
        """Return once ``count`` answers came after ``after`` (a ``time.monotonic()``)."""
        wait_until(
            lambda: sum(at > after for at, _ in self.answers) >= count,
            timeout_s=timeout_s,
            interval_s=0.05,
            what=f"{count} answers",
        )

    def served(self, after: float = 0.0) -> set[str]:
        return {name for at, name in self.answers if at > after}


@pytest.fixture(scope="module")
def endpoint(backend: LocalServingBackend, models: dict[str, Path]) -> str:
    """One endpoint the rollout tests move between models (each starts from whatever the one before left)."""
    backend.deploy("rollout", models["blue"].as_uri(), "bincount:1")
    return "rollout"


def serving(backend: LocalServingBackend, name: str, models: dict[str, Path]) -> tuple[str, str]:
    """The test model the endpoint serves now, and the other fast one."""
    current = next(key for key in ("blue", "green") if backend.describe(name).model_uri == models[key].as_uri())
    return current, "green" if current == "blue" else "blue"


def test_a_slow_canary_rolls_back_by_itself_and_the_current_model_fails_no_request(
    backend: LocalServingBackend, endpoint: str, models: dict[str, Path], fingerprints: Prints
) -> None:
    start = backend.describe(endpoint)
    current, _ = serving(backend, endpoint, models)
    # latency is judged past the minimum sample; a coarse error sensitivity (+50%) keeps that at min_requests
    strategy = RolloutStrategy(
        kind="canary", traffic_percent=30, bake_seconds=20, min_requests=8, max_error_rate_increase=0.5
    )
    with Load(start.url, endpoint, fingerprints) as load:
        load.wait_for(3)
        record = backend.deploy(endpoint, models["slow"].as_uri(), "bincount:9", strategy=strategy)
        ended = time.monotonic()
        load.wait_for(5, after=ended)
    rollout = record.rollout
    assert rollout is not None and rollout.verdict == "rolled-back" and "p99 latency" in rollout.reason, rollout
    assert [step.action for step in rollout.steps] == ["bake", "rolled-back"]
    bake = rollout.steps[0]
    assert bake.current and bake.candidate and bake.test, bake
    assert bake.current.errors == 0 and (bake.test.needed_new, bake.test.needed_current) == (8, 18)
    assert bake.candidate.requests >= 8 and bake.current.requests >= 18, "judged past the minimum"
    assert load.errors == []
    assert load.served() == {current, "slow"}  # the canary did take its share
    assert load.served(after=ended) == {current}
    assert record.version == start.version and backend.describe(endpoint).model_ref == start.model_ref
    status = backend._router_status(record.url, endpoint)
    assert status is not None and status.candidate is None and list(status.variants) == [status.current]


def test_a_canary_whose_host_fails_its_requests_rolls_back_on_its_error_rate(
    backend: LocalServingBackend, endpoint: str, models: dict[str, Path], fingerprints: Prints
) -> None:
    """The new model's host keeps dying with requests in flight (they fail: 502) whenever it is back up and busy,
    until Fisher's test finds its error rate higher; the current model's share loses none."""
    start = backend.describe(endpoint)
    current, _ = serving(backend, endpoint, models)
    strategy = RolloutStrategy(
        kind="canary", traffic_percent=50, bake_seconds=30, min_requests=5, max_latency_ratio=1000.0
    )
    killed: list[int] = []
    deployed = threading.Event()

    def kill_the_canary_whenever_busy() -> None:
        while not deployed.wait(0.05):
            status = backend._router_status(start.url, endpoint)
            candidate = status.candidate_variant if status is not None else None
            if candidate is None or status is None or status.percent == 0:
                continue
            busy = [replica for replica in candidate.replicas if replica.ready and replica.inflight]
            if busy and busy[0].pid not in killed:
                os.kill(busy[0].pid, signal.SIGKILL)
                killed.append(busy[0].pid)

    killer = threading.Thread(target=kill_the_canary_whenever_busy)
    with Load(start.url, endpoint, fingerprints, clients=6) as load:
        killer.start()
        try:
            record = backend.deploy(endpoint, models["slow"].as_uri(), "bincount:9", strategy=strategy)
        finally:
            deployed.set()
        ended = time.monotonic()
        killer.join()
        load.wait_for(5, after=ended)
    rollout = record.rollout
    assert rollout is not None and killed and rollout.verdict == "rolled-back" and "error rate" in rollout.reason
    assert "Fisher's exact test, one-sided p=" in rollout.reason, rollout
    bake = rollout.steps[0]
    assert bake.current and bake.candidate and bake.test, bake
    assert bake.current.errors == 0 and bake.candidate.errors >= 1, bake
    assert bake.test.p_value < 0.05 and bake.candidate.requests < bake.test.needed_new
    assert load.errors and all("did not answer" in error for _, error in load.errors), load.errors
    # every failed request was the canary's (a kill between the verdict and the drop may add one the step missed)
    assert len(load.errors) >= bake.candidate.errors
    assert all(at < ended for at, _ in load.errors)
    assert load.served(after=ended) == {current}
    assert backend.describe(endpoint).version == start.version


def test_a_canary_that_fails_on_a_share_of_photos_rolls_back_by_itself_through_the_deploy_flow(
    prefect_server: None,
    backend: LocalServingBackend,
    endpoint: str,
    models: dict[str, Path],
    overflowing: tuple[Path, set[bytes]],
    fingerprints: Prints,
) -> None:
    """The new model's scores overflow on some photos: those requests fail with a 500 that blames the model, the
    canary rolls back on its error rate, deploy_endpoint_task says why, and the current model's share loses none."""
    model_dir, fails_on = overflowing
    start = backend.describe(endpoint)
    current, _ = serving(backend, endpoint, models)
    strategy = RolloutStrategy(
        kind="canary", traffic_percent=30, bake_seconds=30, min_requests=10, max_latency_ratio=1000.0
    )
    artifact_root = backend.settings.artifact_root
    with Load(start.url, endpoint, fingerprints, images=PHOTOS) as load:
        load.wait_for(3)
        rolled_back = rf"the canary of {endpoint}:\d+ on endpoint '{endpoint}' was rolled back by itself: error rate"
        with pytest.raises(DeployError, match=rolled_back):
            deploy_flow(artifact_root, endpoint, model_dir.as_uri(), strategy=strategy)
        ended = time.monotonic()
        load.wait_for(5, after=ended)
    record = backend.describe(endpoint)
    rollout = record.rollout
    assert rollout is not None and rollout.verdict == "rolled-back" and "error rate" in rollout.reason, rollout
    bake = rollout.steps[0]
    assert bake.current and bake.candidate, bake
    assert bake.current.errors == 0 and bake.candidate.errors >= 1, bake
    # every failed request was the canary's: only its scores overflow, and only on the photos it fails on
    says = "the model failed on this request: NonFiniteScoresError: the model produced non-finite scores"
    assert load.errors and all(says in error and "not the request" in error for _, error in load.errors)
    assert set(load.failed_images) <= fails_on and all(at < ended for at, _ in load.errors)
    assert len(load.errors) >= bake.candidate.errors
    assert load.served() == {current, "overflows"}  # the canary answered the photos it can
    assert load.served(after=ended) == {current}
    assert record.version == start.version and record.model_uri == start.model_uri
    artifact = Artifact.get(endpoint_artifact_key(endpoint))
    assert artifact is not None and "rolled back" in artifact.data and "error rate" in artifact.data, artifact


def test_a_good_linear_rollout_moves_all_traffic_without_a_failed_request(
    backend: LocalServingBackend, endpoint: str, models: dict[str, Path], fingerprints: Prints
) -> None:
    start = backend.describe(endpoint)
    current, other = serving(backend, endpoint, models)
    strategy = RolloutStrategy(
        kind="linear",
        traffic_percent=50,
        bake_seconds=1.0,
        min_requests=5,
        max_latency_ratio=20.0,
        max_error_rate_increase=0.3,  # coarse, so the minimum sample (23 a side) arrives within the bake
    )
    with Load(start.url, endpoint, fingerprints) as load:
        load.wait_for(3)
        record = backend.deploy(endpoint, models[other].as_uri(), f"bincount:{other}", strategy=strategy)
        ended = time.monotonic()
        load.wait_for(5, after=ended)
    rollout = record.rollout
    assert rollout is not None and rollout.verdict == "completed", rollout
    assert [(step.action, step.percent) for step in rollout.steps] == [("bake", 50), ("promoted", 100)]
    bake = rollout.steps[0]
    assert bake.test and bake.candidate, bake
    assert (bake.test.needed_new, bake.test.needed_current) == (23, 23) and bake.candidate.requests >= 23
    assert "not higher (Fisher's exact test, one-sided p=" in (bake.reason or ""), rollout
    assert load.errors == []
    assert load.served(after=ended) == {other} and current in load.served()
    assert record.model_ref == f"bincount:{other}" and record.previous_model_ref == start.model_ref
    assert [variant.weight for variant in record.variants] == [100]


def test_a_shadow_answers_nobody_and_its_agreement_is_reported_then_it_is_promoted(
    backend: LocalServingBackend, endpoint: str, models: dict[str, Path], fingerprints: Prints
) -> None:
    start = backend.describe(endpoint)
    current, other = serving(backend, endpoint, models)
    with pytest.raises(DeployError, match=r"counts \[1, 2, 3\].*could not be compared"):
        backend.deploy(endpoint, models["three"].as_uri(), strategy=RolloutStrategy(kind="shadow"))
    strategy = RolloutStrategy(
        kind="shadow",
        traffic_percent=100,
        bake_seconds=1,
        min_requests=10,
        max_latency_ratio=100,
        max_error_rate_increase=0.5,  # coarse: the minimum sample is 12 a side, the load sends 20
    )
    record = backend.deploy(endpoint, models[other].as_uri(), f"bincount:{other}", strategy=strategy)
    assert record.model_ref == start.model_ref and record.rollout and record.rollout.verdict == "shadowing"
    assert record.shadow is not None and record.shadow.model_ref == f"bincount:{other}"
    weights = [(variant.weight, variant.shadow_percent) for variant in record.variants]
    assert weights == [(100, None), (0, 100)]
    with pytest.raises(DeployError, match="has a shadow running"):
        backend.deploy(endpoint, models["slow"].as_uri())
    with Load(start.url, endpoint, fingerprints) as load:
        load.wait_for(2 * strategy.min_requests)
    assert load.errors == [] and load.served() == {current}  # users only ever got the current model's answers

    def every_copy_compared() -> ShadowReport | None:  # the last copies finish in the background
        report = backend.shadow_report(endpoint)
        return report if report.compared >= len(load.answers) else None

    report = wait_until(every_copy_compared, interval_s=0.05, what="every copy to reach the shadow")
    assert report.compared == len(load.answers) and report.shadow.requests == len(load.answers)
    # the same image every time: the two untrained models either always agree or never
    ours, theirs = (max(range(5), key=fingerprints[name][IMAGE].__getitem__) for name in (current, other))
    assert report.agreement == (1.0 if ours == theirs else 0.0)
    assert report.promote is True and report.test and (report.test.needed_new, report.test.needed_current) == (12, 12)

    promoted = backend.promote_shadow(endpoint)
    assert promoted.model_ref == f"bincount:{other}" and promoted.previous_model_ref == start.model_ref
    assert promoted.rollout and promoted.rollout.verdict == "promoted" and promoted.shadow is None
    assert promoted.rollout.report is not None and promoted.rollout.report.promote
    for _ in range(3):
        answer = json.loads(backend.invoke(endpoint, IMAGE, "image/jpeg"))
        assert load.which(list(answer["predictions"][0]["probabilities"].values())) == other
    with pytest.raises(ServingError, match="no shadow running"):
        backend.stop_shadow(endpoint)


def test_a_stopped_shadow_leaves_the_current_model_alone(
    backend: LocalServingBackend, endpoint: str, models: dict[str, Path]
) -> None:
    start = backend.describe(endpoint)
    _, other = serving(backend, endpoint, models)
    backend.deploy(endpoint, models[other].as_uri(), strategy=RolloutStrategy(kind="shadow", traffic_percent=50))
    record = backend.stop_shadow(endpoint)
    assert record.model_ref == start.model_ref and record.rollout and record.rollout.verdict == "stopped"
    status = backend._router_status(start.url, endpoint)
    assert status is not None and status.candidate is None and len(status.variants) == 1


def test_a_killed_replica_fails_only_its_requests_in_flight_and_is_restarted(
    backend: LocalServingBackend, models: dict[str, Path], fingerprints: Prints
) -> None:
    record = backend.deploy("replicas", models["blue"].as_uri(), scaling=ScalingConfig(min_replicas=2, max_replicas=2))
    assert record.replicas == 2
    status = backend._router_status(record.url, "replicas")
    assert status is not None and status.current_variant is not None
    victim = status.current_variant.replicas[0].pid
    with Load(record.url, "replicas", fingerprints, clients=6) as load:
        load.wait_for(6)
        os.kill(victim, signal.SIGKILL)
        killed = time.monotonic()

        def restarted() -> VariantStatus | None:
            status = backend._router_status(record.url, "replicas")
            variant = status.current_variant if status is not None else None
            return variant if variant is not None and variant.restarts == 1 and variant.ready == 2 else None

        variant = wait_until(restarted, timeout_s=60, interval_s=0.2, what="the killed replica to be restarted")
        recovered = time.monotonic()
        load.wait_for(11, after=recovered)
    assert all("did not answer" in error for _, error in load.errors), load.errors
    assert len(load.errors) <= 6, load.errors  # at most the requests that were in flight on the victim
    assert all(killed - 0.5 <= at <= killed + 1.0 for at, _ in load.errors), (killed, load.errors)
    assert sum(at > recovered for at, _ in load.answers) > 10
    assert victim not in [replica.pid for replica in variant.replicas]


def test_past_its_replicas_capacity_a_request_waits_in_the_router_and_every_one_is_answered(
    models: dict[str, Path], fingerprints: Prints, tmp_path: Path
) -> None:
    """Batches of one: the router keeps at most two requests on each replica (HostOptions.max_in_flight), and the
    rest of ten clients' requests wait in its one line for whichever replica frees first."""
    options = HostOptions(max_batch_size=1, max_wait_ms=0, threads=1)
    assert options.max_in_flight == 2
    backend = LocalServingBackend(Settings.load(artifact_root=str(tmp_path)), host_options=options)
    record = backend.deploy("line", models["slow"].as_uri(), scaling=ScalingConfig(min_replicas=2, max_replicas=2))
    try:
        most_in_flight, most_waiting = 0, 0
        with Load(record.url, "line", fingerprints, clients=10) as load:
            load.wait_for(10)
            until = time.monotonic() + 3  # once all ten clients are going, six of their requests wait at any time
            while time.monotonic() < until:
                status = backend._router_status(record.url, "line")
                variant = status.current_variant if status is not None else None
                assert variant is not None, status
                most_in_flight = max(most_in_flight, *(replica.inflight for replica in variant.replicas))
                most_waiting = max(most_waiting, variant.waiting)
                time.sleep(0.05)
        assert load.errors == [] and load.served() == {"slow"}
        assert most_in_flight == 2 and most_waiting >= 3, (most_in_flight, most_waiting)
    finally:
        backend.delete("line")


def test_autoscaling_adds_a_replica_under_load_and_removes_it_when_idle(
    backend: LocalServingBackend, models: dict[str, Path], fingerprints: Prints
) -> None:
    scaling = ScalingConfig(
        min_replicas=1, max_replicas=2, target_in_flight=1.0, scale_out_cooldown_s=0.5, scale_in_cooldown_s=1.0
    )
    record = backend.deploy("scaled", models["blue"].as_uri(), scaling=scaling)

    def replicas() -> tuple[int, tuple[ScalingEvent, ...]]:
        status = backend._router_status(record.url, "scaled")
        assert status is not None and status.current_variant is not None, status
        return len(status.current_variant.replicas), status.scaling_events

    with Load(record.url, "scaled", fingerprints, clients=8) as load:
        wait_until(lambda: replicas()[0] == 2, interval_s=0.2, what="a scale-out under sustained load")
    assert load.errors == []
    wait_until(lambda: replicas()[0] == 1, interval_s=0.2, what="a scale-in when idle")
    events = replicas()[1]
    assert [(event.scaled, event.replicas) for event in events] == [("out", 2), ("in", 1)]


def test_bad_strategies_and_scaling_are_refused_before_anything_changes() -> None:
    for bad, says in (
        ({"kind": "canary", "traffic_percent": 0}, "traffic_percent 0 must be between 1 and 99"),
        ({"kind": "linear", "traffic_percent": 100}, "traffic_percent 100 must be between 1 and 99"),
        ({"kind": "canary", "bake_seconds": 0}, "a bake of zero checks nothing"),
        ({"kind": "blue-green"}, "is not one of all-at-once, canary, linear, shadow"),
    ):
        with pytest.raises(ValueError, match=says):
            RolloutStrategy(**bad)
    with pytest.raises(ValueError, match="min_replicas 3 is above max_replicas 2"):
        ScalingConfig(min_replicas=3, max_replicas=2)
