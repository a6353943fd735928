"""bnorder.conclusions: the power figure means what it says, Holm's adjustment, and the
report's per-network conclusions and published-figure comparison, on studies made up so
that the right answer is known."""
import math

import pytest
from scipy import stats

from bnorder import conclusions, report


def _run(model, label, seed, accs, batch=128):
    rows = [{"epoch": e + 1, "step": 100 * (e + 1), "test_acc": a, "test_loss": 1 - a,
             "wall_s": 10.0 * (e + 1), "step_s_median": 0.1} for e, a in enumerate(accs)]
    grad = [{"unit": "u", "index": 0, "grad_norm": 1.0}]
    return dict(model=model, label=label, order="conv-bn-relu", norm="bn", backend="fused",
                seed=seed, batch_size=batch, rows=rows,
                gradflow={"init": grad, "final": grad})


def _study(final: dict, seeds: int, model="resnet20", rising=0.0, data="fashion-mnist",
           epochs=2):
    """Runs whose last-epoch accuracy is `final[label]` + a seed offset of ±0.1 pp, and whose
    previous epoch is `rising` lower."""
    spread = [0.001 * ((s % 3) - 1) for s in range(seeds)]
    runs = [_run(model, lab, s, [acc + d - rising, acc + d])
            for lab, acc in final.items() for s, d in zip(range(seeds), spread)]
    spec = dict(backends=["fused"], data=data, epochs=epochs, subset=None, batch_size=128,
                test_subset=None)
    return spec, report.analyse(spec, runs)


def test_detectable_difference_has_the_stated_power():
    n, std = 5, 0.002
    delta = conclusions.detectable_difference(n, std)
    # the two-sample t-test's power at that difference, from the noncentral t
    df, ncp = 2 * (n - 1), delta / (std * math.sqrt(2 / n))
    crit = stats.t.ppf(0.975, df)
    power = 1 - stats.nct.cdf(crit, df, ncp) + stats.nct.cdf(-crit, df, ncp)
    assert 0.75 < power < 0.85
    assert conclusions.detectable_difference(10, std) < delta      # more seeds, finer
    assert math.isnan(conclusions.detectable_difference(1, std))
    assert math.isnan(conclusions.detectable_difference(3, float("nan")))


def test_holm():
    assert conclusions.holm([0.01, 0.04, 0.03, None]) == pytest.approx([0.03, 0.06, 0.06,
                                                                        None])
    assert conclusions.holm([0.5, 0.6]) == [1.0, 1.0]
    assert conclusions.holm([]) == []


def test_a_real_difference_is_found_and_a_small_one_is_not():
    spec, res = _study({"conv-bn-relu": 0.90, "conv-relu-bn": 0.92, "bn-conv-relu": 0.9005,
                        "none": 0.85}, seeds=5)
    (c,) = conclusions.per_network(spec, res)
    assert c["n"] == 5 and c["test_images"] == 10_000
    pairs = {(s["a"], s["b"]) for s in c["significant"]}
    assert ("conv-bn-relu", "conv-relu-bn") in pairs
    # 0.05 pp is far below what five seeds at ±0.1 pp can detect
    assert ("conv-bn-relu", "bn-conv-relu") not in pairs
    assert 0.0005 < c["detectable"] < 0.01
    text = " ".join(p[1] for p in conclusions.sections(spec, res) if p[0] == "p")
    assert "Significant after Holm's correction" in text and "conv-relu-bn" in text
    assert "Without normalization (`none`) it reached 85.0 pp" in text
    assert "other data than this study's (fashion-mnist)" in text


def test_one_seed_concludes_nothing_about_ranking():
    spec, res = _study({"conv-bn-relu": 0.90, "conv-relu-bn": 0.95}, seeds=1, rising=0.05)
    (c,) = conclusions.per_network(spec, res)
    assert c["n"] == 1 and not c["significant"] and math.isnan(c["detectable"])
    (para,) = [p[1] for p in conclusions.sections(spec, res)
               if p[0] == "p" and p[1].startswith("resnet20:")]
    assert "no difference between configurations can be tested" in para
    assert "Still learning at the last epoch" in para          # +5 pp in the last epoch
    assert conclusions.summary_lines(spec, res) == [
        "resnet20: 1 seeds, 2 epochs; one seed: no difference can be tested"]


def test_published_figures_on_cifar10():
    spec, res = _study({"conv-bn-relu": 0.9125, "conv-relu-bn": 0.93, "none": 0.85},
                       seeds=5, data="cifar10", epochs=164)
    section = conclusions.published(spec, res)
    (table,) = [s for s in section if s[0] == "table"]
    he, mishkin = table[2]
    assert he[0].startswith("He et al. 2015") and he[2] == "8.75 %"
    # seed offsets −0.1, 0, +0.1, −0.1, 0 pp: mean accuracy 91.23 %, error 8.77 %
    assert he[3].startswith("8.77 % ± 0.08 (n = 5)") and he[4] == "same schedule"
    assert mishkin[0].startswith("Mishkin, Sergievskiy & Matas 2017")
    assert mishkin[3] == "+1.8 pp" and mishkin[4].startswith("same direction")
    # a shorter schedule is flagged as not comparable
    spec["epochs"] = 30
    (table,) = [s for s in conclusions.published(spec, res) if s[0] == "table"]
    assert "not comparable" in table[2][0][4]
