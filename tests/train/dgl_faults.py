"""Test-only entry point of the multi-process DGL runner, with fault injection (none of this ships in the library).

``python tests/train/dgl_faults.py ARGS`` is ``anytrain dgl-parallel ARGS`` whose ranks are started from this same
file, each with its module step wrapped according to the environment:

- ``ANYTRAIN_TEST_DGL_FAULT=rank:step``: that rank dies (exit code 17) at that step; ``rank:step:hang``: it stops
  answering instead (sleeps for ever);
- ``ANYTRAIN_TEST_DGL_SLOW=rank:seconds[,rank:seconds]``: those ranks sleep that long before every step.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any

from anytrain.train import parallel

FAULT_ENV = "ANYTRAIN_TEST_DGL_FAULT"
SLOW_ENV = "ANYTRAIN_TEST_DGL_SLOW"


def inject(rank: int, step: int) -> None:
    for item in filter(None, os.environ.get(SLOW_ENV, "").split(",")):
        r, secs = item.split(":")
        if int(r) == rank:
            time.sleep(float(secs))
    spec = os.environ.get(FAULT_ENV, "")
    if spec:
        r, s, *mode = spec.split(":")
        if int(r) == rank and int(s) == step:
            print(f"rank {rank}: injected fault at step {step}", file=sys.stderr, flush=True)
            if mode == ["hang"]:
                while True:
                    time.sleep(1.0)
            os._exit(17)


def main() -> int:
    step = parallel.RankModule.step

    def faulty_step(self: parallel.RankModule, *args: Any, **kwargs: Any) -> None:
        inject(self.rank, self.steps)
        step(self, *args, **kwargs)

    parallel.RankModule.step = faulty_step  # type: ignore[method-assign]
    parallel.WORKER = [os.path.abspath(__file__)]  # the launcher starts its ranks from this file too
    return parallel.main()


if __name__ == "__main__":
    sys.exit(main())
