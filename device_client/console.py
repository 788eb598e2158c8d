"""Rich output of the ``fleet`` command line, shared by the server and the device commands.

Text lines are never wrapped by rich (a path in an error stays one line you can copy); output that
is not a terminal (a pipe, a file) gives tables the width they need instead of 80 columns; log
records emitted while a live display redraws print above it. Needs only rich (the base install).
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from typing import Any

from rich.console import Console, ConsoleDimensions
from rich.file_proxy import FileProxy
from rich.live import Live
from rich.rule import Rule
from rich.text import Text

#: the width of output that is not a terminal: tables render as wide as their content, up to this
PIPE_WIDTH = 1000
#: the width of a rule (a full-width line) on output that is not a terminal
PIPE_RULE_WIDTH = 80


class CliConsole(Console):
    """A :class:`~rich.console.Console` that prints text without wrapping it and is
    :data:`PIPE_WIDTH` wide when its file is not a terminal (unless a width or ``COLUMNS`` is
    given), checked at each use: the same console serves a terminal, a pipe, or a test runner's
    captured stream. Tables and rules still lay out at the console's width."""

    def print(self, *objects: Any, soft_wrap: bool | None = None, **kwargs: Any) -> None:
        if soft_wrap is None and all(isinstance(o, str | Text) for o in objects):
            soft_wrap = True  # the terminal may fold a long line; the text itself keeps no break
        super().print(*objects, soft_wrap=soft_wrap, **kwargs)

    @property
    def size(self) -> ConsoleDimensions:
        size = super().size
        if self.is_terminal or self._width is not None or os.environ.get("COLUMNS", "").isdigit():
            return size
        return ConsoleDimensions(PIPE_WIDTH, size.height)

    @size.setter
    def size(self, new_size: tuple[int, int]) -> None:
        # mypy reads a property with a setter as an overload, which has no fset
        Console.size.fset(self, new_size)  # type: ignore[attr-defined]


def make_console(*, stderr: bool = False) -> CliConsole:
    """The console of a CLI module: stdout, or stderr for errors and progress."""
    return CliConsole(stderr=stderr)


def print_rule(console: Console, title: str | Text = "") -> None:
    """A titled rule across a terminal, or :data:`PIPE_RULE_WIDTH` wide on other output."""
    console.print(Rule(title), width=None if console.is_terminal else PIPE_RULE_WIDTH)


def _shares_screen(stream: object, console: Console) -> bool:
    if stream is console.file:
        return True
    isatty = getattr(stream, "isatty", None)
    try:
        return bool(isatty and isatty())
    except ValueError:  # a closed stream
        return False


@contextlib.contextmanager
def logs_above(console: Console) -> Iterator[None]:
    """While the block runs (a :class:`rich.live.Live` on ``console``), the root logger's stream
    handlers that write to the same screen print through ``console``: each record lands above the
    live display instead of after its last line, where the next redraw would tear it. Output that is
    not a terminal is not redrawn, so nothing changes there."""
    if not console.is_terminal:
        yield
        return
    swapped: list[tuple[logging.StreamHandler[Any], object]] = []
    for handler in logging.getLogger().handlers:
        if (
            isinstance(handler, logging.StreamHandler)
            and not isinstance(handler, logging.FileHandler)
            and _shares_screen(handler.stream, console)
        ):
            swapped.append((handler, handler.setStream(FileProxy(console, handler.stream))))
    try:
        yield
    finally:
        for handler, stream in swapped:
            handler.setStream(stream)


@contextlib.contextmanager
def live_display(console: Console, refresh_per_second: float = 4) -> Iterator[Live]:
    """A :class:`rich.live.Live` on ``console`` with log records printed above it (:func:`logs_above`).
    Output that is not a terminal gets only the final render, which rich leaves without a line end:
    it is ended here, so what is printed next starts a line of its own."""
    with Live(console=console, refresh_per_second=refresh_per_second) as live, logs_above(console):
        yield live
    if not console.is_terminal:
        console.line()
