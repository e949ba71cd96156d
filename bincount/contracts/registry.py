"""The model registry's seam: version records, stage and approval events, errors, and the Protocols.

Every trained model is a numbered version of a model group (one group per endpoint by default).
A version record never changes after it is written; what happens to it later (approved, put in
production, archived) is a stream of events, and its current stage and approval are derived from
them, the latest winning. Stages and approval statuses use SageMaker Model Registry's words.

A version is referred to as ``<group>:<number>`` (``bincount:3``), or ``<group>:latest`` /
``<group>:production``; see :func:`parse_reference`.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Literal, Protocol

from bincount.contracts.naming import check_endpoint_name
from bincount.stats import PairedComparison

FORMAT_VERSION = 1
"""The layout of every registry object this code writes; it refuses objects of a later one."""

Stage = Literal["candidate", "production", "archived"]
ApprovalStatus = Literal["PendingManualApproval", "Approved", "Rejected"]
STAGES: tuple[Stage, ...] = ("candidate", "production", "archived")
APPROVAL_STATUSES: tuple[ApprovalStatus, ...] = ("PendingManualApproval", "Approved", "Rejected")
EventKind = Literal["stage", "approval", "mirrored", "release"]
DecisionOutcome = Literal["promoted", "kept", "unchanged", "nothing-new", "held", "rejected", "deploy-failed"]
"""What became of a pipeline's or a nightly's challenger: promoted (it serves now), kept (it did not beat what
serves), unchanged (no new data or code: nothing retrained), nothing-new (its model is a registered version's),
held (it matches a version a rollback holds), rejected (by a person, or by the pipeline's quality gate),
deploy-failed (its deploy or canary failed: what served before still serves)."""
PROMOTION_METRIC = "accuracy"
PROMOTION_CONFIDENCE = 0.95
"""The paired test's confidence by default: a challenger is promoted when it is better at this level."""
PROMOTION_MARGIN = 0.01
"""The least gain in test accuracy that promotes by default, on top of the paired test finding it better."""


class RegistryError(ValueError):
    """The registry cannot do what was asked; the message says what to do instead. Nothing was written."""


class VersionNotFoundError(RegistryError, LookupError):
    """No such group or version."""


class InvalidTransitionError(RegistryError):
    """The version's stage or approval forbids the change (approving a rejected model, deploying one)."""


class ProductionVersionError(InvalidTransitionError):
    """A production version may leave production only when another takes its place (a promotion or a rollback)."""


class HeldVersionError(InvalidTransitionError):
    """The version matches one a rollback holds: only a person lifts the hold (``bincount models release-hold``)."""


class NoPreviousProductionError(RegistryError, LookupError):
    """A rollback was asked for, but the group had no earlier production version to go back to."""


class UnsupportedFormatError(RegistryError):
    """A registry object was written by a newer bincount (a later :data:`FORMAT_VERSION`)."""


class InvalidReferenceError(RegistryError):
    """A version reference, group name or registry path is malformed."""


def check_group(group: str) -> str:
    """``group`` if it is a valid model group name: the endpoint name rule (SageMaker's for package groups too)."""
    try:
        return check_endpoint_name(group)
    except ValueError:
        raise InvalidReferenceError(
            f"model group {group!r}: name it like the endpoint it serves (letters, digits and hyphens, not at either "
            "end, 63 characters at most)"
        ) from None


@dataclass(frozen=True)
class VersionRef:
    """``group`` and a version number, or ``"latest"`` / ``"production"``."""

    group: str
    version: int | Literal["latest", "production"]

    def __str__(self) -> str:
        return f"{self.group}:{self.version}"


_REFERENCE = re.compile(r"(?P<group>[^:/\s]+):(?P<version>[0-9]+|latest|production)")


def parse_reference(text: str) -> VersionRef:
    """``"bincount:3"`` -> ``VersionRef("bincount", 3)``; also ``bincount:latest`` and ``bincount:production``.

    Raises:
        InvalidReferenceError: not ``<group>:<number|latest|production>``, or a bad group name.
    """
    match = _REFERENCE.fullmatch(text.strip())
    if not match:
        raise InvalidReferenceError(
            f"version reference {text!r}: write <group>:<number> (bincount:3), <group>:latest or <group>:production"
        )
    group, version = check_group(match["group"]), match["version"]
    if version in ("latest", "production"):
        return VersionRef(group, version)
    if int(version) == 0:
        raise InvalidReferenceError(f"version reference {text!r}: versions are numbered from 1")
    return VersionRef(group, int(version))


@dataclass(frozen=True)
class ModelMetrics:
    """Test-split scores of a model (see ``bincount.evaluation.Evaluation``)."""

    accuracy: float
    rmse: float
    within_one_accuracy: float
    per_class_accuracy: dict[str, float]
    images: int = 0

    @classmethod
    def from_dict(cls, scores: dict[str, Any]) -> ModelMetrics:
        """From an evaluation's ``to_dict()`` (extra keys, such as the confusion matrix, are left out)."""
        return cls(
            accuracy=float(scores["accuracy"]),
            rmse=float(scores["rmse"]),
            within_one_accuracy=float(scores["within_one_accuracy"]),
            per_class_accuracy={str(k): float(v) for k, v in scores["per_class_accuracy"].items()},
            images=int(scores.get("images", 0)),
        )


@dataclass(frozen=True)
class DatasetRef:
    """The split a model was trained and scored on: its manifest, that file's hash, and images per side."""

    split_uri: str
    split_sha256: str
    counts: dict[str, int]


@dataclass(frozen=True)
class ModelVersionSpec:
    """What a training run knows about the model it made: everything a version records at birth.

    ``hyperparameters`` is the full recipe: every train.py flag the job was given; ``recipe`` holds the
    rest of how to make it again (the flow's data and training options, the data source), so a
    nightly run with no parameters retrains what is in production. ``flow_run_id`` and
    ``flow_run_url`` are plain strings (the registry imports nothing from Prefect).
    """

    model_uri: str
    model_sha256: str
    metrics: ModelMetrics
    dataset: DatasetRef
    code_hash: str
    hyperparameters: dict[str, Any]
    training_job: str
    flow_run_id: str | None = None
    flow_run_url: str | None = None
    created_by: str = "bincount"
    description: str = ""
    approval: ApprovalStatus = "PendingManualApproval"
    recipe: dict[str, Any] = field(default_factory=dict)
    baseline_uri: str | None = None  # the training side's statistics the monitor compares traffic with


@dataclass(frozen=True)
class StageEvent:
    """One change to a version: its stage, its approval, or where a mirror registered it (``details``)."""

    group: str
    version: int
    kind: EventKind
    at: str
    actor: str
    reason: str
    stage: Stage | None = None
    approval: ApprovalStatus | None = None
    details: dict[str, str] = field(default_factory=dict)
    event_id: str = ""


@dataclass(frozen=True)
class Hold:
    """A rollback's stop on the version rolled back from: it, and any model with its digest or with its recipe
    (train.py flags) and data (split hash), is not promoted again until a person releases it."""

    actor: str
    reason: str
    at: str


@dataclass(frozen=True)
class ModelVersion:
    """A registered version, with its current stage and approval and the history that led there.

    ``stage`` is derived: a version put in production becomes ``archived`` when a later version of
    the group is put in production. ``history`` starts with the registration.
    """

    group: str
    version: int
    spec: ModelVersionSpec
    created_at: str
    stage: Stage = "candidate"
    approval: ApprovalStatus = "PendingManualApproval"
    history: tuple[StageEvent, ...] = ()
    mirror: dict[str, str] = field(default_factory=dict)
    hold: Hold | None = None

    @property
    def ref(self) -> VersionRef:
        return VersionRef(self.group, self.version)

    @property
    def model_uri(self) -> str:
        return self.spec.model_uri

    def with_state(
        self,
        stage: Stage,
        approval: ApprovalStatus,
        history: tuple[StageEvent, ...],
        mirror: dict[str, str],
        hold: Hold | None = None,
    ) -> ModelVersion:
        return replace(self, stage=stage, approval=approval, history=history, mirror=mirror, hold=hold)

    def matches(self, spec: ModelVersionSpec) -> bool:
        """Whether ``spec`` is this model again: the same digest, or the same recipe (train.py flags) on the same
        data (split hash)."""
        same_recipe = (spec.hyperparameters, spec.dataset.split_sha256) == (
            self.spec.hyperparameters,
            self.spec.dataset.split_sha256,
        )
        return spec.model_sha256 == self.spec.model_sha256 or same_recipe

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class ImagePredictions:
    """A model's answer on each test image, as it serves: the image (its path in the test channel), its true count
    and the predicted count. As long as the test side (hundreds of images), so it travels with the scores: a
    paired test of two models needs both answers on the same images."""

    files: tuple[str, ...]
    true_counts: tuple[int, ...]
    predicted_counts: tuple[int, ...]

    def __post_init__(self) -> None:
        if not len(self.files) == len(self.true_counts) == len(self.predicted_counts):
            raise ValueError(
                f"one file, true count and prediction per image: got {len(self.files)} files, "
                f"{len(self.true_counts)} true counts and {len(self.predicted_counts)} predictions"
            )


@dataclass(frozen=True)
class Decision:
    """A pipeline's or a nightly's comparison of a challenger with the serving model, on the same test split, and its
    outcome. Made in one place: :mod:`bincount.registry` (``decide``, ``decision_without_test``).

    ``serving_*`` is what served when the decision was taken (re-read under the endpoint's lock);
    ``outcome`` says what became of the challenger. ``comparison`` is the paired test the decision rests on (its
    verdict, intervals, exact McNemar p-value and discordant counts) at ``confidence``; None where no comparison
    was made (nothing served yet, nothing new, or the quality gate rejected the challenger first).
    """

    endpoint_name: str
    promoted: bool
    reason: str
    metric: str
    challenger_score: float
    serving_score: float | None
    margin: float
    challenger_model_uri: str
    serving_model_uri: str | None
    decided_at: str = ""
    challenger_version: int | None = None
    serving_version: int | None = None
    outcome: DecisionOutcome | Literal[""] = ""
    confidence: float | None = None
    comparison: PairedComparison | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def with_outcome(self, outcome: DecisionOutcome, reason: str | None = None) -> Decision:
        """This decision with ``outcome`` (promoted only when it is ``promoted``) and, if given, another reason."""
        return replace(self, outcome=outcome, promoted=outcome == "promoted", reason=reason or self.reason)


@dataclass(frozen=True)
class BestHyperparameters:
    """The hyperparameters of the best model that passed the gate, the job that used them and its scores."""

    hyperparameters: dict[str, Any]
    job_name: str
    score: dict[str, Any]
    saved_at: str = ""
    version: int | None = None


class RegistryMirror(Protocol):
    """Another registry that holds the same versions (SageMaker Model Registry on profile ``aws``)."""

    def publish(self, version: ModelVersion) -> dict[str, str]:
        """Register ``version`` there if it is not yet (retries are safe); what identifies it there (an ARN)."""
        ...

    def set_approval(self, version: ModelVersion, approval: ApprovalStatus, reason: str) -> None:
        """Set the approval of a version ``publish`` registered (``version.mirror`` says where)."""
        ...


class ModelRegistry(Protocol):
    """Versions of model groups, their stages and approvals, best hyperparameters and nightly decisions."""

    def register(self, group: str, spec: ModelVersionSpec) -> ModelVersion:
        """A new version (the next number), or the existing one if this model (URI and sha256) is registered."""
        ...

    def get(self, group: str, version: int) -> ModelVersion:
        """Raises :class:`VersionNotFoundError`."""
        ...

    def resolve(self, reference: str | VersionRef) -> ModelVersion:
        """The version ``bincount:3``, ``bincount:latest`` or ``bincount:production`` names."""
        ...

    def list(self, group: str | None = None) -> list[ModelVersion]:
        """Every version of ``group`` (of every group when None), by group and number."""
        ...

    def groups(self) -> list[str]: ...

    def production(self, group: str) -> ModelVersion | None:
        """The version in production, or None when none ever was."""
        ...

    def previous_production(self, group: str) -> ModelVersion:
        """The version to roll back to: the latest earlier production version not rejected.

        Raises:
            NoPreviousProductionError: there is none.
        """
        ...

    def transition(self, group: str, version: int, stage: Stage, actor: str, reason: str) -> ModelVersion:
        """Move a version to ``stage``; production needs an approved version that no hold matches.

        Raises:
            ProductionVersionError: ``version`` is in production and ``stage`` is not (another must take its place).
            HeldVersionError: to production, a version that matches a held one.
        """
        ...

    def check_promotable(self, version: ModelVersion) -> None:
        """Raise unless ``version`` may go to production: approved (:class:`InvalidTransitionError`) and matching no
        held version (:class:`HeldVersionError`)."""
        ...

    def approve(self, group: str, version: int, actor: str, reason: str) -> ModelVersion: ...

    def reject(self, group: str, version: int, actor: str, reason: str) -> ModelVersion:
        """Raises :class:`ProductionVersionError` for the production version."""
        ...

    def held_by(self, group: str, spec: ModelVersionSpec) -> ModelVersion | None:
        """The held version ``spec`` matches (:meth:`ModelVersion.matches`), or None."""
        ...

    def release_hold(self, group: str, version: int, actor: str, reason: str) -> ModelVersion:
        """A person lifts the hold a rollback put on ``version``."""
        ...

    def find_by_digest(self, group: str, model_sha256: str) -> ModelVersion | None:
        """The earliest version of ``group`` whose model has this sha256."""
        ...

    def find_by_model_uri(self, group: str, model_uri: str) -> ModelVersion | None:
        """The latest version of ``group`` whose model is at ``model_uri``."""
        ...

    def save_best_hyperparameters(
        self,
        group: str,
        hyperparameters: dict[str, Any],
        job_name: str,
        score: dict[str, Any],
        version: int | None = None,
        metric: str = PROMOTION_METRIC,
    ) -> bool:
        """Keep these hyperparameters if they beat the stored ones on ``metric``; True when kept.

        Call it only for a model that passed the quality gate.
        """
        ...

    def best_hyperparameters(self, group: str) -> BestHyperparameters | None: ...

    def record(self, decision: Decision) -> None:
        """Keep a promotion decision (the group is its endpoint name)."""
        ...

    def decisions(self, group: str) -> list[Decision]: ...
