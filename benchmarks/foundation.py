"""Issue-2 GPU batch: the full-size flux-dev stand-in at 1024x1024, 28 steps, one fresh process per recipe.

Each scenario runs `python -m vramfit generate ... --json`; its record (or its error) becomes one JSONL row.
Afterwards every row's final-latents hash and image are compared with offload=none's.
Usage: python benchmarks/foundation.py OUT_DIR [MODEL SIZE STEPS RECIPE...]
"""

import hashlib
import json
import subprocess
import sys
import time
from pathlib import Path

RECIPES = [
    "offload=none", "offload=model", "offload=sequential", "offload=group-block", "offload=group-leaf",
    "offload=staged", "compile=regional",
]


def main(out_dir, model="flux-dev", size="1024", steps="28", recipes=RECIPES):
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows_path = out / "foundation.jsonl"
    for recipe in recipes:
        name = recipe.replace("=", "-")
        img = out / "img" / f"{name}.png"
        cmd = [sys.executable, "-m", "vramfit", "generate", "a red fox in the snow, photograph", "--model", model,
               "--weights", "random", "--recipe", recipe, "--steps", steps, "--height", size, "--width", size,
               "--seed", "0", "--out", str(img), "--no-progress", "--json"]
        t0 = time.time()
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=540)
        row = {"scenario": recipe, "command": " ".join(cmd[1:]), "wall_s": round(time.time() - t0, 1),
               "exit_code": p.returncode}
        lines = [l for l in p.stdout.splitlines() if l.startswith("{")]
        if p.returncode == 0 and lines:
            row.update(json.loads(lines[-1]))
            row["image_sha256"] = hashlib.sha256(img.read_bytes()).hexdigest()[:16]
        else:
            row["error"] = (p.stderr.strip().splitlines() or ["no output"])[-1][:500]
            row["stderr_tail"] = p.stderr[-3000:]
        print(json.dumps({k: row.get(k) for k in ("scenario", "exit_code", "wall_s", "error")}), flush=True)
        with rows_path.open("a") as f:
            f.write(json.dumps(row) + "\n")
    rows = [json.loads(l) for l in rows_path.read_text().splitlines()]
    ref = next((r for r in rows if r["scenario"] == "offload=none" and "latents" in r), None)
    for r in rows:
        if ref and "latents" in r:
            print(f"{r['scenario']:<22} latents {'==' if r['latents']['sha256'] == ref['latents']['sha256'] else '!='} "
                  f"none | image {'==' if r['image_sha256'] == ref['image_sha256'] else '!='} none | "
                  f"{r['timings']['s_per_step']:.3f} s/step | peak {r['memory']['peak_allocated_gb']:.2f} GB")


if __name__ == "__main__":
    # optional: MODEL SIZE STEPS RECIPE... (a CPU dry run: flux-tiny 128 2 offload=none offload=staged)
    main(sys.argv[1], *sys.argv[2:5], *([sys.argv[5:]] if len(sys.argv) > 5 else []))
