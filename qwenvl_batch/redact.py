"""Secrets never leave the process: the API key, any ``Authorization`` / ``api-key`` value and URL credentials are
replaced by ``***`` in every message, stored column, log line and report.

A server or proxy that echoes the request's headers in its error body would otherwise put the key into the
Parquet ``error_message``, every report and stderr; a ``base_url`` with ``user:password@`` would print the
password in the "run again" line and in httpx's debug log. Redaction works two ways, both cheap: the secrets this
process knows (the key, registered when the client is built; a URL's password) are replaced wherever they occur,
and anything shaped like a credential (``Bearer …``, ``Authorization: …``, ``api-key: …``, ``://user:pass@``) is
replaced whatever its value. ``install_log_redaction`` makes every log record pass through it.
"""

from __future__ import annotations

import base64
import logging
import re
import urllib.parse
from typing import Any

MASK = "***"
_MIN_SECRET = 6  # shorter values ("EMPTY", "none") are not secrets worth masking everywhere
_KNOWN: set[str] = set()
_PATTERNS: tuple[tuple[re.Pattern[str], str], ...] = (  # (credential shape, replacement keeping its label)
    # "Authorization: Bearer sk-…", "authorization=Basic …", "'Authorization': '…'" (a header dict echoed back)
    (re.compile(r"(?i)(\b(?:proxy-)?authorization\b['\"]?\s*[:=]\s*['\"]?)(?:(?:bearer|basic|token)\s+)?[^\s'\",;}]+"),
     r"\1***"),
    (re.compile(r"(?i)(\b(?:x-)?api[-_]key\b['\"]?\s*[:=]\s*['\"]?)[^\s'\",;}]+"), r"\1***"),
    (re.compile(r"(?i)(\b(?:bearer|basic)\s+)[A-Za-z0-9._~+/=-]{6,}"), r"\1***"),
    (re.compile(r"(?i)(\b[a-z][a-z0-9+.-]*://)[^/\s:@]*:[^/\s@]*@"), r"\1***@"),  # scheme://user:password@
    (re.compile(r"\bsk-[A-Za-z0-9_-]{16,}"), "***"),  # the OpenAI / DashScope key shape, wherever it appears
)


def register_secret(value: str | None) -> None:
    """Mask this value (and its URL-quoted and Basic-auth forms) in everything redacted from now on."""
    if value and len(value) >= _MIN_SECRET:
        _KNOWN.update({value, urllib.parse.quote(value, safe=""), urllib.parse.quote_plus(value)})


def redact(text: str) -> str:
    """The text with every known secret and anything shaped like a credential replaced by ``***``."""
    if not text:
        return text
    for secret in sorted(_KNOWN, key=len, reverse=True):
        if secret in text:
            text = text.replace(secret, MASK)
    for pattern, replacement in _PATTERNS:
        text = pattern.sub(replacement, text)
    return text


def redact_value(value: Any) -> Any:
    """``redact`` for a cell that may not be text (None, a number): only strings change."""
    return redact(value) if isinstance(value, str) else value


def split_url_credentials(url: str) -> tuple[str, str | None]:
    """(the URL without ``user:password@``, the ``Authorization: Basic`` value for them, or None).

    The password and the header value are registered as secrets, so neither is ever printed."""
    parts = urllib.parse.urlsplit(url)
    if parts.username is None and parts.password is None:
        return url, None
    user = urllib.parse.unquote(parts.username or "")
    password = urllib.parse.unquote(parts.password or "")
    register_secret(password)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = f"{host}:{parts.port}" if parts.port else host
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    register_secret(token)
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc)), f"Basic {token}"


class _RedactingRecord(logging.LogRecord):
    def getMessage(self) -> str:
        return redact(super().getMessage())


_installed = False


def install_log_redaction() -> None:
    """Every log record, from any library (httpx's request lines included), is redacted when formatted."""
    global _installed
    if _installed:
        return
    _installed = True
    previous = logging.getLogRecordFactory()
    if previous is logging.LogRecord:
        logging.setLogRecordFactory(_RedactingRecord)
        return

    def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = previous(*args, **kwargs)
        record.msg = redact(record.getMessage())
        record.args = None
        return record

    logging.setLogRecordFactory(factory)
