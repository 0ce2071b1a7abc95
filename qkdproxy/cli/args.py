"""Command-line options that remember they were given, so a configuration file fills in
only what the command line left out (command-line values override file values)."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

GIVEN = "given_options"


class _Given(argparse._StoreAction):
    """``store``, and record the option's dest in ``namespace.given_options``."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: str | Sequence[Any] | None,
        option_string: str | None = None,
    ) -> None:
        """Store the value and remember that the command line set it."""
        super().__call__(parser, namespace, values, option_string)
        setattr(namespace, GIVEN, given(namespace) | {self.dest})


def remember_given(parser: argparse.ArgumentParser) -> None:
    """Make every plain ``store`` option of ``parser`` record that it was given.

    Done on the built parser (rather than ``action=`` on each option) so that options added
    later by anyone are covered without thinking about it."""
    for action in parser._actions:
        if type(action) is argparse._StoreAction:
            action.__class__ = _Given


def given(namespace: argparse.Namespace) -> set[str]:
    """The dests the command line set explicitly."""
    return set(getattr(namespace, GIVEN, set()))
