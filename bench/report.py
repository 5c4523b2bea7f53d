"""Turn a pytest-benchmark JSON into `bench/results/<device>.json` and a markdown table.

    pytest bench/ --benchmark-json=run.json
    python bench/report.py run.json              # writes bench/results/<device>.json, prints the table
    python bench/report.py run.json --no-write   # only prints
    python bench/report.py out/bench.jsonl       # the rows bench/run_gpu.sh streams, one per line

Rows come from each benchmark's `extra_info` (filled by `bench/conftest.py::measure`). Rows already
in the results file for other (op, provider, shape, dtype, mode) are kept, so bench files can be
run separately. One results file holds one device kind: runs from different devices never mix.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

RESULTS_DIR = Path(__file__).resolve().parent / "results"
KEY = ("op", "provider", "shape", "dtype", "mode")
MODE_ORDER = {"fwd": 0, "bwd": 1, "fwd_bwd": 2}
# optional extra_info keys copied into the results when a bench records them: a FLOP count and
# TFLOP/s under it, and for tree attention the same under the unrolled paths' FLOP count
OPTIONAL = ("flops", "tflops", "unrolled_flops", "unrolled_tflops", "peak_extra_mib")


def device_slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def shape_text(shape) -> str:
    # bench files record the shape as a list of dims ([8192, 151936]) or as text ("768x6144")
    return shape if isinstance(shape, str) else "×".join(str(d) for d in shape)


def is_peer(provider: str) -> bool:
    return not provider.startswith("appo")


def rows_from_run(run: dict) -> list[dict]:
    commit = (run.get("commit_info") or {}).get("id")
    rows = []
    for bench in run.get("benchmarks", []):
        info = bench.get("extra_info", {})
        if "op" not in info or "median_ms" not in info:
            continue  # not one of ours, or run with --benchmark-disable
        row = {k: info[k] for k in KEY}
        row.update({
            "device": info["device"],
            "median_ms": info["median_ms"],
            "gbps": info["gbps"],
            "pct_copy_bw": info["pct_copy_bw"],
            "copy_gbps": info["copy_gbps"],
            "bytes": info["bytes"],
            "wall_median_ms": (bench["stats"]["median"] * 1e3
                               if bench["stats"].get("median") is not None else None),
            "rounds": info.get("rounds"),
            "timer": info.get("timer"),
            "computes": info.get("computes"),
            "date": bench.get("datetime", run.get("datetime")),
            "commit": bench.get("commit", commit),
        })
        row.update({k: info[k] for k in OPTIONAL if info.get(k) is not None})
        if info.get("note"):
            row["note"] = info["note"]
        rows.append(row)
    return rows


def load_run(path: Path) -> dict:
    """A pytest-benchmark JSON, or the JSON lines `conftest.py` streams (`$APPO_BENCH_STREAM`)."""
    if path.suffix == ".jsonl":
        lines = [line for line in path.read_text().splitlines() if line.strip()]
        return {"benchmarks": [json.loads(line) for line in lines]}
    return json.loads(path.read_text())


def add_peer_ratios(rows: list[dict]) -> None:
    """vs_best_peer = (fastest non-appo provider's median) / (this row's median): > 1 is faster."""
    best: dict[tuple, float] = {}
    for r in rows:
        if is_peer(r["provider"]):
            k = (r["op"], shape_text(r["shape"]), r["dtype"], r["mode"])
            best[k] = min(best.get(k, float("inf")), r["median_ms"])
    for r in rows:
        peer_ms = best.get((r["op"], shape_text(r["shape"]), r["dtype"], r["mode"]))
        r["vs_best_peer"] = peer_ms / r["median_ms"] if peer_ms is not None else None


def sort_key(r: dict):
    dims = r["shape"] if isinstance(r["shape"], list) else [r["shape"]]
    return (r["op"], MODE_ORDER.get(r["mode"], 9), r["dtype"], [str(d).zfill(12) for d in dims],
            is_peer(r["provider"]), r["median_ms"])


def merge(old: list[dict], new: list[dict]) -> list[dict]:
    def key(r):
        return tuple(json.dumps(r[k]) for k in KEY)

    merged = {key(r): r for r in old}
    merged.update({key(r): r for r in new})
    return list(merged.values())


def markdown(rows: list[dict]) -> str:
    notes: list[str] = []
    # TFLOP/s columns appear only where some row has a FLOP count (attention, not token_stats)
    extra = [(k, title) for k, title in (("tflops", "TFLOP/s"),
                                         ("unrolled_tflops", "unrolled-eq TFLOP/s"))
             if any(r.get(k) is not None for r in rows)]
    lines = [
        "| op | provider | shape | dtype | mode | median ms | GB/s | % copy bw | "
        + "".join(f"{title} | " for _, title in extra) + "× best peer |",
        "|---|---|---|---|---|---:|---:|---:|" + "---:|" * len(extra) + "---:|",
    ]
    for r in rows:
        name = r["provider"]
        if r.get("note"):
            if r["note"] not in notes:
                notes.append(r["note"])
            name += "†" * (notes.index(r["note"]) + 1)
        ratio = f"{r['vs_best_peer']:.2f}" if r.get("vs_best_peer") is not None else "–"
        cells = "".join(f"{r[k]:.4g} | " if r.get(k) is not None else "– | " for k, _ in extra)
        lines.append(f"| {r['op']} | {name} | {shape_text(r['shape'])} | {r['dtype']} | {r['mode']} | "
                     f"{r['median_ms']:.3f} | {r['gbps']:.1f} | {r['pct_copy_bw']:.1f} | {cells}"
                     f"{ratio} |")
    for i, note in enumerate(notes):
        lines.append(f"\n{'†' * (i + 1)} {note}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json", type=Path,
                        help="output of pytest --benchmark-json, or a .jsonl stream")
    parser.add_argument("--out-dir", type=Path, default=RESULTS_DIR)
    parser.add_argument("--no-write", action="store_true", help="print the table only")
    args = parser.parse_args(argv)
    if not args.json.is_file():
        parser.error(f"{args.json} does not exist (pytest writes no JSON with --benchmark-disable)")

    run = load_run(args.json)
    rows = rows_from_run(run)
    if not rows:
        print(f"{args.json}: no benchmark rows (was it run with --benchmark-disable?)",
              file=sys.stderr)
        return 1
    devices = sorted({r["device"] for r in rows})
    if len(devices) != 1:
        print(f"{args.json}: rows from several devices {devices}; results never mix devices",
              file=sys.stderr)
        return 1
    device = devices[0]

    out = args.out_dir / f"{device_slug(device)}.json"
    if not args.no_write and out.exists():
        rows = merge(json.loads(out.read_text()), rows)
    add_peer_ratios(rows)
    rows.sort(key=sort_key)
    if not args.no_write:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(rows, indent=1) + "\n")
        print(f"wrote {len(rows)} rows to {out}", file=sys.stderr)

    copy = sorted({round(r["copy_gbps"], 1) for r in rows})
    print(f"Device: {device}; measured copy bandwidth: {', '.join(map(str, copy))} GB/s\n")
    print(markdown(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
