"""The dev Hub (hubconv.devhub) driven by the REAL huggingface_hub client.

Xet must be off for the client to use the LFS "basic" transfer the dev Hub speaks. `HF_HUB_DISABLE_XET` is read
into `huggingface_hub.constants` once, at import, and other test modules usually import huggingface_hub first, so
setting the env var here would be too late (and would leak into later tests). Instead each test patches
`huggingface_hub.constants.HF_HUB_DISABLE_XET`, which `is_xet_available()` and the download path read at call
time (same for `HF_HUB_OFFLINE` / `is_offline_mode()`).
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
import time

import httpx2
import pytest
from huggingface_hub import (
    CommitOperationAdd,
    CommitOperationDelete,
    HfApi,
    get_hf_file_metadata,
    hf_hub_download,
    hf_hub_url,
    snapshot_download,
)
from huggingface_hub.errors import (
    BadRequestError,
    EntryNotFoundError,
    HfHubHTTPError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils import get_session

from hubconv.devhub import DevHub
from hubconv.devhub.storage import canonical_json, git_blob_sha1

BIG = 10_500_000  # > 10 MB: must go through LFS
# lfs.py streams file objects with `data=` (httpx2 deprecates that in favour of `content=`): client-side noise.
pytestmark = [
    pytest.mark.usefixtures("loopback_hub_client"),
    pytest.mark.filterwarnings("ignore:Use 'content=<...>':DeprecationWarning"),
]


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    with DevHub(tmp_path_factory.mktemp("devhub-data")) as server:
        yield server


@pytest.fixture(autouse=True)
def _reset_faults(request):
    yield
    if "hub" in request.fixturenames:
        request.getfixturevalue("hub").clear_faults()


@pytest.fixture
def api(hub):
    return HfApi(endpoint=hub.url, token=hub.token)


@pytest.fixture
def repo(api, request):
    name = "devuser/" + request.node.name.replace("_", "-").replace("[", "-").replace("]", "")[:80]
    api.create_repo(name)
    return name


@pytest.fixture(scope="module")
def big_bytes():
    return os.urandom(BIG)


def _raw(hub, method, path, *, token=None, **kwargs):
    headers = kwargs.pop("headers", {})
    if token:
        headers["Authorization"] = f"Bearer {token}"
    return get_session().request(method, hub.url + path, headers=headers, **kwargs)


# ----------------------------------------------------------------------------------------------- auth / repos
def test_whoami_roles_and_missing_or_bad_token(hub):
    assert HfApi(endpoint=hub.url, token=hub.token).whoami()["auth"]["accessToken"]["role"] == "write"
    me = HfApi(endpoint=hub.url, token=hub.read_token).whoami()
    assert me["name"] == "devuser" and me["auth"]["accessToken"]["role"] == "read"
    assert _raw(hub, "GET", "/api/whoami-v2").status_code == 401
    with pytest.raises(HfHubHTTPError) as e:
        HfApi(endpoint=hub.url, token="hf_not_a_valid_token_at_all").whoami()
    assert e.value.response.status_code == 401


def test_create_repo_exist_ok_and_initial_commit(api, hub):
    url = api.create_repo("devuser/created")
    assert url.repo_id == "devuser/created" and url.startswith(hub.url)
    with pytest.raises(HfHubHTTPError) as e:
        api.create_repo("devuser/created")
    assert e.value.response.status_code == 409
    assert api.create_repo("devuser/created", exist_ok=True).repo_id == "devuser/created"
    info = api.model_info("devuser/created")
    assert info.sha == hub.head("devuser/created") and info.private is False
    assert [s.rfilename for s in info.siblings] == [".gitattributes"]
    assert [c.title for c in api.list_repo_commits("devuser/created")] == ["initial commit"]
    with pytest.raises(HfHubHTTPError) as e:  # not a namespace this user belongs to
        api.create_repo("someone-else/x")
    assert e.value.response.status_code == 403
    api.delete_repo("devuser/created")
    assert not api.repo_exists("devuser/created")
    with pytest.raises(RepositoryNotFoundError):
        api.delete_repo("devuser/created")


def test_read_token_cannot_write_and_missing_token_is_401(hub, repo):
    head = hub.head(repo)
    reader = HfApi(endpoint=hub.url, token=hub.read_token)
    assert reader.list_repo_files(repo) == [".gitattributes"]  # reading is fine
    with pytest.raises(HfHubHTTPError) as e:
        reader.upload_file(path_or_fileobj=b"x", path_in_repo="x.txt", repo_id=repo)
    assert e.value.response.status_code == 403
    with pytest.raises(HfHubHTTPError) as e:
        reader.create_repo("devuser/by-reader")
    assert e.value.response.status_code == 403
    anon = HfApi(endpoint=hub.url, token=False)
    with pytest.raises(HfHubHTTPError) as e:
        anon.create_repo("devuser/by-anon")
    assert e.value.response.status_code == 401
    mark = hub.mark()
    with pytest.raises(HfHubHTTPError) as e:
        anon.create_commit(repo, [CommitOperationAdd("x.txt", b"x")], commit_message="anon")
    assert e.value.response.status_code == 401
    assert hub.head(repo) == head
    # The anonymous commit attempt reached the server and every write request it made was refused.
    writes = [r for r in hub.requests(since=mark) if r["method"] in ("POST", "PUT", "DELETE")]
    assert writes, "the anonymous commit attempt made no write request"
    assert {r["status"] for r in writes} <= {401, 403}, writes


def test_private_repo_invisible_to_other_token_and_anonymous(api, hub, tmp_path):
    api.create_repo("devuser/secret", private=True)
    api.upload_file(path_or_fileobj=b"classified", path_in_repo="s.txt", repo_id="devuser/secret")
    other = HfApi(endpoint=hub.url, token=hub.add_token("mallory"))
    anon = HfApi(endpoint=hub.url, token=False)
    for client in (other, anon):
        with pytest.raises(RepositoryNotFoundError):
            client.model_info("devuser/secret")
        with pytest.raises(RepositoryNotFoundError):
            client.list_repo_files("devuser/secret")
        assert not client.repo_exists("devuser/secret")
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download("devuser/secret", "s.txt", endpoint=hub.url, token=other.token, cache_dir=tmp_path)
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download("devuser/secret", "s.txt", endpoint=hub.url, token=False, cache_dir=tmp_path / "anon")
    # The owner's read token sees it; a public repo is visible to others, but they cannot push to its main branch.
    assert HfApi(endpoint=hub.url, token=hub.read_token).model_info("devuser/secret").private is True
    api.create_repo("devuser/open")
    assert other.list_repo_files("devuser/open") == [".gitattributes"]
    assert anon.list_repo_files("devuser/open") == [".gitattributes"]
    with pytest.raises(HfHubHTTPError) as e:
        other.upload_file(path_or_fileobj=b"x", path_in_repo="x.txt", repo_id="devuser/open")
    assert e.value.response.status_code == 403
    pr = other.upload_file(path_or_fileobj=b"x", path_in_repo="x.txt", repo_id="devuser/open", create_pr=True)
    assert pr.pr_num == 1  # anyone with a write token may open a PR on a public repo


# ----------------------------------------------------------------------------------------------- uploads
def test_upload_folder_small_and_lfs_then_download_round_trip(api, hub, repo, tmp_path, big_bytes):
    local = tmp_path / "local"
    (local / "sub").mkdir(parents=True)
    files = {
        "config.json": b'{"hidden_size": 8}',
        "sub/notes.txt": b"hello\n",
        "model.safetensors": big_bytes,  # > 10 MB -> LFS
        "tiny.safetensors": b"tiny-but-lfs-by-gitattributes",  # *.safetensors is LFS in the default .gitattributes
    }
    for rel, data in files.items():
        (local / rel).write_bytes(data)
    ci = api.upload_folder(repo_id=repo, folder_path=local, commit_message="add files")
    assert ci.oid == hub.head(repo)

    info = api.model_info(repo, files_metadata=True)
    sib = {s.rfilename: s for s in info.siblings}
    assert sib["model.safetensors"].lfs.sha256 == hashlib.sha256(big_bytes).hexdigest()
    assert sib["model.safetensors"].size == BIG
    assert sib["tiny.safetensors"].lfs is not None
    assert sib["config.json"].lfs is None and sib["config.json"].blob_id == git_blob_sha1(files["config.json"])
    assert sorted(api.list_repo_files(repo)) == sorted([".gitattributes", *files])
    top = {e.path: type(e).__name__ for e in api.list_repo_tree(repo)}
    assert top["sub"] == "RepoFolder" and top["config.json"] == "RepoFile" and "sub/notes.txt" not in top
    assert [e.path for e in api.list_repo_tree(repo, path_in_repo="sub")] == ["sub/notes.txt"]

    snap = snapshot_download(repo, endpoint=hub.url, token=hub.token, cache_dir=tmp_path / "cache")
    for rel, data in files.items():
        assert (tmp_path / "cache").exists() and open(os.path.join(snap, rel), "rb").read() == data

    path = hf_hub_download(repo, "model.safetensors", endpoint=hub.url, token=hub.token, cache_dir=tmp_path / "c2")
    assert open(path, "rb").read() == big_bytes

    # Download metadata: ETag = sha256 for LFS, git blob sha1 for regular files; X-Repo-Commit = resolved commit.
    lfs_meta = get_hf_file_metadata(hf_hub_url(repo, "model.safetensors", endpoint=hub.url), token=hub.token)
    assert lfs_meta.etag == hashlib.sha256(big_bytes).hexdigest() and lfs_meta.size == BIG
    assert lfs_meta.commit_hash == ci.oid
    reg_meta = get_hf_file_metadata(hf_hub_url(repo, "config.json", endpoint=hub.url), token=hub.token)
    assert reg_meta.etag == git_blob_sha1(files["config.json"])

    # Range requests (used to resume downloads)
    r = _raw(hub, "GET", f"/{repo}/resolve/main/model.safetensors", token=hub.token, headers={"Range": "bytes=10-19"})
    assert r.status_code == 206 and r.content == big_bytes[10:20]
    assert r.headers["Content-Range"] == f"bytes 10-19/{BIG}"
    r = _raw(hub, "GET", f"/{repo}/resolve/main/config.json", token=hub.token, headers={"Range": "bytes=999-"})
    assert r.status_code == 416
    with pytest.raises(EntryNotFoundError):
        hf_hub_download(repo, "missing.txt", endpoint=hub.url, token=hub.token, cache_dir=tmp_path / "c3")


def test_preupload_then_commit_after_deleting_local_file(api, hub, repo, tmp_path, big_bytes):
    local = tmp_path / "weights.bin"
    local.write_bytes(big_bytes)
    op = CommitOperationAdd(path_in_repo="weights.bin", path_or_fileobj=str(local))
    api.preupload_lfs_files(repo, additions=[op])
    local.unlink()  # the commit must only reference the already-uploaded object
    mark = hub.mark()
    api.create_commit(repo, operations=[op], commit_message="commit preuploaded")
    after = hub.requests(since=mark)
    assert [r["method"] for r in after if "/_devhub/lfs/upload/" in r["path"]] == []
    commit_req = [r for r in after if r["path"].endswith("/commit/main")]
    assert len(commit_req) == 1 and commit_req[0]["status"] == 200 and commit_req[0]["bytesIn"] < 10_000
    assert hub.files(repo)["weights.bin"] == big_bytes


def test_reupload_of_existing_object_sends_no_bytes_and_no_new_commit(api, hub, repo, big_bytes):
    api.upload_file(path_or_fileobj=big_bytes, path_in_repo="a.bin", repo_id=repo)
    mark = hub.mark()
    api.upload_file(path_or_fileobj=big_bytes, path_in_repo="copy/b.bin", repo_id=repo)
    after = hub.requests(since=mark)
    assert any(r["path"].endswith(".git/info/lfs/objects/batch") for r in after)
    assert not [r for r in after if r["method"] == "PUT"], "an existing LFS object was uploaded again"
    assert sum(r["bytesIn"] for r in after) < 50_000
    assert hub.files(repo)["copy/b.bin"] == big_bytes

    head = hub.head(repo)
    mark = hub.mark()
    ci = api.upload_file(path_or_fileobj=big_bytes, path_in_repo="a.bin", repo_id=repo)  # unchanged file
    assert ci.oid == head == hub.head(repo)
    assert not hub.requests(since=mark, method="POST", path="/commit/"), "a no-op upload created a commit"


def test_commit_referencing_missing_lfs_object_is_rejected(api, hub, repo):
    head = hub.head(repo)
    op = CommitOperationAdd(path_in_repo="ghost.bin", path_or_fileobj=os.urandom(1024))
    op._upload_mode, op._is_uploaded, op._should_ignore = "lfs", True, False  # pretend it was uploaded
    with pytest.raises(BadRequestError) as e:
        api.create_commit(repo, operations=[op], commit_message="ghost")
    assert "ghost.bin" in str(e.value) and "LFS" in str(e.value)
    assert hub.head(repo) == head


def test_lfs_put_endpoint_verifies_sha256_and_size(api, hub, repo):
    data = os.urandom(4096)
    oid = hashlib.sha256(data).hexdigest()
    batch = _raw(
        hub,
        "POST",
        f"/{repo}.git/info/lfs/objects/batch",
        token=hub.token,
        json={"operation": "upload", "transfers": ["basic"], "objects": [{"oid": oid, "size": len(data)}]},
    ).json()
    assert batch["transfer"] == "basic"
    href = batch["objects"][0]["actions"]["upload"]["href"]
    assert get_session().put(href, content=data[:-1] + bytes([data[-1] ^ 1])).status_code == 400  # wrong bytes
    assert get_session().put(href, content=data[:100]).status_code == 400  # wrong size
    assert get_session().put(href.replace("sig=", "sig=0"), content=data).status_code == 403  # tampered URL
    assert not hub.storage.has_lfs_object(oid) and not list(hub.storage.tmp_dir.iterdir())
    # A client that disconnects in the middle of the body leaves nothing behind either.
    target = href[len(hub.url) :]
    mark = hub.mark()
    with socket.create_connection((hub.host, hub.port), timeout=10) as s:
        s.sendall(f"PUT {target} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(data)}\r\n\r\n".encode() + data[:1000])
    deadline = time.monotonic() + 10
    while not hub.requests(since=mark, method="PUT") and time.monotonic() < deadline:
        time.sleep(0.02)
    (cut,) = hub.requests(since=mark, method="PUT")
    assert cut["status"] is None and cut["bytesIn"] == 1000 and cut["fault"] == "client-disconnected"
    assert not hub.storage.has_lfs_object(oid) and not list(hub.storage.tmp_dir.iterdir())
    assert get_session().put(href, content=data).status_code == 200
    assert hub.storage.repo_has_lfs(hub._ref(repo), oid)
    again = _raw(
        hub,
        "POST",
        f"/{repo}.git/info/lfs/objects/batch",
        token=hub.token,
        json={"operation": "upload", "transfers": ["basic"], "objects": [{"oid": oid, "size": len(data)}]},
    ).json()
    assert "actions" not in again["objects"][0]  # already present: nothing to upload


def test_delete_file_and_folder(api, hub, repo):
    api.create_commit(
        repo,
        [CommitOperationAdd("d/a.txt", b"a"), CommitOperationAdd("d/b.txt", b"b"), CommitOperationAdd("c.txt", b"c")],
        commit_message="three files",
    )
    api.delete_file("c.txt", repo)
    api.create_commit(repo, [CommitOperationDelete("d/")], commit_message="drop folder")  # deletedFolder
    assert api.list_repo_files(repo) == [".gitattributes"]
    with pytest.raises(EntryNotFoundError):
        api.delete_file("c.txt", repo)


# ----------------------------------------------------------------------------------------------- refs / PRs
def test_tags_branches_and_refs(api, hub, repo):
    api.create_tag(repo, tag="v1.0", tag_message="first")
    with pytest.raises(HfHubHTTPError) as e:
        api.create_tag(repo, tag="v1.0")
    assert e.value.response.status_code == 409
    api.create_tag(repo, tag="v1.0", exist_ok=True)
    api.create_branch(repo, branch="dev")
    api.upload_file(path_or_fileobj=b"dev only", path_in_repo="dev.txt", repo_id=repo, revision="dev")
    refs = api.list_repo_refs(repo)
    assert {b.name for b in refs.branches} == {"main", "dev"}
    assert [(t.name, t.target_commit) for t in refs.tags] == [("v1.0", hub.head(repo))]
    assert "dev.txt" in api.list_repo_files(repo, revision="dev")
    assert "dev.txt" not in api.list_repo_files(repo, revision="v1.0")
    tagged = hub.head(repo)
    assert api.model_info(repo, revision=tagged).sha == tagged  # revision = commit sha
    with pytest.raises(RevisionNotFoundError):
        api.model_info(repo, revision="nope")
    api.delete_tag(repo, tag="v1.0")
    api.delete_branch(repo, branch="dev")
    refs = api.list_repo_refs(repo)
    assert refs.tags == [] and [b.name for b in refs.branches] == ["main"]


def test_create_pr_then_push_to_pr_ref_then_merge(api, hub, repo, tmp_path):
    main_before = hub.head(repo)
    ci = api.upload_file(path_or_fileobj=b"v1", path_in_repo="pr.txt", repo_id=repo, create_pr=True)
    assert ci.pr_num == 1 and ci.pr_revision == "refs/pr/1" and ci.pr_url.endswith(f"/{repo}/discussions/1")
    assert hub.head(repo) == main_before  # main untouched
    ci2 = api.upload_file(path_or_fileobj=b"v2", path_in_repo="pr.txt", repo_id=repo, revision="refs/pr/1")
    assert ci2.pr_num is None and hub.head(repo, "refs/pr/1") == ci2.oid
    details = api.get_discussion_details(repo, 1)
    assert details.is_pull_request and details.status == "open" and details.target_branch == "refs/heads/main"
    assert [e.oid for e in details.events if e.type == "commit"] == [ci.oid, ci2.oid]
    assert "pr.txt" in details.diff and details.conflicting_files == []
    pr_file = hf_hub_download(
        repo, "pr.txt", revision="refs/pr/1", endpoint=hub.url, token=hub.token, cache_dir=tmp_path
    )  # the client percent-encodes the revision: refs%2Fpr%2F1
    assert open(pr_file, "rb").read() == b"v2"
    prs = api.list_repo_refs(repo, include_pull_requests=True).pull_requests
    assert [(p.ref, p.target_commit) for p in prs] == [("refs/pr/1", ci2.oid)]
    assert "pr.txt" not in api.list_repo_files(repo)
    api.merge_pull_request(repo, 1)
    assert hub.files(repo)["pr.txt"] == b"v2"
    merged = api.get_discussion_details(repo, 1)
    assert merged.status == "merged" and merged.merge_commit_oid == hub.head(repo)
    with pytest.raises(HfHubHTTPError):  # a merged PR takes no more commits
        api.upload_file(path_or_fileobj=b"v3", path_in_repo="pr.txt", repo_id=repo, revision="refs/pr/1")


def test_discussion_comments_edit_and_events(api, hub, repo):
    disc = api.create_discussion(repo, title="Question about weights", description="Which dtype?")
    assert disc.num == 1 and not disc.is_pull_request and disc.status == "open"
    comment = api.comment_discussion(repo, disc.num, "bf16, I think")
    edited = api.edit_discussion_comment(repo, disc.num, comment.id, "bf16, confirmed")
    assert edited.content == "bf16, confirmed" and edited.edited and edited.number_of_edits == 2
    other = HfApi(endpoint=hub.url, token=hub.add_token("bob"))
    with pytest.raises(HfHubHTTPError) as e:  # only the author edits a comment
        other.edit_discussion_comment(repo, disc.num, comment.id, "vandalized")
    assert e.value.response.status_code == 403
    api.rename_discussion(repo, disc.num, "Dtype of the weights")
    api.change_discussion_status(repo, disc.num, "closed", comment="answered")
    details = api.get_discussion_details(repo, disc.num)
    assert [e.type for e in details.events] == ["comment", "comment", "title-change", "comment", "status-change"]
    assert details.events[1].content == "bf16, confirmed" and details.events[4].new_status == "closed"
    assert details.title == "Dtype of the weights" and details.status == "closed"
    listed = list(api.get_repo_discussions(repo))
    assert [(d.num, d.status, d.is_pull_request) for d in listed] == [(1, "closed", False)]
    assert list(api.get_repo_discussions(repo, discussion_status="open")) == []


# ----------------------------------------------------------------------------------------------- failures
def test_stale_parent_commit_gets_412(api, hub, repo):
    base = hub.head(repo)
    api.upload_file(path_or_fileobj=b"1", path_in_repo="one.txt", repo_id=repo)
    head = hub.head(repo)
    with pytest.raises(HfHubHTTPError) as e:
        api.create_commit(repo, [CommitOperationAdd("two.txt", b"2")], commit_message="stale", parent_commit=base)
    assert e.value.response.status_code == 412
    assert hub.head(repo) == head
    api.create_commit(repo, [CommitOperationAdd("two.txt", b"2")], commit_message="fresh", parent_commit=head)
    assert hub.head(repo) != head


def test_injected_500_or_drop_on_commit_leaves_repo_unchanged(api, hub, repo, big_bytes):
    head = hub.head(repo)
    hub.fail_next(1, method="POST", path="/commit/", status=500)
    with pytest.raises(HfHubHTTPError) as e:
        api.upload_file(path_or_fileobj=big_bytes, path_in_repo="w.bin", repo_id=repo)
    assert e.value.response.status_code == 500
    assert hub.head(repo) == head and api.list_repo_files(repo) == [".gitattributes"]
    hub.drop_next(1, method="POST", path="/commit/")  # the commit POST is not retried by the client
    with pytest.raises(httpx2.TransportError):
        api.upload_file(path_or_fileobj=b"small", path_in_repo="s.txt", repo_id=repo)
    assert hub.requests(method="POST", path="/commit/")[-1]["fault"] == "drop"
    assert hub.head(repo) == head and api.list_repo_files(repo) == [".gitattributes"]
    # the object itself was uploaded: retrying the commit sends no bytes again
    mark = hub.mark()
    api.upload_file(path_or_fileobj=big_bytes, path_in_repo="w.bin", repo_id=repo)
    assert not hub.requests(since=mark, method="PUT")
    assert hub.files(repo)["w.bin"] == big_bytes


def test_dropped_connection_mid_upload_raises_or_retries(api, hub, repo):
    data = os.urandom(BIG)
    oid = hashlib.sha256(data).hexdigest()
    head = hub.head(repo)
    upload_path = "/_devhub/lfs/upload/"
    hub.drop_next(10, method="PUT", path=upload_path, after_bytes=1_000_000)  # more than the client's 5 retries
    mark = hub.mark()
    with pytest.raises(RuntimeError, match="Error while uploading"):
        api.upload_file(path_or_fileobj=data, path_in_repo="x.bin", repo_id=repo)
    drops = hub.requests(since=mark, method="PUT", path=upload_path)
    assert len(drops) == 6 and all(r["status"] is None and r["bytesIn"] == 1_000_000 for r in drops)
    assert hub.head(repo) == head and not hub.storage.has_lfs_object(oid)
    assert not list(hub.storage.tmp_dir.iterdir()), "partial upload left behind"

    hub.clear_faults()
    hub.drop_next(1, method="PUT", path=upload_path, after_bytes=2_000_000)  # one drop: the client retries
    mark = hub.mark()
    api.upload_file(path_or_fileobj=data, path_in_repo="x.bin", repo_id=repo)
    statuses = [r["status"] for r in hub.requests(since=mark, method="PUT")]
    assert statuses == [None, 200]
    assert hub.files(repo)["x.bin"] == data


def test_429_and_503_are_retried_by_the_client(api, hub, repo):
    hub.fail_next(1, method="POST", path="/preupload/", status=503)
    hub.fail_next(1, method="POST", path="/preupload/", status=429)
    mark = hub.mark()
    api.upload_file(path_or_fileobj=b"ok", path_in_repo="ok.txt", repo_id=repo)
    assert [r["status"] for r in hub.requests(since=mark, path="/preupload/")] == [503, 429, 200]
    assert hub.files(repo)["ok.txt"] == b"ok"


def test_latency_injection(hub, api, repo):
    hub.add_latency(0.3, method="GET", path="/refs$", count=1)
    t0 = time.monotonic()
    api.list_repo_refs(repo)
    assert time.monotonic() - t0 >= 0.3
    assert hub.list_faults() == []


def test_readme_commit_triggers_validate_yaml(api, hub, repo):
    mark = hub.mark()
    good = b"---\nlicense: apache-2.0\ntags:\n- hubconv\n---\n# Model\n"
    api.upload_file(path_or_fileobj=good, path_in_repo="README.md", repo_id=repo)
    assert [r["status"] for r in hub.requests(since=mark, path="^/api/validate-yaml$")] == [200]
    assert api.model_info(repo).card_data.license == "apache-2.0"
    head = hub.head(repo)
    mark = hub.mark()
    with pytest.raises(ValueError, match=r"Invalid metadata in README\.md"):
        api.upload_file(path_or_fileobj=b"---\nlicense: [unclosed\n---\n", path_in_repo="README.md", repo_id=repo)
    assert [r["status"] for r in hub.requests(since=mark, path="^/api/validate-yaml$")] == [400]
    assert not hub.requests(since=mark, path="/commit/") and hub.head(repo) == head
    # An alias bomb is refused by the bounded loader instead of being expanded.
    bomb = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join(['*' + chr(97 + i)] * 9)}]\n" for i in range(8)
    )
    mark = hub.mark()
    with pytest.raises(ValueError, match="alias bomb"):
        api.upload_file(path_or_fileobj=f"---\n{bomb}---\n".encode(), path_in_repo="README.md", repo_id=repo)
    assert [r["status"] for r in hub.requests(since=mark, path="^/api/validate-yaml$")] == [400]
    assert hub.head(repo) == head


# ----------------------------------------------------------------------------------------------- ops / protocol
def test_admin_http_api_is_guarded_by_the_write_token(hub, api, repo):
    rule = {"method": "GET", "path": "/refs$", "action": "status", "status": 503, "count": 1}
    assert _raw(hub, "POST", "/_devhub/faults", json=rule).status_code == 401
    assert _raw(hub, "POST", "/_devhub/faults", token=hub.read_token, json=rule).status_code == 403
    r = _raw(hub, "POST", "/_devhub/faults", token=hub.token, json=rule)
    assert r.status_code == 200 and r.json()["faults"][0]["status"] == 503
    assert _raw(hub, "GET", f"/api/models/{repo}/refs", token=hub.token).status_code == 503
    assert _raw(hub, "GET", f"/api/models/{repo}/refs", token=hub.token).status_code == 200
    log = _raw(hub, "GET", "/_devhub/requests?method=GET&path=/refs$", token=hub.token).json()["requests"]
    assert [e["status"] for e in log[-2:]] == [503, 200] and log[-1]["user"] == "devuser"
    assert _raw(hub, "GET", "/_devhub/requests", token=hub.read_token).status_code == 403


def test_chunked_request_body_and_keep_alive(hub):
    """Raw HTTP/1.1: a chunked POST then a GET on the same connection."""
    body = json.dumps({"content": "---\nlicense: mit\n---\n", "repoType": "model"}).encode()
    chunks = b"".join(b"%x\r\n%s\r\n" % (len(body[i : i + 7]), body[i : i + 7]) for i in range(0, len(body), 7))
    with socket.create_connection((hub.host, hub.port), timeout=10) as s:
        s.sendall(
            b"POST /api/validate-yaml HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
            b"Content-Type: application/json\r\n\r\n" + chunks + b"0\r\n\r\n"
        )
        s.sendall(b"GET /_devhub/health HTTP/1.1\r\nHost: x\r\n\r\n")
        data = b""
        while data.count(b"HTTP/1.1 ") < 2 or not data.endswith(b'{"ok": true}'):
            chunk = s.recv(65536)
            assert chunk, data
            data += chunk
    first, second = data.split(b"HTTP/1.1 ")[1:]
    assert first.startswith(b"200") and b'"errors": []' in first
    assert second.startswith(b"200")
    assert hub.requests(path="^/api/validate-yaml$")[-1]["chunked"] is True


def test_storage_layout_is_content_addressed(api, hub, repo, big_bytes):
    ci = api.upload_file(path_or_fileobj=big_bytes, path_in_repo="m.bin", repo_id=repo)
    rdir = hub.storage.repo_dir(hub._ref(repo))
    commit = json.loads((rdir / "commits" / f"{ci.oid}.json").read_bytes())
    assert hashlib.sha1(canonical_json({k: v for k, v in commit.items() if k != "sha"})).hexdigest() == ci.oid
    assert commit["parents"] == [api.list_repo_commits(repo)[1].commit_id]
    oid = hashlib.sha256(big_bytes).hexdigest()
    assert commit["tree"]["m.bin"]["lfs"]["oid"] == oid
    assert (hub.storage.root / "objects" / "lfs" / oid[:2] / oid[2:4] / oid).read_bytes() == big_bytes
    assert json.loads((rdir / "refs.json").read_bytes())["heads"]["main"] == ci.oid


def test_tokens_never_appear_in_logs(hub, api, repo, caplog):
    caplog.set_level("INFO", logger="hubconv.devhub")
    api.upload_file(path_or_fileobj=b"x", path_in_repo="t.txt", repo_id=repo)
    HfApi(endpoint=hub.url, token=hub.read_token).list_repo_files(repo)
    _raw(hub, "GET", "/_devhub/requests", token=hub.token)
    log_text = hub.log_path.read_text()
    request_log = json.dumps(hub.requests())
    assert "Bearer ***" in log_text and "sig=***" in log_text and "Bearer ***" in caplog.text
    for secret in (hub.token, hub.read_token):
        assert secret not in log_text and secret not in caplog.text and secret not in request_log


def test_cli_serve_prints_url_and_token(tmp_path):
    token, read_token = "hf_cli_write_token_0123456789", "hf_cli_read_token_0123456789"
    args = ["--port", "0", "--data", str(tmp_path / "d"), "--token", token, "--read-token", read_token]
    proc = subprocess.Popen(
        [sys.executable, "-m", "hubconv.devhub", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        lines = [proc.stdout.readline() for _ in range(3)]
        url = lines[0].split()[2]
        assert url.startswith("http://127.0.0.1:") and token in lines[2]
        assert HfApi(endpoint=url, token=token).whoami()["name"] == "devuser"
        assert HfApi(endpoint=url, token=read_token).whoami()["auth"]["accessToken"]["role"] == "read"
    finally:
        proc.send_signal(2)  # SIGINT, like Ctrl-C
        proc.wait(timeout=30)  # generous: CI machines can be busy
    assert proc.returncode == 0
    assert token not in (tmp_path / "d" / "devhub.log").read_text()
