#!/usr/bin/env bash
# Build benchmarks/et_runner against the ExecuTorch pip package of the active Python environment.
# Prints the path of the binary; `g3n-export bench DIR --et-runner PATH` runs it.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
prefix="$(python -c 'import executorch, os; print(os.path.dirname(executorch.__path__[0]))')/executorch"
cmake -S "$here/et_runner" -B "$here/et_runner/build" -DCMAKE_BUILD_TYPE=Release -DCMAKE_PREFIX_PATH="$prefix" >&2
cmake --build "$here/et_runner/build" -j2 >&2
echo "$here/et_runner/build/et_runner"
