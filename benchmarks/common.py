"""What the benchmark scripts share: their integer options and ``--plot`` figures."""

from __future__ import annotations

import argparse


def options(doc: str, **defaults: int) -> argparse.ArgumentParser:
    """A parser described by ``doc``'s first line with one ``--name`` integer option per
    keyword (``repeats=5`` -> ``--repeats``, default 5); a script adds what else it takes."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    for name, default in defaults.items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=int, default=default)
    return parser


def pyplot():
    """``matplotlib.pyplot`` on the file-only Agg backend, or None (with a note) if
    matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed; no plot")
        return None
    return plt


def save(fig, path: str) -> None:
    """Write ``fig`` to ``path`` (tight layout) and say so."""
    fig.tight_layout()
    fig.savefig(path)
    print(f"wrote {path}")
