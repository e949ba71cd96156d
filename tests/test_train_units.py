"""Pure parts of training: search space, tuner bookkeeping, pruning, scores, rules on known losses, job names."""

from __future__ import annotations

import logging
import math
import re
import shutil

import optuna
import pytest
from sagemaker.parameter import CategoricalParameter, ContinuousParameter, IntegerParameter

from bincount.contracts.naming import job_name
from bincount.contracts.training import DEBUGGER_RULES, TrainingJob, TrainingJobSpec
from bincount.contracts.tuning import SEEDS_SEARCH_SPACE, TrialSpec, space_from_dicts
from bincount.debugger_rules import check_rules, loss_not_decreasing, overfit, overtraining
from bincount.evaluation import evaluate_model, score_counts
from bincount.local.training import hyperparameter_flags
from bincount.local.tuning import LocalTuner, suggest
from bincount.models import pack_folder, write_untrained_model_dir
from bincount.sagemaker.tuning import sagemaker_ranges
from bincount.storage import Storage
from flows.train import TrainOptions, fixed_hyperparameters
from sm_scripts.metric_format import METRIC_DEFINITIONS, OBJECTIVE_METRIC
from sm_scripts.networks import build_model
from sm_scripts.train import check_flags, get_args_parser
from tasks.train import log_line


def test_seeds_space_for_optuna_and_sagemaker() -> None:
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1))
    for _ in range(20):
        values = suggest(study.ask(), SEEDS_SEARCH_SPACE)
        assert 0.01 <= values["lr"] <= 0.1
        assert values["batch-size"] in (32, 64, 128)
        assert isinstance(values["epochs"], int) and 1 <= values["epochs"] <= 10
    ranges = sagemaker_ranges(SEEDS_SEARCH_SPACE)
    assert isinstance(ranges["lr"], ContinuousParameter) and ranges["lr"].scaling_type == "Logarithmic"
    assert ranges["lr"].as_tuning_range("lr")["MinValue"] == "0.01"
    assert isinstance(ranges["batch-size"], CategoricalParameter) and ranges["batch-size"].values == ["32", "64", "128"]
    assert isinstance(ranges["epochs"], IntegerParameter) and ranges["epochs"].max_value == 10
    assert {d["Name"] for d in METRIC_DEFINITIONS} >= {OBJECTIVE_METRIC, "eval:rmse", "train:loss"}


def test_space_from_dicts_names_a_bad_entry() -> None:
    space = space_from_dicts([{"type": "categorical", "name": "batch-size", "values": [16, 32]}])
    assert space[0].values == (16, 32)
    with pytest.raises(ValueError, match="needs a type"):
        space_from_dicts([{"name": "lr", "low": 0.1, "high": 0.2}])
    with pytest.raises(ValueError, match="search-space entry"):
        space_from_dicts([{"type": "integer", "name": "epochs", "lowest": 1}])


def job(number: int, accuracies: list[float], status: str = "Completed") -> TrainingJob:
    history = [{"epoch": e, OBJECTIVE_METRIC: a} for e, a in enumerate(accuracies, start=1)]
    return TrainingJob(
        name=job_name("trial", "run", number),
        status=status,
        hyperparameters={},
        metric_history=history,
        metrics={"epoch": len(history), OBJECTIVE_METRIC: max(accuracies)},
    )


def test_tuner_keeps_searching_after_failures_and_ranks() -> None:
    tuner = LocalTuner(SEEDS_SEARCH_SPACE, max_jobs=5, max_parallel_jobs=2, seed=0)
    first = tuner.ask()
    assert len(first) == 2 and tuner.ask() == []  # both slots taken
    tuner.tell(first[0].number, failure="exit code 1: boom")
    tuner.tell(first[1].number, job=job(1, [0.2, 0.3, 0.4]))
    second = tuner.ask()
    assert len(second) == 2
    tuner.tell(second[0].number, job=job(2, [0.3, 0.5]))
    tuner.tell(second[1].number, job=job(3, [0.1], status="Stopped"))
    last = tuner.ask()
    assert len(last) == 1 and tuner.ask() == []  # the budget is 5 jobs, failed ones included
    assert last[0].prune_below == {2: 0.4}  # median at epoch 2 over trials that reached it (warm-up epoch 1 exempt)
    tuner.tell(last[0].number, job=job(4, [0.25]))
    assert tuner.finished
    board = tuner.leaderboard()
    assert [r.status for r in board] == ["Completed", "Completed", "Completed", "Stopped", "Failed"]
    assert [r.objective for r in board[:3]] == [0.5, 0.4, 0.25]
    assert tuner.best().objective == 0.5 and board[-1].failure_reason == "exit code 1: boom"


def test_all_failed_trials_explain_themselves() -> None:
    tuner = LocalTuner(SEEDS_SEARCH_SPACE, max_jobs=1)
    tuner.tell(tuner.ask()[0].number, failure="out of memory")
    with pytest.raises(RuntimeError, match="out of memory"):
        tuner.best()


def test_a_trial_stops_below_the_median_bar() -> None:
    job_spec = TrainingJobSpec(
        name=job_name("trial", "run", 0), hyperparameters={}, channels={}, output_uri="file:///x"
    )
    stop = TrialSpec(0, {}, job_spec, OBJECTIVE_METRIC, prune_below={2: 0.4}).should_stop
    assert not stop([{"epoch": 1, OBJECTIVE_METRIC: 0.0}])  # no bar at epoch 1
    assert stop([{"epoch": 1, OBJECTIVE_METRIC: 0.5}, {"epoch": 2, OBJECTIVE_METRIC: 0.3}])
    assert not stop([{"epoch": 1, OBJECTIVE_METRIC: 0.5}, {"epoch": 2, OBJECTIVE_METRIC: 0.45}])
    assert stop([{"epoch": 2, OBJECTIVE_METRIC: math.nan}])


def test_score_counts_against_hand_computed_values() -> None:
    truth = [1, 2, 3, 4, 5, 5]
    predicted = [1, 3, 3, 2, 5, 4]
    scores = score_counts(truth, predicted, [1, 2, 3, 4, 5])
    assert scores.accuracy == pytest.approx(3 / 6)
    assert scores.rmse == pytest.approx(math.sqrt((0 + 1 + 0 + 4 + 0 + 1) / 6))
    assert scores.within_one_accuracy == pytest.approx(5 / 6)
    assert scores.per_class_accuracy == {"1": 1.0, "2": 0.0, "3": 1.0, "4": 0.0, "5": 0.5}
    assert scores.confusion[3] == [0, 1, 0, 0, 0] and scores.confusion[4] == [0, 0, 0, 1, 1]
    with pytest.raises(ValueError, match="as many predictions"):
        score_counts([1, 2], [1], [1, 2])


def phases(*epochs: tuple[list[float], list[float]]) -> list[tuple[str, list[float]]]:
    out = []
    for train, evaluation in epochs:
        out += [("TRAIN", train), ("EVAL", evaluation)]
    return out


def test_loss_rules_on_known_curves() -> None:
    falling = phases(
        ([2.0, 1.9, 1.8], [1.9]),
        ([1.5, 1.4, 1.3], [1.6]),
        ([1.0, 0.9, 0.8], [1.7]),
        ([0.5, 0.4, 0.3], [1.8]),
        ([0.2, 0.1, 0.1], [2.0]),
    )
    flat, nan = phases(([1.6, 1.6, 1.6], [1.6]), ([1.6, 1.61, 1.6], [1.6])), phases(([1.6, math.nan], [1.6]))
    assert loss_not_decreasing(falling, **DEBUGGER_RULES["loss_not_decreasing"]).status == "passed"
    assert loss_not_decreasing(flat, **DEBUGGER_RULES["loss_not_decreasing"]).status == "fired"
    assert loss_not_decreasing(nan, **DEBUGGER_RULES["loss_not_decreasing"]).status == "fired"
    assert overfit(falling, **DEBUGGER_RULES["overfit"]).status == "fired"
    close = phases(([1.0], [1.05]), ([0.9], [0.95]), ([0.8], [0.9]))
    assert overfit(close, **DEBUGGER_RULES["overfit"]).status == "passed"
    spike = phases(([1.7, 1.5], [35.0]), ([1.3, 1.2], [1.25]), ([1.1, 1.0], [1.08]), ([0.9, 0.9], [0.95]))
    healthy = overfit(spike, **DEBUGGER_RULES["overfit"])
    assert healthy.status == "passed" and "2 warm-up" in healthy.evidence, (
        "a first-epoch spike is warm-up, not overfitting"
    )
    assert overfit(spike, **DEBUGGER_RULES["overfit"], warmup_epochs=0).status == "fired"
    demo = phases(([1.79], [15.9]), ([1.53], [2.80]), ([1.22], [1.73]), ([1.14], [1.26]), ([0.76], [0.99]))
    assert overfit(demo, **DEBUGGER_RULES["overfit"]).status == "passed", "the demo's own curve: healthy"
    gap = phases(([1.7], [35.0]), ([1.2], [1.3]), ([1.0], [1.8]))
    assert overfit(gap, **DEBUGGER_RULES["overfit"]).status == "fired", "a real gap after warm-up"
    diverged = overfit(phases(([6e21], [math.nan]), ([math.nan], [math.nan])), **DEBUGGER_RULES["overfit"])
    assert diverged.status == "not_evaluated" and "not finite" in diverged.evidence, "NaN never passes"
    fired = overtraining(falling, **DEBUGGER_RULES["overtraining"])
    assert fired.status == "fired" and "best at epoch 2" in fired.evidence
    improving = phases(*[([1.0 - e / 10], [1.1 - e / 10]) for e in range(5)])
    assert overtraining(improving, **DEBUGGER_RULES["overtraining"]).status == "passed"
    assert overtraining(phases(([1.0], [1.0])), **DEBUGGER_RULES["overtraining"]).status == "not_evaluated"


def test_job_names_are_stable_per_run_and_distinct_across_runs() -> None:
    run, other = "0b7e1f0c-run-a", "6f1d2c9e-run-b"
    name = job_name("trial", run, 3)
    assert re.fullmatch(r"bincount-trial-[0-9a-f]{10}", name) and name == job_name(
        "trial", run, 3
    )  # a retry finds its job
    assert name != job_name("trial", other, 3)  # another flow run never shares it
    assert len({name, job_name("trial", run, 4), job_name("final", run), job_name("tune", run)}) == 4
    assert job_name("transform", run, "s3://b/in-a") != job_name("transform", run, "s3://b/in-b")


def test_job_names_follow_sagemaker_rules() -> None:
    long = job_name("hyperparameter-tuning-of-the-bin-counter", "run", kind="tuning")
    assert len(long) == 32 and long.startswith("bincount-hyper") and long[-11:] == "-" + job_name("x", "run")[-10:]
    assert len(job_name("x" * 100, "run")) == 63
    assert job_name("a_b  c", "run").startswith("bincount-a-b-c-")
    assert all(
        re.fullmatch(r"[a-zA-Z0-9](-*[a-zA-Z0-9]){0,62}", job_name(s, "run")) for s in ("t", "-x-", "a--b", "Ü ber")
    )
    with pytest.raises(ValueError, match="give a stage"):
        job_name("__", "run")


def test_local_tuning_backend_runs_rounds_through_the_given_runner() -> None:
    """The flow hands the backend a runner (one task run per trial); here, one that 'trains' instantly."""
    from bincount.contracts.tuning import TuningSpec
    from bincount.local.tuning import LocalTuningBackend

    spec = TuningSpec(
        name=job_name("tune", "run", kind="tuning"),
        space=SEEDS_SEARCH_SPACE,
        static_hyperparameters={"arch": "resnet18"},
        channels={"train": "file:///t", "valid": "file:///v"},
        output_uri="file:///jobs",
        max_jobs=5,
        max_parallel_jobs=2,
        objective_metric=OBJECTIVE_METRIC,
    )
    rounds: list[list[int]] = []

    def run_trials(trials: list[TrialSpec]) -> list[TrainingJob | BaseException]:
        rounds.append([trial.number for trial in trials])
        assert all(
            trial.job.hyperparameters["arch"] == "resnet18" and trial.job.name.startswith("bincount-trial-")
            for trial in trials
        )
        return [
            RuntimeError("boom") if trial.number == 1 else job(trial.number, [trial.hyperparameters["lr"]])
            for trial in trials
        ]

    result = LocalTuningBackend().tune(spec, run_trials)
    assert rounds == [[0, 1], [2, 3], [4]]
    objectives = [trial.objective for trial in result.trials if trial.status == "Completed"]
    assert objectives == sorted(objectives, reverse=True) and result.trials[-1].status == "Failed"
    assert result.best_objective == objectives[0] and result.best_hyperparameters["arch"] == "resnet18"
    assert result.counters == {"Completed": 4, "Failed": 1}


def test_evaluation_reads_a_model_folder_as_deploy_does(demo_channels, tmp_path) -> None:
    """The nightly scores the serving model, which deploy may have been given as a folder."""
    folder = write_untrained_model_dir(tmp_path / "model", "resnet18", 32, seed=5)
    archive = pack_folder(folder, tmp_path / "model.tar.gz")
    test_channel = demo_channels["test"].as_uri()
    from_folder = evaluate_model(Storage(), folder.as_uri(), test_channel)
    assert from_folder.images == 40
    assert from_folder == evaluate_model(Storage(), archive.as_uri(), test_channel)


def test_the_same_weights_read_another_way_are_another_version_and_fetched_with_their_own_info(tmp_path) -> None:
    import json

    from bincount.models import fetch_model

    mode = write_untrained_model_dir(tmp_path / "mode", "resnet18", 32, seed=5)
    median = tmp_path / "median"
    shutil.copytree(mode, median)
    info = json.loads((median / "model_info.json").read_text())
    (median / "model_info.json").write_text(json.dumps({**info, "decoding": "median"}))
    cache = tmp_path / "cache"
    (mode_dir, mode_version), (median_dir, median_version) = (
        fetch_model(Storage(), folder.as_uri(), cache) for folder in (mode, median)
    )
    assert mode_version != median_version and mode_dir != median_dir
    assert json.loads((median_dir / "model_info.json").read_text())["decoding"] == "median"
    assert fetch_model(Storage(), median.as_uri(), cache)[1] == median_version, "a version names the content"


def test_the_cache_key_of_a_local_channel_changes_when_a_photo_is_replaced_by_one_of_the_same_size(
    demo_channels, tmp_path
) -> None:
    from bincount.config import Settings
    from tasks.caching import listing

    channel = tmp_path / "train"
    shutil.copytree(demo_channels["train"], channel)
    settings = Settings.load(artifact_root=str(tmp_path / "art"))
    before = listing(settings, channel.as_uri())
    first, second = sorted(channel.glob("1/*.jpg"))[:2]
    same_size = second.read_bytes()[: first.stat().st_size].ljust(first.stat().st_size, b"\0")
    first.write_bytes(same_size)
    after = listing(settings, channel.as_uri())
    assert [(uri, size) for uri, size, _ in after] == [(uri, size) for uri, size, _ in before]
    assert after != before


def test_the_gradient_and_initialization_rules_fire_on_a_network_that_cannot_learn(tmp_path) -> None:
    """All-zero weights, saved by train.py's own smdebug hook: no gradient reaches the first layer,
    and its weights span nothing. Both rules must fire (a healthy job passes them: test_train_backend)."""
    import torch
    from smdebug import modes

    from sm_scripts.monitoring import make_debugger_hook

    torch.manual_seed(0)
    network = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 5))
    for parameter in network.parameters():
        torch.nn.init.zeros_(parameter)
    criterion = torch.nn.CrossEntropyLoss()
    hook = make_debugger_hook(network, criterion, str(tmp_path / "tensors"), save_interval=1)
    hook.set_mode(modes.TRAIN)
    optimizer = torch.optim.SGD(network.parameters(), lr=0.1)
    for _ in range(3):
        optimizer.zero_grad()
        criterion(network(torch.randn(4, 8)), torch.tensor([0, 1, 2, 3])).backward()
        optimizer.step()
    hook.close()

    rules = {rule.rule: rule for rule in check_rules(tmp_path / "tensors")}
    assert rules["vanishing_gradient"].status == "fired", rules["vanishing_gradient"].evidence
    assert rules["poor_weight_initialization"].status == "fired", rules["poor_weight_initialization"].evidence
    assert "spans only 0" in rules["poor_weight_initialization"].evidence


def test_tool_chatter_goes_to_debug_and_blank_lines_are_dropped() -> None:
    logged: list[tuple[int, str]] = []

    class Recorder(logging.Logger):
        def log(self, level: int, msg: object, *args: object, **kwargs: object) -> None:
            logged.append((level, str(msg)))

    sink = log_line(Recorder("job"))
    for line in (
        "USDT:2026-11-30 20:01:47 1460:1460 SyncActivityProfilerHandler.cpp:39] profiler_start",
        "ERROR:2026-11-30 20:01:47 1460:1460 DeviceProperties.cpp:56] gpuGetDeviceCount failed with code 35",
        "[W1130 20:01:47.795917393 CPUAllocator.cpp:245] Memory block of unknown size was allocated before the "
        "profiling started",
        "[2026-11-30 19:58:00.740 vm:29867 INFO utils.py:28] RULE_JOB_STOP_SIGNAL_FILENAME: None",
        "",
        "epoch: 1 train_loss: 1.9765 train_acc: 0.2500 eval_loss: 1.6016 eval_acc: 0.2000",
        "ERROR: weights file /tmp/missing.pt does not exist",
    ):
        sink(line)
    assert [level for level, _ in logged] == [logging.DEBUG] * 4 + [logging.INFO] * 2


@pytest.mark.parametrize("recipe", ["best", "seeds"])
def test_each_recipe_is_a_train_py_command_line_at_both_ends_of_its_search_space(recipe: str) -> None:
    """The flows' recipes, as the local backend spells them for train.py, parse and pass its checks, and
    ``seeds`` is the seed projects' setup while ``best`` is the measured one (offline ImageNet start)."""
    options = TrainOptions(recipe=recipe)
    space = space_from_dicts(options.search_space) if options.search_space else SEEDS_SEARCH_SPACE
    assert (options.arch, options.weights) == (
        ("efficientnet_lite1", "imagenet") if recipe == "best" else ("resnet50", "none")
    )
    for end in ("low", "high"):
        trial = {
            parameter.name: getattr(parameter, end) if hasattr(parameter, end) else parameter.values[-1]
            for parameter in space
        }
        flags = hyperparameter_flags({**fixed_hyperparameters(options), **trial, "train-dir": "t", "valid-dir": "v"})
        args = get_args_parser().parse_args(flags)
        assert check_flags(args) == (["train"], {"train": "t", "valid": "v"})
        assert build_model(args.arch, 5, args.weights).training  # the weights load offline


def test_a_field_given_beside_the_seeds_recipe_wins_and_the_rest_is_the_seeds() -> None:
    options = TrainOptions(recipe="seeds", arch="resnet18", image_size=64)
    assert (options.arch, options.image_size, options.weights, options.max_jobs) == ("resnet18", 64, "none", 8)
    assert options.search_space is None and options.hyperparameters == {}
    assert TrainOptions(**options.model_dump()) == options  # what the registry stores reads back the same
