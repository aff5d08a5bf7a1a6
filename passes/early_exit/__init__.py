"""early_exit: return a classifier's answer from an early block when a small head is confident. Lossy.

For a model whose output is ``[N, K]`` logits:

- **where**: block boundaries, the stream nodes ``v`` of the dataflow DAG that dominate the output
  (networkx) and are then the only value of the model's data flow live across the cut after
  them; side values (attention masks, shapes: parameter-free functions of the inputs and
  constants) may cross too and are passed along (``optic.passes.early_exit.segments``). A cut right before a
  norm/activation that only finishes ``v`` moves behind it. Up to ``exit_points`` cuts (default 3)
  are chosen near ``i/(n+1)`` of the model's predicted cost on the target (``cost.node_seconds``);
  features must be 2-D/3-D/4-D float.
- **heads**: ``ExitHead`` per cut (pool → [LayerNorm] → Linear), trained with the backbone frozen
  on the fit split by self-distillation from the model's own logits ``z``::

      L = Σ_heads T²·KL(softmax(z/T) ‖ softmax(h/T)) + CE(h, labels)   (T = 2; CE when labeled)

  with Adam on pooled features recorded once; seeded, deterministic (zero-initialized linears).
- **thresholds**: a sample leaves at the first head whose max softmax probability reaches the
  head's threshold. Greedy over per-head threshold grids (confidence quantiles, strict to loose):
  each step takes the loosening with the largest predicted saving per unit of metric drop
  (``ctx.evaluator`` on the fit split) that keeps the drop and the share of changed predictions
  within ``exit_fit_share`` of ``ctx.budget_left``; heads that exit nobody are removed.
- **runner**: ``Program.runner`` becomes an ``EarlyExitRunner``; ``gm`` is untouched.

Not exact: outputs of exited samples are the head's logits. Declines when there is no budget or
calibration, the output is not only ``[N, K]`` logits, a runner is already set, or no cut exists.
"""

from __future__ import annotations

import copy
import inspect
import itertools
import math
from dataclasses import dataclass
from typing import Any

import networkx as nx
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch.utils import _pytree as pytree

from optic.budget.calibration import iter_values
from optic.ir.graph import dtype as dtype_of
from optic.ir.graph import shape as shape_of
from optic.ir.graph import value_users
from optic.ir.opview import kind_of
from optic.pipeline import cost
from optic.pipeline.registry import Option, register
from optic.pipeline.timing import compare_models, rotating
from optic.pipeline.verify import run_seeded

from .segments import (
    EarlyExitRunner,
    ExitHead,
    assign,
    confidence,
    output_values,
    side_nodes,
    split,
)

RULE = "early_exit"
NEVER = 1.01  # a threshold no softmax probability reaches
# ops that only finish the value they read: a cut goes behind them
_FINISHING = frozenset({"batch_norm", "layer_norm", "rms_norm", "group_norm", "act", "dropout", "identity", "cast",
                        "contiguous"})
_ARGMAX_METRICS = ("top1", "agreement")  # metrics that read only each sample's top-1
_EXIT_RATES = (0.01, 0.02, 0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 1.0)


# -- where -----------------------------------------------------------------------------------------
@dataclass
class Cut:
    node: str
    module: str  # the module the node belongs to ('' for the model's own forward)
    shape: tuple[int, ...] | None
    fraction: float  # predicted share of the model's cost spent up to and including this cut


def block_boundaries(gm: fx.GraphModule) -> list[str]:
    """Stream nodes after which the graph can be cut (see the module docstring), in graph order."""
    side = side_nodes(gm)
    order = list(gm.graph.nodes)
    pos = {n: i for i, n in enumerate(order)}
    out = order[-1] if order[-1].op == "output" else next(n for n in order if n.op == "output")
    stream = [n for n in order if n not in side and n.op != "output"]
    dag = nx.DiGraph()
    dag.add_node("<source>")
    for n in stream:
        preds = [a for a in n.all_input_nodes if a not in side]
        dag.add_edges_from((a.name, n.name) for a in preds)
        if not preds:
            dag.add_edge("<source>", n.name)
    dag.add_edges_from((a.name, "<output>") for a in out.all_input_nodes if a not in side)
    if "<output>" not in dag:
        return []
    dag = dag.subgraph(nx.ancestors(dag, "<output>") | {"<output>"})  # asserts carry nothing on
    idom = nx.immediate_dominators(dag, "<source>")
    chain = []
    v = idom["<output>"]
    while v != "<source>":
        chain.append(v)
        v = idom[v]
    # live stream values per gap between nodes (a difference array over graph positions)
    live = [0] * (len(order) + 1)
    for n in stream:
        if n.users:
            live[pos[n]] += 1
            live[max(pos[u] for u in n.users)] -= 1
    live = list(itertools.accumulate(live))
    by_name = {n.name: n for n in order}
    found = []
    for name in reversed(chain):
        v = by_name[name]
        users = value_users(v)
        if live[pos[v]] != 1 or any(u.op == "output" for u in v.users):
            continue
        if len(users) == 1 and kind_of(users[0], gm) in _FINISHING \
                and [a for a in users[0].all_input_nodes if a not in side] == [v]:
            continue
        found.append(name)
    return found


def _module_path(node: fx.Node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    return str(list(stack.values())[-1][0]) if stack else ""


def segment_seconds(gm: fx.GraphModule, cuts: list[str], target: Any) -> list[float]:
    """Predicted seconds of each segment when ``gm`` is cut after ``cuts`` (cost.node_seconds)."""
    seconds = [0.0] * (len(cuts) + 1)
    for n, k in assign(gm, cuts).items():
        seconds[k] += cost.node_seconds(n, gm, target)
    return seconds


def exit_candidates(program: Any, target: Any) -> list[Cut]:
    """Every block boundary of ``program`` with its feature shape and share of the predicted cost."""
    gm = program.gm
    names = block_boundaries(gm)
    if not names:
        return []
    seconds = segment_seconds(gm, names, target)
    total = sum(seconds) or 1.0
    by_name = {n.name: n for n in gm.graph.nodes}
    cum = list(itertools.accumulate(seconds))
    return [Cut(name, _module_path(by_name[name]), shape_of(by_name[name]), cum[i] / total)
            for i, name in enumerate(names)]


def feature_width(s: tuple[int, ...]) -> int:
    """What a head's linear reads: channels of [N,C,H,W], features of [N,T,D] and [N,D]."""
    return s[-1] if len(s) == 3 else s[1]


def feature_ok(node: fx.Node) -> str | None:
    """Why a head cannot read this node's value, or None."""
    s, dt = shape_of(node), dtype_of(node)
    if s is None or dt is None or not dt.is_floating_point or len(s) not in (2, 3, 4):
        return f"feature is {list(s) if s else 'not a tensor'} {str(dt).replace('torch.', '')}: heads read 2-D/3-D/4-D float"
    return None


def choose_cuts(program: Any, cands: list[Cut], count: int, stats: Any = None, latest: float = 0.9) -> list[Cut]:
    """Up to ``count`` cuts spread over the predicted cost: the nearest to ``i/(count+1)`` each."""
    by_name = {n.name: n for n in program.gm.graph.nodes}
    usable = []
    for c in cands:
        why = feature_ok(by_name[c.node])
        if why is None and c.fraction > latest:
            why = f"{c.fraction:.0%} of the predicted cost is before it: too little left to skip"
        if why is not None:
            if stats is not None:
                stats.decline(RULE, c.node, why)
            continue
        usable.append(c)
    chosen: list[Cut] = []
    for i in range(1, count + 1):
        left = [c for c in usable if c not in chosen]
        if left:
            chosen.append(min(left, key=lambda c: abs(c.fraction - i / (count + 1))))
    return sorted(chosen, key=lambda c: c.fraction)


# -- heads -----------------------------------------------------------------------------------------
def distill_loss(student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor | None,
                 temperature: float) -> torch.Tensor:
    """T²·KL(softmax(teacher/T) ‖ softmax(student/T)) + CE(student, labels) when labeled."""
    t = temperature
    loss = F.kl_div(F.log_softmax(student / t, -1), F.softmax(teacher / t, -1), reduction="batchmean") * t * t
    if labels is not None:
        loss = loss + F.cross_entropy(student, labels)
    return loss


def train_heads(heads: list[ExitHead], pooled: list[torch.Tensor], teacher: torch.Tensor,
                labels: torch.Tensor | None, *, steps: int = 300, temperature: float = 2.0, lr: float = 1e-2,
                batch: int = 128, seed: int = 0, progress: Any = None) -> None:
    """Train ``heads`` on pooled features (one ``[n, C]`` tensor per head) in place, all at once.

    Features of rank-2/4 heads are standardized while training and the standardization is folded
    into the linear afterwards (``W' = W/σ``, ``b' = b − W'·μ``)."""
    stats = []
    for head, x in zip(heads, pooled, strict=True):
        with torch.no_grad():
            head.fc.weight.zero_()
            head.fc.bias.zero_()
        if head.norm is None:
            mu, sd = x.mean(0), x.std(0, unbiased=False).clamp_min(1e-6)
        else:
            mu, sd = torch.zeros_like(x[0]), torch.ones_like(x[0])
        stats.append((mu, sd))
    xs = [(x - mu) / sd for x, (mu, sd) in zip(pooled, stats, strict=True)]
    teacher = teacher.float()
    n = teacher.shape[0]
    gen = torch.Generator().manual_seed(seed)
    params = [p for h in heads for p in h.parameters()]
    opt = torch.optim.Adam(params, lr=lr)
    every = max(1, steps // 20)
    with torch.enable_grad():
        for step in range(steps):
            idx = torch.randint(n, (min(batch, n),), generator=gen).to(teacher.device)
            loss = sum(distill_loss(h.classify(x[idx]), teacher[idx], None if labels is None else labels[idx],
                                    temperature) for h, x in zip(heads, xs, strict=True))
            opt.zero_grad()
            loss.backward()
            opt.step()
            if progress is not None and (step % every == 0 or step == steps - 1):
                progress("training exit heads", step + 1, steps)
    with torch.no_grad():
        for head, (mu, sd) in zip(heads, stats, strict=True):
            w = head.fc.weight / sd
            head.fc.bias.sub_(w @ mu)
            head.fc.weight.copy_(w)
    for h in heads:
        h.eval()
        h.requires_grad_(False)


def out_of_fold_logits(heads: list[ExitHead], pooled: list[torch.Tensor], teacher: torch.Tensor,
                       labels: torch.Tensor | None, folds: int, progress: Any = None, **train: Any) -> list[torch.Tensor]:
    """Per head, every sample's logits from a copy of the head trained on the other folds
    (sample i is in fold ``i % folds``); ``heads`` themselves are not trained."""
    n = teacher.shape[0]
    fold = torch.arange(n, device=teacher.device) % folds
    out = [torch.empty(n, teacher.shape[1], device=teacher.device) for _ in heads]
    for f in range(folds):
        fit, held = fold != f, fold == f
        copies = [copy.deepcopy(h) for h in heads]
        report = None if progress is None else (
            lambda what, done, total, f=f: progress("cross-fitting exit heads", f * total + done, folds * total))
        train_heads(copies, [x[fit] for x in pooled], teacher[fit], None if labels is None else labels[fit],
                    progress=report, **train)
        with torch.no_grad():
            for k, h in enumerate(copies):
                out[k][held] = h.classify(pooled[k][held])
    return out


def _head_cost(cut: fx.Node, classes: int, target: Any) -> float:
    """Predicted seconds of a head: pooling the feature, then the linear."""
    s = shape_of(cut)
    numel, width, batch = math.prod(s), feature_width(s), s[0]
    pool = cost.kernel_seconds(numel, numel * 4, target) if len(s) > 2 else 0.0
    return pool + cost.kernel_seconds(2 * batch * width * classes, 4 * width * (classes + batch), target)


# -- thresholds ------------------------------------------------------------------------------------
def executed_fraction(rates: list[float], costs: list[float], head_costs: list[float]) -> float:
    """Expected share of the model's predicted cost a sample executes, when ``rates[k]`` of the
    samples leave at head k (after segments 0..k and heads 0..k) and ``rates[-1]`` run to the end."""
    base = sum(costs)
    spent, expected = 0.0, 0.0
    for k, r in enumerate(rates[:-1]):
        spent += costs[k] + head_costs[k]
        expected += r * spent
    expected += rates[-1] * (base + sum(head_costs))
    return expected / base if base > 0 else 1.0


@dataclass
class Outcome:
    thresholds: list[float]
    rates: list[float]  # share of samples leaving at each head, then the share running to the end
    changed: float  # share of samples whose top-1 differs from the model's
    fraction: float  # expected share of the model's predicted cost executed per sample
    drop: float = 0.0


class _Replay:
    """The early-exit model on the fit batches, from cached head and final logits (what the runner
    returns on them, checked once at the end): lets the evaluator score threshold settings without
    running the backbone again."""

    def __init__(self, batches: list[Any]):
        self.keys = {self._key(b.args, b.kwargs): i for i, b in enumerate(batches)}
        self.outputs: list[Any] = []

    @staticmethod
    def _key(args: tuple, kwargs: dict) -> int:
        return id(next(t for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)))

    def __call__(self, *args, **kwargs):
        return self.outputs[self.keys[self._key(args, kwargs)]]


class ThresholdSearch:
    """Per-head thresholds on the fit split (see the module docstring)."""

    def __init__(self, heads: list[list[torch.Tensor]], final: list[torch.Tensor], costs: list[float],
                 head_costs: list[float], out_spec: Any, evaluator: Any, batches: list[Any], allowed: float):
        self.heads, self.final = heads, final  # per head: per batch [n_b, K]; per batch [n_b, K]
        self.conf = [torch.cat([confidence(z) for z in per]) for per in heads]
        self.pred = [torch.cat([z.argmax(-1) for z in per]) for per in heads]
        self.pred_final = torch.cat([z.argmax(-1) for z in final])
        self.sizes = [z.shape[0] for z in final]
        self.costs, self.head_costs, self.out_spec = costs, head_costs, out_spec
        self.evaluator, self.allowed = evaluator, allowed
        self.replay = _Replay(batches)
        self.levels = [self._levels(c) for c in self.conf]
        self._seen: dict[tuple, Outcome | None] = {}
        self.base_drop = 0.0  # the model's own drop (earlier lossy passes); exits may add ``allowed``
        self.start = tuple([-1] * len(heads))  # no head exits anybody

    @staticmethod
    def _levels(conf: torch.Tensor) -> list[float]:
        qs = torch.tensor([1.0 - r for r in _EXIT_RATES], dtype=torch.float64)
        values = torch.quantile(conf.double().cpu(), qs, interpolation="lower").tolist()
        return sorted(set(values), reverse=True)

    def thresholds(self, state: tuple[int, ...]) -> list[float]:
        return [NEVER if j < 0 else self.levels[k][j] for k, j in enumerate(state)]

    def exit_at(self, thresholds: list[float]) -> torch.Tensor:
        """Per fit sample, the head it leaves at (len(heads): none)."""
        at = torch.full_like(self.pred_final, len(self.heads))
        for k in reversed(range(len(self.heads))):
            at = torch.where(self.conf[k] >= thresholds[k], torch.full_like(at, k), at)
        return at

    def outcome(self, state: tuple[int, ...]) -> Outcome | None:
        """What a threshold setting gives on the fit split; None when it spends more than allowed."""
        if state in self._seen:
            return self._seen[state]
        th = self.thresholds(state)
        at = self.exit_at(th)
        n = at.numel()
        pred = self.pred_final.clone()
        for k in range(len(self.heads)):
            pred = torch.where(at == k, self.pred[k], pred)
        changed = float((pred != self.pred_final).float().mean())
        rates = [float((at == k).float().mean()) for k in range(len(self.heads) + 1)]
        res = Outcome(th, rates, changed, executed_fraction(rates, self.costs, self.head_costs))
        if changed > self.allowed + 0.5 / n:
            self._seen[state] = None
            return None
        if changed == 0 and self.evaluator.metric in _ARGMAX_METRICS and state != self.start:
            res.drop = self.base_drop  # the same top-1 everywhere: the same score
            self._seen[state] = res
            return res
        outputs, start = [], 0
        for b, size in enumerate(self.sizes):
            a = at[start:start + size]
            z = self.final[b].clone()
            for k in range(len(self.heads)):
                sel = a == k
                z[sel] = self.heads[k][b][sel].to(z.dtype)
            outputs.append(pytree.tree_unflatten([z], self.out_spec))
            start += size
        self.replay.outputs = outputs
        res.drop = self.evaluator.drop(self.replay, "fit")
        self._seen[state] = res if res.drop <= self.base_drop + self.allowed + 1e-12 else None
        return self._seen[state]

    def search(self, progress: Any = None) -> list[tuple[tuple[int, ...], Outcome]]:
        """Greedy steps from "no head exits anybody"; the settings taken, in order (last = best)."""
        state = self.start
        self.base_drop = float("inf")
        cur = self.outcome(state)
        self.base_drop = cur.drop
        steps = [(state, cur)]
        budget_steps = sum(len(lv) for lv in self.levels)
        while True:
            best, best_key = None, None
            for k, lv in enumerate(self.levels):
                misses = 0
                for j in range(state[k] + 1, len(lv)):
                    trial = state[:k] + (j,) + state[k + 1:]
                    res = self.outcome(trial)
                    if res is None:
                        misses += 1
                        if misses == 2:  # looser still spends more (nearly always): stop early
                            break
                        continue
                    misses = 0
                    gain = cur.fraction - res.fraction
                    if gain <= 0:
                        continue
                    d_drop = max(res.drop - cur.drop, 0.0)
                    key = (d_drop <= 1e-12, gain / max(d_drop, 1e-12))
                    if best_key is None or key > best_key:
                        best, best_key = (trial, res), key
            if best is None:
                return steps
            state, cur = best
            steps.append(best)
            if progress is not None:
                progress("calibrating exit thresholds", len(steps) - 1, budget_steps)


# -- the pass ----------------------------------------------------------------------------------------
def _classifier_output(program: Any) -> tuple[Any, str | None]:
    """The output's pytree spec when the model returns only [N, K] float logits, else why not."""
    out = run_seeded(program.gm, program.example_args, program.example_kwargs)
    leaves, spec = pytree.tree_flatten(out)
    if len(leaves) != 1 or len(output_values(program.gm)) != 1:
        return None, (f"the model returns {len(leaves)} values; early exit serves models whose output is only "
                      "[N, K] logits")
    t = leaves[0]
    if not (isinstance(t, torch.Tensor) and t.is_floating_point() and t.dim() == 2 and t.shape[1] > 1):
        what = f"{list(t.shape)} {str(t.dtype).replace('torch.', '')}" if isinstance(t, torch.Tensor) else type(t).__name__
        return None, f"the output is {what}, not [N, K] float logits of a classifier"
    return spec, None


def _labels(batches: list[Any], classes: int) -> torch.Tensor | None:
    """The fit split's labels when they are class indices of the output (else the heads learn from
    the model's logits alone)."""
    if any(b.labels is None or b.labels.dim() != 1 for b in batches):
        return None
    labels = torch.cat([b.labels for b in batches]).long()
    return labels if labels.numel() and 0 <= int(labels.min()) and int(labels.max()) < classes else None


def make_runner(program: Any, cuts: list[str], heads: list[ExitHead], thresholds: list[float],
                out_spec: Any = None) -> EarlyExitRunner:
    """An ``EarlyExitRunner`` for ``program`` with ``heads`` reading the stream nodes ``cuts``."""
    gm = program.gm
    if out_spec is None:
        out_spec, why = _classifier_output(program)
        assert why is None, why
    logits = output_values(gm)[0]
    return EarlyExitRunner(
        split(gm, cuts), heads, cuts, thresholds,
        input_names=[n.name for n in gm.graph.nodes if n.op == "placeholder"], logits=logits.name,
        out_spec=out_spec, out_dtype=dtype_of(logits), capture=program.capture,
        signature=inspect.signature(gm.forward) if program.capture != "export" else None)


@register
class EarlyExit:
    name = "early_exit"
    exact = False
    description = "early exits at block boundaries: distilled heads, confidence thresholds within the budget"
    options = (
        Option("exit_points", int, 3, "the most exits inserted"),
        Option("exit_steps", int, 300, "training steps of each exit head (distilled from the final output)"),
        Option("exit_temperature", float, 2.0, "distillation temperature of the exit heads"),
        Option("exit_fit_share", float, 0.5, "share of the unspent budget the thresholds may use"),
        Option("exit_measure_s", float, 1.0, "seconds spent timing the model with exits against without"),
    )

    def run(self, program: Any, ctx: Any) -> bool:
        why = self._guard(program, ctx)
        if why is not None:
            return self._decline(ctx, "<model>", why)
        spec, why = _classifier_output(program)
        if why is not None:
            return self._decline(ctx, "<output>", why)
        gm = program.gm
        cands = exit_candidates(program, ctx.target)
        if not cands:
            return self._decline(ctx, "<model>", "no block boundary: no cut of the graph has a single stream value")
        cuts = choose_cuts(program, cands, int(ctx.option("exit_points", 3)), ctx.stats)
        if not cuts:
            return self._decline(ctx, "<model>", "no block boundary with a 2-D/3-D/4-D float feature early enough")
        by_name = {n.name: n for n in gm.graph.nodes}
        logits_node = output_values(gm)[0]
        fit = ctx.calibration.fit

        # features on the fit split, pooled as the heads pool them (recorded once)
        classes = shape_of(logits_node)[1]
        with torch.random.fork_rng(devices=[]):  # the linears' default init draws; the user's RNG stays put
            heads = [ExitHead(len(shape_of(by_name[c.node])), feature_width(shape_of(by_name[c.node])), classes)
                     for c in cuts]
        pooled: list[list[torch.Tensor]] = [[] for _ in cuts]
        final: list[torch.Tensor] = []
        probed = [by_name[c.node] for c in cuts] + [logits_node]
        for values in iter_values(program, probed, [(b.args, b.kwargs) for b in fit]):  # one batch at a time
            for k, c in enumerate(cuts):
                pooled[k].append(heads[k].pool(values[c.node]))
            final.append(values[logits_node.name])
        device = final[0].device
        heads = [h.to(device) for h in heads]
        seed = int(getattr(ctx.budget, "seed", 0) or 0)
        labels = _labels(fit, classes)
        labels = None if labels is None else labels.to(device)
        features, teacher = [torch.cat(p) for p in pooled], torch.cat(final)
        train = {"steps": int(ctx.option("exit_steps", 300)), "temperature": float(ctx.option("exit_temperature", 2.0)),
                 "seed": seed, "progress": ctx.progress}
        # thresholds are calibrated on heads that did not see the sample (2-fold cross-fitting):
        # heads trained and judged on the same samples look more reliable than they are
        oof = out_of_fold_logits(heads, features, teacher, labels, 2, **train) if teacher.shape[0] >= 20 else None
        train_heads(heads, features, teacher, labels, **train)
        with torch.no_grad():
            calibrate = oof or [h.classify(x) for h, x in zip(heads, features, strict=True)]
        sizes = [z.shape[0] for z in final]
        head_logits = [list(z.split(sizes)) for z in calibrate]

        # thresholds
        allowed = max(0.0, float(ctx.budget_left)) * float(ctx.option("exit_fit_share", 0.5))
        costs = segment_seconds(gm, [c.node for c in cuts], ctx.target)
        head_costs = [_head_cost(by_name[c.node], classes, ctx.target) for c in cuts]
        search = ThresholdSearch(head_logits, final, costs, head_costs, spec, ctx.evaluator, fit, allowed)
        taken = search.search(ctx.progress)

        # the runner, checked for real on the fit split; back off when it spends more than the replay said
        runner = None
        while taken:
            _, res = taken.pop()
            keep = [k for k in range(len(cuts)) if res.rates[k] > 0]
            if not keep:
                break
            runner = make_runner(program, [cuts[k].node for k in keep], [heads[k] for k in keep],
                                 [res.thresholds[k] for k in keep], spec)
            drop = ctx.evaluator.drop(runner, "fit") - search.base_drop
            if drop <= allowed + 1e-12:
                break
            runner = None
        if runner is None:
            for c in cuts:
                ctx.stats.decline(RULE, c.node, "its head is not confident enough for any exit within the budget")
            ctx.note(f"no exit within {allowed:.4g} of metric drop on the fit split; nothing changed")
            return False
        for k, c in enumerate(cuts):
            if k not in keep:
                ctx.stats.decline(RULE, c.node, "no threshold exits anybody within the budget")
            else:
                ctx.stats.match(RULE)
        kept = [cuts[k] for k in keep]

        why = self._probe(program, runner, ctx)
        if why is not None:
            ctx.note(f"batching defeats exits for this graph ({why}): at batch > 1 every sample runs until all "
                     "of them have exited; exits pay at batch 1")
        self._report(program, ctx, runner, kept, res, drop, keep, head_costs)
        runner.reset_counts()
        program.runner = runner
        return True

    # -- pieces ----------------------------------------------------------------------------------------
    @staticmethod
    def _decline(ctx: Any, node: str, why: str) -> bool:
        ctx.stats.decline(RULE, node, why)
        ctx.note(why)
        return False

    @staticmethod
    def _guard(program: Any, ctx: Any) -> str | None:
        if ctx.evaluator is None or ctx.calibration is None:
            return "needs budget= and calibration= data (a lossy pass)"
        if program.runner is not None:
            return "the program already runs through a runner"
        return None

    @staticmethod
    def _probe(program: Any, runner: EarlyExitRunner, ctx: Any) -> str | None:
        batches = [b for b in ctx.calibration.fit if b.size >= 2]
        if not batches:
            batch_one = program.static_batch or all(b.size == 1 for b in ctx.calibration.holdout)
            return None if batch_one else "no calibration batch with two samples to check it on"
        b = batches[0]
        return runner.probe_subbatch(program.flat_inputs(b.args, b.kwargs), ctx.tolerance)

    @staticmethod
    def _report(program: Any, ctx: Any, runner: EarlyExitRunner, kept: list[Cut], fit_res: Outcome, fit_drop: float,
                keep: list[int], head_costs: list[float]) -> None:
        holdout = ctx.calibration.holdout
        runner.reset_counts()
        with torch.no_grad():
            for b in holdout:
                runner(*b.args, **b.kwargs)
        n = max(1, sum(runner.exit_counts))
        rates = [c / n for c in runner.exit_counts]
        # the predicted fraction with the kept heads only: segments merge where a head was removed
        seg = segment_seconds(program.gm, [c.node for c in kept], ctx.target)
        fraction = executed_fraction(rates, seg, [head_costs[k] for k in keep])
        measured: dict[str, Any] = {
            "exits": [{"node": c.node, "module": c.module, "feature": list(c.shape or ()),
                       "cost_before": round(c.fraction, 4), "threshold": runner.thresholds[i],
                       "fit_exit_rate": fit_res.rates[keep[i]], "holdout_exit_rate": rates[i]}
                      for i, c in enumerate(kept)],
            "holdout_rate_to_end": rates[-1],
            "fit_drop": fit_drop,  # added by the exits to the model's own
            "fit_changed_predictions": fit_res.changed,
            "expected_speedup": 1.0 / fraction if fraction > 0 else float("inf"),
            "batch_subset": runner.subset,
        }
        if ctx.measure and holdout:
            # batch 1 where the graph allows it; an export graph may be specialized to its example batch
            batch = 1 if not program.static_batch else next(
                t.shape[0] for t in program.flat_inputs() if isinstance(t, torch.Tensor) and t.dim() > 0)
            samples = ctx.calibration.holdout_like(batch, 16)
            if samples:
                budget_s = float(ctx.option("exit_measure_s", 1.0))
                t = compare_models({"original": rotating(program.gm, samples), "early_exit": rotating(runner, samples)},
                                   budget_s)
                measured["measured_batch"] = batch
                measured["measured_speedup"] = t["original"].median / t["early_exit"].median
        if ctx.record is not None:
            ctx.record.measured.update(measured)
