"""Pivot bench_rowwise.py's JSONL rows into one line per (shape, op, dtype): each implementation's median ms and its
share of the copy bandwidth, side by side, plus which CUDA variant was fastest and, where the default "cuda" rows
ran the tuned variant, what it chose (with its candidates' ms from that measurement). For reading a GPU run
(gpu_suite.sh prints it) and for RESULTS.md.

  python benchmarks/rowwise_table.py OUT/rowwise.jsonl [--impls pytorch,torch.compile,cuda,cuda-wide,...]

Later rows for the same (shape, op, dtype, impl) replace earlier ones (a file appended to by several runs).
"""
from __future__ import annotations

import argparse
import json
import sys


def load(path: str) -> tuple[dict, list[str], dict]:
    cells: dict = {}
    impls: list[str] = []
    meta: dict = {}
    with open(path) as f:
        for n, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                r = json.loads(line)
            except json.JSONDecodeError as e:
                print(f"[rowwise_table] {path}:{n}: not JSON ({e}); skipped", file=sys.stderr)
                continue
            missing = {"shape", "op", "dtype", "impl", "timing"} - r.keys()
            if missing:
                print(f"[rowwise_table] {path}:{n}: missing {sorted(missing)}; skipped", file=sys.stderr)
                continue
            key = (r["shape"].split()[0], r["op"], r["dtype"])
            extra = r.get("extra") or {}
            cells.setdefault(key, {})[r["impl"]] = (r["timing"]["median_ms"], extra.get("of_copy_bw"))
            if r["impl"] == "cuda" and str(extra.get("note", "")).startswith("tuned"):
                cells[key]["_tuned"] = extra["note"]
            if r["impl"] not in impls:
                impls.append(r["impl"])
            meta = {k: r.get(k) for k in ("device", "date", "commit", "torch")}
    return cells, impls, meta


def table(cells: dict, impls: list[str]) -> list[str]:
    tuned = any("_tuned" in row for row in cells.values())
    head = ["shape", "op", "dtype"] + impls + ["fastest CUDA"] + (["tuned choice (candidate: ms)"] if tuned else [])
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for key in sorted(cells, key=lambda k: (k[0], k[2], k[1])):
        row = cells[key]
        vals = []
        for impl in impls:
            if impl not in row:
                vals.append("")
                continue
            ms, pct = row[impl]
            vals.append(f"{ms:.3f}" + (f" ({pct})" if pct else ""))
        cuda = {i: v[0] for i, v in row.items() if i.startswith("cuda")}
        best = min(cuda, key=cuda.get) if cuda else ""
        out.append("| " + " | ".join(list(key) + vals + [best] + ([row.get("_tuned", "")] if tuned else [])) + " |")
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("jsonl")
    p.add_argument("--impls", default=None, help="columns, in order (default: every impl in file order)")
    args = p.parse_args(argv)
    cells, impls, meta = load(args.jsonl)
    if not cells:
        print(f"[rowwise_table] {args.jsonl}: no benchmark rows", file=sys.stderr)
        return 1
    if args.impls:
        impls = [i for i in args.impls.split(",") if i]
    print(" | ".join(f"{k}: {v}" for k, v in meta.items() if v))
    print("\n".join(table(cells, impls)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
