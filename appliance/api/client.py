"""The client side of the control API, for the `mirage` commands (status,
mappings, connections, resolve, select).

Synchronous httpx: a command makes a request or two and exits (`--watch`
repeats). Errors are `ApiError` with a message for a person: the address
it could not reach, or the status and the API's `message`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx


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

    @property
    def base_url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def request(self, method: str, path: str, body: object = None) -> Any:
        """One request; the decoded JSON answer (None for 204)."""
        headers = {"Authorization": f"Bearer {self.secret}"} if self.secret else {}
        try:
            with httpx.Client(base_url=self.base_url, timeout=self.timeout,
                              trust_env=False) as client:
                resp = client.request(method, path, headers=headers,
                                      json=body if body is not None else None)
        except httpx.HTTPError as err:
            raise ApiError(f"control API at {self.base_url}: {err}") from None
        if resp.status_code == 204:
            return None
        try:
            data = resp.json()
        except ValueError:
            raise ApiError(f"control API answered {resp.status_code} with non-JSON "
                           "body") from None
        if resp.status_code >= 300:
            message = data.get("message") if isinstance(data, dict) else resp.text[:200]
            raise ApiError(f"control API answered {resp.status_code}: {message}")
        return data

    def get(self, path: str) -> Any:
        return self.request("GET", path)
