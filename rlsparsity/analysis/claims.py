"""The claims a reproduction report checks: the paper's (arXiv 2505.11711) and its
follow-ups', as the project's shared reference (PAPER.md) lists them, each with its
published number, the rule its verdict follows, and how it is measured from the runs.

A claim is measured per setting (model, learning rate, precision, optimizer, and what
else the claim compares), each measurement a mean with its spread over seeds. The
verdict: reproduced (every setting passes the rule), not reproduced (none does),
depends on X (X separates the settings that pass from those that do not), or not run.
Rules are fixed here, before any run, and printed beside each verdict.
"""

from __future__ import annotations

import math
import re
import statistics
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from rlsparsity.analysis.evidence import Evidence, Trial

Setting = dict[str, str]


def pct_text(x: float) -> str:
    """A share in %, with the digits a small one needs (0.0213 %, 7.1 %)."""
    if math.isnan(x):
        return "—"
    return f"{100 * x:.1f} %" if abs(x) >= 0.01 or x == 0 else f"{100 * x:.2g} %"


@dataclass
class Stat:
    values: list[float]

    @property
    def mean(self) -> float:
        return statistics.fmean(self.values) if self.values else math.nan

    def text(self, pct: bool = True) -> str:
        f = pct_text if pct else (lambda x: f"{x:.3f}")  # noqa: E731
        if len(self.values) == 1:
            return f"{f(self.values[0])} (n = 1)"
        return f"{f(self.mean)} ({f(min(self.values))}–{f(max(self.values))}, n = {len(self.values)})"


@dataclass
class Measurement:
    setting: Setting
    text: str
    ok: bool | None  # None: not enough runs in this setting to apply the rule
    numbers: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Claim:
    id: str
    source: str
    statement: str
    published: str
    rule: str
    presets: str
    measure: Callable[[Evidence], list[Measurement]]


@dataclass
class Verdict:
    claim: Claim
    measurements: list[Measurement]

    @property
    def verdict(self) -> str:
        judged = [m for m in self.measurements if m.ok is not None]
        if not judged:
            return "not run"
        if all(m.ok for m in judged):
            return "reproduced"
        if not any(m.ok for m in judged):
            return "not reproduced"
        return "depends on " + ", ".join(separating_keys(judged))


def separating_keys(ms: Sequence[Measurement]) -> list[str]:
    """Setting keys whose values never occur on both sides of the verdict; else every key that varies."""
    keys = [k for k in ms[0].setting if len({m.setting.get(k) for m in ms}) > 1]
    sep = [k for k in keys if not ({m.setting.get(k) for m in ms if m.ok} & {m.setting.get(k) for m in ms if not m.ok})]
    return [_key_name(k) for k in (sep or keys)]


def _key_name(key: str) -> str:
    return {"training.lr": "learning rate", "training.steps": "steps", "training.precision": "precision",
            "training.optimizer": "optimizer"}.get(key, key)


# ----------------------------------------------------------------------------- selection


def standard(trials: Iterable[Trial]) -> list[Trial]:
    """The paper's setting: float32 masters read in bf16, AdamW, full (not masked) training."""
    return [t for t in trials if t.param("training.precision", "fp32") == "fp32"
            and t.param("training.optimizer", "adamw") == "adamw" and not t.subnetwork]


def by_setting(trials: Iterable[Trial], extra: Sequence[str] = ()) -> dict[tuple, list[Trial]]:
    out: dict[tuple, list[Trial]] = {}
    for t in trials:
        key = t.setting + tuple((k, t.param(k) if k != "variant" else t.variant) for k in extra)
        out.setdefault(key, []).append(t)
    return dict(sorted(out.items()))


def values(trials: Iterable[Trial], key: str) -> list[float]:
    return [v for t in trials if not math.isnan(v := t.get(key))]


def _rl(trials: Iterable[Trial]) -> list[Trial]:
    return [t for t in trials if t.algorithm != "sft"]


SPARSITY = "final/sparsity_abs_1e-5"  # the paper's criterion, on the bf16 view


def within(lo: float, hi: float) -> Callable[[float], bool]:
    return lambda x: lo <= x <= hi


def _per_setting(trials: list[Trial], key: str, rule: Callable[[float], bool], *, pct: bool = True,
                 extra: Sequence[str] = ()) -> list[Measurement]:
    out = []
    for setting, group in by_setting(trials, extra).items():
        st = Stat(values(group, key))
        if st.values:
            out.append(Measurement(dict(setting), st.text(pct), rule(st.mean), {"mean": st.mean}))
    return out


# ----------------------------------------------------------------------------- comparisons


def _variant_pair(ev: Evidence, a: Sequence[str], b: str, rule: Callable[[dict[str, float]], bool],
                  key: str = SPARSITY) -> list[Measurement]:
    """Variants `a` against variant `b` per setting (table5_causes)."""
    out = []
    for setting, group in by_setting(standard(ev.trials)).items():
        stats = {v: Stat(values([t for t in group if t.variant == v], key)) for v in (*a, b)}
        if any(s.values for s in stats.values()):
            complete = all(s.values for s in stats.values())
            text = "; ".join(f"{v} {s.text()}" for v, s in stats.items() if s.values)
            means = {v: s.mean for v, s in stats.items()}
            out.append(Measurement(dict(setting), text, rule(means) if complete else None, means))
    return out


def _overlap_pairs(ev: Evidence, factor: str, metric: str) -> list[Measurement]:
    """Pairs of one overlap analysis that differ in `factor` alone, per setting of the pair."""
    by_label = {(t.experiment, t.label): t for t in ev.trials}
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for ov in ev.overlaps:
        facs = {r["label"]: r.get("factors") or {} for r in ov.runs}
        keys = ov.factor_keys or sorted({k for f in facs.values() for k in f})
        if factor == "seed" and "data_seed" not in keys:
            continue  # without a data_seed axis the seed also picks the problems: not the seed alone
        for p in ov.pairs:
            fa, fb = facs.get(p["a"], {}), facs.get(p["b"], {})
            differ = [k for k in keys if str(fa.get(k)) != str(fb.get(k))]
            ta = by_label.get((ov.experiment, p["a"]))
            if differ == [factor] and ta is not None and p[metric] is not None:
                groups.setdefault(ta.setting, []).append(p)
    out = []
    for setting, pairs in sorted(groups.items()):
        obs, chance = Stat([p[metric] for p in pairs]), Stat([p[f"{metric}_random"] for p in pairs])
        text = f"{obs.text()} vs chance {chance.text()}"
        out.append(Measurement(dict(setting), text, obs.mean > chance.mean + 0.01, {"observed": obs.mean, "chance": chance.mean}))
    return out


def _overlap_both(ev: Evidence, factor: str) -> list[Measurement]:
    a, b = _overlap_pairs(ev, factor, "o_a"), _overlap_pairs(ev, factor, "o_b")
    out = []
    for ma, mb in zip(a, b, strict=True):
        out.append(Measurement(ma.setting, f"o_A {ma.text}; o_B {mb.text}", bool(ma.ok and mb.ok),
                               {"o_a": ma.numbers["observed"], "o_a_chance": ma.numbers["chance"],
                                "o_b": mb.numbers["observed"], "o_b_chance": mb.numbers["chance"]}))
    return out


# ----------------------------------------------------------------------------- dynamics


def _dynamics_trials(ev: Evidence) -> list[Trial]:
    return [t for t in standard(ev.trials) if len(t.history.get("sparsity_bf16", [])) >= 6 and "final/changed_frac_ever" in t.metrics]


def _plateau(ev: Evidence) -> list[Measurement]:
    out = []
    for setting, group in by_setting(_dynamics_trials(ev), ["algorithm"]).items():
        first, second = [], []
        for t in group:
            s = [v for _, v in t.history["sparsity_bf16"]]
            mid = len(s) // 2
            first.append(s[0] - s[mid])
            second.append(s[mid] - s[-1])
        f, sec = Stat(first), Stat(second)
        final = Stat(values(group, "final/sparsity_bf16"))
        text = f"final {final.text()}; fall over the first half of the mask steps {f.text()}, over the second {sec.text()}"
        out.append(Measurement(dict(setting), text, abs(sec.mean) <= abs(f.mean) / 3, {"final": final.mean}))
    return out


def _consecutive(ev: Evidence) -> list[Measurement]:
    out = []
    for setting, group in by_setting(_dynamics_trials(ev), ["algorithm"]).items():
        st = Stat([statistics.fmean(v for _, v in t.history["changed_frac_since_prev"][1:]) for t in group
                   if len(t.history.get("changed_frac_since_prev", [])) > 1])
        if st.values:
            out.append(Measurement(dict(setting), st.text(), within(0.035, 0.14)(st.mean), {"mean": st.mean}))
    return out


def _split(ev: Evidence) -> list[Measurement]:
    out = []
    published = (0.72, 0.08, 0.20)
    for setting, group in by_setting(_dynamics_trials(ev), ["algorithm"]).items():
        never = Stat([1 - t.get("final/changed_frac_ever") for t in group])
        reverted = Stat([t.get("final/changed_frac_ever") - t.get("final/changed_frac_bf16") for t in group])
        final = Stat([t.get("final/changed_frac_bf16") for t in group])
        ok = all(within(p / 2, 2 * p)(s.mean) for p, s in zip(published, (never, reverted, final), strict=True))
        out.append(Measurement(dict(setting), f"never {never.text()}; back at θ0 {reverted.text()}; final {final.text()}",
                               ok, {"never": never.mean, "reverted": reverted.mean, "final": final.mean}))
    return out


# ----------------------------------------------------------------------------- layers, studies


def _layers(ev: Evidence) -> list[Measurement]:
    out = []
    for setting, group in by_setting(_rl(standard(ev.trials))).items():
        spreads, norms = [], []
        for t in group:
            layers = [v for k, v in t.metrics.items() if k.startswith("final/sparsity/layer.")]
            if layers:
                spreads.append(max(layers) - min(layers))
            if "final/sparsity/matrix.norm" in t.metrics:
                norms.append(t.metrics["final/sparsity/matrix.norm"])
        if spreads and norms:
            sp, nm = Stat(spreads), Stat(norms)
            out.append(Measurement(dict(setting), f"spread between blocks {sp.text()}; norm weights unchanged {nm.text()}",
                                   sp.mean <= 0.15 and nm.mean >= 0.95, {"spread": sp.mean, "norm": nm.mean}))
    return out


def _closeness(ev: Evidence, kinds: Sequence[str], rule: Callable[[dict[str, Any]], float | None],
               ok: Callable[[float], bool], text: Callable[[Stat], str]) -> list[Measurement]:
    groups: dict[tuple, list[float]] = {}
    for c in ev.closeness:
        for row in c.rows:
            if row.get("kind") in kinds and (v := rule(row)) is not None and not math.isnan(v):
                groups.setdefault(tuple(sorted((row.get("setting") or {}).items())) + (("mask", row["kind"]),), []).append(v)
    return [Measurement(dict(s), text(Stat(v)), ok(Stat(v).mean), {"mean": Stat(v).mean}) for s, v in sorted(groups.items())]


def _acc_gap(row: dict[str, Any]) -> float:
    return row["test_accuracy"] - row["test_accuracy_full"]


def _gap_text(s: Stat) -> str:
    return f"masked − full test accuracy {100 * s.mean:+.1f} points ({100 * min(s.values):+.1f} to {100 * max(s.values):+.1f}, n = {len(s.values)})"


def _step_vanished(ev: Evidence) -> list[Measurement]:
    trials = [t for t in standard(ev.trials) if t.history.get("drift/step_update_vanished_frac")]
    out = []
    for setting, group in by_setting(trials).items():
        st = Stat([statistics.fmean(v for _, v in t.history["drift/step_update_vanished_frac"]) for t in group])
        out.append(Measurement(dict(setting), st.text(), st.mean >= 0.95, {"mean": st.mean}))
    return out


def _sgd(ev: Evidence) -> list[Measurement]:
    trials = [t for t in ev.trials if t.param("training.optimizer") == "sgd" and t.param("training.precision", "fp32") == "fp32"]
    return _per_setting(trials, "final/changed_frac_bf16", lambda x: x <= 0.0002)


def _rel_vs_bitwise(ev: Evidence) -> list[Measurement]:
    out = []
    for setting, group in by_setting(standard(ev.trials)).items():
        d = Stat([t.get("final/sparsity_rel_0.001") - t.get("final/sparsity_bf16") for t in group
                  if "final/sparsity_rel_0.001" in t.metrics])
        if d.values:
            out.append(Measurement(dict(setting), f"rel:1e-3 − bitwise sparsity {100 * d.mean:+.3f} points "
                                   f"(max |Δ| {100 * max(abs(x) for x in d.values):.3f}, n = {len(d.values)})",
                                   max(abs(x) for x in d.values) <= 0.005, {"mean": d.mean}))
    return out


CLAIMS: tuple[Claim, ...] = (
    Claim("T1", "Table 1", "RL fine-tuning leaves most parameters unchanged", "68.5–96.0 % sparsity (7–70B, tol 1e-5)",
          "mean sparsity at abs:1e-5 of the RL and preference trials within 68.5–96.0 %", "all",
          lambda ev: _per_setting(_rl(standard(ev.trials)), SPARSITY, within(0.685, 0.96))),
    Claim("SFT", "§1, Table 5", "SFT updates are dense", "6–15 % (public SFT stages); 6.8 % SFT on external data",
          "mean sparsity at abs:1e-5 of SFT trials within 6–15 %", "table5_causes",
          lambda ev: _per_setting([t for t in standard(ev.trials) if t.algorithm == "sft"], SPARSITY, within(0.06, 0.15))),
    Claim("T5-data", "Table 5", "Training on the model's own samples is sparse, on external text dense",
          "RAFT 91.2 %, RAFT++ 69.4 % vs external SFT 6.8 %",
          "RAFT and RAFT++ each at least 10 points sparser than external SFT", "table5_causes",
          lambda ev: _variant_pair(ev, ("raft", "raftpp"), "sft_external",
                                   lambda m: min(m["raft"], m["raftpp"]) - m["sft_external"] >= 0.10)),
    Claim("T5-dpo", "Table 5", "DPO on in-distribution pairs is sparse, on off-policy pairs dense",
          "81.4 % vs 6.8–7.7 %", "in-distribution DPO at least 10 points sparser than off-policy DPO", "table5_causes",
          lambda ev: _variant_pair(ev, ("dpo_indist",), "dpo_offpolicy", lambda m: m["dpo_indist"] - m["dpo_offpolicy"] >= 0.10)),
    Claim("T5-kl", "Table 5", "The KL penalty barely changes sparsity", "GRPO 69.8 % with KL vs 68.8 % without",
          "|with − without| ≤ 2 points", "table5_causes",
          lambda ev: _variant_pair(ev, ("grpo_kl",), "grpo", lambda m: abs(m["grpo_kl"] - m["grpo"]) <= 0.02)),
    Claim("T5-clip", "§6", "Gradient clipping barely changes sparsity", "\"comparable\" (no number)",
          "|without − with clipping| ≤ 2 points", "table5_causes",
          lambda ev: _variant_pair(ev, ("grpo_noclip",), "grpo", lambda m: abs(m["grpo_noclip"] - m["grpo"]) <= 0.02)),
    Claim("T4-seed", "Table 4", "Runs differing in the seed alone overlap above chance",
          "o1/o2 60.5/60.6 % vs chance 36.7/36.7 %", "o_A and o_B each more than 1 point above chance", "table4_overlap",
          lambda ev: _overlap_both(ev, "seed")),
    Claim("T4-data", "Table 4", "Runs differing in the data alone overlap above chance",
          "26.7/67.1 % vs chance 14.6/36.7 %", "o_A and o_B each more than 1 point above chance", "table4_overlap",
          lambda ev: _overlap_both(ev, "data_seed")),
    Claim("T4-algo", "Table 4", "Runs differing in the algorithm overlap above chance",
          "59.1/33.2 % vs chance 23.0/12.9 % (DPO vs PRIME, with seed and data)",
          "o_A and o_B each more than 1 point above chance (here the algorithm alone differs)", "table4_overlap",
          lambda ev: _overlap_both(ev, "algorithm")),
    Claim("D-plateau", "§6, Fig 5", "Sparsity falls, then levels off", "levels off near 80 % over 21 PRIME checkpoints",
          "the fall over the second half of the mask steps at most a third of the fall over the first", "dynamics",
          _plateau),
    Claim("D-consecutive", "§6", "Consecutive checkpoints differ in few weights", "about 7 %",
          "within a factor of 2 of 7 % (3.5–14 %), mean over mask steps after the first", "dynamics", _consecutive),
    Claim("D-reverted", "§6", "Few ever-updated weights end outside the final subnetwork", "8.5 %",
          "within a factor of 2 (4.25–17 %)", "dynamics",
          lambda ev: _per_setting(_dynamics_trials(ev), "final/reverted_frac_of_ever", within(0.0425, 0.17), extra=["algorithm"])),
    Claim("D-split", "§6", "Never updated / updated but back at θ0 / final subnetwork", "72 / 8 / 20 % (PRIME)",
          "each share within a factor of 2 of the published one", "dynamics", _split),
    Claim("Layers", "§5", "All layers are similarly sparse; layer norms get almost no updates", "qualitative",
          "per-block sparsity spread ≤ 15 points and ≥ 95 % of norm weights unchanged", "all", _layers),
    Claim("T2-rank", "Table 2", "The sparse update is nearly full rank", "99.2–99.8 % of the maximum rank",
          "mean update rank ≥ 95 % of the maximum", "all",
          lambda ev: _per_setting(_rl(standard(ev.trials)), "final/update_rank_frac", lambda x: x >= 0.95)),
    Claim("RQ2", "§4, RQ2", "Training the subnetwork alone matches the full run", "DPO 40.3 → 41.9, PRIME 69.8 → 72.2",
          "masked test accuracy at most 2 points below the full run's (about one standard error)", "rq2_subnetwork",
          lambda ev: _closeness(ev, ("learned",), _acc_gap, lambda x: x >= -0.02, _gap_text)),
    Claim("RQ3", "§4, RQ3", "The subnetwork run ends almost identical to the full run",
          "94.0 % (DPO), 90.5 % (PRIME) identical at 1e-5; 100 % at 1e-4", "≥ 90 % of parameters identical at abs:1e-5",
          "rq2_subnetwork",
          lambda ev: _closeness(ev, ("learned",), lambda r: r["identical"].get("abs:1e-5"), lambda x: x >= 0.90,
                                lambda s: s.text())),
    Claim("Razor", "RL's Razor", "In float32 there is no sparsity", "the same training in float32: no sparsity",
          "≥ 99 % of the float32 master weights changed", "all",
          lambda ev: _per_setting(standard(ev.trials), "final/changed_frac_masters", lambda x: x >= 0.99)),
    Claim("PNT-rel", "The Path Not Taken", "rel:1e-3 is bf16 bitwise equality", "equivalent",
          "|sparsity at rel:1e-3 − bitwise sparsity| ≤ 0.5 points in every trial", "all", _rel_vs_bitwise),
    Claim("PNT-jaccard", "The Path Not Taken", "Cross-seed subnetworks overlap above chance",
          "Jaccard 0.55–0.60 vs random 0.37–0.47", "Jaccard more than 1 point above chance", "table4_overlap",
          lambda ev: _overlap_pairs(ev, "seed", "jaccard")),
    Claim("PULSE", "PULSE", "Most per-step updates vanish after the bf16 cast", "about 99 %",
          "≥ 95 % of the master entries a step moves keep their bf16 value (mean over mask steps)", "all",
          _step_vanished),
    Claim("SGD", "Do We Need Adam?", "SGD updates almost no bf16 parameters", "< 0.02 %",
          "≤ 0.02 % of bf16 entries changed (fp32 masters, SGD)", "precision", _sgd),
    Claim("Random-mask", "Multiple Ticket", "A random subnetwork trains as well as the learned one",
          "a random 1 % matches full RLVR", "random-mask test accuracy at most 2 points below the full run's",
          "rq2_subnetwork", lambda ev: _closeness(ev, ("random_global", "random_per_tensor"), _acc_gap, lambda x: x >= -0.02, _gap_text)),
)


def evaluate(ev: Evidence, claims: Sequence[Claim] = CLAIMS) -> list[Verdict]:
    return [Verdict(c, c.measure(ev)) for c in claims]


def model_name(model: str) -> str:
    """embedded:tiny-arith -> tiny-arith; a cache directory -> its name without the content hash."""
    name = model.rsplit(":", 1)[-1].rstrip("/").rsplit("/", 1)[-1]
    return re.sub(r"-[0-9a-f]{12}$", "", name)


def setting_text(setting: Setting) -> str:
    parts = []
    for k, v in setting.items():
        if v not in ("", None):
            parts.append(model_name(v) if k == "model" else f"{_key_name(k)} {v}")
    return ", ".join(parts)
