"""What ``optic bench`` writes from its results: Markdown tables, the speed-up chart, the README block.

Everything here is computed from the results dict (bench.json), never measured, so a table can be
regenerated from a JSON file: ``benchmarks.runner.write(json.load(open(path)), out_dir)``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

OPTIC = ("optic", "optic-tvm")  # "optic (best backend)" is the faster of these
# the peers optic is held against: a row's verdict is against the fastest of them that ran and agreed
PEERS = {"compile": "torch.compile", "compile-freezing": "torch.compile (freezing)", "ort": "ONNX Runtime"}
README_BEGIN, README_END = "<!-- bench:begin -->", "<!-- bench:end -->"


# -- reading the results ---------------------------------------------------------------------------------
def shown_systems(results: dict) -> list[str]:
    """Systems with at least one row where they are not 'unavailable', in the requested order."""
    names = results["settings"]["systems"]
    return [s for s in names if any((r["systems"].get(s) or {}).get("status", "unavailable") != "unavailable"
                                    for r in results["rows"])]


def unavailable(results: dict) -> dict[str, str]:
    out = {}
    for r in results["rows"]:
        for s, rec in r["systems"].items():
            if rec and rec.get("status") == "unavailable":
                out.setdefault(s, rec.get("error", ""))
    return {s: why for s, why in out.items() if s not in shown_systems(results)}


def has(results: dict, *names: str) -> bool:
    """Whether any of ``names`` was asked for and could run here."""
    return any(n in shown_systems(results) for n in names)


def timed(rec: dict | None) -> bool:
    return bool(rec) and rec.get("status") == "ok" and "speedup" in rec


def best_optic(row: dict) -> tuple[str, dict] | None:
    """The fastest optic backend that ran and agreed with eager, or None."""
    found = [(s, row["systems"][s]) for s in OPTIC if timed(row["systems"].get(s))
             and row["systems"][s].get("within_tolerance", True)]
    return max(found, key=lambda kv: kv[1]["speedup"]) if found else None


def versus(a: dict, b: dict) -> tuple[float, float]:
    """How much faster system ``a`` is than ``b`` (from their speed-ups vs eager) and the noise that
    a difference must exceed (the wider of the two relative spreads)."""
    return a["speedup"] / b["speedup"], max(a.get("spread", 0.0), b.get("spread", 0.0))


def best_peer(row: dict) -> tuple[str, dict] | None:
    """The fastest peer (:data:`PEERS`) that ran and agreed with eager, or None."""
    found = [(s, row["systems"][s]) for s in PEERS if timed(row["systems"].get(s))
             and row["systems"][s].get("within_tolerance", True)]
    return max(found, key=lambda kv: kv[1]["speedup"]) if found else None


def _peers_asked(row: dict) -> bool:
    return any((row["systems"].get(p) or {}).get("status", "unavailable") != "unavailable" for p in PEERS)


def verdicts(results: dict, batch: int = 1) -> dict[str, list[str]]:
    """optic (best backend) against the fastest peer, per model at ``batch``: faster, tie (within
    noise), slower, or no comparison (every peer failed, or optic did)."""
    out: dict[str, list[str]] = {"faster": [], "tie": [], "slower": [], "peers fail": [], "optic fails": []}
    for r in results["rows"]:
        if r["batch"] != batch or r.get("error") or not _peers_asked(r):
            continue
        best, peer = best_optic(r), best_peer(r)
        if best is None:
            out["optic fails"].append(r["model"])
        elif peer is None:
            out["peers fail"].append(r["model"])
        else:
            ratio, noise = versus(best[1], peer[1])
            key = "faster" if ratio > 1 + noise else "slower" if ratio * (1 + noise) < 1 else "tie"
            out[key].append(r["model"])
    return out


def compile_summary(results: dict) -> list[str]:
    """One line per batch size: on how many models optic is at least as fast as the fastest peer."""
    lines = []
    for batch in results["settings"]["batches"]:
        v = verdicts(results, batch)
        n = sum(len(x) for x in v.values())
        if not n:
            continue
        at_least = len(v["faster"]) + len(v["tie"]) + len(v["peers fail"])
        lines.append(f"batch {batch}: at least as fast on {at_least} of {n} models (faster on {len(v['faster'])}, "
                     f"a tie within noise on {len(v['tie'])}, every peer fails on {len(v['peers fail'])}); "
                     f"slower on {len(v['slower'])}" + (f" ({', '.join(v['slower'])})" if v["slower"] else "")
                     + (f"; optic fails on {', '.join(v['optic fails'])}" if v["optic fails"] else "") + ".")
    return lines


def losses(results: dict) -> list[str]:
    """Every place optic (best backend) is slower than the fastest peer or eager beyond noise, fails, or
    disagrees with eager: one line each."""
    lines = []
    for r in results["rows"]:
        where = f"{r['model']} (batch {r['batch']})"
        if r.get("error"):
            continue
        best = best_optic(r)
        if best is None:
            rec = r["systems"].get("optic") or {}
            why = rec.get("error") or rec.get("check") or "not run"
            lines.append(f"{where}: optic does not run: {why}")
            continue
        name, rec = best
        if rec.get("slower_than_eager"):
            lines.append(f"{where}: {name} is slower than eager: {rec['speedup']:.2f}× "
                         f"({ms(rec['median_ms'])} vs {ms(rec['eager_ms'])} ms, noise ±{rec['noise'] * 50:.0f}%)")
        peer = best_peer(r)
        if peer is not None:
            ratio, noise = versus(rec, peer[1])
            if ratio * (1 + noise) < 1:
                lines.append(f"{where}: {name} is slower than {PEERS[peer[0]]}: {ratio:.2f}× its speed "
                             f"({ms(rec['median_ms'])} vs {ms(peer[1]['median_ms'])} ms, noise ±{noise * 50:.0f}%)")
    return lines


def failures(results: dict) -> list[str]:
    lines = []
    for r in results["rows"]:
        where = f"{r['model']} (batch {r['batch']})"
        if r.get("error"):
            lines.append(f"{where}: the model itself fails: {r['error']}")
        for s, rec in r["systems"].items():
            if rec and rec.get("status") == "failed":
                lines.append(f"{where}, {s}, {rec.get('stage', '?')}: {rec['error']}")
            elif rec and rec.get("within_tolerance") is False:
                lines.append(f"{where}, {s}: outside tolerance {r.get('tolerance', 0):g}: {rec.get('check', '')}")
    return lines


# -- Markdown -------------------------------------------------------------------------------------------
def ms(v: float) -> str:
    return f"{v:.0f}" if v >= 100 else f"{v:.1f}" if v >= 10 else f"{v:.2f}" if v >= 0.1 else f"{v:.3f}"


def _latency_cell(row: dict, s: str) -> str:
    rec = row["systems"].get(s)
    if row.get("error"):
        return "–"
    if not rec or rec.get("status") == "unavailable":
        return "n/a"
    if rec.get("status") == "failed":
        return f"fails ({rec.get('stage', '?')})"
    if "median_ms" not in rec:
        return "–"
    t = f"{ms(rec['median_ms'])} [{ms(rec['q1_ms'])}–{ms(rec['q3_ms'])}]"
    if rec.get("timing", "alternated") != "alternated":
        t += f" ({rec['timing']})"
    if rec.get("within_tolerance") is False:
        t += " ⚠ error"
    if s == "eager":
        return t
    mark = " (slower)" if rec.get("slower_than_eager") else ""
    return f"**{rec['speedup']:.2f}×**{mark} {t}"


def _prep_cell(row: dict, s: str) -> str:
    rec = row["systems"].get(s) or {}
    if rec.get("status") != "ok":
        return "–" if rec.get("status") != "failed" else "fails"
    return f"{rec['prepare_s']:.1f} s · {rec.get('max_rel_error', 0.0):.0e}"


def _table(head: list[str], rows: list[list[str]], right_from: int = 1) -> list[str]:
    lines = ["| " + " | ".join(head) + " |",
             "|" + "|".join("---" if i < right_from else "---:" for i in range(len(head))) + "|"]
    return lines + ["| " + " | ".join(r) + " |" for r in rows]


def latency_table(results: dict) -> list[str]:
    shown = shown_systems(results)
    rows = [[r["model"], str(r["batch"])] + [_latency_cell(r, s) for s in shown] for r in results["rows"]]
    return _table(["model", "batch"] + [f"{s} ms" if s == "eager" else s for s in shown], rows)


def coverage_rows(results: dict) -> list[list[str]]:
    out = []
    for r in results["rows"]:
        cov = r.get("coverage")
        optic_rec = r["systems"].get("optic") or {}
        if cov is None:
            why = r.get("error") or optic_rec.get("error") or "optic not run"
            out.append([r["model"], str(r["batch"]), r.get("expected_capture", "?"), f"fails: {why}", "", "", ""])
            continue
        passes = "; ".join(f"{p} ({', '.join(f'{k} {v}' for k, v in rules.items()) or 'changed'})"
                           for p, rules in cov["passes"].items()) or "none"
        back = "; ".join(f"{p}: {why}" for p, why in cov["rolled_back"].items()) or "–"
        capture = cov["capture"] + ("" if cov["capture"] == r.get("expected_capture") else
                                    f" (zoo says {r.get('expected_capture')})")
        out.append([r["model"], str(r["batch"]), capture, passes, back, str(cov["declined"]),
                    "→".join(str(n) for n in cov["nodes"])])
    return out


def markdown(results: dict) -> str:
    m, st = results["machine"], results["settings"]
    v = m["versions"]
    shown = shown_systems(results)
    lines = ["# optic bench", "",
             f"{m['cpu']}; {m['threads']} threads; torch {v.get('torch')}, onnxruntime {v.get('onnxruntime')}, "
             f"TVM {v.get('apache-tvm')}; optic {m['optic']} at commit {(m.get('commit') or '?')[:10]}; "
             f"{m['date']}; the run took {st['seconds'] / 60:.0f} min"
             + ("." if st.get("complete", True) else " so far (incomplete: still running, or interrupted)."), "",
             "## Latency", "",
             "Milliseconds per call, median [first–third quartile] over the timed blocks; **×** is the speed-up "
             "over eager PyTorch measured in the same alternated timing (higher is faster); (slower) marks a "
             "system slower than eager beyond the spread. Systems are alternated in blocks of about "
             f"{st['block_s'] * 1e3:.0f} ms over {st['rounds']}+ rounds, at least {st['min_calls']} timed calls "
             f"each; a system slower than that allows is timed apart with eager, or once (call > "
             f"{st['single_run_s']:.0f} s). Everything runs under `torch.no_grad()`."
             + (f" Before timing, the systems were called in turn until each had run {st['warmup_s']:.0f} s "
                "(a fresh process's first seconds here run up to 10× slower)." if st.get("warmup_s") else ""), ""]
    lines += latency_table(results)
    if has(results, *OPTIC) and has(results, *PEERS):
        lines += ["", "## optic against the fastest peer (torch.compile, with freezing, ONNX Runtime)", ""] + [f"- {x}" for x in compile_summary(results)]
    if has(results, *OPTIC):
        lines += ["", "## Where optic loses", ""]
        lines += [f"- {x}" for x in losses(results)] or ["- nowhere beyond noise in this run."]
    lines += ["", "## Preparation time and max error vs eager", "",
              "Seconds to prepare (optic: capture, passes, verification, measured tactics; compile: "
              "inductor's first calls with its caches off; ort: ONNX export and session; tvm-default: export, "
              "import, build) · max |Δ| relative to the output scale.", ""]
    others = [s for s in shown if s != "eager"]
    lines += _table(["model", "batch"] + others,
                    [[r["model"], str(r["batch"])] + [_prep_cell(r, s) for s in others] for r in results["rows"]])
    if has(results, "optic"):
        lines += ["", "## Capture coverage", "",
                  "Which capture path optic took, and which passes changed the graph (rule: matches).", ""]
        lines += _table(["model", "batch", "capture", "passes applied", "rolled back", "declines", "nodes"],
                        coverage_rows(results), right_from=5)
    fails = failures(results)
    lines += ["", "## Failures", ""] + ([f"- {x}" for x in fails] or ["- none."])
    missing = unavailable(results)
    if missing:
        lines += ["", "## Not available here", ""] + [f"- {s}: {why}" for s, why in missing.items()]
    return "\n".join(lines) + "\n"


def readme_block(results: dict, image: str | None) -> str:
    m = results["machine"]
    lines = [README_BEGIN,
             f"Measured on {m['cpu']} with {m['threads']} threads, {m['date']} "
             f"(commit {(m.get('commit') or '?')[:10]}; the run took {results['settings']['seconds'] / 60:.0f} min); "
             "all tables: `benchmarks/results/bench.md`.", ""]
    lines += latency_table(results)
    if image:
        lines += ["", f"![speed-up vs eager]({image})"]
    if has(results, *OPTIC) and has(results, *PEERS):
        lines += ["", "optic (the faster of its backends) against the fastest peer that ran:", ""]
        lines += [f"- {x}" for x in compile_summary(results)]
    if has(results, *OPTIC):
        lines += ["", "Where optic loses:", ""] + ([f"- {x}" for x in losses(results)] or ["- nowhere beyond noise."])
    return "\n".join(lines + [README_END])


_BLOCK = re.compile(re.escape(README_BEGIN) + ".*?" + re.escape(README_END), re.S)


def check_readme(path: Path) -> None:
    """Raise ValueError unless ``path`` holds a bench block to replace (checked before a long run)."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ValueError(f"cannot read {path}: {e.strerror or e}") from None
    if not _BLOCK.search(text):
        raise ValueError(f"{path} has no '{README_BEGIN}' … '{README_END}' block to replace")


def update_readme(path: Path, results: dict, image: str | None) -> None:
    """Replace the block between the bench markers in ``path`` with the latest table and chart."""
    check_readme(path)
    text = path.read_text(encoding="utf-8")
    path.write_text(_BLOCK.sub(lambda _m: readme_block(results, image), text, count=1), encoding="utf-8")


def row_summary(row: dict) -> str:
    head = f"{row['model']} batch {row['batch']}"
    if row.get("error"):
        return f"{head}: fails: {row['error']}"
    parts = []
    for s, rec in row["systems"].items():
        if s == "eager" and timed(rec):
            parts.append(f"eager {ms(rec['median_ms'])} ms")
        elif timed(rec):
            parts.append(f"{s} {rec['speedup']:.2f}×")
        elif rec and rec.get("status") == "failed":
            parts.append(f"{s} fails")
    return f"{head}: {', '.join(parts)} ({row.get('seconds', 0):.0f} s)"


# -- the chart ------------------------------------------------------------------------------------------
def chart(results: dict, path: Path) -> bool:
    """Grouped bars of speed-up vs eager, one panel per batch size; False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import FuncFormatter
    except ImportError:
        return False
    batches = results["settings"]["batches"]
    models = list(dict.fromkeys(r["model"] for r in results["rows"]))
    systems = [s for s in shown_systems(results) if s != "eager"]
    if not models or not systems:
        return False
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    fig, axes = plt.subplots(len(batches), 1, figsize=(max(7.0, 0.8 * len(models)), 3.6 * len(batches)),
                             squeeze=False)
    width = 0.8 / len(systems)
    for ax, batch in zip(axes[:, 0], batches, strict=True):
        rows = {r["model"]: r for r in results["rows"] if r["batch"] == batch}
        for j, s in enumerate(systems):
            xs, ys, lo, hi, fail_x = [], [], [], [], []
            for i, m in enumerate(models):
                rec = (rows.get(m) or {}).get("systems", {}).get(s)
                x = i - 0.4 + width * (j + 0.5)
                if timed(rec):
                    e, q1, q3 = rec["eager_ms"], rec["q1_ms"], rec["q3_ms"]
                    xs.append(x)
                    ys.append(rec["speedup"])
                    lo.append(max(0.0, rec["speedup"] - e / max(q3, 1e-12)))
                    hi.append(max(0.0, e / max(q1, 1e-12) - rec["speedup"]))
                elif rec and rec.get("status") == "failed":
                    fail_x.append(x)
            color = colors[j % len(colors)]
            # bars grow from 1× (up: faster than eager, down: slower), on a log scale
            ax.bar(xs, [y - 1.0 for y in ys], width, bottom=1.0, label=s, color=color, yerr=[lo, hi],
                   error_kw={"lw": 0.6, "capsize": 1.5})
            if fail_x:
                ax.plot(fail_x, [1.0] * len(fail_x), "x", color=color, ms=6)
        ax.axhline(1.0, color="black", lw=0.8)
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _pos: f"{v:g}×"))
        ax.set_ylabel("speed-up vs eager (×, log)")
        ax.set_title(f"batch {batch}")
        ax.set_xticks(range(len(models)), models, rotation=40, ha="right", fontsize=8)
        ax.grid(axis="y", which="both", lw=0.3, alpha=0.5)
    axes[0, 0].legend(fontsize=7, ncol=len(systems), loc="best")
    m = results["machine"]
    fig.suptitle(f"speed-up over eager PyTorch, {m['cpu'].split(',')[0]}, {m['threads']} threads\n"
                 "whiskers: quartile range; × on the 1.0 line: the system fails", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def save(out: str | Path, stem: str, results: dict, markdown: str) -> None:
    """A benchmark's ``results`` as ``<stem>.json`` and its ``markdown`` as ``<stem>.md`` in ``out`` (made
    where missing), and the markdown printed."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(results, indent=2, default=str))
    (out / f"{stem}.md").write_text(markdown)
    print(markdown)
