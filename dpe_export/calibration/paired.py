"""The default calibration procedure: paired needle likelihoods with successive halving.

What it measures is the authors' (how well each group's scale lets the model retrieve needles at the target
length, the other groups at the reference scale); how it spends prefills is what makes it affordable:

* **One prefill per context.** A context hides many needles (16 by default, one in each sixteenth of its
  depth); it is prefilled once per setting and every needle's question is answered from a copy of its cache.
* **A continuous score.** Each needle scores the teacher-forced mean log-probability of its value's tokens
  (nats per token) instead of exact match of a generated answer: no decoding, and every needle measures the
  difference between two settings, not only the needles one of them gets wrong. (On the testbeds it does not
  see everything exact-match pass-key sees: benchmarks/RESULTS.md, "Calibration cost and decision quality".)
* **Paired contexts.** Every scale of every group is scored on the same contexts, so differences between
  scales are not differences between prompts.
* **Successive halving.** Round r scores the scales still in the race on context r; after it, the better half
  (by mean over the contexts so far) stays in, and so does the reference scale. With 2 contexts a group costs
  at most S + ceil(S/2) + 1 prefills.
* **Shared reference.** The setting "every group at the reference scale" is the same in every group's row; it
  is scored once per context.
* **Two lengths.** The first context is half the target length, the second the target length: the race sees a
  shorter length the export also serves (on the testbeds the 16x likelihood alone could not rank the groups that
  decide pass-key at 8x; benchmarks/RESULTS.md, "Calibration cost and decision quality"), and the first round,
  the one with every scale, costs about half.
* **The best mean decides.** Among the scales that stayed to the last round the highest mean log-likelihood wins
  (equal means go to the scale nearest the reference). Plans made before this default kept a tie rule (`tie_z`:
  finalists within 2 standard errors of the best, paired needle by needle, tie with it and the reference wins);
  their results read back with it.
* **Short wavelengths take the largest scale.** A group whose every frequency turns within the pretraining
  length (2 pi / theta < L; plan.short_wavelength_groups, from the family's rotary frequencies) saw every angle
  at every distance in training, and the race's likelihoods do not rank its scales consistently: on the testbed
  Llama, group 0 is best at 128 at T/2 and behind at T in 2 of 3 seeds, so its choice followed the seed. Such a
  group takes the largest candidate scale; on the three testbeds this made the calibration seeds agree within
  noise on held-out prompts, and no held-out cell fell below the full grid's choice (benchmarks/RESULTS.md). The
  race still scores these groups (their cells are the same either way); plans made before 0.3.1 have no such
  groups and keep their choices.

Every finished (setting, context) is appended as one JSON line to ``cells.jsonl`` (per shard
``cells.shard-I-of-N.jsonl``; shards split the groups), so a killed run resumes without recomputing anything.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Callable, Optional

from dpe_export.calibration import engine
from dpe_export.calibration.scales import CalibrationPlan, calibration_record, reference_distance
from dpe_export.errors import DPEExportError

DEFAULT_CONTEXTS = 2

DEFAULT_NEEDLES = 16

METRICS = ("niah",)  # the registered task whose prompts it scores (many needles per context)

# a score read back from another shard's file may differ from this process's in the last bits (other threads)
_SAME_SCORE = 1e-4


def default_context_lengths(target_length: int, contexts: int) -> list[int]:
    """The default plan's context lengths: the first context at half the target length, the others at it."""
    return [target_length // 2] + [target_length] * (contexts - 1) if contexts > 1 else [target_length]


def tie_rule(plan: CalibrationPlan) -> str:
    """How the plan's choice is made among the finalists, for calibration.json."""
    if not plan.tie_z:
        rule = ("the highest mean log-likelihood among the scales that stayed to the last round (equal means go to "
                "the scale nearest the reference scale, log2 distance, then the smaller)")
    else:
        rule = (f"the highest mean log-likelihood among the scales that stayed to the last round; scales within "
                f"{plan.tie_z:g} standard errors of it (differences paired needle by needle) tie with it, and ties "
                "go to the scale nearest the reference scale (log2 distance), then the smaller")
    if plan.short_wavelength_groups:
        groups = ", ".join(map(str, plan.short_wavelength_groups))
        rule += (f"; group(s) {groups}, whose every frequency turns within the pretraining length, take the largest "
                 f"candidate scale ({max(plan.scales)})")
    return rule

Evaluate = Callable[[object, int], dict]  # (DPEParams, context) -> {"score", "needles", "found"}


def unit_key(factors, context: int) -> tuple:
    return tuple(int(f) for f in factors), int(context)


def _valid_unit(rec: dict, path: Path, lineno: int) -> dict:
    try:
        factors = [int(f) for f in rec["factors"]]
        context, needles, found = int(rec["context"]), int(rec["needles"]), int(rec["found"])
        score = float(rec["score"])
    except (KeyError, TypeError, ValueError) as e:
        raise DPEExportError(f"{path} line {lineno} is not a calibration result ({type(e).__name__}: {e}); delete "
                             "that line to compute it again") from None
    per_needle = rec.get("needle_scores")
    if per_needle is not None and not (isinstance(per_needle, list) and len(per_needle) == needles and all(
            isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x <= 0
            for x in per_needle)):
        score = float("nan")  # refused below with the line's number
    if not math.isfinite(score) or score > 0 or needles < 1 or not 0 <= found <= needles or context < 0:
        raise DPEExportError(f"{path} line {lineno} has score {rec['score']!r} ({found} of {needles} needles); "
                             "scores are log-probabilities (<= 0): delete that line to compute it again")
    return dict(rec, factors=factors, context=context, needles=needles, found=found, score=score)


def read_units(out_dir: Path, plan: CalibrationPlan) -> dict[tuple, dict]:
    """Finished (setting, context) results of this plan from every results file in out_dir."""
    done: dict[tuple, dict] = {}
    seen: dict[tuple, tuple[Path, int]] = {}
    for path, lineno, rec in engine.plan_lines(out_dir, plan):
        rec = _valid_unit(rec, path, lineno)
        key = unit_key(rec["factors"], rec["context"])
        if key in done:
            first_path, first_line = seen[key]
            # the reference setting is scored by every shard that needs it: equal results in two files are fine
            if first_path == path or abs(done[key]["score"] - rec["score"]) > _SAME_SCORE:
                raise DPEExportError(
                    f"{path} line {lineno} repeats the result for factors {list(key[0])} on context {key[1]} "
                    f"(first at {first_path.name} line {first_line}); keep one of the two lines")
            continue
        done[key], seen[key] = rec, (path, lineno)
    return done


def _ranking(plan: CalibrationPlan, group: int, candidates: list[int], done: dict, contexts: int) -> list[int]:
    """Candidates best first by mean score over contexts 0..contexts-1 (equal means: nearest the reference)."""
    def mean(s):
        return sum(done[unit_key(plan.factors_for(group, s), c)]["score"] for c in range(contexts)) / contexts

    return sorted(candidates, key=lambda s: (-mean(s), *reference_distance(plan, s)))


def race(plan: CalibrationPlan, groups: list[int], done: dict):
    """Replay the halving over what is done: per group the scales still in the race and the next context each
    needs, and the settings (factors, context) to score next. Deterministic given the results."""
    todo: list[tuple] = []
    state = {}
    for g in groups:
        alive = list(plan.scales)
        for c in range(plan.samples):
            missing = [s for s in alive if unit_key(plan.factors_for(g, s), c) not in done]
            if missing:
                todo.extend(unit_key(plan.factors_for(g, s), c) for s in missing)
                state[g] = (alive, c)
                break
            if c == plan.samples - 1 or len(alive) == 1:
                state[g] = (alive, None)
                break
            kept = _ranking(plan, g, alive, done, c + 1)[:-(-len(alive) // 2)]
            # the reference stays in every group's race: it is the fallback of the tie rule, and its setting is
            # one and the same in every group's row, scored once per context for all of them
            alive = kept + [s for s in alive if s == plan.reference_scale and s not in kept]
    return state, list(dict.fromkeys(todo))


def planned_units(plan: CalibrationPlan, groups: list[int]) -> int:
    """Settings x contexts the race scores at most: per context every group's scales still in (the better half
    of the last round's and the reference), the reference setting once for all groups (it is the same setting);
    fewer when the reference is among a group's better half."""
    total, alive = 0, len(plan.scales)
    for _ in range(plan.samples):
        total += len(groups) * alive - (len(groups) - 1)
        alive = min(alive, -(-alive // 2) + 1)  # the better half and the reference
    return total


def shard_groups(plan: CalibrationPlan, shard: Optional[tuple[int, int]]) -> list[int]:
    return [g for g in range(plan.num_groups) if shard is None or g % shard[1] == shard[0]]


def _mine(plan: CalibrationPlan, shard) -> set:
    return {unit_key(plan.factors_for(g, s), c) for g in shard_groups(plan, shard) for s in plan.scales
            for c in range(plan.samples)}


UNITS = engine.UnitKind(
    read=lambda out_dir, plan: read_units(out_dir, plan),
    pending=lambda plan, done, shard: race(plan, shard_groups(plan, shard), done)[1],
    record=lambda plan, unit, result, seconds: {
        "plan": plan.key(), "factors": list(unit[0]), "context": unit[1], "score": float(result["score"]),
        "needles": int(result["needles"]), "found": int(result["found"]), "seconds": round(seconds, 3),
        **({"needle_scores": [round(float(x), 6) for x in result["needle_scores"]]}
           if "needle_scores" in result else {})},
    key=lambda rec: unit_key(rec["factors"], rec["context"]),
    planned=lambda plan, shard: planned_units(plan, shard_groups(plan, shard)),
    counted=lambda plan, done, shard: len(_mine(plan, shard).intersection(done)),
    describe=lambda unit: f"context {unit[1]} factors {','.join(map(str, unit[0]))}",
    unit="prefill",
)


def evaluate(calibrator, plan: CalibrationPlan, unit: tuple) -> dict:
    """One unit on a loaded model: the setting's log-likelihood score on the unit's context."""
    return calibrator.score_context(plan.params_for_factors(list(unit[0])), unit[1])


def run(plan: CalibrationPlan, evaluate: Evaluate, out_dir: Path, shard: Optional[tuple[int, int]] = None,
        progress: bool = True) -> dict[tuple, dict]:
    """Run (or resume) the race of this shard's groups in this process, appending each result as it finishes."""
    return engine.execute(plan, UNITS, engine.local_executor(
        lambda unit: evaluate(plan.params_for_factors(list(unit[0])), unit[1])), out_dir, shard, progress)


def tied_finalists(plan: CalibrationPlan, done: dict) -> list[list[int]]:
    """Per group, the scales that stayed to the last round and tie with the best under plan.tie_z, best first."""
    state, todo = race(plan, list(range(plan.num_groups)), done)
    if todo:
        raise DPEExportError(f"{len(todo)} calibration results are not done yet (e.g. factors {list(todo[0][0])} on "
                             f"context {todo[0][1]}); run the remaining shards first")
    tied = []
    for g in range(plan.num_groups):
        alive, _ = state[g]
        seen = min(_contexts_of(plan, g, s, done) for s in alive)
        ranked = _ranking(plan, g, alive, done, seen)
        tied.append([s for s in ranked if _ties(plan, g, ranked[0], s, done, seen)])
    return tied


def choose(plan: CalibrationPlan, done: dict) -> list[int]:
    """Per group, among the scales that stayed to the last round (tie_rule(plan)); a short-wavelength group
    (plan.short_wavelength_groups) takes the largest candidate scale."""
    short = set(plan.short_wavelength_groups or ())
    return [max(plan.scales) if g in short else min(tied, key=lambda s: reference_distance(plan, s))
            for g, tied in enumerate(tied_finalists(plan, done))]


def _needle_scores(plan, g, s, done, contexts) -> Optional[list[float]]:
    out: list[float] = []
    for c in range(contexts):
        per_needle = done[unit_key(plan.factors_for(g, s), c)].get("needle_scores")
        if per_needle is None:
            return None
        out.extend(per_needle)
    return out


def _ties(plan, g, best: int, s: int, done, contexts: int) -> bool:
    """Whether scale s is within plan.tie_z standard errors of the best, paired needle by needle."""
    if s == best:
        return True
    a, b = _needle_scores(plan, g, best, done, contexts), _needle_scores(plan, g, s, done, contexts)
    if not a or not b or len(a) != len(b) or len(a) < 2:
        return False  # results written without per-needle scores: exact ranking
    diffs = [x - y for x, y in zip(a, b)]
    mean = sum(diffs) / len(diffs)
    sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (len(diffs) - 1))
    return mean <= plan.tie_z * sd / math.sqrt(len(diffs))


def _contexts_of(plan, g, s, done) -> int:
    c = 0
    while unit_key(plan.factors_for(g, s), c) in done:
        c += 1
    return c


def build(plan: CalibrationPlan, done: dict, timings: Optional[dict] = None) -> dict:
    """calibration.json for the race: per (group, scale) the mean score over the contexts it was scored on (how
    many in ``contexts``), every result, and the chosen factors."""
    chosen = choose(plan, done)
    grid, counts = [], []
    for g in range(plan.num_groups):
        row, row_n = [], []
        for s in plan.scales:
            n = _contexts_of(plan, g, s, done)
            scores = [done[unit_key(plan.factors_for(g, s), c)]["score"] for c in range(n)]
            row.append(round(sum(scores) / n, 6) if n else None)
            row_n.append(n)
        grid.append(row)
        counts.append(row_n)
    units = sorted(done.values(), key=lambda r: (r["context"], r["factors"]))
    prefills = len(units)
    seconds = round(sum(r["seconds"] for r in units), 1)
    return calibration_record(
        plan, grid=grid, chosen=chosen, cells=units,
        samples_per_cell=plan.samples * plan.needles,
        metric=f"mean log-probability of the needle's value (nats/token), {plan.needles}-needle NIAH",
        timings=timings or {"grid_seconds": seconds}, tie_rule=tie_rule(plan),
        extra={"contexts": counts, "prefills": prefills,
               "found": [[sum(done[unit_key(plan.factors_for(g, s), c)]["found"] for c in range(n))
                          for s, n in zip(plan.scales, row_n)] for g, row_n in enumerate(counts)]})
