"""The `bnorder` command line.

    bnorder train   one training run (see bnorder.train)
    bnorder study   a grid of runs and the report (see bnorder.study)
    bnorder check   the fused kernels' self-check (fused.check)
    bnorder models  parameters and MACs of every network (models.summary_rows)
"""
from __future__ import annotations

import argparse
import sys
from typing import List, Optional

import fused

from . import data as data_mod


def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {v}")
    return v


def _non_negative_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not v >= 0:
        raise argparse.ArgumentTypeError(f"must be non-negative, got {text}")
    return v


def _positive_float(text: str) -> float:
    v = _non_negative_float(text)
    if v == 0:
        raise argparse.ArgumentTypeError("must be positive")
    return v


def _width(text: str) -> float:
    import models
    try:
        return models.check_width(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _csv(choices=None, kind=str):
    def parse(text: str):
        items = [kind(t.strip()) for t in text.split(",") if t.strip()]
        if not items:
            raise argparse.ArgumentTypeError("empty list")
        bad = [i for i in items if choices is not None and i not in choices]
        if bad:
            raise argparse.ArgumentTypeError(f"unknown {', '.join(map(str, bad))}; choose from "
                                             f"{', '.join(choices)}")
        return items
    return parse


def _add_data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", choices=data_mod.NAMES, default=None,
                   help="data set (default fashion-mnist)")
    p.add_argument("--data-dir", default=None,
                   help="folder of the data files (required for cifar10: data_batch_1..5, "
                        "test_batch)")


def build_parser() -> argparse.ArgumentParser:
    import models

    from . import executors, study, train
    parser = argparse.ArgumentParser(prog="bnorder", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train one network")
    d = train.TrainConfig()
    t.add_argument("--model", choices=models.NAMES, default=d.model)
    t.add_argument("--order", choices=fused.ORDERS, default=d.order)
    t.add_argument("--norm", choices=fused.NORMS, default=d.norm)
    t.add_argument("--fused", action="store_true", help="use the fused units (default eager)")
    t.add_argument("--width", type=_width, default=1.0,
                   help="channel multiplier of every conv and hidden fc (default 1.0)")
    t.add_argument("--epochs", type=_positive_int, default=d.epochs)
    t.add_argument("--batch-size", type=_positive_int, default=d.batch_size)
    t.add_argument("--lr", type=_positive_float, default=d.lr)
    t.add_argument("--momentum", type=_non_negative_float, default=d.momentum)
    t.add_argument("--weight-decay", type=_non_negative_float, default=d.weight_decay)
    t.add_argument("--schedule", choices=train.SCHEDULES, default=d.schedule)
    t.add_argument("--seed", type=int, default=d.seed)
    _add_data_args(t)
    t.add_argument("--subset", type=_positive_int, default=None,
                   help="train on the first N training images")
    t.add_argument("--test-subset", type=_positive_int, default=None,
                   help="evaluate on the first N test images")
    t.add_argument("--out", default="runs/train", help="run folder (default runs/train)")
    t.add_argument("--resume", action="store_true", help="continue from the last checkpoint")
    t.add_argument("--compile", action="store_true", help="torch.compile the model")
    t.add_argument("--channels-last", action="store_true")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    t.add_argument("--no-augment", action="store_true",
                   help="train on the images as they are (no random crop or flip)")
    t.add_argument("--ddp", action="store_true",
                   help="data-parallel under torchrun: --batch-size is the global batch, "
                        "split over the ranks (see bnorder.distributed)")
    t.add_argument("--sync-bn", action="store_true",
                   help="with --ddp: batch statistics over the global batch (SyncBatchNorm)")

    s = sub.add_parser("study", help="run a grid of trainings and write the report")
    s.add_argument("--preset", choices=tuple(study.PRESETS), default="quick")
    s.add_argument("--models", type=_csv(models.NAMES))
    s.add_argument("--orders", type=_csv(fused.ORDERS))
    s.add_argument("--norms", type=_csv(fused.NORMS))
    s.add_argument("--seeds", type=_csv(kind=int))
    s.add_argument("--backends", type=_csv(("eager", "fused")))
    s.add_argument("--epochs", type=_positive_int)
    s.add_argument("--subset", type=_positive_int)
    s.add_argument("--test-subset", type=_positive_int)
    s.add_argument("--batch-size", type=_positive_int)
    _add_data_args(s)
    s.add_argument("--budget-s", type=_positive_float, default=None,
                   help="start no new run after this many seconds of training (the first "
                        "always starts; quick preset: 600)")
    s.add_argument("--bench-rounds", type=int, default=None,
                   help="interleaved step-time rounds per configuration (0: use the runs' "
                        "own step times)")
    s.add_argument("--lr", type=_positive_float, default=None)
    s.add_argument("--out", default=None, help="study folder (default runs/study-<preset>)")
    s.add_argument("--report-only", action="store_true",
                   help="only (re)write the report from the finished runs in --out")
    s.add_argument("--estimate-only", action="store_true",
                   help="time each configuration briefly, print the estimated duration of "
                        "the runs not yet finished in --out, and stop")
    s.add_argument("--no-progress", action="store_true")
    s.add_argument("--workers", type=_positive_int, default=1,
                   help="train N runs at once on this machine, each in its own process with "
                        "cores/N torch threads (one GPU each where there are several); "
                        "default 1: one after another in this process")
    s.add_argument("--executor", choices=executors.EXECUTORS, default="local",
                   help="local (this machine) or ray: one Ray task per run (pip install -e "
                        ".[ray]); --out must then be on storage every node shares")
    s.add_argument("--address", default=None,
                   help="with --executor ray: 'auto' (the cluster this node joined) or "
                        "HOST:PORT of its head; default a new Ray instance on this machine")
    s.add_argument("--cpus-per-run", type=_positive_int, default=1,
                   help="with --executor ray on a cluster without GPUs: CPUs (= torch "
                        "threads) of each run's task (default 1)")
    s.add_argument("--max-retries", type=int, default=2,
                   help="times a run whose worker process or node died is started again "
                        "from its last checkpoint (default 2)")

    # `bnorder check ARGS` hands ARGS to fused.check unparsed (see main): listed here for
    # `bnorder --help` only.
    sub.add_parser("check", help="self-check of the fused kernels (fused.check; --gpu: "
                                 "validate and time the Triton kernels on a CUDA GPU)")

    m = sub.add_parser("models", help="parameters and MACs per image of every network")
    m.add_argument("--width", type=_width, default=1.0,
                   help="channel multiplier of every conv and hidden fc (default 1.0)")
    return parser


def _train(args) -> int:
    from . import train
    config = train.TrainConfig(
        model=args.model, order=args.order, norm=args.norm, fused=args.fused,
        epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, momentum=args.momentum,
        weight_decay=args.weight_decay, schedule=args.schedule, seed=args.seed,
        data=args.data or "fashion-mnist", data_dir=args.data_dir, subset=args.subset,
        test_subset=args.test_subset, compile=args.compile, channels_last=args.channels_last,
        augment=not args.no_augment,
        # width 1.0 is the network's default: left out, so the configuration (and the run
        # folder it resumes) is that of a run without --width
        model_options={} if args.width == 1.0 else {"width": args.width})
    from . import distributed
    if args.sync_bn and not args.ddp:
        raise train.TrainError("--sync-bn needs --ddp (and torchrun)")
    ctx = distributed.init(args.sync_bn) if args.ddp else distributed.LOCAL
    try:
        rows = train.train(config, args.out, resume=args.resume, progress=not args.no_progress,
                           ddp=ctx)
    finally:
        ctx.close()
    if not ctx.is_main:
        return 0
    last = rows[-1] if rows else {}
    print(f"{args.out}: {len(rows)} epochs, test_acc {last.get('test_acc')}, "
          f"metrics in {args.out}/metrics.jsonl")
    return 0


def _check(argv: List[str]) -> int:
    try:
        from fused import check
    except ImportError as e:
        print(f"bnorder check: unavailable, fused.check cannot be imported ({e}). "
              f"fused backend: {fused.backend()}; extension error: {fused.extension_error()}",
              file=sys.stderr)
        return 1
    return check.main(argv, prog="bnorder check") or 0


def _models(args) -> int:
    import models
    if args.width != 1.0:
        print(f"width {args.width:g}: every conv and hidden fc width × {args.width:g}")
    print(models.format_table(models.summary_rows(width=args.width)))
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    from . import study, train
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["check"]:
        return _check(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "train":
            return _train(args)
        if args.command == "study":
            return study.main(args)
        return _models(args)
    except (train.TrainError, data_mod.DataError, study.StudyError) as e:
        print(f"bnorder {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("bnorder: interrupted (finished epochs are checkpointed; rerun with --resume "
              "or rerun the study to continue)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
