"""Command-line entry point (placeholder until the appliance lands)."""
import sys


def main(argv: list[str] | None = None) -> int:
    print("ipfixer: not yet", file=sys.stderr)
    return 0
