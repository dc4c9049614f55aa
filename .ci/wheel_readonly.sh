#!/usr/bin/env bash
# Packaging check, run by `tox -e wheel` (inside its env: python, pip and build on PATH).
#  1. python -m build: an sdist, then a wheel built from that sdist; check what each holds.
#  2. The wheel goes into a directory of its own (pip install --target), made read-only for
#     the user running the tests: a read-only bind mount for root (permission bits do not stop
#     root), chmod -R a-w otherwise. Its dependencies and the test extra go into the tox env.
#  3. From a copy of tests/ outside the source tree, with PYTHONPATH pointing at that directory:
#     fastbn must import from there, print nothing on stderr but its notice that a kernel is
#     being compiled (the cache is cold there), and Numba's cache must land in the
#     user cache dir (a fresh XDG_CACHE_HOME), never in the package; then the whole test suite.
#  4. The same import with no writable home either: fastbn/_cache_dir.py falls back to a
#     private directory under TMPDIR, silently.
set -euo pipefail

root="$(cd "$(dirname "$0")/.." && pwd)"
work="$(mktemp -d "${TMPDIR:-/tmp}/fastbn-wheel.XXXXXX")"
cleanup() { chmod -R u+w "$work" 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT
site="$work/site"      # the read-only install
run="$work/run"        # tests/ and the pytest config, nothing else
xdg="$work/xdg-cache"  # the user cache dir Numba should fall back to
rohome="$work/rohome"  # a home (and cache dir) that is not writable either
mkdir -p "$site" "$run" "$xdg" "$rohome" "$work/tmp"

echo "== build sdist and wheel"
python -m build --outdir "$work/dist" "$root" >"$work/build.log" 2>&1 || { cat "$work/build.log"; exit 1; }
sdist=$(ls "$work"/dist/fastbn-*.tar.gz)
wheel=$(ls "$work"/dist/fastbn-*.whl)
python - "$sdist" "$wheel" <<'EOF'
import sys, tarfile, zipfile
sdist, wheel = sys.argv[1:]
s = [n.split("/", 1)[1] for n in tarfile.open(sdist).getnames() if "/" in n]
w = zipfile.ZipFile(wheel).namelist()
need_s = ["pyproject.toml", "README.md", "fastbn/__init__.py", "fastbn/_kernels/ops.py",
          "fastbn/_cache_dir.py", "tests/_cases.py"]
need_w = ["fastbn/__init__.py", "fastbn/_kernels/ops.py", "fastbn/_cache_dir.py"]
missing = [n for n in need_s if n not in s] + [n for n in need_w if n not in w]
junk = [n for n in s + w if n.endswith((".pyc", ".nbi", ".nbc")) or "__pycache__" in n]
junk += [n for n in w if not n.startswith(("fastbn/", "fastbn-"))]
if missing or junk:
    sys.exit(f"packaging: missing {missing}, unexpected {junk}")
print(f"sdist {len(s)} files, wheel {len(w)} files: ok")
EOF

echo "== install the wheel into $site (dependencies and test extra into the tox env)"
python -m pip install -q "${wheel}[test]"
python -m pip uninstall -q -y fastbn
python -m pip install -q --no-deps --target "$site" "$wheel"
cp -r "$root/tests" "$root/pyproject.toml" "$run/"
rm -rf "$run/tests/__pycache__"

# Run "$@" with the directories before "--" read-only.
readonly_run() {
    local dirs=()
    while [ "$1" != "--" ]; do dirs+=("$1"); shift; done
    shift
    if [ "$(id -u)" != 0 ]; then
        chmod -R a-w "${dirs[@]}"
        "$@"
    else
        unshare --mount --propagation private bash -c '
            set -e
            while [ "$1" != "--" ]; do
                mount --bind "$1" "$1" && mount -o remount,bind,ro "$1"; shift
            done
            shift; exec "$@"' bash "${dirs[@]}" -- "$@"
    fi
}

only_notices() {  # fail unless every line of file $1 is fastbn's compile notice
    if grep -qv '^fastbn: compiling ' "$1"; then
        echo "stderr held more than compile notices:" >&2; cat "$1" >&2; exit 1
    fi
    if ! grep -q '^fastbn: compiling ' "$1"; then echo "no compile notice on a cold cache" >&2; exit 1; fi
}

inner() {  # runs with $site and $rohome read-only
    set -euo pipefail
    cd "$run"
    # the suite may use the kernels .ci/run shares (FASTBN_CI_NUMBA_CACHE, see tox.ini);
    # the import checks below always see Numba's defaults
    local suite_cache=()
    if [ -n "${FASTBN_CI_NUMBA_CACHE:-}" ]; then suite_cache=(NUMBA_CACHE_DIR="$NUMBA_CACHE_DIR"); fi
    unset NUMBA_CACHE_DIR FASTBN_QUIET_COMPILE
    for d in "$site/fastbn" "$rohome"; do
        if (: >"$d/.probe") 2>/dev/null; then echo "$d is writable: cannot test read-only" >&2; exit 1; fi
    done
    local smoke='
import numpy as np, fastbn
assert fastbn.__file__.startswith(__import__("sys").argv[1]), fastbn.__file__
x = np.random.default_rng(0).standard_normal((64, 16)).astype(np.float32)
y, c = fastbn.batch_norm(x, np.ones(16, np.float32), np.zeros(16, np.float32))
dx, dg, db = fastbn.batch_norm_backward(np.ones_like(y), c)
assert np.isfinite(dx).all()
print(fastbn.__file__, "cache dir:", fastbn._cache_dir.CACHE_DIR or "(Numba default)")'

    echo "== read-only install, writable user cache dir"
    XDG_CACHE_HOME="$xdg" PYTHONPATH="$site" python -c "$smoke" "$site" 2>"$work/stderr"
    only_notices "$work/stderr"
    echo "nothing on stderr but the compile notice"

    echo "== test suite against the read-only install"
    env "${suite_cache[@]}" XDG_CACHE_HOME="$xdg" PYTHONPATH="$site" pytest -p no:cacheprovider -q

    local in_pkg in_xdg
    in_pkg=$(find "$site" -name '*.nbi' | wc -l)
    in_xdg=$(find "$xdg/numba" -name '*.nbi' 2>/dev/null | wc -l)
    echo "numba cache index files: $in_xdg in $xdg/numba, $in_pkg in the package"
    if [ "$in_pkg" != 0 ] || [ "$in_xdg" = 0 ]; then echo "numba cache in the wrong place" >&2; exit 1; fi

    echo "== read-only install, no writable home or cache dir"
    HOME="$rohome" XDG_CACHE_HOME="$rohome/.cache" TMPDIR="$work/tmp" PYTHONPATH="$site" \
        python -c "$smoke" "$site" 2>"$work/stderr"
    only_notices "$work/stderr"
    if [ -z "$(find "$work/tmp" -name '*.nbi')" ]; then echo "no numba cache under TMPDIR" >&2; exit 1; fi
    echo "nothing on stderr but the compile notice; cache under $work/tmp"
}
export -f inner only_notices
export site run xdg rohome work

readonly_run "$site" "$rohome" -- bash -c inner
echo "== wheel: ok"
