"""Print the memory that ExecuTorch plans for each method of a program: the arena its runtime allocates at load.

    python benchmarks/planned_memory.py exports/.../executorch/model.pte

The planner sizes every activation, output and KV cache buffer of a method for its largest input, and a runtime
allocates these buffers when it loads the method, before the first call. Weights are not part of it: XNNPACK keeps
its packed copies in its own allocations.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from g3n_export.runtime.executorch import planned_buffer_sizes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("pte", type=Path)
    args = parser.parse_args()
    for name, sizes in planned_buffer_sizes(args.pte).items():
        if sum(sizes):
            print(f"{name}: {sum(sizes):,} bytes ({sum(sizes) / 2**20:.1f} MiB) in buffers {sizes[1:]}")


if __name__ == "__main__":
    main()
