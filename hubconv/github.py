"""GitHub bot: a sticky PR/issue report comment and release-note links, through PyGithub only.

The token is only handed to ``github.Auth.Token``; it never appears in log records, exception messages or URLs
(PyGithub masks the Authorization header in its own debug log). Surrounding whitespace is stripped and any other
character that cannot be in a token is refused without showing it; the API URL must be http(s) without credentials.
Every ``GithubException`` (and transport error after PyGithub's retries are exhausted) is re-raised as a
:class:`~hubconv.errors.HubconvError` with the token, URL credentials and query strings scrubbed.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

import requests
from github import Auth, Github, GithubException, GithubRetry
from github.GitRelease import GitRelease
from github.Issue import Issue
from github.IssueComment import IssueComment
from github.Repository import Repository

from hubconv.credentials import add_mask, check_endpoint, clean_token, redact
from hubconv.errors import HubconvError

log = logging.getLogger(__name__)

MARKER = "<!-- hubconv:report -->"
LINKS_START = "<!-- hubconv:links -->"
LINKS_END = "<!-- /hubconv:links -->"
DEFAULT_API_URL = "https://api.github.com"
GITHUB_ACTIONS_LOGIN = "github-actions[bot]"
COMMENT_LIMIT = 65_536  # GitHub rejects longer issue/PR comment bodies (422)
RELEASE_LIMIT = 125_000  # GitHub rejects longer release bodies (422)
TRUNCATION_NOTE = "\n\n> [!NOTE]\n> Truncated by hubconv: {n} characters over GitHub's {limit}-character limit.\n"


class GitHubError(HubconvError):
    """A GitHub API call failed (bad token, missing repository/release, rate limit, server error)."""


@dataclass
class GitHubContext:
    api_url: str
    repository: str  # "owner/name"
    token: str = field(repr=False)

    def __post_init__(self) -> None:
        self.token = clean_token(self.token, "the GitHub token") or ""
        self.api_url = check_endpoint(self.api_url, "GITHUB_API_URL")

    @classmethod
    def from_env(cls, token: str | None = None, env: Mapping[str, str] | None = None) -> GitHubContext:
        """GITHUB_API_URL (default api.github.com), GITHUB_REPOSITORY and a token (argument, else GITHUB_TOKEN)."""
        env = os.environ if env is None else env
        repository = env.get("GITHUB_REPOSITORY", "").strip()
        if not re.fullmatch(r"[^/\s]+/[^/\s]+", repository):
            raise GitHubError(f"GITHUB_REPOSITORY must be 'owner/name', got {repository!r}")
        field_name = "the GitHub token"
        if not token:
            token, field_name = env.get("GITHUB_TOKEN"), "GITHUB_TOKEN"
        add_mask(token)
        token = clean_token(token, field_name)
        if not token:
            raise GitHubError("no GitHub token: pass one or set GITHUB_TOKEN")
        api_url = (env.get("GITHUB_API_URL") or DEFAULT_API_URL).rstrip("/")
        return cls(api_url=api_url, repository=repository, token=token)


def truncate_body(body: str, limit: int = COMMENT_LIMIT) -> str:
    """Cut ``body`` to at most ``limit`` characters, ending with a note saying how much was dropped."""
    if len(body) <= limit:
        return body
    note = TRUNCATION_NOTE.format(n=len(body) - limit, limit=limit)
    # the note's count is approximate by len(note) characters; good enough for a human reader
    return body[: limit - len(note)] + note


def replace_block(text: str, block: str, start: str = LINKS_START, end: str = LINKS_END) -> str:
    """Replace the first ``start ... end`` block in ``text`` with ``block``, or append ``block``."""
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), re.DOTALL)
    if pattern.search(text):
        return pattern.sub(lambda _m: block, text, count=1)
    if not text.strip():
        return block
    return text.rstrip("\n") + "\n\n" + block


class Bot:
    def __init__(
        self,
        ctx: GitHubContext,
        *,
        marker: str = MARKER,
        bot_logins: tuple[str, ...] = (GITHUB_ACTIONS_LOGIN,),
        max_retries: int = 5,
        backoff_factor: float = 1.0,
        secondary_rate_wait: float = 60.0,
        max_rate_limit_wait: float = 600.0,
        seconds_between_requests: float | None = 0.25,
        seconds_between_writes: float | None = 1.0,
        timeout: int = 30,
    ) -> None:
        """``bot_logins`` are the logins treated as "us" when the token cannot read ``GET /user``
        (an installation token such as GITHUB_TOKEN answers 403 there)."""
        if not ctx.token:
            raise GitHubError("no GitHub token")
        self.ctx = ctx
        self.marker = marker
        self.bot_logins = bot_logins
        retry = GithubRetry(
            total=max_retries,
            backoff_factor=backoff_factor,
            secondary_rate_wait=secondary_rate_wait,
            max_rate_limit_wait=max_rate_limit_wait,
        )
        self._gh = Github(
            auth=Auth.Token(ctx.token),
            base_url=ctx.api_url.rstrip("/"),
            retry=retry,
            timeout=timeout,
            seconds_between_requests=seconds_between_requests,
            seconds_between_writes=seconds_between_writes,
        )
        self._repo: Repository | None = None
        self._logins: frozenset[str] | None = None

    # ------------------------------------------------------------------ helpers
    def _scrub(self, text: str) -> str:
        """``text`` without the token, URL credentials or query strings (see ``hubconv.credentials.redact``)."""
        return redact(text, self.ctx.token)

    def _fail(self, action: str, exc: Exception) -> GitHubError:
        if isinstance(exc, GithubException):
            status = exc.status
            message = exc.message
            if not message and isinstance(exc.data, dict):
                message = exc.data.get("message")
            message = message or "no message"
            hint = ""
            if status == 401:
                hint = " (check the token: it is invalid, expired or revoked)"
            elif status == 403:
                hint = " (the token lacks permission, or the rate limit was hit)"
            elif status == 404:
                hint = f" (not found, or the token cannot see {self.ctx.repository})"
            text = f"GitHub API: {action} failed: HTTP {status}: {message}{hint}"
        else:
            text = f"GitHub API: {action} failed: {type(exc).__name__}: {exc}"
        return GitHubError(self._scrub(text))

    def _repository(self) -> Repository:
        if self._repo is None:
            self._repo = self._gh.get_repo(self.ctx.repository)
        return self._repo

    def own_logins(self) -> frozenset[str]:
        """Logins whose comments count as ours: the token's user, else the Actions bot for installation tokens."""
        if self._logins is None:
            try:
                self._logins = frozenset({self._gh.get_user().login})
            except GithubException as exc:
                if exc.status != 403:  # 401 and friends are real errors
                    raise
                log.debug("GET /user not allowed for this token (installation token); assuming %s", self.bot_logins)
                self._logins = frozenset(self.bot_logins)
        return self._logins

    def _find_own_comment(self, issue: Issue) -> IssueComment | None:
        logins = self.own_logins()
        for comment in issue.get_comments():
            if self.marker in (comment.body or "") and comment.user is not None and comment.user.login in logins:
                return comment
        return None

    def _find_release(self, tag: str) -> GitRelease:
        repo = self._repository()
        try:
            return repo.get_release(tag)  # GET /releases/tags/{tag}: published releases only
        except GithubException as exc:
            if exc.status != 404:
                raise
        for release in repo.get_releases():  # drafts are only listed here (needs push access)
            if release.tag_name == tag:
                return release
        raise GitHubError(f"GitHub API: no release with tag {tag!r} in {self.ctx.repository}")

    # ------------------------------------------------------------------ API
    def upsert_comment(self, issue_number: int, body: str) -> str:
        """Create or edit our one sticky comment (identified by the marker and our login). Returns its html_url."""
        if self.marker not in body:
            body = f"{self.marker}\n{body}"
        body = truncate_body(body, COMMENT_LIMIT)
        action = f"update the report comment on #{issue_number} of {self.ctx.repository}"
        try:
            issue = self._repository().get_issue(issue_number)
            comment = self._find_own_comment(issue)
            if comment is None:
                comment = issue.create_comment(body)
                log.info("created report comment %s", comment.html_url)
            elif comment.body == body:
                log.info("report comment %s already up to date", comment.html_url)
            else:
                comment.edit(body)
                log.info("updated report comment %s", comment.html_url)
            return comment.html_url
        except (GithubException, requests.RequestException) as exc:
            raise self._fail(action, exc) from None

    def append_release_links(self, tag: str, links_md: str) -> str:
        """Put ``links_md`` in a marker-delimited block of the release body (replace or append), keeping
        name/tag/draft/prerelease. No PATCH when nothing changes. Returns the release html_url."""
        action = f"update release {tag!r} of {self.ctx.repository}"
        try:
            release = self._find_release(tag)
            old = release.body or ""
            links_md = links_md.strip("\n")
            new = replace_block(old, f"{LINKS_START}\n{links_md}\n{LINKS_END}")
            if len(new) > RELEASE_LIMIT:  # shorten our block only, never the user's text
                overflow = len(new) - RELEASE_LIMIT
                keep = len(links_md) - overflow
                links_md = truncate_body(links_md, keep) if keep > 500 else "(links omitted: release body too long)"
                new = replace_block(old, f"{LINKS_START}\n{links_md}\n{LINKS_END}")
            if new == old:
                log.info("release %s already has these links", release.html_url)
                return release.html_url
            # update_release always sends name/body/draft/prerelease/tag_name: pass the current values back,
            # otherwise its defaults (draft=False, prerelease=False) would publish a draft.
            updated = release.update_release(
                name=release.name or "",
                message=new,
                draft=bool(release.draft),
                prerelease=bool(release.prerelease),
                tag_name=release.tag_name,
            )
            log.info("added links to release %s", updated.html_url)
            return updated.html_url
        except (GithubException, requests.RequestException) as exc:
            raise self._fail(action, exc) from None

    def close(self) -> None:
        self._gh.close()
