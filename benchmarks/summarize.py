"""Turns a pytest-benchmark JSON file into the ratio table of benchmarks/RESULTS.md.

For each group: the median time of every entry, its speed-up of pysparse over it (baseline / pysparse,
> 1 means pysparse is faster), achieved GB/s where the bytes moved are known, and peak extra memory.

``summarize.py --merge OUT PART...`` joins the JSON files of several pytest-benchmark runs into OUT first
(benchmarks/gpu_check.sh runs its benchmarks in parts); parts that are missing, empty or not JSON (a part cut
short, or one that selected nothing) are left out.
"""
import json
import os
import sys
from collections import defaultdict


def merge(paths: list[str]) -> dict | None:
    """One pytest-benchmark result from several: the first readable file's metadata, every file's benchmarks
    in order; None when no file could be read."""
    merged = None
    for path in paths:
        try:
            with open(path) as f:
                data = json.load(f)
        except (OSError, ValueError):
            continue
        if not isinstance(data, dict) or not isinstance(data.get("benchmarks"), list):
            continue
        if merged is None:
            merged = data
        else:
            merged["benchmarks"] += data["benchmarks"]
    return merged


def main(path: str) -> None:
    data = json.load(open(path))
    groups = defaultdict(dict)
    for b in data["benchmarks"]:
        impl = b["params"].get("impl", b["name"])
        groups[b["group"]][impl] = b
    machine = data.get("machine_info", {})
    print(f"machine: {machine.get('cpu', {}).get('brand_raw', '?')}, {machine.get('cpu', {}).get('count', '?')} "
          f"cpus; {data.get('datetime', '')}\n")
    print("| group | impl | median ms | pysparse speed-up | GB/s | peak extra MB |")
    print("|---|---|---:|---:|---:|---:|")
    for group in sorted(groups):
        entries = groups[group]
        ours = entries.get("pysparse")
        for impl, b in sorted(entries.items(), key=lambda kv: kv[0] != "pysparse"):
            median = b["stats"]["median"]
            ratio = "" if ours is None or impl == "pysparse" else f"{median / ours['stats']['median']:.2f}x"
            info = b.get("extra_info", {})
            gbs = f"{info['bytes'] / median / 1e9:.1f}" if "bytes" in info else ""
            peak = f"{info['peak_extra_mb']}" if "peak_extra_mb" in info else ""
            print(f"| {group} | {impl} | {median * 1e3:.2f} | {ratio} | {gbs} | {peak} |")


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--merge":
        result = merge(sys.argv[3:])
        if result is None:
            sys.exit(f"summarize.py --merge: none of {len(sys.argv) - 3} files holds benchmark results")
        tmp = sys.argv[2] + ".tmp"
        with open(tmp, "w") as f:
            json.dump(result, f, indent=1)
        os.replace(tmp, sys.argv[2])
    else:
        main(sys.argv[1] if len(sys.argv) > 1 else "benchmarks/out/bench.json")
