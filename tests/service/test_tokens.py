"""Scoped tokens (service/tokens.py) and the per-client rate limit (service/hardening.py: RateLimiter)."""

from __future__ import annotations

import logging

import pytest

from facesiam.errors import InputError
from facesiam.service.hardening import RateLimiter
from facesiam.service.tokens import TokenSet, parse_tokens


def test_token_lines_scopes_and_comments():
    tokens = parse_tokens("# comment\n\nAAAAAAAAAAAAAAAA\nBBBBBBBBBBBBBBBB read\nCCCCCCCCCCCCCCCC read,write # kiosk\n"
                          "DDDDDDDDDDDDDDDD admin\n", "tokens.txt")
    every, read, kiosk, admin = tokens
    assert every.allows("read") and every.allows("write") and every.allows("admin")  # a bare token: as before
    assert read.allows("read") and not read.allows("write") and not read.allows("admin")
    assert kiosk.allows("write") and not kiosk.allows("admin")
    assert admin.allows("write") and admin.allows("read")
    assert kiosk.label == "tokens.txt, line 5"
    found = TokenSet(tokens).find("CCCCCCCCCCCCCCCC")
    assert found is kiosk and TokenSet(tokens).find("CCCCCCCCCCCCCCC") is None


@pytest.mark.parametrize("text, message", [("short\n", "line 1: a token must be at least 16"),
                                           ("AAAAAAAAAAAAAAAA reed\n", "unknown scope reed"),
                                           ("# only a comment\n", "holds no token")])
def test_bad_token_files_say_which_line(text, message):
    with pytest.raises(InputError, match=message):
        parse_tokens(text, "tokens.txt")


def test_reload_keeps_the_tokens_in_force_when_the_file_is_broken(tmp_path, caplog):
    path = tmp_path / "tokens"
    path.write_text("AAAAAAAAAAAAAAAA read\n")
    path.chmod(0o644)
    with caplog.at_level(logging.WARNING, logger="facesiam.serve"):
        tokens = TokenSet.from_file(path)
    assert "can be read by other users" in caplog.text
    path.write_text("BBBBBBBBBBBBBBBB write\n")
    assert tokens.reload() and tokens.find("BBBBBBBBBBBBBBBB") and not tokens.find("AAAAAAAAAAAAAAAA")
    path.write_text("tiny\n")
    assert not tokens.reload() and tokens.find("BBBBBBBBBBBBBBBB")  # a typo does not lock everyone out
    path.unlink()
    assert not tokens.reload() and tokens.find("BBBBBBBBBBBBBBBB")


def test_rate_limiter_is_a_token_bucket_per_client():
    now = [0.0]
    limiter = RateLimiter(rate=2.0, burst=3, clock=lambda: now[0])
    assert [limiter.allow("a") for _ in range(3)] == [0, 0, 0]
    assert limiter.allow("a") == pytest.approx(0.5)  # the 4th waits for half a token at 2/s
    assert limiter.allow("b") == 0  # another client has its own bucket
    now[0] += 0.5
    assert limiter.allow("a") == 0 and limiter.allow("a") == pytest.approx(0.5)
    now[0] += 100
    assert [limiter.allow("a") for _ in range(4)][:3] == [0, 0, 0]  # refilled to the burst, no more


def test_token_file_problems_are_one_line_never_the_token_and_warned_on_every_reload(tmp_path, caplog):
    """Issue 40: a token file that is not UTF-8 gave a traceback on SIGHUP; a line of two tokens logged the second
    verbatim (as an unknown scope); a 0644 file warned at start only."""
    path = tmp_path / "tokens"
    path.write_text("AAAAAAAAAAAAAAAA read\n")
    path.chmod(0o600)
    tokens = TokenSet.from_file(path)
    path.write_bytes(b"\xff\xfeBBBBBBBBBBBBBBBB read\n")
    with caplog.at_level(logging.INFO, logger="facesiam.serve"):
        assert not tokens.reload()
    assert "not UTF-8" in caplog.text and tokens.find("AAAAAAAAAAAAAAAA")
    with pytest.raises(InputError, match="not UTF-8"):
        TokenSet.from_file(path)
    secret = "SecondTokenOnTheLine0123456789"
    path.write_text(f"AAAAAAAAAAAAAAAA {secret}\n")
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="facesiam.serve"):
        assert not tokens.reload()
    assert "unknown scope" in caplog.text and secret not in caplog.text
    path.write_text("CCCCCCCCCCCCCCCC read\n")
    path.chmod(0o644)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="facesiam.serve"):
        assert tokens.reload()
    assert "can be read by other users" in caplog.text
