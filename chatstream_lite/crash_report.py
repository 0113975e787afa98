"""After a fatal signal (a faulting llama.cpp kernel): the Python stack and one line of advice.

    crash_report.install("this CPU: ...; try --extra-buffers off")   # once, in the CLI

A kernel that executes an instruction the CPU refuses, or loads a bad tile configuration,
kills the process with SIGILL or SIGSEGV: no exception, no log line, no callback. Python's
`faulthandler` prints the signal and every thread's stack (the engine thread's shows
`llama_decode`), but nothing can run in the dying process after it. So its dump goes through
a pipe to a small shell process started now, which copies it to stderr and, if anything
came, adds `advice` with the signal's name. When the server exits normally, the pipe closes
with nothing in it and the shell exits without a word.
"""

from __future__ import annotations

import faulthandler
import os
import shutil
import subprocess
from typing import IO

__all__ = ["install"]

PREFIX = "chatstream_lite"

# Copies the dump line by line (the last line may lack its newline), remembers the signal from
# faulthandler's first line ("Fatal Python error: Segmentation fault"), then says what to do.
_REPORTER = r"""
sig=""
while IFS= read -r line || [ -n "$line" ]; do
    printf '%s\n' "$line" >&2
    case $line in "Fatal Python error: "*) sig=${line#Fatal Python error: } ;; esac
done
[ -n "$sig" ] && printf '%s: the process died of %s. %s\n' "$1" "$sig" "$2" >&2
exit 0
"""

_pipe: IO[str] | None = None   # faulthandler's file: kept open for the process's lifetime
_reporters: list[subprocess.Popen[bytes]] = []


def install(advice: str) -> bool:
    """Route faulthandler's dump through the reporter; False (plain faulthandler on stderr)
    where no `sh` is found. Call it once, before the model loads."""
    global _pipe
    shell = shutil.which("sh")
    if shell is None:
        faulthandler.enable(all_threads=True)
        return False
    read_end, write_end = os.pipe()
    try:
        # Its own session: a Ctrl-C in the terminal stops the server, not its reporter.
        _reporters.append(subprocess.Popen(
            [shell, "-c", _REPORTER, "reporter", PREFIX, advice], stdin=read_end,
            stdout=subprocess.DEVNULL, start_new_session=True, close_fds=True))
    finally:
        os.close(read_end)
    _pipe = os.fdopen(write_end, "w")
    faulthandler.enable(file=_pipe, all_threads=True)
    return True
