"""The label-feedback form as a person sees it: the paused run opened in the Prefect UI in headless Chromium shows
each queued photo and a count field per photo; filled and submitted there, the answers join the feedback source."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from test_deployments import CHROMIUM, rendered
from test_feedback import DATASET, ENDPOINT, World, photo, world  # noqa: F401 (world: the fixture)
from waiting import wait_until

from bincount.feedback import harvest, latest_version, open_queue

ROOT = Path(__file__).resolve().parents[1]
UNSURE = {1: 0.2, 2: 0.2, 3: 0.2, 4: 0.2, 5: 0.2}

# Evaluated about once a second until it returns a non-empty string: opens the Resume dialog; once it shows the
# photos decoded and a number box per photo, reads them and types a count in the first box (as a person would: the
# value, then an input event); a second later submits, and once the dialog has closed (the run resumed), returns
# what it saw.
RESUME_AND_ANSWER = """(() => {{
  const dialog = document.querySelector(".p-modal");
  if (window.submitted) return dialog ? "" : JSON.stringify(window.seen);
  if (!dialog) {{
    const resume = [...document.querySelectorAll("button")].find(b => b.innerText.trim() === "Resume");
    if (resume) resume.click();
    return "";
  }}
  if (window.seen) {{
    [...dialog.querySelectorAll("button")].find(b => b.innerText.trim() === "Submit").click();
    window.submitted = true;
    return "";
  }}
  const photos = [...dialog.querySelectorAll("img")].filter(i => i.src.startsWith("data:image/jpeg"));
  const boxes = [...dialog.querySelectorAll("input[type=number]")];
  if (photos.length < {photos} || boxes.length < {photos} || !photos.every(i => i.complete && i.naturalWidth > 0)) {{
    return "";
  }}
  window.seen = {{text: dialog.innerText, widths: photos.map(i => i.naturalWidth), boxes: boxes.map(b => b.value)}};
  const setValue = Object.getOwnPropertyDescriptor(HTMLInputElement.prototype, "value").set;
  setValue.call(boxes[0], "{count}");
  boxes[0].dispatchEvent(new Event("input", {{bubbles: true}}));
  boxes[0].dispatchEvent(new Event("change", {{bubbles: true}}));
  return "";
}})()"""


def test_the_paused_label_form_shows_each_photo_and_a_count_field_in_a_real_browser(
    world: World,  # noqa: F811
    server_env: dict[str, str],
) -> None:
    if CHROMIUM is None:
        pytest.skip(
            "Debian's chromium is not installed (apt-get install -y chromium; .ci/run installs it where apt works)"
        )
    world.capture(*[(photo(90 + n, 1 + n), None, UNSURE) for n in range(2)])
    harvest(world.storage, world.storage, world.plan(budget=2))
    queued = open_queue(world.storage, world.settings.artifact_root, DATASET)
    assert len(queued) == 2
    run = (
        "from bincount.config import Location\n"
        "from flows.harvest import label_feedback\n"
        f"label_feedback({ENDPOINT!r}, {DATASET!r}, base_manifest_uri={world.manifest_uri!r}, timeout_s=600,\n"
        f"    location=Location(artifact_root={world.settings.artifact_root!r}, source_uri={world.bucket!r}))\n"
    )
    flow = subprocess.Popen([sys.executable, "-c", run], env=server_env, cwd=ROOT)
    api = server_env["PREFECT_API_URL"]

    def paused_run() -> dict | None:
        runs = httpx.post(f"{api}/flow_runs/filter", json={}, timeout=10).json()
        return next((r for r in runs if r["state"] and r["state"]["type"] == "PAUSED"), None)

    try:
        paused = wait_until(paused_run, timeout_s=120, what="the label-feedback run to pause for its form")
        url = f"{api.removesuffix('/api')}/runs/flow-run/{paused['id']}"
        page = rendered(url, RESUME_AND_ANSWER.format(photos=2, count=4))
        assert flow.wait(timeout=120) == 0, "the resumed run finished"
    finally:
        if flow.poll() is None:
            flow.kill()
            flow.wait(timeout=30)
    assert len(page["widths"]) == 2 and all(width > 0 for width in page["widths"]), "each photo decoded inline"
    assert page["boxes"] == ["0", "0"], "a number box per photo, 0 (skip) until a count is typed"
    for number, item in enumerate(queued, start=1):
        assert f"Items in photo {number} ({item.image_id}" in page["text"]

    version = latest_version(world.storage, world.settings.artifact_root, DATASET)
    assert version is not None, "the answer joined the feedback source as a new manifest version"
    assert [(a.image_id, a.label, a.lineage.labelled_by) for a in version.added] == [
        (queued[0].image_id, 4, "prefect-ui")
    ], "the typed count for photo 1; photo 2 skipped"
    assert [item.image_id for item in open_queue(world.storage, world.settings.artifact_root, DATASET)] == [
        queued[1].image_id
    ], "the skipped photo still waits"
