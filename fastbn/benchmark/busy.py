"""Bounded background CPU load for ``--busy``: one spinning process per core.

Each spinner is a fresh interpreter (not a fork of this one, which may already run an
OpenMP pool) that spins until its own deadline and then exits, so the load ends even if
the benchmark dies. ``BusyLoad`` starts them, waits until every one spins, and on exit
terminates those still running.
"""

import select
import subprocess
import sys
import time

_SPIN = (
    "import sys, time\n"
    "end = time.monotonic() + float(sys.argv[1])\n"
    "sys.stdout.write('1'); sys.stdout.flush()\n"
    "while time.monotonic() < end:\n"
    "    pass\n"
)


class BusyLoad:
    """Context manager: ``procs`` spinning processes, each stopping by itself after
    ``seconds``. ``alive()`` says whether all still spin (a timing done while one had
    already stopped did not run under the full load)."""

    def __init__(self, procs, seconds):
        if procs < 1:
            raise ValueError(f"procs must be >= 1, got {procs}")
        if not seconds > 0:
            raise ValueError(f"seconds must be > 0, got {seconds}")
        self.procs, self.seconds = int(procs), float(seconds)
        self._children = []

    def __enter__(self):
        cmd = [sys.executable, "-I", "-S", "-c", _SPIN, repr(self.seconds)]
        try:
            for _ in range(self.procs):
                self._children.append(
                    subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE)
                )
            for child in self._children:  # started: each writes one byte, then spins
                ready, _, _ = select.select([child.stdout], [], [], 30.0)
                if not ready or child.stdout.read(1) != b"1":
                    raise RuntimeError("a background spinner did not start")
        except BaseException:
            self.stop()
            raise
        self.started = time.monotonic()
        return self

    def alive(self):
        return bool(self._children) and all(c.poll() is None for c in self._children)

    def pids(self):
        return [c.pid for c in self._children]

    def stop(self):
        for child in self._children:
            if child.poll() is None:
                child.terminate()
        for child in self._children:
            try:
                child.wait(timeout=5)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()
            if child.stdout is not None:
                child.stdout.close()
        self._children = []

    def __exit__(self, *exc):
        self.stop()
        return False
