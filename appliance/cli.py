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
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the model is imported only when a command loads a config
    from appliance.config.model import Config

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_CONFIG = 2

DEFAULT_CONFIG = Path("/etc/mirage/config.yaml")


def _load(path: Path) -> Config:
    from appliance.config import ConfigError, load_config

    try:
        return load_config(path)
    except ConfigError as err:
        print(f"mirage: {path}: {err}", file=sys.stderr)
        raise SystemExit(EXIT_CONFIG) from None


def cmd_check(args: argparse.Namespace) -> int:
    from appliance.config.render import format_effective, format_ignored

    cfg = _load(args.config)
    print(format_effective(cfg), end="")
    ignored = format_ignored(cfg)
    if ignored:
        # A YAML comment: stdout stays a loadable config.
        print(f"# {ignored.strip()}")
    print(f"# {args.config}: configuration OK", file=sys.stderr)
    return EXIT_OK


def cmd_rules(args: argparse.Namespace) -> int:
    from appliance.capture.backend import render_plan

    cfg = _load(args.config)
    print(render_plan(cfg), end="")
    return EXIT_OK


def cmd_cleanup(args: argparse.Namespace) -> int:
    """Remove what a killed run left (systemd's ExecStopPost): nothing when
    the last run stopped cleanly. Never touches a running Mirage's
    listeners, only the capture it would remove itself on a clean exit."""
    from appliance.capture.backend import remove_all

    cfg = _load(args.config)
    _setup_logging("info")
    removed = remove_all(cfg)
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


def _api_get(args: argparse.Namespace, path: str) -> object:
    from appliance.api.client import ApiClient, ApiError

    try:
        client = ApiClient.from_config_file(args.config, args.controller, args.secret)
        return client.get(path)
    except ApiError as err:
        print(f"mirage: {err}", file=sys.stderr)
        raise SystemExit(EXIT_FAILURE) from None


def cmd_status(args: argparse.Namespace) -> int:
    data = _api_get(args, "/mirage/status")
    print(json.dumps(data, indent=2, sort_keys=True))
    return EXIT_OK


def cmd_mappings(args: argparse.Namespace) -> int:
    data = _api_get(args, "/mirage/mappings")
    assert isinstance(data, dict)
    rows = data.get("mappings", [])
    if args.json:
        print(json.dumps(rows, indent=2))
        return EXIT_OK
    for row in rows:
        pins = f"  pinned x{row['pins']}" if row.get("pins") else ""
        print(f"{row['ip']:<40} {row['domain']}{pins}")
    print(f"# {len(rows)} mappings", file=sys.stderr)
    return EXIT_OK


def cmd_resolve(args: argparse.Namespace) -> int:
    from urllib.parse import quote

    data = _api_get(args, f"/mirage/resolve?name={quote(args.name)}&type={quote(args.type)}")
    print(json.dumps(data, indent=2, sort_keys=True))
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
    with_config(sub.add_parser("check", help="validate the configuration")).set_defaults(
        func=cmd_check)
    with_config(sub.add_parser("rules", help="print the capture rules run would apply")
                ).set_defaults(func=cmd_rules)
    with_config(sub.add_parser("cleanup", help="remove the capture a killed run left behind")
                ).set_defaults(func=cmd_cleanup)

    p = sub.add_parser("lab", help="the network-namespace lab (client, gateway, upstream)")
    p.add_argument("action", choices=["up", "down", "demo"])
    p.add_argument("--prefix", default="mirage", help="namespace name prefix (default: mirage)")
    p.set_defaults(func=cmd_lab)

    for name, func, helptext in [
        ("status", cmd_status, "show the running appliance's status"),
        ("mappings", cmd_mappings, "list fake-IP mappings"),
        ("resolve", cmd_resolve, "show the real upstream answer next to the mapping"),
    ]:
        p = with_config(sub.add_parser(name, help=helptext))
        p.add_argument("--controller", help="host:port of the control API (default: from config)")
        p.add_argument("--secret", help="bearer secret (default: from config)")
        if name == "resolve":
            p.add_argument("name")
            p.add_argument("--type", default="A")
        if name == "mappings":
            p.add_argument("--json", action="store_true")
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
