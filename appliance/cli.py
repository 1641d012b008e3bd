"""The `mirage` console command.

Each subcommand imports what it needs lazily, so `mirage check` works on a box
where bcc or the nftables bindings are missing, and starts fast.

Exit codes: 0 success, 1 runtime failure (a clear message on stderr),
2 bad configuration or usage (key path and reason on stderr).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the model is imported only when a command loads a config
    from appliance.api.client import ApiClient
    from appliance.config.model import Config
    from appliance.config.summary import ProviderCopy

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_CONFIG = 2

DEFAULT_CONFIG = Path("/etc/mirage/config.yaml")


def _load(path: Path, *, as_json: bool = False) -> Config:
    """The validated profile, or every problem in it on stderr (one line
    each: file, key path, value unless secret, reason) and exit 2; with
    `as_json` the problems are also printed on stdout as JSON."""
    from appliance.config import ConfigError, every_error, load_config

    try:
        return load_config(path)
    except ConfigError as err:
        errors = every_error(err)
        if as_json:
            print(json.dumps({"ok": False, "errors": [
                {"path": e.path, "reason": e.reason, "message": str(e)} for e in errors]},
                ensure_ascii=False, indent=2))
        for one in errors:
            print(f"mirage: {path}: {one}", file=sys.stderr)
        if len(errors) > 1:
            print(f"mirage: {path}: {len(errors)} problems", file=sys.stderr)
        raise SystemExit(EXIT_CONFIG) from None


def cmd_check(args: argparse.Namespace) -> int:
    from appliance.config.render import format_effective, ignored_lines
    from appliance.config.summary import summarize

    cfg = _load(args.config, as_json=args.json)
    summary = summarize(cfg, _cached_providers(cfg), _provider_copies(cfg))
    if args.json:
        print(json.dumps({"ok": True, "summary": summary.as_data()}, ensure_ascii=False,
                         indent=2))
        return EXIT_OK
    print(format_effective(cfg), end="")
    for line in ignored_lines(cfg):
        # YAML comments: stdout stays a loadable config.
        print(f"# {line}")
    print("# routing summary:")
    for line in summary.lines():
        print(f"#   {line}")
    print(f"# {args.config}: configuration OK", file=sys.stderr)
    return EXIT_OK


def _cached_providers(cfg: Config) -> set[str]:
    """The providers whose file exists now (an http provider's cache, a
    file provider's file), where `mirage run` would look: what they hold
    at start, before any download."""
    from appliance.providers.proxies import source_spec
    from appliance.providers.rules import provider_spec

    state = cfg.appliance.state_dir
    profile_dir = cfg.source.parent if cfg.source is not None else None
    specs = [(p.name, source_spec(p, state)) for p in cfg.proxy_providers]
    specs += [(p.name, provider_spec(p, state, profile_dir)) for p in cfg.rule_providers]
    return {name for name, spec in specs if spec.path is not None and spec.path.is_file()}


def _provider_copies(cfg: Config) -> dict[str, ProviderCopy]:
    """What each proxy provider's copy at hand (its cache or file, or its
    inline payload) yields now, parsed as `mirage run` parses it."""
    from appliance.config.summary import ProviderCopy
    from appliance.providers.proxies import parse_provided, source_spec

    copies: dict[str, ProviderCopy] = {}
    for p in cfg.proxy_providers:
        spec = source_spec(p, cfg.appliance.state_dir)
        try:
            if spec.payload is not None:
                data = spec.payload
            elif spec.path is not None and spec.path.is_file():
                data = spec.path.read_bytes()
            else:
                continue
        except OSError as e:
            copies[p.name] = ProviderCopy(error=f"cannot read it: {e.strerror}")
            continue
        try:
            provided = parse_provided(data, p)
        except ValueError as e:
            copies[p.name] = ProviderCopy(error=str(e))
            continue
        copies[p.name] = ProviderCopy(len(provided.proxies), tuple(provided.skipped.items()))
    return copies


def cmd_rules(args: argparse.Namespace) -> int:
    from appliance.capture.backend import render_plan
    from appliance.outbound.wireguard import render_plans

    cfg = _load(args.config)
    print(render_plan(cfg) + render_plans(cfg.proxies, cfg.routing_mark), end="")
    return EXIT_OK


def cmd_cleanup(args: argparse.Namespace) -> int:
    """Remove what a killed run left (systemd's ExecStopPost): nothing when
    the last run stopped cleanly. Never touches a running Mirage's
    listeners, only the capture it would remove itself on a clean exit."""
    from appliance.capture.backend import remove_all
    from appliance.outbound.wgdevice import remove_leftovers

    cfg = _load(args.config)
    _setup_logging("info")
    removed = remove_all(cfg) + remove_leftovers()
    for what in removed:
        logging.getLogger("mirage").info("cleanup: removed %s", what)
    if not removed:
        logging.getLogger("mirage").info("cleanup: nothing of Mirage's was left")
    return EXIT_OK


def cmd_run(args: argparse.Namespace) -> int:
    import trio

    from appliance.app import AppError, run_appliance

    cfg = _load(args.config)
    _setup_logging(cfg.log_level if args.log_level is None else args.log_level)
    _log_ignored(cfg)
    failures: list[AppError] = []
    try:
        trio.run(run_appliance, cfg)
    except* AppError as group:
        # Services fail inside the nursery, so their AppError arrives wrapped
        # in an exception group; each says what to fix, no traceback needed.
        failures = [e for e in _leaves(group) if isinstance(e, AppError)]
    except* KeyboardInterrupt:
        pass
    for err in failures:
        logging.getLogger("mirage").error("%s", err)
    return EXIT_FAILURE if failures else EXIT_OK


def _log_ignored(cfg: Config) -> None:
    """What the profile asks for that will not happen, once at start:
    unknown keys (likely typos) as a WARNING, the rest at INFO."""
    from appliance.config.render import ignored_lines

    log = logging.getLogger("mirage")
    for line in ignored_lines(cfg):
        log.log(logging.WARNING if line.startswith(("ignored (unknown", "instead"))
                else logging.INFO, "%s", line)


def _leaves(exc: BaseException) -> list[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for sub in exc.exceptions for leaf in _leaves(sub)]
    return [exc]


def cmd_lab(args: argparse.Namespace) -> int:
    from appliance.lab import lab as lab_module

    _setup_logging("info")
    if args.action == "up":
        lab = lab_module.lab_up(args.prefix)
        print(lab.describe())
    elif args.action == "down":
        lab_module.lab_down(args.prefix)
    else:
        from appliance.lab.demo import run_demo

        return run_demo(args.prefix)
    return EXIT_OK


def _api(args: argparse.Namespace) -> ApiClient:
    from appliance.api.client import ApiClient, ApiError

    try:
        return ApiClient.from_config_file(args.config, args.controller, args.secret)
    except ApiError as err:
        print(f"mirage: {err}", file=sys.stderr)
        raise SystemExit(EXIT_FAILURE) from None


def _call(args: argparse.Namespace, method: str, path: str, body: object = None) -> Any:
    from appliance.api.client import ApiError

    try:
        return _api(args).request(method, path, body)
    except ApiError as err:
        print(f"mirage: {err}", file=sys.stderr)
        raise SystemExit(EXIT_FAILURE) from None


def _watching(args: argparse.Namespace, show: Callable[[], None]) -> int:
    """Run `show` once, or every `--watch` seconds (screen cleared) until
    Ctrl-C."""
    import time

    interval = getattr(args, "watch", None)
    if not interval:
        show()
        return EXIT_OK
    try:
        while True:
            if sys.stdout.isatty():
                print("\033[H\033[2J", end="")
            show()
            sys.stdout.flush()
            time.sleep(interval)
    except KeyboardInterrupt:
        return EXIT_OK


def _table(rows: list[list[str]], header: list[str]) -> str:
    """Columns padded to their widest cell; the last one is left ragged."""
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = []
    for row in [header, *rows]:
        cells = [c.ljust(w) for c, w in zip(row[:-1], widths[:-1], strict=True)]
        lines.append("  ".join([*cells, row[-1]]).rstrip())
    return "\n".join(lines)


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"  # not reached


def _age(seconds: float) -> str:
    seconds = int(max(0, seconds))
    if seconds < 120:
        return f"{seconds}s"
    if seconds < 7200:
        return f"{seconds // 60}m"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def cmd_status(args: argparse.Namespace) -> int:
    def show() -> None:
        data = _call(args, "GET", "/mirage/status")
        if args.json:
            print(json.dumps(data, indent=2, sort_keys=True))
            return
        print(format_status(data))
    return _watching(args, show)


def format_status(data: dict[str, Any]) -> str:
    ports = ", ".join(f"{k} {data[k]}" for k in ("tproxy_port", "mixed_port", "socks_port",
                                                  "http_port") if data.get(k))
    lines = [
        f"mirage {data['version']}  pid {data['pid']}  up {_age(data['uptime_seconds'])}"
        f"  reloads {data['reloads']}",
        f"config    {data.get('config') or '-'}",
        f"capture   {data['redirect']} on {', '.join(data['lan']) or '(no LAN: none)'}",
        f"dns       {data['dns_listen']}",
        f"ports     {ports or '-'}",
        "",
    ]
    rows = [[component, key, str(value)]
            for component, values in sorted(data["counters"].items())
            for key, value in sorted(values.items())]
    lines.append(_table(rows, ["COMPONENT", "COUNTER", "VALUE"]))
    if data.get("clients"):
        lines += ["", _table([[c["address"], str(c["packets"]), _size(c["bytes"])]
                              for c in data["clients"]], ["CLIENT", "PACKETS", "BYTES"])]
    refused = [[limit, str(r["client"]), str(r["refused"])]
               for limit, rows in sorted(data.get("refused_clients", {}).items()) for r in rows]
    if refused:
        lines += ["", _table(refused, ["LIMIT", "CLIENT", "REFUSED"])]
    return "\n".join(lines)


def cmd_mappings(args: argparse.Namespace) -> int:
    data = _call(args, "GET", "/mirage/mappings")
    rows = data.get("mappings", [])
    if args.json:
        print(json.dumps(rows, indent=2))
        return EXIT_OK
    for row in rows:
        pins = f"  pinned x{row['pins']}" if row.get("pins") else ""
        print(f"{row['ip']:<40} {row['domain']}{pins}")
    print(f"# {len(rows)} mappings", file=sys.stderr)
    return EXIT_OK


def cmd_connections(args: argparse.Namespace) -> int:
    from urllib.parse import quote

    if args.close is not None:
        path = "/connections" if args.close == "all" else f"/connections/{quote(args.close)}"
        _call(args, "DELETE", path)
        print(f"closed {'every connection' if args.close == 'all' else args.close}")
        return EXIT_OK

    def show() -> None:
        data = _call(args, "GET", "/connections")
        if args.json:
            print(json.dumps(data, indent=2))
            return
        print(format_connections(data))
    return _watching(args, show)


def format_connections(data: dict[str, Any]) -> str:
    from datetime import datetime

    now = datetime.now().astimezone()
    rows = []
    for c in sorted(data.get("connections") or [], key=lambda c: c["start"]):
        m = c["metadata"]
        host = m.get("host") or m.get("destinationIP", "")
        dst = f"[{host}]" if ":" in host else host
        started = datetime.fromisoformat(c["start"].replace("Z", "+00:00"))
        rule = f"{c['rule']}({c['rulePayload']})" if c.get("rulePayload") else c.get("rule", "")
        rows.append([c["id"], m["network"], f"{m['sourceIP']}:{m['sourcePort']}",
                     f"{dst}:{m['destinationPort']}", " <- ".join(c.get("chains") or []),
                     rule, _size(c["upload"]), _size(c["download"]),
                     _age((now - started).total_seconds())])
    table = _table(rows, ["ID", "NET", "SOURCE", "DESTINATION", "CHAIN", "RULE", "UP", "DOWN",
                          "AGE"])
    return (f"{table}\n# {len(rows)} connections; since start up "
            f"{_size(data.get('uploadTotal', 0))}, down {_size(data.get('downloadTotal', 0))}")


def cmd_resolve(args: argparse.Namespace) -> int:
    from urllib.parse import quote

    data = _call(args, "GET", f"/mirage/resolve?name={quote(args.name)}&type={quote(args.type)}")
    if args.json:
        print(json.dumps(data, indent=2, sort_keys=True))
        return EXIT_OK
    mapping = ", ".join(data["mapping"].values()) or "-"
    print(f"{data['name']} {data['type']}: fake IP {'yes' if data['fake_ip'] else 'no'} "
          f"(mapping {mapping})")
    upstream = data["upstream"]
    asked = upstream.get("asked")
    if asked:
        also = f"; fallback {', '.join(asked['fallback'])}" if asked["fallback"] else ""
        print(f"asked ({asked['why']}): {', '.join(asked['servers'])}{also}")
    if "error" in upstream:
        print(f"upstream: {upstream['error']}")
        return EXIT_OK
    rows = [[a["name"], a["type"], str(a["ttl"]), a["data"]] for a in upstream["answers"]]
    print(f"upstream: {upstream['rcode']}")
    if rows:
        print(_table(rows, ["NAME", "TYPE", "TTL", "DATA"]))
    return EXIT_OK


def cmd_select(args: argparse.Namespace) -> int:
    from urllib.parse import quote

    path = f"/proxies/{quote(args.group, safe='')}"
    if args.proxy is not None:
        _call(args, "PUT", path, {"name": args.proxy})
    group = _call(args, "GET", path)
    if "all" not in group:
        print(f"mirage: {args.group} is a proxy, not a group", file=sys.stderr)
        return EXIT_FAILURE
    if args.json:
        print(json.dumps(group, indent=2))
        return EXIT_OK
    print(f"{group['name']} ({group['type']}): {group['now']}")
    for member in group["all"]:
        print(f"  {'*' if member == group['now'] else ' '} {member}")
    return EXIT_OK


def _product_names(record: logging.LogRecord) -> bool:
    """Show module loggers (`appliance.gateway.tcp`) under the product's
    name (`mirage.gateway.tcp`), like the loggers named `mirage.*`, so an
    operator greps one prefix."""
    if record.name.startswith("appliance."):
        record.name = "mirage." + record.name[len("appliance."):]
    return True


def _setup_logging(level: str) -> None:
    levels = {"silent": logging.CRITICAL + 1, "error": logging.ERROR, "warning": logging.WARNING,
              "info": logging.INFO, "debug": logging.DEBUG}
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s"))
    handler.addFilter(_product_names)
    logging.basicConfig(level=levels.get(level, logging.INFO), handlers=[handler])
    # httpx logs every DoH request at INFO: one line per upstream query is
    # noise on a gateway; its warnings still show.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    logging.getLogger("httpcore").setLevel(logging.WARNING)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mirage", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    def with_config(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        p.add_argument("-c", "--config", type=Path,
                       default=Path(os.environ.get("MIRAGE_CONFIG", DEFAULT_CONFIG)),
                       help="configuration file (default: %(default)s)")
        return p

    p = with_config(sub.add_parser("run", help="run the appliance in this network namespace"))
    p.add_argument("--log-level", choices=["debug", "info", "warning", "error", "silent"])
    p.set_defaults(func=cmd_run)
    p = with_config(sub.add_parser("check", help="validate the configuration and summarise "
                                   "what it does to traffic"))
    p.add_argument("--json", action="store_true",
                   help="print the routing summary (or the errors) as JSON instead")
    p.set_defaults(func=cmd_check)
    with_config(sub.add_parser("rules", help="print the capture rules run would apply")
                ).set_defaults(func=cmd_rules)
    with_config(sub.add_parser("cleanup", help="remove the capture a killed run left behind")
                ).set_defaults(func=cmd_cleanup)

    p = sub.add_parser("lab", help="the network-namespace lab (client, gateway, upstream)")
    p.add_argument("action", choices=["up", "down", "demo"])
    p.add_argument("--prefix", default="mirage", help="namespace name prefix (default: mirage)")
    p.set_defaults(func=cmd_lab)

    for name, func, helptext in [
        ("status", cmd_status, "show the running appliance's status and counters"),
        ("mappings", cmd_mappings, "list fake-IP mappings"),
        ("connections", cmd_connections, "list live connections (or close them)"),
        ("resolve", cmd_resolve, "show the real upstream answer next to the mapping"),
        ("select", cmd_select, "show a group's members, or switch a select group to PROXY"),
    ]:
        p = with_config(sub.add_parser(name, help=helptext))
        p.add_argument("--controller", help="host:port of the control API (default: from config)")
        p.add_argument("--secret", help="bearer secret (default: from config)")
        p.add_argument("--json", action="store_true", help="the API's JSON instead of a table")
        if name == "resolve":
            p.add_argument("name")
            p.add_argument("--type", default="A")
        if name == "select":
            p.add_argument("group")
            p.add_argument("proxy", nargs="?")
        if name in ("status", "connections"):
            p.add_argument("--watch", type=float, nargs="?", const=1.0, metavar="SECONDS",
                           help="refresh every SECONDS (default 1) until Ctrl-C")
        if name == "connections":
            p.add_argument("--close", metavar="ID|all", help="close one connection, or all")
        p.set_defaults(func=func)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command != "run":
        # `mirage mappings | head` should just stop, not print a
        # BrokenPipeError. Never for `run`: Python ignores SIGPIPE so that a
        # write to a closed socket is an EPIPE error, not the end of the
        # appliance.
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    result: int = args.func(args)
    return result


if __name__ == "__main__":
    raise SystemExit(main())
