"""The model registry over :class:`~bincount.storage.Storage` (``file://`` or ``s3://``), and the promotion rule.

Layout, under ``{artifact_root}/registry/<group>/`` (one group per endpoint by default)::

    versions/000003.json                       version 3: model, metrics, dataset, code, recipe, job, flow run
    events/<utc time>-<uuid>.json              one stage, approval or mirror change of one version
    best-hyperparameters/<utc time>-<uuid>.json    hyperparameters of a model that passed the gate and beat the best
    decisions/<utc time>-<uuid>.json           one promotion decision (pipeline or nightly), with its paired test
    cards/000003/card.md, card.json            version 3's model card (written before its promotion is decided)

Every object is written once and never rewritten: a version number is taken by creating its file
only if it is absent (a hard link of a finished temporary file on ``file://``; a conditional
``PutObject`` with ``If-None-Match: *`` on S3), so two runs registering at once get distinct
numbers and lose nothing, without a lock. Current stages and approvals are derived from the
events, the latest winning; the best hyperparameters are the best-scoring record.
"""

from __future__ import annotations

import builtins
import dataclasses
import datetime as dt
import hashlib
import json
import re
import uuid
from typing import TYPE_CHECKING, Any

from bincount.config import Settings
from bincount.contracts.registry import (
    APPROVAL_STATUSES,
    FORMAT_VERSION,
    PROMOTION_CONFIDENCE,
    PROMOTION_METRIC,
    STAGES,
    ApprovalStatus,
    BestHyperparameters,
    DatasetRef,
    Decision,
    DecisionOutcome,
    EventKind,
    HeldVersionError,
    Hold,
    ImagePredictions,
    InvalidReferenceError,
    InvalidTransitionError,
    ModelMetrics,
    ModelVersion,
    ModelVersionSpec,
    NoPreviousProductionError,
    ProductionVersionError,
    RegistryError,
    RegistryMirror,
    Stage,
    StageEvent,
    UnsupportedFormatError,
    VersionNotFoundError,
    VersionRef,
    check_group,
    parse_reference,
)
from bincount.split import SPLITS, read_split
from bincount.stats import (
    Interval,
    McNemar,
    Metrics,
    NonInferiority,
    PairedComparison,
    PairedDifferences,
    compare_paired,
)

if TYPE_CHECKING:  # for annotations only: importing it would load torch into every registry reader (the CLI)
    from bincount.evaluation import Evaluation
from bincount.storage import (
    Storage,
    join_uri,
    storage_for,
)

VERSION_FILE = re.compile(r"(\d{6,})\.json")
MAX_ALLOCATION_ATTEMPTS = 1000


def now_iso() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="microseconds")


def object_sha256(storage: Storage, uri: str) -> str:
    """SHA-256 of the object at ``uri`` (a model.tar.gz, a split.csv)."""
    return hashlib.sha256(storage.read_bytes(uri)).hexdigest()


def dataset_ref(storage: Storage, split_uri: str) -> DatasetRef:
    """The split manifest at ``split_uri`` as a version records it: its hash and images per side."""
    data = storage.read_bytes(split_uri)
    counts = read_split(storage, split_uri)["split"].value_counts()
    return DatasetRef(split_uri, hashlib.sha256(data).hexdigest(), {side: int(counts.get(side, 0)) for side in SPLITS})


def decide(
    endpoint_name: str,
    challenger: Evaluation,
    challenger_model_uri: str,
    serving: Evaluation | None,
    serving_model_uri: str | None,
    margin: float,
    challenger_version: int | None = None,
    serving_version: int | None = None,
    confidence: float = PROMOTION_CONFIDENCE,
) -> Decision:
    """Promote the challenger when nothing serves, or when a paired test on the same test images finds it better.

    ``challenger`` and ``serving`` are evaluations with their answer on each test image. The test is
    :func:`bincount.stats.compare_paired`: exact McNemar on who alone got an image right and paired bootstrap
    intervals, at ``confidence``, with ``margin`` as a minimum gain in accuracy on top;
    RMSE and within-one must not be worse beyond their non-inferiority margins. Only "better" promotes; "cannot
    tell" keeps the serving model and says how many more test images would decide the gap seen.

    Raises:
        ValueError: an evaluation lacks its per-image answers, or the two were not scored on the same images.
    """
    score = challenger.accuracy
    comparison: PairedComparison | None = None
    if serving is None:
        promoted, reason = True, "no model serves this endpoint yet"
    else:
        truth, served, new = paired_answers(_answers(serving, "serving"), _answers(challenger, "challenger"))
        comparison = compare_paired(truth, served, new, confidence=confidence, margin=margin)
        promoted = comparison.verdict == "better"
        reason = {
            "better": f"{comparison.sentence}: promoted",
            "worse": f"{comparison.sentence}: the serving model stays",
            "cannot tell": f"inconclusive, the serving model stays: {comparison.sentence}",
        }[comparison.verdict]
    return Decision(
        endpoint_name=endpoint_name,
        promoted=promoted,
        reason=reason,
        metric=PROMOTION_METRIC,
        challenger_score=score,
        serving_score=None if serving is None else serving.accuracy,
        margin=margin,
        challenger_model_uri=challenger_model_uri,
        serving_model_uri=serving_model_uri,
        decided_at=now_iso(),
        challenger_version=challenger_version,
        serving_version=serving_version,
        confidence=confidence,
        comparison=comparison,
    )


def decision_without_test(
    challenger: ModelVersion, serving: ModelVersion | None, margin: float, outcome: DecisionOutcome, reason: str
) -> Decision:
    """A decision taken before any paired test (nothing retrained, nothing new, or the quality gate said no): the
    registered scores side by side, ``comparison`` None. ``unchanged`` names no challenger (``challenger`` is then
    the serving version, nothing was retrained)."""
    return Decision(
        endpoint_name=challenger.group,
        promoted=False,
        reason=reason,
        metric=PROMOTION_METRIC,
        challenger_score=challenger.spec.metrics.accuracy,
        serving_score=None if serving is None else serving.spec.metrics.accuracy,
        margin=margin,
        challenger_model_uri=challenger.model_uri,
        serving_model_uri=None if serving is None else serving.model_uri,
        decided_at=now_iso(),
        challenger_version=None if outcome == "unchanged" else challenger.version,
        serving_version=None if serving is None else serving.version,
        outcome=outcome,
    )


def _answers(evaluation: Evaluation, role: str) -> ImagePredictions:
    if evaluation.predictions is None:
        raise ValueError(
            f"the {role} model's evaluation has no answer per test image, which a paired test needs: score it with "
            "bincount.evaluation.evaluate_model (the evaluate-model task)"
        )
    return evaluation.predictions


def paired_answers(first: ImagePredictions, second: ImagePredictions) -> tuple[list[int], list[int], list[int]]:
    """The true counts and both models' predictions on the same images, matched by file, in ``second``'s order.

    Raises:
        ValueError: the two were not scored on the same images, or disagree on an image's true count.
    """
    by_file = dict(zip(first.files, zip(first.true_counts, first.predicted_counts, strict=True), strict=True))
    if set(by_file) != set(second.files):
        only_first, only_second = sorted(set(by_file) - set(second.files)), sorted(set(second.files) - set(by_file))
        raise ValueError(
            f"the two models were not scored on the same test images ({len(only_first)} only in the first, e.g. "
            f"{only_first[:3]}; {len(only_second)} only in the second, e.g. {only_second[:3]}): score both on the "
            "challenger's test channel"
        )
    truth, first_predicted, second_predicted = [], [], []
    for file, true, predicted in zip(second.files, second.true_counts, second.predicted_counts, strict=True):
        first_true, first_answer = by_file[file]
        if first_true != true:
            raise ValueError(f"test image {file}: true count {first_true} in one evaluation, {true} in the other")
        truth.append(true)
        first_predicted.append(first_answer)
        second_predicted.append(predicted)
    return truth, first_predicted, second_predicted


# --- records as JSON ---------------------------------------------------------------------------
def _spec_from_dict(data: dict[str, Any]) -> ModelVersionSpec:
    return ModelVersionSpec(
        **{
            **data,
            "metrics": ModelMetrics(**data["metrics"]),
            "dataset": DatasetRef(**data["dataset"]),
        }
    )


def _comparison_from_dict(data: dict[str, Any]) -> PairedComparison:
    differences = data["differences"]
    return PairedComparison(
        **{
            **data,
            "mcnemar": McNemar(**data["mcnemar"]),
            "differences": PairedDifferences(
                **{
                    **differences,
                    **{name: Interval(**differences[name]) for name in ("accuracy", "rmse", "within_one")},
                }
            ),
            "champion": Metrics(**data["champion"]),
            "challenger": Metrics(**data["challenger"]),
            "non_inferiority": NonInferiority(**data["non_inferiority"]),
        }
    )


def _decision_from_dict(data: dict[str, Any]) -> Decision:
    fields = {key: value for key, value in data.items() if key != "format"}
    if fields.get("comparison") is not None:
        fields["comparison"] = _comparison_from_dict(fields["comparison"])
    return Decision(**fields)


def _event_from_dict(data: dict[str, Any]) -> StageEvent:
    return StageEvent(**{key: value for key, value in data.items() if key != "format"})


class _Objects:
    """Write-once JSON objects under one prefix, on ``file://`` or ``s3://``."""

    def __init__(self, storage: Storage) -> None:
        self.storage = storage

    def create(self, uri: str, document: dict[str, Any]) -> bool:
        """Write ``document`` at ``uri`` only if nothing is there; False when something is."""
        data = json.dumps({"format": FORMAT_VERSION, **document}, indent=1).encode()
        return self.storage.create_new(uri, data)

    def read(self, uri: str) -> dict[str, Any]:
        try:
            document = json.loads(self.storage.read_bytes(uri))
        except ValueError as error:
            raise RegistryError(
                f"{uri} is not a registry object ({error}): restore it from a backup or move it away"
            ) from None
        found = document.get("format") if isinstance(document, dict) else None
        if not isinstance(found, int):
            raise RegistryError(f"{uri} is not a registry object (no format number): restore it or move it away")
        if found > FORMAT_VERSION:
            raise UnsupportedFormatError(
                f"{uri} was written by a newer bincount (registry format {found}; this one reads up to "
                f"{FORMAT_VERSION}): upgrade bincount to work with this registry. Nothing was changed."
            )
        return document

    def uris(self, prefix: str) -> builtins.list[str]:
        return sorted(info.uri for info in self.storage.list(prefix) if info.uri.endswith(".json"))


def _stamped_name() -> str:
    """``<utc time>-<uuid>.json``: sorts by time, and is never the same twice."""
    return f"{dt.datetime.now(dt.UTC).strftime('%Y%m%dT%H%M%S.%fZ')}-{uuid.uuid4().hex}.json"


class StorageModelRegistry:
    """The :class:`~bincount.contracts.registry.ModelRegistry` under an artifact root.

    ``mirror`` (SageMaker Model Registry on profile ``aws``) is told about every version and
    approval after it is recorded here; a registration retried after a mirror failure finds the
    version recorded and only publishes it again.

    Example:
        ``registry = StorageModelRegistry.from_settings(settings)``;
        ``registry.register("bincount", spec).ref`` -> ``VersionRef("bincount", 1)``
    """

    def __init__(
        self, storage: Storage, artifact_root: str, path: str = "registry", mirror: RegistryMirror | None = None
    ) -> None:
        if not artifact_root.startswith(("file://", "s3://")):
            raise InvalidReferenceError(f"artifact root {artifact_root!r}: give a file:// or s3:// URI")
        parts = path.strip("/").split("/")
        if "://" in path or path.startswith("/") or any(part in ("", ".", "..") for part in parts):
            raise InvalidReferenceError(
                f"registry path {path!r} would lie outside the artifact root {artifact_root}: give a relative "
                "folder under it such as 'registry'"
            )
        self.storage = storage
        self.root = join_uri(artifact_root, *parts)
        self.mirror = mirror
        self.objects = _Objects(storage)

    @classmethod
    def from_settings(cls, settings: Settings, mirror: RegistryMirror | None = None) -> StorageModelRegistry:
        return cls(storage_for(settings), settings.artifact_root, mirror=mirror)

    def _group_uri(self, group: str, *parts: str) -> str:
        return join_uri(self.root, check_group(group), *parts)

    def card_folder(self, group: str, version: int) -> str:
        """Where the model card of ``group:version`` is kept (``card.md``, ``card.json``): beside its version."""
        return self._group_uri(group, "cards", f"{version:06d}")

    # reading ---------------------------------------------------------------------------------
    def groups(self) -> builtins.list[str]:
        prefix = self.root.rstrip("/") + "/"
        return sorted(
            {
                info.uri[len(prefix) :].split("/", 1)[0]
                for info in self.storage.list(self.root)
                if "/versions/" in info.uri
            }
        )

    def _versions(self, group: str) -> dict[int, ModelVersion]:
        """Every version of ``group`` with its stage and approval derived from the events (latest wins)."""
        versions: dict[int, ModelVersion] = {}
        for uri in self.objects.uris(self._group_uri(group, "versions")):
            if not VERSION_FILE.fullmatch(uri.rsplit("/", 1)[-1]):
                continue
            document = self.objects.read(uri)
            versions[document["version"]] = ModelVersion(
                group=group,
                version=document["version"],
                spec=_spec_from_dict(document["spec"]),
                created_at=document["created_at"],
                approval=document["spec"]["approval"],
            )
        events = sorted(
            (_event_from_dict(self.objects.read(uri)) for uri in self.objects.uris(self._group_uri(group, "events"))),
            key=lambda event: (event.at, event.event_id),
        )
        state: dict[int, dict[str, Any]] = {
            n: {"stage": "candidate", "approval": v.approval, "history": [], "mirror": {}, "hold": None}
            for n, v in versions.items()
        }
        serving: int | None = None
        for event in events:
            if event.version in state:  # else an event of a version whose record is gone: nothing to attach it to
                serving = _apply_event(state, event, serving)
        return {
            n: v.with_state(**{**state[n], "history": tuple(state[n]["history"])}) for n, v in sorted(versions.items())
        }

    def get(self, group: str, version: int) -> ModelVersion:
        versions = self._versions(group)
        if version not in versions:
            known = f"it has versions 1-{max(versions)}" if versions else "it has no versions"
            raise VersionNotFoundError(
                f"model group {group!r} has no version {version} ({known}): see `bincount models list --group {group}`"
            )
        return versions[version]

    def resolve(self, reference: str | VersionRef) -> ModelVersion:
        ref = parse_reference(reference) if isinstance(reference, str) else reference
        if ref.version == "production":
            found = self.production(ref.group)
            if found is None:
                raise VersionNotFoundError(f"model group {ref.group!r} has no version in production")
            return found
        if ref.version == "latest":
            versions = self._versions(ref.group)
            if not versions:
                raise VersionNotFoundError(f"model group {ref.group!r} has no versions: train a model first")
            return versions[max(versions)]
        return self.get(ref.group, ref.version)

    def list(self, group: str | None = None) -> builtins.list[ModelVersion]:
        return [v for name in ([group] if group else self.groups()) for v in self._versions(name).values()]

    def production(self, group: str) -> ModelVersion | None:
        return next((v for v in self._versions(group).values() if v.stage == "production"), None)

    def previous_production(self, group: str) -> ModelVersion:
        """The version a rollback goes back to: the one that served before the current production version.

        Production history is a stack: a promotion pushes a version, a rollback pops back to its target.
        The answer is the nearest version below the top that is not rejected.
        """
        versions = self._versions(group)
        ordered = sorted(
            (e for v in versions.values() for e in v.history if e.kind == "stage" and e.stage == "production"),
            key=lambda e: (e.at, e.event_id),
        )
        stack: builtins.list[int] = []
        for event in ordered:
            if "rollback_from" in event.details and event.version in stack:
                del stack[stack.index(event.version) + 1 :]
            else:
                stack.append(event.version)
        current = self.production(group)
        top = current.version if current else None
        for number in reversed(stack):
            if number != top and versions[number].approval != "Rejected":
                return versions[number]
        where = f"version {top} is in production" if top else "no version is in production"
        raise NoPreviousProductionError(
            f"model group {group!r} has no earlier production version to roll back to ({where}, and no other version "
            "that served is left unrejected): deploy a version by name instead (`bincount models show` lists them)"
        )

    def find_by_model_uri(self, group: str, model_uri: str) -> ModelVersion | None:
        found = [v for v in self._versions(group).values() if v.spec.model_uri == model_uri]
        return found[-1] if found else None

    def find_by_digest(self, group: str, model_sha256: str) -> ModelVersion | None:
        return next((v for v in self._versions(group).values() if v.spec.model_sha256 == model_sha256), None)

    def held_by(self, group: str, spec: ModelVersionSpec) -> ModelVersion | None:
        return next((v for v in self._versions(group).values() if v.hold is not None and v.matches(spec)), None)

    # writing ---------------------------------------------------------------------------------
    def register(self, group: str, spec: ModelVersionSpec) -> ModelVersion:
        """Record ``spec`` as the next version of ``group`` (then the mirror); a model already registered
        (same URI and sha256: a retried task) returns its version instead of a second one."""
        check_group(group)
        if spec.approval not in APPROVAL_STATUSES:
            raise RegistryError(f"approval {spec.approval!r}: use one of {APPROVAL_STATUSES}")
        if not spec.model_uri.startswith(("file://", "s3://")):
            raise RegistryError(f"model URI {spec.model_uri!r}: register a model by its file:// or s3:// URI")
        try:
            json.dumps(spec.hyperparameters)
        except TypeError as error:
            raise RegistryError(f"hyperparameters must be plain JSON values (train.py flags): {error}") from None
        versions = self._versions(group)
        existing = next(
            (
                v
                for v in versions.values()
                if (v.spec.model_uri, v.spec.model_sha256) == (spec.model_uri, spec.model_sha256)
            ),
            None,
        )
        if existing is None:
            number = max(versions, default=0) + 1
            created_at = now_iso()
            document = {"group": group, "version": 0, "created_at": created_at, "spec": dataclasses.asdict(spec)}
            for _ in range(MAX_ALLOCATION_ATTEMPTS):
                if self.objects.create(
                    self._group_uri(group, "versions", f"{number:06d}.json"), {**document, "version": number}
                ):
                    break
                number += 1  # another run took this number first
            else:
                raise RegistryError(
                    f"could not allocate a version number in {group!r} after {MAX_ALLOCATION_ATTEMPTS} tries"
                )
            existing = ModelVersion(group, number, spec, created_at, approval=spec.approval)
        if self.mirror is not None and not existing.mirror:
            self._write_event(
                group,
                existing.version,
                "mirrored",
                spec.created_by,
                "registered in the mirror",
                details=self.mirror.publish(existing),
            )
            existing = self.get(group, existing.version)
        return existing

    def _write_event(
        self,
        group: str,
        version: int,
        kind: EventKind,
        actor: str,
        reason: str,
        *,
        stage: Stage | None = None,
        approval: ApprovalStatus | None = None,
        details: dict[str, str] | None = None,
    ) -> None:
        name = _stamped_name()
        event = StageEvent(
            group=group,
            version=version,
            kind=kind,
            at=now_iso(),
            actor=actor,
            reason=reason,
            stage=stage,
            approval=approval,
            details=details or {},
            event_id=name.removesuffix(".json"),
        )
        if not self.objects.create(self._group_uri(group, "events", name), dataclasses.asdict(event)):
            raise RegistryError(f"event name {name} already taken (a clock or uuid fault): try again")

    @staticmethod
    def _check_actor(actor: str, reason: str) -> None:
        if not actor.strip() or not reason.strip():
            raise RegistryError("say who changes the version and why: give a non-empty actor and reason")

    def transition(self, group: str, version: int, stage: Stage, actor: str, reason: str) -> ModelVersion:
        """Move ``version`` to ``stage``. Production takes an approved version that no hold matches, and the
        version it replaces becomes ``archived`` in the same event; the production version leaves no other way."""
        if stage not in STAGES:
            raise RegistryError(f"stage {stage!r}: use one of {STAGES}")
        self._check_actor(actor, reason)
        current = self.get(group, version)
        if current.stage == "production" and stage != "production":
            raise ProductionVersionError(
                f"{current.ref} is in production: it leaves production only when another version takes its place "
                f"(deploy a better one, or `bincount models rollback {group}`), never by being {stage}. Nothing was "
                "changed."
            )
        if stage == "production" and current.stage != "production":
            self.check_promotable(current)
        if current.stage == stage:
            return current
        self._write_event(group, version, "stage", actor, reason, stage=stage)
        return self.get(group, version)

    def check_promotable(self, version: ModelVersion) -> None:
        """Raise unless ``version`` may go to production: approved, and matching no held version."""
        if version.approval != "Approved":
            how = (
                "it was rejected: register a new version"
                if version.approval == "Rejected"
                else f"approve it first (`bincount models approve {version.ref} --reason ...`)"
            )
            raise InvalidTransitionError(
                f"{version.ref} is {version.approval}, and only an approved version goes to production: {how}"
            )
        held = self.held_by(version.group, version.spec)
        if held is None:
            return
        assert held.hold is not None
        same = "is" if held.version == version.version else f"matches {held.ref} (model, or recipe and data), which is"
        raise HeldVersionError(
            f"{version.ref} {same} held since a rollback by {held.hold.actor} ({held.hold.reason}, "
            f"{held.hold.at[:19]}): it goes to production again only after a person lifts the hold "
            f"(`bincount models release-hold {held.ref} --reason ...`)"
        )

    def release_hold(self, group: str, version: int, actor: str, reason: str) -> ModelVersion:
        """Lift the hold a rollback put on ``version`` (a person's decision: who and why are kept)."""
        self._check_actor(actor, reason)
        current = self.get(group, version)
        if current.hold is None:
            held = [str(v.ref) for v in self.list(group) if v.hold is not None]
            raise InvalidTransitionError(
                f"{current.ref} is not held (held in {group!r}: {', '.join(held) or 'none'}): nothing to release"
            )
        self._write_event(group, version, "release", actor, reason)
        return self.get(group, version)

    def rollback(self, group: str, actor: str, reason: str) -> ModelVersion:
        """Put :meth:`previous_production` back in production (after it was deployed again); the version rolled
        back from is held (:meth:`held_by`) until a person releases it."""
        self._check_actor(actor, reason)
        target = self.previous_production(group)
        current = self.production(group)
        self._write_event(
            group,
            target.version,
            "stage",
            actor,
            reason,
            stage="production",
            details={"rollback_from": str(current.version) if current else ""},
        )
        return self.get(group, target.version)

    def _set_approval(
        self, group: str, version: int, approval: ApprovalStatus, actor: str, reason: str
    ) -> ModelVersion:
        self._check_actor(actor, reason)
        current = self.get(group, version)
        if approval == "Approved" and current.approval == "Rejected":
            rejection = next((e for e in reversed(current.history) if e.approval == "Rejected"), None)
            by = f" by {rejection.actor}: {rejection.reason}" if rejection else ""
            raise InvalidTransitionError(
                f"{current.ref} was rejected{by}. A rejected version stays rejected: "
                "train again and register a new version"
            )
        if current.approval != approval:
            self._write_event(group, version, "approval", actor, reason, approval=approval)
            current = self.get(group, version)
        if self.mirror is not None:  # also when unchanged here: a retry brings the mirror up to date
            if not current.mirror:
                current = self.register(group, current.spec)
            self.mirror.set_approval(current, approval, reason)
        return current

    def approve(self, group: str, version: int, actor: str, reason: str) -> ModelVersion:
        return self._set_approval(group, version, "Approved", actor, reason)

    def reject(self, group: str, version: int, actor: str, reason: str) -> ModelVersion:
        """Reject ``version``: it can no longer go to production nor be rolled back to. The production version
        cannot be rejected: roll it back first (:class:`ProductionVersionError`)."""
        current = self.get(group, version)
        if current.stage == "production":
            raise ProductionVersionError(
                f"{current.ref} is in production and cannot be rejected while it serves: roll it back first "
                f"(`bincount models rollback {group} --reason ...`: that also holds it), or deploy a better version. "
                "Nothing was changed."
            )
        return self._set_approval(group, version, "Rejected", actor, reason)

    # best hyperparameters and decisions --------------------------------------------------------
    def save_best_hyperparameters(
        self,
        group: str,
        hyperparameters: dict[str, Any],
        job_name: str,
        score: dict[str, Any],
        version: int | None = None,
        metric: str = PROMOTION_METRIC,
    ) -> bool:
        stored = self.best_hyperparameters(group, metric)
        if stored is not None and not _score(score, metric) > _score(stored.score, metric):
            return False
        record = BestHyperparameters(hyperparameters, job_name, score, now_iso(), version)
        return self.objects.create(
            self._group_uri(group, "best-hyperparameters", _stamped_name()), dataclasses.asdict(record)
        )

    def best_hyperparameters(self, group: str, metric: str = PROMOTION_METRIC) -> BestHyperparameters | None:
        """The best-scoring saved record (the latest among equals), or None when nothing was ever saved."""
        records = [
            BestHyperparameters(**{k: v for k, v in self.objects.read(uri).items() if k != "format"})
            for uri in self.objects.uris(self._group_uri(group, "best-hyperparameters"))
        ]
        if not records:
            return None
        return max(records, key=lambda r: (_score(r.score, metric), r.saved_at))

    def record(self, decision: Decision) -> None:
        self.objects.create(self._group_uri(decision.endpoint_name, "decisions", _stamped_name()), decision.to_dict())

    def decisions(self, group: str) -> builtins.list[Decision]:
        found = [
            _decision_from_dict(self.objects.read(uri))
            for uri in self.objects.uris(self._group_uri(group, "decisions"))
        ]
        return sorted(found, key=lambda d: d.decided_at)


def _apply_event(state: dict[int, dict[str, Any]], event: StageEvent, serving: int | None) -> int | None:
    """One event applied to the versions' derived ``state``; returns the version in production after it."""
    current = state[event.version]
    current["history"].append(event)
    if event.kind == "stage" and event.stage:
        current["stage"] = event.stage
        if event.stage == "production":
            if serving not in (None, event.version) and state[serving]["stage"] == "production":
                state[serving]["stage"] = "archived"  # superseded, in the same event
            serving = event.version
            rolled_from = int(event.details.get("rollback_from") or 0)
            if rolled_from in state:  # a rollback holds the version it rolled back from
                state[rolled_from]["hold"] = Hold(event.actor, event.reason, event.at)
    elif event.kind == "approval" and event.approval:
        current["approval"] = event.approval
    elif event.kind == "mirrored":
        current["mirror"].update(event.details)
    elif event.kind == "release":
        current["hold"] = None
    return serving


def _score(score: dict[str, Any], metric: str) -> float:
    value = score.get(metric)
    return float(value) if isinstance(value, (int, float)) else float("-inf")
