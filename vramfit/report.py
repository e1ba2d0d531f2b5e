"""``vramfit report``: a bench's results.jsonl -> tables, charts, image grids and a blind test, all offline.

Writes into REPORT_DIR:
* ``index.html``  -- the summary table (every measured column, click a header to sort), an interactive
  memory-vs-latency chart (hover shows the recipe, Pareto front highlighted), the PNGs below embedded;
* ``memory_latency.png``, ``bars.png`` -- matplotlib (Agg) plots for people who would rather look than read;
* ``grid.png`` (``grid-2.png`` ...) -- every recipe's image for one prompt and seed, with its fidelity numbers;
* ``blind.html`` -- "spot the quantized image": shuffled images of one prompt, each revealed on a click;
* with ``benchmarks/device_stream.py`` rows (stream.jsonl) among the inputs, an offload=stream budget sweep section
  and ``stream_sweep.png`` (``vramfit.stream_report``); with only those, a report of that section alone.
Everything is embedded (data URIs, inline script and style): no file or network access when opened.
"""

from __future__ import annotations

import base64
import html
import io
import json
import time
from pathlib import Path

from .errors import InputError

GRID_MAX_BYTES = 3_000_000
BLIND_THUMB = 256

# (key, header, getter, decimals) -- every measured column of a bench row
COLUMNS = [
    ("scenario", "scenario", lambda r: r["scenario"], None),
    ("status", "status", lambda r: r["status"] if r["status"] == "ok" else r.get("exit_reason") or r["status"], None),
    ("recipe", "recipe", lambda r: r.get("recipe_requested") or r.get("recipe"), None),
    ("model", "model", lambda r: f"{r['model']} {r['request']['height']}x{r['request']['width']}", None),
    ("steps", "steps", lambda r: r.get("steps"), 0),
    ("seeds", "seeds", lambda r: ",".join(map(str, r["request"]["seeds"])), None),
    ("warm_n", "warm runs", lambda r: _g(r, "warm", "n"), 0),
    ("import_s", "import s", lambda r: r.get("import_s"), 2),
    ("load_s", "load s", lambda r: r.get("load_s"), 2),
    ("weights_gb", "weights GB", lambda r: r.get("weight_gb_total"), 2),
    ("after_load_gb", "after load GB", lambda r: _g(r, "memory", "after_load_gb"), 2),
    ("after_load_reserved_gb", "after load reserved GB", lambda r: _g(r, "memory", "after_load_reserved_gb"), 2),
    ("peak_gb", "peak GB (generating)", lambda r: _g(r, "memory", "peak_gb"), 2),
    ("peak_reserved_gb", "peak reserved GB", lambda r: _g(r, "memory", "peak_reserved_gb"), 2),
    ("peak_incl_load_gb", "peak incl. load GB", lambda r: _g(r, "memory", "peak_incl_load_gb"), 2),
    ("host_peak_rss_gb", "host peak RSS GB", lambda r: _g(r, "memory", "host_peak_rss_gb"), 2),
    ("cold_s", "cold s", lambda r: _g(r, "cold", "total_s"), 3),
    ("compile_s", "compile s", lambda r: _g(r, "cold", "compile_s"), 2),
    ("compile_cache", "compile cache", lambda r: _g(r, "compile_cache", "status"), None),
    ("cold_uncached_s", "first image s (uncached)", lambda r: _g(r, "cold_uncached", "to_first_image_s"), 2),
    ("cold_cached_s", "first image s (cached)", lambda r: _g(r, "cold_cached", "to_first_image_s"), 2),
    ("warm_s", "warm s (median)", lambda r: _g(r, "warm", "total_s_median"), 3),
    ("warm_p90_s", "warm s (p90)", lambda r: _g(r, "warm", "total_s_p90"), 3),
    ("encode_s", "encode s", lambda r: _g(r, "warm", "encode_s_median"), 3),
    ("denoise_s", "denoise s", lambda r: _g(r, "warm", "denoise_s_median"), 3),
    ("decode_s", "decode s", lambda r: _g(r, "warm", "decode_s_median"), 3),
    ("s_per_step", "s/step (median)", lambda r: _g(r, "warm", "s_per_step_median"), 4),
    ("s_per_step_p90", "s/step (p90)", lambda r: _g(r, "warm", "s_per_step_p90"), 4),
    ("psnr_db", "PSNR dB", lambda r: _psnr(r), 2),
    ("ssim", "SSIM", lambda r: _g(r, "fidelity", "ssim"), 4),
    ("latent_rel_l2", "latent rel. L2", lambda r: _g(r, "fidelity", "latent_rel_l2"), 5),
    ("wall_s", "process s", lambda r: r.get("wall_s"), 1),
    ("error", "error", lambda r: r.get("error"), None),
]


def _g(r: dict, *path):
    for p in path:
        r = r.get(p) if isinstance(r, dict) else None
    return r


def _psnr(r: dict):
    """Identical images have infinite PSNR (stored as null with images_identical=true)."""
    return float("inf") if _g(r, "fidelity", "images_identical") else _g(r, "fidelity", "psnr_db")


def memory_of(r: dict) -> tuple[float | None, str]:
    """The memory a chart shows: GPU peak allocated; host peak RSS for CPU runs (no GPU counters there)."""
    m = r.get("memory") or {}
    return (m.get("peak_gb"), "peak GPU memory allocated while generating (GB)") if m.get("gpu") else \
        (m.get("host_peak_rss_gb"), "host peak RSS (GB, CPU run)")


def latency_of(r: dict) -> float | None:
    """Warm median s/step (comparable across scenarios run with fewer steps); the cold run when no warm ones."""
    return _g(r, "warm", "s_per_step_median") or _g(r, "cold", "s_per_step")


def pareto(points: list[tuple[float, float, int]]) -> list[int]:
    """Indices of the points no other point beats on both memory and latency (lower is better), by latency."""
    front, best = [], float("inf")
    for x, y, i in sorted(points):
        if y < best:
            front.append(i)
            best = y
    return front


# ----------------------------------------------------------------------------------------------------------
# loading


def load(paths: list[Path], stream_rows: list | None = None) -> tuple[list[dict], list[str]]:
    """Rows of one or more results files; a scenario measured again (rerun into the same DIR) keeps its last row.
    ``benchmarks/device_stream.py`` rows (schema vramfit.stream/1) go to ``stream_rows`` when a list is given."""
    from .bench import ROW_SCHEMA, read_rows
    from .stream_report import SCHEMA as STREAM_SCHEMA
    from .stream_report import is_loader_row, is_stream_row

    rows: dict[str, dict] = {}
    notes, repeated, torn, unrun = [], {}, [], []
    for p in paths:
        if not p.is_file():
            raise InputError(f"{p}: no such results file (vramfit bench writes DIR/results.jsonl)")
        for r in read_rows(p, on_torn=lambda n, text, p=p: torn.append(f"{p.name} line {n}")):
            if stream_rows is not None and (is_stream_row(r) or is_loader_row(r)):
                stream_rows.append(r)
                continue
            if r.get("schema") != ROW_SCHEMA:
                expected = ROW_SCHEMA + (f" or {STREAM_SCHEMA}" if stream_rows is not None else "")
                raise InputError(f"{p}: a row with schema {r.get('schema')!r}; expected {expected}")
            if not r.get("model") or not r.get("request"):
                # a row with no run behind it (device_speed.py's scenarios left out for budget, its profile row):
                # nothing to chart; it is named among the notes
                said = r.get("error") or ("attention backends that run here: " + ", ".join(r["runs_here"])
                                          if r.get("runs_here") else "")
                unrun.append(f"{r.get('scenario')} ({r.get('status')}: {said[:120]})")
                continue
            r["_dir"] = str(p.parent)
            if r["scenario"] in rows:
                repeated[r["scenario"]] = repeated.get(r["scenario"], 1) + 1
            rows[r["scenario"]] = r
    if not rows and not stream_rows:
        raise InputError(f"no rows in {', '.join(map(str, paths))}" + (
            f" that ran (only {', '.join(unrun)})" if unrun else ""))
    if unrun:
        notes.append(f"{len(unrun)} row(s) without a run, not in the tables: " + "; ".join(unrun))
    if repeated:  # one line, however many: the answer comes first, not forty of these
        notes.append(f"{len(repeated)} scenario(s) measured more than once; the last row of each is shown: "
                     + ", ".join(f"{k} ({n}x)" for k, n in repeated.items()))
    if torn:
        notes.append(f"{len(torn)} torn line(s) skipped (a writer killed mid-write): {', '.join(torn)}")
    return list(rows.values()), notes


def image_path(r: dict, seed) -> Path | None:
    rel = (r.get("images") or {}).get(str(seed))
    p = Path(r["_dir"]) / rel if rel else None
    return p if p and p.is_file() else None


def image_groups(rows: list[dict]) -> list[tuple[str, list[tuple[dict, Path]]]]:
    """(title, [(row, image)]) per model/size/prompt/seed, the group with most images first."""
    groups: dict[tuple, list] = {}
    for r in rows:
        if r["status"] != "ok":
            continue
        q = r["request"]
        for seed in q["seeds"]:
            p = image_path(r, seed)
            if p:
                groups.setdefault((r["model"], q["height"], q["width"], q["prompt"], seed), []).append((r, p))
    ordered = sorted(groups.items(), key=lambda kv: -len(kv[1]))
    return [(f"{m} {h}x{w}, seed {s}: \u201c{pr}\u201d", items) for (m, h, w, pr, s), items in ordered]


# ----------------------------------------------------------------------------------------------------------
# PNGs


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def pareto_rows(rows: list[dict]) -> list[dict]:
    """The measured rows nothing beats on both memory and latency, fastest first (what the report opens with)."""
    pts = [(latency_of(r), memory_of(r)[0], i) for i, r in enumerate(rows) if r["status"] == "ok"]
    pts = [p for p in pts if p[0] is not None and p[1] is not None]
    return [rows[i] for i in pareto(pts)]


PARETO_COLUMNS = ("scenario", "recipe", "peak_gb", "host_peak_rss_gb", "s_per_step", "warm_s", "compile_s", "psnr_db",
                  "ssim", "latent_rel_l2")


def _pareto_cols(rows: list[dict]) -> list:
    gpu = any((r.get("memory") or {}).get("gpu") for r in rows)
    drop = "host_peak_rss_gb" if gpu else "peak_gb"
    return [c for c in COLUMNS if c[0] in PARETO_COLUMNS and c[0] != drop]


def pareto_html(front: list[dict]) -> str:
    if not front:
        return "<p>No measured row has both memory and latency: no Pareto front.</p>"
    cols = _pareto_cols(front)
    head = "".join(f"<th>{html.escape(h)}</th>" for _, h, _, _ in cols)
    body = ""
    for r in front:
        cells = []
        for key, _, get, dec in cols:
            v = get(r)
            text = _cell(v, dec)
            cells.append(f"<td><code>{html.escape(text)}</code></td>" if key == "recipe" else
                         f'<td class="{"num" if dec is not None else ""}">{html.escape(text)}</td>')
        body += "<tr>" + "".join(cells) + "</tr>"
    return f'<table id="pareto"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def plot_memory_latency(rows: list[dict], path: Path, title: str) -> bool:
    pts = [(latency_of(r), memory_of(r)[0], i) for i, r in enumerate(rows)]
    pts = [p for p in pts if p[0] is not None and p[1] is not None]
    if not pts:
        return False
    plt = _plt()
    front = set(pareto(pts))
    fig, ax = plt.subplots(figsize=(9, 6), dpi=110)
    for x, y, i in pts:
        on = i in front
        ax.scatter(x, y, s=60 if on else 30, c="#d62728" if on else "#1f77b4", zorder=3)
    fx = sorted((x, y) for x, y, i in pts if i in front)
    ax.step([p[0] for p in fx], [p[1] for p in fx], where="post", c="#d62728", lw=1.2, label="Pareto front")
    ax.set_xscale("log")
    ax.set_xlabel("latency: warm median s per denoising step (log scale)")
    ax.set_ylabel(memory_of(rows[pts[0][2]])[1])
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    fig.tight_layout()
    # the Pareto front's labels first, then the rest; a label that would overlap a placed one is left out
    order = sorted(pts, key=lambda p: (p[2] not in front, p[0]))
    _, hidden = place_labels(fig, ax, [(rows[i]["scenario"], x, y, i in front) for x, y, i in order])
    if hidden:
        fig.text(0.995, 0.008, f"{hidden} label(s) left out where points crowd; index.html names every point",
                 ha="right", va="bottom", fontsize=7, color="#555")
    fig.savefig(path)
    plt.close(fig)
    return True


LABEL_OFFSETS = [(4, 3), (4, -11), (-4, 3), (-4, -11), (4, 12), (-4, 12)]  # points; negative x: right-aligned


def place_labels(fig, ax, items) -> tuple[list, int]:
    """Annotate (text, x, y, bold) in order at the first offset whose box stays inside the axes and overlaps no
    placed label; returns the placed annotations and how many found no free spot."""
    renderer = fig.canvas.get_renderer()
    frame = ax.get_window_extent(renderer)
    placed, boxes, hidden = [], [], 0
    for text, x, y, bold in items:
        for dx, dy in LABEL_OFFSETS:
            a = ax.annotate(text, (x, y), xytext=(dx, dy), textcoords="offset points", fontsize=8,
                            ha="left" if dx >= 0 else "right", fontweight="bold" if bold else "normal")
            box = a.get_window_extent(renderer).expanded(1.02, 1.1)
            inside = frame.x0 <= box.x0 and box.x1 <= frame.x1 and frame.y0 <= box.y0 and box.y1 <= frame.y1
            if inside and not any(box.overlaps(b) for b in boxes):
                placed.append(a)
                boxes.append(box)
                break
            a.remove()
        else:
            hidden += 1
    return placed, hidden


def plot_bars(rows: list[dict], path: Path, title: str) -> bool:
    ok = [r for r in rows if r["status"] == "ok"]
    if not ok:
        return False
    plt = _plt()
    gpu = all((r.get("memory") or {}).get("gpu") for r in ok)
    mk = ("after_load_gb", "peak_gb") if gpu else ("host_after_load_gb", "host_peak_rss_gb")
    unit = "GB" if gpu else "GB host RSS"
    labels = [f"{r['scenario']} ({r['steps']} st)" for r in ok]
    panels = [(f"memory after load ({unit})", [_g(r, "memory", mk[0]) for r in ok]),
              (f"peak memory while generating ({unit})", [_g(r, "memory", mk[1]) for r in ok]),
              ("warm end-to-end latency (s, median)", [_g(r, "warm", "total_s_median") or _g(r, "cold", "total_s")
                                                       for r in ok])]
    fig, axes = plt.subplots(1, 3, figsize=(15, 0.35 * len(ok) + 1.8), dpi=100, sharey=True)
    for ax, (name, vals) in zip(axes, panels):
        ax.barh(range(len(ok)), [v or 0 for v in vals], color="#4c78a8")
        for j, v in enumerate(vals):
            ax.text(v or 0, j, f" {v:.2f}" if v is not None else " -", va="center", fontsize=7)
        ax.set_title(name, fontsize=9)
        ax.grid(axis="x", alpha=0.3)
    axes[0].set_yticks(range(len(ok)), labels, fontsize=8)
    axes[0].invert_yaxis()
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


def _caption(r: dict) -> list[str]:
    f = r.get("fidelity") or {}
    psnr = "inf" if f.get("images_identical") else ("-" if f.get("psnr_db") is None else f"{f['psnr_db']:.1f}")
    if f.get("ssim") is None:
        nums = ["no fidelity", ""]
    else:
        nums = [f"PSNR {psnr}  SSIM {f['ssim']:.3f}", f"latent rel. err {f['latent_rel_l2']:.3g}"]
    return [r["scenario"][:32], f"{r['steps']} steps{' (reference)' if r.get('role') == 'reference' else ''}", *nums]


def image_grid(items: list[tuple[dict, Path]], path: Path, title: str, thumb: int = 192) -> None:
    """A grid of thumbnails with captions; thumbnails shrink until the PNG is under GRID_MAX_BYTES."""
    from PIL import Image, ImageDraw, ImageFont

    thumb = min(thumb, max(max(Image.open(p).size) for _, p in items))  # never upscale
    while True:
        font = ImageFont.load_default(size=max(9, thumb // 16))
        line = font.size + 3
        cols = min(6, len(items))
        rows_n = -(-len(items) // cols)
        text_w = max(font.getlength(t) for r, _ in items for t in _caption(r))
        cell_w, cell_h = int(max(thumb, text_w)) + 10, thumb + 4 * line + 10
        grid = Image.new("RGB", (cols * cell_w, rows_n * cell_h + 2 * line), "white")
        draw = ImageDraw.Draw(grid)
        draw.text((4, 2), title[:160], fill="black", font=font)
        for k, (r, p) in enumerate(items):
            im = Image.open(p).convert("RGB")
            im.thumbnail((thumb, thumb))
            x, y = (k % cols) * cell_w + 4, (k // cols) * cell_h + 2 * line
            grid.paste(im, (x, y))
            for j, text in enumerate(_caption(r)):
                draw.text((x, y + im.height + 2 + j * line), text, fill="black", font=font)
        buf = io.BytesIO()
        grid.save(buf, format="PNG", optimize=True)
        if buf.tell() < GRID_MAX_BYTES or thumb <= 48:
            path.write_bytes(buf.getvalue())
            return
        thumb = int(thumb * 0.8)


# ----------------------------------------------------------------------------------------------------------
# HTML


def data_uri(path_or_bytes, mime="image/png") -> str:
    raw = path_or_bytes if isinstance(path_or_bytes, bytes) else Path(path_or_bytes).read_bytes()
    return f"data:{mime};base64,{base64.b64encode(raw).decode()}"


def _thumb_uri(p: Path, size: int) -> str:
    from PIL import Image

    im = Image.open(p).convert("RGB")
    im.thumbnail((size, size))
    buf = io.BytesIO()
    im.save(buf, format="PNG", optimize=True)
    return data_uri(buf.getvalue())


def _json_script(obj) -> str:
    # inside <script>: "</" would end the element
    return json.dumps(obj, allow_nan=False).replace("</", "<\\/")


def provenance(rows: list[dict]) -> dict:
    """Which weights, devices and library versions the rows come from (every report says so)."""
    weights, devices, versions = {}, {}, {}
    for r in rows:
        w = r.get("weights") or {}
        desc = {"random": f"random stand-in (seed {w.get('seed', 0)}): the real architecture with seeded random "
                          "weights; memory and latency are the real model's, fidelity is numerical error vs bf16, "
                          "images are noise",
                "hub": f"real weights from the hub ({w.get('path', '')})",
                "dir": f"weights from {w.get('path', '')}"}.get(w.get("kind"), json.dumps(w))
        weights.setdefault(f"{r['model']}: {desc}", []).append(r["scenario"])
        d = r.get("device") or {}
        if d:
            devices.setdefault(d.get("name") or f"{d.get('type')} ({d.get('cpu', '')})", 0)
            devices[d.get("name") or f"{d.get('type')} ({d.get('cpu', '')})"] += 1
        if r.get("versions"):
            versions.setdefault(json.dumps(r["versions"], sort_keys=True), []).append(r["scenario"])
    return {"weights": weights, "devices": devices,
            "versions": [json.loads(v) for v in versions]}


CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:1.5em;color:#222}h1{font-size:1.4em}h2{font-size:1.15em;margin-top:1.6em}
table{border-collapse:collapse;font-size:12px}th,td{border:1px solid #ccc;padding:3px 6px;white-space:nowrap}
th{background:#f0f0f0;cursor:pointer;position:sticky;top:0}th.sorted{background:#dde8f5}
td.num{text-align:right;font-variant-numeric:tabular-nums}tr.err td{background:#fff0f0}
tr.skip td{background:#f6f6f6;color:#777}
td.err{white-space:normal;max-width:40em;font-size:11px}.wrap{overflow:auto;max-height:80vh}
.note{color:#555;font-size:12px}#tip{position:fixed;display:none;background:#fff;border:1px solid #888;padding:6px;
font-size:12px;pointer-events:none;max-width:36em;box-shadow:2px 2px 6px #0003}img.plot{max-width:100%}
code{background:#f4f4f4;padding:0 3px}
"""

TABLE_JS = """
const rows = JSON.parse(document.getElementById('rows').textContent);
const cols = JSON.parse(document.getElementById('cols').textContent);
const fmt = (v, d) => v === null || v === undefined ? '' : (d === null ? String(v) :
  (v === 'inf' ? '\\u221e' : Number(v).toFixed(d)));
let sortKey = null, sortDir = 1;
function renderTable() {
  const t = document.getElementById('summary');
  const arrow = k => k === sortKey ? (sortDir > 0 ? ' \\u25b2' : ' \\u25bc') : '';
  let h = '<thead><tr>' + cols.map(c => `<th data-k="${c[0]}" class="${c[0] === sortKey ? 'sorted' : ''}">` +
    esc(c[1]) + arrow(c[0]) + '</th>').join('') + '</tr></thead><tbody>';
  const rs = rows.slice();
  if (sortKey) rs.sort((a, b) => cmp(a[sortKey], b[sortKey], sortDir));
  for (const r of rs) {
    const cls = c => c[2] === null ? (c[0] === 'error' ? 'err' : '') : 'num';
    h += `<tr class="${r.status === 'ok' ? '' : (r.status === 'skipped' ? 'skip' : 'err')}">` +
      cols.map(c => `<td class="${cls(c)}">${esc(fmt(r[c[0]], c[2]))}</td>`).join('') + '</tr>';
  }
  t.innerHTML = h + '</tbody>';
  t.querySelectorAll('th').forEach(th => th.onclick = () => {
    sortDir = sortKey === th.dataset.k ? -sortDir : 1; sortKey = th.dataset.k; renderTable(); });
}
function cmp(a, b, dir) {  // blanks last either way, numbers numerically, 'inf' above every number
  const blank = v => v === null || v === undefined || v === '';
  if (blank(a) || blank(b)) return blank(a) - blank(b);
  const na = a === 'inf' ? Infinity : a, nb = b === 'inf' ? Infinity : b;
  if (typeof na === 'number' && typeof nb === 'number') return na === nb ? 0 : (na < nb ? -dir : dir);
  return String(a).localeCompare(String(b)) * dir;
}
const ENT = {'&': '&amp;', '<': '&lt;', '>': '&gt;', '"': '&quot;'};
function esc(s) { return String(s).replace(/[&<>"]/g, c => ENT[c]); }
renderTable();
"""

CHART_JS = """
const W = 860, H = 480, M = {l: 70, r: 20, t: 20, b: 50};
function pareto(pts) {  // lower is better on both axes
  const s = pts.slice().sort((a, b) => a.x - b.x || a.y - b.y); const f = []; let best = Infinity;
  for (const p of s) if (p.y < best) { f.push(p); best = p.y; }
  return f;
}
function drawChart() {
  const xk = document.getElementById('xk').value, yk = document.getElementById('yk').value;
  const logx = document.getElementById('logx').checked;
  const pts = rows.filter(r => r.status === 'ok' && r[xk] != null && r[yk] != null && (!logx || r[xk] > 0))
    .map(r => ({x: r[xk], y: r[yk], r}));
  const box = document.getElementById('chart');
  if (!pts.length) { box.innerHTML = '<p class="note">no measured rows for these axes</p>'; return; }
  const tx = v => logx ? Math.log10(v) : v;
  let x0 = Math.min(...pts.map(p => tx(p.x))), x1 = Math.max(...pts.map(p => tx(p.x)));
  let y0 = 0, y1 = Math.max(...pts.map(p => p.y)) * 1.08 || 1;
  const pad = (x1 - x0) * 0.08 || 0.5; x0 -= pad; x1 += pad;
  const sx = v => M.l + (tx(v) - x0) / (x1 - x0) * (W - M.l - M.r);
  const sy = v => H - M.b - (v - y0) / (y1 - y0) * (H - M.t - M.b);
  const front = pareto(pts), onFront = new Set(front);
  let s = `<svg width="${W}" height="${H}" viewBox="0 0 ${W} ${H}" style="font:11px sans-serif">`;
  for (let i = 0; i <= 5; i++) {  // grid and tick labels
    const yv = y0 + (y1 - y0) * i / 5, xv = x0 + (x1 - x0) * i / 5, xl = logx ? Math.pow(10, xv) : xv;
    s += `<line x1="${M.l}" x2="${W - M.r}" y1="${sy(yv)}" y2="${sy(yv)}" stroke="#eee"/>` +
      `<text x="${M.l - 6}" y="${sy(yv) + 4}" text-anchor="end">${yv.toFixed(1)}</text>`;
    const px = M.l + (xv - x0) / (x1 - x0) * (W - M.l - M.r);
    s += `<line x1="${px}" x2="${px}" y1="${M.t}" y2="${H - M.b}" stroke="#eee"/>` +
      `<text x="${px}" y="${H - M.b + 16}" text-anchor="middle">${xl.toPrecision(2)}</text>`;
  }
  s += `<text x="${(W + M.l) / 2}" y="${H - 10}" text-anchor="middle">${esc(label(xk))}${logx ? ' (log)' : ''}</text>` +
    `<text transform="translate(16,${(H - M.b) / 2}) rotate(-90)" text-anchor="middle">${esc(label(yk))}</text>`;
  let path = '';
  front.forEach((p, i) => { path += (i ? ` H${sx(p.x)} V${sy(p.y)}` : `M${sx(p.x)} ${sy(p.y)}`); });
  s += `<path d="${path}" fill="none" stroke="#d62728" stroke-width="1.5"/>`;
  pts.forEach((p, i) => {
    const f = onFront.has(p);
    s += `<circle data-i="${i}" cx="${sx(p.x)}" cy="${sy(p.y)}" r="${f ? 7 : 5}" fill="${f ? '#d62728' : '#1f77b4'}" ` +
      `fill-opacity="0.8" stroke="#fff"/><text x="${sx(p.x) + 8}" y="${sy(p.y) - 6}" ` +
      `font-weight="${f ? 'bold' : 'normal'}">${esc(p.r.scenario)}</text>`;
  });
  box.innerHTML = s + '</svg>';
  const tip = document.getElementById('tip');
  box.querySelectorAll('circle').forEach(c => {
    c.onmousemove = e => { const p = pts[c.dataset.i], r = p.r;
      tip.innerHTML = `<b>${esc(r.scenario)}</b>${onFront.has(p) ? ' (Pareto front)' : ''}` +
        `<br><code>${esc(r.recipe_full)}</code><br>${esc(label(xk))}: ${fmt(p.x, 4)}` +
        `<br>${esc(label(yk))}: ${fmt(p.y, 2)}<br>steps ${r.steps}, PSNR ${fmt(r.psnr_db, 1)}, SSIM ${fmt(r.ssim, 3)}`;
      tip.style.display = 'block'; tip.style.left = (e.clientX + 14) + 'px'; tip.style.top = (e.clientY + 10) + 'px'; };
    c.onmouseleave = () => tip.style.display = 'none';
  });
}
const label = k => (cols.find(c => c[0] === k) || [k, k])[1];
['xk', 'yk', 'logx'].forEach(id => document.getElementById(id).onchange = drawChart);
drawChart();
"""

X_CHOICES = ("s_per_step", "warm_s", "cold_s", "denoise_s")
Y_CHOICES = ("peak_gb", "after_load_gb", "peak_reserved_gb", "peak_incl_load_gb", "host_peak_rss_gb", "weights_gb")


def table_data(rows: list[dict]) -> list[dict]:
    out = []
    for r in rows:
        d = {}
        for key, _, get, _ in COLUMNS:
            v = get(r)
            d[key] = "inf" if v == float("inf") else v
        d["recipe_full"] = r.get("recipe")
        out.append(d)
    return out


def _options(choices, selected) -> str:
    names = {c[0]: c[1] for c in COLUMNS}
    return "".join(f'<option value="{c}"{" selected" if c == selected else ""}>{html.escape(names[c])}</option>'
                   for c in choices)


def _provenance_html(prov: dict, sources: list[str], notes: list[str]) -> str:
    li = lambda items: "".join(f"<li>{x}</li>" for x in items)  # noqa: E731
    weights = li(f"<b>{html.escape(k)}</b> ({len(v)} rows)" for k, v in prov["weights"].items())
    devices = li(f"{html.escape(k)} ({n} rows)" for k, n in prov["devices"].items()) or "<li>unknown (no row ran)</li>"
    versions = li(html.escape(", ".join(f"{k} {v}" for k, v in vs.items())) for vs in prov["versions"]) or "<li>-</li>"
    return (f"<h2>Provenance</h2><p>Weights:</p><ul>{weights}</ul><p>Device:</p><ul>{devices}</ul>"
            f"<p>Versions:</p><ul>{versions}</ul><p class=note>results: {html.escape(', '.join(sources))}; generated "
            f"{time.strftime('%Y-%m-%d %H:%M:%S')}</p>"
            + (f"<ul class=note>{li(map(html.escape, notes))}</ul>" if notes else ""))


def index_html(rows, prov, sources, notes, pngs: dict[str, Path], title: str, front=None) -> str:
    cols = [[k, h, d] for k, h, _, d in COLUMNS]
    gpu = any((r.get("memory") or {}).get("gpu") for r in rows)
    imgs = "".join(f'<h2>{html.escape(cap)}</h2><img class="plot" alt="{html.escape(cap)}" src="{data_uri(p)}">'
                   for cap, p in pngs.items())
    n_ok = sum(r["status"] == "ok" for r in rows)
    reduced = [r["scenario"] for r in rows if r.get("steps_reduced")]
    reduced_note = (f"<br><b>Fewer steps than the file's default:</b> {html.escape(', '.join(reduced))} "
                    "(compare them by s/step)." if reduced else "")
    front = pareto_rows(rows) if front is None else front
    charted = [r for r in rows if not r["scenario"].startswith("reference:")] or rows
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>{CSS}</style></head><body>
<h1>{html.escape(title)}</h1>
<h2>Memory vs latency</h2>
<p>x <select id="xk">{_options(X_CHOICES, "s_per_step")}</select>
<label><input type="checkbox" id="logx" checked> log</label>
&nbsp; y <select id="yk">{_options(Y_CHOICES, "peak_gb" if gpu else "host_peak_rss_gb")}</select>
<span class="note">hover a point for its recipe; red = Pareto front (nothing is both faster and smaller)</span></p>
<div id="chart"></div><div id="tip"></div>
<h2>Pareto front: the recipes nothing beats on both memory and latency ({len(front)} of {n_ok} measured)</h2>
{pareto_html(front)}
<p class="note">{len(rows)} scenarios: {n_ok} measured, {len(rows) - n_ok} failed or skipped (their error is in the
summary below).{" " + html.escape(notes[0]) if notes else ""}</p>
<h2>Summary (click a header to sort)</h2>
<p>Latency: cold = first run (includes compilation); warm = median / p90 over the following runs.
Fidelity: PSNR and SSIM of the decoded image, relative L2 error of the final latents, against the bf16 reference
(no offload, no compile) of the same model, size, steps, prompt and seed (mean over seeds; &infin; = identical image).
Peak = GPU memory allocated while generating; "peak incl. load" also covers loading, where random stand-ins are built
in bf16 before being quantized in memory.
{"" if gpu else "CPU runs: no GPU memory counters, the memory columns that exist are host RSS."}
{reduced_note}</p>
<div class="wrap"><table id="summary"></table></div>
{_provenance_html(prov, sources, notes[1:])}
{imgs}
<p class="note">The blind test is in blind.html beside this file. The charts leave out the dedicated bf16 reference
runs ({len(rows) - len(charted)}); the summary keeps them.</p>
<script type="application/json" id="rows">{_json_script(table_data(rows))}</script>
<script type="application/json" id="cols">{_json_script(cols)}</script>
<script>{TABLE_JS}{CHART_JS}</script></body></html>"""


BLIND_JS = """
const cards = JSON.parse(document.getElementById('cards').textContent);
for (let i = cards.length - 1; i > 0; i--) {  // Fisher-Yates: a new order on every load
  const j = Math.floor(Math.random() * (i + 1)); [cards[i], cards[j]] = [cards[j], cards[i]];
}
const box = document.getElementById('cards-box');
cards.forEach((c, i) => {
  const d = document.createElement('div'); d.className = 'card';
  d.innerHTML = `<img src="${c.src}" alt="image ${i + 1}">` +
    `<div class="who">image ${i + 1} &mdash; click to reveal</div>`;
  d.onclick = () => { d.classList.add('shown'); d.querySelector('.who').innerHTML = c.label; };
  box.appendChild(d);
});
document.getElementById('all').onclick = () => box.querySelectorAll('.card').forEach(d => d.click());
"""


def blind_html(title: str, items: list[tuple[dict, Path]], weights_note: str) -> str:
    cards = []
    for r, p in items:
        f = r.get("fidelity") or {}
        ref = " &mdash; the bf16 reference" if r.get("role") == "reference" else ""
        psnr = "&infin;" if f.get("images_identical") else f.get("psnr_db")
        nums = f"PSNR {psnr} dB, SSIM {f.get('ssim')}" if f.get("ssim") is not None else "no fidelity"
        cards.append({"src": _thumb_uri(p, BLIND_THUMB),
                      "label": f"<b>{html.escape(r['scenario'])}</b>{ref}<br><code>{html.escape(r['recipe'])}</code>"
                               f"<br>{nums}; {r['steps']} steps"})
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>Blind test</title><style>{CSS}
.card{{display:inline-block;margin:6px;padding:4px;border:1px solid #ccc;cursor:pointer;vertical-align:top;
width:{BLIND_THUMB}px}}.card img{{width:{BLIND_THUMB}px;display:block}}
.card .who{{font-size:11px;margin-top:3px;white-space:normal;word-break:break-all}}
.card.shown{{border-color:#d62728}}</style></head><body>
<h1>Spot the quantized image</h1><p>{html.escape(title)}. {len(items)} images in random order (reload to reshuffle),
downscaled to {BLIND_THUMB}px. Click an image to see which recipe made it. <button id="all">reveal all</button></p>
<p class="note">{html.escape(weights_note)}</p><div id="cards-box"></div>
<script type="application/json" id="cards">{_json_script(cards)}</script><script>{BLIND_JS}</script></body></html>"""


# ----------------------------------------------------------------------------------------------------------
# command


# the columns of the Markdown summary (the HTML table has all of COLUMNS)
MARKDOWN_COLUMNS = ("scenario", "status", "recipe", "steps", "load_s", "after_load_gb", "peak_gb", "peak_reserved_gb",
                    "host_peak_rss_gb", "compile_s", "warm_s", "s_per_step", "psnr_db", "ssim", "latent_rel_l2")


def _cell(value, decimals) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if value == float("inf"):
            return "inf"
        return f"{value:.{decimals}f}" if decimals is not None else f"{value:g}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def markdown_table(rows: list[dict], columns=MARKDOWN_COLUMNS) -> str:
    """A Markdown table of the main columns, one line per row; failed rows keep their reason in the status."""
    cols = [c for c in COLUMNS if c[0] in columns]
    lines = ["| " + " | ".join(h for _, h, _, _ in cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        cells = []
        for key, _, get, dec in cols:
            try:
                v = get(r)
            except (KeyError, TypeError):
                v = None
            if key == "status" and r["status"] != "ok":
                v = f"{v}: {(r.get('error') or '')[:120]}"
            if key == "recipe" and v:
                v = f"`{v}`"
            cells.append(_cell(v, dec))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def make_stream_report(stream_rows: list[dict], out: Path, notes: list[str]) -> dict:
    """A report of offload=stream rows alone (device_stream.py's stream.jsonl): the sweep table and chart."""
    from . import stream_report

    table = stream_report.sweep_table(stream_rows)
    devices = sorted({(r.get("device") or {}).get("name") or (r.get("device") or {}).get("type")
                      for r in stream_rows if r.get("device")})
    model = "flux-tiny" if any(r.get("smoke") for r in stream_rows) else "flux-dev"
    title = f"vramfit offload=stream: {model} (random weights) on {', '.join(devices) or 'no device'}"
    png = out / "stream_sweep.png"
    drawn = stream_report.plot_sweep(table, png, title)
    body = stream_report.section_html(table, data_uri(png) if drawn else None) or (
        "<p>No sweep rows measured in these files (every sweep row failed, was skipped or left out).</p>")
    (out / "index.html").write_text(f"<!doctype html><html><head><meta charset=\"utf-8\"><title>{html.escape(title)}"
                                    f"</title><style>{CSS}</style></head><body><h1>{html.escape(title)}</h1>{body}"
                                    + "".join(f"<p class=note>{html.escape(n)}</p>" for n in notes) + "</body></html>")
    (out / "results.md").write_text(f"# {title}\n\n" + (stream_report.markdown(table) or "No sweep rows.\n"))
    files = ["index.html", "results.md"] + (["stream_sweep.png"] if drawn else [])
    return {"schema": "vramfit.report/1", "out": str(out), "rows": len(stream_rows), "ok": len(table), "files": files}


def make_report(paths: list[Path], out: Path) -> dict:
    from . import stream_report

    stream_rows: list[dict] = []
    rows, notes = load(paths, stream_rows)
    out.mkdir(parents=True, exist_ok=True)
    if not rows:
        return make_stream_report(stream_rows, out, notes)
    prov = provenance(rows)
    devices = ", ".join(prov["devices"]) or "no device"
    models = ", ".join(sorted({f"{r['model']} ({(r.get('weights') or {}).get('kind')} weights)" for r in rows}))
    title = f"vramfit bench: {models} on {devices}"
    written, pngs = [], {}
    ok = [r for r in rows if r["status"] == "ok"]
    # dedicated bf16 reference runs (cold only) repeat the bf16 row: the table keeps them, the charts do not
    charted = [r for r in rows if not r["scenario"].startswith("reference:")] or rows
    if plot_memory_latency([r for r in charted if r["status"] == "ok"], out / "memory_latency.png", title):
        pngs["Memory vs latency (Pareto front in red)"] = out / "memory_latency.png"
    if plot_bars(charted, out / "bars.png", title):
        pngs["Memory after load, peak memory and latency per recipe"] = out / "bars.png"
    groups = image_groups(rows)
    for k, (gtitle, items) in enumerate(groups):
        name = "grid.png" if k == 0 else f"grid-{k + 1}.png"
        image_grid(items, out / name, gtitle)
        pngs[f"Images: {gtitle}"] = out / name
    front = pareto_rows([r for r in charted])
    page = index_html(rows, prov, [str(p) for p in paths], notes, pngs, title, front)
    sweep = stream_report.sweep_table(stream_rows)
    if sweep:  # device_stream.py rows given beside the bench rows: the budget sweep as its own section
        drawn = stream_report.plot_sweep(sweep, out / "stream_sweep.png", title)
        if drawn:
            pngs["offload=stream budget sweep"] = out / "stream_sweep.png"
        page = page.replace("</body></html>", stream_report.section_html(
            sweep, data_uri(out / "stream_sweep.png") if drawn else None) + "</body></html>")
    (out / "index.html").write_text(page)
    random_weights = any((r.get("weights") or {}).get("kind") == "random" for r in rows)
    note = ("Random stand-in weights: these images are noise; differences are numerical error, not visual quality."
            if random_weights else "Real weights.")
    blind_title = groups[0][0] if groups else "no images (no scenario finished)"
    (out / "blind.html").write_text(blind_html(blind_title, groups[0][1] if groups else [], note))
    md_notes = "".join(f"\n{n}\n" for n in notes)
    (out / "results.md").write_text(f"# {title}\n\n## Pareto front (memory vs latency)\n\n"
                                    f"{markdown_table(front, [c[0] for c in _pareto_cols(front)])}\n"
                                    f"## All rows\n{md_notes}\n{markdown_table(rows)}"
                                    + (f"\n{stream_report.markdown(sweep)}" if sweep else ""))
    written = ["index.html", "blind.html", "results.md", *(p.name for p in pngs.values())]
    return {"schema": "vramfit.report/1", "out": str(out), "rows": len(rows), "ok": len(ok), "files": written}


def cmd_report(args) -> int:
    summary = make_report([Path(p) for p in args.results], Path(args.out))
    print(f"wrote {', '.join(summary['files'])} to {summary['out']} ({summary['rows']} rows, {summary['ok']} ok)")
    print(json.dumps(summary))
    return 0


def add_parser(sub) -> None:
    r = sub.add_parser("report", help="HTML + PNG report (offline) of bench results: table, charts, grids, blind test")
    r.add_argument("results", nargs="+", help="DIR/results.jsonl written by vramfit bench (several are merged), and/or "
                   "stream.jsonl from benchmarks/device_stream.py (the offload=stream budget sweep section)")
    r.add_argument("--out", required=True, help="report directory (index.html, blind.html, PNGs)")
    r.set_defaults(func=cmd_report)
