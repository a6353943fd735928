"""What the training loop, the distributed launcher, the study and its report share: the
errors they raise, crash-safe file writes and the name of a run's folder. It imports no other
module of bnorder, so each of them can import it without importing the others back."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Dict, List


class TrainError(RuntimeError):
    """A run cannot start or resume; the message says why and what to do."""


class CheckpointError(TrainError):
    pass


class StudyError(RuntimeError):
    """A study cannot run or report; the message says why and what to do."""


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, payload: bytes) -> None:
    """Write to a temporary file in the same folder, fsync, rename over `path`, fsync the
    folder: readers see the old file or the new one, never a partial one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(payload)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def atomic_write_json(path: Path, obj) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2) + "\n").encode())


def write_jsonl(path: Path, rows: List[Dict]) -> None:
    atomic_write_bytes(path, "".join(json.dumps(r) + "\n" for r in rows).encode())


def read_jsonl(path: Path) -> List[Dict]:
    """Rows of a JSON-lines file; a partial last line (a writer killed mid-line) is ignored."""
    rows = []
    with open(path) as f:
        for line in f:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                break
    return rows


def slug(text: str) -> str:
    return text.replace(" ", "_").replace("(", "").replace(")", "")


def run_dir(out: Path, run: Dict) -> Path:
    """OUT/runs/<model>/<label>/<backend>/seed<k>-<hash of the training configuration>: a
    study rerun with other hyper-parameters into the same folder trains new runs beside the
    old ones instead of resuming runs of another configuration."""
    key = hashlib.sha1(json.dumps(run["config"].to_json(), sort_keys=True).encode())
    return Path(out) / "runs" / run["model"] / slug(run["label"]) / run["backend"] / \
        f"seed{run['seed']}-{key.hexdigest()[:8]}"


def network_settings(spec: Dict, model: str) -> Dict:
    """The TrainConfig fields a study sets per network: its width (`widths` maps network →
    channel multiplier; absent networks keep 1.0), its learning rate (`lrs` maps network →
    lr; absent networks take `lr`) and the memory format. The study's runs and its
    step-time measurement both build their networks from these."""
    width = spec.get("widths", {}).get(model, 1.0)
    return {"channels_last": bool(spec.get("channels_last", False)),
            "model_options": {"width": width},
            "lr": spec.get("lrs", {}).get(model, spec["lr"])}
