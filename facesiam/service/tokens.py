"""Bearer tokens with scopes, from a token file re-read on SIGHUP (rotate a token without a restart).

A token file holds one token per line, optionally followed by its scopes and a comment:

    # facesiam serve --token-file tokens.txt          (keep it 0600: it grants access to biometric data)
    Jc3k...43 characters...                            every scope (a file of one bare token works as before)
    r8Qw...   read                                      verify, search, recognize, detect, list people and faces
    Zt0p...   read,write         # the enrolment kiosk  + enrol, rename, delete
    Ap9x...   admin                                     everything, and the service's status

Tokens are compared in constant time (hmac.compare_digest) against every token of the file.
"""

from __future__ import annotations

import hmac
import logging
import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from ..errors import InputError

log = logging.getLogger("facesiam.serve")

SCOPES = ("read", "write", "admin")
PUBLIC = "public"  # a route anyone may call (the page, /healthz); every other route declares one of SCOPES
MIN_TOKEN_CHARS = 16
GENERATE = '`python -c "import secrets; print(secrets.token_urlsafe(32))"`'


@dataclass(frozen=True)
class Token:
    secret: str
    scopes: frozenset
    label: str  # where it came from, for logs (never the secret)

    def allows(self, scope: str) -> bool:
        return "admin" in self.scopes or scope in self.scopes


class TokenSet:
    """The tokens the service accepts; ``reload()`` re-reads the file (a bad file keeps the tokens in force)."""

    def __init__(self, tokens: list[Token], path: Optional[Path] = None, source: str = ""):
        self.tokens, self.path, self.source = tokens, path, source

    @classmethod
    def from_file(cls, path: str | Path) -> "TokenSet":
        path = Path(path)
        if not path.is_file():
            raise InputError(f"token file {path} not found; write a token into it, e.g. {GENERATE} > {path}")
        return cls(read_token_file(path), path, f"--token-file {path}")

    @classmethod
    def single(cls, secret: str, source: str) -> "TokenSet":
        check_secret(secret, source)
        return cls([Token(secret, frozenset(SCOPES), source)], None, source)

    @classmethod
    def generated(cls) -> "TokenSet":
        return cls.single(secrets.token_urlsafe(32), "generated for this run")

    def reload(self) -> bool:
        """Re-read the token file; True when the new tokens are in force."""
        if self.path is None:
            log.warning("SIGHUP: tokens come from %s, not a file; nothing to re-read", self.source)
            return False
        try:
            tokens = read_token_file(self.path)
        except (OSError, InputError) as err:
            log.error("SIGHUP: kept the %d tokens in force: %s", len(self.tokens), err)
            return False
        self.tokens = tokens  # one assignment: a request sees the old list or the new one
        log.info("SIGHUP: %d token(s) from %s now in force", len(tokens), self.path)
        return True

    def find(self, given: str) -> Optional[Token]:
        found = None
        for token in self.tokens:  # every token is compared, so the time says nothing about which one matched
            if hmac.compare_digest(given.encode(), token.secret.encode()):
                found = token
        return found


def read_token_file(path: Path) -> list[Token]:
    """The tokens of a token file (InputError naming the file and line when it is not one); warns, at start and on
    every reload, when other users may read it."""
    if os.name == "posix" and path.stat().st_mode & 0o077:
        log.warning("token file %s can be read by other users (mode %o); `chmod 600 %s`", path,
                    path.stat().st_mode & 0o777, path)
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        raise InputError(f"{path} is not UTF-8 text (byte {err.start}); write the tokens as plain text") from None
    return parse_tokens(text, str(path))


def parse_tokens(text: str, where: str) -> list[Token]:
    tokens = []
    for number, line in enumerate(text.splitlines(), 1):
        fields = line.split("#", 1)[0].split()
        if not fields:
            continue
        secret, scopes = fields[0], fields[1:]
        place = f"{where}, line {number}"
        check_secret(secret, place)
        chosen = frozenset(s.strip() for part in scopes for s in part.split(",") if s.strip()) or frozenset(SCOPES)
        unknown = sorted(chosen - set(SCOPES))
        if unknown:  # a value as long as a token is not echoed: a line of two tokens must not reach the log
            shown = [s if len(s) < MIN_TOKEN_CHARS else f"(a value of {len(s)} characters, not shown)" for s in unknown]
            raise InputError(f"{place}: unknown scope {', '.join(shown)}; scopes are {', '.join(SCOPES)} "
                             "(comma-separated after the token)")
        tokens.append(Token(secret, chosen, place))
    if not tokens:
        raise InputError(f"{where} holds no token; write one per line, e.g. {GENERATE} > {where}")
    return tokens


def check_secret(secret: str, where: str) -> None:
    if len(secret) < MIN_TOKEN_CHARS:
        raise InputError(f"{where}: a token must be at least {MIN_TOKEN_CHARS} characters; generate one with "
                         f"{GENERATE}")
