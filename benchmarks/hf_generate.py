"""Hugging Face generate() through optic: time per generated token against eager, same run.

    python -m benchmarks.hf_generate [--models hf_gpt2,hf_llama] [--prompt 16] [--new 20] [--out benchmarks/results]

For each zoo causal LM (random weights from its config, never downloaded):

- ``eager+cache``: ``model.generate(ids, max_new_tokens=N, do_sample=False)``, the KV cache on (the default);
- ``eager``: the same with ``use_cache=False``, each step computing the whole sequence;
- ``optic``: ``optic.optimize(model, (ids,))`` then ``result.generate(...)``; optic's generation graph has no
  KV cache (optic.hf), so ``eager`` is the like-for-like baseline and ``eager+cache`` what a user has today.

Each system generates greedily from the same prompt (the tokens are checked equal to eager's), after a 2 s
warm-up each; the three are alternated in blocks over several rounds (optic.pipeline.timing.compare), and the
figure is the median time of one generate() call divided by the tokens it made, with the interquartile
spread.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
MODELS = ("hf_gpt2", "hf_llama")


def run_model(name: str, prompt: int, new: int, rounds: int) -> dict:
    import optic
    from benchmarks.runner import warm_up
    from benchmarks.zoo import get
    from optic.pipeline.timing import compare

    model = get(name).factory().eval()
    ids = torch.randint(2, model.config.vocab_size, (1, prompt), generator=torch.Generator().manual_seed(0))
    t0 = time.perf_counter()
    result = optic.optimize(model, (ids,))
    optimize_s = time.perf_counter() - t0
    kw = {"max_new_tokens": new, "do_sample": False, "pad_token_id": 0}
    fns = {
        "eager+cache": lambda: model.generate(ids, **kw),
        "eager": lambda: model.generate(ids, use_cache=False, **kw),
        "optic": lambda: result.generate(ids, **kw),
    }
    with torch.no_grad():
        outs = {k: fn() for k, fn in fns.items()}
    same = {k: bool(torch.equal(v, outs["eager"])) for k, v in outs.items()}
    tokens = int(outs["eager"].shape[1] - prompt)
    warm_up(fns, 2.0)
    t = compare(fns, rounds=rounds, block=1, warmup=0)
    per_token = {k: {"ms": v.median / tokens * 1e3, "q1_ms": v.q1 / tokens * 1e3, "q3_ms": v.q3 / tokens * 1e3,
                     "spread": v.spread} for k, v in t.items()}
    return {"model": name, "prompt": prompt, "new_tokens": tokens, "optimize_s": optimize_s,
            "same_tokens_as_eager": same, "per_token": per_token,
            "generation_graph": {"passes": [(p.name, p.status) for p in result.optic_generate.report.passes],
                                 "dynamic": result.optic_generate.report.dynamic}}


def markdown(results: list[dict]) -> str:
    lines = ["| model | eager + KV cache | eager, no cache | optic (no cache) | optic vs eager no cache | "
             "optic vs eager + cache | same tokens |", "|---|---:|---:|---:|---:|---:|---|"]
    for r in results:
        p = r["per_token"]

        def cell(k: str, p: dict = p) -> str:
            return f"{p[k]['ms']:.2f} ms ±{p[k]['spread'] * 50:.0f}%"
        lines.append(f"| {r['model']} (prompt {r['prompt']}, {r['new_tokens']} new) | {cell('eager+cache')} | "
                     f"{cell('eager')} | {cell('optic')} | {p['eager']['ms'] / p['optic']['ms']:.2f}× | "
                     f"{p['eager+cache']['ms'] / p['optic']['ms']:.2f}× | "
                     f"{'yes' if all(r['same_tokens_as_eager'].values()) else 'NO'} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--prompt", type=int, default=16)
    ap.add_argument("--new", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = ap.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    results = []
    for name in args.models.split(","):
        print(f"{name}: optimizing and timing...", file=sys.stderr)
        results.append(run_model(name, args.prompt, args.new, args.rounds))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "hf_generate.json").write_text(json.dumps(
        {"machine": _machine(), "torch": torch.__version__, "results": results}, indent=2))
    table = markdown(results)
    (args.out / "hf_generate.md").write_text(f"Time per generated token (greedy, batch 1), {_machine()}\n\n{table}\n")
    print(table)
    return 0


def _machine() -> str:
    from optic.targets.cpu import read_host_facts

    f = read_host_facts()
    return f"{f.model or f.machine}, {torch.get_num_threads()} threads"


if __name__ == "__main__":
    sys.exit(main())
