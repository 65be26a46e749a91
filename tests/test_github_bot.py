"""hubconv.github.Bot against a loopback GitHub REST server (tests/ghserver.py), through the real PyGithub."""

from __future__ import annotations

import logging
import traceback

import pytest

from hubconv.errors import HubconvError
from hubconv.github import COMMENT_LIMIT, LINKS_END, LINKS_START, MARKER, Bot, GitHubContext
from tests.ghserver import FakeGitHub

TOKEN = "ghp_SECRETtoken1234567890abcdef"
ISSUE = 7
COMMENTS = rf"/repos/acme/models/issues/{ISSUE}/comments"
EDIT = r"/repos/acme/models/issues/comments/\d+"


def make_bot(gh: FakeGitHub, token: str = TOKEN, **kw) -> Bot:
    kw.setdefault("max_retries", 3)
    return Bot(
        GitHubContext(api_url=gh.api_url, repository=gh.full_name, token=token),
        backoff_factor=0,
        secondary_rate_wait=0,
        seconds_between_requests=None,
        seconds_between_writes=None,
        timeout=5,
        **kw,
    )


@pytest.fixture
def gh():
    with FakeGitHub(token=TOKEN) as server:
        yield server


# ---------------------------------------------------------------------------------------------- sticky comment
def test_first_run_creates_one_comment_with_marker(gh):
    url = make_bot(gh).upsert_comment(ISSUE, "## Conversion report\nall good")
    posts = gh.calls("POST", COMMENTS)
    assert len(posts) == 1
    assert posts[0].body["body"].startswith(MARKER)
    assert "all good" in posts[0].body["body"]
    assert not gh.calls("PATCH")
    (comment,) = gh.comments[ISSUE]
    assert url == comment["html_url"]
    assert all(r.auth_ok for r in gh.requests)


def test_second_run_edits_the_same_comment(gh):
    make_bot(gh).upsert_comment(ISSUE, "run 1")
    first_id = gh.comments[ISSUE][0]["id"]
    url = make_bot(gh).upsert_comment(ISSUE, "run 2")  # a fresh process/bot, state only on GitHub
    assert len(gh.calls("POST", COMMENTS)) == 1
    patches = gh.calls("PATCH", EDIT)
    assert [p.route for p in patches] == [f"/repos/acme/models/issues/comments/{first_id}"]
    assert "run 2" in patches[0].body["body"] and MARKER in patches[0].body["body"]
    assert len(gh.comments[ISSUE]) == 1 and "run 2" in gh.comments[ISSUE][0]["body"]
    assert url == gh.comments[ISSUE][0]["html_url"]


def test_identical_body_makes_no_patch(gh):
    bot = make_bot(gh)
    bot.upsert_comment(ISSUE, "same")
    bot.upsert_comment(ISSUE, "same")
    assert len(gh.calls("POST", COMMENTS)) == 1
    assert not gh.calls("PATCH")


def test_someone_elses_marker_comment_is_not_edited(gh):
    foreign = gh.add_comment(ISSUE, f"{MARKER}\nquoted by a human", login="mallory")
    make_bot(gh).upsert_comment(ISSUE, "report")
    assert not gh.calls("PATCH")
    assert len(gh.calls("POST", COMMENTS)) == 1
    assert foreign["body"] == f"{MARKER}\nquoted by a human"
    assert [c["user"]["login"] for c in gh.comments[ISSUE]] == ["mallory", gh.login]


def test_own_comment_found_on_a_later_page(gh):
    gh.per_page = 3
    for i in range(7):
        gh.add_comment(ISSUE, f"chatter {i}", login="someone")
    ours = gh.add_comment(ISSUE, f"{MARKER}\nold report")
    make_bot(gh).upsert_comment(ISSUE, "new report")
    assert len(gh.calls("GET", COMMENTS)) == 3  # followed the Link header to page 3
    assert not gh.calls("POST", COMMENTS)
    assert [p.route.rsplit("/", 1)[1] for p in gh.calls("PATCH", EDIT)] == [str(ours["id"])]


def test_installation_token_recognises_github_actions_bot():
    with FakeGitHub(token=TOKEN, login="github-actions[bot]", installation_token=True) as gh:
        gh.add_comment(ISSUE, f"{MARKER}\nfrom a user", login="octocat")
        ours = gh.add_comment(ISSUE, f"{MARKER}\nold", login="github-actions[bot]")
        make_bot(gh).upsert_comment(ISSUE, "new")
        assert gh.calls("GET", "/user")  # tried, got 403, fell back to github-actions[bot]
        assert not gh.calls("POST", COMMENTS)
        assert [p.route for p in gh.calls("PATCH", EDIT)] == [f"/repos/acme/models/issues/comments/{ours['id']}"]


def test_oversized_body_is_truncated_with_note(gh):
    make_bot(gh).upsert_comment(ISSUE, "x" * 100_000)
    sent = gh.calls("POST", COMMENTS)[0].body["body"]
    assert len(sent) <= COMMENT_LIMIT
    assert sent.startswith(MARKER)
    assert "Truncated by hubconv" in sent


# ---------------------------------------------------------------------------------------------- release links
def test_links_appended_to_draft_prerelease_keep_flags(gh):
    rel = gh.add_release("v1.0.0-rc1", body="Notes by a human.", name="RC 1", draft=True, prerelease=True)
    url = make_bot(gh).append_release_links("v1.0.0-rc1", "- [model](https://huggingface.co/acme/m)")
    (patch,) = gh.calls("PATCH", r"/repos/acme/models/releases/\d+")
    assert patch.route == f"/repos/acme/models/releases/{rel['id']}"
    assert patch.body["draft"] is True
    assert patch.body["prerelease"] is True
    assert patch.body["name"] == "RC 1"
    assert patch.body["tag_name"] == "v1.0.0-rc1"
    assert patch.body["body"] == (
        f"Notes by a human.\n\n{LINKS_START}\n- [model](https://huggingface.co/acme/m)\n{LINKS_END}"
    )
    assert rel["draft"] is True and rel["prerelease"] is True
    assert url == rel["html_url"]


def test_links_block_replaced_and_identical_rerun_makes_no_patch(gh):
    rel = gh.add_release("v2", body="Intro", name="v2")
    bot = make_bot(gh)
    bot.append_release_links("v2", "- old link")
    bot.append_release_links("v2", "- new link")
    assert len(gh.calls("PATCH")) == 2
    assert rel["body"] == f"Intro\n\n{LINKS_START}\n- new link\n{LINKS_END}"
    assert rel["draft"] is False and rel["prerelease"] is False
    url = make_bot(gh).append_release_links("v2", "- new link")
    assert len(gh.calls("PATCH")) == 2  # no third PATCH
    assert url == rel["html_url"]


def test_missing_release_is_a_clear_error(gh):
    with pytest.raises(HubconvError, match="no release with tag 'v9'"):
        make_bot(gh).append_release_links("v9", "- x")
    assert not gh.calls("PATCH")


# ---------------------------------------------------------------------------------------------- transport
def test_github_enterprise_base_path():
    with FakeGitHub(token=TOKEN, prefix="/api/v3") as gh:
        assert gh.api_url.endswith("/api/v3")
        gh.add_release("v1", body=None, name="v1")
        bot = make_bot(gh)
        bot.upsert_comment(ISSUE, "report")
        bot.upsert_comment(ISSUE, "report 2")
        bot.append_release_links("v1", "- link")
        assert gh.requests and all(r.path.startswith("/api/v3/") for r in gh.requests)
        assert len(gh.calls("POST", COMMENTS)) == 1 and len(gh.calls("PATCH", EDIT)) == 1
        assert len(gh.calls("PATCH", r"/repos/acme/models/releases/\d+")) == 1


def test_transient_502_is_retried(gh):
    gh.inject("502", method="GET", route=COMMENTS)
    make_bot(gh).upsert_comment(ISSUE, "report")
    assert len(gh.calls("GET", COMMENTS)) == 2
    assert len(gh.calls("POST", COMMENTS)) == 1


def test_rate_limit_403_is_retried(gh):
    gh.inject("rate_limit", method="GET", route="/repos/acme/models", retry_after="0")
    make_bot(gh).upsert_comment(ISSUE, "report")
    assert len(gh.calls("GET", "/repos/acme/models")) == 2
    assert len(gh.calls("POST", COMMENTS)) == 1


def test_persistent_502_surfaces_as_hubconv_error(gh):
    gh.inject("502", method="GET", route="/repos/acme/models", times=10)
    with pytest.raises(HubconvError, match="GitHub API"):
        make_bot(gh, max_retries=2).upsert_comment(ISSUE, "report")
    assert len(gh.calls("GET", "/repos/acme/models")) == 3  # first try + 2 retries
    assert not gh.calls("POST")


def test_wrong_token_is_a_clear_error_without_the_token(gh, caplog):
    bad = "ghp_WRONGtoken0987654321zyxwvu"
    caplog.set_level(logging.DEBUG)
    with pytest.raises(HubconvError) as info:
        make_bot(gh, token=bad).upsert_comment(ISSUE, "report")
    text = str(info.value)
    assert "401" in text and "Bad credentials" in text
    formatted = "".join(traceback.format_exception(info.value)) + repr(info.value)
    for secret in (bad, TOKEN):
        assert secret not in formatted
        assert secret not in caplog.text
    assert gh.requests and not any(r.auth_ok for r in gh.requests)
    assert not gh.calls("POST")


def test_token_never_logged_or_in_urls(gh, caplog):
    caplog.set_level(logging.DEBUG)  # includes PyGithub's request/response debug log and urllib3's
    gh.inject("502", method="GET", route=COMMENTS)
    gh.add_release("v1", body="x", name="v1", draft=True)
    bot = make_bot(gh)
    bot.upsert_comment(ISSUE, "report")
    bot.upsert_comment(ISSUE, "report 2")
    bot.append_release_links("v1", "- link")
    assert caplog.records  # the log really was captured
    assert TOKEN not in caplog.text
    assert TOKEN not in repr(bot.ctx)
    for r in gh.requests:
        assert TOKEN not in r.path and TOKEN not in str(r.query) and TOKEN not in str(r.body)
        assert r.auth_ok


def test_context_from_env():
    env = {"GITHUB_REPOSITORY": "acme/models", "GITHUB_TOKEN": TOKEN}
    ctx = GitHubContext.from_env(env=env)
    assert (ctx.api_url, ctx.repository, ctx.token) == ("https://api.github.com", "acme/models", TOKEN)
    ctx = GitHubContext.from_env(env={**env, "GITHUB_API_URL": "https://ghe.example/api/v3/"})
    assert ctx.api_url == "https://ghe.example/api/v3"
    with pytest.raises(HubconvError, match="GITHUB_REPOSITORY"):
        GitHubContext.from_env(env={"GITHUB_TOKEN": TOKEN})
    with pytest.raises(HubconvError, match="token"):
        GitHubContext.from_env(env={"GITHUB_REPOSITORY": "acme/models"})
