"""`profile.store-selected`: the members picked in groups (the Clash API's
PUT /proxies/{group}), kept across restarts and reloads.

One small JSON file, `selected.json`, in the state directory beside the
fake-IP store; written whole to a temporary file and renamed over the old
one, so a crash leaves the old choices or the new ones, never half a file.
mihomo keeps the same map in its cache.db. A choice that no longer names a
member is ignored at restore (the profile changed), and kept in the file
in case a later profile has that member again.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)

SELECTED_FILE = "selected.json"


def selected_path(state_dir: Path) -> Path:
    return state_dir / SELECTED_FILE


class Selections:
    """{group: member} in memory, mirrored to `path` on every change when
    `path` is set (None: store-selected off, memory only, so a reload
    still keeps the choices). A file that cannot be read starts empty (logged);
    a write that fails is logged and the choice kept in memory."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._chosen: dict[str, str] = {}
        if path is not None:
            self._chosen = self._read(path)

    @staticmethod
    def _read(path: Path) -> dict[str, str]:
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as e:
            log.warning("store-selected: cannot read %s (%s); starting with no choices",
                        path, e)
            return {}
        if not isinstance(data, dict):
            return {}
        return {str(k): str(v) for k, v in data.items() if isinstance(v, str)}

    def get(self, group: str) -> str | None:
        return self._chosen.get(group)

    def items(self) -> dict[str, str]:
        return dict(self._chosen)

    def remember(self, group: str, member: str) -> None:
        if self._chosen.get(group) == member:
            return
        self._chosen[group] = member
        if self.path is None:
            return
        tmp = self.path.with_name(self.path.name + ".tmp")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_text(json.dumps(self._chosen, indent=1, sort_keys=True))
            os.replace(tmp, self.path)
        except OSError as e:
            log.warning("store-selected: cannot write %s: %s", self.path, e)
