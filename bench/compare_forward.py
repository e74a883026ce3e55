#!/usr/bin/env python3
"""bench/compare_forward.py: `automoe forward` output against a reference file (the Transformers
fixture's reference.safetensors, or another forward's OUT): logits rel-L2, loss and aux loss,
and the worst gradient rel-L2 when both carry grad.* tensors. Exit 1 when a limit is passed.
  python3 bench/compare_forward.py OUT REF [--logits 2e-2] [--loss 1e-2] [--grads 5e-2]
                                   [--hf-noise FILE --fixture NAME]
The default limits are bf16's (cuda_parity's fixed ones). With --hf-noise (bench/hf_bf16_noise.py's
output: what bf16 costs Transformers itself on the fixture) a logits or gradient limit is
max(the fixed one, 3x Transformers' own bf16 error), as in cuda_parity."""
import json
import argparse, sys
import numpy as np
from safetensors.numpy import load_file

ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
ap.add_argument("out")
ap.add_argument("ref")
ap.add_argument("--logits", type=float, default=2e-2)
ap.add_argument("--loss", type=float, default=1e-2)
ap.add_argument("--grads", type=float, default=5e-2)
ap.add_argument("--hf-noise")
ap.add_argument("--fixture")
a = ap.parse_args()
noise = json.load(open(a.hf_noise)).get(a.fixture, {}) if a.hf_noise and a.fixture else {}
def limit(fixed, hf):
    return max(fixed, 3 * hf) if isinstance(hf, (int, float)) else fixed
got, ref = load_file(a.out), load_file(a.ref)

def rel(x, y):
    x, y = x.astype(np.float64).ravel(), y.astype(np.float64).ravel()
    d = np.linalg.norm(y)
    return np.linalg.norm(x - y) / d if d > 0 else np.linalg.norm(x)

fails = 0
def check(name, value, limit):
    global fails
    ok = value <= limit
    fails += not ok
    print(f"{'ok  ' if ok else 'FAIL'} {name:12s} {value:.3e} (limit {limit:g})")

check("logits", rel(got["logits"], ref["logits"]), limit(a.logits, noise.get("logits")))
for k in ("loss", "aux_loss"):
    if k in got and k in ref:
        check(k, abs(float(got[k][0]) - float(ref[k][0])) / max(abs(float(ref[k][0])), 1e-12), a.loss)
grads = [k for k in ref if k.startswith("grad.") and k in got]
if grads:
    # judged per tensor against its own limit; the worst one by its share of the limit
    lim = {k: limit(a.grads, noise.get("grads", {}).get(k[5:])) for k in grads}
    worst = max(grads, key=lambda k: rel(got[k], ref[k]) / lim[k])
    check(f"grads ({len(grads)})", rel(got[worst], ref[worst]), lim[worst])
    print(f"     worst gradient against its limit: {worst}")
sys.exit(1 if fails else 0)
