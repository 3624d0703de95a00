"""Secrets kept out of every log line: the values of query strings (a client may put its key
there, ``?api_key=...``) and the configured API key wherever it appears.

``install_redaction`` puts a ``logging.Filter`` on the handlers of the root logger and of
uvicorn's loggers (uvicorn's access log does not propagate), so it sees every record that is
written, whichever logger made it.
"""

from __future__ import annotations

import logging
import re
import urllib.parse
from collections.abc import Iterable

REDACTED = "<redacted>"
_ACCESS_PATH_ARG = 2  # uvicorn.access: (client, method, full path, HTTP version, status)
_SCOPE_QUERY = re.compile(r"""('query_string': b)(['"]).*?\2""")  # uvicorn's trace of a scope
_LOGGERS = ("", "uvicorn", "uvicorn.error", "uvicorn.access", "uvicorn.asgi")


def redact_query(path: str) -> str:
    """``path`` with the value of every query parameter replaced by ``<redacted>``."""
    base, sep, query = path.partition("?")
    if not sep:
        return path
    names = (part.partition("=")[0] for part in query.split("&"))
    return base + "?" + "&".join(f"{name}={REDACTED}" for name in names)


class RedactSecrets(logging.Filter):
    """Rewrites records that would show a query string's values or one of ``secrets``."""

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        super().__init__()
        forms = set()
        for secret in secrets:
            if secret:
                forms.update({secret, urllib.parse.quote(secret), urllib.parse.quote_plus(secret)})
        self._secrets = sorted(forms, key=len, reverse=True)

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        path = args[_ACCESS_PATH_ARG] if isinstance(args, tuple) and len(args) > 2 else None
        if record.name == "uvicorn.access" and isinstance(args, tuple) and isinstance(path, str):
            path = redact_query(path)
            record.args = (*args[:_ACCESS_PATH_ARG], path, *args[_ACCESS_PATH_ARG + 1 :])
        message = record.getMessage()
        cleaned = _SCOPE_QUERY.sub(rf"\1\2{REDACTED}\2", message)
        for secret in self._secrets:
            cleaned = cleaned.replace(secret, REDACTED)
        if cleaned != message:
            record.msg, record.args = cleaned, ()
        return True


def install_redaction(secrets: Iterable[str] = ()) -> RedactSecrets:
    """Put one ``RedactSecrets`` on every handler of the root and uvicorn loggers (call it after
    uvicorn has configured logging); returns it."""
    redaction = RedactSecrets(secrets)
    for name in _LOGGERS:
        for handler in logging.getLogger(name).handlers:
            if not any(isinstance(f, RedactSecrets) for f in handler.filters):
                handler.addFilter(redaction)
    return redaction
