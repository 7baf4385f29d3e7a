"""The `ipfixer` command: argument parsing, and the one place where errors are reported to the user.

Every command imports what it needs lazily, so `ipfixer check` does not pay for bcc or pyroute2.
Exit status: 0 ok, 1 runtime failure, 2 usage or configuration error.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

from ipfixer.errors import ConfigError, IpfixerError, TemplateError
from ipfixer.resources import share_dir

DEFAULT_CONFIG = share_dir("config") / "ipfixer.yaml"
EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2


def _load_checked(path: str) -> Any:
    """The config file, validated, with the templates it names loaded and checked too."""
    from ipfixer.config import load_config
    from ipfixer.export.factory import load_config_templates

    config = load_config(path)
    try:
        load_config_templates(config)
    except ConfigError as exc:
        raise ConfigError("\n".join(f"{path}: {line}" for line in str(exc).splitlines())) from None
    return config


def _cmd_run(args: argparse.Namespace) -> int:
    from ipfixer.daemon import Daemon, setup_logging

    config = _load_checked(args.config)
    setup_logging(config.log_level)
    daemon = Daemon(config, config_path=Path(args.config))
    return daemon.run(duration_s=args.duration)


def _cmd_check(args: argparse.Namespace) -> int:
    from ipfixer.config import resolve_collectors
    from ipfixer.export.factory import load_config_templates

    config = _load_checked(args.file)
    resolve_collectors(config, args.file)  # what `run` would refuse at start-up, as a config error
    data, options = load_config_templates(config)
    names = sorted({t.name for t in [*data.values(), *options]})
    print(f"{args.file}: ok ({len(config.collectors)} collector(s); templates {', '.join(names)})")
    return EXIT_OK


def _cmd_config_schema(args: argparse.Namespace) -> int:
    from ipfixer.config import config_schema

    print(json.dumps(config_schema(), indent=2, sort_keys=True))
    return EXIT_OK


def _cmd_templates(args: argparse.Namespace) -> int:
    from ipfixer.templates import DEFAULT_TEMPLATES_DIR, describe, load_templates

    templates = load_templates(Path(args.directory) if args.directory else DEFAULT_TEMPLATES_DIR)
    print("\n".join(describe(templates)))
    return EXIT_OK


def _cmd_decode(args: argparse.Namespace) -> int:
    from ipfixer.collector import decode_pcap, listen_and_print

    if args.pcap:
        return decode_pcap(Path(args.pcap), as_json=args.json, port=args.port)
    if args.file:
        from ipfixer.collector import decode_file

        return decode_file(Path(args.file), as_json=args.json)
    return listen_and_print(args.listen, args.port, as_json=args.json, count=args.count, timeout_s=args.timeout)


def _cmd_replay(args: argparse.Namespace) -> int:
    from ipfixer.replay import replay_pcap

    config = _load_checked(args.config)
    if args.output:  # the capture becomes an IPFIX File (RFC 5655) instead of going to the collectors
        from ipfixer.config import CollectorConfig

        out = CollectorConfig(transport="file", path=Path(args.output), max_message_size=65507)
        config = config.model_copy(update={"collectors": (out,)})
    summary = replay_pcap(Path(args.pcap), config, progress=not args.quiet)
    print(json.dumps(summary, sort_keys=True))
    return EXIT_OK


def _cmd_stats(args: argparse.Namespace) -> int:
    from ipfixer.metrics import scrape

    url = args.url
    if url is None:
        from ipfixer.config import load_config

        listen = load_config(args.config).metrics.listen
        if not listen:
            raise ConfigError(f"{args.config}: metrics.listen: metrics are disabled (got None)")
        url = f"http://{listen}/metrics"
    values = scrape(url)
    if args.json:
        print(json.dumps(values, sort_keys=True))
    else:
        for name in sorted(values):
            print(f"{name:<70} {values[name]:g}")
    return EXIT_OK


def _cmd_ctl(args: argparse.Namespace) -> int:
    from ipfixer.control import format_result, request, socket_path

    if args.socket:
        path = Path(args.socket)
    else:
        from ipfixer.config import load_config

        path = socket_path(load_config(args.config))
    result = request(path, args.ctl_command, {"top": args.top} if args.ctl_command == "flows" else {})
    print(json.dumps(result, sort_keys=True) if args.json else format_result(args.ctl_command, result))
    return EXIT_OK


def _cmd_demo(args: argparse.Namespace) -> int:
    from ipfixer.demo import run_demo

    return run_demo(duration_s=args.duration)


def build_parser() -> argparse.ArgumentParser:
    """The CLI grammar."""
    p = argparse.ArgumentParser(prog="ipfixer", description="eBPF flow meter and IPFIX / NetFlow v9 exporter")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser("run", help="run the exporter in the foreground")
    run.add_argument("--config", "-c", default=str(DEFAULT_CONFIG), help="config file (default: %(default)s)")
    run.add_argument("--duration", type=float, default=None, help="stop (and flush) after this many seconds")
    run.set_defaults(func=_cmd_run)

    check = sub.add_parser("check", help="validate a config file without starting")
    check.add_argument("file", nargs="?", default=str(DEFAULT_CONFIG))
    check.set_defaults(func=_cmd_check)

    cfg = sub.add_parser("config", help="config helpers")
    cfg_sub = cfg.add_subparsers(dest="config_command", required=True, metavar="SUBCOMMAND")
    schema = cfg_sub.add_parser("schema", help="print the config file's JSON schema")
    schema.set_defaults(func=_cmd_config_schema)

    tpl = sub.add_parser("templates", help="list templates with their elements, IANA ids and lengths")
    tpl.add_argument("--directory", default=None)
    tpl.set_defaults(func=_cmd_templates)

    dec = sub.add_parser("decode", help="print the IPFIX / NetFlow v9 records received on a UDP port or in a pcap")
    dec.add_argument("--listen", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    dec.add_argument("--port", type=int, default=4739, help="UDP port (default: %(default)s)")
    dec.add_argument("--pcap", default=None, help="read datagrams from a capture file instead")
    dec.add_argument("--file", default=None, help="read an IPFIX File (RFC 5655) instead")
    dec.add_argument("--json", action="store_true", help="JSON lines instead of a table")
    dec.add_argument("--count", type=int, default=None, help="stop after this many messages")
    dec.add_argument("--timeout", type=float, default=None, help="stop after this many seconds")
    dec.set_defaults(func=_cmd_decode)

    rep = sub.add_parser("replay", help="export the flows of a capture file (offline, like softflowd -r)")
    rep.add_argument("pcap")
    rep.add_argument("--config", "-c", default=str(DEFAULT_CONFIG))
    rep.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    rep.add_argument("--output", "-o", default=None, help="write an IPFIX File (RFC 5655) instead of exporting")
    rep.set_defaults(func=_cmd_replay)

    st = sub.add_parser("stats", help="show a running daemon's counters")
    st.add_argument("--config", "-c", default=str(DEFAULT_CONFIG))
    st.add_argument("--url", default=None, help="metrics URL (default: from the config's metrics.listen)")
    st.add_argument("--json", action="store_true")
    st.set_defaults(func=_cmd_stats)

    ctl = sub.add_parser("ctl", help="control a running daemon over its unix socket (root)")
    ctl.add_argument("ctl_command", choices=("stats", "flows", "expire-all", "send-templates", "reload"),
                     metavar="{stats,flows,expire-all,send-templates,reload}")
    ctl.add_argument("--config", "-c", default=str(DEFAULT_CONFIG), help="the daemon's config (finds the socket)")
    ctl.add_argument("--socket", "-s", default=None, help="control socket path (default: from the config)")
    ctl.add_argument("--json", action="store_true")
    ctl.add_argument("--top", type=int, default=20, help="flows: how many, largest by octets (default: %(default)s)")
    ctl.set_defaults(func=_cmd_ctl)

    demo = sub.add_parser("demo", help="build a lab of network namespaces, export its traffic, show the flows")
    demo.add_argument("--duration", type=float, default=8.0)
    demo.set_defaults(func=_cmd_demo)
    return p


def quiet_scapy() -> None:
    """scapy logs its own warnings ("MAC address to reach destination not found", "unknown LL type")
    straight to stderr through a handler of its own. Set its logger's level before scapy is imported
    (scapy keeps a level already set): only its errors get through, and ipfixer reports its own problems."""
    logging.getLogger("scapy").setLevel(logging.ERROR)


def main(argv: list[str] | None = None) -> int:
    """Entry point; reports every ipfixer error once, without a traceback."""
    quiet_scapy()
    args = build_parser().parse_args(argv)
    try:
        rc: Any = args.func(args)
        return int(rc or 0)
    except (ConfigError, TemplateError) as exc:
        print(f"ipfixer: configuration error:\n{exc}", file=sys.stderr)
        return EXIT_USAGE
    except IpfixerError as exc:
        print(f"ipfixer: error: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        return EXIT_OK
    except BrokenPipeError:
        return EXIT_OK
    finally:
        logging.shutdown()


if __name__ == "__main__":
    sys.exit(main())
