"""bench/kernel_table.py: the ten most expensive kernels of an `ncu --csv --print-units base`
log (bench/device.sh's profile stage), aggregated by kernel name: total time, share of all
kernel time, launches, and the time-weighted SM and DRAM throughput as % of the device's peak
(a kernel near 100% of either is at its roofline; low on both is latency or launch bound).
Set-up kernels (the benchmark's random init) are not part of a step and are left out.
    python3 bench/kernel_table.py profile.log [N]
"""
SETUP = ("fill_normal_kernel", "fill_const_kernel", "fill_kernel")
import csv, io, sys
from collections import defaultdict

lines = open(sys.argv[1], errors="replace").read().splitlines()
start = next((i for i, l in enumerate(lines) if l.startswith('"ID"')), None)
if start is None:
    sys.exit("kernel_table.py: no ncu CSV table in " + sys.argv[1])
rows = list(csv.DictReader(io.StringIO("\n".join(l for l in lines[start:] if l.startswith('"')))))
k = defaultdict(lambda: {"ns": 0.0, "n": set(), "sm": 0.0, "dram": 0.0})
for r in rows:
    name, metric, value = r["Kernel Name"], r["Metric Name"], r["Metric Value"].replace(",", "")
    try:
        v = float(value)
    except ValueError:
        continue
    if any(t in name for t in SETUP):
        continue
    key = (r["ID"], name)
    k[key][metric] = v
agg = defaultdict(lambda: {"ns": 0.0, "n": 0, "sm": 0.0, "dram": 0.0})
for (kid, name), m in k.items():
    t = m.get("gpu__time_duration.sum", 0.0)
    a = agg[name]
    a["ns"] += t
    a["n"] += 1
    a["sm"] += t * m.get("sm__throughput.avg.pct_of_peak_sustained_elapsed", 0.0)
    a["dram"] += t * m.get("dram__throughput.avg.pct_of_peak_sustained_elapsed", 0.0)
total = sum(a["ns"] for a in agg.values())
n = int(sys.argv[2]) if len(sys.argv) > 2 else 10
print(f"kernels: {sum(a['n'] for a in agg.values())} launches, {len(agg)} distinct, {total / 1e6:.2f} ms in all")
print(f"{'ms':>8s} {'share':>6s} {'calls':>5s} {'SM%':>5s} {'DRAM%':>6s}  kernel")
for name, a in sorted(agg.items(), key=lambda kv: -kv[1]["ns"])[:n]:
    t = a["ns"]
    short = name if len(name) <= 90 else name[:87] + "..."
    print(f"{t / 1e6:8.3f} {100 * t / total:5.1f}% {a['n']:5d} {a['sm'] / t if t else 0:5.1f} {a['dram'] / t if t else 0:6.1f}  {short}")
