"""Sharded publishing: one release split across N workers (machines or processes), then one atomic commit.

- `run_worker`: worker I of N converts only its shards of the deterministic shard plan (a contiguous run of about
  1/N of them), pre-uploads each one as soon as it is written (LFS, `preupload_lfs_files`, at most two shards on
  disk) and writes the manifest `hubconv-shards-I-of-N.json`: name, size and sha256 of every shard it uploaded
  and of each of its tensors (read back before the upload), who it was, and the fingerprint of the plan (shard
  layout, configs, hubconv version, mapping file, a sampled identity of the checkpoint's bytes).
- `finalize`: reads the N manifests and refuses a missing, duplicated, foreign (other plan, checkpoint, config,
  repo) or incomplete one; asks the Hub whether it holds every shard's LFS object; builds the rest of the release
  exactly as `hubconv release --stream-upload` does (config, index, tokenizer, hubconv.json, card) with the smoke
  test streamed from its own conversion plan, every tensor checked against the sha256 its worker reported; then
  makes the one atomic commit (tag / Hub PR as `hubconv push`).

Nothing is committed before every check passed: objects uploaded by the workers of a release that fails stay
unreferenced on the Hub. Re-running a worker converts again and uploads nothing the Hub already holds.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import socket
import sys
import tempfile
from dataclasses import dataclass, field
from typing import Any

from hubconv import __version__
from hubconv.config import ReleaseConfig
from hubconv.credentials import redact_url
from hubconv.errors import HubconvError
from hubconv.hub import StreamingUploader, add_stream_record
from hubconv.io.writer import ShardPlan

MANIFEST_FORMAT = "hubconv-shard-manifest/1"
MANIFEST_NAME = re.compile(r"^hubconv-shards-(\d+)-of-(\d+)\.json$")
_SAMPLE = 64 * 1024  # bytes read at the head, middle and tail of each checkpoint file for its identity


def manifest_name(index: int, count: int) -> str:
    return f"hubconv-shards-{index}-of-{count}.json"


def parse_worker(spec: str) -> tuple[int, int]:
    """`I/N` (1 <= I <= N) -> (I, N), or a one-line error naming `--worker`."""
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", spec or "")
    if not m or not 1 <= int(m[1]) <= int(m[2]):
        raise HubconvError(f"--worker {spec!r}: expected I/N with 1 <= I <= N, e.g. 2/4")
    return int(m[1]), int(m[2])


def assigned(filenames: list[str], index: int, count: int) -> list[str]:
    """The shards worker `index` of `count` converts and uploads: a contiguous run, sizes differing by at most one."""
    n = len(filenames)
    return filenames[(index - 1) * n // count : index * n // count]


def checkpoint_identity(path: str) -> str:
    """A cheap identity of the checkpoint's bytes: each file's relative path and size plus three 64 KiB samples
    (head, middle, tail). Another step of the same training run (same shapes, other values) gets another one; it
    is not a full content digest (a flipped byte between the samples goes unseen)."""
    if os.path.isfile(path):
        files = [(os.path.basename(path), path)]
    else:
        files = []
        for root, dirs, names in os.walk(path):
            dirs.sort()
            for name in sorted(names):
                full = os.path.join(root, name)
                files.append((os.path.relpath(full, path).replace(os.sep, "/"), full))
    h = hashlib.sha256()
    for rel, full in files:
        size = os.path.getsize(full)
        h.update(f"{rel}\0{size}\0".encode())
        with open(full, "rb") as f:
            for offset in sorted({0, max(0, size // 2 - _SAMPLE // 2), max(0, size - _SAMPLE)}):
                f.seek(offset)
                h.update(f.read(_SAMPLE))
    return h.hexdigest()


@dataclass
class Layout:
    """The release's shard plan as every worker and the final step compute it from the same inputs."""

    shards: ShardPlan
    fingerprint: str

    @property
    def filenames(self) -> list[str]:
        return [s.filename for s in self.shards.shards]

    def sizes(self) -> dict[str, int]:
        return self.shards.file_sizes()

    def tensors(self, filename: str) -> dict[str, tuple[str, list[int]]]:
        """{tensor: (safetensors dtype, shape)} of a planned shard."""
        return {k: (v["dtype"], v["shape"]) for k, v in self.header(filename).items() if k != "__metadata__"}

    def header(self, filename: str) -> dict[str, Any]:
        """The safetensors header of a planned shard, parsed (as `.hubconv/streamed.json` records it)."""
        shard = next(s for s in self.shards.shards if s.filename == filename)
        return json.loads(shard.header(self.shards.metadata)[8:])


def layout(cfg: ReleaseConfig) -> Layout:
    """Plan the release from metadata alone (no tensor is read) and fingerprint everything that decides the bytes
    of the shards: plan, configs, adapter, hubconv version, mapping file and checkpoint identity."""
    from hubconv.convert import build_plan, load_adapter, shard_plan
    from hubconv.dtypes import parse_user_dtype
    from hubconv.io.writer import parse_size

    cfg.require("adapter", "checkpoint")
    assert cfg.adapter is not None and cfg.checkpoint is not None
    with load_adapter(cfg.adapter, cfg.mapping)[0].open(cfg.checkpoint) as ckpt:
        plan = build_plan(cfg.adapter, ckpt, cfg.model_args, cfg.mapping)
        shards = shard_plan(plan, parse_user_dtype(cfg.dtype), parse_size(cfg.max_shard_size, option="max_shard_size"))
    mapping = None
    if cfg.mapping:
        with open(cfg.mapping, "rb") as f:
            mapping = hashlib.sha256(f.read()).hexdigest()
    doc = {
        "format": MANIFEST_FORMAT,
        "hubconv": __version__,
        "adapter": f"{plan.adapter}:{plan.family}",
        "config": plan.config,
        "generation_config": plan.generation_config,
        "native_args": plan.native_args,
        "shards": [
            [s.filename, len(s.tensors), hashlib.sha256(s.header(shards.metadata)).hexdigest()] for s in shards.shards
        ],
        "mapping": mapping,
        "checkpoint": checkpoint_identity(cfg.checkpoint),
    }
    fingerprint = hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()
    return Layout(shards, fingerprint)


def _identity(index: int, count: int) -> dict[str, Any]:
    """Who wrote a manifest: the worker's place, its host, and the GitHub Actions run when there is one."""
    me: dict[str, Any] = {"index": index, "count": count, "host": socket.gethostname()}
    if os.environ.get("GITHUB_RUN_ID"):
        me["github_run"] = f"{os.environ['GITHUB_RUN_ID']}/{os.environ.get('GITHUB_RUN_ATTEMPT', '1')}"
    return me


@dataclass
class WorkerResult:
    manifest: str
    shards: list[dict[str, Any]]
    uploaded_bytes: int
    peak_shard_bytes_on_disk: int = 0
    seconds: float = 0.0


def _write_json_atomically(path: str, doc: dict[str, Any]) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(doc, f, indent=2)
        f.write("\n")
    os.replace(tmp, path)


def run_worker(
    cfg: ReleaseConfig,
    index: int,
    count: int,
    manifest_dir: str,
    *,
    endpoint: str | None = None,
    token: str | None = None,
    work_dir: str | None = None,
    progress: bool = True,
) -> WorkerResult:
    """Convert and pre-upload worker `index`'s shards, then write its manifest into `manifest_dir`."""
    import time

    from hubconv.convert import convert
    from hubconv.hub import CONFIG_FIELDS, missing_lfs_objects, open_repo, preflight
    from hubconv.streamed_forward import DigestingSink

    started = time.monotonic()
    if not progress or not sys.stderr.isatty():  # a bar per uploaded shard is noise in CI logs
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
    cfg.require_hub()
    repo_id, endpoint = cfg.hub.repo_id, endpoint or cfg.hub.endpoint
    assert repo_id is not None
    preflight(repo_id, endpoint=endpoint, token=token, fields=CONFIG_FIELDS)
    plan = layout(cfg)
    assert cfg.adapter is not None and cfg.checkpoint is not None  # required by layout()
    own = assigned(plan.filenames, index, count)
    api = open_repo(repo_id, endpoint=endpoint, token=token, private=cfg.hub.private)
    uploader = None
    written: dict[str, dict[str, Any]] = {}  # per-tensor digests of the shards, read back before each upload
    if own:
        uploader = _WorkerUploader(api, repo_id, set(own))
        digests = DigestingSink(uploader)
        with tempfile.TemporaryDirectory(prefix="hubconv-worker-", dir=work_dir) as scratch:
            try:
                convert(
                    cfg.adapter,
                    cfg.checkpoint,
                    os.path.join(scratch, "model"),
                    model_args=cfg.model_args,
                    dtype=cfg.dtype,
                    max_shard_size=cfg.max_shard_size,
                    progress=progress,
                    sink=digests,
                    mapping=cfg.mapping,
                    auto_tokenizer=False,
                )
            except BaseException:
                uploader.abort()
                raise
            operations = uploader.finish()
        written = digests.tensors
    else:
        operations = []
    shards = sorted(
        (
            {
                "file": op.path_in_repo,
                "size": op.upload_info.size,
                "sha256": op.upload_info.sha256.hex(),
                "tensors": {name: written[name] for name in plan.tensors(op.path_in_repo)},
            }
            for op in operations
        ),
        key=lambda s: s["file"],
    )
    if [s["file"] for s in shards] != own:
        raise HubconvError(f"worker {index}/{count}: uploaded {[s['file'] for s in shards]}, planned {own}")
    missing = missing_lfs_objects(api, repo_id, [(s["sha256"], s["size"]) for s in shards])
    if missing:
        gone = next(s["file"] for s in shards if s["sha256"] in missing)
        raise HubconvError(f"worker {index}/{count}: {gone} was uploaded but the Hub does not list it; run it again")
    manifest = {
        "format": MANIFEST_FORMAT,
        "fingerprint": plan.fingerprint,
        "repo_id": repo_id,
        "endpoint": redact_url(api.endpoint),
        "worker": _identity(index, count),
        "hubconv_version": __version__,
        "plan": {"shards": len(plan.filenames), "bytes": sum(plan.sizes().values())},
        "shards": shards,
    }
    os.makedirs(manifest_dir, exist_ok=True)
    path = os.path.join(manifest_dir, manifest_name(index, count))
    _write_json_atomically(path, manifest)
    return WorkerResult(
        path,
        shards,
        sum(s["size"] for s in shards),
        uploader.peak_bytes_on_disk if uploader else 0,
        time.monotonic() - started,
    )


class _WorkerUploader(StreamingUploader):
    """A streaming uploader for one worker: the writer skips the shards other workers own."""

    def __init__(self, api: Any, repo_id: str, own: set[str]):
        super().__init__(api, repo_id)
        self.own = own

    def skip(self, path: str) -> bool:
        return os.path.basename(path) not in self.own

    def tensor_digests(self, path: str) -> dict[str, dict[str, Any]]:
        return {}  # another worker's shard: its manifest carries them


@dataclass
class Manifest:
    path: str
    index: int
    count: int
    shards: list[dict[str, Any]]
    doc: dict[str, Any] = field(default_factory=dict)


def _read_manifest(path: str) -> Manifest:
    try:
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise HubconvError(f"{path}: not readable JSON ({type(e).__name__})") from None
    worker = doc.get("worker") if isinstance(doc, dict) else None
    shards = doc.get("shards") if isinstance(doc, dict) else None
    if (
        not isinstance(doc, dict)
        or doc.get("format") != MANIFEST_FORMAT
        or not isinstance(worker, dict)
        or not isinstance(shards, list)
    ):
        raise HubconvError(f"{path}: not a hubconv shard manifest ({MANIFEST_FORMAT})")
    index, count = worker.get("index"), worker.get("count")
    if not (isinstance(index, int) and isinstance(count, int) and 1 <= index <= count):
        raise HubconvError(f"{path}: `worker` must name its place as index (1..count) and count")
    for s in shards:
        ok = isinstance(s, dict) and isinstance(s.get("file"), str) and isinstance(s.get("size"), int)
        if not ok or not re.fullmatch(r"[0-9a-f]{64}", str(s.get("sha256"))) or not isinstance(s.get("tensors"), dict):
            raise HubconvError(
                f"{path}: every shard needs a file name, a size, a sha256 (64 hex digits) and its tensors' digests"
            )
    return Manifest(path, index, count, shards, doc)


def read_manifests(manifest_dir: str, plan: Layout, repo_id: str) -> list[Manifest]:
    """The N manifests of this release from `manifest_dir` (searched recursively, as Actions artifacts unpack), each
    checked against the plan: same fingerprint and repo, every worker present once, exactly its shards, their sizes."""
    if not os.path.isdir(manifest_dir):
        raise HubconvError(f"{manifest_dir}: no such folder (the workers' manifests go there)")
    paths = sorted(
        os.path.join(root, n) for root, _, names in os.walk(manifest_dir) for n in names if MANIFEST_NAME.match(n)
    )
    if not paths:
        raise HubconvError(f"{manifest_dir}: no shard manifests (hubconv-shards-I-of-N.json): run the workers first")
    manifests: dict[int, Manifest] = {}
    count: tuple[int, str] | None = None
    for path in paths:
        m = _read_manifest(path)
        doc = m.doc
        if doc.get("repo_id") != repo_id:
            raise HubconvError(f"{path}: uploaded to {doc.get('repo_id')!r}, but this release publishes {repo_id!r}")
        if doc.get("fingerprint") != plan.fingerprint:
            raise HubconvError(
                f"{path}: made from another shard plan, checkpoint or config (fingerprint "
                f"{str(doc.get('fingerprint'))[:12]}, this release {plan.fingerprint[:12]}); "
                f"run worker {m.index}/{m.count} again with the same inputs"
            )
        if count is not None and m.count != count[0]:
            raise HubconvError(f"{path}: worker {m.index}/{m.count}, but {count[1]} says {count[0]} workers")
        count = count or (m.count, path)
        if m.index in manifests:
            raise HubconvError(f"{path}: a second manifest for worker {m.index}/{m.count} ({manifests[m.index].path})")
        manifests[m.index] = m
    assert count is not None
    absent = [i for i in range(1, count[0] + 1) if i not in manifests]
    if absent:
        raise HubconvError(
            f"worker {absent[0]}/{count[0]}: no manifest in {manifest_dir} (the worker failed or did not run); "
            "nothing was committed"
        )
    sizes = plan.sizes()
    for i, m in sorted(manifests.items()):
        expected = assigned(plan.filenames, i, m.count)
        got = [s["file"] for s in m.shards]
        if sorted(got) != expected:
            raise HubconvError(f"{m.path}: worker {i}/{m.count} must upload {expected}, the manifest lists {got}")
        for s in m.shards:
            if s["size"] != sizes[s["file"]]:
                raise HubconvError(f"{m.path}: {s['file']} has {s['size']} bytes, the plan {sizes[s['file']]}")
            listed = {k: (v.get("dtype"), v.get("shape")) for k, v in s["tensors"].items() if isinstance(v, dict)}
            if listed != plan.tensors(s["file"]):
                raise HubconvError(f"{m.path}: the tensors listed for {s['file']} are not the planned ones")
    return [manifests[i] for i in sorted(manifests)]


class ManifestSink:
    """The shard sink of the final step: the writer skips every shard (the workers uploaded them); each one is
    recorded in `.hubconv/streamed.json` as a streaming upload records it, so the card lists the workers' digests."""

    def __init__(self, plan: Layout, manifests: list[Manifest]):
        from hubconv.hub import preuploaded_operation

        self.plan = plan
        self.records = {s["file"]: s for m in manifests for s in m.shards}
        self.operations = [preuploaded_operation(s["file"], s["size"], s["sha256"]) for s in self.records.values()]
        self.peak_bytes_on_disk = 0

    def skip(self, path: str) -> bool:
        name = os.path.basename(path)
        record = self.records.get(name)
        if record is None:
            raise HubconvError(f"{name}: in the shard plan but in no worker manifest")
        add_stream_record(
            path, name, {"size": record["size"], "sha256": record["sha256"], "header": self.plan.header(name)}
        )
        return True

    def tensor_digests(self, path: str) -> dict[str, dict[str, Any]]:
        """Per-tensor dtype, shape and sha256 of a shard as its worker read them back before uploading it: the
        streamed verification checks the conversion it reads against them (`hubconv.streamed_forward`)."""
        return self.records[os.path.basename(path)]["tensors"]

    def reserve(self) -> None:
        raise HubconvError("sharded publishing: the final step writes no shard")

    def done(self, path: str) -> None:
        raise HubconvError("sharded publishing: the final step writes no shard")

    def flush(self) -> None:
        return None


@dataclass
class FinalizeResult:
    release: Any  # hubconv.release.ReleaseResult
    push: Any  # hubconv.hub.PushResult
    manifests: list[Manifest]


def finalize(
    cfg: ReleaseConfig,
    manifest_dir: str,
    *,
    endpoint: str | None = None,
    token: str | None = None,
    tag: str | None = None,
    overwrite: bool = False,
    commit_message: str | None = None,
    force: bool = False,
    progress: bool = True,
) -> FinalizeResult:
    """Check the workers' manifests and the Hub's objects, build the release's small files and verify it into
    `cfg.output`, then commit everything at once. Any failure raises before the commit."""
    from hubconv.hub import CONFIG_FIELDS, missing_lfs_objects, open_repo, preflight, push
    from hubconv.release import run_release

    cfg.require_hub()
    assert cfg.hub.repo_id is not None
    endpoint = endpoint or cfg.hub.endpoint
    preflight(cfg.hub.repo_id, endpoint=endpoint, token=token, fields=CONFIG_FIELDS)
    plan = layout(cfg)
    manifests = read_manifests(manifest_dir, plan, cfg.hub.repo_id)
    api = open_repo(cfg.hub.repo_id, endpoint=endpoint, token=token, private=cfg.hub.private)
    shards = [(m, s) for m in manifests for s in m.shards]
    missing = missing_lfs_objects(api, cfg.hub.repo_id, [(s["sha256"], s["size"]) for _, s in shards])
    for m, s in shards:
        if s["sha256"] in missing:
            raise HubconvError(
                f"{s['file']} (worker {m.index}/{m.count}, sha256 {s['sha256'][:12]}): not on the Hub at "
                f"{cfg.hub.repo_id}; run that worker again; nothing was committed"
            )
    sink = ManifestSink(plan, manifests)
    release = run_release(cfg, overwrite=overwrite, progress=progress, tag=tag, sink=sink)
    pushed = push(
        release.output,
        cfg.hub.repo_id,
        revision=cfg.hub.revision,
        tag=release.provenance.get("release_tag"),
        create_pr=cfg.hub.create_pr,
        private=cfg.hub.private,
        commit_message=commit_message,
        endpoint=endpoint,
        token=token,
        force=force,
        report_md=release.report_md,
        preuploaded=sink.operations,
    )
    return FinalizeResult(release, pushed, manifests)
