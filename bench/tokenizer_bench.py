#!/usr/bin/env python3
# bench/tokenizer_bench.py: encode throughput of `automoe encode` against HF `tokenizers`, both
# single-threaded, on one large text (all of gsm8k train, question and answer, concatenated).
# Prints MB/s for each and checks that both give the same ids.
#   python3 bench/tokenizer_bench.py [--cli build/automoe] [--tokenizer PATH] [--repeat 3]
import argparse, json, os, subprocess, sys, tempfile, time

os.environ["RAYON_NUM_THREADS"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"
import tokenizers  # noqa: E402
from tokenizers import Tokenizer  # noqa: E402

root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
data = os.path.join(root, "..", "shared", "data")
ap = argparse.ArgumentParser()
ap.add_argument("--cli", default=os.path.join(root, "build", "automoe"))
ap.add_argument("--tokenizer", default=os.path.join(data, "tokenizers", "qwen3", "tokenizer.json"))
ap.add_argument("--repeat", type=int, default=3)
args = ap.parse_args()

rows = [json.loads(l) for l in open(os.path.join(data, "sft", "gsm8k", "train.jsonl"), encoding="utf-8")]
text = "\n\n".join(r["question"] + "\n" + r["answer"] for r in rows)
raw = text.encode("utf-8")
mb = len(raw) / 1e6
print(f"text: gsm8k train, {len(rows)} rows, {mb:.2f} MB; tokenizer {args.tokenizer}")

with tempfile.TemporaryDirectory() as tmp:
    big, empty = os.path.join(tmp, "big.txt"), os.path.join(tmp, "empty.txt")
    open(big, "wb").write(raw)
    open(empty, "wb").close()

    def cli(path):
        t = time.perf_counter()
        with open(path, "rb") as f:
            out = subprocess.run([args.cli, "encode", "--tokenizer", args.tokenizer], stdin=f, capture_output=True, check=True)
        return time.perf_counter() - t, out.stdout

    load = min(cli(empty)[0] for _ in range(args.repeat))
    runs = [cli(big) for _ in range(args.repeat)]
    total = min(t for t, _ in runs)
    ours = [int(x) for x in runs[0][1].split()]

tok = Tokenizer.from_file(args.tokenizer)
hf_times = []
for _ in range(args.repeat):
    t = time.perf_counter()
    theirs = tok.encode(text).ids
    hf_times.append(time.perf_counter() - t)
hf = min(hf_times)
docs = [r["question"] + "\n" + r["answer"] for r in rows]  # HF's other usual mode, for reference
batch_times = []
for _ in range(args.repeat):
    t = time.perf_counter()
    tok.encode_batch(docs)
    batch_times.append(time.perf_counter() - t)
hf_batch = min(batch_times)

enc = total - load
print(f"automoe encode: {total:.2f} s end to end ({mb / total:.1f} MB/s), load {load:.2f} s, "
      f"encode {enc:.2f} s = {mb / enc:.1f} MB/s; {len(ours)} tokens")
print(f"HF tokenizers {tokenizers.__version__} encode (one string): {hf:.2f} s = {mb / hf:.1f} MB/s; {len(theirs)} tokens")
print(f"HF tokenizers encode_batch ({len(docs)} rows, 1 thread): {hf_batch:.2f} s = {mb / hf_batch:.1f} MB/s")
print(f"automoe encode-only speed-up: {hf / enc:.1f}x over HF one string, {hf_batch / enc:.1f}x over HF batch; "
      f"same ids: {ours == theirs}")
sys.exit(0 if ours == theirs else 1)
