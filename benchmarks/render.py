"""How the encoder report shows its results: rich tables, a target check, JSON, CSV and a PNG plot.

A result row is a flat dict, one per (model, provider, batch size); see ``report.measure`` for its keys.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rich.table import Table

CSV_COLUMNS = (
    "model",
    "unit",
    "provider",
    "batch",
    "status",
    "ms",
    "items_per_s",
    "tflops",
    "peak_fraction",
    "vs_baseline",
    "first_call_s",
    "first_call_kind",
    "build_s",
    "peak_mem_gib",
    "rel_err_pooled",
    "rel_err_hidden",
    "reps",
    "reason",
)

# ANCHORS.md's targets: (model, batch, what, bound). Ratios are vitriton's images/s over the baseline's.
TARGETS = (
    ("clip-vit-l14-336", 128, "ratio", 1.30),
    ("siglip-so400m-384", 128, "ratio", 1.30),
    ("clip-vit-b16-224", 128, "ratio", 1.20),
    ("clip-vit-l14-336", 1, "ms", 2.0),
    ("siglip-so400m-384", 1, "ms", 3.0),
)
FIRST_CALL_TARGET_S = 15.0
VITRITON_PROVIDERS = ("vitriton", "vitriton-nographs", "vitriton-graphs")


def add_baseline_ratios(rows: list[dict[str, Any]], baseline: str) -> None:
    """Set each row's ``vs_baseline``: its throughput over the baseline provider's at the same model and batch."""
    reference = {
        (r["model"], r["batch"]): r["items_per_s"] for r in rows if r["provider"] == baseline and r["status"] == "ok"
    }
    for row in rows:
        base = reference.get((row["model"], row["batch"]))
        ok = row["status"] == "ok" and base
        row["vs_baseline"] = row["items_per_s"] / base if ok else None


def _fmt(value: float | None, spec: str) -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and math.isinf(value):
        return "inf"
    return format(value, spec)


def number(value: float) -> str:
    """Three significant digits or so, whatever the scale (a toy CPU run and an H100 share the code)."""
    if abs(value) >= 100:
        return f"{value:.0f}"
    return f"{value:.1f}" if abs(value) >= 1 else f"{value:.3g}"


def _err(value: float | None) -> str:
    return _fmt(value, ".1e")


def cell_line(row: dict[str, Any], unit: str) -> str:
    """One line per finished measurement, for the running log."""
    head = f"{row['model']:<18} {row['provider']:<15} b{row['batch']:<4}"
    if row["status"] != "ok":
        return f"{head} {row['status']}: {row['reason']}"
    return (
        f"{head} {row['ms']:9.3f} ms {row['items_per_s']:10.1f} {unit}/s {number(row['tflops']):>7} TFLOP/s"
        f"  first {row['first_call_s']:6.2f} s  err {_err(row['rel_err_pooled'])}"
    )


def detail_table(rows: Sequence[dict[str, Any]], baseline: str, title: str) -> Table:
    table = Table(title=title, title_justify="left")
    for name in ("model", "batch", "provider"):
        table.add_column(name)
    for name in ("ms", "items/s", "TFLOP/s", "% peak", f"x {baseline}", "first call s", "peak GiB"):
        table.add_column(name, justify="right")
    table.add_column("rel err pooled / hidden", justify="right")
    for row in rows:
        if row["status"] != "ok":
            table.add_row(row["model"], str(row["batch"]), row["provider"], f"[dim]{row['status']}[/dim]")
            continue
        fraction = row["peak_fraction"]
        table.add_row(
            row["model"],
            str(row["batch"]),
            row["provider"],
            _fmt(row["ms"], ".3f"),
            _fmt(row["items_per_s"], ",.1f"),
            number(row["tflops"]),
            _fmt(fraction * 100 if fraction is not None else None, ".1f"),
            _fmt(row["vs_baseline"], ".2f"),
            _fmt(row["first_call_s"], ".2f"),
            _fmt(row["peak_mem_gib"], ".2f"),
            f"{_err(row['rel_err_pooled'])} / {_err(row['rel_err_hidden'])}",
        )
    return table


def summary_table(
    rows: Sequence[dict[str, Any]], model: str, unit: str, providers: Sequence[str], baseline: str
) -> Table:
    """Throughput per provider (rows) and batch size (columns), then rows of ratios to the baseline."""
    mine = [r for r in rows if r["model"] == model]
    batches = sorted({r["batch"] for r in mine})
    by_key = {(r["provider"], r["batch"]): r for r in mine}
    table = Table(title=f"{model}: {unit}/s", title_justify="left")
    table.add_column("provider")
    for batch in batches:
        table.add_column(f"b{batch}", justify="right")

    def cell(provider: str, batch: int) -> str:
        row = by_key.get((provider, batch))
        if row is None or row["status"] != "ok":
            return "-"
        text = f"{row['items_per_s']:,.0f}"
        return f"{text} ({row['ms']:.2f} ms)" if batch == 1 else text

    for provider in providers:
        table.add_row(provider, *(cell(provider, b) for b in batches))
    for provider in providers:
        if provider == baseline or provider.startswith("hf-"):
            continue
        ratios = [by_key.get((provider, b), {}).get("vs_baseline") for b in batches]
        if any(r is not None for r in ratios):
            table.add_row(
                f"[bold]{provider} / {baseline}[/bold]", *(_fmt(r, ".2f") + "x" if r else "-" for r in ratios)
            )
    return table


def check_targets(rows: Sequence[dict[str, Any]], baseline: str) -> list[dict[str, Any]]:
    """ANCHORS.md's targets that this run has data for: the best vitriton provider's value against each bound."""
    ok = [r for r in rows if r["status"] == "ok"]
    checks = []
    for model, batch, what, bound in TARGETS:
        candidates = [
            r for r in ok if r["model"] == model and r["batch"] == batch and r["provider"] in VITRITON_PROVIDERS
        ]
        if what == "ratio":
            candidates = [r for r in candidates if r["vs_baseline"] is not None]
            if candidates:
                best = max(candidates, key=lambda r: r["vs_baseline"])
                checks.append(_check(f"{model} b{batch} / {baseline}", best["vs_baseline"], ">=", bound, best))
        elif candidates:
            best = min(candidates, key=lambda r: r["ms"])
            checks.append(_check(f"{model} b{batch} latency ms", best["ms"], "<=", bound, best))
    for model in dict.fromkeys(r["model"] for r in ok):
        first = [
            r for r in ok if r["model"] == model and r["provider"] == "vitriton" and r["first_call_kind"] == "build"
        ]
        if first:
            checks.append(
                _check(f"{model} first call s", first[0]["first_call_s"], "<=", FIRST_CALL_TARGET_S, first[0])
            )
    return checks


def _check(name: str, value: float, op: str, bound: float, row: dict[str, Any]) -> dict[str, Any]:
    met = value >= bound if op == ">=" else value <= bound
    return {"target": name, "value": value, "bound": f"{op} {bound}", "met": met, "provider": row["provider"]}


def targets_table(checks: Sequence[dict[str, Any]]) -> Table:
    table = Table(title="ANCHORS.md targets", title_justify="left")
    for name, justify in (("target", "left"), ("measured", "right"), ("bound", "right"), ("by", "left"), ("", "left")):
        table.add_column(name, justify=justify)
    for check in checks:
        mark = "[green]met[/green]" if check["met"] else "[red]missed[/red]"
        table.add_row(check["target"], f"{check['value']:.2f}", check["bound"], check["provider"], mark)
    return table


def write_json(path: Path, meta: dict[str, Any], models: dict[str, Any], rows: Sequence[dict[str, Any]]) -> None:
    def finite(value: Any) -> Any:  # JSON has no inf
        return "inf" if isinstance(value, float) and math.isinf(value) else value

    payload = {"meta": meta, "models": models, "results": [{k: finite(v) for k, v in r.items()} for r in rows]}
    path.write_text(json.dumps(payload, indent=2) + "\n")


def write_csv(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def write_plot(path: Path, rows: Sequence[dict[str, Any]], units: dict[str, str], providers: Sequence[str], title: str):
    """Throughput against batch size, one panel per model, one line per provider (log-log)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(units)
    columns = min(len(models), 4)
    lines = math.ceil(len(models) / columns)
    fig, axes = plt.subplots(lines, columns, figsize=(4.2 * columns, 3.6 * lines), squeeze=False)
    colors = {p: plt.get_cmap("tab10")(i % 10) for i, p in enumerate(providers)}
    for ax, model in zip(axes.flat, models, strict=False):
        for provider in providers:
            points = sorted(
                (r["batch"], r["items_per_s"])
                for r in rows
                if r["model"] == model and r["provider"] == provider and r["status"] == "ok"
            )
            if points:
                xs, ys = zip(*points, strict=True)
                ax.plot(xs, ys, marker="o", label=provider, color=colors[provider])
        ax.set_xscale("log", base=2)
        batches = sorted({r["batch"] for r in rows if r["model"] == model})
        ax.set_xticks(batches, [str(b) for b in batches])
        ax.minorticks_off()
        ax.set_yscale("log")
        ax.set_title(model, fontsize=10)
        ax.set_xlabel("batch size")
        ax.set_ylabel(f"{units[model]}/s")
        ax.grid(True, which="both", alpha=0.3)
    for ax in list(axes.flat)[len(models) :]:
        ax.set_visible(False)
    legend = {}
    for ax in axes.flat:
        legend.update(zip(*reversed(ax.get_legend_handles_labels()), strict=True))
    fig.legend(legend.values(), legend.keys(), loc="lower center", ncol=max(len(legend), 1), frameon=False)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)
