"""`bnorder study`: the grid models × (orders × norms) × seeds × backends, each cell one
`bnorder train` run in its own folder, then the report (bnorder.report).

    OUT/study.json                               the resolved grid and hyper-parameters
    OUT/runs/<model>/<label>/<backend>/seed<k>-<hash>/  one run folder each (bnorder.train)
    OUT/report.md, OUT/report.html, OUT/figures/*.png

Finished runs (done.json with the same configuration) are skipped and unfinished ones
resume from their last checkpoint, so an interrupted study is continued by running the same
command again. Norm `none` empties the slot, after which the three orders of a plain network
are the same network, so `none` is trained once per network, in the conv-bn-relu topology
(for a ResNet: ReLU after the addition, He et al. 2015); it is the denominator of the BN tax.
"""
from __future__ import annotations

import json
import platform
import time
from pathlib import Path
from typing import Dict, List, Optional

import torch

import fused

from . import data as data_mod
from . import executors
from .common import StudyError, atomic_write_json, run_dir  # noqa: F401
from .train import TrainConfig, is_done


ORDERS = list(fused.ORDERS)

PRESETS: Dict[str, Dict] = {
    # `make run`: ≤ 15 minutes on the shared 2-core CPU machine, set-up included, so the
    # study's part is what set-up leaves of 10 minutes. Spent on learning: thinner networks
    # (same depth and placement) trained long enough to reach useful accuracy, fused only —
    # eager computes the same function, and the interleaved step-time measurement gives its
    # speed and BN tax and checks that its losses agree with the fused ones.
    "quick": dict(
        models=["alexnet", "vgg16", "resnet20"], orders=ORDERS, norms=["bn", "none"],
        seeds=[0, 1], backends=["fused", "eager"], backend_seeds={"eager": []},
        widths={"alexnet": 0.25, "vgg16": 0.25, "resnet20": 0.5},
        channels_last=True, data="fashion-mnist", epochs=2, subset=8192, test_subset=2000, augment=False,
        batch_size=64, lr=0.05, momentum=0.9, weight_decay=5e-4, schedule="cosine",
        gradflow_batch=64, budget_s=600, bench_rounds=5, bench_batch=64, bench_budget_s=60,
        description=(
            "A time-boxed study for `make run` (≤ 15 minutes on 2 CPU cores, set-up "
            "included). Networks at reduced width (AlexNet and VGG-16 at 0.25, ResNet-20 at "
            "0.5: every conv and hidden fc thinned, depth and BN placement kept), "
            "channels_last, fused backend, trained without augmentation on the first 8 192 "
            "training images of Fashion-MNIST for two epochs (learning rate 0.05, cosine) "
            "and evaluated on 2 000 test images after every epoch; two seeds "
            "per configuration. The eager backend is not trained: "
            "it computes the same function, and the interleaved step-time measurement gives "
            "its throughput and BN tax and compares its losses with the fused ones. Runs are "
            "ordered seed 0 for every network first, then seed 1, and no run starts after the "
            "time budget, so on a busy machine the second seed may be listed as not started "
            "(rerun `make run` to finish them; finished runs are skipped). What two seeds "
            "and this short training can conclude is said per network below.")),
    # Overnight on 2 CPU cores: full Fashion-MNIST, enough seeds for Welch's test to reach
    # p < 0.05 on differences of a few tenths of a percentage point (docs/study.md gives the
    # estimate and how it was obtained).
    "cpu": dict(
        models=["alexnet", "vgg16", "resnet20"], orders=ORDERS, norms=["bn", "none"],
        seeds=[0, 1, 2, 3, 4], backends=["fused", "eager"], backend_seeds={"eager": []},
        widths={"alexnet": 0.5, "vgg16": 0.25, "resnet20": 1.0}, channels_last=True,
        data="fashion-mnist", epochs=6, subset=None, test_subset=None,
        batch_size=128, lr=0.05, momentum=0.9, weight_decay=5e-4, schedule="cosine",
        gradflow_batch=128, bench_rounds=20, bench_batch=128, bench_budget_s=600,
        description=(
            "An overnight CPU study: the full Fashion-MNIST training set (60 000 images) and "
            "test set (10 000), AlexNet at width 0.5, VGG-16 at 0.25 and ResNet-20 at full "
            "width, channels_last, fused backend, six epochs at batch 128 (learning rate "
            "0.05, cosine, random-crop augmentation), five seeds per "
            "configuration — enough for Welch's test to separate differences of a few tenths "
            "of a percentage point (the per-network power figures are in the report). The "
            "eager backend is measured (step time, BN tax, agreement), not trained. The "
            "estimated duration is printed before the first run; an interrupted study "
            "continues where it stopped when the same command is run again.")),
    # He et al. 2015 ("Deep Residual Learning for Image Recognition", §4.2, CIFAR-10):
    # SGD, batch 128, momentum 0.9, weight decay 1e-4, lr 0.1 divided by 10 at 32k and 48k
    # iterations, stopped at 64k; augmentation 4-pixel zero padding + random 32×32 crop +
    # horizontal flip. 64k iterations of 128 images on the 50k training images ≈ 164
    # epochs; the step schedule divides at 50 % and 75 % of training (= 32k and 48k).
    "paper": dict(
        models=["resnet20", "vgg16", "alexnet"], orders=ORDERS, norms=["bn", "none"],
        seeds=[0, 1, 2, 3, 4], backends=["fused", "eager"], backend_seeds={"eager": [0]},
        data="cifar10",
        epochs=164, subset=None, test_subset=None, batch_size=128, lr=0.1, momentum=0.9,
        weight_decay=1e-4, schedule="step", gradflow_batch=128,
        bench_rounds=20, bench_batch=128, bench_budget_s=1800,
        description=(
            "The CIFAR-10 training recipe of He et al. 2015 (Deep Residual Learning for Image "
            "Recognition, §4.2): SGD with batch 128, momentum 0.9, weight decay 1e-4, "
            "learning rate 0.1 divided by 10 at 50 % and 75 % of training (their 32k and 48k "
            "of 64k iterations), 164 epochs (≈ 64k iterations of 128 on 50k images), 4-pixel "
            "padding + random crop + horizontal flip. Differences from the paper: we train on "
            "all 50k training images (they held out 5k for validation in some experiments), "
            "report the 10k test set every epoch, apply the ResNet recipe unchanged to "
            "AlexNet and VGG-16 (whose original papers trained on ImageNet with other "
            "schedules), and use it unchanged for norm `none`, where lr 0.1 may diverge (He "
            "et al. warmed ResNet-110 up at 0.01); pass --lr to change it. Five seeds per "
            "configuration on the fused backend, seed 0 on the eager one. Needs --data-dir "
            "with the python version of CIFAR-10.")),
}


def label(order: str, norm: str) -> str:
    """The name a configuration has in the report: the order for bn, `none`, else both."""
    if norm == "none":
        return "none"
    return order if norm == "bn" else f"{order} ({norm})"


def grid(spec: Dict) -> List[Dict]:
    """Every run of the study: dicts with model, order, norm, label, backend, seed, config."""
    def seeds_for(backend):
        return spec.get("backend_seeds", {}).get(backend, spec["seeds"])
    all_seeds = sorted({s for b in spec["backends"] for s in seeds_for(b)})
    configs = [(order, norm) for norm in spec["norms"]
               for order in (spec["orders"] if norm != "none" else ["conv-bn-relu"])]
    primary = "fused" if "fused" in spec["backends"] else spec["backends"][0]
    # tiers: (seed, primary backend first); inside a tier every network and configuration.
    # If a time budget stops the study early, what is missing is a later tier, never a
    # whole network.
    tiers = [(seed, backend) for seed in all_seeds
             for backend in sorted(spec["backends"], key=lambda b: b != primary)
             if seed in seeds_for(backend)]
    from .common import network_settings
    runs = []
    for seed, backend in tiers:
        for model in spec["models"]:
            for order, norm in configs:
                config = TrainConfig(
                    model=model, order=order, norm=norm, fused=backend == "fused",
                    epochs=spec["epochs"], batch_size=spec["batch_size"],
                    momentum=spec["momentum"], weight_decay=spec["weight_decay"],
                    schedule=spec["schedule"], seed=seed, data=spec["data"],
                    data_dir=spec.get("data_dir"), subset=spec["subset"],
                    test_subset=spec["test_subset"],
                    gradflow_batch=spec.get("gradflow_batch", 32),
                    augment=spec.get("augment", True), **network_settings(spec, model))
                runs.append(dict(model=model, order=order, norm=norm,
                                 label=label(order, norm), backend=backend, seed=seed,
                                 config=config))
    return runs


def resolve(args) -> Dict:
    spec = dict(PRESETS[args.preset])
    spec["preset"] = args.preset
    for key in ("models", "orders", "norms", "seeds", "backends", "epochs", "subset",
                "test_subset", "batch_size", "data", "data_dir", "lr", "budget_s",
                "bench_rounds"):
        value = getattr(args, key, None)
        if value is not None:
            spec[key] = value
    if args.lr is not None:
        spec.pop("lrs", None)             # --lr sets every network's learning rate
    if args.backends is not None:
        spec.pop("backend_seeds", None)   # every backend named on the command line trains
    elif args.seeds is not None:
        # --seeds applies to every backend that trains; one the preset only measures
        # (an empty seed list: step times and the agreement check) stays so
        spec["backend_seeds"] = {b: [] for b, s in spec.get("backend_seeds", {}).items()
                                 if not s}
    overridden = [k for k in ("epochs", "subset", "test_subset", "batch_size", "data", "lr",
                              "models", "orders", "norms", "seeds", "backends")
                  if getattr(args, k, None) is not None]
    spec["overridden"] = overridden
    if spec["data"] == "cifar10" and not spec.get("data_dir"):
        raise StudyError("the study uses CIFAR-10: pass --data-dir DIR (the folder of "
                         "data_batch_1..5 and test_batch); it is never downloaded")
    # the norm slot of every order must have something to compare
    if "none" not in spec["norms"]:
        spec["norms"] = list(spec["norms"]) + ["none"]
        spec.setdefault("notes", []).append("norm `none` added: it is the BN-tax baseline")
    return spec


def machine() -> Dict:
    return {"python": platform.python_version(), "torch": torch.__version__,
            "threads": torch.get_num_threads(), "cpu": platform.processor() or platform.machine(),
            "fused_backend": fused.backend(), "extension_error": fused.extension_error()}


def local_workers(execution: Optional[Dict]) -> int:
    """Worker processes on this machine for `execution` (executors.options): the estimate
    times for them; a Ray cluster's are not known here, so its estimate is sequential."""
    execution = execution or {}
    if execution.get("executor", "local") != "local":
        return 1
    return execution.get("workers") or 1


def estimate_runs(spec: Dict, todo: List[Dict], dataset, progress: bool = True,
                  workers: int = 1) -> Dict:
    """Time each configuration of `todo` and print the estimated duration (bnorder.estimate)
    of running them on `workers` local workers (one: one after another), the step-time
    measurement's budget included."""
    from . import estimate
    est = estimate.estimate(todo, dataset, progress=progress, workers=workers)
    estimate.print_estimate(est, spec.get("budget_s"),
                            spec.get("bench_budget_s", 0) if spec.get("bench_rounds") else 0)
    return est


def run_study(spec: Dict, out: Path, progress: bool = True,
              execution: Optional[Dict] = None) -> Dict:
    """Train the runs of `spec` that are not finished, measure step times, write study.json.
    `execution`: where the runs train (bnorder.executors.execute's options; default one
    after another in this process)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    runs = grid(spec)
    todo = [r for r in runs if not is_done(run_dir(out, r), r["config"])]
    print(f"study {spec['preset']}: {len(runs)} runs in {out} ({len(runs) - len(todo)} "
          f"already finished)", flush=True)
    dataset = data_mod.load(spec["data"], spec.get("data_dir")) if todo else None
    if todo and spec.get("estimate", True):
        estimate_runs(spec, todo, dataset, progress, local_workers(execution))
    t0 = time.perf_counter()
    jobs = [executors.Job(f"{r['model']:<9} {r['label']:<13} {r['backend']:<5} "
                          f"seed {r['seed']}", r["config"], run_dir(out, r)) for r in todo]
    ran = executors.execute(jobs, dataset, budget_s=spec.get("budget_s"), root=out,
                            progress=progress, **(execution or {}))
    left_out = {j.key for j in ran["not_started"]}
    skipped = [r for r, j in zip(todo, jobs) if j.key in left_out]
    bench_path = out / "throughput.json"
    if spec.get("bench_rounds") and (todo or not bench_path.exists()):
        from . import throughput
        configs = sorted({(r["label"], r["order"], r["norm"], r["backend"]) for r in runs})
        print(f"step times: {spec['bench_rounds']} interleaved rounds of every configuration "
              f"on one batch of {spec['bench_batch']} (budget {spec['bench_budget_s']} s)",
              flush=True)
        dataset = dataset or data_mod.load(spec["data"], spec.get("data_dir"))
        t_bench = time.perf_counter()
        results = throughput.measure(spec, dataset, configs, spec["bench_rounds"],
                                     spec["bench_batch"], spec["bench_budget_s"])
        atomic_write_json(bench_path, {"results": results,
                                       "wall_s": time.perf_counter() - t_bench})
    spec_json = {k: v for k, v in spec.items()}
    spec_json["machine"] = machine()
    spec_json["train_wall_s_this_invocation"] = time.perf_counter() - t0
    spec_json["runs"] = len(runs)
    spec_json["executor"] = ran["executor"]
    spec_json["not_started"] = [f"{r['model']} {r['label']} {r['backend']} seed {r['seed']}"
                                for r in skipped]
    atomic_write_json(out / "study.json", spec_json)
    return spec_json


def main(args) -> int:
    from . import report
    spec = resolve(args)
    out = Path(args.out or f"runs/study-{args.preset}")
    if getattr(args, "estimate_only", False):
        todo = [r for r in grid(spec) if not is_done(run_dir(out, r), r["config"])]
        if not todo:
            print(f"study {spec['preset']}: every run in {out} is finished")
            return 0
        estimate_runs(spec, todo, data_mod.load(spec["data"], spec.get("data_dir")),
                      progress=not args.no_progress,
                      workers=local_workers(executors.options(args)))
        return 0
    if args.report_only:
        if not (out / "study.json").exists():
            raise StudyError(f"{out}/study.json not found: run the study first")
        spec = json.loads((out / "study.json").read_text())
    else:
        spec = run_study(spec, out, progress=not args.no_progress,
                         execution=executors.options(args))
    summary = report.write_report(out, spec, grid(spec), run_dir)
    report.print_table(summary)
    print(f"report: {(out / 'report.md').resolve()}\n        {(out / 'report.html').resolve()}")
    return 0
