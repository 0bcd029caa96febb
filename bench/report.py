"""Results out: the JSON file, the Markdown summary, the PNG chart and the table on stdout.

python -m densetriton.bench.report RESULTS.json           # re-render RESULTS.md and RESULTS.png
python -m densetriton.bench.report --short RESULTS.json   # print images/s, one column per peer
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

from .schema import RECORD_FIELDS


def order_record(rec: dict) -> dict:
    first = {k: rec[k] for k in RECORD_FIELDS if k in rec}
    rest = {k: v for k, v in rec.items() if k not in first and k != "times_ms"}
    return {**first, **rest, "times_ms": rec.get("times_ms", [])}


def _finite(obj):
    """NaN and infinities become null, so the file is strict JSON."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


# -- formatting ------------------------------------------------------------------------------


def _num(x, digits=3) -> str:
    """A few significant figures without exponents for the usual ranges."""
    if x is None:
        return "-"
    if x == 0:
        return "0"
    decimals = max(0, digits - 1 - int(math.floor(math.log10(abs(x)))))
    return f"{x:.{decimals}f}"


def _mib(b) -> str:
    return "-" if b is None else f"{b / 2**20:.0f}"


# How a record's per-kind times were taken (its "kinds_method"; records without one: launch by launch).
KINDS_METHOD_TEXT = {
    "graph": "the kind's share of one forward captured as a CUDA graph, timed by events between kinds; "
    "the kinds add up to the forward",
    "ablation": "the forward captured as a CUDA graph less the same graph without this kind's launches",
    "kind-graphs": "each run of this kind's consecutive launches replayed as its own CUDA graph between events, summed",
    "launches": "its launches, each timed alone between CUDA events, summed (no graph: includes the launch gaps)",
}

COLUMNS = (
    "peer",
    "batch",
    "dtype",
    "median ms",
    "p90 ms",
    "images/s",
    "peak MiB",
    "plan MiB",
    "cold s",
    "max rel err",
    "top-1",
    "floor ms",
    "% floor",
)


def _row(r: dict) -> list[str]:
    dtype = r.get("peer_dtype") or r["dtype"]
    peer = r["peer"] + (f" [{r['backend']}]" if r.get("backend") == "reference" else "")
    err = "-" if r.get("max_rel_err") is None else f"{r['max_rel_err']:.1e}"
    return [
        peer,
        str(r["batch"]),
        dtype,
        _num(r["median_ms"]),
        _num(r["p90_ms"]),
        _num(r["images_per_s"]),
        _mib(r.get("peak_mem_bytes")),
        _mib(r.get("planned_mem_bytes")),
        _num(r.get("cold_start_s")),
        err,
        "-" if r.get("top1_agree") is None else f"{100 * r['top1_agree']:.0f}%",
        _num(r.get("floor_ms")),
        "-" if r.get("pct_of_floor") is None else f"{r['pct_of_floor']:.1f}%",
    ]


def _groups(doc: dict, by_dtype: bool = True) -> dict[tuple, list[dict]]:
    """Records by (model, image size, dtype of the run) -- or without the dtype, for the chart."""
    groups: dict[tuple, list[dict]] = {}
    for r in doc.get("results", []):
        key = (r["model"], r["image_size"]) + ((r["dtype"],) if by_dtype else ())
        groups.setdefault(key, []).append(r)
    return groups


def _title(key: tuple) -> str:
    model, size, dtype = key
    return f"{model} {size}x{size}, {dtype} run"


def _footnotes(doc: dict) -> list[str]:
    lines = []
    if any(r.get("backend") == "reference" for r in doc.get("results", [])):
        lines.append(
            "[reference]: densetriton ran its plain-PyTorch reference backend (no GPU), not the Triton kernels"
        )
    kinds = {r.get("peak_mem_kind") for r in doc.get("results", [])}
    if "cpu_rss_peak" in kinds:
        lines.append(
            "peak MiB on CPU: the process's peak RSS during one forward (mark reset just before) less its RSS "
            "before the peer was built: weights, buffers and the forward's temporaries; page-granular"
        )
    if "cpu_maxrss_growth" in kinds:
        lines.append(
            "peak MiB on CPU (no /proc/self/clear_refs): growth of ru_maxrss while the peer was built and "
            "run; coarse, 0 when the process had been higher before"
        )
    if "cuda_max_allocated" in kinds:
        lines.append(
            "peak MiB: torch.cuda.max_memory_allocated during one forward (after a reset) less what was "
            "allocated before the peer was built (the bench's inputs): weights, buffers, workspace, output"
        )
    details = {(r["peer"], r["peer_detail"]) for r in doc.get("results", []) if r.get("peer_detail")}
    lines += [f"{peer}: ran on {detail}" for peer, detail in sorted(details)]
    lines.append(
        "dtype: what the peer computed in; max rel err: max over images of ||logits - ref|| / ||ref||, ref = torchvision float32 on the same "
        "inputs and weights; top-1: share of images whose top class matches ref; % floor = floor / median"
    )
    return lines


def text_table(doc: dict) -> str:
    """Fixed-width tables, one per model, for stdout."""
    out = []
    for key, rows in _groups(doc).items():
        cells = [list(COLUMNS)] + [_row(r) for r in rows]
        widths = [max(len(c[i]) for c in cells) for i in range(len(COLUMNS))]
        out.append(f"{_title(key)} on {doc.get('device')}")
        for j, c in enumerate(cells):
            out.append("  ".join(c[i].ljust(widths[i]) if i < 3 else c[i].rjust(widths[i]) for i in range(len(c))))
            if j == 0:
                out.append("  ".join("-" * w for w in widths))
        out.append("")
    out.extend(_skipped_lines(doc))
    out.extend(doc.get("notes", []))
    out.extend(_footnotes(doc))
    return "\n".join(out).rstrip() + "\n"


def short_table(doc: dict) -> str:
    """images/s per model, batch and dtype, one column per peer; densetriton's peak and planned memory."""
    from .peers import PEERS

    peers = [p for p in PEERS if any(r["peer"] == p for r in doc.get("results", []))]
    cells: dict[tuple, dict] = {}
    for r in doc.get("results", []):
        cells.setdefault((r["model"], r["batch"], r["dtype"]), {})[r["peer"]] = r
    head = ["model", "batch", "dtype"] + [
        p.replace("torchvision-", "tv-").replace("torch-compile-", "compile-") for p in peers
    ]
    head += ["dt peak/plan MiB"]
    rows = [head]
    for (model, batch, dtype), by_peer in cells.items():
        dt = by_peer.get("densetriton")
        mem = "-" if dt is None else f"{_mib(dt.get('peak_mem_bytes'))}/{_mib(dt.get('planned_mem_bytes'))}"
        rows.append(
            [model, str(batch), dtype]
            + [_num(by_peer[p]["images_per_s"]) if p in by_peer else "-" for p in peers]
            + [mem]
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = ["images/s on " + str(doc.get("device"))]
    lines += ["  ".join(c.ljust(w) if i < 3 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
    return "\n".join(lines) + "\n"


def markdown(doc: dict, chart_name: str | None) -> str:
    m = doc.get("machine", {})
    commit = doc.get("commit") or "not a git checkout"
    if doc.get("commit_dirty"):
        commit += " (with uncommitted changes)"
    lines = [
        f"# densetriton bench: {doc.get('device')}",
        "",
        f"- device: {doc.get('device_detail', doc.get('device'))}",
        f"- torch {doc.get('torch')}, torchvision {doc.get('torchvision')}, triton {doc.get('triton')}, "
        f"python {doc.get('python')}",
        f"- commit {commit}; created {doc.get('created')}; wall time {_num(doc.get('wall_s'))} s"
        + ("" if doc.get("complete", True) else "; **incomplete run**"),
    ]
    if m:
        rates = ", ".join(f"{d} {v / 1e12:.3g} TFLOP/s" for d, v in m.get("matmul_flops_per_s", {}).items())
        lines.append(
            f"- machine, timed in this run: matmul {rates}; copy {m.get('copy_bytes_per_s', 0) / 1e9:.3g} GB/s"
        )
    for model, src in doc.get("weights", {}).items():
        lines.append(f"- weights of {model}: {src}")
    for key, rows in _groups(doc).items():
        lines += [
            "",
            f"## {_title(key)}",
            "",
            "| " + " | ".join(COLUMNS) + " |",
            "|" + "|".join("---" if i < 3 else "---:" for i in range(len(COLUMNS))) + "|",
        ]
        lines += ["| " + " | ".join(_row(r)) + " |" for r in rows]
    if chart_name:
        lines += ["", f"![images/s by batch size]({chart_name})"]
    roof = doc.get("roofline", [])
    if roof:
        lines += [
            "",
            "## Roofline",
            "",
            "Minimum traffic: input, weights and logits once, every activation written once and read once "
            "(bench/NOTES.md). Floor = max(2 x MACs / matmul rate, bytes / copy bandwidth).",
            "",
            "| model | batch | dtype | GMACs | MB (min) | MB (layer-wise) | compute ms | memory ms | floor ms |",
            "|---|---:|---|---:|---:|---:|---:|---:|---:|",
        ]
        for e in roof:
            lines.append(
                f"| {e['model']} | {e['batch']} | {e['dtype']} | {e['macs'] / 1e9:.3g} | {e['bytes'] / 1e6:.4g} | "
                f"{e['bytes_layerwise'] / 1e6:.4g} | {_num(e['compute_ms'])} | {_num(e['memory_ms'])} | "
                f"{_num(e['floor_ms'])} |"
            )
        largest = {}
        for e in roof:
            if e["batch"] >= largest.get((e["model"], e["dtype"]), {"batch": 0})["batch"]:
                largest[(e["model"], e["dtype"])] = e
        for e in largest.values():
            lines += kinds_table(doc, e)
    notes = _skipped_lines(doc) + doc.get("notes", []) + _footnotes(doc)
    if notes:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"


def kinds_table(doc: dict, e: dict) -> list[str]:
    """One roofline entry's layer kinds against their floors, with densetriton's measured ms per
    kind when its record for that model, batch and dtype has them (GPU runs), and their sum
    against the record's median."""
    record = next(
        (
            r
            for r in doc.get("results", [])
            if r["peer"] == "densetriton"
            and r.get("kinds_ms")
            and (r["model"], r["batch"], r["dtype"]) == (e["model"], e["batch"], e["dtype"])
        ),
        None,
    )
    measured = record and record["kinds_ms"]
    head = "| kind | GMACs | MB (min) | MB (layer-wise) | compute ms | memory ms (min) | memory ms (layer-wise) |"
    rule = "|---|---:|---:|---:|---:|---:|---:|"
    if measured:
        head += " densetriton ms | % of floor |"
        rule += "---:|---:|"
    lines = ["", f"Per layer kind, {e['model']} batch {e['batch']} {e['dtype']}:", "", head, rule]
    for kind, d in e["kinds"].items():
        row = (
            f"| {kind} | {d['macs'] / 1e9:.3g} | {d['bytes'] / 1e6:.4g} | {d['bytes_layerwise'] / 1e6:.4g} | "
            f"{_num(d['compute_ms'])} | {_num(d['memory_ms'])} | {_num(d['memory_layerwise_ms'])} |"
        )
        if measured:
            ms = measured.get(kind)
            share = f"{100 * d['floor_ms'] / ms:.1f}%" if ms else "-"
            row += f" {_num(ms) if ms else '-'} | {share} |"
        lines.append(row)
    if measured:
        total = sum(measured.values())
        lines += [
            f"| sum | | | | | | | {_num(total)} | {100 * total / record['median_ms']:.0f}% of the median |",
            f"\ndensetriton ms: {KINDS_METHOD_TEXT[record.get('kinds_method') or 'launches']} "
            "(python -m densetriton.bench.layer_times); % of floor = the kind's floor / that time; the sum "
            f"against the record's median forward ({_num(record['median_ms'])} ms).",
        ]
    return lines


def _skipped_lines(doc: dict) -> list[str]:
    """One line per peer and reason, naming every record it covers (an interrupted run skips many)."""
    groups: dict[tuple, list[str]] = {}
    for s in doc.get("skipped", []):
        where = " ".join(str(s[k]) for k in ("model", "batch", "dtype") if k in s)
        groups.setdefault((s["peer"], s["reason"]), []).append(where)
    return [
        f"skipped {peer}{' (' + ', '.join(w for w in wheres if w) + ')' if any(wheres) else ''}: {reason}"
        for (peer, reason), wheres in groups.items()
    ]


def draw_chart(doc: dict, path: Path) -> Path:
    """images/s by batch size, one line per peer (and dtype), one panel per model; log-log axes."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter, NullLocator

    groups = _groups(doc, by_dtype=False) or {("no results", 0): []}
    fig = Figure(figsize=(6 * len(groups), 4.5), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    dtypes = {r["dtype"] for r in doc.get("results", [])}
    for ax, ((model, size), rows) in zip(fig.subplots(1, len(groups), squeeze=False)[0], groups.items()):
        lines: dict[str, list] = {}
        for r in rows:
            label = r["peer"] + (" [reference]" if r.get("backend") == "reference" else "")
            label += f" ({r['dtype']})" if len(dtypes) > 1 else ""
            lines.setdefault(label, []).append((r["batch"], r["images_per_s"]))
        for label, pts in lines.items():
            pts.sort()
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        batches = sorted({r["batch"] for r in rows})
        if batches:
            ax.set_xticks(batches, [str(b) for b in batches])
            ax.xaxis.set_minor_locator(NullLocator())
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: _num(v, 2)))
        ys = [r["images_per_s"] for r in rows if r.get("images_per_s")]
        narrow = bool(ys) and max(ys) < 10 * min(ys)  # less than a decade: label every minor tick

        def minor(v, _, narrow=narrow):  # this panel's narrow, bound now
            label = _num(v, 2)
            return label if narrow or label[0] in "25" else ""

        ax.yaxis.set_minor_formatter(FuncFormatter(minor))
        ax.set_xlabel("batch size")
        ax.set_ylabel("images/s")
        ax.set_title(f"{model} {size}x{size}" if size else model)
        ax.grid(True, which="both", alpha=0.3)
        if lines:
            ax.legend(fontsize=8)
    fig.suptitle(f"densetriton bench on {doc.get('device')} ({doc.get('created', '')[:10]})")
    fig.savefig(path, format="png")
    return path


# -- files -----------------------------------------------------------------------------------


def write(doc: dict, out: Path, stem: str, *, chart: bool = True, write_json: bool = True) -> dict[str, Path]:
    """stem.json and stem.md (and stem.png when chart) under out, each written atomically."""
    from densetriton.atomic import atomic_write

    out = Path(out)
    paths = {"md": out / f"{stem}.md"}
    if write_json:
        paths["json"] = out / f"{stem}.json"
        text = json.dumps(_finite(doc), indent=1, allow_nan=False) + "\n"
        atomic_write(paths["json"], lambda tmp: Path(tmp).write_text(text))
    png = out / f"{stem}.png"
    md = markdown(doc, png.name if (chart or png.exists()) else None)
    atomic_write(paths["md"], lambda tmp: Path(tmp).write_text(md))
    if chart:  # last: the slowest, and the one python -m densetriton.bench.report can redo
        atomic_write(png, lambda tmp: draw_chart(doc, Path(tmp)))
        paths["png"] = png
    return paths


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    short = "--short" in argv
    if short:
        argv.remove("--short")
    if len(argv) != 1:
        print("usage: python -m densetriton.bench.report [--short] RESULTS.json", file=sys.stderr)
        return 2
    path = Path(argv[0])
    doc = json.loads(path.read_text())
    if short:  # print only
        print(short_table(doc), end="")
        return 0
    paths = write(doc, path.parent, path.stem, write_json=False)  # the results file stays as it was
    print(text_table(doc), end="")
    print("\n".join(f"wrote {p}" for p in paths.values()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
