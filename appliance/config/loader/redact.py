"""What a message about a profile may show of its values.

Profiles carry passwords, uuids, private keys and subscription URLs whose
query string (or path) is the account's token. Every `ConfigError` and
every load warning goes to a terminal, a log or a bug report, so a value
is shown only after `shown_value`: a value under a key whose name says it
is a secret is hidden whole; any other value has the secret parts of the
URLs in it hidden (credentials, query, path segments that are not plain
words), and a mapping or list is walked the same way.
"""

from __future__ import annotations

import re
from typing import Any

HIDDEN = "<hidden>"

# Parts of key names that mark a secret (matched inside the name, so
# `obfs-password`, `private-key`, `auth-str`, `pre-shared-key`, `uuid`,
# `short-id` and header maps such as `headers.Authorization` all count).
_SECRET_PARTS = (
    "pass", "secret", "token", "uuid", "key", "auth", "psk", "cert", "header",
    "cookie", "credential", "short-id", "userinfo", "seed",
)  # fmt: skip
_PATH_NAME = re.compile(r"[A-Za-z0-9_-]+|\['((?:[^'\\]|\\.)*)'\]|\[\"((?:[^\"\\]|\\.)*)\"\]")
# scheme://rest-of-a-URL, up to white space or a quote/bracket that ends it.
_URL = re.compile(r"([A-Za-z][A-Za-z0-9+.-]{1,15})://([^\s'\"<>(),\[\]{}]*)")
# A path segment that is a plain word (`dns-query`, `resolve`), never a token.
_WORD = re.compile(r"[A-Za-z][A-Za-z_-]{0,31}(\.[A-Za-z]{1,8})?")
# A host[:port]; one label is at most 63 characters, so the base64 blob of
# a `vmess://` or `ssr://` share link is never taken for one.
_HOST = re.compile(r"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_-]{1,63}(\.[A-Za-z0-9_-]{1,63})*)(:\d{1,5})?")


def is_secret_name(name: str) -> bool:
    """Whether a key with this name holds a secret."""
    lower = name.lower()
    return any(part in lower for part in _SECRET_PARTS)


def path_is_secret(path: str) -> bool:
    """Whether any key named in a key path (`proxies[2].password`,
    `proxy-providers.sub.header.Authorization[0]`) holds a secret."""
    for match in _PATH_NAME.finditer(path):
        name = match.group(1) or match.group(2) or match.group(0)
        if is_secret_name(name):
            return True
    return False


def scrub_text(text: str) -> str:
    """`text` with the secret parts of every URL in it hidden: userinfo,
    query and path segments other than plain words."""
    return _URL.sub(_scrub_url, text)


def _scrub_url(match: re.Match[str]) -> str:
    scheme, rest = match.group(1), match.group(2)
    cut = re.search(r"[/?#]", rest)
    authority, remainder = (rest[:cut.start()], rest[cut.start():]) if cut else (rest, "")
    _, at, host = authority.rpartition("@")
    if host and not _HOST.fullmatch(host):
        # `vmess://<base64 of the whole link>`: no host, all of it secret.
        return f"{scheme}://{HIDDEN}"
    shown = f"{scheme}://" + (HIDDEN + "@" if at else "") + host
    # The fragment is kept: in a share link or a `#proxy` nameserver it is
    # a name, not a credential.
    rest, hash_sign, fragment = remainder.partition("#")
    path, question, _ = rest.partition("?")
    if path:
        shown += "/".join(s if s == "" or _WORD.fullmatch(s) else HIDDEN
                          for s in path.split("/"))
    if question:
        shown += "?" + HIDDEN
    return shown + hash_sign + fragment


def shown_value(path: str, value: Any) -> Any:
    """`value` as a message about key `path` may show it."""
    if path_is_secret(path):
        return HIDDEN
    return _walk(value, 0)


def _walk(value: Any, depth: int) -> Any:
    if depth > 20:
        return HIDDEN
    if isinstance(value, str):
        return scrub_text(value)
    if isinstance(value, dict):
        return {k: HIDDEN if isinstance(k, str) and is_secret_name(k) else _walk(v, depth + 1)
                for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_walk(v, depth + 1) for v in value)
    return value
