"""hubconv.sources.resolve_checkpoint: plain paths, release assets (against tests/ghserver.py), fsspec URLs."""

from __future__ import annotations

import builtins
import hashlib
import logging
import os

import pytest

from hubconv.errors import CheckpointError, HubconvError
from hubconv.github import GitHubContext
from hubconv.sources import parse_sha256sums, resolve_checkpoint
from tests.ghserver import FakeGitHub

TOKEN = "ghp_SECRETsourcestoken0987654321"
TAG = "v1.0"
META = b'{"state_dict_metadata": {}}' * 50
SHARD = bytes(range(256)) * 4096  # 1 MiB
ASSET_GET = r"/repos/acme/models/releases/assets/\d+"


@pytest.fixture
def gh():
    with FakeGitHub(token=TOKEN) as server:
        yield server


def ctx(gh: FakeGitHub) -> GitHubContext:
    return GitHubContext(api_url=gh.api_url, repository=gh.full_name, token=TOKEN)


def resolve(gh: FakeGitHub, tmp_path, spec: str = "release-assets:", **kw) -> str:
    kw.setdefault("tag", TAG)
    kw.setdefault("dest", str(tmp_path / "ckpt"))
    kw.setdefault("progress", False)
    return resolve_checkpoint(spec, str(tmp_path), github=ctx(gh), **kw)


def two_file_release(gh: FakeGitHub, body: str = "") -> dict:
    return gh.add_release(TAG, body=body, assets=[(".metadata", META), ("__0_0.distcp", SHARD)])


def storage_gets(gh: FakeGitHub) -> list:
    return [r for r in gh.requests if r.storage]


def assert_token_hidden(gh: FakeGitHub, *texts: str) -> None:
    for r in gh.requests:
        assert TOKEN not in r.path and TOKEN not in str(r.query)
    for text in texts:
        assert TOKEN not in text


# ---------------------------------------------------------------------------------------------- release assets
def test_downloads_a_two_file_checkpoint_into_a_folder(gh, tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    two_file_release(gh)
    out = resolve(gh, tmp_path)
    assert out == str(tmp_path / "ckpt")
    assert sorted(os.listdir(out)) == [".metadata", "__0_0.distcp"]
    assert (tmp_path / "ckpt" / ".metadata").read_bytes() == META
    assert (tmp_path / "ckpt" / "__0_0.distcp").read_bytes() == SHARD
    # the API call carried the token and the octet-stream Accept; the storage hop carried no Authorization at all
    api = gh.calls("GET", ASSET_GET)
    assert len(api) == 2 and all(r.auth_ok and r.headers["accept"] == "application/octet-stream" for r in api)
    store = storage_gets(gh)
    assert len(store) == 2 and all(r.authorization is None for r in store)
    assert_token_hidden(gh, caplog.text)


def test_a_single_asset_returns_the_file_path(gh, tmp_path):
    gh.add_release(TAG, assets=[("model.safetensors", SHARD)])
    out = resolve(gh, tmp_path)
    assert out == str(tmp_path / "ckpt" / "model.safetensors")
    assert open(out, "rb").read() == SHARD


def test_resumes_a_partial_download_with_a_range_request(gh, tmp_path):
    two_file_release(gh)
    folder = tmp_path / "ckpt"
    folder.mkdir()
    (folder / "__0_0.distcp.part").write_bytes(SHARD[:300_000])
    resolve(gh, tmp_path)
    ranged = [r for r in storage_gets(gh) if "range" in r.headers]
    assert [r.headers["range"] for r in ranged] == ["bytes=300000-"]
    assert (folder / "__0_0.distcp").read_bytes() == SHARD
    assert not (folder / "__0_0.distcp.part").exists()


def test_complete_assets_are_not_downloaded_again(gh, tmp_path):
    two_file_release(gh)
    resolve(gh, tmp_path)
    n_api, n_store = len(gh.calls("GET", ASSET_GET)), len(storage_gets(gh))
    assert (n_api, n_store) == (2, 2)
    out = resolve(gh, tmp_path)
    assert len(gh.calls("GET", ASSET_GET)) == n_api
    assert len(storage_gets(gh)) == n_store
    assert sorted(os.listdir(out)) == [".metadata", "__0_0.distcp"]


def test_sha256_from_release_body_is_verified(gh, tmp_path):
    body = (
        "Checkpoint for step 1000.\n\n```\n"
        f"{hashlib.sha256(META).hexdigest()}  .metadata\n"
        f"{hashlib.sha256(SHARD).hexdigest()} *__0_0.distcp\n```\n"
    )
    release = two_file_release(gh, body)
    resolve(gh, tmp_path)  # good bytes pass
    shard_id = next(a["id"] for a in release["assets"] if a["name"] == "__0_0.distcp")
    tampered = bytearray(SHARD)
    tampered[12345] ^= 0xFF
    gh.set_asset_data(shard_id, bytes(tampered))  # same size, different content
    dest = tmp_path / "other"
    with pytest.raises(CheckpointError, match=r"__0_0\.distcp.*sha256 mismatch") as err:
        resolve(gh, tmp_path, dest=str(dest))
    assert not (dest / "__0_0.distcp").exists() and not (dest / "__0_0.distcp.part").exists()
    assert (dest / ".metadata").read_bytes() == META
    assert_token_hidden(gh, str(err.value))


def test_asset_digest_field_is_verified(gh, tmp_path):
    gh.add_release(TAG)
    gh.add_asset(TAG, "model.bin", b"tampered!", digest="sha256:" + hashlib.sha256(b"original!").hexdigest())
    with pytest.raises(CheckpointError, match=r"model\.bin.*sha256 mismatch"):
        resolve(gh, tmp_path)
    assert not os.listdir(tmp_path / "ckpt")


def test_glob_selects_assets(gh, tmp_path):
    gh.add_release(TAG, assets=[("a.distcp", b"a" * 10), ("b.distcp", b"b" * 20), ("notes.txt", b"hi")])
    out = resolve(gh, tmp_path, "release-assets:*.distcp")
    assert sorted(os.listdir(out)) == ["a.distcp", "b.distcp"]
    assert len(gh.calls("GET", ASSET_GET)) == 2
    with pytest.raises(CheckpointError, match=r"no asset matching '\*\.safetensors'"):
        resolve(gh, tmp_path, "release-assets:*.safetensors")


def test_missing_tag_is_a_clear_error(gh, tmp_path):
    gh.add_release("v0.9", assets=[("x", b"x")])
    with pytest.raises(HubconvError, match=r"no release with tag 'v1\.0' in acme/models") as err:
        resolve(gh, tmp_path)
    assert_token_hidden(gh, str(err.value))


def test_no_tag_at_all_is_a_clear_error(gh, tmp_path, monkeypatch):
    monkeypatch.delenv("GITHUB_REF", raising=False)
    with pytest.raises(CheckpointError, match="needs a release tag"):
        resolve(gh, tmp_path, tag=None)


def test_bad_token_error_does_not_leak_it(gh, tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    two_file_release(gh)
    bad = "ghp_WRONGtoken_abcdef123456"
    c = GitHubContext(api_url=gh.api_url, repository=gh.full_name, token=bad)
    with pytest.raises(HubconvError, match="401") as err:
        resolve_checkpoint("release-assets:", str(tmp_path), github=c, tag=TAG, progress=False)
    assert bad not in str(err.value) and bad not in caplog.text
    assert all(bad not in r.path for r in gh.requests)


def test_parse_sha256sums():
    h = "ab" * 32
    assert parse_sha256sums(f"text\n{h}  dir/x.bin\n{h.upper()} *y.bin\nnot a line") == {
        "dir/x.bin": h,
        "x.bin": h,
        "y.bin": h,
    }
    g = "1" * 64  # a file listed by its own name wins over another folder's file of that name
    assert parse_sha256sums(f"{h}  a/x.bin\n{g}  ./x.bin")["x.bin"] == g


# ---------------------------------------------------------------------------------------------- plain paths / URLs
def test_plain_path_passthrough_and_missing_path(tmp_path):
    (tmp_path / "step-100").mkdir()
    assert resolve_checkpoint("step-100", str(tmp_path)) == os.path.join(str(tmp_path), "step-100")
    with pytest.raises(CheckpointError, match=r"'nope/step-5' not found"):
        resolve_checkpoint("nope/step-5", str(tmp_path))


def test_url_without_fsspec_says_what_to_install(tmp_path, monkeypatch):
    real_import = builtins.__import__

    def no_fsspec(name, *args, **kwargs):
        if name == "fsspec" or name.startswith("fsspec."):
            raise ImportError("No module named 'fsspec'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_fsspec)
    with pytest.raises(CheckpointError, match=r"pip install fsspec s3fs") as err:
        resolve_checkpoint("s3://bucket/ckpt/step-1?X-Amz-Signature=secret", str(tmp_path), progress=False)
    assert "secret" not in str(err.value)
    with pytest.raises(CheckpointError, match=r"pip install fsspec gcsfs"):
        resolve_checkpoint("gs://bucket/ckpt", str(tmp_path), progress=False)


def test_file_url_folder_copy_with_fsspec(tmp_path):
    pytest.importorskip("fsspec")
    src = tmp_path / "remote" / "step-7"
    src.mkdir(parents=True)
    (src / ".metadata").write_bytes(META)
    (src / "__0_0.distcp").write_bytes(SHARD)
    out = resolve_checkpoint(src.as_uri(), str(tmp_path), dest=str(tmp_path / "dl"), progress=False)
    assert out == str(tmp_path / "dl")
    assert (tmp_path / "dl" / "__0_0.distcp").read_bytes() == SHARD
    assert (tmp_path / "dl" / ".metadata").read_bytes() == META
    single = resolve_checkpoint((src / ".metadata").as_uri(), str(tmp_path), dest=str(tmp_path / "one"))
    assert single == str(tmp_path / "one" / ".metadata")


# ---------------------------------------------------------------------------------------------- fsspec URLs
def _remote(tmp_path, files: dict[str, bytes]):
    src = tmp_path / "remote" / "step-7"
    src.mkdir(parents=True)
    for name, data in files.items():
        (src / name).write_bytes(data)
    return src


def _sums(**files: bytes) -> bytes:
    return "".join(f"{hashlib.sha256(d).hexdigest()}  {n}\n" for n, d in files.items()).encode()


def test_fsspec_folder_is_verified_against_a_published_sha256sums(tmp_path, caplog):
    src = _remote(tmp_path, {".metadata": META, "__0_0.distcp": SHARD})
    (src / "SHA256SUMS").write_bytes(_sums(**{".metadata": META, "__0_0.distcp": SHARD}))
    dest = tmp_path / "dl"
    assert resolve_checkpoint(src.as_uri(), str(tmp_path), dest=str(dest), progress=False) == str(dest)
    assert sorted(os.listdir(dest)) == [".metadata", "__0_0.distcp"]  # the checksum list is read, not copied
    # the source changes after the sums were published: caught, nothing half-written left behind
    (src / "__0_0.distcp").write_bytes(SHARD[:-1] + b"\x00")
    with pytest.raises(CheckpointError, match=r"__0_0\.distcp: sha256 mismatch") as err:
        resolve_checkpoint(src.as_uri(), str(tmp_path), dest=str(tmp_path / "dl2"), progress=False)
    assert "expected " + hashlib.sha256(SHARD).hexdigest() in str(err.value)
    assert not (tmp_path / "dl2" / "__0_0.distcp").exists() and not (tmp_path / "dl2" / "__0_0.distcp.part").exists()


def test_fsspec_resumes_an_interrupted_copy_from_its_part_file(tmp_path):
    src = _remote(tmp_path, {"model.pt": SHARD})
    dest = tmp_path / "dl"
    dest.mkdir()
    # an earlier run stopped after 300 KiB; its bytes are marked so the test can see they were kept, not re-read
    kept = b"\xee" * (300 << 10)
    (dest / "model.pt.part").write_bytes(kept)
    out = resolve_checkpoint(src.as_uri() + "/model.pt", str(tmp_path), dest=str(dest), progress=False)
    assert out == str(dest / "model.pt")
    assert (dest / "model.pt").read_bytes() == kept + SHARD[len(kept) :]
    assert not (dest / "model.pt.part").exists()


def test_fsspec_resume_with_a_corrupt_part_fails_the_checksum_and_the_next_run_recovers(tmp_path):
    src = _remote(tmp_path, {"model.pt": SHARD, "model.pt.sha256": _sums(**{"model.pt": SHARD})})
    dest = tmp_path / "dl"
    dest.mkdir()
    (dest / "model.pt.part").write_bytes(b"\xee" * 1000)  # not a prefix of the source
    url = src.as_uri() + "/model.pt"
    with pytest.raises(CheckpointError, match="sha256 mismatch"):
        resolve_checkpoint(url, str(tmp_path), dest=str(dest), progress=False)
    assert os.listdir(dest) == []  # the bad partial file was removed
    assert resolve_checkpoint(url, str(tmp_path), dest=str(dest), progress=False) == str(dest / "model.pt")
    assert (dest / "model.pt").read_bytes() == SHARD


def test_fsspec_keeps_a_complete_verified_file_and_replaces_a_stale_one(tmp_path, caplog):
    src = _remote(tmp_path, {"model.pt": SHARD})
    (src / "SHA256SUMS").write_bytes(_sums(**{"model.pt": SHARD}))
    dest = tmp_path / "dl"
    dest.mkdir()
    (dest / "model.pt").write_bytes(SHARD)
    os.utime(dest / "model.pt", (1, 1))
    with caplog.at_level(logging.INFO, logger="hubconv.sources"):
        resolve_checkpoint(src.as_uri() + "/model.pt", str(tmp_path), dest=str(dest), progress=False)
    assert os.stat(dest / "model.pt").st_mtime == 1  # not copied again
    assert "already downloaded" in caplog.text
    (dest / "model.pt").write_bytes(b"\x00" * len(SHARD))  # same size, wrong bytes
    resolve_checkpoint(src.as_uri() + "/model.pt", str(tmp_path), dest=str(dest), progress=False)
    assert (dest / "model.pt").read_bytes() == SHARD


def test_fsspec_truncated_source_is_an_error_naming_the_file(tmp_path, monkeypatch):
    from fsspec.implementations.local import LocalFileSystem

    src = _remote(tmp_path, {"model.pt": SHARD})
    real_info = LocalFileSystem.info
    monkeypatch.setattr(LocalFileSystem, "info", lambda self, p, **kw: {**real_info(self, p, **kw), "size": 2 << 20})
    with pytest.raises(CheckpointError, match=r"model\.pt: copied 1048576 bytes, the source has 2097152"):
        resolve_checkpoint(src.as_uri() + "/model.pt", str(tmp_path), dest=str(tmp_path / "dl"), progress=False)
    assert not (tmp_path / "dl" / "model.pt").exists()


@pytest.mark.usefixtures("loopback_hub_client")
@pytest.mark.filterwarnings("ignore:Use 'content=<...>':DeprecationWarning")
def test_hf_url_from_the_loopback_hub_is_verified_by_lfs_sha256_and_git_blob_id(tmp_path, monkeypatch):
    from huggingface_hub import CommitOperationAdd, HfApi

    from hubconv.devhub import DevHub

    big = os.urandom(11 << 20)  # > 10 MB: stored as LFS, so the Hub lists its sha256
    with DevHub(tmp_path / "hub") as hub:
        api = HfApi(endpoint=hub.url, token=hub.token)
        api.create_repo("devuser/ckpt")
        api.create_commit(
            "devuser/ckpt",
            [
                CommitOperationAdd("step-7/.metadata", META),
                CommitOperationAdd("step-7/__0_0.distcp", big),
            ],
            commit_message="checkpoint",
        )
        calls = []
        import hubconv.sources as sources

        real = sources._digest
        monkeypatch.setattr(sources, "_digest", lambda p, kind: calls.append(kind) or real(p, kind))
        out = resolve_checkpoint(
            "hf://devuser/ckpt/step-7",
            str(tmp_path),
            dest=str(tmp_path / "dl"),
            progress=False,
            hf_endpoint=hub.url,
            hf_token=hub.token,
        )
    assert out == str(tmp_path / "dl")
    assert (tmp_path / "dl" / "__0_0.distcp").read_bytes() == big
    assert (tmp_path / "dl" / ".metadata").read_bytes() == META
    assert sorted(calls) == ["git-blob", "sha256"]


def test_log_progress_prints_plain_lines_every_10_percent_or_30_seconds(capsys):
    from hubconv.sources import _LogProgress

    now = [0.0]
    with _LogProgress(1000, clock=lambda: now[0]) as bar:
        for _ in range(10):
            bar.update(25)  # 25 % in 2.5 % steps: lines at 10 % and 20 %
        now[0] = 31.0
        bar.update(1)  # 30 s without a line
        bar.update(749)
    lines = capsys.readouterr().out.splitlines()
    assert [ln.split("(")[1].split("%")[0] for ln in lines] == ["10", "20", "25", "100"]
    assert lines[-1].startswith("checkpoint: 1,000 / 1,000 bytes (100%")


def test_release_assets_progress_in_log_mode(gh, tmp_path, capsys):
    two_file_release(gh)
    resolve(gh, tmp_path, progress="log")
    total = len(META) + len(SHARD)
    assert f"checkpoint: {total:,} / {total:,} bytes (100%" in capsys.readouterr().out


class _RangeServer:
    """A loopback HTTP file server with Range support that records each request's Range header."""

    def __init__(self, files: dict[str, bytes], content_type: str | None = "application/octet-stream") -> None:
        import http.server
        import threading

        self.files, self.requests = files, []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def _send(self, body: bool) -> None:
                data = outer.files.get(self.path)
                outer.requests.append((self.command, self.path, self.headers.get("Range")))
                if data is None:
                    self.send_error(404)
                    return
                start, end = 0, len(data) - 1
                rng = self.headers.get("Range")
                if rng:
                    first, _, last = rng.removeprefix("bytes=").partition("-")
                    start, end = int(first), min(int(last) if last else end, end)
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{end}/{len(data)}")
                else:
                    self.send_response(200)
                self.send_header("Accept-Ranges", "bytes")
                if content_type:
                    self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(end - start + 1))
                self.end_headers()
                if body:
                    self.wfile.write(data[start : end + 1])

            def do_GET(self) -> None:
                self._send(True)

            def do_HEAD(self) -> None:
                self._send(False)

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> _RangeServer:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.mark.parametrize("content_type", ["application/octet-stream", None])
def test_https_style_url_resumes_with_range_requests_and_checks_the_published_sha256(tmp_path, content_type):
    pytest.importorskip("aiohttp")
    data = os.urandom(3 << 20)
    files = {"/ckpt/model.pt": data, "/ckpt/model.pt.sha256": _sums(**{"model.pt": data})}
    dest = tmp_path / "dl"
    dest.mkdir()
    (dest / "model.pt.part").write_bytes(data[: 1 << 20])  # an interrupted earlier run
    with _RangeServer(files, content_type) as server:
        out = resolve_checkpoint(f"{server.url}/ckpt/model.pt", str(tmp_path), dest=str(dest), progress=False)
        ranges = [r for m, p, r in server.requests if m == "GET" and p == "/ckpt/model.pt"]
    assert out == str(dest / "model.pt") and (dest / "model.pt").read_bytes() == data
    # no request asked for the bytes the .part already had, and the URL was never fetched whole
    assert ranges and all(r and int(r.removeprefix("bytes=").split("-")[0]) >= 1 << 20 for r in ranges)

    files["/ckpt/model.pt.sha256"] = _sums(**{"model.pt": b"something else"})
    with _RangeServer(files, content_type) as server, pytest.raises(CheckpointError, match="sha256 mismatch"):
        resolve_checkpoint(f"{server.url}/ckpt/model.pt", str(tmp_path), dest=str(tmp_path / "dl2"), progress=False)
