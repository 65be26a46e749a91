"""Canary tokens through the real flows: `hubconv push` (successful and failing) and the GitHub Action, against the
loopback Hub and a loopback GitHub. Output, log records, `$GITHUB_OUTPUT`, the job summary, the report, what was
posted to GitHub and the dev Hub's log never contain the canary, except on `::add-mask::` lines."""

from __future__ import annotations

import json
import logging
import os
import secrets

import pytest

from hubconv import cli
from hubconv.action import run_action
from hubconv.devhub import DevHub
from tests.helpers import hubconv
from tests.test_action import github_env, parse_outputs, payload, workspace  # noqa: F401 - `workspace` is a fixture
from tests.test_hub_inputs import closed_port, model_folder

pytestmark = [
    pytest.mark.usefixtures("loopback_hub_client"),
    pytest.mark.filterwarnings("ignore:Use 'content=<...>':DeprecationWarning"),
]
# Random per run, so that nothing can contain it by accident; the tail alone also counts as a leak.
CANARY = "hf_CANARY" + secrets.token_hex(12)
GH_CANARY = "ghp_CANARY" + secrets.token_hex(12)
VARIANTS = [f"{CANARY}\n", f"  {CANARY} \r\n", f"\t{CANARY}"]


def leaks(text: str, *canaries: str) -> list[str]:
    """Lines of `text` showing a canary (or its random tail), `::add-mask::` lines aside."""
    canaries = canaries or (CANARY,)
    pieces = [p for c in canaries for p in (c, c[-24:])]
    return [
        line for line in text.splitlines() if not line.startswith("::add-mask::") and any(p in line for p in pieces)
    ]


def hub_traces(hub: DevHub) -> str:
    """Everything the dev Hub recorded: its log file and its request log."""
    log = open(hub.log_path, encoding="utf-8").read() if hub.log_path and os.path.exists(hub.log_path) else ""
    return log + "\n" + json.dumps(hub.requests())


def records(caplog) -> str:
    """Every log record, formatted and raw (message template and arguments)."""
    return "\n".join(f"{r.getMessage()} {r.msg!r} {r.args!r}" for r in caplog.records) + caplog.text


@pytest.fixture
def hub(tmp_path):
    with DevHub(str(tmp_path / "hubdata"), orgs=("org",)) as server:
        server.add_token("devuser", "write", orgs=("org",), token=CANARY)  # the canary is a valid write token
        yield server


def test_the_leak_check_can_fail() -> None:
    """Negative control for the assertions below."""
    assert leaks(f"Illegal header value b'Bearer {CANARY}\\n'") and leaks(f"x {CANARY[-24:]}")
    assert not leaks(f"::add-mask::{CANARY}")


def test_cli_push_with_a_trailing_newline_succeeds_and_never_prints_the_token(hub, tmp_path) -> None:
    """The reported bug: `HF_TOKEN` ending in a newline gave a traceback printing the token."""
    folder = model_folder(tmp_path / "m")
    env = {**os.environ, "HF_TOKEN": f"{CANARY}\n", "HF_ENDPOINT": hub.url, "GITHUB_ACTIONS": "true"}
    r = hubconv("push", folder, "--repo-id", "org/tiny", "--json", env=env)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout[r.stdout.index("{") :])["commit_sha"] == hub.head("org/tiny")
    assert f"::add-mask::{CANARY}" in r.stdout  # masked in Actions ...
    assert not leaks(r.stdout + r.stderr) and not leaks(hub_traces(hub))  # ... and shown nowhere else
    assert [r for r in hub.requests() if r["authenticated"]]  # the canary was really sent


@pytest.mark.parametrize("variant", VARIANTS)
def test_push_flows_never_show_the_canary(hub, tmp_path, capsys, caplog, monkeypatch, variant: str) -> None:
    caplog.set_level(logging.DEBUG)
    folder = model_folder(tmp_path / "m")
    monkeypatch.setenv("GITHUB_ACTIONS", "true")
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    argv = ["push", folder, "--repo-id", "org/tiny", "--tag", "v1"]
    outcomes = []
    monkeypatch.setenv("HF_TOKEN", variant)
    outcomes.append(("valid canary", cli.main(argv), 0))
    unknown = variant.replace(CANARY, CANARY[:-4] + "beef")  # not registered: the Hub answers 401
    monkeypatch.setenv("HF_TOKEN", unknown)
    outcomes.append(("rejected canary", cli.main(argv), 1))
    monkeypatch.setenv("HF_TOKEN", variant.replace(CANARY, f"{CANARY[:12]}\x07{CANARY[12:]}"))
    mark = hub.mark()
    outcomes.append(("control character", cli.main(argv), 1))
    assert hub.requests(since=mark) == []  # refused before any request
    monkeypatch.setenv("HF_TOKEN", variant)
    outcomes.append(("closed port", cli.main([*argv, "--endpoint", f"http://127.0.0.1:{closed_port()}"]), 1))
    assert [o[1] for o in outcomes] == [o[2] for o in outcomes], outcomes
    out, err = capsys.readouterr()
    canaries = (CANARY, unknown.strip())
    assert not leaks(out, *canaries) and not leaks(err, *canaries), (out, err)
    assert not leaks(records(caplog), *canaries) and not leaks(hub_traces(hub), *canaries)
    errors = [line for line in err.splitlines() if line.startswith("hubconv: error:")]
    assert len(errors) == 3 and "Traceback" not in err
    assert "rejected the Hub token (HTTP 401); check HF_TOKEN" in errors[0]
    assert "HF_TOKEN: the token contains a control character (U+0007)" in errors[1]
    assert "cannot reach the Hub at http://127.0.0.1:" in errors[2]


@pytest.mark.parametrize(
    "endpoint",
    [
        "http://devuser:{canary}@127.0.0.1:{port}",
        "http://127.0.0.1:{port}/?token={canary}",
        "http://127.0.0.1:{port}/#access_token={canary}",
    ],
)
def test_endpoint_credentials_never_appear_in_errors(hub, tmp_path, capsys, caplog, monkeypatch, endpoint) -> None:
    caplog.set_level(logging.DEBUG)
    url = endpoint.format(canary=CANARY, port=hub.port)
    folder = model_folder(tmp_path / "m")
    monkeypatch.setenv("HF_TOKEN", hub.token)
    assert cli.main(["push", folder, "--repo-id", "org/tiny", "--endpoint", url]) == 1
    monkeypatch.setenv("HF_ENDPOINT", url)
    assert cli.main(["push", folder, "--repo-id", "org/tiny"]) == 1
    out, err = capsys.readouterr()
    assert err.count("hubconv: error: --endpoint: ") == 1 and err.count("hubconv: error: HF_ENDPOINT: ") == 1, err
    assert not leaks(out + err) and not leaks(records(caplog))
    assert hub.requests() == []  # refused before any request


def test_a_checkpoint_url_with_credentials_is_redacted_in_errors(tmp_path) -> None:
    from hubconv.errors import CheckpointError
    from hubconv.sources import resolve_checkpoint

    url = f"http://user:{CANARY}@127.0.0.1:{closed_port()}/ckpt/model.pt?X-Amz-Signature={GH_CANARY}"
    with pytest.raises(CheckpointError) as e:
        resolve_checkpoint(url, str(tmp_path), dest=str(tmp_path / "dl"), progress="none")
    message = str(e.value)
    assert "checkpoint URL http://127.0.0.1:" in message and "/ckpt/model.pt" in message, message
    assert not leaks(message, CANARY, GH_CANARY)


def test_github_errors_are_redacted(tmp_path) -> None:
    from hubconv.github import Bot, GitHubContext, GitHubError

    ctx = GitHubContext(f"http://127.0.0.1:{closed_port()}", "acme/models", f"{GH_CANARY}\n")
    assert ctx.token == GH_CANARY
    bot = Bot(ctx, max_retries=0, seconds_between_requests=None, seconds_between_writes=None, timeout=2)
    with pytest.raises(GitHubError) as e:
        bot.upsert_comment(1, "report")
    assert "GitHub API: update the report comment" in str(e.value) and not leaks(str(e.value), GH_CANARY)
    with pytest.raises(Exception, match=r"GITHUB_API_URL: the URL 'http://127.0.0.1/' carries credentials"):
        GitHubContext(f"http://x:{GH_CANARY}@127.0.0.1/", "acme/models", "ghp_token")
    with pytest.raises(Exception, match=r"the GitHub token: the token contains a control character") as e:
        GitHubContext("https://api.github.com", "acme/models", f"{GH_CANARY[:8]}\x00{GH_CANARY[8:]}")
    assert not leaks(str(e.value), GH_CANARY)


def test_action_run_never_shows_the_canaries(tmp_path, workspace, hub, capsys, caplog) -> None:  # noqa: F811
    """A full action run (convert, smoke, publish, bot) with both tokens ending in whitespace."""
    from tests.ghserver import FakeGitHub

    caplog.set_level(logging.DEBUG)
    body = payload("release.published.json")
    tag = body["release"]["tag_name"]
    with FakeGitHub(token=GH_CANARY) as gh:
        gh.add_release(tag, body="Notes.", draft=False, prerelease=False)
        env = github_env(
            tmp_path, workspace, "release", body, endpoint=hub.url, hf_token=f"{CANARY}\n", github_token=f"{GH_CANARY} "
        )
        env |= {"GITHUB_API_URL": gh.api_url, "GITHUB_REPOSITORY": "acme/models"}
        assert run_action(env) == 0
        posted = json.dumps(gh.releases) + json.dumps(gh.comments)
    out, err = capsys.readouterr()
    assert f"::add-mask::{CANARY}" in out and f"::add-mask::{GH_CANARY}" in out
    outputs = open(env["GITHUB_OUTPUT"]).read()
    assert parse_outputs(env["GITHUB_OUTPUT"])["commit-sha"] == hub.head("org/tiny", tag)  # it really published
    assert "/org/tiny" in posted  # and really reported to GitHub
    summary = open(env["GITHUB_STEP_SUMMARY"]).read()
    report = open(os.path.join(workspace, ".hubconv", "report.md")).read()
    for where, text in {
        "stdout": out,
        "stderr": err,
        "log records": records(caplog),
        "GITHUB_OUTPUT": outputs,
        "job summary": summary,
        "report": report,
        "posted to GitHub": posted,
        "devhub": hub_traces(hub),
    }.items():
        assert not leaks(text, CANARY, GH_CANARY), where


@pytest.mark.parametrize(
    ("inputs", "expected"),
    [
        ({"hf_token": f"{CANARY[:12]}\x1b{CANARY[12:]}"}, "input `hf-token`: the token contains a control character"),
        ({"hf_token": f"{CANARY[:12]}\n{CANARY[12:]}"}, "input `hf-token`: the token contains a control character"),
        ({"hf_token": CANARY, "github_token": f"{GH_CANARY}\u00a0x"}, "input `github-token`: the token contains"),
        ({"hf_token": CANARY, "endpoint": "http://a:{canary}@127.0.0.1:9/"}, "input `endpoint`: the URL"),
        ({"hf_token": CANARY, "repo_id": "../../etc"}, "input `repo-id`: '../../etc' is not a valid Hub repo id"),
    ],
)
def test_action_refuses_bad_inputs_before_converting(tmp_path, workspace, capsys, inputs, expected) -> None:  # noqa: F811
    inputs = {k: v.replace("{canary}", CANARY) for k, v in inputs.items()}
    env = github_env(tmp_path, workspace, "push", payload("push.tag.json"), **inputs)
    assert run_action(env) == 1
    out = capsys.readouterr().out
    errors = [line for line in out.splitlines() if line.startswith("::error")]
    assert len(errors) == 1 and expected in errors[0], out
    assert "::group::hubconv release" not in out  # nothing was converted
    for name in ("hf_token", "github_token"):  # every line of a multi-line token is masked
        for part in (inputs.get(name) or "").splitlines():
            assert f"::add-mask::{part.strip()}" in out or not part.strip()
    assert not leaks(out, CANARY, GH_CANARY) and not leaks(open(env["GITHUB_STEP_SUMMARY"]).read(), CANARY, GH_CANARY)


def test_an_unexpected_action_error_is_one_redacted_line(tmp_path, workspace, capsys, monkeypatch) -> None:  # noqa: F811
    def boom(env, workspace):
        raise RuntimeError(f"GET http://u:{CANARY}@h.example/x?sig={GH_CANARY} failed:\nAuthorization: Bearer {CANARY}")

    monkeypatch.setattr("hubconv.action._run", boom)
    env = github_env(tmp_path, workspace, "workflow_dispatch", payload("workflow_dispatch.json"))
    assert run_action(env) == 1
    out = capsys.readouterr().out
    errors = [line for line in out.splitlines() if line.startswith("::error::")]
    assert errors == ["::error::unexpected RuntimeError: GET http://h.example/x failed: Authorization: Bearer *** "
                      "(HUBCONV_DEBUG=1 shows more)"], out  # fmt: skip
    assert not leaks(out + open(env["GITHUB_STEP_SUMMARY"]).read(), CANARY, GH_CANARY)
    with pytest.raises(RuntimeError):
        run_action({**env, "HUBCONV_DEBUG": "1"})
