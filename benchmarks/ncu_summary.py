"""One table from Nsight Compute's text reports (``benchmarks/ncu_gpu.sh``).

    python3 benchmarks/ncu_summary.py REPORT.txt [...] [--json FILE] [--between A B]
        [--by-name]

Each report is ncu's default text output: per kernel a header line ``NAME (grid)x(block),
Context .., Stream .., Device .., CC ..`` followed by sections of ``Metric  Unit  Value``
rows. Printed per report, one markdown row per kernel: its duration, DRAM and SM throughput
(% of peak), the memory bandwidth it moved, achieved occupancy, registers a thread, warp
cycles per issued instruction, and the kernel's share of the summed duration, then the
summed duration itself. The numbers are ncu's own; nothing is derived but the share and the
sum. ``--between A B`` keeps the kernels after the first whose name contains ``A`` and
before the next whose name contains ``B`` (``benchmarks/decode_step_once.py``'s markers).
``--by-name`` adds a table of the kernels grouped by name (a decode step runs each layer's
kernels once per layer): count, summed and mean duration, share.
"""

from __future__ import annotations

import argparse
import json
import re

_HEADER = re.compile(r"^\s{2}(\S.*?) \((\d+), (\d+), (\d+)\)x\((\d+), (\d+), (\d+)\), Context")
_ROW = re.compile(r"^\s{4}(\S.*?)\s{2,}(\S+)\s+(\S+)\s*$")  # name, unit, value
_ROW_NO_UNIT = re.compile(r"^\s{4}(\S.*?)\s{2,}(\S+)\s*$")  # name, value

#: the columns printed, as (heading, ncu metric name)
COLUMNS = (
    ("us", "Duration"),
    ("DRAM %", "DRAM Throughput"),
    ("SM %", "Compute (SM) Throughput"),
    ("GB/s", "Memory Throughput"),
    ("occ %", "Achieved Occupancy"),
    ("regs", "Registers Per Thread"),
    ("cyc/issue", "Warp Cycles Per Issued Instruction"),
)


def _number(text: str) -> float | None:
    try:
        return float(text.replace(",", ""))
    except ValueError:
        return None


def parse(text: str) -> list[dict]:
    """``[{"name", "grid", "block", "metrics": {name: (unit, value)}}]`` in report order.

    A metric that appears in two sections (``Memory Throughput`` is a % in Speed Of Light
    and a rate in Memory Workload Analysis) keeps each unit: ``metrics[name]`` holds the
    first, ``metrics[name + " [unit]"]`` every one.
    """
    kernels: list[dict] = []
    for line in text.splitlines():
        head = _HEADER.match(line)
        if head:
            grid = tuple(int(x) for x in head.group(2, 3, 4))
            block = tuple(int(x) for x in head.group(5, 6, 7))
            kernels.append({"name": head.group(1), "grid": grid, "block": block, "metrics": {}})
            continue
        if not kernels or line.strip().startswith(("---", "Section:", "Metric Name")):
            continue
        row = _ROW.match(line)
        if row:
            name, unit, value = row.groups()
        else:
            row = _ROW_NO_UNIT.match(line)
            if not row:
                continue
            (name, value), unit = row.groups(), ""
        if _number(value) is None:
            continue
        metrics = kernels[-1]["metrics"]
        metrics.setdefault(name, (unit, _number(value)))
        metrics[f"{name} [{unit}]"] = (unit, _number(value))
    return kernels


def _value(kernel: dict, metric: str) -> float | None:
    """The metric in its reported unit, durations in microseconds and rates in GB/s."""
    if metric == "Memory Throughput":  # the rate, not Speed Of Light's percentage
        for unit, scale in (("Tbyte/s", 1e3), ("Gbyte/s", 1.0), ("Mbyte/s", 1e-3)):
            hit = kernel["metrics"].get(f"{metric} [{unit}]")
            if hit:
                return hit[1] * scale
        return None
    hit = kernel["metrics"].get(metric)
    if hit is None:
        return None
    unit, value = hit
    if metric == "Duration":
        return value * {"ns": 1e-3, "us": 1.0, "usecond": 1.0, "ms": 1e3, "msecond": 1e3}.get(
            unit, 1.0)
    return value


def table(kernels: list[dict]) -> str:
    """Markdown rows, one per kernel, with each one's share of the summed duration."""
    total = sum(_value(k, "Duration") or 0.0 for k in kernels)
    heads = ["kernel", "grid", *[h for h, _ in COLUMNS], "share"]
    lines = ["| " + " | ".join(heads) + " |", "|" + "---|" * len(heads)]
    for k in kernels:
        cells = [k["name"][:60], "x".join(str(g) for g in k["grid"])]
        for _, metric in COLUMNS:
            v = _value(k, metric)
            cells.append("" if v is None else f"{v:,.1f}")
        duration = _value(k, "Duration") or 0.0
        cells.append(f"{100 * duration / total:.0f}%" if total else "")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def by_name(kernels: list[dict]) -> str:
    """Markdown rows, one per distinct kernel name (largest summed duration first): how
    many ran, their summed and mean duration (us) and the sum's share of the total."""
    groups: dict[str, list[float]] = {}
    for k in kernels:
        groups.setdefault(k["name"], []).append(_value(k, "Duration") or 0.0)
    total = sum(sum(v) for v in groups.values())
    lines = ["| kernel | count | us | mean us | share |", "|---|---:|---:|---:|---:|"]
    for name, times in sorted(groups.items(), key=lambda kv: -sum(kv[1])):
        share = f"{100 * sum(times) / total:.0f}%" if total else ""
        lines.append(f"| {name[:60]} | {len(times)} | {sum(times):,.1f} | "
                     f"{sum(times) / len(times):,.1f} | {share} |")
    return "\n".join(lines)


def between(kernels: list[dict], first: str, last: str) -> list[dict]:
    """The kernels strictly between the first named like ``first`` and the next named like
    ``last`` after it (all of them after ``first`` when no ``last`` follows; none when no
    kernel is named like ``first``)."""
    start = next((i for i, k in enumerate(kernels) if first in k["name"]), None)
    if start is None:
        return []
    end = next((i for i in range(start + 1, len(kernels)) if last in kernels[i]["name"]),
               len(kernels))
    return kernels[start + 1:end]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("reports", nargs="+")
    parser.add_argument("--json", default=None, help="also write every parsed metric here")
    parser.add_argument("--by-name", action="store_true",
                        help="also the kernels grouped by name")
    parser.add_argument("--between", nargs=2, metavar=("A", "B"), default=None,
                        help="only the kernels between the first named like A and the next "
                             "named like B")
    args = parser.parse_args()
    parsed = {}
    for path in args.reports:
        with open(path, errors="replace") as f:
            kernels = parse(f.read())
        if args.between:
            kernels = between(kernels, *args.between)
        parsed[path] = kernels
        print(f"\n{path}: {len(kernels)} kernels")
        if kernels:
            print(table(kernels))
            total = sum(_value(k, "Duration") or 0.0 for k in kernels)
            print(f"\nsummed duration: {total:,.1f} us over {len(kernels)} kernels")
            if args.by_name:
                print("\n" + by_name(kernels))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(parsed, f, indent=1)


if __name__ == "__main__":
    main()
