"""The `factory` command."""

from __future__ import annotations

import argparse
import sys

from factory.bench.cli import add_command as add_bench_command
from factory.calibrate import add_command as add_calibrate_command
from factory.config import ConfigError, load_config, with_overrides
from factory.metering.cli import add_commands as add_metering_commands
from factory.power.cli import add_command as add_power_command
from factory.sim.cli import add_command as add_sim_command


def _serve(args: argparse.Namespace) -> int:
    try:
        cfg = load_config(args.config)
        cfg = with_overrides(
            cfg,
            server={"host": args.host, "port": args.port, "allow_unauthenticated": args.allow_unauthenticated or None},
            ray={"address": args.address},
            top={"auth": args.auth},
        )
    except ConfigError as err:
        print(f"factory: {err}", file=sys.stderr)
        return 2
    from factory.launcher import supervise

    return supervise(cfg)


def _models_pull(args: argparse.Namespace) -> int:
    from factory.models import ModelPullError, ModelSourceError, pull

    try:
        path = pull(args.name)
    except (ModelPullError, ModelSourceError) as err:
        print(f"factory: {err}", file=sys.stderr)
        return 1
    print(path)
    return 0


def _models_list(_: argparse.Namespace) -> int:
    from factory.models import EMBEDDED, is_pulled, model_dir

    for name, spec in EMBEDDED.items():
        state = "pulled" if is_pulled(name) else "not pulled"
        print(f"{name}\t{state}\t{spec.licence}\t{model_dir(name)}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="factory", description="Token Factory: energy-aware LLM serving.")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("serve", help="run the factory (OpenAI-compatible API) until Ctrl-C/SIGTERM")
    s.add_argument("config", nargs="?", default=None, help="YAML config (default: configs/default.yaml)")
    s.add_argument("--address", default=None, help="join this Ray cluster instead of starting a local one")
    s.add_argument("--host", default=None, help="bind address (default 127.0.0.1)")
    s.add_argument("--port", type=int, default=None, help="port (default 8000)")
    s.add_argument("--auth", choices=["required", "disabled"], default=None, help="override the config's auth")
    s.add_argument(
        "--allow-unauthenticated",
        action="store_true",
        help="let auth: disabled bind a non-loopback address (anyone who reaches it gets tokens free)",
    )
    s.set_defaults(func=_serve)

    m = sub.add_parser("models", help="embedded models").add_subparsers(dest="models_command", required=True)
    pull = m.add_parser("pull", help="fetch and convert an embedded model into the cache (FACTORY_HOME)")
    pull.add_argument("name")
    pull.set_defaults(func=_models_pull)
    m.add_parser("list", help="embedded models and whether they are pulled").set_defaults(func=_models_list)
    add_metering_commands(sub)
    add_calibrate_command(sub)
    add_power_command(sub)
    add_bench_command(sub)
    add_sim_command(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
