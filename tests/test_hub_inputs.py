"""Hub inputs are checked before any request: tokens, endpoint URLs, repo ids and the folder `hubconv push` publishes.
Every refusal is one line naming the field, and no message echoes a token, URL userinfo or a query string."""

from __future__ import annotations

import json
import os
import socket

import pytest

from hubconv import cli
from hubconv.credentials import InputError, check_endpoint, check_repo_id, clean_token, redact, redact_url
from hubconv.devhub import DevHub
from hubconv.errors import HubconvError
from hubconv.hub import check_folder, push

pytestmark = [
    pytest.mark.usefixtures("loopback_hub_client"),
    pytest.mark.filterwarnings("ignore:Use 'content=<...>':DeprecationWarning"),
]
SECRET = "hf_SeCrEtVaLuE0123456789abcdef"


@pytest.fixture
def hub(tmp_path):
    with DevHub(str(tmp_path / "hubdata"), orgs=("org",)) as server:
        yield server


def closed_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def model_folder(path) -> str:
    """The smallest folder `push` accepts: config.json and one safetensors file."""
    import torch
    from safetensors.torch import save_file

    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump({"model_type": "llama"}, f)
    save_file({"w": torch.zeros(2, 2)}, os.path.join(path, "model.safetensors"))
    return str(path)


# ------------------------------------------------------------------------------------------------ tokens
@pytest.mark.parametrize("raw", [f"{SECRET}\n", f"  {SECRET} ", f"\t{SECRET}\r\n", SECRET])
def test_surrounding_whitespace_is_stripped_like_huggingface_hub(raw: str) -> None:
    from huggingface_hub.utils._auth import _clean_token

    assert clean_token(raw, "HF_TOKEN") == SECRET == _clean_token(raw)


@pytest.mark.parametrize(
    ("raw", "kind"),
    [
        (f"{SECRET[:10]}\x07{SECRET[10:]}", "a control character (U+0007)"),
        (f"{SECRET[:10]}\n{SECRET[10:]}", "a control character (U+000A)"),
        (f"{SECRET[:10]} {SECRET[10:]}", "whitespace (U+0020)"),
        (f"{SECRET[:10]}\u00e9{SECRET[10:]}", "a non-ASCII character (U+00E9)"),
        (f"{SECRET[:10]}\u200b{SECRET[10:]}", "a non-ASCII character (U+200B)"),
    ],
)
def test_a_bad_character_inside_a_token_is_refused_without_showing_it(raw: str, kind: str) -> None:
    with pytest.raises(InputError) as e:
        clean_token(raw, "input `hf-token`")
    message = str(e.value)
    assert message.startswith("input `hf-token`: the token contains ") and kind in message
    assert "\n" not in message and SECRET[:10] not in message and SECRET[10:] not in message


def test_an_empty_token_is_none() -> None:
    assert clean_token(" \r\n", "HF_TOKEN") is None and clean_token(None, "HF_TOKEN") is None


# ------------------------------------------------------------------------------------------------ endpoints
@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("http://alice:s3cret@127.0.0.1:1", "carries credentials"),
        ("https://s3cret@hub.example", "carries credentials"),
        ("file:///etc/passwd", "has file://; the Hub endpoint must be an http:// or https:// URL"),
        ("ftp://hub.example/", "has ftp://"),
        ("huggingface.co", "has no scheme"),
        ("http://", "has no host"),
        ("https:///path", "has no host"),
        ("http://hub.example:99999", "is not a valid URL"),
        ("https://hub.example/?token=s3cret", "must not have a query string or fragment"),
        ("https://hub.example/#s3cret", "must not have a query string or fragment"),
        ("https://hub.example/\n", "whitespace or control characters"),
    ],
)
def test_endpoints_refused_with_the_field_named(url: str, expected: str) -> None:
    with pytest.raises(InputError) as e:
        check_endpoint(url, "--endpoint")
    message = str(e.value)
    assert message.startswith("--endpoint: ") and expected in message, message
    assert "s3cret" not in message and "alice" not in message and "\n" not in message


@pytest.mark.parametrize(
    ("url", "clean"),
    [
        ("https://huggingface.co/", "https://huggingface.co"),
        ("http://127.0.0.1:8000", "http://127.0.0.1:8000"),
        ("http://[::1]:8000/hub/", "http://[::1]:8000/hub"),
    ],
)
def test_good_endpoints_pass(url: str, clean: str) -> None:
    assert check_endpoint(url, "--endpoint") == clean


# ------------------------------------------------------------------------------------------------ repo ids
@pytest.mark.parametrize(
    ("repo_id", "expected"),
    [
        ("../../etc", "not a valid Hub repo id"),
        ("a/b/c", "not a valid Hub repo id"),
        ("org/", "not a valid Hub repo id"),
        ("org/na me", "not a valid Hub repo id"),
        ("org/x--y", "Cannot have -- or .."),
        ("org/model.git", "not a valid Hub repo id"),
        ("model", "has no namespace; publishing needs 'namespace/name'"),
        ("", "a Hub repo id 'namespace/name' is required"),
    ],
)
def test_repo_ids_refused_with_the_field_named(repo_id: str, expected: str) -> None:
    with pytest.raises(InputError, match=r"^hub\.repo_id: ") as e:
        check_repo_id(repo_id, "hub.repo_id")
    assert expected in str(e.value) and "\n" not in str(e.value)


def test_good_repo_ids_pass() -> None:
    assert check_repo_id("org/model-1.5_b", "--repo-id") == "org/model-1.5_b"


@pytest.mark.parametrize("repo_id", ["../../etc", "a/b/c", "org/", "model"])
def test_push_checks_the_repo_id_before_any_request(hub, tmp_path, repo_id: str) -> None:
    folder = model_folder(tmp_path / "m")
    with pytest.raises(InputError, match=r"^--repo-id: "):
        push(folder, repo_id, endpoint=hub.url, token=hub.token)
    assert hub.requests() == []


@pytest.mark.parametrize("url", ["file:///tmp/hub", "ftp://127.0.0.1/", "http://u:s3cret@127.0.0.1:1", "http://"])
def test_push_checks_the_endpoint_before_any_request(tmp_path, monkeypatch, url: str) -> None:
    import huggingface_hub

    def no_requests(*a, **k):  # pragma: no cover - reached only if the check is missing
        raise AssertionError("a Hub client was created")

    monkeypatch.setattr(huggingface_hub, "HfApi", no_requests)
    folder = model_folder(tmp_path / "m")
    with pytest.raises(InputError, match=r"^--endpoint: ") as e:
        push(folder, "org/m", endpoint=url, token=SECRET)
    assert "s3cret" not in str(e.value)
    monkeypatch.setenv("HF_ENDPOINT", url)
    with pytest.raises(InputError, match=r"^HF_ENDPOINT: "):
        push(folder, "org/m", token=SECRET)


def test_closed_port_is_one_line_naming_the_endpoint(tmp_path, capsys) -> None:
    folder = model_folder(tmp_path / "m")
    url = f"http://127.0.0.1:{closed_port()}"
    with pytest.raises(HubconvError) as e:
        push(folder, "org/m", endpoint=url, token=SECRET)
    message = str(e.value)
    assert message.startswith(f"cannot reach the Hub at {url} (--endpoint): ConnectError"), message
    assert "\n" not in message and SECRET not in message + capsys.readouterr().err


def test_cli_closed_port_and_bad_endpoint_exit_1_with_one_line(tmp_path, capsys, monkeypatch) -> None:
    folder = model_folder(tmp_path / "m")
    monkeypatch.setenv("HF_TOKEN", SECRET)
    url = f"http://127.0.0.1:{closed_port()}"
    assert cli.main(["push", folder, "--repo-id", "org/m", "--endpoint", url]) == 1
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("hubconv: error:")]
    assert len(errors) == 1 and errors[0].startswith(f"hubconv: error: cannot reach the Hub at {url} (--endpoint)")
    assert "Traceback" not in err and SECRET not in err
    assert cli.main(["push", folder, "--repo-id", "org/m", "--endpoint", "file:///x"]) == 1
    assert capsys.readouterr().err.startswith("hubconv: error: --endpoint: 'file:///x' has file://")


# ------------------------------------------------------------------------------------------------ the folder
def _bad_folders(tmp_path) -> list[tuple[str, str]]:
    cases = [(str(tmp_path / "missing"), "no such folder")]
    file = tmp_path / "file.safetensors"
    file.write_bytes(b"x")
    cases.append((str(file), "not a folder"))
    (tmp_path / "empty").mkdir()
    cases.append((str(tmp_path / "empty"), "no config.json"))
    no_weights = tmp_path / "no-weights"
    no_weights.mkdir()
    (no_weights / "config.json").write_text("{}")
    cases.append((str(no_weights), r"no weight files \(\*.safetensors\)"))
    bad_config = model_folder(tmp_path / "bad-config")
    open(os.path.join(bad_config, "config.json"), "w").write("[1, 2]")
    cases.append((bad_config, "config.json: expected a JSON object"))
    broken = model_folder(tmp_path / "broken-index")
    index = {"metadata": {}, "weight_map": {"w": "model.safetensors", "v": "model-00002-of-00002.safetensors"}}
    json.dump(index, open(os.path.join(broken, "model.safetensors.index.json"), "w"))
    cases.append((broken, r"tensor 'v' is in 'model-00002-of-00002.safetensors', which is not in the folder"))
    escaping = model_folder(tmp_path / "escaping")
    outside = tmp_path / "outside.txt"
    outside.write_text("not for publishing")
    os.symlink(outside, os.path.join(escaping, "notes.txt"))
    cases.append((escaping, "notes.txt is a symlink leading outside the folder"))
    return cases


def test_push_refuses_a_folder_that_is_not_a_model_before_any_request(hub, tmp_path) -> None:
    for folder, expected in _bad_folders(tmp_path):
        with pytest.raises(HubconvError, match=expected):
            push(folder, "org/tiny", endpoint=hub.url, token=hub.token, tag="v1")
    assert hub.requests() == [] and hub.head("org/tiny") is None
    good = model_folder(tmp_path / "good")  # negative control: the checks pass a real model folder
    json.dump({"weight_map": {"w": "model.safetensors"}}, open(os.path.join(good, "model.safetensors.index.json"), "w"))
    os.symlink("model.safetensors", os.path.join(good, "alias.safetensors"))  # inside: allowed
    result = push(good, "org/tiny", endpoint=hub.url, token=hub.token, tag="v1")
    assert hub.head("org/tiny", "v1") == result.commit_sha


def test_streamed_shards_count_as_weights(tmp_path) -> None:
    folder = tmp_path / "streamed"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"w": "model-1.safetensors"}}))
    with pytest.raises(HubconvError, match="no weight files"):
        check_folder(str(folder))
    check_folder(str(folder), ["model-1.safetensors"])


def test_cli_push_of_a_missing_folder_exits_1_and_touches_nothing(hub, tmp_path, capsys, monkeypatch) -> None:
    monkeypatch.setenv("HF_TOKEN", hub.token)
    missing = str(tmp_path / "nope")
    assert cli.main(["push", missing, "--repo-id", "org/tiny", "--endpoint", hub.url, "--tag", "v1"]) == 1
    assert (
        capsys.readouterr().err
        == f"hubconv: error: {missing}: no such folder (hubconv push publishes a release folder)\n"
    )
    assert hub.requests() == [] and hub.head("org/tiny") is None


# ------------------------------------------------------------------------------------------------ redaction
def test_redact_drops_userinfo_queries_bearer_and_known_secrets() -> None:
    text = (
        "GET https://u:pw@host.example:8443/a/b?X-Amz-Signature=abc&token=def#frag failed; "
        "HTTPConnectionPool(host='h', port=1): Max retries exceeded with url: /api/x?access_token=ghi; "
        "Illegal header value b'Bearer hf_abcdefghijklmnopqrstuvwxyz\\n'; Authorization: token custom-secret-42"
    )
    out = redact(text, "custom-secret-42")
    assert "https://host.example:8443/a/b failed" in out and "url: /api/x" in out
    for secret in ("u:pw", "abc", "def", "frag", "ghi", "hf_abcdefghijklmnopqrstuvwxyz", "custom-secret-42"):
        assert secret not in out, (secret, out)
    assert redact("HTTP 404: repo org/model not found") == "HTTP 404: repo org/model not found"  # control
    assert redact_url("http://a:b@h:1/p?q=1") == "http://h:1/p"
