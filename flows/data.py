"""Flow: prepare the data for training.

    load-manifest -> download-images -> split-dataset -> validate-data -> upload-channels -> report-data

The stages cache on their inputs and source (results persisted), so an unchanged re-run is served
from cache; ``refresh=True`` runs every stage again. The split is never cached: it reads and appends
to the dataset's placement record (every id ever placed keeps its side, whatever a run lists) and
writes this run's view to ``split.csv``. The validation is taken again whenever that view changed, so
``validation.json`` always holds the statistics of the view in ``split.csv``. The upload is never
cached: an unchanged sync only lists the channels and compares checksums, and it is what guarantees
the channels match the split. Transient S3 failures are retried.
"""

from __future__ import annotations

from prefect import flow
from pydantic import BaseModel, ConfigDict, Field, field_validator

from bincount.config import Location, to_uri
from bincount.download import MAX_OBJECT_BYTES, Ledger
from bincount.split import SPLIT_FILE, SPLITS
from bincount.storage import join_uri, storage_for
from bincount.validation import ValidationThresholds
from tasks.download import download_images_task
from tasks.manifest import load_manifest
from tasks.report import report_data_task
from tasks.split import split_dataset_task
from tasks.summary import run_summary
from tasks.upload import upload_channels_task
from tasks.validate import validate_data_task


class DataOptions(BaseModel):
    """What to download and how to split it."""

    model_config = ConfigDict(frozen=True)

    manifest_uri: str | None = Field(
        default=None,
        description="Seed-format manifest (file_list.json): an s3:// or file:// URI or a path on the worker; "
        "default <source_uri>/file_list.json.",
    )
    image_ids: list[str] | None = Field(
        default=None, description="Instead of a manifest: ids to label from their metadata's EXPECTED_QUANTITY."
    )
    dataset: str = Field(
        default="abid",
        pattern=r"^[a-z0-9][a-z0-9_-]*$",
        description="Name of the dataset under <artifact_root>/datasets/.",
    )
    fractions: tuple[float, float, float] = Field(default=(0.8, 0.1, 0.1), description="Train, valid and test shares.")
    seed: int = Field(default=0, description="Seed of the split.")
    max_missing_share: float = Field(
        default=0.01, ge=0, le=1, description="Share of missing or corrupt images tolerated before the run fails."
    )
    concurrency: int = Field(default=32, ge=1, le=256, description="Downloads in flight at once.")
    max_object_bytes: int = Field(
        default=MAX_OBJECT_BYTES,
        ge=1,
        description="Largest image object downloaded; a larger one is listed (with its key) and skipped, never held.",
    )
    validation: ValidationThresholds = Field(
        default_factory=ValidationThresholds,
        description="Data validation: a failed check stops the run before training.",
    )

    @field_validator("manifest_uri")
    @classmethod
    def manifest_path_as_uri(cls, value: str | None) -> str | None:
        """A path (as a UI form or ``--param`` gives it) becomes the file:// URI storage reads."""
        return to_uri(value) if value is not None else None


class PreparedData(BaseModel):
    """Where the prepared dataset lives: what the training stage reads."""

    dataset: str
    split_uri: str
    channels: dict[str, str]
    images: int
    mean: list[float]
    std: list[float]


def data_figures(result: PreparedData) -> dict[str, str | int]:
    """The run summary's key figures."""
    return {"dataset": result.dataset, "images": result.images, "split": result.split_uri}


SUMMARY = run_summary(data_figures)


@flow(name="prepare-data", on_completion=[SUMMARY], on_failure=[SUMMARY])
def prepare_data(
    options: DataOptions = DataOptions(), location: Location = Location(), refresh: bool = False
) -> PreparedData:
    """Download the manifest's images, split them, sync the splits to their channels, report.

    Args:
        options: what to download and how to split it.
        location: the source bucket, where datasets are written, the S3 endpoint (default: the BINCOUNT_* variables).
        refresh: run every stage again instead of using cached results.
    """
    settings = location.settings()
    dataset_uri = settings.artifact_uri("datasets", options.dataset)
    split_uri = join_uri(dataset_uri, SPLIT_FILE)
    channels_uri = join_uri(dataset_uri, "channels")

    mirror_gone = not Ledger(settings.data_dir).path.is_file()  # a cached download is only good while its files are
    manifest = load_manifest(settings, options.manifest_uri, options.image_ids)
    _, downloaded = download_images_task.with_options(refresh_cache=refresh or mirror_gone)(
        settings, manifest, options.concurrency, options.max_missing_share, options.max_object_bytes
    )
    validation_gone = not storage_for(settings).exists(join_uri(dataset_uri, "validation.json"))
    split = split_dataset_task(settings, manifest, downloaded, dataset_uri, options.fractions, options.seed)
    split_table = split.table
    # A cached validation is only good while validation.json holds this view's statistics.
    validate_data_task.with_options(refresh_cache=refresh or split.changed or validation_gone)(
        settings, split_table, dataset_uri, options.validation
    )
    upload_channels_task(settings, split_table, channels_uri)
    report = report_data_task.with_options(refresh_cache=refresh)(settings, split_table)

    return PreparedData(
        dataset=options.dataset,
        split_uri=split_uri,
        channels={split: join_uri(channels_uri, split) for split in SPLITS},
        images=len(split_table),
        mean=report.mean,
        std=report.std,
    )
