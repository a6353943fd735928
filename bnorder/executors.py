"""Where a study's runs train: `bnorder study [--workers N] [--executor ray ...]`.

    --workers 1 (default)   one run after another in this process
    --workers N             N runs at once, each in its own process of a
                            concurrent.futures.ProcessPoolExecutor (spawn context), with
                            torch.set_num_threads(cores // N); on a machine with several GPUs
                            each worker process sees one of them (CUDA_VISIBLE_DEVICES)
    --executor ray          every (network, configuration, seed) run is one Ray task
                            (num_gpus=1 where the cluster has GPUs, else --cpus-per-run CPUs),
                            started on a local instance or on the cluster at --address

Every run trains into its own folder and checkpoints after every epoch (bnorder.train), so an
executor only decides where and when a run trains; the folders are the only results. A run
whose process dies (a killed worker, a lost node) starts again and resumes from its last
checkpoint: Ray retries the task itself (`max_retries`); a process pool whose worker died is
broken for every run in it, so the runs it held are handed to a new pool (each run at most
`max_retries` times, counting the times a neighbour's death stopped it). Finished runs are on
disk (done.json) and are never trained again, whatever happens to the pool.

Results do not depend on the executor at equal thread counts: a run is a deterministic
function of its configuration and of torch's thread count (which changes the rounding of
reductions), and each worker sets the thread count the command line implies.

BNORDER_KILL_ONCE_AFTER_EPOCH=k[:text] makes every run (whose folder contains `text`) kill
its own process with SIGKILL at the first step after epoch k's checkpoint, once (a marker
file in the run folder remembers it): the resume tests use it to kill a worker mid-run.
"""
from __future__ import annotations

import math
import os
import queue as queue_mod
import signal
import time
from collections import deque
from concurrent.futures import FIRST_COMPLETED, Future, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch

from . import data as data_mod
from .common import StudyError
from .train import TrainConfig, checkpoint_paths, train

EXECUTORS = ("local", "ray")
KILL_ENV = "BNORDER_KILL_ONCE_AFTER_EPOCH"
KILL_MARKER = ".killed-once"
REPORT_INTERVAL_S = 0.5     # a worker sends its progress at most this often


@dataclass
class Job:
    """One run of the study: `name` is how the study prints it, `out` its folder."""
    name: str
    config: TrainConfig
    out: Path

    @property
    def key(self) -> str:
        return str(self.out)


def cores() -> int:
    """CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def threads_per_worker(workers: int) -> int:
    """torch threads of each of `workers` local worker processes: the cores shared out."""
    return max(1, cores() // workers)


def images_per_epoch(config: TrainConfig, n_train: int) -> int:
    n = min(n_train, config.subset) if config.subset else n_train
    return data_mod.steps_per_epoch(n, config.batch_size) * config.batch_size


# ---------------------------------------------------------------------------- worker side

_DATASETS: Dict = {}


def _dataset(config: TrainConfig) -> data_mod.Dataset:
    """The data set, loaded once per worker process (pool workers and Ray workers are reused
    for several runs)."""
    key = (config.data, config.data_dir)
    if key not in _DATASETS:
        _DATASETS.clear()
        _DATASETS[key] = data_mod.load(*key)
    return _DATASETS[key]


def _kill_request(out: Path):
    """The epoch after which this run kills itself (BNORDER_KILL_ONCE_AFTER_EPOCH), or None."""
    spec = os.environ.get(KILL_ENV)
    if not spec or (out / KILL_MARKER).exists():
        return None
    epoch, _, text = spec.partition(":")
    return int(epoch) if text in str(out) else None


class _Reporter:
    """train()'s on_step hook inside a worker: sends ("step", run, images done) to the
    driver at most every REPORT_INTERVAL_S. A failed send (the driver is gone) stops the
    reports, never the training."""

    def __init__(self, events, job: Job):
        self.events, self.key, self.out = events, job.key, job.out
        self.epochs = job.config.epochs
        self.kill_after = _kill_request(job.out)
        self.last = 0.0

    def send(self, item) -> None:
        if self.events is None:
            return
        try:
            self.events.put(item)
        except Exception:  # noqa: BLE001 — a lost progress channel must not stop a run
            self.events = None

    def __call__(self, epoch: int, images: int, per_epoch: int) -> None:
        if self.kill_after is not None and epoch == self.kill_after + 1:
            (self.out / KILL_MARKER).touch()
            os.kill(os.getpid(), signal.SIGKILL)
        now = time.monotonic()
        if images == per_epoch or now - self.last >= REPORT_INTERVAL_S:
            self.last = now
            self.send(("step", self.key, (epoch - 1) * per_epoch + images))


def _train_job(job: Job, events, threads: int, worker: str) -> Dict:
    torch.set_num_threads(threads)
    reporter = _Reporter(events, job)
    reporter.send(("start", job.key, worker))
    rows = train(job.config, job.out, resume=True, dataset=_dataset(job.config),
                 progress=False, verbose=False, on_step=reporter)
    return {"test_acc": rows[-1]["test_acc"] if rows else float("nan"), "worker": worker}


_POOL_WORKER: Dict = {}


def _init_pool_worker(slots, threads: int, gpus: List[str]) -> None:
    slot = slots.get()
    if gpus:
        # before anything touches CUDA in this process: it then sees this one GPU as cuda:0
        os.environ["CUDA_VISIBLE_DEVICES"] = gpus[slot % len(gpus)]
    torch.set_num_threads(threads)
    _POOL_WORKER.update(threads=threads, label=f"worker {slot + 1}"
                        + (f" (GPU {gpus[slot % len(gpus)]})" if gpus else ""))


def _pool_task(job: Job, events) -> Dict:
    return _train_job(job, events, _POOL_WORKER["threads"], _POOL_WORKER["label"])


def _ray_task(job: Job, events, threads: int, root: str) -> Dict:
    import ray
    if not Path(root).is_dir():
        raise StudyError(f"the study folder {root} does not exist on node "
                         f"{ray.util.get_node_ip_address()}: --out must be on storage that "
                         "every node of the cluster mounts at the same path")
    gpus = ray.get_gpu_ids()
    worker = f"{ray.util.get_node_ip_address()} pid {os.getpid()}" + (
        f" GPU {','.join(map(str, gpus))}" if gpus else "")
    return _train_job(job, events, threads, worker)


# ---------------------------------------------------------------------------- backends

class _Inline:
    """This process, one run at a time (train()'s own progress bar)."""
    slots, broken = 1, False

    def __init__(self, dataset, progress: bool):
        self.dataset, self.progress = dataset, progress
        self.describe = {"executor": "local", "workers": 1, "threads": torch.get_num_threads()}

    def submit(self, job: Job) -> Future:
        fut: Future = Future()
        try:
            rows = train(job.config, job.out, resume=True, dataset=self.dataset,
                         progress=self.progress, verbose=False)
            fut.set_result({"test_acc": rows[-1]["test_acc"] if rows else float("nan")})
        except BaseException as e:  # noqa: BLE001 — re-raised by the driver
            fut.set_exception(e)
        return fut

    def lost(self, _exc) -> bool:
        return False

    def error(self, exc, _job: Job) -> BaseException:
        return exc

    def close(self, running) -> None:
        pass


class _Pool:
    """A ProcessPoolExecutor of `workers` spawned processes, made anew when it breaks."""

    def __init__(self, workers: int, jobs: int):
        import multiprocessing
        self.ctx = multiprocessing.get_context("spawn")
        self.manager = self.ctx.Manager()
        self.events = self.manager.Queue()
        self.workers = workers
        self.slots = min(workers, jobs)
        self.threads = threads_per_worker(workers)
        self.gpus = self._gpus()
        self.describe = {"executor": "local", "workers": workers,
                         "threads_per_worker": self.threads, "gpus": self.gpus}
        self.pool = None
        self._start()

    @staticmethod
    def _gpus() -> List[str]:
        if not torch.cuda.is_available() or torch.cuda.device_count() < 2:
            return []
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        ids = [v for v in visible.split(",") if v] if visible else []
        return ids or [str(i) for i in range(torch.cuda.device_count())]

    def _start(self) -> None:
        from concurrent.futures import ProcessPoolExecutor
        slots = self.manager.Queue()
        for i in range(self.slots):
            slots.put(i)
        self.pool = ProcessPoolExecutor(self.slots, mp_context=self.ctx,
                                        initializer=_init_pool_worker,
                                        initargs=(slots, self.threads, self.gpus))
        self.broken = False

    def submit(self, job: Job) -> Future:
        return self.pool.submit(_pool_task, job, self.events)

    def lost(self, exc) -> bool:
        from concurrent.futures.process import BrokenProcessPool
        if isinstance(exc, BrokenProcessPool):
            self.broken = True
            return True
        return False

    def error(self, exc, _job: Job) -> BaseException:
        return exc

    def restart(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)
        self._start()

    def close(self, running) -> None:
        # Runs still training finish their current run (their folders stay consistent);
        # queued ones are cancelled.
        self.pool.shutdown(wait=True, cancel_futures=True)
        self.manager.shutdown()


class _Ray:
    """One Ray task per run, on the instance at `address` (None: a new local instance, or
    the one this process already started)."""
    broken = False

    def __init__(self, address: Optional[str], cpus_per_run: int, max_retries: int,
                 root: Path, budget: bool):
        try:
            import ray
            from ray.util.queue import Queue
        except ImportError as e:
            raise StudyError(f"--executor ray needs Ray ({e}): pip install -e .[ray]") from None
        self.ray = ray
        self.started = False
        if not ray.is_initialized():
            try:
                ray.init(address=address, log_to_driver=False, include_dashboard=False)
            except (ConnectionError, ValueError, RuntimeError) as e:
                raise StudyError(f"cannot connect to Ray at {address or 'a new local instance'}"
                                 f": {e}") from None
            self.started = True
        resources = ray.cluster_resources()
        self.num_gpus = 1 if resources.get("GPU", 0) >= 1 else 0
        self.cpus = cpus_per_run
        if not self.num_gpus and resources.get("CPU", 0) < cpus_per_run:
            raise StudyError(f"--cpus-per-run {cpus_per_run}: the Ray cluster has "
                             f"{resources.get('CPU', 0):g} CPUs")
        # Without a time budget every run is submitted at once and Ray queues them; with
        # one, only as many as the cluster runs at once, so that none starts after it.
        capacity = (resources.get("GPU", 0) if self.num_gpus
                    else resources.get("CPU", 0) // cpus_per_run)
        self.slots = max(1, int(capacity)) if budget else math.inf
        self.root = str(Path(root).resolve())
        self.refs: Dict[Future, object] = {}
        self.events = Queue(actor_options={"num_cpus": 0})
        self.remote = ray.remote(_ray_task).options(
            num_cpus=cpus_per_run, num_gpus=self.num_gpus, max_retries=max_retries,
            retry_exceptions=False)
        self.describe = {"executor": "ray", "address": address, "cpus_per_run": cpus_per_run,
                         "gpus_per_run": self.num_gpus, "max_retries": max_retries,
                         "cluster": {k: v for k, v in resources.items()
                                     if k in ("CPU", "GPU", "memory")}}

    def submit(self, job: Job) -> Future:
        job = Job(job.name, job.config, Path(job.out).resolve())
        ref = self.remote.remote(job, self.events, self.cpus, self.root)
        fut = ref.future()
        self.refs[fut] = ref
        return fut

    def lost(self, _exc) -> bool:
        return False   # Ray has retried the task max_retries times already

    def error(self, exc, job: Job) -> BaseException:
        from ray.exceptions import RayTaskError
        if isinstance(exc, RayTaskError):
            # the run's own error (TrainError, DataError, ...) as the task raised it
            cause = getattr(exc, "cause", None)
            return cause if isinstance(cause, Exception) else exc.as_instanceof_cause()
        return StudyError(f"{_names([job])} ({job.out}): its Ray task failed for good "
                          f"({type(exc).__name__}: {exc}); finished runs are kept, run the "
                          "same command again to resume it from its last checkpoint")

    def close(self, running) -> None:
        for fut in running:
            self.ray.cancel(self.refs[fut])
        try:
            self.events.shutdown()
        except Exception:  # noqa: BLE001 — the cluster may be gone already
            pass
        if self.started:
            self.ray.shutdown()


# ---------------------------------------------------------------------------- display

class _Display:
    """rich progress: one row per run in training (named by its worker) and an overall row
    whose ETA comes from the images trained per second over all workers."""

    def __init__(self, jobs: List[Job], n_train: Optional[int], enabled: bool):
        from rich.console import Console
        from rich.progress import (BarColumn, Progress, ProgressColumn, TaskProgressColumn,
                                   TextColumn, TimeElapsedColumn, TimeRemainingColumn)
        from rich.text import Text

        class Rate(ProgressColumn):
            def render(self, task):
                return Text(f"{task.speed:,.0f} img/s" if task.speed else "")

        self.enabled = enabled
        self.n_runs = len(jobs)
        self.finished = 0
        self.total = {j.key: (j.config.epochs * images_per_epoch(j.config, n_train)
                              if n_train else 0) for j in jobs}
        self.done = {j.key: (_checkpoint_epoch(j.out) * self.total[j.key]
                             // j.config.epochs) for j in jobs}
        self.names = {j.key: j.name for j in jobs}
        self.rows: Dict[str, int] = {}
        self.began: Dict[str, float] = {}    # when a worker first took the run
        self.progress = Progress(TextColumn("{task.description}"), BarColumn(),
                                 TaskProgressColumn(), Rate(), TimeElapsedColumn(),
                                 TextColumn("ETA"), TimeRemainingColumn(),
                                 console=Console(), transient=True, disable=not enabled)
        self.overall = self.progress.add_task(self._overall(), total=sum(self.total.values())
                                              or None, completed=sum(self.done.values()))

    def _overall(self) -> str:
        return f"study: {self.finished}/{self.n_runs} runs finished"

    def __enter__(self):
        self.progress.start()
        return self

    def __exit__(self, *exc):
        self.progress.stop()

    def log(self, line: str) -> None:
        if self.enabled:
            self.progress.console.print(line, markup=False, highlight=False)
        else:
            print(line, flush=True)

    def event(self, item) -> None:
        kind, key, value = item
        if key not in self.total:
            return
        if kind == "start":
            self.began.setdefault(key, time.perf_counter())
            self.finish_row(key)
            self.rows[key] = self.progress.add_task(f"{value}: {self.names[key]}",
                                                    total=self.total[key] or None,
                                                    completed=self.done[key])
        elif kind == "step":
            self.done[key] = value
            if key in self.rows:
                self.progress.update(self.rows[key], completed=value)
        self.progress.update(self.overall, completed=sum(self.done.values()))

    def finish_row(self, key: str) -> None:
        if key in self.rows:
            self.progress.remove_task(self.rows.pop(key))

    def finished_run(self, key: str) -> None:
        self.finish_row(key)
        self.finished += 1
        self.done[key] = self.total[key]
        self.progress.update(self.overall, completed=sum(self.done.values()),
                             description=self._overall())


def _checkpoint_epoch(out: Path) -> int:
    ckpts = checkpoint_paths(out)
    try:
        return int(ckpts[-1].stem.split("-")[1]) if ckpts else 0
    except (IndexError, ValueError):
        return 0


def _names(jobs: List[Job]) -> str:
    return ", ".join(" ".join(j.name.split()) for j in jobs)


def _drain(events, display: _Display, limit: int = 10_000) -> None:
    for _ in range(limit):
        try:
            display.event(events.get_nowait())
        except queue_mod.Empty:
            return
        except (EOFError, OSError, ConnectionError):
            return   # the channel is gone (shutting down): progress only


# ---------------------------------------------------------------------------- driver

def check(executor: str = "local", workers: int = 1, address: Optional[str] = None,
          cpus_per_run: int = 1, max_retries: int = 2) -> None:
    """StudyError naming the first option that does not fit the others."""
    if executor not in EXECUTORS:
        raise StudyError(f"unknown executor {executor!r}; expected one of "
                         f"{', '.join(EXECUTORS)}")
    if workers < 1 or cpus_per_run < 1:
        raise StudyError("--workers and --cpus-per-run must be at least 1")
    if max_retries < 0:
        raise StudyError(f"--max-retries must be at least 0, got {max_retries}")
    if executor == "ray" and workers != 1:
        raise StudyError("--workers is for the local executor; with --executor ray each run "
                         "takes --cpus-per-run CPUs (or one GPU) wherever Ray places it")
    if executor == "local" and address is not None:
        raise StudyError("--address needs --executor ray")
    if executor == "ray":
        import importlib.util
        if importlib.util.find_spec("ray") is None:
            raise StudyError("--executor ray needs Ray, an optional extra: "
                             "pip install -e .[ray]")
    if executor == "local" and cpus_per_run != 1:
        raise StudyError("--cpus-per-run is for --executor ray; locally each of the "
                         "--workers processes takes cores / workers threads")


def options(args) -> Dict:
    """execute()'s options from `bnorder study`'s arguments, checked before anything runs."""
    opts = {k: getattr(args, k) for k in ("executor", "workers", "address", "cpus_per_run",
                                          "max_retries") if getattr(args, k, None) is not None}
    check(**opts)
    return opts


def execute(jobs: List[Job], dataset: Optional[data_mod.Dataset] = None, *,
            executor: str = "local", workers: int = 1, address: Optional[str] = None,
            cpus_per_run: int = 1, max_retries: int = 2, budget_s: Optional[float] = None,
            root: Optional[Path] = None, progress: bool = True,
            log: Optional[Callable[[str], None]] = None) -> Dict:
    """Train every job (each resumes from its folder); returns {"not_started": jobs the time
    budget left out, "executor": what ran them}. No job starts after `budget_s` seconds,
    except the first. Raises the first run's error (other runs' folders stay resumable) or
    StudyError when a run's process kept dying."""
    check(executor, workers, address, cpus_per_run, max_retries)
    if not jobs:
        return {"not_started": [], "executor": {"executor": executor}}
    parallel = executor == "ray" or workers > 1
    if executor == "ray":
        backend = _Ray(address, cpus_per_run, max_retries, Path(root or jobs[0].out),
                       budget_s is not None)
    elif workers > 1:
        backend = _Pool(workers, len(jobs))
    else:
        backend = _Inline(dataset, progress)
    n_train = len(dataset.train_y) if dataset is not None else None
    display = _Display(jobs, n_train, progress and parallel)
    emit = log or display.log
    todo = deque(jobs)
    running: Dict[Future, Job] = {}
    started, attempts, lost, t_start = set(), {}, [], {}
    not_started: List[Job] = []
    t0 = time.perf_counter()
    finished = 0
    try:
        with display:
            while todo or running:
                while todo and len(running) < backend.slots and not backend.broken:
                    job = todo[0]
                    if (budget_s is not None and started and job.key not in started
                            and time.perf_counter() - t0 > budget_s):
                        not_started = [j for j in todo if j.key not in started]
                        todo = deque(j for j in todo if j.key in started)
                        emit(f"time budget of {budget_s:.0f} s reached: {len(not_started)} "
                             "runs not started (run the same command again to finish them)")
                        if not todo:
                            break
                        continue
                    todo.popleft()
                    started.add(job.key)
                    t_start[job.key] = time.perf_counter()
                    running[backend.submit(job)] = job
                if not running:
                    break
                done, _ = wait(running, timeout=0.25, return_when=FIRST_COMPLETED)
                if parallel:
                    _drain(backend.events, display)
                for fut in done:
                    job = running.pop(fut)
                    exc = fut.exception()
                    if exc is not None:
                        if backend.lost(exc):
                            lost.append(job)
                            continue
                        raise backend.error(exc, job)
                    finished += 1
                    display.finished_run(job.key)
                    res = fut.result()
                    # a queued run's time counts from when a worker took it
                    began = display.began.get(job.key, t_start[job.key])
                    emit(f"[{finished}/{len(jobs)}] {job.name}: test_acc {res['test_acc']:.4f}"
                         f"  {time.perf_counter() - began:5.1f} s  "
                         f"(study {time.perf_counter() - t0:6.1f} s)"
                         + (f"  [{res['worker']}]" if parallel else ""))
                if lost and not running:
                    for job in lost:
                        attempts[job.key] = attempts.get(job.key, 0) + 1
                        display.finish_row(job.key)
                    gave_up = [j for j in lost if attempts[j.key] > max_retries]
                    if gave_up:
                        raise StudyError(
                            f"a worker process died while training {_names(lost)}; "
                            f"{_names(gave_up)} stopped {max_retries + 1} times: giving up "
                            "(finished runs are kept; run the same command again to resume "
                            "from the last checkpoints)")
                    emit(f"a worker process died: {_names(lost)} resume from their last "
                         "checkpoint in a new pool")
                    todo.extendleft(reversed(lost))
                    lost = []
                    backend.restart()
    finally:
        backend.close(list(running))
    return {"not_started": not_started, "executor": backend.describe}
