"""bench/hf_bf16_noise.py: what bf16 costs Transformers itself on the parity fixtures, the yardstick
for the CUDA path's "within bf16 tolerance". For each tests/fixtures/hf/tiny_* model: native
Transformers in bf16 on the GPU, one forward + backward on the fixture's batch, and the rel-L2 of
its logits and of every parameter gradient against the fixture's fp32 reference (the numbers
automoe's CPU path matches to 1e-6). Writes {fixture: {"logits": e, "loss_rel": e, "grads":
{hf_name: e}}} as JSON; cuda_parity --hf-noise FILE allows the CUDA path a few times these.
Run on the GPU machine (torch + transformers):  python3 bench/hf_bf16_noise.py OUT.json
"""
import glob, json, math, os, sys
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

def rel_l2(a, b):
    a, b = a.double().flatten(), b.double().flatten()
    den = (b * b).sum().item()
    num = ((a - b) ** 2).sum().item()
    return math.sqrt(num / den) if den > 0 else math.sqrt(num)

root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures", "hf")
out = {}
for fx in sorted(glob.glob(os.path.join(root, "tiny_*"))):
    name = os.path.basename(fx)
    ref = load_file(os.path.join(fx, "reference.safetensors"))
    # eager experts: torch's grouped_mm wants 16-byte strides, which these odd sizes lack
    model = AutoModelForCausalLM.from_pretrained(os.path.join(fx, "model"), dtype=torch.bfloat16,
                                                 attn_implementation="sdpa",
                                                 experts_implementation="eager").cuda()
    model.train()
    ids, labels = ref["input_ids"].cuda(), ref["labels"].cuda()
    res = model(input_ids=ids, labels=labels)
    res.loss.backward()
    items = {}  # gradients under the names save_pretrained writes (per-expert keys), as the fixtures
    for pname, p in model.named_parameters():
        g = p.grad.detach().float().cpu() if p.grad is not None else torch.zeros(p.shape)
        if pname.endswith("mlp.experts.gate_up_proj"):
            base, I = pname[: -len("gate_up_proj")], g.shape[1] // 2
            for e in range(g.shape[0]):
                items[f"{base}{e}.gate_proj.weight"] = g[e, :I]
                items[f"{base}{e}.up_proj.weight"] = g[e, I:]
        elif pname.endswith("mlp.experts.down_proj"):
            base = pname[: -len("down_proj")]
            for e in range(g.shape[0]):
                items[f"{base}{e}.down_proj.weight"] = g[e]
        else:
            items[pname] = g
    grads = {n: rel_l2(g, ref["grad." + n]) for n, g in items.items() if "grad." + n in ref}
    entry = {"grads": grads,
             "loss_rel": abs(res.loss.item() - ref["loss"].item()) / abs(ref["loss"].item()) if "loss" in ref else None}
    if "logits" in ref:
        entry["logits"] = rel_l2(res.logits.float().cpu(), ref["logits"])
    out[name] = entry
    worst = max(grads.items(), key=lambda kv: kv[1]) if grads else ("-", 0)
    print(f"{name}: HF bf16 vs fp32: logits rel-L2 {entry.get('logits', float('nan')):.3e}, "
          f"worst grad rel-L2 {worst[1]:.3e} ({worst[0]})", flush=True)
    del model
json.dump(out, open(sys.argv[1], "w"), indent=1)
