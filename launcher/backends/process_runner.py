"""Runs the trainer as a child, forwards stop signals to it, and records its exit code in a file.

The process backend starts this in its own session so the trainer outlives the gpu-run command
(Ctrl-C detaches), and the exit code is still known to whoever attaches later.
Usage: python -m launcher.backends.process_runner EXIT_FILE -- COMMAND...
"""

import os
import signal
import subprocess
import sys


def main(argv: list[str]) -> int:
    exit_file, separator, *command = argv
    assert separator == "--" and command, __doc__
    child = subprocess.Popen(command)

    def forward(signum, _frame):
        child.send_signal(signal.SIGTERM)

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, forward)
    code = child.wait()
    tmp = f"{exit_file}.tmp"
    with open(tmp, "w") as f:
        f.write(str(code))
    os.replace(tmp, exit_file)
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
