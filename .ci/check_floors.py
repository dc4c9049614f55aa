"""Check that this environment runs exactly the floors the installed fastbn declares.

Used by `tox -e oldest`: every ``name>=X`` in fastbn's dependencies must be installed at
version X, and the interpreter must be the ``Requires-Python: >=X.Y`` floor. So the floors
in pyproject.toml and the pins in tox.ini cannot drift apart: change one, and oldest fails
until the other follows.
"""

import sys
from importlib import metadata

from packaging.requirements import Requirement
from packaging.version import Version


def floor(specifier_set):
    lows = [Version(s.version) for s in specifier_set if s.operator == ">="]
    return max(lows) if lows else None


def main():
    meta = metadata.metadata("fastbn")
    problems, report = [], []

    py_floor = floor(Requirement("python" + meta["Requires-Python"]).specifier)
    running = Version(f"{sys.version_info.major}.{sys.version_info.minor}")
    report.append(f"python {running} (floor {py_floor})")
    if py_floor is None or running.release[:2] != py_floor.release[:2]:
        problems.append(f"Python is {running}, the floor is {py_floor}")

    for text in metadata.requires("fastbn") or []:
        req = Requirement(text)
        if req.marker is not None:  # extras (test, compare, ...) and platform-specific ones
            continue
        low = floor(req.specifier)
        if low is None:
            problems.append(f"{req.name} has no >= floor: {text!r}")
            continue
        try:
            have = Version(metadata.version(req.name))
        except metadata.PackageNotFoundError:
            problems.append(f"{req.name} is not installed")
            continue
        report.append(f"{req.name} {have} (floor {low})")
        if have != low:
            problems.append(f"{req.name} {have} is installed, the floor is {low}")

    print("floors:", ", ".join(report))
    if problems:
        print("check_floors: " + "; ".join(problems), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
