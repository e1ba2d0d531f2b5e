"""Calibration sweep on a GPU: activation/workspace peaks and per-call latency of each stage vs resolution.

Builds flux-dev random stand-in components one at a time and records, per resolution, the peak memory above
the weights and the time of one call. Feeds the planner's memory and latency model (vramfit/plan.py).
Usage: python benchmarks/calibrate.py OUT.jsonl
"""

import json
import sys
import time

import torch

from vramfit import measure, models, probe

GB = 1e9


def rows_out(path):
    f = open(path, "a")

    def emit(row):
        row.update(device=measure.device_info(torch.device("cuda")).get("name"), versions=measure.versions(),
                   weights="random", time=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
        f.write(json.dumps(row) + "\n")
        f.flush()
        print(json.dumps(row), flush=True)

    return emit


def timed(fn, reps=3):
    fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        ts.append(time.perf_counter() - t)
    return sorted(ts)[len(ts) // 2]


def peak_above(fn, base_bytes):
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base_bytes) / GB


def main(out):
    emit = rows_out(out)
    dev = torch.device("cuda")
    emit({"kind": "probe", **probe.measure_profile(dev)})
    spec = models.get_model("flux-dev")

    # transformer: one denoising step (one forward) per resolution, text length 512
    tr = models.build_random_component(spec, "transformer", 0, dev, torch.bfloat16)
    base = torch.cuda.memory_allocated()
    txt = 512
    for res in (512, 768, 1024, 1536):
        for batch in (1, 2) if res == 1024 else (1,):
            seq = (res // 16) ** 2
            x = torch.randn(batch, seq, 64, device=dev, dtype=torch.bfloat16)
            e = torch.randn(batch, txt, 4096, device=dev, dtype=torch.bfloat16)
            pooled = torch.randn(batch, 768, device=dev, dtype=torch.bfloat16)
            img_ids = torch.zeros(seq, 3, device=dev)
            txt_ids = torch.zeros(txt, 3, device=dev)
            t = torch.full((batch,), 0.5, device=dev)
            g = torch.full((batch,), 3.5, device=dev)

            def fwd():
                with torch.inference_mode():
                    tr(hidden_states=x, encoder_hidden_states=e, pooled_projections=pooled, timestep=t,
                       img_ids=img_ids, txt_ids=txt_ids, guidance=g, return_dict=False)

            act = peak_above(fwd, base)
            emit({"kind": "transformer_step", "res": res, "batch": batch, "img_tokens": seq, "txt_tokens": txt,
                  "weights_gb": base / GB, "activation_peak_gb": act, "s": timed(fwd)})
            del x, e
    del tr
    measure.free_memory(dev)

    for comp, tokens in (("text_encoder_2", 512), ("text_encoder", 77)):
        m = models.build_random_component(spec, comp, 0, dev, torch.bfloat16)
        base = torch.cuda.memory_allocated()
        ids = torch.randint(0, 255, (1, tokens), device=dev)

        def enc():
            with torch.inference_mode():
                m(ids, output_hidden_states=False)

        emit({"kind": f"{comp}_encode", "tokens": tokens, "weights_gb": base / GB,
              "activation_peak_gb": peak_above(enc, base), "s": timed(enc)})
        del m
        measure.free_memory(dev)

    vae = models.build_random_component(spec, "vae", 0, dev, torch.bfloat16)
    base = torch.cuda.memory_allocated()
    for tiling in (False, True):
        if tiling:
            vae.enable_tiling()
        for res in (512, 1024, 1536, 2048):
            z = torch.randn(1, 16, res // 8, res // 8, device=dev, dtype=torch.bfloat16)

            def dec():
                with torch.inference_mode():
                    vae.decode(z, return_dict=False)

            try:
                act = peak_above(dec, base)
                emit({"kind": "vae_decode", "res": res, "tiling": tiling, "weights_gb": base / GB,
                      "activation_peak_gb": act, "s": timed(dec, reps=2)})
            except torch.OutOfMemoryError as err:
                emit({"kind": "vae_decode", "res": res, "tiling": tiling, "error": f"OOM: {err}"[:300]})
            del z
            measure.free_memory(dev)


if __name__ == "__main__":
    main(sys.argv[1])
