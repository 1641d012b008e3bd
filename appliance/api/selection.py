"""Which member each select group uses, kept across reloads and restarts
(mihomo's `profile.store-selected`, always on here).

`Selections` owns the file `selected.json` in `appliance.state-dir`: a JSON
object group -> member, rewritten (atomically: temp file, rename) on every
switch. `apply` sets them on a freshly built router's groups; a name that
is no longer a group, or a member no longer in it, is skipped (the group
keeps its first member, as after a profile edit in mihomo). A file that
cannot be read or parsed counts as empty (logged); one that cannot be
written is logged and the switch still applies to the running router.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path

log = logging.getLogger("mirage.api")

FILE_NAME = "selected.json"


class Selections:
    def __init__(self, state_dir: Path | None) -> None:
        self.path = state_dir / FILE_NAME if state_dir is not None else None
        self.chosen: dict[str, str] = {}
        if self.path is not None and self.path.exists():
            try:
                data = json.loads(self.path.read_text())
            except (OSError, ValueError) as err:
                log.warning("%s: %s; select groups start on their first member",
                            self.path, err)
            else:
                if isinstance(data, dict):
                    self.chosen = {str(k): str(v) for k, v in data.items()}

    def remember(self, group: str, member: str) -> None:
        self.chosen[group] = member
        if self.path is None:
            return
        tmp = self.path.with_suffix(".tmp")
        try:
            tmp.write_text(json.dumps(self.chosen, indent=1, sort_keys=True))
            os.replace(tmp, self.path)
        except OSError as err:
            log.warning("%s: cannot save the selection (%s); it holds until restart",
                        self.path, err)

    def apply(self, outbounds: Mapping[str, object]) -> None:
        """Select the remembered members on `outbounds`' select groups."""
        for group, member in self.chosen.items():
            select = getattr(outbounds.get(group), "select", None)
            if select is None:
                continue
            try:
                select(member)
            except KeyError:
                log.info("select group %s: %s is no longer a member; using its first",
                         group, member)
