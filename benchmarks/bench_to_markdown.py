"""Print the Markdown tables of a `g3n-export bench --json` report (speed, memory, decode roofline).

    python benchmarks/bench_to_markdown.py bench-android.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def mib(value: int | None) -> str:
    return "-" if value is None else f"{value / 2**20:.1f}"


def main() -> None:
    report = json.loads(Path(sys.argv[1]).read_text())
    results = report["results"]
    settings = report["settings"]
    print(f"Workload: prompt {settings['prompt_len']} random ids, {settings['gen_len']} decode steps, threads "
          f"{settings['threads'] or 'default'}, seed {settings['seed']}; run {report['date']}.\n")

    print("| artifact | load s | first call s | prefill tok/s | decode tok/s | load average |")
    print("|---|---|---|---|---|---|")
    for r in results:
        load = " → ".join(f"{value:.2f}" for value in r["load_average_1min"])
        print(f"| {r['artifact']} | {r['load_s']:.2f} | {r['first_call_s']:.3f} | {r['prefill_tokens_per_s']:.0f} | "
              f"{r['decode_tokens_per_s']:.1f} | {load} |")

    print("\n| artifact | baseline MiB | peak MiB | steady MiB | steady anon MiB | steady file MiB | mapped files, "
          "resident MiB |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        rss = r["rss"]
        mapped = ", ".join(f"{name} {mib(size)}" for name, size in r["file_mapping_rss"].items())
        print(f"| {r['artifact']} | {mib(rss['baseline'])} | {mib(rss['peak'])} | {mib(rss['steady'])} | "
              f"{mib(rss['steady_anon'])} | {mib(rss['steady_file'])} | {mapped} |")

    if "read_bandwidth_bytes_per_s" in report:
        bandwidth = report["read_bandwidth_bytes_per_s"]
        print(f"\nRead bandwidth: {bandwidth / 1e9:.1f} GB/s.\n")
        print("| artifact | model files MB | token embedding table MB | PLE table MB | read per decode step MB | "
              "bandwidth bound tok/s | measured decode tok/s | measured / bound |")
        print("|---|---|---|---|---|---|---|---|")
        for r in results:
            roof = r["roofline"]
            bound = roof["decode_tokens_per_s_bound"]
            print(f"| {r['artifact']} | {roof['file_bytes'] / 1e6:.2f} | {roof['token_embedding_table'] / 1e6:.2f} | "
                  f"{roof['ple_table'] / 1e6:.2f} | {roof['per_step'] / 1e6:.2f} | {bound:.0f} | "
                  f"{r['decode_tokens_per_s']:.1f} | {r['decode_tokens_per_s'] / bound:.1%} |")


if __name__ == "__main__":
    main()
