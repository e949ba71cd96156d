"""The registry invariants (docs/CONTRACTS.md, "Registry invariants") against real parts: the registry on
file://, real local endpoints (router and model hosts), the promotion step in Prefect flows on a real server.

Faults are injected between the steps of a promotion (re-read, deploy, set the stage, record) and after
each the registry and the endpoint must agree on what serves.
"""

from __future__ import annotations

import contextlib
import shutil
import uuid
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
from prefect import flow, get_client

from bincount.config import Location, Settings
from bincount.contracts.registry import (
    DatasetRef,
    Decision,
    HeldVersionError,
    ImagePredictions,
    ModelMetrics,
    ModelVersion,
    ModelVersionSpec,
    ProductionVersionError,
    RegistryError,
)
from bincount.contracts.serving import EndpointNotFoundError
from bincount.evaluation import Evaluation, evaluate_model, score_counts
from bincount.factory import get_model_registry, get_serving_backend
from bincount.models import pack_folder, write_untrained_model_dir
from bincount.registry import StorageModelRegistry
from bincount.storage import Storage, TransientStorageError, file_digest
from flows.cli import main as cli
from flows.promotion import (
    Candidate,
    Challenger,
    PromotionPolicy,
    endpoint_lock_name,
    promote_challenger,
    promote_trained,
    put_in_production,
)
from flows.rollback import rollback_model
from flows.train import TrainedModel

SPLIT_SHA = "ab" * 32


def spec(model_uri: str, seed: int, sha256: str | None = None, split_sha256: str = SPLIT_SHA) -> ModelVersionSpec:
    """A version's record; ``seed`` makes its recipe (train.py flags) its own."""
    return ModelVersionSpec(
        model_uri=model_uri,
        model_sha256=sha256 or f"{seed:064x}",
        metrics=ModelMetrics(accuracy=0.2, rmse=1.5, within_one_accuracy=0.5, per_class_accuracy={"1": 0.2}),
        dataset=DatasetRef("file:///datasets/abid/split.csv", split_sha256, {"train": 40, "valid": 40, "test": 40}),
        code_hash="cd" * 32,
        hyperparameters={"arch": "resnet18", "image-size": 32, "seed": seed},
        training_job=f"bincount-final-{seed:04d}",
    )


def evaluation(accuracy: float) -> Evaluation:
    """Scores without answers per image: enough where no comparison is made."""
    classes = [1, 2, 3, 4, 5]
    return Evaluation(
        images=40,
        accuracy=accuracy,
        rmse=0.5,
        within_one_accuracy=0.9,
        per_class_accuracy={str(c): accuracy for c in classes},
        classes=classes,
        confusion=[[8 if i == j else 0 for j in range(5)] for i in range(5)],
    )


def answered(test_channel: Path, predicted: dict[str, int] | None = None) -> Evaluation:
    """A challenger's evaluation on the demo test channel (``<count>/<file>``): its answer on each image is
    ``predicted``'s, the true count where ``predicted`` is None (right on every image)."""
    truth = {p.relative_to(test_channel).as_posix(): int(p.parent.name) for p in sorted(test_channel.glob("*/*.jpg"))}
    files = tuple(truth)
    answers = tuple((predicted or truth)[file] for file in files)
    scored = score_counts([truth[file] for file in files], list(answers), [1, 2, 3, 4, 5])
    return replace(scored, predictions=ImagePredictions(files, tuple(truth[file] for file in files), answers))


# --- (b), (e): the registry alone ------------------------------------------------------------------
def test_a_production_version_leaves_production_only_when_another_takes_its_place(tmp_path: Path) -> None:
    registry = StorageModelRegistry(Storage(), tmp_path.as_uri())
    for n in (1, 2):
        registry.register("g", spec(f"file:///m/{n}/model.tar.gz", n))
        registry.approve("g", n, "alice", "ok")
    registry.transition("g", 1, "production", "pipeline", "first")
    with pytest.raises(ProductionVersionError, match=r"g:1 is in production: it leaves production only when another"):
        registry.transition("g", 1, "archived", "nightly", "not promoted")
    with pytest.raises(ProductionVersionError, match=r"g:1 is in production and cannot be rejected.*roll it back"):
        registry.reject("g", 1, "bob", "miscounts")
    assert (registry.get("g", 1).stage, registry.get("g", 1).approval) == ("production", "Approved"), "unchanged"
    registry.transition("g", 2, "production", "nightly", "better")
    assert [v.stage for v in registry.list("g")] == ["archived", "production"], "replaced in the same event"
    assert len(registry.get("g", 1).history) == 2, "no archive event of its own: the promotion of g:2 archived it"


def test_a_rollback_holds_the_version_its_digest_and_its_recipe_on_its_data(tmp_path: Path) -> None:
    registry = StorageModelRegistry(Storage(), tmp_path.as_uri())
    for n in (1, 2):
        registry.register("g", spec(f"file:///m/{n}/model.tar.gz", n))
        registry.approve("g", n, "alice", "ok")
        registry.transition("g", n, "production", "pipeline", f"v{n}")
    registry.rollback("g", "bob", "v2 miscounts 5s")
    held = registry.get("g", 2)
    assert held.hold is not None and (held.hold.actor, held.hold.reason) == ("bob", "v2 miscounts 5s")
    same_model = registry.register("g", spec("file:///m/copy/model.tar.gz", 3, sha256=held.spec.model_sha256))
    same_recipe = registry.register("g", spec("file:///m/4/model.tar.gz", 2, sha256="4" * 64))
    new_data = registry.register("g", spec("file:///m/5/model.tar.gz", 2, sha256="5" * 64, split_sha256="ef" * 32))
    for version in (same_model, same_recipe, new_data):
        registry.approve("g", version.version, "alice", "ok")
    assert [registry.held_by("g", v.spec) for v in (same_model, same_recipe, new_data)] == [held, held, None]
    for version in (2, same_model.version, same_recipe.version):
        with pytest.raises(HeldVersionError, match=r"held since a rollback by bob \(v2 miscounts 5s.*release-hold g:2"):
            registry.transition("g", version, "production", "nightly", "beats v1")
    registry.transition("g", new_data.version, "production", "nightly", "new photos")  # not like v2: may go
    with pytest.raises(RegistryError, match=r"g:1 is not held \(held in 'g': g:2\)"):
        registry.release_hold("g", 1, "carol", "?")
    released = registry.release_hold("g", 2, "carol", "the 5s were mislabelled")
    assert released.hold is None and released.history[-1].kind == "release"
    registry.transition("g", same_recipe.version, "production", "nightly", "a person lifted the hold")


# --- the promotion step against a real endpoint ----------------------------------------------------
@flow(name="promote-for-test")
def promote(artifact_root: str, candidate: str, challenger: Evaluation, test_channel_uri: str) -> Decision:
    """A registered challenger, scored ``challenger`` on the test channel, through the nightly's promotion step."""
    settings = Settings.load(artifact_root=artifact_root)
    version = get_model_registry(settings).resolve(candidate)
    return promote_challenger(settings, Candidate(version, challenger, test_channel_uri), PromotionPolicy("nightly"))


@flow(name="put-in-production-for-test")
def release(artifact_root: str, version: str) -> str:
    """The pipeline's last step: an approved version to production."""
    settings = Settings.load(artifact_root=artifact_root)
    registered = get_model_registry(settings).resolve(version)
    return put_in_production(settings, registered.group, registered, "a test").deployed_at


@flow(name="judge-for-test")
def judge(artifact_root: str, champion: str, model_uri: str, test_channel_uri: str) -> Decision:
    """The promotion step after training, for a challenger whose model is ``model_uri``."""
    settings = Settings.load(artifact_root=artifact_root)
    production = get_model_registry(settings).resolve(champion)
    trained = TrainedModel(
        job_name="bincount-final-cached",
        model_uri=model_uri,
        hyperparameters=production.spec.hyperparameters,
        tuning=None,
        evaluation=evaluation(production.spec.metrics.accuracy),
        debugger_rules=[],
        profile=None,
    )
    challenger = Challenger(trained, "file:///datasets/abid/split.csv", test_channel_uri, {})
    return promote_trained(settings, production.group, challenger, PromotionPolicy("nightly")).decision


class Loop:
    """A model group and its endpoint under one artifact root, with helpers to register models and check that the
    registry and the endpoint agree."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.artifact_root = str(root / "artifacts")
        self.settings = Settings.load(artifact_root=self.artifact_root)
        self.registry = get_model_registry(self.settings)
        self.backend = get_serving_backend(self.settings)
        self.endpoint = f"loop-{uuid.uuid4().hex[:8]}"

    def model(self, seed: int) -> Path:
        """A model.tar.gz of an untrained ResNet-18 at 32 px."""
        folder = write_untrained_model_dir(self.root / f"model-{seed}", "resnet18", 32, seed=seed)
        return pack_folder(folder, self.root / f"archive-{seed}" / "model.tar.gz")

    def register(self, recipe_seed: int, model_seed: int | None = None) -> ModelVersion:
        """An approved version of the model made with ``model_seed``, recorded as trained with ``recipe_seed``."""
        archive = self.model(recipe_seed if model_seed is None else model_seed)
        registered = self.registry.register(
            self.endpoint, spec(archive.as_uri(), recipe_seed, sha256=file_digest(archive))
        )
        return self.registry.approve(self.endpoint, registered.version, "alice", "ok")

    def serving(self) -> str | None:
        return self.backend.describe(self.endpoint).model_ref

    def assert_agree(self, expected: int) -> None:
        production = self.registry.production(self.endpoint)
        assert production is not None and production.version == expected, production
        assert self.serving() == f"{self.endpoint}:{expected}", "(a): what serves is the production version"

    def outcomes(self) -> list[tuple[str, int | None, int | None]]:
        return [(d.outcome, d.challenger_version, d.serving_version) for d in self.registry.decisions(self.endpoint)]


@pytest.fixture
def loop(prefect_server: None, tmp_path: Path) -> Iterator[Loop]:
    """An endpoint serving version 1, its group's production version."""
    state = Loop(tmp_path)
    first = state.register(1)
    release(state.artifact_root, str(first.ref))
    state.assert_agree(1)
    try:
        yield state
    finally:
        with contextlib.suppress(EndpointNotFoundError):
            state.backend.delete(state.endpoint)


def test_a_failure_between_any_two_steps_of_a_promotion_leaves_registry_and_endpoint_agreeing(
    loop: Loop, demo_channels: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    test_channel, better = demo_channels["test"].as_uri(), answered(demo_channels["test"])
    # Cut 1, re-read -> deploy: the deploy fails (its model object is gone). Recorded, nothing changed.
    gone = loop.register(2)
    shutil.rmtree(loop.root / "archive-2")
    with pytest.raises(Exception, match="model"):
        promote(loop.artifact_root, str(gone.ref), better, test_channel)
    loop.assert_agree(1)
    assert loop.outcomes() == [("deploy-failed", 2, 1)], "(d): a failed deploy's decision is kept"
    assert loop.registry.get(loop.endpoint, 2).stage == "archived"

    # Cut 2, deploy -> set the stage: the registry write fails after the switch; the deploy is undone.
    original = StorageModelRegistry.transition

    def stage_fails(self: StorageModelRegistry, group: str, version: int, stage: str, *args: str) -> ModelVersion:
        if stage == "production":
            raise RegistryError("injected: the registry is unreachable")
        return original(self, group, version, stage, *args)  # type: ignore[arg-type]

    third = loop.register(3)
    with monkeypatch.context() as patch:
        patch.setattr(StorageModelRegistry, "transition", stage_fails)
        with pytest.raises(RegistryError, match="injected"):
            promote(loop.artifact_root, str(third.ref), better, test_channel)
    loop.assert_agree(1)
    assert loop.outcomes()[-1] == ("deploy-failed", 3, 1)

    # Cut 3, set the stage -> record: the decision's write fails once (a transient fault) and is retried.
    original_record = StorageModelRegistry.record
    failures: list[Decision] = []

    def record_fails_once(self: StorageModelRegistry, decision: Decision) -> None:
        if not failures:
            failures.append(decision)
            raise TransientStorageError("injected: the store answered 503")
        original_record(self, decision)

    fourth = loop.register(4)
    with monkeypatch.context() as patch:
        patch.setattr(StorageModelRegistry, "record", record_fails_once)
        decision = promote(loop.artifact_root, str(fourth.ref), better, test_channel)
    assert decision.outcome == "promoted" and failures, "the first write failed"
    loop.assert_agree(4)
    assert loop.outcomes()[-1] == ("promoted", 4, 1)


def test_a_rollback_holds_until_a_person_releases_it_and_a_redeploy_is_a_no_op(
    loop: Loop, demo_channels: dict[str, Path], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    test_channel, better = demo_channels["test"].as_uri(), answered(demo_channels["test"])
    second = loop.register(2)
    assert promote(loop.artifact_root, str(second.ref), better, test_channel).outcome == "promoted"
    loop.assert_agree(2)
    deployed_at = loop.backend.describe(loop.endpoint).deployed_at
    assert release(loop.artifact_root, str(second.ref)) == deployed_at, "(f): the version that serves: nothing done"
    assert loop.backend.describe(loop.endpoint).previous_model_ref == f"{loop.endpoint}:1"

    rollback_model(loop.endpoint, "v2 miscounts 5s", "bob", location=Location(artifact_root=loop.artifact_root))
    loop.assert_agree(1)
    # Item 12: the next nightly retrains v2's recipe on the same data: a better score, but held.
    copy = loop.register(2, model_seed=22)  # another model, made with v2's recipe on v2's data
    held = promote(loop.artifact_root, str(copy.ref), better, test_channel)
    assert held.outcome == "held" and not held.promoted
    assert f"matches {second.ref}" in held.reason and "bob" in held.reason and "release-hold" in held.reason
    loop.assert_agree(1)
    assert loop.registry.get(loop.endpoint, copy.version).stage == "archived"

    monkeypatch.setenv("BINCOUNT_ARTIFACT_ROOT", loop.artifact_root)
    cli(["models", "list", "--group", loop.endpoint])
    listed = capsys.readouterr().out.splitlines()
    assert listed[0].split()[-2:] == ["BY", "HOLD"] and listed[3].endswith("held by bob: v2 miscounts 5s"), listed
    cli(["models", "show", str(second.ref)])
    assert "held since" in capsys.readouterr().out
    cli(["models", "release-hold", str(second.ref), "--reason", "the 5s were mislabelled", "--actor", "carol"])
    assert capsys.readouterr().out.strip() == f"{second.ref} is no longer held: it may be promoted again"

    again = loop.register(2, model_seed=23)
    assert promote(loop.artifact_root, str(again.ref), better, test_channel).outcome == "promoted"
    loop.assert_agree(again.version)
    assert [outcome for outcome, *_ in loop.outcomes()] == ["promoted", "held", "promoted"]


def test_a_challenger_that_is_a_registered_model_is_nothing_new(loop: Loop, demo_channels: dict[str, Path]) -> None:
    """(c), item 1: a retrain served from cache gives the champion's own model: recorded as nothing new, never a
    candidate, never archived; the production version keeps serving."""
    champion = loop.registry.get(loop.endpoint, 1)
    decision = judge(loop.artifact_root, str(champion.ref), champion.model_uri, demo_channels["test"].as_uri())
    assert (decision.outcome, decision.challenger_version, decision.promoted) == ("nothing-new", 1, False)
    assert [(v.version, v.stage) for v in loop.registry.list(loop.endpoint)] == [(1, "production")]
    loop.assert_agree(1)
    assert loop.outcomes() == [("nothing-new", 1, 1)]


def test_the_endpoint_lock_is_one_prefect_concurrency_slot(loop: Loop) -> None:
    with get_client(sync_client=True) as client:
        limit = client.read_global_concurrency_limit_by_name(endpoint_lock_name(loop.endpoint))
    assert limit.limit == 1 and limit.active_slots == 0, "taken by the fixture's deploy, and given back"


# --- the promotion rule: a paired test on the same test images ----------------------------------------
def test_a_challenger_clearly_better_on_the_same_images_is_promoted_by_the_paired_test(
    loop: Loop, demo_channels: dict[str, Path]
) -> None:
    """Right on all 40 test images against an untrained champion: exact McNemar rejects "no difference"."""
    challenger = loop.register(2)
    decision = promote(
        loop.artifact_root, str(challenger.ref), answered(demo_channels["test"]), demo_channels["test"].as_uri()
    )
    assert decision.outcome == "promoted" and decision.comparison is not None
    assert decision.comparison.verdict == "better" and decision.comparison.images == 40
    assert decision.comparison.mcnemar.only_a == 0 and decision.comparison.mcnemar.p_value < 0.05
    assert "challenger better" in decision.reason and "exact McNemar p=" in decision.reason
    loop.assert_agree(2)
    (recorded,) = loop.registry.decisions(loop.endpoint)
    assert recorded.comparison == decision.comparison and recorded.confidence == 0.95, "kept with its statistics"


def test_a_challenger_that_differs_from_the_champion_by_noise_cannot_be_told_apart_and_the_champion_stays(
    loop: Loop, demo_channels: dict[str, Path]
) -> None:
    """The champion's own answers with two of its misses put right: 2 against 0 discordant images decide
    nothing."""
    test_channel = demo_channels["test"]
    champion = evaluate_model(Storage(), loop.registry.get(loop.endpoint, 1).model_uri, test_channel.as_uri())
    assert champion.predictions is not None
    answers = dict(zip(champion.predictions.files, champion.predictions.predicted_counts, strict=True))
    scored = champion.predictions
    missed = [f for f, t, p in zip(scored.files, scored.true_counts, scored.predicted_counts, strict=True) if t != p]
    missed = missed[:2]
    answers.update({file: int(file.split("/")[0]) for file in missed})
    challenger = loop.register(2)
    decision = promote(loop.artifact_root, str(challenger.ref), answered(test_channel, answers), test_channel.as_uri())
    assert (decision.outcome, decision.promoted) == ("kept", False) and decision.comparison is not None
    assert decision.comparison.verdict == "cannot tell" and decision.comparison.more_images
    assert (decision.comparison.mcnemar.only_b, decision.comparison.mcnemar.only_a) == (2, 0)
    assert decision.reason.startswith("inconclusive, the serving model stays: cannot tell:"), decision.reason
    assert (
        f"about {decision.comparison.more_images} more test images would decide a gap of 5.0 points" in decision.reason
    )
    loop.assert_agree(1)
    assert loop.registry.get(loop.endpoint, 2).stage == "archived"
