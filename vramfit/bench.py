"""``vramfit bench``: every recipe of a scenario file measured side by side, one fresh process per scenario.

Scenarios are data (TOML, see ``vramfit/scenarios/``). The parent process stays light (no torch): it parses the
files, plans the bf16 reference runs, starts ``python -m vramfit.bench --one JOB`` per scenario, enforces the
timeout, and appends one row per scenario to ``DIR/results.jsonl`` as soon as it finishes (one O_APPEND write +
fsync; a torn last line left by a kill is moved aside and reported, never parsed). Every other file (the child's
row, reference tensors, images) is written whole or not at all (temp file + fsync + rename), so a kill at any
moment leaves a readable results file and a run that ``--resume`` can continue. A scenario that fails is a row with its error and exit reason, never
a missing row.

Per scenario the child loads once (load time, memory after load), runs once cold (includes compilation, reported
separately), then ``repeats`` warm runs (median and p90 per stage), and scores each seed's image and final
latents against the bf16 reference of the same model/size/steps/prompt/seed: PSNR and SSIM of the decoded images
(scikit-image), relative L2 error of the latents. The reference is bf16, no offload, no compile, computed once
per key and kept in ``DIR/reference/`` (latents ``.pt`` + PNG + a size/hash record written last); a scenario whose recipe *is* the reference recipe
produces it, otherwise a dedicated reference run is added.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import tomllib
from dataclasses import asdict, dataclass, field, replace
from importlib import resources
from pathlib import Path

from .errors import InputError, RecipeError

ROW_SCHEMA = "vramfit.bench/1"
SUMMARY_SCHEMA = "vramfit.bench-summary/1"
RESULTS = "results.jsonl"
SCENARIO_KEYS = ("name", "recipe", "model", "weights", "weights_seed", "size", "sizes", "steps", "seeds", "repeats",
                 "prompt", "guidance", "gguf", "skip", "timeout", "tags", "note", "est_s")
DEFAULT_PROMPT = "a red fox in the snow, photograph"


# ----------------------------------------------------------------------------------------------------------
# scenario files


@dataclass
class Scenario:
    name: str
    recipe: str  # as written in the file
    expanded: str  # the canonical recipe string (what every row records)
    model: str
    weights: str  # random | hub | a local directory
    weights_seed: int
    height: int
    width: int
    steps: int
    steps_default: int  # the file's (or model's) step count: rows say when a scenario ran fewer
    seeds: list[int]
    repeats: int  # warm runs after the cold one
    prompt: str
    guidance: float | None
    gguf: str | None = None
    skip: str | None = None  # a reason: the scenario becomes a "skipped" row without running
    timeout: float | None = None
    tags: list[str] = field(default_factory=list)
    note: str = ""
    est_s: float | None = None  # estimated seconds on the GPU the file was written for (planning only)
    source: str = ""
    role: str = "scenario"  # or "reference"
    # another scenario of the same out dir to score against as well (``fidelity_vs``), beside the bf16 reference:
    # a step cache against the uncached run of the same recipe (run before this one; after it: fidelity_vs_files)
    compare_to: str | None = None
    profile: bool = False  # one more warm run under torch.profiler: kernel time per step by class ("breakdown")

    @property
    def ref_key(self) -> str:
        """Which bf16 reference this scenario is scored against (everything that changes the output but the
        recipe)."""
        ident = json.dumps([self.model, self.weights, self.weights_seed, self.height, self.width, self.steps,
                            self.guidance, self.prompt])
        return (f"{self.model}-{self.height}x{self.width}-{self.steps}steps-"
                f"{hashlib.sha1(ident.encode()).hexdigest()[:8]}")

    @property
    def is_reference_recipe(self) -> bool:
        from .recipe import Recipe

        return self.expanded == str(Recipe()) and self.gguf is None


def resolve_scenario_file(arg: str) -> Path:
    """A shipped scenario name (``smoke``, ``seeds``) or a path to a TOML file."""
    p = Path(arg)
    if p.suffix == ".toml" or os.sep in arg:
        if not p.is_file():
            raise InputError(f"scenario file {arg!r}: no such file")
        return p
    shipped = resources.files("vramfit") / "scenarios" / f"{arg}.toml"
    if not shipped.is_file():
        raise InputError(f"unknown scenario {arg!r}; shipped: {', '.join(shipped_scenarios())}, or give a .toml path")
    return Path(str(shipped))


def shipped_scenarios() -> list[str]:
    d = resources.files("vramfit") / "scenarios"
    return sorted(f.name[:-5] for f in d.iterdir() if f.name.endswith(".toml"))


def load_scenarios(path: Path) -> list[Scenario]:
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise InputError(f"{path}: not valid TOML: {e}")
    unknown = set(data) - {"description", "defaults", "scenario"}
    if unknown:
        raise InputError(f"{path}: unknown top-level keys {sorted(unknown)}; use description, [defaults], [[scenario]]")
    defaults = data.get("defaults", {})
    entries = data.get("scenario", [])
    if not entries:
        raise InputError(f"{path}: no [[scenario]] entries")
    out = []
    for i, entry in enumerate(entries):
        merged = {**defaults, **entry}
        where = f"{path}: scenario {entry.get('name', i + 1)!r}"
        bad = set(merged) - set(SCENARIO_KEYS)
        if bad:
            raise InputError(f"{where}: unknown keys {sorted(bad)}; valid keys: {', '.join(SCENARIO_KEYS)}")
        for key in ("name", "recipe"):
            if not isinstance(entry.get(key), str):
                raise InputError(f"{where}: needs {key} = \"...\"")
        out += _expand(merged, defaults, where, str(path))
    names = [s.name for s in out]
    dup = {n for n in names if names.count(n) > 1}
    if dup:
        raise InputError(f"{path}: scenario names must be unique; repeated: {', '.join(sorted(dup))}")
    return out


def _expand(m: dict, defaults: dict, where: str, source: str) -> list[Scenario]:
    """One scenario per size (``sizes = ["1024x1024", "768x1360"]`` gives two, named ``name@HxW``)."""
    from . import models
    from .recipe import Recipe

    try:
        spec = models.get_model(m.get("model", "flux-dev"))
        weights = m.get("weights", "random")
        models.resolve_weights(spec, weights, seed=int(m.get("weights_seed", 0)))
        expanded = str(Recipe.parse(m["recipe"]))
    except (InputError, RecipeError) as e:
        raise InputError(f"{where}: {e}")
    sizes = m.get("sizes", [m.get("size", spec.default_size)])
    sizes = [_size(s, where) for s in (sizes if isinstance(sizes, list) else [sizes])]
    steps_default = int(defaults.get("steps", spec.default_steps))
    seeds = m.get("seeds", [0])
    seeds = seeds if isinstance(seeds, list) else [seeds]
    if not seeds or not all(isinstance(s, int) for s in seeds):
        raise InputError(f"{where}: seeds must be a list of integers")
    if m.get("gguf") and not Path(m["gguf"]).is_file():
        raise InputError(f"{where}: gguf = {m['gguf']!r}: no such file")
    base = Scenario(
        name=m["name"], recipe=m["recipe"], expanded=expanded, model=spec.name, weights=weights,
        weights_seed=int(m.get("weights_seed", 0)), height=0, width=0, steps=int(m.get("steps", steps_default)),
        steps_default=steps_default, seeds=seeds, repeats=int(m.get("repeats", 2)),
        prompt=m.get("prompt", DEFAULT_PROMPT), guidance=m.get("guidance"), gguf=m.get("gguf"), skip=m.get("skip"),
        timeout=m.get("timeout"), tags=list(m.get("tags", [])), note=m.get("note", ""), est_s=m.get("est_s"),
        source=source,
    )
    if base.steps < 1 or base.repeats < 0:
        raise InputError(f"{where}: steps must be >= 1 and repeats >= 0")
    from .run import request_for

    try:  # the same checks as `vramfit generate` (sizes within the model's maximum, finite numbers, seeds)
        for h, w in sizes:
            for seed in seeds:
                request_for(spec, base.prompt, base.steps, h, w, base.guidance, seed).validate(spec)
    except InputError as e:
        raise InputError(f"{where}: {e}") from None
    return [replace(base, height=h, width=w, name=base.name if len(sizes) == 1 else f"{base.name}@{h}x{w}")
            for h, w in sizes]


def _size(s, where: str) -> tuple[int, int]:
    if isinstance(s, int):
        return s, s
    mt = re.fullmatch(r"(\d+)x(\d+)", str(s))
    if not mt:
        raise InputError(f"{where}: size {s!r}: write HEIGHTxWIDTH, e.g. \"1024x1024\"")
    return int(mt[1]), int(mt[2])


def select(scenarios: list[Scenario], only: str | None, skip: str | None) -> list[Scenario]:
    """``--only``/``--skip``: comma-separated glob patterns matched against scenario names and tags."""
    def hit(s: Scenario, patterns: str) -> bool:
        pats = [p.strip() for p in patterns.split(",") if p.strip()]
        return any(fnmatch.fnmatchcase(x, p) for p in pats for x in [s.name, *s.tags])

    chosen = [s for s in scenarios if (not only or hit(s, only)) and not (skip and hit(s, skip))]
    if not chosen:
        raise InputError(f"no scenario matches --only {only!r} / --skip {skip!r}")
    return chosen


# ----------------------------------------------------------------------------------------------------------
# planning: which scenario produces which reference


def plan(scenarios: list[Scenario], out: Path, on_bad_reference=None) -> list[Scenario]:
    """Order the runs so each reference exists before the scenarios scored against it.

    Scenarios are grouped by reference key (in order of first appearance). A group whose reference files are not
    in ``out`` yet (or whose files fail their size/hash record: cut short by a kill) starts with its producer: the group's own bf16 scenario if it has one (seeds widened to the
    group's), else a dedicated ``reference`` run.
    """
    groups: dict[str, list[Scenario]] = {}
    for s in scenarios:
        groups.setdefault(s.ref_key, []).append(s)
    ordered = []
    for key, group in groups.items():
        live = [s for s in group if not s.skip]
        seeds = list(dict.fromkeys(x for s in live for x in s.seeds))
        bad = {seed: reference_problem(out, key, seed) for seed in seeds}
        bad = {seed: why for seed, why in bad.items() if why}
        if live and bad:
            if on_bad_reference is not None:
                for seed, why in bad.items():
                    if why != "missing":
                        on_bad_reference(key, seed, why)
            producer = next((s for s in live if s.is_reference_recipe), None)
            if producer is None:
                producer = replace(live[0], name=f"reference:{key}", recipe="bf16", expanded=_default_recipe(),
                                   gguf=None, repeats=0, timeout=None, tags=["reference"], est_s=None,
                                   note="bf16, offload none, no compile: the fidelity reference")
            else:
                group = [s for s in group if s is not producer]
            ordered.append(replace(producer, seeds=seeds, role="reference"))
        ordered += group
    return ordered


def _default_recipe() -> str:
    from .recipe import Recipe

    return str(Recipe())


def ref_paths(out: Path, key: str, seed: int) -> tuple[Path, Path]:
    base = out / "reference" / f"{key}-s{seed}"
    return base.with_suffix(".pt"), base.with_suffix(".png")


def ref_record_path(out: Path, key: str, seed: int) -> Path:
    return out / "reference" / f"{key}-s{seed}.json"


def write_reference(out: Path, key: str, seed: int, latents, image) -> None:
    """Latents and PNG, each written atomically, then a record of their sizes and hashes: the record is written
    last, so a reference without a matching record was cut short and ``--resume`` makes it again."""
    lat_path, png_path = ref_paths(out, key, seed)
    lat_path.parent.mkdir(parents=True, exist_ok=True)
    files = {}
    for path, data in ((lat_path, _tensor_bytes(latents)), (png_path, _png_bytes(image))):
        write_atomic(path, data)
        files[path.name] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    write_atomic(ref_record_path(out, key, seed), json.dumps({"key": key, "seed": seed, "files": files}).encode())


def reference_problem(out: Path, key: str, seed: int) -> str | None:
    """None when the reference of (key, seed) is complete and unchanged since it was written; else why not."""
    rec_path = ref_record_path(out, key, seed)
    if not rec_path.exists():
        return "missing" if not ref_paths(out, key, seed)[0].exists() else "no completion record (cut short)"
    try:
        files = json.loads(rec_path.read_text())["files"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return f"unreadable record {rec_path.name}"
    for path in ref_paths(out, key, seed):
        want = files.get(path.name)
        if want is None or not path.exists():
            return f"{path.name} missing"
        data = path.read_bytes()
        if len(data) != want["bytes"] or hashlib.sha256(data).hexdigest() != want["sha256"]:
            return f"{path.name}: {len(data)} bytes, recorded {want['bytes']} (size or hash differs)"
    return None


def safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_")


# ----------------------------------------------------------------------------------------------------------
# the parent: one fresh process per scenario, rows appended as they finish


def run_bench(files: list[str], out: Path, device: str, only=None, skip=None, max_seconds=None,
              resume=False, dry_run=False) -> int:
    scenarios = [s for f in files for s in load_scenarios(resolve_scenario_file(f))]
    names = [s.name for s in scenarios]
    if len(set(names)) != len(names):
        raise InputError("scenario names repeat across the given files; rename one")
    scenarios = select(scenarios, only, skip)
    results = out / RESULTS
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out}: exists and is not a directory")
    notes: list[str] = []
    done = _finished_names(results, notes) if resume else set()
    todo = plan([s for s in scenarios if s.name not in done], out, on_bad_reference=lambda key, seed, why: notes.append(
        f"reference {key} seed {seed}: {why}; it is made again"))
    if dry_run:
        return _print_plan(todo, done)
    out.mkdir(parents=True, exist_ok=True)
    (out / "logs").mkdir(exist_ok=True)
    t0 = time.time()
    print(f"vramfit bench: {len(todo)} runs -> {results} (device {device}"
          f"{', ' + str(len(done)) + ' already done' if done else ''})", flush=True)
    for note in notes:
        print(f"vramfit bench: {note}", flush=True)
    print(table_header(), flush=True)
    rows, code = [], 0

    def append(row):
        note = append_row(results, row)
        if note:
            print(f"vramfit bench: {note}", flush=True)
            notes.append(note)

    started = time.time()
    try:
        for s in todo:
            _check_stop()
            started = time.time()
            row = skipped_row(s) if s.skip else run_scenario(s, out, device, s.timeout or max_seconds)
            append(row)
            rows.append(row)
            print(table_line(row), flush=True)
    except (SystemExit, KeyboardInterrupt) as stop:
        # stopped from outside (a device call's time budget): say so in rows instead of leaving them out
        code = stop.code if isinstance(stop, SystemExit) and isinstance(stop.code, int) else 130
        for j, s in enumerate(todo[len(rows):]):
            if s.skip:
                row = skipped_row(s)
            else:
                row = {**base_row(s), "status": "error" if j == 0 else "skipped",
                       "exit_reason": "interrupted" if j == 0 else "not-run",
                       "error": f"bench stopped (exit {code}) " + ("while this scenario ran" if j == 0 else
                                                                  "before this scenario started")}
                if j == 0:  # how long it had run and where it was: a lower bound on what it needed
                    log = out / "logs" / f"{safe_name(s.name)}.log"
                    row.update(wall_s=round(time.time() - started, 1),
                               last_phase=last_phase(log.read_text(errors="replace")) if log.exists() else None)
            append(row)
            rows.append(row)
            print(table_line(row), flush=True)
    summary = {"schema": SUMMARY_SCHEMA, "results": str(results), "runs": len(rows),
               "ok": sum(r["status"] == "ok" for r in rows), "error": sum(r["status"] == "error" for r in rows),
               "skipped": sum(r["status"] == "skipped" for r in rows),
               "exit_reasons": _count(r["exit_reason"] for r in rows if r["exit_reason"]),
               "resumed_past": sorted(done), "notes": notes, "wall_s": round(time.time() - t0, 1), "stopped": code != 0}
    print(json.dumps(summary), flush=True)
    return code


def _finished_names(results: Path, notes: list[str]) -> set[str]:
    if not results.exists():
        return set()
    rows = read_rows(results, on_torn=lambda n, text: notes.append(
        f"{results.name} line {n} does not parse (torn by a kill, {len(text)} chars): skipped"))
    return {r["scenario"] for r in rows if r.get("status") == "ok"}


def _count(items) -> dict:
    out: dict = {}
    for x in items:
        out[x] = out.get(x, 0) + 1
    return out


def _print_plan(todo: list[Scenario], done: set) -> int:
    print(f"{'run':<34} {'steps':>6} {'seeds':<8} {'rep':>3} {'est s':>6}  recipe")
    for s in todo:
        steps = f"{s.steps}{'*' if s.steps < s.steps_default else ''}"
        est = "skip" if s.skip else ("?" if s.est_s is None else f"{s.est_s:.0f}")
        print(f"{s.name:<34} {steps:>6} {','.join(map(str, s.seeds)):<8} {s.repeats:>3} {est:>6}  {s.recipe}")
    known = [s.est_s for s in todo if s.est_s is not None and not s.skip]
    unknown = [s.name for s in todo if s.est_s is None and not s.skip]
    print(f"estimated total: {sum(known):.0f} s for {len(known)} runs"
          + (f" + {len(unknown)} without an estimate ({', '.join(unknown)})" if unknown else "")
          + (f"; {len(done)} already done" if done else "") + "   (* = fewer steps than the file's default)")
    return 0


def read_rows(path: Path, on_torn=None) -> list[dict]:
    """Rows of a results file. A line that does not parse (the writer was killed mid-write: only the last line can
    be torn, see ``append_row``) is skipped and reported through ``on_torn(line_number, text)``."""
    rows = []
    for n, line in enumerate(Path(path).read_text(errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if on_torn is not None:
                on_torn(n, line)
    return rows


def append_row(path: Path, row: dict) -> str | None:
    """Append one row as one line, fsynced. A torn tail left by a writer killed mid-line is first moved to
    ``<results>.torn`` (kept, not lost) so the new row starts on its own line; returns a note saying so."""
    data = (json.dumps(finite(row), allow_nan=False) + "\n").encode()
    note = _repair_torn_tail(Path(path))
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        # one write() of the whole line with O_APPEND: a kill leaves either nothing or a prefix of this line
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)
    return note


def _repair_torn_tail(path: Path) -> str | None:
    if not path.exists() or path.stat().st_size == 0:
        return None
    with open(path, "r+b") as f:
        f.seek(-1, os.SEEK_END)
        if f.read(1) == b"\n":
            return None
        f.seek(0)
        data = f.read()
        cut = data.rfind(b"\n") + 1  # 0 when the torn line is the only one
        with open(path.with_name(path.name + ".torn"), "ab") as torn:
            torn.write(data[cut:] + b"\n")
            torn.flush()
            os.fsync(torn.fileno())
        f.truncate(cut)
        f.flush()
        os.fsync(f.fileno())
    return (f"{path.name}: its last line was torn ({len(data) - cut} bytes, a writer killed mid-write); "
            f"moved to {path.name}.torn")


def write_atomic(path: Path, data: bytes) -> None:
    """Write a whole file or nothing: temp file in the same folder, fsync, ``os.replace``, fsync the folder. A kill
    at any point leaves the old file (or none) and at most a ``.tmp`` file, never a half-written ``path``."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dfd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def _png_bytes(image) -> bytes:
    import io

    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def _tensor_bytes(t) -> bytes:
    import io

    import torch

    buf = io.BytesIO()
    torch.save(t, buf)
    return buf.getvalue()


def finite(x):
    """JSON has no NaN/inf (a NaN latent error from an fp16 overflow would make the row unreadable): None."""
    if isinstance(x, float) and (x != x or x in (float("inf"), float("-inf"))):
        return None
    if isinstance(x, dict):
        return {k: finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [finite(v) for v in x]
    return x


def base_row(s: Scenario) -> dict:
    return {
        "schema": ROW_SCHEMA, "scenario": s.name, "role": s.role, "tags": s.tags, "note": s.note,
        "source": s.source, "status": None, "exit_reason": None, "error": None,
        "model": s.model, "weights": {"kind": s.weights, "seed": s.weights_seed} if s.weights == "random"
        else {"kind": s.weights}, "recipe": s.expanded, "recipe_requested": s.recipe, "gguf": s.gguf,
        "request": {"prompt": s.prompt, "height": s.height, "width": s.width, "guidance": s.guidance,
                    "steps": s.steps, "seeds": s.seeds},
        "steps": s.steps, "steps_default": s.steps_default, "steps_reduced": s.steps < s.steps_default,
        "repeats": s.repeats, "reference_key": s.ref_key,
    }


def skipped_row(s: Scenario) -> dict:
    return {**base_row(s), "status": "skipped", "exit_reason": "skipped", "error": s.skip}


def _die_with_parent() -> None:
    """In the child: be killed when the bench process dies, even by SIGKILL (Linux prctl PR_SET_PDEATHSIG)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)
    except (OSError, AttributeError):
        pass


# the SIGTERM cmd_bench received (its handler raises SystemExit; a SystemExit raised while a finalizer runs is
# swallowed by Python, so the wait loop and the scenario loop also check this flag)
_STOP: dict = {"signum": None}


def _check_stop() -> None:
    if _STOP["signum"] is not None:
        raise SystemExit(128 + _STOP["signum"])


def _wait_child(proc, timeout: float | None) -> int:
    """``proc.wait(timeout)`` in short slices, so that a stop request is seen within half a second."""
    deadline = None if timeout is None else time.time() + timeout
    while True:
        left = None if deadline is None else deadline - time.time()
        if left is not None and left <= 0:
            raise subprocess.TimeoutExpired(proc.args, timeout)
        try:
            return proc.wait(timeout=0.5 if left is None else min(0.5, left))
        except subprocess.TimeoutExpired:
            _check_stop()


def run_scenario(s: Scenario, out: Path, device: str, timeout: float | None, keep_compiler_cache: bool = False) -> dict:
    """One scenario in a child process; its row. ``keep_compiler_cache`` keeps the scenario's own inductor/Triton
    cache dirs afterwards (a compile longer than one device command resumes from them in the next call on the same
    machine); the row's ``compiler_cache`` says whether this run started from a kept one (then its cold start is not
    an uncached one)."""
    log = out / "logs" / f"{safe_name(s.name)}.log"
    row_path = out / "logs" / f"{safe_name(s.name)}.row.json"
    row_path.unlink(missing_ok=True)
    job = {"scenario": asdict(s), "out": str(out), "device": device, "row_path": str(row_path)}
    cmd = [sys.executable, "-m", "vramfit.bench", "--one", json.dumps(job)]
    # inductor's and Triton's own on-disk caches start empty for each scenario: a compile is then either uncached or
    # served by vramfit's compile cache (a "hit" in the row), never silently by a cache an earlier scenario left
    scratch = out / "logs" / f"{safe_name(s.name)}.compiler-cache"
    resumed = scratch.is_dir() and any(scratch.rglob("*"))
    if resumed and not keep_compiler_cache:  # left by an earlier run: this one starts empty, as every other
        shutil.rmtree(scratch, ignore_errors=True)
        resumed = False
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false",
           "TORCHINDUCTOR_CACHE_DIR": str(scratch / "inductor"), "TRITON_CACHE_DIR": str(scratch / "triton")}
    t0 = time.time()
    with open(log, "w") as logf:
        # own session: a timeout kills the whole process group (compile workers included)
        proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, env=env, start_new_session=True,
                                preexec_fn=_die_with_parent)
        try:
            code = _wait_child(proc, timeout)
            timed_out = False
        except subprocess.TimeoutExpired:
            timed_out = True
        finally:  # also on KeyboardInterrupt/SystemExit: never leave a child holding the GPU
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    wall = round(time.time() - t0, 1)
    if not keep_compiler_cache:
        shutil.rmtree(scratch, ignore_errors=True)
    tail = log.read_text(errors="replace")[-3000:]
    row = None
    if row_path.exists():  # written atomically by the child: complete or absent
        try:
            row = json.loads(row_path.read_text())
        except json.JSONDecodeError:  # not ours (written by something else): report it, don't crash the bench
            row = None
        row_path.unlink()
    if row is None:
        row = {**base_row(s), "status": "error", "exit_code": proc.returncode, "stderr_tail": tail,
               "last_phase": last_phase(log.read_text(errors="replace"))}
        if timed_out:
            row.update(exit_reason="timeout", error=f"killed after {timeout:.0f} s (--max-scenario-seconds/timeout)")
        else:
            last = [ln for ln in tail.splitlines() if ln.strip()][-1:] or ["no output"]
            oom = "out of memory" in tail.lower()
            sig = f" (signal {signal.Signals(-code).name})" if code is not None and code < 0 else ""
            row.update(exit_reason="oom" if oom else "crash", error=f"exit code {code}{sig}: {last[0][:500]}")
    row.update(wall_s=wall, log=str(log.relative_to(out)), command=" ".join(cmd[:4]) + " <job>")
    if keep_compiler_cache:
        row["compiler_cache"] = {"kept": True, "resumed": resumed, "dir": str(scratch.relative_to(out))}
    return row


# ----------------------------------------------------------------------------------------------------------
# the table printed as rows finish


COLUMNS = [  # (header, width, getter)
    ("scenario", 30, lambda r: r["scenario"]),
    ("status", 9, lambda r: r["status"] if r["status"] != "error" else r["exit_reason"]),
    ("steps", 6, lambda r: f"{r['steps']}{'*' if r.get('steps_reduced') else ''}"),
    ("load s", 7, lambda r: _f(r.get("load_s"), 1)),
    ("load GB", 8, lambda r: _mem(r, "after_load")),
    ("peak GB", 8, lambda r: _mem(r, "peak")),
    ("cold s", 7, lambda r: _f(_g(r, "cold", "total_s"), 2)),
    ("compile", 8, lambda r: _f(_g(r, "cold", "compile_s"), 1)),
    ("warm s", 7, lambda r: _f(_g(r, "warm", "total_s_median"), 2)),
    ("p90 s", 7, lambda r: _f(_g(r, "warm", "total_s_p90"), 2)),
    ("s/step", 7, lambda r: _f(_g(r, "warm", "s_per_step_median") or _g(r, "cold", "s_per_step"), 3)),
    ("PSNR", 6, lambda r: "inf" if _g(r, "fidelity", "images_identical") else _f(_g(r, "fidelity", "psnr_db"), 1)),
    ("SSIM", 6, lambda r: _f(_g(r, "fidelity", "ssim"), 3)),
    ("lat err", 8, lambda r: _f(_g(r, "fidelity", "latent_rel_l2"), 4)),
]


def _g(r: dict, *path):
    for p in path:
        r = r.get(p) if isinstance(r, dict) else None
    return r


def _f(x, nd: int) -> str:
    return "-" if x is None else f"{x:.{nd}f}"


def _mem(r: dict, which: str) -> str:
    """GPU allocated GB; on CPU runs the host RSS, marked 'h'."""
    m = r.get("memory") or {}
    if m.get("gpu"):
        return _f(m.get(f"{which}_gb"), 2)
    v = m.get("host_after_load_gb" if which == "after_load" else "host_peak_rss_gb")
    return "-" if v is None else f"{v:.2f}h"


def table_header() -> str:
    return " ".join(f"{h:<{w}}" if i == 0 else f"{h:>{w}}" for i, (h, w, _) in enumerate(COLUMNS))


def table_line(r: dict) -> str:
    cells = [str(get(r)) for _, _, get in COLUMNS]
    line = " ".join(f"{c[:w]:<{w}}" if i == 0 else f"{c:>{w}}" for i, (c, (_, w, _)) in enumerate(zip(cells, COLUMNS)))
    if r["status"] != "ok" and r.get("error"):
        line += f"\n    {r['exit_reason']}: {r['error'][:300]}"
    return line


# ----------------------------------------------------------------------------------------------------------
# the child: one scenario, measured


def child_main(job: dict) -> int:
    s = Scenario(**job["scenario"])
    out = Path(job["out"])
    row = base_row(s)
    t0 = time.time()
    try:
        row.update(measure_scenario(s, out, job["device"], row))
        row.update(status="ok")
    except BaseException as e:  # noqa: BLE001 -- every failure becomes a row; KeyboardInterrupt re-raised below
        import traceback

        row.update(status="error", exit_reason=exit_reason(e), error=f"{type(e).__name__}: {e}"[:2000],
                   traceback=traceback.format_exc()[-4000:])
        if isinstance(e, KeyboardInterrupt):
            raise
    row["child_s"] = round(time.time() - t0, 1)
    write_atomic(Path(job["row_path"]), json.dumps(finite(row), allow_nan=False).encode())
    return 0 if row["status"] == "ok" else 1


def exit_reason(e: BaseException) -> str:
    if isinstance(e, RecipeError):
        return "refused"
    if isinstance(e, InputError):
        return "input"
    if type(e).__name__ == "OutOfMemoryError" or "out of memory" in str(e).lower():
        return "oom"
    return "error"


def run_sequence(seeds: list[int], repeats: int) -> list[int]:
    """Seeds of the cold run and the warm runs: every seed at least once, ``repeats`` warm runs at least."""
    return [seeds[0]] + [seeds[(i + 1) % len(seeds)] for i in range(max(repeats, len(seeds) - 1))]


PHASE_MARK = "[phase +"


def phase_printer(t0: float):
    """The child's log gets one line per phase (``[phase +12.3s] step i=3 of=28``): the last one a killed
    scenario printed is its row's ``last_phase``."""
    def show(name: str, **info) -> None:
        extra = " ".join(f"{k}={v}" for k, v in info.items())
        print(f"{PHASE_MARK}{time.perf_counter() - t0:.1f}s] {name} {extra}".rstrip(), flush=True)
    return show


def last_phase(log_text: str) -> str | None:
    marks = [ln[len("[phase "):].replace("]", "", 1).strip() for ln in log_text.splitlines() if ln.startswith(PHASE_MARK)]
    return marks[-1] if marks else None


def measure_scenario(s: Scenario, out: Path, device_arg: str, row: dict) -> dict:
    from . import measure, models
    from .recipe import Recipe
    from .run import Runner, request_for

    device = measure.resolve_device(device_arg)
    row.update(device=measure.device_info(device), versions=measure.versions())  # also on a later failure
    spec = models.get_model(s.model)
    weights = models.resolve_weights(spec, s.weights, seed=s.weights_seed)
    recipe = Recipe.parse(s.recipe)
    if s.gguf:
        from .gguf_io import read_gguf_type

        recipe = recipe.with_(transformer=read_gguf_type(s.gguf))
    row.update(recipe=str(recipe), weights=weights.describe())
    t0 = time.perf_counter()
    from diffusers import FluxPipeline  # noqa: F401  Python imports are not load time (seconds of it on CPU)

    for c in models.COMPONENTS:
        models.component_class(c)
    import_s = round(time.perf_counter() - t0, 3)
    runner = Runner(spec, weights, recipe, device, gguf_file=s.gguf, progress=False,  # refusals raise here
                    on_event=phase_printer(time.perf_counter()))
    runner.load()
    records, last = [], {}
    for seed in run_sequence(s.seeds, s.repeats):
        req = request_for(spec, s.prompt, s.steps, s.height, s.width, s.guidance, seed)
        res = runner.generate(req)
        records.append(res.record)
        if s.role == "reference" and seed not in last:  # the reference is each seed's first run
            write_reference(out, s.ref_key, seed, res.latents, res.image)
        last[seed] = res  # fidelity is scored on each seed's last (warm) run
    breakdown = None
    if s.profile:  # after the timed runs, so that none of them pays the profiler's overhead
        breakdown = {"recipe": str(recipe), **measure.profile_generation(lambda: runner.generate(req), device,
                                                                         req.steps)}
    runner.close()
    rec = records[-1]
    result = {"device": rec["device"], "versions": rec["versions"], "manifest": rec["manifest"],
              "weight_bytes": rec["weight_bytes"], "weight_gb_total": rec["weight_gb_total"],
              "import_s": import_s, "load_s": records[0]["timings"]["load_s"], "memory": _memory(records),
              **_timings(records),
              "runs": [{"seed": r["request"]["seed"], "run_index": r["run_index"], "latents": r["latents"],
                        "timings": r["timings"], "memory": r["memory"]} for r in records]}
    result.update(_cold_start(records, rec["manifest"], import_s))
    if breakdown is not None:
        result["breakdown"] = breakdown
    images_dir = out / "images"
    images_dir.mkdir(exist_ok=True)
    result["images"] = {}
    (out / "latents").mkdir(exist_ok=True)
    for seed, res in last.items():
        p = images_dir / f"{safe_name(s.name)}-s{seed}.png"
        write_atomic(p, _png_bytes(res.image))
        result["images"][str(seed)] = str(p.relative_to(out))
        # each scenario's last latents too, so that a later scenario can be scored against it (compare_to)
        write_atomic(out / "latents" / f"{safe_name(s.name)}-s{seed}.pt", _tensor_bytes(res.latents))
    try:  # the measurements above stand even if scoring fails
        result["fidelity"] = _fidelity(s, out, last)
    except Exception as e:  # noqa: BLE001
        result["fidelity"] = {"reference": s.ref_key, "error": f"{type(e).__name__}: {e}"}
    if s.compare_to:
        try:
            result["fidelity_vs"] = _fidelity_vs(s.compare_to, out, last)
        except Exception as e:  # noqa: BLE001
            result["fidelity_vs"] = {"scenario": s.compare_to, "error": f"{type(e).__name__}: {e}"}
    if s.role == "reference":
        result["reference_files"] = {str(seed): [str(p.relative_to(out)) for p in ref_paths(out, s.ref_key, seed)]
                                     for seed in s.seeds}
    return result


def _cold_start(records: list[dict], manifest: list[dict], import_s: float) -> dict:
    """The compile cache's part in the cold run: hit, miss (this run compiled and saved) or unusable. The uncached and
    the cached cold start are separate fields (DESIGN: the planner's cold-start calibration reads the uncached one);
    each is import + load + the first generation, i.e. the time to the first image."""
    entries = [e for e in manifest if e["step"] == "compile-cache"]
    if not entries:
        return {"compile_cache": None}
    e = entries[0]
    t = records[0]["timings"]
    cold = {"to_first_image_s": round(import_s + t["load_s"] + t["total_s"], 3), "first_run_s": t["total_s"],
            "compile_s": t.get("compile_s"), "cache_load_s": e.get("load_s")}
    return {"compile_cache": {k: e.get(k) for k in ("status", "key", "dir", "bytes", "saved", "reason")},
            "cold_uncached": cold if e.get("status") in ("miss", "unusable") else None,
            "cold_cached": cold if e.get("status") == "hit" else None}


def _median(xs):
    xs = sorted(x for x in xs if x is not None)
    if not xs:
        return None
    n = len(xs)
    return round(xs[n // 2] if n % 2 else (xs[n // 2 - 1] + xs[n // 2]) / 2, 4)


def _p90(xs):
    xs = sorted(x for x in xs if x is not None)
    if not xs:
        return None
    k = 0.9 * (len(xs) - 1)  # linear interpolation between closest ranks
    lo = int(k)
    hi = min(lo + 1, len(xs) - 1)
    return round(xs[lo] + (xs[hi] - xs[lo]) * (k - lo), 4)


STAGE_KEYS = ("total_s", "encode_s", "denoise_s", "decode_s", "s_per_step")


def _timings(records: list[dict]) -> dict:
    """Cold = the first run (includes compilation); warm = the others."""
    ct = records[0]["timings"]
    cold = {k: ct.get(k) for k in (*STAGE_KEYS, "compile_s", "first_step_s")}
    warm: dict = {"n": len(records) - 1}
    for k in STAGE_KEYS:
        vals = [r["timings"][k] for r in records[1:]]
        warm[f"{k}_median"], warm[f"{k}_p90"] = _median(vals), _p90(vals)
    return {"cold": cold, "warm": warm}


def _memory(records: list[dict]) -> dict:
    """GPU memory after load and at peak while generating. The peak including loading is kept apart: a random
    stand-in is quantized in memory after a bf16 build, so its load peak is the bf16 model's, which a pre-quantized
    checkpoint would not need."""
    al = records[0]["memory"]["after_load"]
    gpu = "allocated_gb" in al

    def peak(k):
        return max(r["memory"][k] for r in records) if gpu else None

    return {"gpu": gpu, "after_load_gb": al.get("allocated_gb"), "after_load_reserved_gb": al.get("reserved_gb"),
            "peak_gb": peak("generate_peak_allocated_gb"), "peak_reserved_gb": peak("generate_peak_reserved_gb"),
            "peak_incl_load_gb": peak("peak_allocated_gb"),
            "host_after_load_gb": al.get("rss_gb"),
            "host_peak_rss_gb": max((r["memory"]["host_peak_rss_gb"] or 0.0) for r in records)}


def _fidelity(s: Scenario, out: Path, last: dict) -> dict:
    """Each seed's image and latents against the bf16 reference of the same key."""
    per_seed = []
    for seed, res in last.items():
        lat_path, png_path = ref_paths(out, s.ref_key, seed)
        why = reference_problem(out, s.ref_key, seed)
        if why:
            per_seed.append({"seed": seed, "error": f"reference {lat_path.relative_to(out)}: {why} (reference failed?)"})
            continue
        per_seed.append(_compare(seed, lat_path, png_path, res))
    return {"reference": s.ref_key, **_fidelity_summary(per_seed)}


def _fidelity_vs(name: str, out: Path, last: dict) -> dict:
    """Each seed's image and latents against another scenario's last run of the same seed (``compare_to``)."""
    per_seed = []
    for seed, res in last.items():
        lat_path = out / "latents" / f"{safe_name(name)}-s{seed}.pt"
        png_path = out / "images" / f"{safe_name(name)}-s{seed}.png"
        if not (lat_path.is_file() and png_path.is_file()):
            per_seed.append({"seed": seed, "error": f"scenario {name!r} left no image/latents of seed {seed} "
                                                    "(not run, or failed, before this one)"})
            continue
        per_seed.append(_compare(seed, lat_path, png_path, res))
    return {"scenario": name, **_fidelity_summary(per_seed)}


def fidelity_vs_files(out: Path, name: str, other: str, seeds: list[int]) -> dict:
    """``fidelity_vs`` of scenario ``name`` against ``other`` from the latents and images both left in ``out``
    (for a scenario that ran before the one it is scored against)."""
    from types import SimpleNamespace

    import torch
    from PIL import Image

    last = {}
    for seed in seeds:
        lat = out / "latents" / f"{safe_name(name)}-s{seed}.pt"
        png = out / "images" / f"{safe_name(name)}-s{seed}.png"
        if lat.is_file() and png.is_file():
            last[seed] = SimpleNamespace(latents=torch.load(lat), image=Image.open(png))
    if not last:
        return {"scenario": other, "error": f"scenario {name!r} left no latents/images in {out}"}
    return _fidelity_vs(other, out, last)


def _compare(seed: int, lat_path: Path, png_path: Path, res) -> dict:
    import numpy as np
    import torch
    from PIL import Image
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    ref_lat = torch.load(lat_path)
    a = np.asarray(Image.open(png_path).convert("RGB"))
    b = np.asarray(res.image.convert("RGB"))
    if a.shape != b.shape or ref_lat.shape != res.latents.shape:
        return {"seed": seed, "error": f"shape {b.shape} vs reference {a.shape}"}
    identical = bool(np.array_equal(a, b))
    return {
        "seed": seed,
        "psnr_db": None if identical else round(float(peak_signal_noise_ratio(a, b, data_range=255)), 3),
        "ssim": round(float(structural_similarity(a, b, channel_axis=2, data_range=255)), 5),
        "latent_rel_l2": float(f"{((res.latents - ref_lat).norm() / ref_lat.norm()).item():.6g}"),
        "images_identical": identical,
    }


def _fidelity_summary(per_seed: list[dict]) -> dict:
    ok = [p for p in per_seed if "error" not in p]

    def mean(k):
        return None if not ok or any(p[k] is None for p in ok) else round(sum(p[k] for p in ok) / len(ok), 6)

    psnrs = [p["psnr_db"] for p in ok if p["psnr_db"] is not None]
    return {"seeds": len(ok), "per_seed": per_seed,
            "psnr_db": round(sum(psnrs) / len(psnrs), 3) if psnrs else None,  # identical images: PSNR is infinite
            "images_identical": bool(ok) and all(p["images_identical"] for p in ok),
            "ssim": mean("ssim"), "latent_rel_l2": mean("latent_rel_l2"),
            "error": None if ok else "; ".join(p["error"] for p in per_seed)}


# ----------------------------------------------------------------------------------------------------------
# command line


def cmd_bench(args) -> int:
    if args.max_scenario_seconds is not None and args.max_scenario_seconds <= 0:
        raise InputError("--max-scenario-seconds must be > 0")
    if args.device not in ("auto", "cpu", "cuda") and not re.fullmatch(r"cuda:\d+", args.device):
        raise InputError(f"--device {args.device!r}: auto | cpu | cuda | cuda:N")

    def on_term(signum, frame):  # SIGTERM as SystemExit: run_scenario's finally kills the running child
        _STOP["signum"] = signum
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, on_term)
    return run_bench(args.scenarios, Path(args.out), args.device, args.only, args.skip, args.max_scenario_seconds,
                     args.resume, args.dry_run)


def add_parser(sub) -> None:
    b = sub.add_parser("bench", help="measure every recipe of a scenario file side by side (one process each)",
                       description="Scenario files: shipped names (" + ", ".join(shipped_scenarios())
                       + ") or paths to .toml files. Rows are appended to OUT/results.jsonl as they finish.")
    b.add_argument("scenarios", nargs="+", help="scenario names or .toml files")
    b.add_argument("--out", required=True, help="results directory (results.jsonl, images/, reference/, logs/)")
    b.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    b.add_argument("--only", default=None, help="comma-separated globs over scenario names and tags")
    b.add_argument("--skip", default=None, help="comma-separated globs over scenario names and tags")
    b.add_argument("--max-scenario-seconds", type=float, default=None,
                   help="kill a scenario process after this long (row: exit reason 'timeout')")
    b.add_argument("--resume", action="store_true", help="skip scenarios that already have an ok row in OUT")
    b.add_argument("--dry-run", action="store_true", help="print the planned runs and estimates; run nothing")
    b.set_defaults(func=cmd_bench)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--one":
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        sys.exit(child_main(json.loads(sys.argv[2])))
    sys.exit("usage: python -m vramfit.bench --one JOB_JSON   (internal; use `vramfit bench`)")
