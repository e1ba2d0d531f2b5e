"""The embedded scheduler: jobs, bounded queues, pipelined or stage-batch mode, micro-batching, idle unload,
retries and fallbacks, and the supervision of stage worker processes.

* **pipelined** (the budget holds every stage at once): one worker process per stage and one engine thread per
  stage; encoding job k+1 runs while k denoises. Queues between stages are bounded, so a slow stage holds the
  one before it back instead of piling tensors up.
* **stage-batch** (it does not, e.g. ``offload=staged`` or a tight ``--vram``): one worker hosts the stages in
  turn; each cycle encodes everything queued, frees the encoders, denoises, frees, decodes -- one load per
  batch of requests instead of one per image.

Denoise takes micro-batches of items with the same (size, steps, guidance), up to ``max_batch``. A stage that
raises or whose worker dies is retried once (the worker restarted); out of memory splits the batch, then moves
that stage to the next planned recipe for its components; what still fails ends its jobs with a clear error,
and other jobs go on.
"""

from __future__ import annotations

import itertools
import logging
import math
import multiprocessing as mp
import os
import threading
import time
import uuid
from collections import OrderedDict, deque
from dataclasses import dataclass, field

from .stages import STAGES, denoise_key, worker_main

log = logging.getLogger("vramfit.serve")
START_TIMEOUT_S = 600.0
STAGE_BATCH_GATHER_S = 0.3


class StageFailed(Exception):
    """A stage could not produce its result after the retries and fallbacks; ``status`` is the HTTP status."""

    def __init__(self, message: str, status: int = 500, code: str = "stage_failed", retry_after: int | None = None):
        super().__init__(message)
        self.status, self.code, self.retry_after = status, code, retry_after


class WorkerDied(Exception):
    pass


class WorkerError(Exception):
    def __init__(self, info: dict):
        super().__init__(info.get("message", "stage error"))
        self.info = info
        self.oom = bool(info.get("oom"))


# ----------------------------------------------------------------------------------------------------------
# one worker process


class Worker:
    """A spawned process hosting one or more stages; calls are serialised (one batch at a time)."""

    def __init__(self, name: str, cfg: dict):
        self.name, self.cfg = name, cfg
        self.lock = threading.Lock()
        self.proc = None
        self.conn = None
        self.ids = itertools.count(1)
        self.restarts = 0
        self.stage_info: dict = {}

    def start(self) -> None:
        ctx = mp.get_context("spawn")
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=worker_main, args=(child, self.cfg), daemon=True, name=f"vramfit-{self.name}")
        proc.start()
        child.close()
        deadline = time.monotonic() + START_TIMEOUT_S
        while not parent.poll(0.2):
            if not proc.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"stage worker {self.name} did not start (exit code {proc.exitcode})")
        msg = parent.recv()
        if msg[0] != "ready":
            proc.join(5)
            raise RuntimeError(f"stage worker {self.name} refused to start: {msg[2]}")
        self.proc, self.conn, self.stage_info = proc, parent, msg[2]
        log.info("worker %s started (pid %d)", self.name, proc.pid)

    @property
    def pid(self):
        return self.proc.pid if self.proc else None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.is_alive()

    def restart(self) -> None:
        self.kill()
        self.restarts += 1
        self.start()

    def kill(self) -> None:
        if self.proc is not None and self.proc.is_alive():
            self.proc.kill()
            self.proc.join(10)
        self.proc = None

    def call(self, op: str, payload: dict, on_event=None):
        """Send one message and wait for its reply, forwarding events; WorkerDied if the process goes away."""
        with self.lock:
            if not self.alive():
                raise WorkerDied(f"worker {self.name} is not running")
            mid = next(self.ids)
            try:
                self.conn.send((op, mid, payload))
                while True:
                    while not self.conn.poll(0.2):
                        if not self.proc.is_alive():
                            raise WorkerDied(f"worker {self.name} (pid {self.proc.pid}) died with exit code "
                                             f"{self.proc.exitcode}")
                    msg = self.conn.recv()
                    if msg[0] == "event":
                        if on_event is not None:
                            on_event(msg[2], msg[3])
                        continue
                    if msg[0] == "error":
                        raise WorkerError(msg[2])
                    info = msg[3]
                    if info.get("stage") and payload.get("stage"):
                        self.stage_info[payload["stage"]] = info["stage"]
                    return msg[2], info
            except (EOFError, OSError, BrokenPipeError) as e:
                raise WorkerDied(f"worker {self.name} connection lost: {e}") from None

    def stop(self) -> None:
        if self.alive():
            try:
                with self.lock:
                    self.conn.send(("stop", 0, {}))
                self.proc.join(10)
            except (OSError, BrokenPipeError):
                pass
        self.kill()


# ----------------------------------------------------------------------------------------------------------
# jobs


@dataclass
class Item:
    """One image of a job, as it flows through the stages."""

    job: "Job"
    index: int
    req: object  # vramfit.run.Request
    data: dict = field(default_factory=dict)

    def stage_input(self, stage: str) -> dict:
        r = self.req
        if stage == "encode":
            return {"prompt": r.prompt, "max_sequence_length": r.max_sequence_length}
        if stage == "denoise":
            return {"prompt_embeds": self.data["prompt_embeds"], "pooled_prompt_embeds":
                    self.data["pooled_prompt_embeds"], "seed": r.seed, "steps": r.steps, "guidance": r.guidance,
                    "height": r.height, "width": r.width, "max_sequence_length": r.max_sequence_length,
                    "previews": self.job.preview_steps}
        return {"latents": self.data["latents"], "height": r.height, "width": r.width}


class Job:
    def __init__(self, body, reqs, warnings):
        self.id = "img_" + uuid.uuid4().hex[:20]
        self.body, self.reqs, self.warnings = body, reqs, warnings
        self.revised_prompt: str | None = None
        self.created = time.time()
        self.state = "queued"
        self.items = [Item(self, i, r) for i, r in enumerate(reqs)]
        self.images: list = [None] * len(reqs)  # PIL images
        self.image_ids: list[str] = []
        self.error: StageFailed | None = None
        self.step = 0
        self.steps = reqs[0].steps
        k = getattr(body, "partial_images", 0) or 0
        n = self.steps
        self.preview_steps = sorted({math.ceil(n * j / (k + 1)) for j in range(1, k + 1)} - {0, n}) if k else []
        self.events: list[dict] = []
        self.cond = threading.Condition()
        self.timings: dict = {}
        self.t_stage: dict = {}
        self.done_count = 0
        self.memory: dict = {}

    @property
    def finished(self) -> bool:
        return self.state in ("done", "error", "cancelled")

    def emit(self, ev: dict) -> None:
        with self.cond:
            self.events.append(ev)
            self.cond.notify_all()

    def set_state(self, state: str) -> None:
        if self.finished:
            return
        now = time.time()
        if self.state != state:
            self.timings[f"{self.state}_s"] = round(self.timings.get(f"{self.state}_s", 0.0) + now
                                                    - self.t_stage.get(self.state, self.created), 4)
        self.t_stage[state] = now
        self.state = state
        if state in STAGES:
            self.emit({"type": "stage", "stage": state})

    def fail(self, err: StageFailed) -> None:
        if self.finished:
            return
        self.error = err
        self.set_state("error")
        self.emit({"type": "error", "error": {"message": str(err), "type": "server_error"
                                              if err.status >= 500 else "invalid_request_error",
                                              "param": None, "code": err.code}})


# ----------------------------------------------------------------------------------------------------------
# a bounded queue that hands out micro-batches


class BatchQueue:
    def __init__(self, maxsize: int):
        self.maxsize = maxsize
        self.items: deque = deque()
        self.cond = threading.Condition()
        self.closed = False

    def __len__(self):
        return len(self.items)

    def put(self, item, stop: threading.Event) -> bool:
        with self.cond:
            while len(self.items) >= self.maxsize and not stop.is_set():
                self.cond.wait(0.2)
            if stop.is_set():
                return False
            self.items.append(item)
            self.cond.notify_all()
            return True

    def put_front(self, items) -> None:
        with self.cond:
            self.items.extendleft(reversed(items))
            self.cond.notify_all()

    def take(self, max_n: int, key=None, timeout: float = 0.2) -> list:
        """The oldest item and, with ``key``, the next ones sharing its key, up to ``max_n``; [] on timeout."""
        with self.cond:
            if not self.items:
                self.cond.wait(timeout)
            if not self.items:
                return []
            first = self.items.popleft()
            batch = [first]
            if key is not None and max_n > 1:
                k = key(first)
                keep = deque()
                while self.items and len(batch) < max_n:
                    it = self.items.popleft()
                    (batch if key(it) == k else keep).append(it)
                self.items.extendleft(reversed(keep))
            elif key is None:
                while self.items and len(batch) < max_n:
                    batch.append(self.items.popleft())
            self.cond.notify_all()
            return batch


# ----------------------------------------------------------------------------------------------------------
# the engine


class Engine:
    def __init__(self, spec, weights, recipes: list, device: str, mode: str, max_queue: int = 64,
                 max_batch: int = 4, idle_unload: float = 0.0, test_faults: bool = False, plan: dict | None = None,
                 memory_fraction: dict | None = None, threads: int | None = None, gguf_file: str | None = None,
                 warm: bool = True):
        """``recipes``: the recipe in force first, then the planned fallbacks (each stage falls back on its own)."""
        self.spec, self.weights, self.device, self.mode = spec, weights, device, mode
        self.recipes = recipes
        self.max_queue, self.max_batch, self.idle_unload = max_queue, max(1, max_batch), idle_unload
        self.test_faults, self.warm = test_faults, warm
        self.plan = plan or {}
        self.stage_recipe = {s: 0 for s in STAGES}  # index into recipes, per stage
        self.faults: dict[str, list[dict]] = {s: [] for s in STAGES}
        self.jobs: OrderedDict[str, Job] = OrderedDict()
        self.active: set[str] = set()
        self.lock = threading.Lock()
        self.stop_evt = threading.Event()
        self.draining = False
        self.started = time.time()
        self.queues = {"encode": BatchQueue(10**9), "denoise": BatchQueue(max(2, 2 * self.max_batch)),
                       "decode": BatchQueue(max(2, 2 * self.max_batch))}
        self.previews: deque = deque()
        # the largest batch a stage may take: --max-batch, lowered to half a batch that ran out of memory (the
        # H200 under --vram 12GB ran out at the planner's batch of 2 three times before this was remembered)
        self.batch_cap = {s: self.max_batch for s in STAGES}
        self.busy = {s: False for s in STAGES}
        self.last_used = {s: time.time() for s in STAGES}
        self.load_history: dict[str, list[float]] = {s: [] for s in STAGES}
        self.stage_stats: dict[str, dict] = {s: {"runs": 0, "items": 0, "errors": 0, "retries": 0, "ooms": 0,
                                                  "fallbacks": 0, "seconds": 0.0, "last_batch": 0}
                                             for s in STAGES}
        self.on_stage_time = lambda stage, seconds, n: None  # app hooks metrics here
        self.on_images = lambda n: None
        base = {"spec": spec, "weights": weights, "device": device, "gguf_file": gguf_file, "threads": threads}
        mf = memory_fraction or {}
        if mode == "pipelined":
            self.workers = {s: Worker(s, {**base, "stages": [s], "recipes": {s: recipes[0]},
                                          "memory_fraction": mf.get(s)}) for s in STAGES}
        else:
            w = Worker("stages", {**base, "stages": list(STAGES), "recipes": {s: recipes[0] for s in STAGES},
                                  "memory_fraction": mf.get("all")})
            self.workers = {s: w for s in STAGES}
        self.threads: list[threading.Thread] = []

    # ---------------------------------------------------------------- life cycle
    def start(self) -> None:
        started = []
        errors = []

        def boot(w):
            try:
                w.start()
            except Exception as e:  # noqa: BLE001
                errors.append(e)

        ts = [threading.Thread(target=boot, args=(w,)) for w in {id(w): w for w in self.workers.values()}.values()]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        if errors:
            self.shutdown()
            raise errors[0]
        del started
        if self.mode == "pipelined" and self.warm:
            # every stage fits at once: load them now, so the first request does not pay the cold start
            for s in STAGES:
                _, info = self.workers[s].call("load", {"stage": s})
                self.load_history[s].append(info["load_s"])
        loops = ([self._encode_loop, self._denoise_loop, self._decode_loop] if self.mode == "pipelined"
                 else [self._stage_batch_loop])
        for fn in loops + [self._janitor_loop]:
            t = threading.Thread(target=fn, daemon=True, name=fn.__name__)
            t.start()
            self.threads.append(t)

    def shutdown(self) -> None:
        self.stop_evt.set()
        for t in self.threads:
            t.join(5)
        # stop the workers side by side (each may be finishing a batch)
        ts = [threading.Thread(target=w.stop) for w in {id(w): w for w in self.workers.values()}.values()]
        for t in ts:
            t.start()
        for t in ts:
            t.join(30)

    def drain(self, grace: float) -> bool:
        """Stop taking jobs; wait up to ``grace`` s for the admitted ones. True if all finished."""
        self.draining = True
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            with self.lock:
                if not self.active:
                    return True
            time.sleep(0.1)
        return False

    # ---------------------------------------------------------------- admission
    def pending(self) -> int:
        with self.lock:
            return len(self.active)

    def retry_after(self) -> int:
        s = self.stage_stats["denoise"]
        per_item = s["seconds"] / s["items"] if s["items"] else 5.0
        return max(1, int(math.ceil(per_item * max(1, self.pending()) / self.max_batch)))

    def submit(self, job: Job) -> None:
        """Admit a job; raises StageFailed(429) when the queue is full, (503) while draining."""
        with self.lock:
            if self.draining or self.stop_evt.is_set():
                raise StageFailed("the server is shutting down and takes no new requests", 503, "draining",
                                  retry_after=5)
            if len(self.active) >= self.max_queue:
                raise StageFailed(f"the queue is full ({self.max_queue} requests waiting or running); retry later",
                                  429, "queue_full", retry_after=None)
            self.jobs[job.id] = job
            self.active.add(job.id)
            while len(self.jobs) > 1000:  # the registry remembers the last 1000 jobs
                old_id, old = next(iter(self.jobs.items()))
                if not old.finished:
                    break
                self.jobs.pop(old_id)
        job.emit({"type": "queued", "position": self.position(job)})
        self.queues["encode"].put(job, self.stop_evt)

    def position(self, job: Job) -> int | None:
        if job.state != "queued":
            return None
        with self.lock:
            queued = [j for j in self.jobs.values() if j.id in self.active and j.state == "queued"]
        return next((i for i, j in enumerate(queued) if j is job), None)

    def cancel(self, job: Job) -> None:
        if job.finished:
            return
        job.set_state("cancelled")
        job.emit({"type": "error", "error": {"message": "cancelled", "type": "cancelled", "param": None,
                                              "code": "cancelled"}})
        self._finish(job)

    def _finish(self, job: Job) -> None:
        with self.lock:
            self.active.discard(job.id)
        with job.cond:
            job.cond.notify_all()

    def add_fault(self, stage: str, kind: str, count: int = 1, seconds: float = 1.0) -> None:
        with self.lock:
            if kind == "clear":  # and what the faults taught: the batch cap goes back to --max-batch
                self.faults[stage] = []
                self.batch_cap[stage] = self.max_batch
            else:
                self.faults[stage] += [{"kind": kind, "seconds": seconds}] * count

    def _take_fault(self, stage: str):
        with self.lock:
            return self.faults[stage].pop(0) if self.faults[stage] else None

    # ---------------------------------------------------------------- running one stage on a batch
    def run_stage(self, stage: str, items: list[Item], on_event=None) -> None:
        """Run ``stage`` on ``items`` (results into item.data); failures end only the affected jobs."""
        items = [it for it in items if not it.job.finished]
        if not items:
            return
        for it in items:
            if it.job.state in ("queued",) + STAGES and it.job.state != stage:
                it.job.set_state(stage)
        try:
            outs = self._run_with_recovery(stage, items, on_event)
        except StageFailed as e:
            outs = [e] * len(items)
        for it, out in zip(items, outs):
            if isinstance(out, StageFailed):  # only this item's job ends; the rest of the batch goes on
                it.job.fail(out)
                self._finish(it.job)
            else:
                it.data.update(out)

    def _one_by_one(self, stage: str, items: list[Item], on_event) -> list:
        """A batch that failed twice: run its items alone, so one bad request does not take the others down."""
        outs = []
        for it in items:
            try:
                outs += self._run_with_recovery(stage, [it], self._ev(stage, [it]))
            except StageFailed as e:
                outs.append(e)
        return outs

    def _ev(self, stage: str, sub: list[Item]):
        """Events name items by their index in the batch: a sub-batch needs its own listener."""
        return self._denoise_events(sub) if stage == "denoise" else None

    def _run_with_recovery(self, stage: str, items: list[Item], on_event, retried: bool = False) -> list:
        w = self.workers[stage]
        payload = {"stage": stage, "items": [it.stage_input(stage) for it in items]}
        if self.test_faults:
            payload["fault"] = self._take_fault(stage)
        self.busy[stage] = True
        st = self.stage_stats[stage]
        try:
            t0 = time.perf_counter()
            out, info = w.call("run", payload, on_event)
            dt = time.perf_counter() - t0
            st["runs"] += 1
            st["items"] += len(items)
            st["last_batch"] = len(items)
            st["seconds"] += info.get("run_s", dt)
            if info.get("load_s") is not None:
                self.load_history[stage].append(info["load_s"])
            self.on_stage_time(stage, info.get("run_s", dt), len(items))
            for it in items:
                it.job.memory[stage] = (info.get("stage") or {}).get("memory", {})
                it.job.timings[f"{stage}_load_s"] = info.get("load_s", 0.0)
            return out
        except WorkerDied as e:
            st["errors"] += 1
            log.warning("stage %s: %s; restarting the worker", stage, e)
            try:
                w.restart()
            except Exception as e2:  # noqa: BLE001
                raise StageFailed(f"stage {stage}: its worker died and could not be restarted: {e2}") from None
            self.stage_recipe_sync(w)
            if retried:
                if len(items) > 1:
                    return self._one_by_one(stage, items, None)
                raise StageFailed(f"stage {stage}: its worker died twice on this request ({e})", 500,
                                  "worker_died") from None
            st["retries"] += 1
            return self._run_with_recovery(stage, items, on_event, retried=True)
        except WorkerError as e:
            st["errors"] += 1
            if e.oom:
                st["ooms"] += 1
                return self._on_oom(stage, items, on_event, e)
            if retried:
                if len(items) > 1:
                    return self._one_by_one(stage, items, None)
                raise StageFailed(f"stage {stage} failed twice: {e.info.get('type')}: {e}", 500,
                                  "stage_error") from None
            st["retries"] += 1
            log.warning("stage %s raised %s: %s; retrying once", stage, e.info.get("type"), e)
            return self._run_with_recovery(stage, items, on_event, retried=True)
        finally:
            self.busy[stage] = False
            self.last_used[stage] = time.time()

    def _on_oom(self, stage, items, on_event, err):
        if len(items) > 1:  # a smaller batch first, and no batch this large again
            half = len(items) // 2
            self.batch_cap[stage] = min(self.batch_cap[stage], max(1, half))
            log.warning("stage %s out of memory with a batch of %d: retrying as %d + %d", stage, len(items),
                        half, len(items) - half)
            outs: list = []
            for sub in (items[:half], items[half:]):
                try:
                    outs += self._run_with_recovery(stage, sub, self._ev(stage, sub))
                except StageFailed as e:
                    outs += [e] * len(sub)
            return outs
        while self.stage_recipe[stage] + 1 < len(self.recipes):  # then the next planned recipe for this stage
            self.stage_recipe[stage] += 1
            recipe = self.recipes[self.stage_recipe[stage]]
            self.stage_stats[stage]["fallbacks"] += 1
            log.warning("stage %s out of memory (%s): falling back to %s", stage, err, recipe)
            try:
                self.workers[stage].call("recipe", {"stage": stage, "recipe": recipe})
            except (WorkerDied, WorkerError) as e:
                log.warning("stage %s: fallback recipe refused: %s", stage, e)
                continue
            try:
                return self._run_with_recovery(stage, items, on_event, retried=True)
            except StageFailed as e:
                if e.code != "out_of_memory":
                    raise
        raise StageFailed(f"stage {stage} ran out of memory with a batch of 1 and every planned recipe for its "
                          f"components ({err}); retry later or start the server with a smaller --vram budget",
                          503, "out_of_memory", retry_after=30)

    def stage_recipe_sync(self, w: Worker) -> None:
        """A restarted worker starts with the recipe in force; put back each stage's fallback if one was taken."""
        for s in STAGES:
            if self.workers[s] is w and self.stage_recipe[s]:
                w.call("recipe", {"stage": s, "recipe": self.recipes[self.stage_recipe[s]]})

    # ---------------------------------------------------------------- events from denoise
    def _denoise_events(self, items: list[Item]):
        def on_event(kind, data):
            if kind == "step":
                for it in items:
                    if it.index == 0:
                        it.job.step = data["i"]
                        it.job.emit({"type": "step", "i": data["i"], "n": data["n"]})
            elif kind == "latents":
                it = items[data["item"]]
                if it.job.finished:
                    return
                log.debug("preview latents of %s at step %d", it.job.id, data["i"])
                if self.mode == "pipelined":
                    self.previews.append((it, data["i"], data["latents"]))
                else:
                    it.data.setdefault("previews", []).append((data["i"], data["latents"]))
        return on_event

    def _decode_previews(self, pending) -> None:
        """Partial images: intermediate latents through the decode stage; a failure here only drops a preview."""
        for it, i, lat in pending:
            log.debug("decode preview of %s at step %d (state %s)", it.job.id, i, it.job.state)
            if it.job.finished or it.index != 0:
                continue
            try:
                out, _ = self.workers["decode"].call("run", {"stage": "decode", "items": [
                    {"latents": lat, "height": it.req.height, "width": it.req.width}]})
            except (WorkerDied, WorkerError) as e:
                log.warning("partial image dropped: %s", e)
                continue
            it.job.emit({"type": "partial", "image": out[0]["image"], "i": i,
                         "index": it.job.preview_steps.index(i) if i in it.job.preview_steps else 0})

    def _complete(self, items: list[Item]) -> None:
        for it in items:
            job = it.job
            if job.finished or "image" not in it.data:
                continue
            job.images[it.index] = it.data.pop("image")
            it.data.clear()
            job.done_count += 1
            if job.done_count == len(job.items):
                job.set_state("done")
                job.timings["total_s"] = round(time.time() - job.created, 4)
                self.on_images(len(job.items))
                job.emit({"type": "done"})
                self._finish(job)

    # ---------------------------------------------------------------- pipelined mode
    def _encode_loop(self):
        while not self.stop_evt.is_set():
            jobs = self.queues["encode"].take(1, timeout=0.2)
            for job in jobs:
                if job.finished:
                    continue
                self.run_stage("encode", job.items)
                if job.finished:
                    continue
                for it in job.items:
                    if not self.queues["denoise"].put(it, self.stop_evt):
                        return

    def _denoise_loop(self):
        q = self.queues["denoise"]
        while not self.stop_evt.is_set():
            batch = q.take(self.batch_cap["denoise"], key=lambda it: denoise_key(it.stage_input("denoise")))
            batch = [it for it in batch if not it.job.finished]
            if not batch:
                continue
            self.run_stage("denoise", batch, self._denoise_events(batch))
            for it in batch:
                it.data.pop("prompt_embeds", None)
                it.data.pop("pooled_prompt_embeds", None)
                if not it.job.finished and "latents" in it.data:
                    self.queues["decode"].put(it, self.stop_evt)

    def _decode_loop(self):
        q = self.queues["decode"]
        def previews():
            pending = []
            while self.previews:
                pending.append(self.previews.popleft())
            self._decode_previews(pending)

        while not self.stop_evt.is_set():
            previews()
            batch = q.take(self.batch_cap["decode"], timeout=0.05)
            batch = [it for it in batch if not it.job.finished]
            if not batch:
                continue
            # a job's last previews are queued before its final latents: show them first
            previews()
            self.run_stage("decode", batch)
            self._complete(batch)

    # ---------------------------------------------------------------- stage-batch mode
    def _stage_batch_loop(self):
        q = self.queues["encode"]
        w = self.workers["encode"]
        while not self.stop_evt.is_set():
            jobs = q.take(self.max_queue, timeout=0.2)
            if not jobs:
                continue
            # a cycle pays a load per stage: requests that arrive together should share it
            self.stop_evt.wait(STAGE_BATCH_GATHER_S)
            jobs += q.take(self.max_queue, timeout=0)
            jobs = [j for j in jobs if not j.finished]
            if not jobs:
                continue
            items = [it for j in jobs for it in j.items]
            self.run_stage("encode", items)
            self._unload(w, "encode")
            items = [it for it in items if not it.job.finished]
            groups: OrderedDict = OrderedDict()
            for it in items:
                groups.setdefault(denoise_key(it.stage_input("denoise")), []).append(it)
            for group in groups.values():
                k = 0
                while k < len(group):  # the cap read per batch: an out-of-memory lowers it for the next one
                    n = self.batch_cap["denoise"]
                    batch = [it for it in group[k:k + n] if not it.job.finished]
                    k += n
                    if batch:
                        self.run_stage("denoise", batch, self._denoise_events(batch))
            self._unload(w, "denoise")
            items = [it for it in items if not it.job.finished]
            for it in items:
                it.data.pop("prompt_embeds", None)
                it.data.pop("pooled_prompt_embeds", None)
                previews = it.data.pop("previews", [])
                self._decode_previews([(it, i, lat) for i, lat in previews])
            self.run_stage("decode", items)
            self._unload(w, "decode")
            self._complete(items)

    def _unload(self, w: Worker, stage: str) -> None:
        try:
            w.call("unload", {"stage": stage})
        except (WorkerDied, WorkerError) as e:
            log.warning("unload of %s failed: %s", stage, e)

    # ---------------------------------------------------------------- scale to zero
    def free(self, only_idle_for: float = 0.0) -> list[str]:
        """Unload every stage that is not running (and idle for ``only_idle_for`` s); returns the ones freed."""
        freed = []
        for s in STAGES:
            if self.busy[s] or time.time() - self.last_used[s] < only_idle_for:
                continue
            if only_idle_for and (len(self.queues[s]) or (s == "decode" and self.previews)):
                continue
            w = self.workers[s]
            if not w.lock.acquire(timeout=0.05):
                continue  # running something right now
            w.lock.release()
            try:
                _, info = w.call("unload", {"stage": s})
            except (WorkerDied, WorkerError):
                continue
            if info.get("unloaded"):
                freed.append(s)
        return freed

    def _janitor_loop(self):
        while not self.stop_evt.wait(0.5):
            if self.idle_unload > 0:
                freed = self.free(only_idle_for=self.idle_unload)
                if freed:
                    log.info("idle for %.0f s: unloaded %s", self.idle_unload, ", ".join(freed))

    # ---------------------------------------------------------------- status
    def status(self) -> dict:
        stages = {}
        for s in STAGES:
            w = self.workers[s]
            info = w.stage_info.get(s, {})
            hist = self.load_history[s]
            stages[s] = {
                "resident": bool(info.get("resident")), "recipe": info.get("recipe"),
                "recipe_index": self.stage_recipe[s], "worker_pid": w.pid, "worker_alive": w.alive(),
                "worker_restarts": w.restarts, "loads": info.get("loads", 0),
                "load_s_last": hist[-1] if hist else None,
                "reload_s_last": hist[-1] if len(hist) > 1 else None,
                "load_s_all": hist[-10:], "memory": info.get("memory", {}), "weight_bytes": info.get("weight_bytes"),
                **self.stage_stats[s], "busy": self.busy[s],
            }
        with self.lock:
            states = [self.jobs[j].state for j in self.active]
        return {
            "model": self.spec.name, "weights": self.weights.describe(), "device": self.device, "mode": self.mode,
            "recipe": str(self.recipes[0]), "fallback_recipes": [str(r) for r in self.recipes[1:]],
            "plan": self.plan, "stages": stages,
            "queue": {"admitted": len(states), "max": self.max_queue,
                      "queued": states.count("queued"), "encode": states.count("encode"),
                      "denoise": states.count("denoise"), "decode": states.count("decode"),
                      "denoise_queue": len(self.queues["denoise"]), "decode_queue": len(self.queues["decode"])},
            "max_batch": self.max_batch, "batch_cap": dict(self.batch_cap), "idle_unload_s": self.idle_unload, "draining": self.draining,
            "uptime_s": round(time.time() - self.started, 1), "pid": os.getpid(),
        }
