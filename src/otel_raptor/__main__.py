"""The ``otel-raptor`` command (also ``python -m otel_raptor``).

Subcommands:

* ``demo [--quick] [--seed N] [--workers N]``: run the fault-injection demo, plain versus
  raptor, and print the comparison (see ``docs/demo.md``). Exit status 0 when it ran, 1 when
  it could not (a missing dependency or an error, explained in one line), 2 for bad usage.
* ``report --prometheus URL [--range 1h] [--service S] [--format text|json]``: the error
  recovery report of a whole fleet, from the Prometheus its telemetry goes to (see
  ``docs/analytics.md``). Exit status 0 when it ran, 1 when Prometheus could not be asked,
  2 for bad usage.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from collections.abc import Sequence

from otel_raptor._version import __version__

__all__ = ["main"]


def _workers(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if not 1 <= value <= 64:
        raise argparse.ArgumentTypeError(f"expected an integer in [1, 64], got {text!r}")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="otel-raptor",
        description="OpenTelemetry-native resilience for Python.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    demo = commands.add_parser(
        "demo",
        help="run the same HTTP workload against scripted faults, plain and under raptor",
        description=(
            "Start a loopback HTTP server with a fault schedule (healthy, random 503s, 429 with"
            " Retry-After, a hard outage, recovery), run one client workload against it twice"
            " (plain, then under RaptorInstrumentor) and compare the measured results."
            " Telemetry is summarised on the console, and exported over OTLP when"
            " OTEL_EXPORTER_OTLP_ENDPOINT is set."
        ),
    )
    demo.add_argument(
        "--quick", action="store_true", help="a ~5 s schedule per run instead of ~22 s"
    )
    demo.add_argument(
        "--seed", type=int, default=42, help="seed of the server's random 503s (default 42)"
    )
    demo.add_argument(
        "--workers",
        type=_workers,
        default=4,
        metavar="N",
        help="concurrent client workers, 1-64 (default 4)",
    )
    report = commands.add_parser(
        "report",
        help="the error-recovery report of a fleet, from Prometheus",
        description=(
            "Build the monitor's report (per service: success rate, recovery time p50/p95,"
            " top error types, breaker trips; effectiveness by strategy; alerts) for every"
            " process whose raptor metrics reach the given Prometheus, over a time range."
        ),
    )
    report.add_argument(
        "--prometheus", required=True, metavar="URL", help="the Prometheus base URL"
    )
    report.add_argument(
        "--range",
        dest="range_s",
        type=_range,
        default=3600.0,
        metavar="DURATION",
        help="how far back from now, a Prometheus duration (default 1h)",
    )
    report.add_argument("--service", help="only this service (raptor_service label)")
    report.add_argument(
        "--format", choices=("text", "json"), default="text", help="output (default text)"
    )
    return parser


def _range(text: str) -> float:
    from otel_raptor.fleet import parse_range  # noqa: PLC0415 - only this command needs it

    try:
        return parse_range(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _report(args: argparse.Namespace) -> int:
    from otel_raptor.fleet import (  # noqa: PLC0415 - only this command needs it
        FleetReportError,
        PrometheusClient,
        fleet_report,
        render_report,
        report_json,
    )

    try:
        client = PrometheusClient(args.prometheus)
        result = fleet_report(client, range_s=args.range_s, service=args.service)
    except (FleetReportError, ValueError) as error:
        print(f"otel-raptor report: {error}", file=sys.stderr)
        return 1
    print(report_json(result) if args.format == "json" else render_report(result), end="")
    if args.format == "json":
        print()
    return 0


def _demo(args: argparse.Namespace) -> int:
    if importlib.util.find_spec("requests") is None:
        print(
            "otel-raptor demo needs the 'requests' package: pip install 'otel-raptor[demo]'",
            file=sys.stderr,
        )
        return 1
    from otel_raptor._demo import DemoOptions, run_demo  # noqa: PLC0415 - needs requests

    try:
        run_demo(DemoOptions(quick=args.quick, seed=args.seed, workers=args.workers))
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command == "demo":
        return _demo(args)
    if args.command == "report":
        return _report(args)
    parser.print_help()
    return 2


if __name__ == "__main__":
    sys.exit(main())
