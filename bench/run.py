"""`make bench`: every benchmark, then one summary table (bench/results/README.md).

    python -m bench.run                 # all
    python -m bench.run generation      # one or more of: generation training serving fidelity
"""

from __future__ import annotations

import sys
import time

from bench import fidelity, generation, serving, training
from bench.common import RESULTS

SUITES = {"generation": generation.main, "training": training.main, "serving": serving.main,
          "fidelity": fidelity.main}


def main(names: list[str]) -> None:
    t0 = time.monotonic()
    for name in names or list(SUITES):
        print(f"== {name}", flush=True)
        SUITES[name]()
    parts = [(RESULTS / f"{n}.md").read_text() for n in SUITES if (RESULTS / f"{n}.md").exists()]
    (RESULTS / "README.md").write_text("# Benchmark results\n\nWritten by `make bench`; each file below has its "
                                       "JSON beside it; history.md has the before/after of each figure.\n\n"
                                       + "\n".join(parts))
    print(f"bench done in {time.monotonic() - t0:.0f}s; table: {RESULTS / 'README.md'}")


if __name__ == "__main__":
    main(sys.argv[1:])
