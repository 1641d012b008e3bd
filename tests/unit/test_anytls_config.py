"""`type: anytls` at load (mihomo's keys and its 5-second rule for the idle
times) and the outbound it builds; the idle session pool's cleanup."""

from __future__ import annotations

from typing import Any

import trio

from appliance.config.loader import ConfigError, parse_config
from appliance.config.protocols.anytls import AnytlsOptions
from appliance.config.render import effective_config
from appliance.outbound.anytls import AnytlsOutbound, AnytlsPool, AnytlsSession
from appliance.outbound.build import build_outbounds
from appliance.proto.anytls import DEFAULT_PADDING_SCHEME, ClientSession, PaddingScheme


def _profile(**proxy: Any) -> dict[str, Any]:
    entry = {"name": "a", "type": "anytls", "server": "at.example", "port": 443,
             "password": "pw", **proxy}
    return {"dns": {"nameserver": ["https://192.0.2.53/dns-query"]},
            "proxies": [entry], "rules": ["MATCH,a"]}


def test_options_tls_and_the_outbound() -> None:
    cfg = parse_config(_profile(udp=True, sni="front.example", alpn=["h2"],
                                **{"skip-cert-verify": True, "client-fingerprint": "chrome",
                                   "idle-session-check-interval": 3,
                                   "idle-session-timeout": 60, "min-idle-session": 2}))
    p = cfg.proxies[0]
    assert isinstance(p.options, AnytlsOptions)
    assert p.options.idle_session_check_interval == 30.0  # 5 s or less: 30 s (mihomo)
    assert p.options.idle_session_timeout == 60.0 and p.options.min_idle_session == 2
    assert p.tls_options is not None and p.tls_options.sni == "front.example"
    out = build_outbounds(cfg, None)["a"]
    assert isinstance(out, AnytlsOutbound) and out.carries_udp
    assert effective_config(cfg, redact=True)["proxies"][0]["password"] == "<redacted>"
    assert parse_config(effective_config(cfg, redact=False)) == cfg


def test_bad_values_skip_the_proxy_naming_their_key() -> None:
    """mihomo -t loads both (the proxy fails when dialled): Mirage skips the
    proxy at load and says which key, instead of failing its flows."""
    for extra, key in (({"password": ""}, "password"), ({"min-idle-session": -1},
                                                         "min-idle-session")):
        profile = _profile(**extra)
        profile["rules"] = ["MATCH,DIRECT"]
        cfg = parse_config(profile)
        assert not cfg.proxies
        (note,) = [n for n in cfg.load_notes if n.kind == "skipped" and n.path == "proxies[0]"]
        assert isinstance(note.error, ConfigError) and note.error.path == f"proxies[0].{key}"


class _NullStream(trio.abc.Stream):
    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await trio.lowlevel.checkpoint()

    async def wait_send_all_might_not_block(self) -> None:
        await trio.lowlevel.checkpoint()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        await trio.sleep_forever()
        raise AssertionError

    async def aclose(self) -> None:
        await trio.lowlevel.checkpoint()


async def test_idle_cleanup_keeps_the_newest_min_idle_sessions() -> None:
    pool = AnytlsPool("a", AnytlsOptions(password="pw", idle_session_timeout=30.0,
                                         min_idle_session=1))
    owner = AnytlsPool("stands for the outbound", pool.options)
    pool.owner = lambda: owner
    sessions = []
    for _ in range(3):
        s = AnytlsSession(pool, _NullStream(),
                          ClientSession("pw", PaddingScheme(DEFAULT_PADDING_SCHEME)))
        pool._seq += 1
        s.seq = pool._seq
        pool.sessions.add(s)
        pool.release(s)
        sessions.append(s)
    now = trio.current_time()
    sessions[0].idle_since = sessions[1].idle_since = now - 100  # expired
    pool.cleanup(now)
    # The newest is fresh; of the expired ones, none is needed for min 1.
    assert pool.idle == [sessions[2]]
    assert sessions[0].closed_reason == sessions[1].closed_reason == "idle"
    sessions[2].idle_since = now - 100
    pool.cleanup(now)
    assert pool.idle == [sessions[2]] and sessions[2].closed_reason is None
    # The outbound replaced by a reload: min-idle-session keeps nothing.
    pool.owner = lambda: None
    pool.cleanup(now)
    assert pool.idle == [] and sessions[2].closed_reason == "idle"
    assert pool.take() is None


def test_the_pool_learns_when_its_outbound_is_gone() -> None:
    import gc

    cfg = parse_config(_profile(**{"min-idle-session": 3}))
    out = build_outbounds(cfg, None)["a"]
    assert isinstance(out, AnytlsOutbound)
    pool = out.pool
    assert pool.owner() is out
    del out, cfg
    gc.collect()
    assert pool.owner() is None
