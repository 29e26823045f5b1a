"""Text that came from a host, made safe to show, and a job's output split as a terminal shows it.

The host is untrusted: a line it prints may hold escape sequences that move the laptop's cursor,
clear its screen, set its title, write its clipboard (OSC 52) or plant a hyperlink (OSC 8).
`safe` drops every escape sequence and control character but the tab, so no byte from a host
reaches the terminal raw. `split_output` reads a job's output as it arrives: a line ends at a
newline, and a carriage return alone (tqdm's progress bar redrawing itself) ends an update that is
yielded with its trailing "\\r", so a view can show it as one line that changes.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator

# CSI (ESC [ ... final), OSC (ESC ] ... BEL or ST), DCS/SOS/PM/APC (ESC P/X/^/_ ... ST), any other
# ESC + one character, and the 8-bit forms of CSI and of the string sequences.
_ESCAPE = re.compile(
    r"\x1b\[[0-?]*[ -/]*[@-~]?"
    r"|\x1b\][^\x07\x1b\x9c]*(?:\x07|\x1b\\|\x9c)?"
    r"|\x1b[PX^_][^\x1b\x9c]*(?:\x1b\\|\x9c)?"
    r"|\x1b[\s\S]?"
    r"|\x9b[0-?]*[ -/]*[@-~]?"
    r"|[\x90\x98\x9d\x9e\x9f][^\x07\x9c]*[\x07\x9c]?"
)
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f-\x9f]")
_BREAK = re.compile(rb"\r\n|\n|\r")


def safe(text: str) -> str:
    """text without escape sequences or control characters (tabs kept), for any terminal view."""
    return _CONTROL.sub("", _ESCAPE.sub("", text))


def split_output(read: Callable[[int], bytes], chunk: int = 1 << 16) -> Iterator[str]:
    """A byte stream as lines ("text") and carriage-return updates ("text\\r"), decoded leniently.
    `read(n)` returns what is there (b"" at the end). A "\\r" at the end of a chunk waits for the
    next one, so "\\r\\n" split across two reads is still one line end: the same bytes always split
    the same way, which lets a reconnecting follower skip what it has shown."""
    pending = b""
    while data := read(chunk):
        pending += data
        start = 0
        for end in _BREAK.finditer(pending):
            if end.group() == b"\r" and end.end() == len(pending):
                break  # is it "\r\n"? the next chunk says
            text = pending[start : end.start()].decode("utf-8", "replace")
            yield text + "\r" if end.group() == b"\r" else text
            start = end.end()
        pending = pending[start:]
    if pending.endswith(b"\r"):
        pending = pending[:-1]
    if pending:
        yield pending.decode("utf-8", "replace")


def final_lines(lines: list[str]) -> list[str]:
    """A log as it reads once every progress bar has finished redrawing: the updates dropped."""
    return [line for line in lines if not line.endswith("\r")]


def split_text(text: str) -> list[str]:
    """A saved log's text split as split_output splits a stream."""
    data = text.encode("utf-8", "surrogateescape")
    chunks = [data]
    return list(split_output(lambda _n: chunks.pop() if chunks else b""))
