"""The study report: report.md and report.html over the same sections, PNG figures
(matplotlib, Agg) and a rich table for the terminal. Everything shown is computed from the
run folders' metrics.jsonl / gradflow.json / config.json.

Statistics: mean ± sample standard deviation over seeds; orders are compared with Welch's
t-test on the final test accuracies (scipy.stats.ttest_ind, equal_var=False), which needs at
least two seeds per side (and says little with fewer than about five).
"""
from __future__ import annotations

import html
import itertools
import math
import os
import statistics
from pathlib import Path
from typing import Callable, Dict, List, Optional

import numpy as np

from . import conclusions
from .common import StudyError, atomic_write_bytes, read_jsonl
from .throughput import agreement

TARGET_FRACTION = 0.9   # time-to-accuracy target: this fraction of the best final mean accuracy


def _load_runs(runs: List[Dict], run_dir: Callable, out: Path) -> List[Dict]:
    import json
    loaded = []
    for r in runs:
        d = run_dir(out, r)
        if not (d / "done.json").exists():
            continue
        rec = dict(r)
        rec.pop("config")
        rec["batch_size"] = r["config"].batch_size
        rec["rows"] = read_jsonl(d / "metrics.jsonl")
        rec["gradflow"] = json.loads((d / "gradflow.json").read_text())
        loaded.append(rec)
    return loaded


def _mean_std(values: List[float]):
    vals = [v for v in values if v is not None and math.isfinite(v)]
    if not vals:
        return float("nan"), float("nan")
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else float("nan"))


def _pm(mean: float, std: float, digits: int = 4, scale: float = 1.0) -> str:
    if not math.isfinite(mean):
        return "—"
    if not math.isfinite(std):
        return f"{mean * scale:.{digits}f}"
    return f"{mean * scale:.{digits}f} ± {std * scale:.{digits}f}"


def welch(a: List[float], b: List[float]) -> Dict:
    """Welch's t-test between two samples of final accuracies, or why it cannot be run."""
    from scipy import stats
    if len(a) < 2 or len(b) < 2:
        return {"p": None, "note": f"too few seeds (n={len(a)} vs {len(b)}; need ≥ 2 each)"}
    if np.var(a) == 0 and np.var(b) == 0:
        return {"p": None, "note": "no variance across seeds"}
    res = stats.ttest_ind(a, b, equal_var=False)
    note = "few seeds: low power" if min(len(a), len(b)) < 5 else ""
    return {"p": float(res.pvalue), "t": float(res.statistic), "note": note}


# ---------------------------------------------------------------------------- analysis

def analyse(spec: Dict, runs: List[Dict], bench: Optional[Dict] = None) -> Dict:
    """Per network × configuration: accuracy statistics, time to accuracy, and step times —
    from `bench` (bnorder.throughput, interleaved) when given, else from the runs."""
    backends = list(spec["backends"])
    primary = "fused" if "fused" in backends else backends[0]
    labels, models = [], []
    for r in runs:
        if r["label"] not in labels:
            labels.append(r["label"])
        if r["model"] not in models:
            models.append(r["model"])
    groups: Dict[tuple, List[Dict]] = {}
    for r in runs:
        groups.setdefault((r["model"], r["label"], r["backend"]), []).append(r)

    def finals(model, lab, backend):
        return [g["rows"][-1]["test_acc"] for g in groups.get((model, lab, backend), [])]

    def step_s(model, lab, backend):
        steps = [row["step_s_median"] for g in groups.get((model, lab, backend), [])
                 for row in g["rows"]]
        return statistics.median(steps) if steps else float("nan")

    rows = []
    for model in models:
        best = max((statistics.fmean(finals(model, lab, primary)) for lab in labels
                    if finals(model, lab, primary)), default=float("nan"))
        target = TARGET_FRACTION * best
        for lab in labels:
            seeds = groups.get((model, lab, primary), [])
            if not seeds:
                continue
            acc = finals(model, lab, primary)
            mean, std = _mean_std(acc)
            curve = _mean_curve(seeds, "test_acc")
            wall = _mean_curve(seeds, "wall_s")
            reached = next((i for i, a in enumerate(curve) if a >= target), None)
            row = dict(model=model, label=lab, n=len(acc), acc_mean=mean, acc_std=std,
                       accs=acc, loss_mean=_mean_std([g["rows"][-1]["test_loss"]
                                                      for g in seeds])[0],
                       target=target,
                       epochs_to_target=None if reached is None else reached + 1,
                       wall_to_target=None if reached is None else wall[reached],
                       batch_size=seeds[0]["batch_size"])
            if lab != "conv-bn-relu" and groups.get((model, "conv-bn-relu", primary)):
                row["vs_cbr"] = welch(acc, finals(model, "conv-bn-relu", primary))
            for backend in backends:
                s = step_s(model, lab, backend)
                row[f"run_img_s_{backend}"] = row["batch_size"] / s if s == s else float("nan")
                base = step_s(model, "none", backend)
                if bench:
                    s, base = (bench.get(f"{model}|{k}|{backend}", {}).get("step_s", float("nan"))
                               for k in (lab, "none"))
                    row["bench_batch"] = spec.get("bench_batch")
                row[f"step_s_{backend}"] = s
                batch = row["bench_batch"] if bench else row["batch_size"]
                row[f"img_s_{backend}"] = batch / s if s == s else float("nan")
                row[f"tax_{backend}"] = (s / base - 1) if lab != "none" and base == base \
                    else None
            row["eager_fused_diff"] = _max_diff(groups.get((model, lab, "eager"), []),
                                                groups.get((model, lab, "fused"), []))
            row["agreement"] = agreement(*(bench.get(f"{model}|{lab}|{b}", {})
                                           for b in ("eager", "fused"))) if bench else None
            rows.append(row)
    pairs = []
    for model in models:
        for a, b in itertools.combinations(labels, 2):
            xa, xb = finals(model, a, primary), finals(model, b, primary)
            if xa and xb:
                pairs.append(dict(model=model, a=a, b=b, **welch(xa, xb)))
    return dict(primary=primary, backends=backends, labels=labels, models=models,
                rows=rows, pairs=pairs, groups=groups)


def _max_diff(eager: List[Dict], fused_runs: List[Dict]) -> Optional[float]:
    """Largest |final acc eager − final acc fused| over the seeds both backends ran."""
    by_seed = {g["seed"]: g["rows"][-1]["test_acc"] for g in fused_runs}
    diffs = [abs(g["rows"][-1]["test_acc"] - by_seed[g["seed"]]) for g in eager
             if g["seed"] in by_seed]
    return max(diffs) if diffs else None


def _mean_curve(seeds: List[Dict], key: str) -> List[float]:
    n = min(len(g["rows"]) for g in seeds)
    out = []
    for i in range(n):
        vals = [g["rows"][i][key] for g in seeds if g["rows"][i][key] is not None]
        out.append(statistics.fmean(vals) if vals else float("nan"))
    return out


# ---------------------------------------------------------------------------- figures

def _colors(labels):
    import matplotlib
    cmap = matplotlib.colormaps["tab10"]
    return {lab: ("0.45" if lab == "none" else cmap(i)) for i, lab in enumerate(labels)}


def _save(fig, path: Path) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    import matplotlib.pyplot as plt
    plt.close(fig)
    return path.name


def _curves(res: Dict, folder: Path, x_key: Optional[str], name: str) -> str:
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator
    models, colors = res["models"], _colors(res["labels"])
    fig, axes = plt.subplots(2, len(models), figsize=(4.2 * len(models), 6.4), squeeze=False)
    for j, model in enumerate(models):
        for lab in res["labels"]:
            seeds = res["groups"].get((model, lab, res["primary"]))
            if not seeds:
                continue
            n = min(len(g["rows"]) for g in seeds)
            x = (np.arange(1, n + 1) if x_key is None else
                 np.array(_mean_curve(seeds, x_key)))
            for i, key in enumerate(("test_acc", "test_loss")):
                ys = np.array([[np.nan if g["rows"][e][key] is None else g["rows"][e][key]
                                for e in range(n)] for g in seeds], dtype=float)
                mean = np.nanmean(ys, axis=0)
                ax = axes[i][j]
                ax.plot(x, mean, marker="o", ms=3, color=colors[lab], label=lab)
                if len(seeds) > 1:
                    std = np.nanstd(ys, axis=0, ddof=1)
                    ax.fill_between(x, mean - std, mean + std, color=colors[lab], alpha=0.2)
        axes[0][j].set_title(f"{model} ({res['primary']})")
        axes[0][j].set_ylabel("test accuracy")
        axes[1][j].set_ylabel("test loss")
        for i in range(2):
            axes[i][j].set_xlabel("epoch" if x_key is None else "wall time (s, mean over seeds)")
            if x_key is None:
                axes[i][j].xaxis.set_major_locator(MaxNLocator(integer=True))
            axes[i][j].grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    return _save(fig, folder / name)


def _panels(res: Dict, height: float = 3.6):
    """One panel per network: (figure, [(axes, network, its report rows)])."""
    import matplotlib.pyplot as plt
    models = res["models"]
    fig, axes = plt.subplots(1, len(models), figsize=(4.2 * len(models), height),
                             squeeze=False)
    return fig, [(axes[0][j], m, [r for r in res["rows"] if r["model"] == m])
                 for j, m in enumerate(models)]


def _finish_panel(ax, names: List[str], title: str, ylabel: Optional[str] = None) -> None:
    ax.set_xticks(range(len(names)), names, rotation=20, fontsize=8)
    ax.set_title(title)
    if ylabel:
        ax.set_ylabel(ylabel)
    ax.grid(axis="y", alpha=0.3)


def _bars(res: Dict, folder: Path, name: str, key: str, ylabel: str,
          labels: List[str], percent: bool = False) -> str:
    backends = res["backends"]
    fig, panels = _panels(res)
    width = 0.8 / len(backends)
    for ax, model, model_rows in panels:
        rows = {r["label"]: r for r in model_rows}
        labs = [lab for lab in labels if lab in rows]
        for b, backend in enumerate(backends):
            vals = [rows[lab].get(f"{key}_{backend}") for lab in labs]
            vals = [np.nan if v is None else v * (100 if percent else 1) for v in vals]
            ax.bar(np.arange(len(labs)) + b * width - 0.4 + width / 2, vals, width,
                   label=backend)
        _finish_panel(ax, labs, model, ylabel)
        if percent:
            ax.axhline(0, color="k", lw=0.8)
    panels[0][0].legend(fontsize=8)
    return _save(fig, folder / name)


def _final(res: Dict, folder: Path) -> str:
    colors = _colors(res["labels"])
    fig, panels = _panels(res)
    for ax, model, rows in panels:
        for i, r in enumerate(rows):
            ax.bar(i, r["acc_mean"], color=colors[r["label"]], alpha=0.6,
                   yerr=r["acc_std"] if math.isfinite(r["acc_std"]) else None, capsize=4)
            ax.scatter([i] * len(r["accs"]), r["accs"], color="k", s=10, zorder=3)
        _finish_panel(ax, [r["label"] for r in rows], f"{model}: final test accuracy")
    return _save(fig, folder / "final_accuracy.png")


def _time_to_acc(res: Dict, folder: Path) -> str:
    colors = _colors(res["labels"])
    fig, panels = _panels(res)
    for ax, model, rows in panels:
        for i, r in enumerate(rows):
            if r["wall_to_target"] is None:
                ax.text(i, 0, "not\nreached", ha="center", va="bottom", fontsize=7)
            else:
                ax.bar(i, r["wall_to_target"], color=colors[r["label"]])
        target = rows[0]["target"] if rows else float("nan")
        _finish_panel(ax, [r["label"] for r in rows], f"{model}: time to {target:.3f} acc",
                      f"wall s ({res['primary']})")
    return _save(fig, folder / "time_to_accuracy.png")


def _gradflow(res: Dict, folder: Path) -> str:
    colors = _colors(res["labels"])
    fig, panels = _panels(res, height=3.8)
    for ax, model, _ in panels:
        for lab in res["labels"]:
            seeds = res["groups"].get((model, lab, res["primary"]))
            if not seeds:
                continue
            for when, style in (("init", "--"), ("final", "-")):
                prof = np.array([[u["grad_norm"] for u in g["gradflow"][when]] for g in seeds])
                ax.plot(np.arange(prof.shape[1]), np.exp(np.log(prof + 1e-30).mean(0)),
                        style, color=colors[lab], marker=".",
                        label=f"{lab} ({when})")
        ax.set_yscale("log")
        ax.set_xlabel("unit (input → output)")
        ax.set_ylabel("‖∂L/∂W_conv‖ on a fixed batch")
        ax.set_title(f"{model}: gradient flow")
        ax.grid(alpha=0.3)
    panels[0][0].legend(fontsize=6, ncol=2)
    return _save(fig, folder / "gradient_flow.png")


# ---------------------------------------------------------------------------- documents

def _fmt(v, digits=3, percent=False, times=False):
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "—"
    if percent:
        return f"{100 * v:+.1f} %"
    return f"{v:.{digits}f}" + ("×" if times else "")


def _p(test: Optional[Dict]) -> str:
    if not test:
        return "(reference)"
    if test["p"] is None:
        return test["note"]
    return f"p = {test['p']:.3g}" + (f" ({test['note']})" if test["note"] else "")


def _sections(spec: Dict, res: Dict, figures: Dict, n_runs: int, n_done: int) -> List[tuple]:
    primary, backends = res["primary"], res["backends"]
    hp = ", ".join(f"{k} {spec.get(k)}" for k in ("data", "epochs", "subset", "test_subset",
                                                  "batch_size", "lr", "momentum",
                                                  "weight_decay", "schedule"))
    hp += "".join(f", {k} {spec[k]}" for k in ("lrs", "widths", "augment", "channels_last")
                  if k in spec)
    m = spec.get("machine", {})
    s = [("h1", f"bnorder study: {spec.get('preset')}"),
         ("p", spec.get("description", "")),
         ("p", f"Grid: models {', '.join(spec['models'])}; orders {', '.join(spec['orders'])}; "
               f"norms {', '.join(spec['norms'])}; seeds {', '.join(map(str, spec['seeds']))}; "
               f"backends {', '.join(backends)}. Hyper-parameters: {hp}."
               + (f" Overridden on the command line: {', '.join(spec['overridden'])}."
                  if spec.get("overridden") else "")),
         ("p", f"{n_done} of {n_runs} runs finished and are reported"
               + (f" (the time budget stopped the study before: "
                  f"{'; '.join(spec['not_started'])})" if spec.get("not_started") else "")
               + ". Machine: "
               f"{m.get('cpu', '?')}, {m.get('threads', '?')} threads, torch "
               f"{m.get('torch', '?')}, fused backend {m.get('fused_backend', '?')}. Norm "
               "`none` is trained once per network (conv-bn-relu topology) and is the BN-tax "
               "baseline. Convergence figures and tests use the "
               f"{primary} runs; eager and fused compute the same function, which the "
               "final-accuracy table checks (eager against fused losses over the same SGD "
               "steps, and final accuracies where both backends trained)."
               + (f" Seeds per backend: {spec['backend_seeds']} (others: {spec['seeds']})."
                  if spec.get("backend_seeds") else ""))]
    s += conclusions.sections(spec, res)
    s += [("h2", "Convergence"),
          ("p", "Test accuracy and loss per epoch, mean over seeds with a ±1 std band."),
          ("img", figures["curves_epoch"], "test accuracy / loss vs epoch"),
          ("p", "The same against wall-clock time (mean over seeds of the cumulative training "
                "+ evaluation time), which folds each order's speed into its convergence."),
          ("img", figures["curves_wall"], "test accuracy / loss vs wall time")]
    head = ["model", "config", "seeds", f"final acc ({primary})", "final loss",
            "|Δacc| eager vs fused runs", "eager vs fused loss (steps)",
            "vs conv-bn-relu (Welch)"]
    table = [[r["model"], r["label"], str(r["n"]), _pm(r["acc_mean"], r["acc_std"]),
              _fmt(r["loss_mean"]), _fmt(r["eager_fused_diff"], 4),
              "—" if r.get("agreement") is None else f"{r['agreement']:.1e}",
              _p(r.get("vs_cbr"))] for r in res["rows"]]
    s += [("h2", "Final accuracy"),
          ("p", "Mean ± sample std over seeds of the last epoch's test accuracy; dots in the "
                "figure are single seeds. Eager against fused: the largest final-accuracy "
                "difference over the seeds both backends trained (— where only one backend "
                "trained), and the largest relative difference of the training loss over "
                "the step-time measurement's SGD steps, where both backends start from the "
                "same parameters and step on the same batch. Its size is float32 rounding "
                "as the network amplifies it: about 1e-7 to 1e-5 at the first step, then "
                "growing with the steps, most in deep plain networks (a thin VGG-16 reaches "
                "1e-2 within a few steps; eager alone moves as far, 2e-3 to 3e-1 over 12 "
                "steps, when its input moves by one ulp, and in float64 the two backends' "
                "gradients agree to 1e-10). It is a size to read, not a pass/fail test: the "
                "float64 network comparisons of the test suite are the correctness check. "
                "The last column is Welch's t-test against conv-bn-relu; with fewer than two seeds no test is run, and with fewer than "
                "five its power is low."),
          ("table", head, table),
          ("img", figures["final"], "final test accuracy")]
    pairs = [[p["model"], p["a"], p["b"], "—" if p["p"] is None else f"{p['p']:.3g}",
              p["note"] or ""] for p in res["pairs"]]
    s += [("h3", "All pairs (Welch's t-test on final accuracy)"),
          ("table", ["model", "A", "B", "p", "note"], pairs)]
    tt = [[r["model"], r["label"], f"{r['target']:.3f}",
           "not reached" if r["epochs_to_target"] is None else str(r["epochs_to_target"]),
           _fmt(r["wall_to_target"], 1)] for r in res["rows"]]
    s += [("h2", "Time to accuracy"),
          ("p", f"Target per network: {TARGET_FRACTION:.0%} of the best final mean accuracy "
                "among its configurations. First epoch at which the seed-mean accuracy "
                "reaches it, and the mean wall time until then."),
          ("table", ["model", "config", "target", "epochs", "wall s"], tt),
          ("img", figures["tta"], "time to accuracy")]
    th = [[r["model"], r["label"], *(_fmt(r[f"img_s_{b}"], 1) for b in backends),
           *(_fmt(r[f"run_img_s_{b}"], 1) for b in backends),
           *(_fmt(r.get(f"tax_{b}"), percent=True) for b in backends)] for r in res["rows"]]
    both = "eager" in backends and "fused" in backends
    if both:
        for row, r in zip(th, res["rows"]):
            row.append(_fmt(r["step_s_eager"] / r["step_s_fused"], 2, times=True))
    bench = spec.get("bench_batch") if any("bench_batch" in r for r in res["rows"]) else None
    source = (f"a separate interleaved measurement (bnorder.throughput): every configuration "
              f"and backend of a network built in one process and trained on one batch of "
              f"{bench} images in rotating rounds, median over the rounds"
              if bench else "the training runs' own steps (all epochs and seeds)")
    s += [("h2", "Throughput and BN tax"),
          ("p", "Images/s = batch size / median training-step time (forward, backward, SGD "
                f"update), from {source}. BN tax (DESIGN §7) = step time with the norm / "
                "step time of the same network with norm `none` on the same backend − 1. "
                "The 'runs' columns give the training runs' own images/s (median step over "
                "all their epochs); runs execute one after another while the shared "
                "machine's load changes, so only the interleaved figures compare "
                "configurations fairly."),
          ("table", ["model", "config", *(f"img/s {b}" for b in backends),
                     *(f"img/s {b} (runs)" for b in backends),
                     *(f"BN tax {b}" for b in backends),
                     *(["fused speed-up"] if both else [])], th),
          ("img", figures["throughput"], "images/s per order"),
          ("img", figures["tax"], "BN tax per order")]
    s += [("h2", "Gradient flow"),
          ("p", "Per unit (input → output), the norm of the gradient of the loss w.r.t. the "
                "unit's convolution weight on a fixed batch (the first "
                "training images, unaugmented, training mode, on a copy of the model), at "
                "initialization (dashed) and after the last epoch (solid); geometric mean over "
                "seeds. A falling profile towards the input means vanishing gradients."),
          ("img", figures["gradflow"], "gradient-norm profiles")]
    return s


def _to_markdown(sections: List[tuple]) -> str:
    out = []
    for kind, *rest in sections:
        if kind in ("h1", "h2", "h3"):
            out.append("#" * int(kind[1]) + " " + rest[0])
        elif kind == "p":
            out.append(rest[0])
        elif kind == "img":
            out.append(f"![{rest[1]}](figures/{rest[0]})")
        elif kind == "table":
            head, rows = rest
            out.append("\n".join(["| " + " | ".join(head) + " |",
                                  "|" + "---|" * len(head)] +
                                 ["| " + " | ".join(r) + " |" for r in rows]))
    return "\n\n".join(out) + "\n"


def _to_html(sections: List[tuple], title: str) -> str:
    e = html.escape
    out = [f"<!doctype html><html><head><meta charset='utf-8'><title>{e(title)}</title>"
           "<style>body{font-family:sans-serif;max-width:1300px;margin:auto}"
           "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:2px 6px}"
           "img{max-width:100%}</style></head><body>"]
    for kind, *rest in sections:
        if kind in ("h1", "h2", "h3"):
            out.append(f"<{kind}>{e(rest[0])}</{kind}>")
        elif kind == "p":
            out.append(f"<p>{e(rest[0])}</p>")
        elif kind == "img":
            out.append(f"<figure><img src='figures/{e(rest[0])}' alt='{e(rest[1])}'>"
                       f"<figcaption>{e(rest[1])}</figcaption></figure>")
        elif kind == "table":
            head, rows = rest
            out.append("<table><tr>" + "".join(f"<th>{e(h)}</th>" for h in head) + "</tr>" +
                       "".join("<tr>" + "".join(f"<td>{e(c)}</td>" for c in r) + "</tr>"
                               for r in rows) + "</table>")
    return "\n".join(out) + "</body></html>\n"


def write_report(out: Path, spec: Dict, runs: List[Dict], run_dir: Callable) -> Dict:
    import matplotlib
    matplotlib.use("Agg")
    out = Path(out)
    loaded = _load_runs(runs, run_dir, out)
    if not loaded:
        raise StudyError(f"no finished runs in {out}/runs: nothing to report")
    import json
    bench_path = out / "throughput.json"
    bench = json.loads(bench_path.read_text())["results"] if bench_path.exists() else None
    res = analyse(spec, loaded, bench)
    folder = out / "figures"
    folder.mkdir(parents=True, exist_ok=True)
    bn_labels = [lab for lab in res["labels"] if lab != "none"]
    figures = {
        "curves_epoch": _curves(res, folder, None, "curves_epoch.png"),
        "curves_wall": _curves(res, folder, "wall_s", "curves_wall.png"),
        "final": _final(res, folder),
        "tta": _time_to_acc(res, folder),
        "throughput": _bars(res, folder, "throughput.png", "img_s", "images/s",
                            res["labels"]),
        "tax": _bars(res, folder, "bn_tax.png", "tax", "BN tax (%)", bn_labels, percent=True),
        "gradflow": _gradflow(res, folder),
    }
    sections = _sections(spec, res, figures, len(runs), len(loaded))
    atomic_write_bytes(out / "report.md", _to_markdown(sections).encode())
    atomic_write_bytes(out / "report.html",
                       _to_html(sections, f"bnorder study {spec.get('preset')}").encode())
    res["out"] = str(out)
    res["conclusions"] = conclusions.summary_lines(spec, res)
    return res


def print_table(res: Dict) -> None:
    from rich.console import Console
    from rich.table import Table
    backends = res["backends"]
    table = Table(title=f"bnorder study — {os.path.basename(res['out'].rstrip('/'))} "
                        f"(accuracy: {res['primary']} runs)")
    for col in ("model", "config", "seeds", "final acc", "vs conv-bn-relu", "epochs to target",
                *(f"img/s {b}" for b in backends), *(f"BN tax {b}" for b in backends)):
        table.add_column(col, justify="left" if col in ("model", "config") else "right")
    for r in res["rows"]:
        table.add_row(r["model"], r["label"], str(r["n"]), _pm(r["acc_mean"], r["acc_std"]),
                      _p(r.get("vs_cbr")) if r["label"] != "conv-bn-relu" else "",
                      "—" if r["epochs_to_target"] is None else str(r["epochs_to_target"]),
                      *(_fmt(r[f"img_s_{b}"], 1) for b in backends),
                      *(_fmt(r.get(f"tax_{b}"), percent=True) for b in backends))
    console = Console(width=200)
    console.print(table)
    for line in res.get("conclusions", []):
        console.print(line, highlight=False)
