"""The `bincount` command: run the pipeline on the offline demo data, prepare a real dataset,
make demo data, look at or stop endpoints (`bincount endpoints ...`), or look after registered models
(`bincount models ...`).

Each command imports what it needs inside its own function, so `bincount --help`, the listings and
`describe` answer at once: they load neither Prefect nor torch (benchmarks/cli_latency.py measures them).
"""

from __future__ import annotations

import argparse
import getpass
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # for the annotations only
    from bincount.config import Settings
    from bincount.contracts.registry import ModelVersion
    from bincount.contracts.serving import EndpointRecord, Rollout, RolloutStrategy
    from bincount.registry import StorageModelRegistry
    from flows.pipeline import PipelineResult
    from flows.train import TrainOptions


def demo_bucket(settings: Settings, images: int, seed: int) -> str:
    """The demo bucket under the artifact root, generated on first use; returns its URI."""
    from bincount.demo_data import generate_demo_bucket
    from bincount.storage import join_uri, storage_for

    bucket_uri = settings.artifact_uri("demo-bucket")
    storage = storage_for(settings)
    if not storage.exists(join_uri(bucket_uri, "file_list.json")):
        print(f"Generating {images} synthetic bin photos at {bucket_uri} (seed {seed})")
        generate_demo_bucket(storage, bucket_uri, images=images, seed=seed)
    return bucket_uri


def demo_training_options() -> TrainOptions:
    """The seeds' recipe, small enough for a laptop CPU in a few minutes (ResNet-18 from scratch at 64 px);
    the default recipe (EfficientNet-Lite1 fine-tuned from ImageNet at 192 px) is for real photos."""
    from flows.train import TrainOptions

    return TrainOptions(
        recipe="seeds",
        arch="resnet18",
        image_size=64,
        max_jobs=3,
        hyperparameters={"optimizer": "adamw", "lr-scheduler": "cosine"},
        search_space=[
            {"type": "continuous", "name": "lr", "low": 0.001, "high": 0.01, "scaling": "Logarithmic"},
            {"type": "categorical", "name": "batch-size", "values": [32, 64]},
            {"type": "integer", "name": "epochs", "low": 4, "high": 8},
        ],
    )


# --- bincount endpoints -----------------------------------------------------------------------
def health(record: EndpointRecord) -> str:
    """What the endpoint's ``/ping`` says right now (a local endpoint's router answers it)."""
    import httpx

    try:
        answer = httpx.get(f"{record.url.rstrip('/')}/ping", timeout=3.0)
    except httpx.HTTPError as error:
        return f"not answering ({type(error).__name__})"
    if answer.status_code != 200:
        return f"not healthy (HTTP {answer.status_code})"
    body = answer.json()
    serving = f"{body.get('status', 'Healthy')}, serving {body.get('model_version') or body.get('weights') or '?'}"
    return f"{serving}, scaled to zero (the next request starts a host)" if body.get("scaled_to_zero") else serving


def list_endpoints(settings: Settings) -> str:
    rows = [
        [
            record.name,
            record.model_ref or "-",
            record.backend,
            record.url,
            record.deployed_at[:19].replace("T", " "),
            health(record),
        ]
        for record in endpoint_records(settings)
    ]
    return (
        format_table(["endpoint", "model version", "backend", "URL", "deployed (UTC)", "health"], rows)
        if rows
        else "No endpoints."
    )


def describe_endpoint(record: EndpointRecord) -> str:
    lines = [
        f"endpoint         {record.name} ({record.backend})",
        f"URL              {record.url}",
        f"health           {health(record)}",
        f"model version    {record.model_ref or '-'} ({record.arch}, {record.image_size} px, weights {record.version})",
        f"model URI        {record.model_uri}",
        f"deployed         {record.deployed_at}",
        f"replaced         {record.previous_model_ref or record.previous_version or '-'}",
    ]
    capture = record.capture
    lines += [
        f"replicas         {'-' if record.replicas is None else record.replicas}",
        f"data capture     {f'{capture.sampling_percentage} percent to {record.capture_uri}' if capture else 'off'}",
        "variants         "
        + (", ".join(f"{v.id} ({v.model_ref or v.version}, weight {v.weight})" for v in record.variants) or "-"),
    ]
    if record.shadow is not None:
        lines.append(
            f"shadow           {record.shadow.model_ref or record.shadow.version} since {record.shadow.started_at}"
        )
    if record.serving is not None:
        lines.append(f"serving          {record.serving.path}: {record.serving.reason}")
    lines += [f"{key.replace('_', ' '):16} {value}" for key, value in sorted(record.details.items())]
    if record.rollout is not None:
        lines += [
            f"rollout          {describe_rollout(record.rollout.strategy)}",
            f"last rollout     {rollout_verdict(record.rollout)}",
        ]
    return "\n".join(lines)


def describe_rollout(strategy: RolloutStrategy) -> str:
    """The strategy of the last rollout, with only the settings that apply to it (an all-at-once has no bake)."""
    kind = strategy.kind
    if kind == "all-at-once":
        return "all-at-once (blue/green: every request moves to the new model once it answers)"
    guard = (
        f"rolled back when its error rate rises by over {strategy.max_error_rate_increase:g} or its p99 latency "
        f"passes {strategy.max_latency_ratio:g}x the current model's (after {strategy.min_requests} requests)"
    )
    if kind == "canary":
        return f"canary: {strategy.traffic_percent}% of requests for {strategy.bake_seconds:g} s, {guard}"
    if kind == "linear":
        return f"linear: {strategy.traffic_percent}% more of requests every {strategy.bake_seconds:g} s, {guard}"
    return (
        f"shadow: the new model answers a copy of {strategy.traffic_percent}% of requests; users get the current "
        "model's answers until `bincount endpoints promote-shadow`"
    )


def rollout_verdict(rollout: Rollout) -> str:
    return f"{rollout.verdict}: {rollout.reason} ({len(rollout.steps)} steps)"


def endpoints_command(args: argparse.Namespace, settings: Settings) -> str:
    if args.endpoints_command == "list":
        return list_endpoints(settings)
    if args.endpoints_command in ("promote-shadow", "stop-shadow"):
        from flows.endpoints import promote_shadow, stop_shadow

        end = promote_shadow if args.endpoints_command == "promote-shadow" else stop_shadow
        record = end(args.name)
        report = record.rollout.report if record.rollout else None
        if report is None:
            return f"Endpoint {record.name!r} serves {record.model_ref or record.version}"
        return (
            f"Endpoint {record.name!r} serves {record.model_ref or record.version}; the shadow's report: "
            f"{report.compared} answers compared, agreement {report.agreement}, "
            f"{'promote' if report.promote else 'do not promote'} ({report.reason})"
        )
    from bincount.contracts.serving import EndpointNotFoundError
    from bincount.endpoints import EndpointRecords
    from bincount.storage import storage_for

    record = EndpointRecords(settings, storage_for(settings)).read(args.name)
    if record is None:
        raise EndpointNotFoundError(f"no endpoint named {args.name!r} is recorded (bincount endpoints list shows them)")
    return describe_endpoint(record)


# --- bincount models ---------------------------------------------------------------------------
def format_table(headers: list[str], rows: list[list[str]]) -> str:
    """Columns padded to their widest cell, under a header and a rule."""
    widths = [max(len(str(cell)) for cell in column) for column in zip(headers, *rows, strict=True)]
    lines = [headers, ["-" * width for width in widths], *rows]
    padded = ("  ".join(str(cell).ljust(width) for cell, width in zip(line, widths, strict=True)) for line in lines)
    return "\n".join(line.rstrip() for line in padded)


def endpoint_records(settings: Settings) -> list[EndpointRecord]:
    from bincount.endpoints import EndpointRecords
    from bincount.storage import storage_for

    records = EndpointRecords(settings, storage_for(settings))
    return [record for name in records.names() if (record := records.read(name)) is not None]


def serving(version: ModelVersion, endpoints: list[EndpointRecord]) -> list[EndpointRecord]:
    """The endpoints whose record says they serve ``version``'s model."""
    return [record for record in endpoints if record.model_uri == version.model_uri]


def list_models(registry: StorageModelRegistry, settings: Settings, group: str | None) -> str:
    endpoints = endpoint_records(settings)
    rows = [
        [
            str(v.ref),
            v.stage,
            v.approval,
            f"{v.spec.metrics.accuracy:.3f}",
            f"{v.spec.metrics.rmse:.3f}",
            f"{v.spec.metrics.within_one_accuracy:.3f}",
            v.created_at[:19].replace("T", " "),
            v.spec.training_job,
            ",".join(record.name for record in serving(v, endpoints)) or "-",
            f"held by {v.hold.actor}: {v.hold.reason}" if v.hold else "-",
        ]
        for v in registry.list(group)
    ]
    if not rows:
        return f"No registered models{f' in group {group!r}' if group else ''} under {registry.root}"
    headers = ["VERSION", "STAGE", "APPROVAL", "ACCURACY", "RMSE", "WITHIN-1", "CREATED (UTC)", "TRAINING JOB"]
    return format_table([*headers, "SERVED BY", "HOLD"], rows)


def show_model(version: ModelVersion, settings: Settings) -> str:
    """The lineage of ``version``: dataset -> training job -> model -> card -> endpoints, with its flow run and
    history."""
    from bincount.registry import StorageModelRegistry
    from bincount.storage import join_uri, storage_for

    spec, metrics, dataset = version.spec, version.spec.metrics, version.spec.dataset
    endpoints = serving(version, endpoint_records(settings))
    per_class = ", ".join(f"{label}: {score:.3f}" for label, score in sorted(metrics.per_class_accuracy.items()))
    sides = ", ".join(f"{side} {count}" for side, count in dataset.counts.items())
    lines = [
        f"{version.ref}  stage {version.stage}, {version.approval}; "
        f"registered {version.created_at} by {spec.created_by}",
        "",
        f"dataset       {dataset.split_uri}",
        f"              sha256 {dataset.split_sha256}; {sides}",
        f"training job  {spec.training_job}",
        f"  code        sm_scripts sha256 {spec.code_hash}",
        "  recipe      " + " ".join(f"--{name} {value}" for name, value in sorted(spec.hyperparameters.items())),
        f"  flow run    {spec.flow_run_id or '-'}  {spec.flow_run_url or ''}".rstrip(),
        f"model         {spec.model_uri}",
        f"              sha256 {spec.model_sha256}",
        f"  test scores accuracy {metrics.accuracy:.4f}, RMSE {metrics.rmse:.4f}, "
        f"within one {metrics.within_one_accuracy:.4f} ({metrics.images} images); per class {per_class}",
    ]
    lines += [f"  {key.replace('_', ' '):11} {value}" for key, value in sorted(version.mirror.items())]
    if version.hold:
        lines.append(
            f"hold          held since {version.hold.at[:19]} by {version.hold.actor}: {version.hold.reason} "
            f"(not promoted again, nor any model like it, until `bincount models release-hold {version.ref}`)"
        )
    card = join_uri(StorageModelRegistry.from_settings(settings).card_folder(version.group, version.version), "card.md")
    lines.append(
        f"model card    {card if storage_for(settings).exists(card) else 'none stored (the nightly writes one)'}"
    )
    if endpoints:
        lines += [f"endpoint      {r.name}  {r.url}  ({r.backend}, deployed {r.deployed_at})" for r in endpoints]
    else:
        lines.append("endpoint      none serves it")
    history = [[version.created_at[:19], spec.created_by, "registered", "candidate", spec.description]]
    history += [
        [e.at[:19], e.actor, e.kind, e.stage or e.approval or ",".join(e.details.values()), e.reason]
        for e in version.history
    ]
    return "\n".join(lines) + "\n\nhistory\n" + format_table(["TIME (UTC)", "BY", "KIND", "CHANGE", "REASON"], history)


def models_command(args: argparse.Namespace, settings: Settings) -> str:
    if args.models_command in ("list", "show"):  # reads: the records under the artifact root, no backend needed
        from bincount.registry import StorageModelRegistry

        registry = StorageModelRegistry.from_settings(settings)
        if args.models_command == "list":
            return list_models(registry, settings, args.group)
        return show_model(registry.resolve(args.version), settings)
    from bincount.config import Location

    if args.models_command == "rollback":
        from flows.rollback import rollback_model

        endpoint = rollback_model(args.endpoint, args.reason, args.actor, Location.of(settings))
        return (
            f"Endpoint {args.endpoint!r} serves {endpoint.model_ref} again ({endpoint.model_uri}); "
            f"{endpoint.previous_model_ref} is held (`bincount models release-hold` lifts it)"
        )
    if args.models_command == "release-hold":
        from flows.rollback import release_hold

        version = release_hold(args.version, args.reason, args.actor, Location.of(settings))
        return f"{version.ref} is no longer held: it may be promoted again"
    return review_command(args, settings)


def review_command(args: argparse.Namespace, settings: Settings, wait_s: float = 60.0) -> str:
    """`models approve|reject`: answer the paused run that waits for a person's answer on the version (it records
    the answer and goes on, as if resumed in the UI); where no run waits, approve or reject it in the registry.
    Says which happened."""
    import time

    from bincount.config import Location
    from bincount.registry import StorageModelRegistry
    from flows.promotion import answer_waiting_approval, approval_recorded

    approve = args.models_command == "approve"
    verb = "approved" if approve else "rejected"
    args.actor = args.actor or login_name()
    version = StorageModelRegistry.from_settings(settings).resolve(args.version)
    ref = str(version.ref)
    run = answer_waiting_approval(ref, approve, args.actor, args.reason)
    if run is None:
        from flows.review import review_model

        version = review_model(ref, approve, args.reason, args.actor, Location.of(settings))
        return (
            f"No paused run waits for {ref}: {verb} it in the registry directly (by {args.actor}). "
            f"{version.ref} is {version.approval} (stage {version.stage})"
        )
    answered = f"Answered flow run {run.name!r} ({run.id}), which waited for approval of {ref}: {verb} by {args.actor}"
    deadline = time.monotonic() + wait_s
    while (recorded := approval_recorded(settings, ref, len(version.history))) is None:
        if time.monotonic() > deadline:
            return f"{answered}; the run records the answer when it resumes (bincount models show {ref})"
        time.sleep(0.5)
    return f"{answered}. The run recorded it: {ref} is {recorded.approval} by {recorded.actor}, and goes on"


def login_name() -> str:
    """Who runs the command: ``$USER``, else the operating system's login name."""
    return os.environ.get("USER") or getpass.getuser()


def add_models_commands(commands: argparse._SubParsersAction) -> None:
    models = commands.add_parser(
        "models", help="list, show, approve, reject or roll back registered model versions, or release a hold"
    )
    actions = models.add_subparsers(dest="models_command", required=True)
    listing = actions.add_parser("list", help="every registered version: stage, approval, scores, endpoints")
    listing.add_argument("--group", help="only this model group (default: every group; a group per endpoint)")
    show = actions.add_parser("show", help="a version's lineage: dataset -> training job -> model -> endpoints")
    show.add_argument("version", help="<group>:<number>, <group>:latest or <group>:production (e.g. bincount:3)")
    for name in ("approve", "reject"):
        action = actions.add_parser(
            name,
            help=f"{name} a version: answers the paused run that waits for approval of it, else {name}s it in the "
            "registry (and its SageMaker model package on profile aws)",
        )
        action.add_argument("version", help="<group>:<number>, e.g. bincount:3")
        action.add_argument("--reason", required=True, help="why: kept in the version's history")
        action.add_argument(
            "--reviewer",
            "--actor",
            dest="actor",
            help="who decides: kept in the version's history (default: $USER, else the login name)",
        )
    rollback = actions.add_parser("rollback", help="deploy an endpoint's previous production version again")
    rollback.add_argument("endpoint", help="endpoint name (its model group has the same name)")
    rollback.add_argument("--reason", required=True, help="why: kept in the version's history")
    rollback.add_argument("--actor", default=getpass.getuser(), help="who (default: the current user)")
    release = actions.add_parser("release-hold", help="let a version a rollback holds be promoted again")
    release.add_argument("version", help="the held version, <group>:<number> (list shows holds)")
    release.add_argument("--reason", required=True, help="why: kept in the version's history")
    release.add_argument("--actor", default=getpass.getuser(), help="who (default: the current user)")


# --- bincount demo, data, make-demo-data, delete-endpoint ----------------------------------------
def demo_command(args: argparse.Namespace, settings: Settings) -> None:
    from bincount.config import Location
    from flows.data import DataOptions
    from flows.pipeline import pipeline

    location = Location(source_uri=demo_bucket(settings, args.images, args.seed))
    if args.drift:  # docs/FEEDBACK.md: the demonstration
        from flows.drift_demo import drift_demo

        print(drift_demo(location.settings(), demo_training_options(), seed=args.seed).report())
        return
    print(demo_report(pipeline(DataOptions(), demo_training_options(), location=location, refresh=args.refresh)))


def demo_report(result: PipelineResult) -> str:
    """What `bincount demo` prints at the end: scores, the version, the endpoint with Python that calls it (it
    runs as shown), the batch transform, how to stop the endpoint."""
    from tasks.batch_transform import scoring_sentence
    from tasks.deploy import invoke_snippet

    evaluation, endpoint, scored = result.evaluation, result.endpoint, result.batch_transform
    if endpoint is None or scored is None:
        rejected = result.model_version
        return f"Model version {rejected} was rejected: nothing deployed (bincount models show {rejected})"
    return (
        f"\nTest accuracy {evaluation.accuracy:.3f}, RMSE {evaluation.rmse:.3f} ({evaluation.images} images)\n"
        f"Model version {result.model_version}: {result.model_uri} (its lineage: bincount models show "
        f"{result.model_version})\n"
        f"Endpoint {endpoint.name!r} serves it at {endpoint.url}; with a photo at photo.jpg, this Python asks it "
        f"for a count:\n\n{invoke_snippet(endpoint)}\n\n"
        f"Batch transform of the test split: {scoring_sentence(scored)}; results in {scored.output_uri}\n"
        f"Stop the endpoint with: bincount delete-endpoint {endpoint.name}"
    )


def data_command(args: argparse.Namespace, settings: Settings) -> None:
    from bincount.config import Location, to_uri
    from flows.data import DataOptions, prepare_data

    options = DataOptions(
        manifest_uri=to_uri(args.manifest_uri) if args.manifest_uri else None,
        image_ids=args.ids_file.read_text().split() if args.ids_file else None,
        dataset=args.dataset,
        max_missing_share=args.max_missing_share,
    )
    result = prepare_data(options, Location(source_uri=args.source_uri), refresh=args.refresh)
    print(f"Prepared {result.images} images; split manifest: {result.split_uri}")


def make_demo_data_command(args: argparse.Namespace, settings: Settings) -> None:
    from bincount.config import to_uri
    from bincount.demo_data import DemoBucketError, add_demo_images, generate_demo_bucket
    from bincount.storage import storage_for

    target, storage = to_uri(args.uri), storage_for(settings)
    if args.add is None:
        print(generate_demo_bucket(storage, target, images=args.images, seed=args.seed))
        return
    try:
        added = add_demo_images(storage, target, args.add, seed=args.seed)
    except DemoBucketError as error:
        print(f"bincount make-demo-data: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    print(
        f"Added {len(added.ids)} photos ({added.ids[0]} to {added.ids[-1]}); the manifest lists "
        f"{added.manifest_size}: {added.manifest_uri}"
    )


def delete_endpoint_command(args: argparse.Namespace, settings: Settings) -> None:
    from flows.endpoints import delete_endpoint

    stopped = delete_endpoint(args.name)
    served = f" (it served {stopped.model_ref or stopped.version})" if stopped else ""
    print(f"Endpoint {args.name!r} stopped{served}")


COMMANDS = {
    "demo": demo_command,
    "data": data_command,
    "make-demo-data": make_demo_data_command,
    "delete-endpoint": delete_endpoint_command,
}


def main(argv: list[str] | None = None) -> None:
    # Without PREFECT_API_URL each run starts a temporary server: give it time on a busy 2-core machine.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    parser = argparse.ArgumentParser(prog="bincount", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="run the whole pipeline offline on synthetic demo data")
    demo.add_argument("--images", type=int, default=600, help="demo photos to generate (default: 600)")
    demo.add_argument("--seed", type=int, default=0, help="seed of the demo data (default: 0)")
    demo.add_argument("--refresh", action="store_true", help="ignore cached results (default: off)")
    demo.add_argument(
        "--drift",
        action="store_true",
        help="then send darker photos, let the monitor find the drift and the chain (harvest, nightly) adapt; "
        "print live accuracy before and after (default: off)",
    )
    data = commands.add_parser("data", help="prepare a dataset from a manifest (default source: the ABID bucket)")
    data.add_argument("--manifest-uri", help="seed-format file_list.json: a path, file:// or s3:// URI")
    data.add_argument("--ids-file", type=Path, help="instead of a manifest: a file of image ids, one per line")
    data.add_argument(
        "--source-uri", help="bucket laid out like ABID (default: BINCOUNT_SOURCE_URI or s3://aft-vbi-pds)"
    )
    data.add_argument("--dataset", default="abid", help="dataset name under <artifact_root>/datasets (default: abid)")
    data.add_argument(
        "--max-missing-share", type=float, default=0.01, help="missing/corrupt share tolerated (default: 0.01)"
    )
    data.add_argument("--refresh", action="store_true", help="ignore cached results (default: off)")
    stop = commands.add_parser("delete-endpoint", help="stop a local endpoint and forget its record")
    stop.add_argument("name", help="endpoint name (the demo's is 'bincount')")
    make = commands.add_parser("make-demo-data", help="write a demo bucket at a URI and print its manifest URI")
    make.add_argument("uri", help="file:// or s3:// URI, or a folder")
    size = make.add_mutually_exclusive_group()
    size.add_argument("--images", type=int, default=600, help="demo photos to generate (default: 600)")
    size.add_argument(
        "--add",
        type=int,
        metavar="N",
        help="instead: add N new photos (new ids, counts 1-5) to the bucket there and to its manifest (default: off)",
    )
    make.add_argument("--seed", type=int, default=0, help="seed of the demo data (default: 0)")
    endpoints = commands.add_parser("endpoints", help="list endpoints, or describe one: model version, URL, health")
    endpoint_actions = endpoints.add_subparsers(dest="endpoints_command", required=True)
    endpoint_actions.add_parser("list", help="every recorded endpoint: model version, URL, health")
    endpoint_actions.add_parser(
        "describe", help="one endpoint: model version and URI, URL, health, deploy details"
    ).add_argument("name", help="endpoint name")
    endpoint_actions.add_parser(
        "promote-shadow", help="make an endpoint's shadow model the one that answers (and production)"
    ).add_argument("name", help="endpoint name")
    endpoint_actions.add_parser("stop-shadow", help="stop an endpoint's shadow; its model keeps serving").add_argument(
        "name", help="endpoint name"
    )
    add_models_commands(commands)
    args = parser.parse_args(argv)

    from bincount.config import Settings

    settings = Settings.load()
    if args.command == "models":
        from bincount.contracts.registry import RegistryError

        try:
            print(models_command(args, settings))
        except RegistryError as error:
            print(f"bincount models {args.models_command}: {error}", file=sys.stderr)
            raise SystemExit(2) from None
        return
    if args.command == "endpoints":
        from bincount.contracts.serving import ServingError

        try:
            print(endpoints_command(args, settings))
        except ServingError as error:
            print(f"bincount endpoints {args.endpoints_command}: {error}", file=sys.stderr)
            raise SystemExit(2) from None
        return
    COMMANDS[args.command](args, settings)


if __name__ == "__main__":
    main()
