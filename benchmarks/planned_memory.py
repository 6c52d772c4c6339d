"""Print the memory that ExecuTorch plans for each method of a program: the arena its runtime allocates at load.

    python benchmarks/planned_memory.py exports/.../executorch/model.pte

The planner sizes every activation, output and KV cache buffer of a method for its largest input, and a runtime
allocates these buffers when it loads the method, before the first call. Weights are not part of it: XNNPACK keeps
its packed copies in its own allocations.
"""

from __future__ import annotations

import argparse
import mmap
from pathlib import Path


def planned_bytes(pte: Path) -> dict[str, list[int]]:
    """Return method name -> sizes of its memory-planned buffers in bytes (index 0 is reserved and always 0)."""
    from executorch.exir._serialize._program import deserialize_pte_binary

    with pte.open("rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
        program = deserialize_pte_binary(data)
    program = getattr(program, "program", program)
    return {plan.name: list(plan.non_const_buffer_sizes) for plan in program.execution_plan}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("pte", type=Path)
    args = parser.parse_args()
    for name, sizes in planned_bytes(args.pte).items():
        if sum(sizes):
            print(f"{name}: {sum(sizes):,} bytes ({sum(sizes) / 2**20:.1f} MiB) in buffers {sizes[1:]}")


if __name__ == "__main__":
    main()
