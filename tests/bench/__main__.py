"""make bench: run every benchmark (or those named) and print their figures.

    python -m tests.bench [NAME ...]
"""

from __future__ import annotations

import importlib
import sys
import time

BENCHMARKS = ["ping", "gcpause", "connections", "volumes", "volumelist", "copy", "backup", "ovf",
              "httpparse", "transfer", "leases", "blockvolumes", "blockscale", "nfsactivate",
              "thin", "load"]


def main(names: list[str]) -> int:
    for name in names or BENCHMARKS:
        if name not in BENCHMARKS:
            print(f"unknown benchmark {name}; known: {', '.join(BENCHMARKS)}")
            return 2
        mod = importlib.import_module(f"tests.bench.{name}")
        start = time.monotonic()
        print(f"== {name}", flush=True)
        result = mod.run()
        print(mod.report(result))
        print(f"({time.monotonic() - start:.0f} s; bench-results/{name}.json)\n", flush=True)
    from tests.bench import plot
    for path in plot.write_all():
        print(f"chart: {path.relative_to(plot.RESULTS.parent)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
