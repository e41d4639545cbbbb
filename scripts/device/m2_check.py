"""Run a Mamba-2-style (zoology-mqar.yaml's m2 block) HybridLM step on the GPU in each precision and print
any failure's full traceback (a Triton CompilationError in GPU runs on 2026-12-04).

    python3 scripts/device/m2_check.py
"""
import traceback

import torch
import yaml

from hybridlab.arch import HybridLM, load_model_spec

job = yaml.safe_load(open("jobs/recipes/zoology-mqar.yaml"))
m = dict(job["model"], layout="m2 m2")
for dtype in (torch.float32, torch.bfloat16):
    for block in ("m2", "m3"):
        torch.manual_seed(0)
        model = HybridLM(load_model_spec(dict(m, layout=f"{block} {block}"))).cuda()
        tok = torch.randint(0, 8192, (8, 64), device="cuda")
        tgt = torch.randint(0, 8192, (8, 64), device="cuda")
        try:
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=dtype is torch.bfloat16):
                loss = model(tok, targets=tgt)
            loss.backward()
            torch.cuda.synchronize()
            print(block, dtype, "ok", float(loss), flush=True)
        except Exception:
            print(block, dtype, "FAILED", flush=True)
            traceback.print_exc()
