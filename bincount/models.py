"""Model directories (docs/CONTRACTS.md): fetch one from a URI, pack one, read a file of an archive, name a version.

A model URI is a ``model.tar.gz`` (files at the archive root, as SageMaker packs them) or a folder
holding ``model.pt`` and ``model_info.json``, on ``file://`` or ``s3://``. Serving and batch
transform read a local folder, so :func:`fetch_model` unpacks into a cache keyed by the model's
bytes: the same model is fetched once, a changed one under the same URI is fetched again.
"""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import tarfile
import tempfile
from pathlib import Path

from bincount.storage import Storage, file_digest, join_uri
from sm_scripts.model_dir import INFO_FILE, MODEL_FILE, model_info, write_model_dir
from sm_scripts.networks import build_model
from sm_scripts.optimized import OPTIMIZED_FILES

MODEL_FILES = (MODEL_FILE, INFO_FILE)


class ModelDirError(ValueError):
    """A model URI does not hold a model directory as docs/CONTRACTS.md describes it."""


def _check_model_dir(path: Path, uri: str) -> None:
    missing = [name for name in MODEL_FILES if not (path / name).is_file()]
    if missing:
        raise ModelDirError(f"{uri} lacks {missing}: a model holds model.pt and model_info.json (docs/CONTRACTS.md)")


def fetch_model(storage: Storage, model_uri: str, cache_dir: Path) -> tuple[Path, str]:
    """Make the model at ``model_uri`` a local folder; return ``(folder, version)``.

    ``version`` (:func:`model_version`) names the model's content, whatever URI it came from.

    Raises:
        ModelDirError: the URI holds no model.pt and model_info.json, or the archive is unsafe.
    """
    cache_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache_dir, prefix=".fetch-") as scratch:
        staging = Path(scratch) / "model"
        staging.mkdir()
        if model_uri.rstrip("/").endswith((".tar.gz", ".tgz")):
            data = storage.read_bytes(model_uri)
            try:
                with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as archive:
                    archive.extractall(staging, filter="data")  # refuses absolute paths, .., devices, links out
            except (tarfile.TarError, OSError, EOFError) as error:
                raise ModelDirError(f"{model_uri} is not a readable model.tar.gz ({error})") from None
        else:
            for name in MODEL_FILES:
                storage.download_file(join_uri(model_uri, name), staging / name)
            if "optimized" in json.loads((staging / INFO_FILE).read_text()):
                for name in OPTIMIZED_FILES:
                    storage.download_file(join_uri(model_uri, name), staging / name)
        _check_model_dir(staging, model_uri)
        version = model_version(staging)
        target = cache_dir / version
        if not (target / "model.pt").is_file():
            shutil.rmtree(target, ignore_errors=True)
            staging.rename(target)
    return target, version


def model_version(model_dir: Path) -> str:
    """First 12 hex digits of the SHA-256 of the digests of ``model.pt``, ``model_info.json`` and any
    optimized form's files. The info is part of it: the same weights read another way (another decoding,
    image size or classes) are another model; the optimized archive is another version than the eager
    one it was made from. Each version is fetched into its own folder."""
    digests = [file_digest(model_dir / name) for name in MODEL_FILES]
    digests += [file_digest(model_dir / name) for name in OPTIMIZED_FILES if (model_dir / name).is_file()]
    return hashlib.sha256(" ".join(digests).encode()).hexdigest()[:12]


def pack_folder(folder: Path, archive: Path) -> Path:
    """``folder``'s files into a ``.tar.gz`` with the files at the archive root, as SageMaker packs ``model.tar.gz``."""
    archive.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(archive, "w:gz", compresslevel=1) as tar:  # weights barely compress: favour speed
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                tar.add(path, arcname=str(path.relative_to(folder)))
    return archive


def read_from_archive(storage: Storage, archive_uri: str, member: str) -> bytes:
    """One file out of a ``.tar.gz`` at ``archive_uri`` (``model.tar.gz`` or ``output.tar.gz``)."""
    with tarfile.open(fileobj=io.BytesIO(storage.read_bytes(archive_uri)), mode="r:gz") as archive:
        try:
            extracted = archive.extractfile(member)
        except KeyError:
            extracted = None
        if extracted is None:
            raise FileNotFoundError(f"{archive_uri} holds no file {member!r}")
        return extracted.read()


def write_untrained_model_dir(
    model_dir: Path,
    arch: str = "resnet18",
    image_size: int = 32,
    seed: int = 0,
    classes: tuple[int, ...] = (1, 2, 3, 4, 5),
) -> Path:
    """A randomly initialised model dir in the contract's format (train.py's network and files), for tests,
    benchmarks and smoke checks.

    Batch-norm statistics are measured on a few random normalised images, so activations have the
    scale of a trained network's (raw initial statistics give degenerate, unrepresentative numerics).
    """
    import torch

    torch.manual_seed(seed)
    network = build_model(arch, len(classes))
    for module in network.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.reset_running_stats()
            module.momentum = None  # a plain average over the calibration batches
    network.train()
    with torch.no_grad():
        for _ in range(2):
            network(torch.randn(8, 3, image_size, image_size))
    info = model_info(arch, list(classes), image_size, {"seed": seed})
    return write_model_dir(model_dir, network.eval().state_dict(), info)
