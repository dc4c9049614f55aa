"""Command line: ``python -m fastbn bench ...``, ``python -m fastbn demo ...`` and
``python -m fastbn warmup ...``."""

import argparse
import sys


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m fastbn", description="fastbn: fast batch normalization for NumPy"
    )
    sub = parser.add_subparsers(dest="command", required=True)
    bench = sub.add_parser(
        "bench", help="check fastbn and time it against the reference (and torch when installed)"
    )
    demo = sub.add_parser(
        "demo",
        help="train an MLP on the digits data with and without batch norm and plot what it shows",
    )
    warm = sub.add_parser(
        "warmup",
        help="compile and cache every kernel a training loop uses (images, CI, shared machines)",
    )
    from . import _warmup, benchmark

    _warmup.add_arguments(warm)

    benchmark.add_arguments(bench)
    try:
        from .examples import demo as demo_module
    except ImportError:  # examples not available in this install
        demo_module = None
    if demo_module is not None:
        demo_module.add_arguments(demo)
    args = parser.parse_args(argv)
    if args.command == "bench":
        return benchmark.run(args)
    if args.command == "warmup":
        return _warmup.run(args)
    if demo_module is None:
        parser.error("the demo needs fastbn.examples")
    return demo_module.run(args)


if __name__ == "__main__":
    sys.exit(main())
