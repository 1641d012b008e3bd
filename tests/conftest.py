"""Shared pytest fixtures.

`lab`: one namespace lab (client, gateway, upstream with real servers; see
appliance/lab/lab.py) for the whole test session, under the prefix
`mt<pid>` so that concurrent runs and a developer's `mirage lab up` (prefix
`mirage`) never collide. Built on first use, torn down at session end; a lab
left by a crashed run with the same prefix is replaced. Tests must leave it
as they found it (remove any nft table, rule or process they add) or use
their own namespaces.

We are root and CI is root: nothing here is skipped.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from appliance.lab.lab import Lab


@pytest.fixture(scope="session")
def lab_prefix() -> str:
    """The session lab's prefix; namespaces are `<prefix>-client` etc."""
    return f"mt{os.getpid()}"


@pytest.fixture(scope="session")
def lab(lab_prefix: str) -> Iterator[Lab]:
    """The session's running lab (see the module docstring)."""
    instance = Lab(lab_prefix)
    instance.up()
    try:
        yield instance
    finally:
        instance.down()
