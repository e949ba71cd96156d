"""Training input from a memory-mapped cache file: the same tensors as decoding, reused, rebuilt when it must be."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bincount.demo_data import write_demo_channels
from sm_scripts.data import ImageCache, batches, channel_files, load_channel
from sm_scripts.image_cache import cache_file
from sm_scripts.preprocessing import channel_values, load_image

ROOT = Path(__file__).resolve().parents[1]
CLASSES = ["1", "2", "3", "4", "5"]
SIZE = 24


@pytest.fixture
def channel(tmp_path: Path) -> Path:
    """A train channel of its own (tests here change it), 3 photos a count."""
    return write_demo_channels(tmp_path / "channels", per_class=3, size=48, seed=1)["train"]


def decoded(root: Path) -> tuple[torch.Tensor, list[int]]:
    """Every image of the channel decoded into memory, as training did before the cache file."""
    files, labels = channel_files(root, CLASSES)
    return torch.stack([load_image(path.read_bytes(), SIZE) for path in files]), labels


def mapped_file(tensor: torch.Tensor) -> str:
    """The file whose mapping holds the tensor's first byte (/proc/self/maps), or '' for anonymous memory."""
    address = tensor.data_ptr()
    for line in Path("/proc/self/maps").read_text().splitlines():
        span, _, _, _, _, *path = line.split(maxsplit=5)
        start, end = (int(bound, 16) for bound in span.split("-"))
        if start <= address < end:
            return path[0] if path else ""
    raise AssertionError(f"address {address:#x} is in no mapping of this process")


def test_the_cache_file_holds_the_decoded_tensors_and_labels(channel: Path, tmp_path: Path) -> None:
    images, labels = decoded(channel)
    cache = load_channel(channel, CLASSES, SIZE, threads=2, cache_dir=tmp_path / "cache")
    assert len(cache.parts) == 1 and torch.equal(cache.parts[0], images)
    assert cache.labels.tolist() == labels and cache.labels.dtype == torch.long
    assert cache.files == [str(path) for path in channel_files(channel, CLASSES)[0]]
    assert mapped_file(cache.parts[0]) == str(cache_file(tmp_path / "cache", channel, SIZE))


def test_a_private_cache_holds_the_same_tensors_and_leaves_no_file(channel: Path) -> None:
    images, _ = decoded(channel)
    cache = load_channel(channel, CLASSES, SIZE, threads=1)
    assert torch.equal(cache.parts[0], images)
    assert mapped_file(cache.parts[0]).endswith("channel.u8 (deleted)")


def test_a_second_open_reuses_the_file(channel: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    load_channel(channel, CLASSES, SIZE, threads=1, cache_dir=tmp_path / "cache")
    assert "decoding the 15 images" in capsys.readouterr().out
    path = cache_file(tmp_path / "cache", channel, SIZE)
    before = path.stat()
    again = load_channel(channel, CLASSES, SIZE, threads=1, cache_dir=tmp_path / "cache")
    after = path.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    assert capsys.readouterr().out == ""
    assert torch.equal(again.parts[0], decoded(channel)[0])


def test_a_changed_channel_is_decoded_again(channel: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    load_channel(channel, CLASSES, SIZE, threads=1, cache_dir=tmp_path / "cache")
    first, second = sorted((channel / "2").iterdir())[:2]
    shutil.copyfile(second, first)  # another photo under the same name
    os.utime(first, ns=(first.stat().st_atime_ns, first.stat().st_mtime_ns + 1_000_000))
    cache = load_channel(channel, CLASSES, SIZE, threads=1, cache_dir=tmp_path / "cache")
    assert "is stale (the channel or the preprocessing changed)" in capsys.readouterr().out
    assert torch.equal(cache.parts[0], decoded(channel)[0])


@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        (lambda path: os.truncate(path, path.stat().st_size - 100), "truncated"),
        (lambda path: path.write_bytes(b"not a cache" * 1000), "magic bytes"),
    ],
    ids=["truncated", "garbage"],
)
def test_a_damaged_cache_file_is_rebuilt_with_a_line_that_says_why(
    channel: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], damage, reason: str
) -> None:
    load_channel(channel, CLASSES, SIZE, threads=1, cache_dir=tmp_path / "cache")
    damage(cache_file(tmp_path / "cache", channel, SIZE))
    capsys.readouterr()
    cache = load_channel(channel, CLASSES, SIZE, threads=1, cache_dir=tmp_path / "cache")
    out = capsys.readouterr().out
    assert "is unreadable (" in out and reason in out and "so it is rebuilt" in out
    assert torch.equal(cache.parts[0], decoded(channel)[0])


def test_batches_over_two_mapped_channels_match_batches_over_them_in_memory(channel: Path, tmp_path: Path) -> None:
    valid = channel.parent / "valid"
    caches = [load_channel(root, CLASSES, SIZE, 1, tmp_path / "cache") for root in (channel, valid)]
    mapped = ImageCache.concat(caches)
    in_memory = ImageCache(torch.cat(mapped.parts), mapped.labels, mapped.files)
    mean, std = channel_values([0.5, 0.4, 0.3]), channel_values([0.2, 0.2, 0.2])
    drawn = [
        list(
            batches(
                cache,
                4,
                torch.device("cpu"),
                mean,
                std,
                True,
                augmentation="strong",
                generator=torch.Generator().manual_seed(3),
            )
        )
        for cache in (mapped, in_memory)
    ]
    assert len(drawn[0]) == len(drawn[1]) == 8
    for (x, y), (x_ref, y_ref) in zip(*drawn, strict=True):
        assert torch.equal(x, x_ref) and torch.equal(y, y_ref)


def test_processes_opening_one_channel_at_once_decode_it_once(channel: Path, tmp_path: Path) -> None:
    script = (
        "import sys; from pathlib import Path; from sm_scripts.data import load_channel; "
        f"load_channel(Path(sys.argv[1]), {CLASSES!r}, {SIZE}, 1, Path(sys.argv[2]))"
    )
    command = [sys.executable, "-c", script, str(channel), str(tmp_path / "cache")]
    processes = [subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [process.communicate(timeout=120)[0] for process in processes]
    assert [process.returncode for process in processes] == [0, 0]
    assert sum(out.count("decoding the 15 images") for out in outputs) == 1


def test_moving_the_images_copies_them_out_of_the_files(channel: Path, tmp_path: Path) -> None:
    valid = channel.parent / "valid"
    cache = ImageCache.concat([load_channel(root, CLASSES, SIZE, 1, tmp_path / "cache") for root in (channel, valid)])
    expected = torch.cat([decoded(channel)[0], decoded(valid)[0]])
    cache.to(torch.device("cpu"))
    assert cache.mapped == [] and not any(mapped_file(part).endswith(".u8") for part in cache.parts)
    assert torch.equal(torch.cat(cache.parts), expected)
