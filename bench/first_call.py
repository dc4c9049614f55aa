"""The first-call figures of the README (issue 12): compile time with an empty Numba cache.

    python bench/first_call.py [--skip-warmup]

Each measurement runs in a fresh interpreter with a new, empty ``NUMBA_CACHE_DIR``:

1. the first float32 training forward + backward on (256, 1024), then a float64
   ``BatchNorm(100)`` train forward, backward and eval forward in the same process;
2. ``python -m fastbn warmup`` (both dtypes, serial and parallel, no ReLU);
3. with the cache the first run filled: three fresh processes, each ``import fastbn``
   and its first forward + backward (the warm-cache start).

Compile time is CPU time on one core: run it on a quiet machine.
"""

import argparse
import datetime
import os
import platform
import subprocess
import sys
import tempfile
import time

_FIRST = """
import time
t0 = time.perf_counter()
import numpy as np, fastbn
t1 = time.perf_counter()
x = np.random.default_rng(0).standard_normal((256, 1024)).astype(np.float32)
y, cache = fastbn.batch_norm(x, np.ones(1024, np.float32), np.zeros(1024, np.float32))
fastbn.batch_norm_backward(np.ones_like(y), cache)
t2 = time.perf_counter()
bn = fastbn.BatchNorm(100, dtype=np.float64)
x64 = np.random.default_rng(1).standard_normal((100, 100))
bn(x64); bn.backward(x64); bn.eval(); bn(x64)
t3 = time.perf_counter()
print(t1 - t0, t2 - t1, t3 - t2)
"""

_WARM = """
import time
t0 = time.perf_counter()
import numpy as np, fastbn
x = np.random.default_rng(0).standard_normal((256, 1024)).astype(np.float32)
y, cache = fastbn.batch_norm(x, np.ones(1024, np.float32), np.zeros(1024, np.float32))
fastbn.batch_norm_backward(np.ones_like(y), cache)
print(time.perf_counter() - t0)
"""


def _run(args, cache_dir):
    env = dict(os.environ, NUMBA_CACHE_DIR=cache_dir, FASTBN_QUIET_COMPILE="1")
    done = subprocess.run(args, env=env, capture_output=True, text=True, check=True)
    return done.stdout


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--skip-warmup", action="store_true", help="skip measurement 2")
    args = parser.parse_args(argv)
    import numba

    import fastbn

    print(
        f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"Python {platform.python_version()}, numba {numba.__version__}, "
        f"fastbn {fastbn.__version__}"
    )
    with tempfile.TemporaryDirectory(prefix="fastbn-first-") as cache:
        imp, f32, f64 = map(float, _run([sys.executable, "-c", _FIRST], cache).split())
        print(
            f"empty cache: import {imp:.2f} s; first float32 (256, 1024) train forward + "
            f"backward {f32:.1f} s; float64 BatchNorm(100) train + backward + eval after "
            f"it {f64:.1f} s"
        )
        warm = [float(_run([sys.executable, "-c", _WARM], cache)) for _ in range(3)]
        print(
            "warm cache, fresh process, import + first forward + backward: "
            + " / ".join(f"{s:.2f}" for s in warm)
            + " s"
        )
    if not args.skip_warmup:
        with tempfile.TemporaryDirectory(prefix="fastbn-warmup-") as cache:
            start = time.perf_counter()
            _run([sys.executable, "-m", "fastbn", "warmup", "--quiet"], cache)
            print(
                f"empty cache: python -m fastbn warmup {time.perf_counter() - start:.1f} s "
                "(both dtypes, serial and parallel)"
            )


if __name__ == "__main__":
    main()
