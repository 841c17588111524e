"""`make demo`: the main job on a built-in default, with what exists so far.

1. the paper's analytic memory table, recomputed (must match to the printed digit);
2. the memory plan of the default job: mcunet-in1, last 4 convs, HOSVD eps=0.8,
   batch 32, 128 px.
"""
from __future__ import annotations

import sys

from . import cli

DEFAULT_JOB = ["--model", "mcunet-in1", "--layers", "4", "--batch-size", "32",
               "--input-size", "128"]


def main() -> int:
    print("== 1. The paper's analytic memory columns (computed, paper in parentheses)")
    status = cli.main(["paper-table"])
    for method in (["vanilla"], ["hosvd", "--eps", "0.8"]):
        print(f"\n== 2. Memory plan of the default job, method {' '.join(method)}")
        status |= cli.main(["plan", *DEFAULT_JOB, "--method", *method])
    return status


if __name__ == "__main__":
    sys.exit(main())
