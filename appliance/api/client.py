"""The client side of the control API, for `mirage status | mappings | resolve`.

Synchronous (stdlib http.client): a CLI call makes one request and exits.
"""

from __future__ import annotations

import http.client
import json
from dataclasses import dataclass
from pathlib import Path


class ApiError(Exception):
    """The appliance could not be reached or refused the request."""


@dataclass(frozen=True)
class ApiClient:
    host: str
    port: int
    secret: str = ""
    timeout: float = 5.0

    @classmethod
    def from_config_file(cls, path: Path, controller: str | None = None,
                         secret: str | None = None) -> ApiClient:
        """Address and secret from the config file, overridden by the flags."""
        host, port, cfg_secret = "127.0.0.1", 9090, ""
        if controller is None or secret is None:
            from appliance.config import ConfigError, load_config

            try:
                cfg = load_config(path)
            except ConfigError as err:
                if controller is None:
                    raise ApiError(f"{path}: {err} (or pass --controller)") from None
            else:
                if cfg.external_controller is None and controller is None:
                    raise ApiError(f"{path}: external-controller is not set: the appliance "
                                   "has no control API to ask")
                if cfg.external_controller is not None:
                    host, port = cfg.external_controller.host, cfg.external_controller.port
                cfg_secret = cfg.secret
        if controller is not None:
            h, _, p = controller.rpartition(":")
            host, port = h.strip("[]") or "127.0.0.1", int(p)
        if host in ("0.0.0.0", "::", ""):
            host = "127.0.0.1"
        return cls(host, port, cfg_secret if secret is None else secret)

    def get(self, path: str) -> object:
        conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
        headers = {"Authorization": f"Bearer {self.secret}"} if self.secret else {}
        try:
            conn.request("GET", path, headers=headers)
            resp = conn.getresponse()
            body = resp.read()
        except OSError as err:
            raise ApiError(f"control API at {self.host}:{self.port}: {err}") from None
        finally:
            conn.close()
        try:
            data = json.loads(body) if body else None
        except ValueError:
            raise ApiError(f"control API answered {resp.status} with non-JSON body") from None
        if resp.status != 200:
            message = (data.get("message") if isinstance(data, dict)
                       else body[:200].decode("latin-1"))
            raise ApiError(f"control API answered {resp.status}: {message}")
        return data
