"""What a study's data can and cannot conclude, per network, and how it compares with the
published figures it can be held against.

For each network the report states: seeds per configuration, the training each run had
(epochs, images, steps), the spread between seeds, the smallest difference between two
configurations that the seeds could detect, which differences are significant after a
correction for the number of pairs compared, and whether the curves were still rising.

The smallest detectable difference uses the usual normal-theory formula for two groups of
n seeds with a common standard deviation s, in its t form (Welch's test with equal n and
variances has 2(n − 1) degrees of freedom):

    δ = (t[1 − α/2, df] + t[power, df]) · s · √(2/n),   α = 0.05, power = 0.8

Pairs are tested with Welch's t-test (report.welch); within a network the p-values of all
pairs are adjusted with Holm's step-down method (statsmodels' multipletests would do the
same; it is not a dependency of the study, and Holm is six lines), so that "significant"
holds for the network's family of comparisons, not for one pair picked after the fact.

Published figures (held against the study only when it ran on the data they were measured
on, CIFAR-10, i.e. with `--preset paper`):

- He, Zhang, Ren & Sun 2015, "Deep Residual Learning for Image Recognition" (CVPR 2016),
  Table 6: ResNet-20 on CIFAR-10, 8.75 % test error (conv → BN → ReLU, 164 epochs).
- Mishkin, Sergievskiy & Matas 2017, "Systematic evaluation of convolution neural network
  advances on the ImageNet" (Computer Vision and Image Understanding 161): batch norm placed
  after the ReLU was slightly better than before it (ImageNet; not CIFAR-10, so it gives a
  direction to compare with, not a figure).
"""
from __future__ import annotations

import math
import statistics
from typing import Dict, List, Optional

ALPHA = 0.05
POWER = 0.8
RISING_PP = 1.0          # a last-epoch gain above this (percentage points) = still learning
# Full test-set sizes, for the sampling error of an accuracy on the whole test set.
TEST_IMAGES = {"fashion-mnist": 10_000, "cifar10": 10_000}

HE_2015 = dict(
    source="He et al. 2015, Deep Residual Learning for Image Recognition, Table 6",
    model="resnet20", label="conv-bn-relu", error=0.0875, epochs=164)
MISHKIN_2017 = ("Mishkin, Sergievskiy & Matas 2017, Systematic evaluation of convolution "
                "neural network advances on the ImageNet (CVIU 161)")


def detectable_difference(n: int, std: float, alpha: float = ALPHA,
                          power: float = POWER) -> float:
    """Smallest difference of means two groups of `n` seeds with seed std `std` detect with
    Welch's test at level `alpha` with probability `power` (nan if n < 2 or std unknown)."""
    from scipy import stats
    if n < 2 or not math.isfinite(std):
        return float("nan")
    df = 2 * (n - 1)
    return (stats.t.ppf(1 - alpha / 2, df) + stats.t.ppf(power, df)) * std * math.sqrt(2 / n)


def holm(pvalues: List[Optional[float]]) -> List[Optional[float]]:
    """Holm's step-down adjustment; None (no test) stays None and does not count."""
    tested = sorted((p, i) for i, p in enumerate(pvalues) if p is not None)
    m, out, running = len(tested), [None] * len(pvalues), 0.0
    for rank, (p, i) in enumerate(tested):
        running = max(running, min(1.0, (m - rank) * p))
        out[i] = running
    return out


def _pp(v: float, signed: bool = False) -> str:
    if v is None or not math.isfinite(v):
        return "—"
    return f"{100 * v:{'+' if signed else ''}.1f} pp"


def per_network(spec: Dict, res: Dict) -> List[Dict]:
    """One dict per network: the figures the conclusion paragraphs and table are made of."""
    test_images = spec.get("test_images") or spec.get("test_subset") \
        or TEST_IMAGES.get(spec.get("data"))
    out = []
    for model in res["models"]:
        rows = [r for r in res["rows"] if r["model"] == model]
        bn_rows = [r for r in rows if r["label"] != "none"]
        n = min((r["n"] for r in rows), default=0)
        variances = [r["acc_std"] ** 2 for r in bn_rows if math.isfinite(r["acc_std"])]
        seed_std = math.sqrt(statistics.fmean(variances)) if variances else float("nan")
        pairs = [p for p in res["pairs"] if p["model"] == model]
        adjusted = holm([p["p"] for p in pairs])
        means = {r["label"]: r["acc_mean"] for r in rows}
        significant = [dict(p, p_holm=q, diff=means[p["a"]] - means[p["b"]])
                       for p, q in zip(pairs, adjusted) if q is not None and q < ALPHA]
        rising = {}
        for r in rows:
            seeds = res["groups"].get((model, r["label"], res["primary"]), [])
            last = min(len(g["rows"]) for g in seeds) if seeds else 0
            if last >= 2:
                gains = [g["rows"][last - 1]["test_acc"] - g["rows"][last - 2]["test_acc"]
                         for g in seeds]
                rising[r["label"]] = statistics.fmean(gains)
        seeds_of = res["groups"].get((model, rows[0]["label"], res["primary"]), []) \
            if rows else []
        steps = seeds_of[0]["rows"][-1].get("step") if seeds_of and seeds_of[0]["rows"] \
            else None
        best = max(bn_rows, key=lambda r: r["acc_mean"], default=None)
        none = next((r for r in rows if r["label"] == "none"), None)
        mean_acc = statistics.fmean(r["acc_mean"] for r in bn_rows) if bn_rows else None
        out.append(dict(
            model=model, n=n, seed_std=seed_std, detectable=detectable_difference(n, seed_std),
            pairs=len(pairs), tested=sum(q is not None for q in adjusted),
            significant=significant, rising=rising, steps=steps,
            epochs=spec.get("epochs"), best=best, none=none,
            test_images=test_images,
            test_se=(math.sqrt(mean_acc * (1 - mean_acc) / test_images)
                     if test_images and mean_acc is not None else float("nan"))))
    return out


def _paragraph(spec: Dict, c: Dict) -> str:
    n, model = c["n"], c["model"]
    train = (f"{c['epochs']} epochs on {spec.get('subset') or 'all the'} training images "
             f"({c['steps']} steps of {spec.get('batch_size')})" if c["steps"] else
             f"{c['epochs']} epochs")
    text = [f"{model}: {n} seed{'s' if n != 1 else ''} per configuration, {train}, "
            f"tested on {c['test_images'] or 'the'} test images."]
    if n < 2:
        text.append("With one seed no difference between configurations can be tested: each "
                    "figure is a single draw, and seed-to-seed variation (often a "
                    "percentage point or more in short training) is unknown. The data show "
                    "that each configuration trains and what it costs per step; they cannot "
                    "rank the placements.")
    else:
        text.append(f"Seeds differ by {_pp(c['seed_std'])} (pooled std of the bn "
                    f"configurations), so two configurations would have to differ by about "
                    f"{_pp(c['detectable'])} to be detected with {POWER:.0%} probability at "
                    f"p < {ALPHA} (n = {n} per side); smaller differences, if they exist, "
                    "are invisible here.")
        if c["significant"]:
            found = "; ".join(f"{s['a']} vs {s['b']} {_pp(s['diff'], signed=True)} "
                              f"(p = {s['p']:.3g}, Holm {s['p_holm']:.3g})"
                              for s in c["significant"])
            text.append(f"Significant after Holm's correction over the {c['tested']} pairs "
                        f"tested: {found}.")
        else:
            text.append(f"No pair differs at p < {ALPHA} after Holm's correction over the "
                        f"{c['tested']} pairs tested: the placements are not distinguished "
                        "at this number of seeds.")
    rising = [lab for lab, gain in c["rising"].items() if gain * 100 > RISING_PP]
    if rising:
        text.append(f"Still learning at the last epoch ({', '.join(rising)} gained more than "
                    f"{RISING_PP:g} pp in it): the figures rank the placements after this "
                    "training budget, not at convergence.")
    elif c["rising"]:
        text.append(f"No configuration gained more than {RISING_PP:g} pp in the last epoch; "
                    "with a schedule that ends at learning rate zero this flattening is "
                    "expected and does not prove convergence — a longer schedule may end "
                    "higher and rank differently.")
    if c["none"] is not None and c["best"] is not None:
        text.append(f"Without normalization (`none`) it reached "
                    f"{_pp(c['none']['acc_mean'])} against {_pp(c['best']['acc_mean'])} for "
                    f"the best placement ({c['best']['label']}).")
    if math.isfinite(c["test_se"]):
        text.append(f"As an estimate of accuracy on unseen images, each figure carries a "
                    f"test-set sampling error of about ±{_pp(c['test_se'])} (binomial, "
                    f"{c['test_images']} images); it is shared by all configurations, "
                    "which are tested on the same images, so it does not blur their "
                    "comparison.")
    return " ".join(text)


def published(spec: Dict, res: Dict) -> List[tuple]:
    """The comparison with published figures, or a note saying why there is none."""
    if spec.get("data") != "cifar10":
        return [("p", f"Published figures for these placements (He et al. 2015 on CIFAR-10; "
                      f"{MISHKIN_2017} on ImageNet) were measured on other data than this "
                      f"study's ({spec.get('data')}), so they are not compared here; "
                      "`--preset paper` runs the CIFAR-10 recipe they can be held against.")]
    rows = {(r["model"], r["label"]): r for r in res["rows"]}
    table = []
    he = rows.get((HE_2015["model"], HE_2015["label"]))
    if he is not None:
        err, std = 1 - he["acc_mean"], he["acc_std"]
        note = ("same schedule" if spec.get("epochs") == HE_2015["epochs"] else
                f"{spec.get('epochs')} epochs against the paper's {HE_2015['epochs']}: "
                "not comparable as a final figure")
        table.append([HE_2015["source"], "resnet20 conv-bn-relu, test error",
                      f"{100 * HE_2015['error']:.2f} %",
                      f"{100 * err:.2f} %" + (f" ± {100 * std:.2f}" if math.isfinite(std)
                                              else "") + f" (n = {he['n']})",
                      note])
    for model in res["models"]:
        a, b = rows.get((model, "conv-relu-bn")), rows.get((model, "conv-bn-relu"))
        if a is None or b is None:
            continue
        test = a.get("vs_cbr") or {}
        diff = a["acc_mean"] - b["acc_mean"]
        if test.get("p") is None:
            verdict = "not tested (" + (test.get("note") or "too few seeds") + ")"
        elif test["p"] < ALPHA:
            verdict = ("same direction" if diff > 0 else "opposite direction") + \
                f", p = {test['p']:.3g}"
        else:
            verdict = f"no significant difference, p = {test['p']:.3g}"
        table.append([MISHKIN_2017, f"{model}: BN after ReLU − BN before ReLU, accuracy",
                      "slightly positive (ImageNet)", _pp(diff, signed=True), verdict])
    if not table:
        return [("p", "No configuration the published figures concern was run.")]
    return [("p", "Published figures against this study's CIFAR-10 runs (mean ± std over "
                  "seeds of the last epoch)."),
            ("table", ["source", "quantity", "published", "here", "note"], table)]


def sections(spec: Dict, res: Dict) -> List[tuple]:
    """The report's "What the data can and cannot conclude" section."""
    figures = per_network(spec, res)
    table = [[c["model"], str(c["n"]), str(c["epochs"]), str(c["steps"] or "—"),
              _pp(c["seed_std"]), _pp(c["detectable"]),
              f"{len(c['significant'])} of {c['tested']}",
              _pp(c["test_se"])] for c in figures]
    return ([("h2", "What the data can and cannot conclude"),
             ("p", "Per network: the seeds, the training each run had, the seed-to-seed "
                   f"spread, the smallest difference the seeds could detect ({POWER:.0%} "
                   f"power, α = {ALPHA}), the pairs significant after Holm's correction, "
                   "and the test set's sampling error."),
             ("table", ["model", "seeds", "epochs", "steps", "seed std",
                        "detectable difference", "significant pairs (Holm)",
                        "test-set error"], table)]
            + [("p", _paragraph(spec, c)) for c in figures]
            + [("h3", "Published figures")] + published(spec, res))


def summary_lines(spec: Dict, res: Dict) -> List[str]:
    """One line per network for the terminal."""
    lines = []
    for c in per_network(spec, res):
        if c["n"] < 2:
            verdict = "one seed: no difference can be tested"
        elif c["significant"]:
            verdict = "significant: " + ", ".join(
                f"{s['a']} vs {s['b']} {_pp(s['diff'], signed=True)}" for s in c["significant"])
        else:
            verdict = f"no pair significant (detectable ≈ {_pp(c['detectable'])})"
        lines.append(f"{c['model']}: {c['n']} seeds, {c['epochs']} epochs; {verdict}")
    return lines
