"""Credentials out of URIs before they reach a message, a log line, a stored record or a tag.

A source URI may carry a secret: a password (``https://user:secret@host/...``) or a presigned
URL's signature and token in its query (``X-Amz-Signature``, ``X-Amz-Credential``,
``Signature``, ``token``...). :func:`redact_uri` keeps what a person needs to recognise the
source (scheme, host, port, path, the names of the query parameters) and replaces each secret
with ``***``. Only the pipeline's own requests use the full URI.
"""

from __future__ import annotations

import re
from urllib.parse import unquote, urlsplit, urlunsplit

MASK = "***"

#: Query parameters whose value is a secret, compared lower-cased (AWS SigV2/SigV4, Azure SAS,
#: Google signed URLs, common token names).
SECRET_PARAMS = frozenset(
    {
        "x-amz-signature",
        "x-amz-credential",
        "x-amz-security-token",
        "awsaccesskeyid",
        "signature",
        "x-goog-signature",
        "x-goog-credential",
        "sig",
        "token",
        "access_token",
        "id_token",
        "auth",
        "key",
        "apikey",
        "api_key",
        "password",
        "passwd",
        "secret",
        "client_secret",
    }
)
#: Parts of a parameter name that make its value a secret whatever the rest of the name.
SECRET_WORDS = ("signature", "credential", "token", "password", "secret", "apikey", "api_key")

_URL_IN_TEXT = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"<>]+")


def _secret_param(name: str) -> bool:
    name = unquote(name).lower()
    return name in SECRET_PARAMS or any(word in name for word in SECRET_WORDS)


def redact_uri(uri: str) -> str:
    """``uri`` with its user information and secret query values replaced by ``***``.

    A plain path, or a URI without credentials, comes back unchanged."""
    if "://" not in uri and "?" not in uri:
        return uri
    try:
        parts = urlsplit(uri)
    except ValueError:  # unparseable (a broken IPv6 literal): mask everything after the scheme
        return uri.split("://", 1)[0] + "://" + MASK if "://" in uri else MASK
    netloc = parts.netloc
    if "@" in netloc:
        netloc = f"{MASK}@{netloc.rsplit('@', 1)[1]}"
    query = (
        "&".join(
            f"{pair.split('=', 1)[0]}={MASK}" if "=" in pair and _secret_param(pair.split("=", 1)[0]) else pair
            for pair in parts.query.split("&")
        )
        if parts.query
        else ""
    )
    if netloc == parts.netloc and query == parts.query:
        return uri
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


_QUERY_PAIR = re.compile(r"([?&])([^=&?\s#'\"]+)=([^&\s#'\"]*?)(?=[:.,;)\]]*(?:[&\s#'\"]|$))")


def redact_text(text: str) -> str:
    """``text`` with every URI in it passed through :func:`redact_uri`, and secret values of
    query parameters masked even without a scheme (``GET /f?token=... HTTP/1.1``): for messages
    that quote a library's exception or log line."""
    text = _QUERY_PAIR.sub(lambda m: f"{m[1]}{m[2]}={MASK}" if _secret_param(m[2]) else m[0], text)

    def one(match: re.Match[str]) -> str:
        uri = match.group(0)
        kept = uri.rstrip(":.,;)]")  # the sentence's punctuation, not the URI's
        return redact_uri(kept) + uri[len(kept) :]

    return _URL_IN_TEXT.sub(one, text)
