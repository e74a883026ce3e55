#!/usr/bin/env python3
"""bench/compare_loss_curves.py: two metrics.jsonl loss curves of the same recipe and data order
(e.g. one GPU with micro_batch 16 against `mpirun -np 2 ... --train.ep 2` with micro_batch 8 per
rank: the same global batches) must agree within bf16 noise.

    python3 bench/compare_loss_curves.py REF.jsonl RUN.jsonl [--first-rel 0.01] [--max-abs 0.1]
                                         [--tail-rel 0.05] [--tail 10]
    python3 bench/compare_loss_curves.py --exact REF.jsonl RUN.jsonl

--exact: every step's loss and grad norm must be equal, bit for bit (runs that should do the same
arithmetic: train.zero 1 against train.zero 0 on the same ranks, a resumed run against the
uninterrupted one). Prints the first steps that differ.

Limits (defaults), and why:
  first-rel  step 1's loss (and grad norm) relative difference <= 1%. Both runs start from the
             same weights and see the same tokens; only the order of sums and the bf16 roundings
             differ (per-rank GEMM shapes, the experts' rows split over ranks, the CE and the
             gradients summed over ranks in fp32 and rounded to bf16 once more). bf16 has a
             relative step of 2^-8 = 0.4%; 1% allows a few roundings to line up.
  max-abs    along the whole curve |loss difference| <= 0.1. AdamW amplifies rounding
             differences step after step; on this task CPU fp32 and CUDA bf16, from the same
             weights, differed by at most 0.085 over 300 steps (bench/RESULTS.md), which is what
             bf16 alone does to the curve.
  tail-rel   the mean loss of the last `tail` steps differs by <= 5%: both runs learn alike.
Prints one line per check (ok / FAIL) and exits with the number of failures.
"""
import argparse
import json
import sys


def curve(path):
    rows = {}
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line:
                j = json.loads(line)
                rows[int(j["step"])] = j
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("ref")
    ap.add_argument("run")
    ap.add_argument("--first-rel", type=float, default=0.01)
    ap.add_argument("--max-abs", type=float, default=0.1)
    ap.add_argument("--tail-rel", type=float, default=0.05)
    ap.add_argument("--tail", type=int, default=10)
    ap.add_argument("--exact", action="store_true", help="every loss and grad norm bit-identical")
    a = ap.parse_args()
    ref, run = curve(a.ref), curve(a.run)
    steps = sorted(set(ref) & set(run))
    fails = 0

    def check(ok, what):
        nonlocal fails
        fails += not ok
        print(f"{'ok  ' if ok else 'FAIL'} {what}")

    check(len(steps) > 0 and len(steps) == len(ref) == len(run),
          f"steps: {len(ref)} in {a.ref}, {len(run)} in {a.run}, {len(steps)} in common")
    if not steps:
        return 1
    if a.exact:  # the JSON floats round-trip, so equal text values are equal bits
        for key in ("loss", "grad_norm"):
            bad = [s for s in steps if ref[s][key] != run[s][key]]
            check(not bad, f"{key}: {len(steps) - len(bad)} of {len(steps)} steps identical"
                  + "".join(f"; step {s}: {ref[s][key]!r} vs {run[s][key]!r}" for s in bad[:3]))
        print(f"     step {steps[-1]:5d}  ref {ref[steps[-1]]['loss']!r}  run {run[steps[-1]]['loss']!r}")
        print(f"compare_loss_curves: {fails} failed")
        return fails
    s1 = steps[0]
    for key in ("loss", "grad_norm"):
        r, g = ref[s1][key], run[s1][key]
        rel = abs(g - r) / max(abs(r), 1e-12)
        check(rel <= a.first_rel, f"step {s1} {key}: {r:.6f} vs {g:.6f}, rel diff {rel:.2e} "
              f"(limit {a.first_rel:.0e})")
    diffs = [abs(run[s]["loss"] - ref[s]["loss"]) for s in steps]
    worst = max(range(len(steps)), key=lambda i: diffs[i])
    check(diffs[worst] <= a.max_abs, f"largest |loss diff| {diffs[worst]:.4f} at step "
          f"{steps[worst]} (limit {a.max_abs})")
    tail = steps[-a.tail:]
    mr = sum(ref[s]["loss"] for s in tail) / len(tail)
    mg = sum(run[s]["loss"] for s in tail) / len(tail)
    rel = abs(mg - mr) / max(abs(mr), 1e-12)
    check(rel <= a.tail_rel, f"mean loss of the last {len(tail)} steps: {mr:.4f} vs {mg:.4f}, "
          f"rel diff {rel:.2e} (limit {a.tail_rel})")
    for s in steps[:: max(1, len(steps) // 10)] + ([steps[-1]] if len(steps) > 1 else []):
        print(f"     step {s:5d}  ref {ref[s]['loss']:.5f}  run {run[s]['loss']:.5f}  "
              f"grad_norm {ref[s]['grad_norm']:.4f} / {run[s]['grad_norm']:.4f}")
    print(f"compare_loss_curves: {fails} failed")
    return fails


if __name__ == "__main__":
    sys.exit(main())
