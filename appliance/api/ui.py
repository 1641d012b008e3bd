"""The dashboard files served at /ui: `external-ui`, its `external-ui-name`
subdirectory, filled from `external-ui-url` when empty.

Offline by design: `external-ui-url` is a local zip file (or file:// URL,
the loader made it a path), unpacked into the directory the first time it
has no index.html. A zip member that would land outside the directory is
refused (zip slip). A dashboard zip usually holds one top directory
(`dist/`, `zashboard-gh-pages/`): the directory holding index.html is the
one served. Failures are logged and leave /ui off; they never stop the
appliance.
"""

from __future__ import annotations

import logging
import zipfile
from pathlib import Path

from appliance.config.model import Config

log = logging.getLogger("mirage.api")


def ui_directory(cfg: Config) -> Path | None:
    """The directory to serve at /ui, or None (not configured, or not usable)."""
    c = cfg.controller
    if c.ui is None:
        return None
    root = c.ui / c.ui_name if c.ui_name else c.ui
    try:
        if c.ui_url and not _index(root):
            unpack(Path(c.ui_url), root)
        found = _index(root)
    except (OSError, zipfile.BadZipFile, ValueError) as err:
        log.error("external-ui %s: %s; /ui is not served", root, err)
        return None
    if found is None:
        log.error("external-ui %s: no index.html in it; /ui is not served", root)
    return found


def _index(root: Path) -> Path | None:
    if (root / "index.html").is_file():
        return root
    if root.is_dir():
        subdirs = [p for p in root.iterdir() if p.is_dir() and (p / "index.html").is_file()]
        if len(subdirs) == 1:
            return subdirs[0]
    return None


def unpack(archive: Path, into: Path) -> None:
    """Extract `archive` into `into`, refusing members outside it."""
    into.mkdir(parents=True, exist_ok=True)
    base = into.resolve()
    with zipfile.ZipFile(archive) as z:
        for member in z.namelist():
            target = (base / member).resolve()
            if target != base and base not in target.parents:
                raise ValueError(f"{archive}: member {member!r} would land outside {into}")
        z.extractall(base)
    log.info("external-ui: unpacked %s into %s", archive, into)
