"""The offload=stream budget sweep in the report: ``benchmarks/device_stream.py`` rows (schema ``vramfit.stream/1``)
as a table and a chart -- per value and budget, streamed s/step beside the fastest *measured* stock row that fits
the same budget, their ratio, and host memory against the goal (1.15 x the stored weight bytes + 2 GB).

A stock row fits a budget when it ran capped at or below it, or, uncapped, when its measured peak (reserved,
loading included) is within it; ``benchmarks/device_loader.py`` generate rows count as uncapped stock rows. Stock = any row of the same transformer value whose offload is not ``stream`` (resident, model/group
offload, staged). Nothing is predicted here: a budget without a measured stock row that fits says so.
"""

from __future__ import annotations

import html
from pathlib import Path

from .recipe import Recipe

SCHEMA = "vramfit.stream/1"
VALUE_OF = {"bnb-nf4": "nf4", "torchao-int8wo": "int8", "fp8-layerwise": "fp8", "bf16": "bf16"}
HOST_GOAL = (1.15, 2.0)  # host RAM peak <= 1.15 x stored bytes + 2 GB (issue 11)


def is_stream_row(r: dict) -> bool:
    """A benchmarks/device_stream.py row: the schema it writes from now on, or (the committed rows written before it
    had one) its fields: a scenario dict and the command line that wrote it."""
    return r.get("schema") == SCHEMA or (isinstance(r.get("scenario"), dict)
                                         and str(r.get("command", "")).startswith("device_stream.py"))


def _recipe(row: dict):
    try:
        return Recipe.parse(row["recipe"])
    except Exception:  # noqa: BLE001 - a row without a parseable recipe is not a sweep or stock row
        return None


def _s_per_step(row: dict):
    return (row.get("timings") or {}).get("s_per_step_median")


def _peak(row: dict):
    m = row.get("memory") or {}
    return m.get("peak_reserved_gb", m.get("peak_allocated_gb"))


def _stored_gb(row: dict):
    """Weight bytes the run keeps somewhere: on the GPU (weight_gb_total) plus the pinned host buffer of a stream."""
    off = row.get("offload") or {}
    host = off.get("pinned_host_bytes")
    if host is None:
        host = sum((c or {}).get("pinned_host_bytes", 0) for c in (off.get("components") or {}).values())
    gpu = row.get("weight_gb_total")
    return None if gpu is None else round(gpu + (host or 0) / 1e9, 3)


def is_loader_row(r: dict) -> bool:
    """A benchmarks/device_loader.py row (checkpoint vs stand-in; `vramfit generate --json` summarised)."""
    return r.get("kind") in ("generate", "code", "compare", "export", "export-gguf", "skipped", "diag") and "at" in r


def _as_stock(r: dict) -> dict | None:
    """A loader generate row in the shape of a stream row (recipe, median s/step, whole-run peak incl. loading)."""
    if r.get("kind") != "generate" or r.get("status") != "ok" or not r.get("recipe_run"):
        return None
    return {"name": f"loader:{r.get('name')}:{r.get('offload')}:{r.get('weights')}", "recipe": r["recipe_run"],
            "cap_gb": None, "timings": {"s_per_step_median": r.get("s_per_step_median")},
            "memory": {"peak_reserved_gb": r.get("peak_reserved_gb"), "peak_allocated_gb": r.get("peak_gb")}}


def measured(rows: list[dict]) -> list[dict]:
    """Rows with a recipe and a measured s/step: device_stream rows, and device_loader generate rows as stock
    candidates (uncapped: they fit a budget by their measured peak, loading included)."""
    rows = [(_as_stock(r) if is_loader_row(r) else r) for r in rows]
    return [r for r in rows if r is not None and "error" not in r and "skipped" not in r
            and r.get("recipe") and _s_per_step(r) is not None]


def _stamp(row: dict):
    from .plan.data import _stamp as stamp  # the time a row was measured: `at`, or device_stream's `@ TIME`

    return stamp(row)


def _supersedes(new: dict, old: dict) -> bool:
    """Whether ``new`` stands for a (value, budget) point instead of ``old``: a sweep or headline row over a
    `generate --vram` row (kind cli: the planner's own choice, T5 and tiling as it chose); between rows of one kind,
    the later measurement by time stamp (files come in any order), else the later row given."""
    new_cli, old_cli = ((x.get("scenario") or {}).get("kind") == "cli" for x in (new, old))
    if new_cli != old_cli:
        return old_cli
    t_new, t_old = _stamp(new), _stamp(old)
    return not (t_new and t_old and t_new < t_old)


def sweep_table(rows: list[dict]) -> list[dict]:
    """One entry per (value, budget) measured streamed under a budget (sweep rows and the capped headline rows),
    in value then budget order."""
    ok = measured(rows)
    stock = []
    for r in ok:
        rec = _recipe(r)
        if rec is not None and rec.offload_kind != "stream" and rec.transformer in VALUE_OF:
            stock.append((VALUE_OF[rec.transformer], r))
    # (value, budget) -> the streamed row that stands for that budget (``_supersedes``)
    points: dict = {}
    for r in ok:
        rec, sc = _recipe(r), r.get("scenario") or {}
        budget = sc.get("budget_gb", r.get("cap_gb"))
        if rec is None or rec.offload_kind != "stream" or budget is None or rec.transformer not in VALUE_OF:
            continue
        if rec.compile != "off":  # the sweep compares eager runs with eager stock rows (compiled ones: their own row)
            continue
        key = (VALUE_OF[rec.transformer], float(budget))
        if key not in points or _supersedes(r, points[key]):
            points[key] = r
    out = []
    for (value, budget), r in points.items():
        fits = [s for v, s in stock if v == value and (
            (s.get("cap_gb") is not None and s["cap_gb"] <= budget)
            or (s.get("cap_gb") is None and _peak(s) is not None and _peak(s) <= budget))]
        best = min(fits, key=_s_per_step) if fits else None
        stored = _stored_gb(r)
        host = r.get("host_peak_rss_gb") or (r.get("memory") or {}).get("host_peak_rss_gb")
        goal = round(HOST_GOAL[0] * stored + HOST_GOAL[1], 2) if stored is not None else None
        out.append({
            "value": value, "budget_gb": budget, "name": r["name"], "recipe": r["recipe"],
            "k": (r.get("offload") or {}).get("k"), "s_per_step": _s_per_step(r), "peak_gb": _peak(r),
            "stock": best["name"] if best else None, "stock_recipe": best["recipe"] if best else None,
            "stock_s_per_step": _s_per_step(best) if best else None,
            "ratio": round(_s_per_step(best) / _s_per_step(r), 2) if best else None,
            "host_peak_gb": host, "stored_gb": stored, "host_goal_gb": goal,
            "host_ok": (host <= goal) if host is not None and goal is not None else None,
            "harness": r.get("harness"),
        })
    return sorted(out, key=lambda e: (list(VALUE_OF.values()).index(e["value"]) if e["value"] in VALUE_OF.values()
                                      else 99, e["budget_gb"]))


def plot_sweep(table: list[dict], path: Path, title: str) -> bool:
    if not table:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.5), dpi=110)
    for value in dict.fromkeys(e["value"] for e in table):
        es = [e for e in table if e["value"] == value]
        line, = ax.plot([e["budget_gb"] for e in es], [e["s_per_step"] for e in es], "o-", label=f"{value} stream")
        st = [e for e in es if e["stock_s_per_step"] is not None]
        if st:
            ax.plot([e["budget_gb"] for e in st], [e["stock_s_per_step"] for e in st], "s--", color=line.get_color(),
                    alpha=0.6, label=f"{value} best stock that fits")
    ax.set_xscale("log", base=2)
    budgets = sorted({e["budget_gb"] for e in table})
    ax.set_xticks(budgets)
    ax.set_xticklabels([f"{b:g}" for b in budgets])
    ax.minorticks_off()
    ax.set_xlabel("VRAM budget (GB, hard cap)")
    ax.set_ylabel("s/step (median)")
    ax.set_title(title, fontsize=9)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


COLUMNS = [("value", "value"), ("budget_gb", "budget GB"), ("k", "K"), ("s_per_step", "stream s/step"),
           ("peak_gb", "stream peak GB"), ("stock", "best stock that fits"), ("stock_s_per_step", "stock s/step"),
           ("ratio", "stock / stream"), ("host_peak_gb", "host peak GB"), ("host_goal_gb", "host goal GB")]


def _fmt(v) -> str:
    if v is None:
        return "n/a"
    return f"{v:g}" if isinstance(v, float) else str(v)


def markdown(table: list[dict]) -> str:
    if not table:
        return ""
    lines = ["| " + " | ".join(h for _, h in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(_fmt(e[k]) for k, _ in COLUMNS) + " |" for e in table]
    return ("## offload=stream budget sweep\n\nStock = the fastest measured non-stream row of the same value that "
            "fits the budget (n/a: none measured). Host goal = 1.15 x stored weight bytes + 2 GB.\n\n"
            + "\n".join(lines) + "\n")


def section_html(table: list[dict], png_uri: str | None) -> str:
    if not table:
        return ""
    head = "".join(f"<th>{html.escape(h)}</th>" for _, h in COLUMNS)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_fmt(e[k]))}</td>" for k, _ in COLUMNS) + "</tr>"
                   for e in table)
    img = f'<img class="plot" alt="offload=stream budget sweep" src="{png_uri}">' if png_uri else ""
    return (f'<h2 id="stream-sweep">offload=stream budget sweep</h2><p class="note">Stock = the fastest measured '
            "non-stream row of the same value that fits the budget (n/a: none measured). Host goal = 1.15 x "
            f"stored weight bytes + 2 GB.</p>{img}<div class=\"wrap\"><table id=\"sweep\"><tr>{head}</tr>{body}"
            "</table></div>")
