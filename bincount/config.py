"""Settings shared by every stage: profile, artifact root, data source, S3 endpoint.

Values come, in this order of precedence, from flow parameters (``Settings.load(**overrides)``),
environment variables prefixed ``BINCOUNT_`` (``BINCOUNT_ARTIFACT_ROOT=s3://my-bucket/bincount``),
and the defaults below. Every location is a URI (``file://`` or ``s3://``); a plain path is
accepted and turned into a ``file://`` URI.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlparse

from pydantic import BaseModel, Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

Profile = Literal["local", "aws"]

ABID_BUCKET_URI = "s3://aft-vbi-pds"


class SettingsError(ValueError):
    """A setting has a value the project cannot use; the message says which and how to fix it."""


def to_uri(location: str) -> str:
    """Return ``location`` as a ``file://`` or ``s3://`` URI (plain paths become absolute file URIs)."""
    location = location.strip()
    if not location:
        raise SettingsError("an empty string is not a location: give a path, file:// URI or s3:// URI")
    parsed = urlparse(location)
    if parsed.scheme == "s3":
        if not parsed.netloc:
            raise SettingsError(f"{location!r} names no bucket: write s3://<bucket>/<prefix>")
        return location.rstrip("/")
    if parsed.scheme == "file":
        return Path(parsed.path).resolve().as_uri()
    if parsed.scheme == "" or len(parsed.scheme) == 1:  # a relative path, or a Windows drive letter
        return Path(location).expanduser().resolve().as_uri()
    raise SettingsError(f"{location!r} has scheme {parsed.scheme!r}: only file:// and s3:// are supported")


class Settings(BaseSettings):
    """Where the project reads and writes, and which backend runs the heavy stages."""

    model_config = SettingsConfigDict(env_prefix="BINCOUNT_", extra="forbid", validate_default=True)

    profile: Profile = Field(
        default="local",
        description="`local` runs every stage on this machine; `aws` runs training, tuning, "
        "endpoints and batch transform as SageMaker jobs.",
    )
    artifact_root: str = Field(
        default_factory=lambda: (Path.cwd() / ".bincount").as_uri(),
        description="URI under which datasets, models, endpoints and reports are kept "
        "(default: .bincount in the working directory).",
    )
    data_dir: Path = Field(
        default_factory=lambda: Path.cwd() / ".bincount" / "raw",
        description="Local folder that holds downloaded images (a cache: safe to delete).",
    )
    source_uri: str = Field(
        default=ABID_BUCKET_URI,
        description="Bucket (and prefix) laid out like the ABID bucket: bin-images/<id>.jpg, metadata/<id>.json.",
    )
    source_anonymous: bool = Field(
        default=True,
        description="Read the source bucket without credentials (the public ABID bucket needs none).",
    )
    s3_endpoint_url: str | None = Field(
        default=None,
        description="S3-compatible endpoint (MinIO, LocalStack, a test server); unset means AWS.",
    )
    aws_region: str | None = Field(default=None, description="AWS region; unset means the default chain.")

    @field_validator("artifact_root", "source_uri")
    @classmethod
    def _must_be_uri(cls, value: str) -> str:
        return to_uri(value)

    @field_validator("s3_endpoint_url")
    @classmethod
    def _must_be_http(cls, value: str | None) -> str | None:
        if value in (None, ""):
            return None
        parsed = urlparse(value)
        if parsed.scheme not in ("http", "https") or not parsed.netloc:
            raise SettingsError(f"s3_endpoint_url {value!r} must look like http://host:port or https://host")
        return value.rstrip("/")

    @classmethod
    def load(cls, **overrides: Any) -> Settings:
        """Build settings from the environment, with the non-None ``overrides`` on top.

        Raises:
            SettingsError: naming each bad setting, its value and what is expected.
        """
        given = {key: value for key, value in overrides.items() if value is not None}
        try:
            return cls(**given)
        except ValidationError as error:
            problems = "; ".join(
                f"{'.'.join(str(part) for part in problem['loc']) or 'settings'}: {problem['msg']}"
                for problem in error.errors()
            )
            raise SettingsError(
                f"invalid settings ({problems}). Fix the flow parameter or the BINCOUNT_* variable."
            ) from None

    def artifact_uri(self, *parts: str) -> str:
        """A URI under the artifact root."""
        return "/".join([self.artifact_root.rstrip("/"), *(part.strip("/") for part in parts)])


class Location(BaseModel):
    """The settings as flow parameters: each one given here wins over its ``BINCOUNT_*`` variable.

    A flow resolves its location once (:meth:`settings`) and hands the result down: subflows get
    the :class:`Settings` object, or, where they are deployable flows of their own,
    ``Location.of(settings)`` with every value filled in, so they resolve to the very same settings.
    """

    profile: Profile | None = Field(
        default=None, description="`local` or `aws` (default: BINCOUNT_PROFILE, else local)."
    )
    artifact_root: str | None = Field(
        default=None,
        description="URI for datasets, models and records (default: BINCOUNT_ARTIFACT_ROOT, else ./.bincount).",
    )
    data_dir: str | None = Field(
        default=None, description="Local download cache (default: BINCOUNT_DATA_DIR, else ./.bincount/raw)."
    )
    source_uri: str | None = Field(
        default=None, description="Bucket laid out like ABID (default: BINCOUNT_SOURCE_URI, else s3://aft-vbi-pds)."
    )
    source_anonymous: bool | None = Field(
        default=None, description="Read the source without credentials (default: true)."
    )
    s3_endpoint_url: str | None = Field(
        default=None, description="S3-compatible endpoint: MinIO, LocalStack (default: AWS)."
    )
    aws_region: str | None = Field(default=None, description="AWS region (default: the AWS default chain).")

    def settings(self) -> Settings:
        """The settings: these values over the ``BINCOUNT_*`` variables over the defaults.

        Raises:
            SettingsError: naming each bad value and what it expects.
        """
        return Settings.load(**self.model_dump())

    @classmethod
    def of(cls, settings: Settings) -> Location:
        """Every value of ``settings``, for a subflow that takes a location."""
        return cls(**settings.model_dump(mode="json"))
