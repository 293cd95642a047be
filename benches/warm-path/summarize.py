#!/usr/bin/env python3
"""Summarizes several outputs of `cargo bench --bench warm_path` (files given as arguments)
into the table of BENCHMARKS.md: per pattern and variant, the ratio of bests to the static
header in each run, as "median over runs [min-max]"."""
import re
import sys
from collections import defaultdict

ratios = defaultdict(list)  # (pattern, variant) -> [ratio per run]
static = defaultdict(list)  # pattern -> [best ns per run]
for path in sys.argv[1:]:
    pattern = None
    for line in open(path):
        m = re.match(r"^(\S+) \(\d+ rounds x \d+ calls\)", line)
        if m:
            pattern = m.group(1)
            continue
        m = re.match(r"^\| (\w+) \| ([\d.]+) \| ([\d.]+)x \|", line)
        if m and pattern:
            variant, best, ratio = m.group(1), float(m.group(2)), float(m.group(3))
            if variant == "static_header":
                static[pattern].append(best)
            else:
                ratios[(pattern, variant)].append(ratio)

def fmt(values):
    values = sorted(values)
    mid = values[len(values) // 2]
    if len(values) == 1:
        return f"{mid:.2f}x"
    return f"{mid:.2f}x [{values[0]:.2f}-{values[-1]:.2f}]"

variants = ["mutex_cache", "rwlock_headers", "ours", "ours_with_retry"]
print("| pattern | static header (best ns) | " + " | ".join(variants) + " |")
print("|---|---|" + "---|" * len(variants))
for pattern in static:
    ns = sorted(static[pattern])
    cells = [fmt(ratios[(pattern, v)]) if ratios[(pattern, v)] else "" for v in variants]
    print(f"| {pattern} | {ns[len(ns) // 2]:.0f} | " + " | ".join(cells) + " |")
