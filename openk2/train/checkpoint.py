"""Resumable training state, sharded: torch.distributed.checkpoint (DCP) for tensors, small files for the rest.

A checkpoint is a directory ``RUN/checkpoints/step_NNNNNNN/``:

* DCP files (``.metadata``, ``__R_0.distcp``): the model and the optimizer
  state, each rank writing its own shards. FSDP2 parameters and their
  optimizer moments are DTensors already; expert-parallel weights (each rank
  holds E/W experts under the same name) are saved as DTensors sharded on the
  expert dimension, so every tensor is stored once with its global shape and
  a run can resume on another number of ranks.
* ``trainer.pt`` (rank 0): step, tokens, elapsed time, data position, the
  schedule plan, the optimizer's non-tensor state (param groups, QK-Clip
  history) and the run's settings.
* ``rng_rank{R}.pt``: each rank's RNG states.

Ranks write into ``step_N.tmp/``; rank 0 renames it to ``step_N/`` only after
every rank has finished, so a crash mid-save never leaves a checkpoint that
looks complete.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from openk2.errors import CheckpointError
from openk2.train.parallel import rank_world as _dist
from openk2.utils import atomic_torch_save

_STEP_DIR = re.compile(r"^step_(\d+)$")
TRAINER_FILE = "trainer.pt"


def _barrier() -> None:
    if _dist()[1] > 1:
        torch.distributed.barrier()


def rng_state() -> dict:
    s = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        s["cuda"] = torch.cuda.get_rng_state()
    return s


def set_rng_state(s: dict) -> None:
    torch.set_rng_state(s["torch"])
    np.random.set_state(s["numpy"])
    random.setstate(s["python"])
    if "cuda" in s and torch.cuda.is_available():
        torch.cuda.set_rng_state(s["cuda"])


# ------------------------------------------------------------ state entries
def _expert_modules(model: nn.Module) -> dict[str, int]:
    """module name -> this rank's number of experts, for expert-parallel expert weights (`ep_range`)."""
    return {name: m.ep_range[1] - m.ep_range[0] for name, m in model.named_modules()
            if getattr(m, "ep_range", None) is not None}


def _mesh():
    from torch.distributed.device_mesh import init_device_mesh

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    return init_device_mesh(dev, (_dist()[1],))


def _wrap_expert(t: torch.Tensor, n_local: int, mesh) -> torch.Tensor:
    """A rank's expert rows as a DTensor sharded on dim 0 (shares storage with `t`)."""
    from torch.distributed.tensor import DTensor, Shard

    world = _dist()[1]
    shape = torch.Size((n_local * world, *t.shape[1:]))
    stride = torch.empty(shape, device="meta").stride()
    return DTensor.from_local(t, mesh, [Shard(0)], run_check=False, shape=shape, stride=stride)


def reshard(model: nn.Module) -> None:
    """Put FSDP2 modules back in their sharded state (a forward without backward, e.g. validation, leaves
    the root's parameters unsharded), so parameters are the ones the optimizer holds."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        return
    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.reshard()


class _IdMap(dict):
    """Parameter -> name by identity (tensors compare elementwise, DTensors hash oddly)."""

    def __init__(self, items):
        super().__init__((id(p), n) for p, n in items)

    def __getitem__(self, p):
        return super().__getitem__(id(p))


class _Entries:
    """Model + optimizer tensors under flat names, expert-parallel ones wrapped as sharded DTensors."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer | None):
        reshard(model)
        self.model, self.optimizer = model, optimizer
        experts = _expert_modules(model) if _dist()[1] > 1 else {}
        self.mesh = _mesh() if experts else None
        self.expert_param = {}  # parameter name -> local expert count
        for mod, n_local in experts.items():
            for pname, _ in model.get_submodule(mod).named_parameters(recurse=False):
                self.expert_param[f"{mod}.{pname}"] = n_local
        self.names = _IdMap((p, n) for n, p in model.named_parameters())

    def wrap(self, name: str, t: torch.Tensor) -> torch.Tensor:
        n_local = self.expert_param.get(name)
        if n_local is not None and isinstance(t, torch.Tensor) and t.dim() >= 1 and t.shape[0] == n_local:
            return _wrap_expert(t, n_local, self.mesh)
        return t

    def model_state(self) -> dict[str, torch.Tensor]:
        return {f"model.{k}": self.wrap(k, v) for k, v in self.model.state_dict().items()}

    def param_order(self) -> list[nn.Parameter]:
        return [p for g in self.optimizer.param_groups for p in g["params"]]

    def optimizer_state(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """(tensor entries for DCP, the rest: param groups, extras such as QK-Clip's history)."""
        sd = self.optimizer.state_dict()
        order = self.param_order()
        tensors = {}
        for i, st in sd["state"].items():
            name = self.names[order[i]]
            for k, v in st.items():
                tensors[f"optim.{name}.{k}"] = self.wrap(name, v) if isinstance(v, torch.Tensor) else v
        rest = {k: v for k, v in sd.items() if k != "state"}
        rest["param_names"] = [self.names[p] for p in order]
        return tensors, rest


# ------------------------------------------------------------------- save
def save_training_state(ckpt_dir: Path, model: nn.Module, optimizer, trainer_state: dict, keep: int = 2) -> Path:
    """Write one checkpoint directory (every rank calls this); keep the newest `keep` of them."""
    import torch.distributed.checkpoint as dcp

    rank, world = _dist()
    final = Path(ckpt_dir)
    tmp = final.with_name(final.name + ".tmp")
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier()
    entries = _Entries(model, optimizer)
    state = entries.model_state()
    opt_tensors, opt_rest = entries.optimizer_state()
    state.update(opt_tensors)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
        dcp.save(state, storage_writer=dcp.FileSystemWriter(str(tmp), single_file_per_rank=True, sync_files=True),
                 no_dist=world == 1)
    atomic_torch_save(rng_state(), tmp / f"rng_rank{rank}.pt")
    _barrier()
    if rank == 0:
        atomic_torch_save({**trainer_state, "optimizer": opt_rest, "world_size": world}, tmp / TRAINER_FILE)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(final.parent)
        for old in list_checkpoints(final.parent)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return final


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def list_checkpoints(ckpt_root: Path) -> list[Path]:
    """Complete checkpoint directories, oldest first."""
    root = Path(ckpt_root)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _STEP_DIR.match(p.name))]
    return [p for _, p in sorted(found)]


def latest_checkpoint(run_dir: Path) -> Path | None:
    ckpts = list_checkpoints(Path(run_dir) / "checkpoints")
    return ckpts[-1] if ckpts else None


# ------------------------------------------------------------------- load
def read_trainer_state(path: Path) -> dict:
    """The small, rank-0 part of a checkpoint (step, data position, settings...): clear error if unusable."""
    path = Path(path)
    f = path / TRAINER_FILE
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a training checkpoint directory")
    if not f.exists() or not (path / ".metadata").exists():
        raise CheckpointError(f"{path}: incomplete training checkpoint (missing {TRAINER_FILE} or .metadata)")
    try:
        state = torch.load(f, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001 - any failure here means the file is unusable
        raise CheckpointError(f"{path}: cannot read training checkpoint ({type(e).__name__}: {e})") from None
    for key in ("step", "data", "train_config", "optimizer"):
        if key not in state:
            raise CheckpointError(f"{path}: training checkpoint lacks '{key}'")
    return state


def _dcp_load(path: Path, targets: dict) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
        try:
            dcp.load(targets, storage_reader=dcp.FileSystemReader(str(path)), no_dist=_dist()[1] == 1)
        except (Exception, CheckpointException) as e:  # noqa: BLE001 - DCP wraps per-rank failures
            causes = [f"{type(x).__name__}: {x}".strip() for _, (x, _) in getattr(e, "failures", {}).items()] \
                if isinstance(e, CheckpointException) else [f"{type(e).__name__}: {e}"]
            first = (causes[0].splitlines() or [""])[0] if causes else type(e).__name__
            raise CheckpointError(f"{path}: cannot load tensors ({first}; truncated or corrupt shard?)") from None


def _metadata(path: Path):
    import torch.distributed.checkpoint as dcp

    try:
        return dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"{path}: cannot read checkpoint metadata ({type(e).__name__}: {e})") from None


def load_training_state(path: Path, model: nn.Module, optimizer) -> dict:
    """Restore model, optimizer and this rank's RNG from `path`; returns the trainer state (step, data, ...)."""
    from torch.distributed.tensor import DTensor

    path = Path(path)
    state = read_trainer_state(path)
    meta = _metadata(path)
    entries = _Entries(model, optimizer)
    rest = state["optimizer"]
    order = entries.param_order()
    names = [entries.names[p] for p in order]
    if rest.get("param_names") != names:
        raise CheckpointError(f"{path}: optimizer parameters differ from this model's "
                              f"({len(rest.get('param_names', []))} saved, {len(names)} here)")
    targets: dict[str, Any] = entries.model_state()
    missing = sorted(set(targets) - set(meta))
    if missing:
        raise CheckpointError(f"{path}: checkpoint lacks {missing[0]}" + (f" (+{len(missing) - 1} more)" if len(missing) > 1 else ""))
    by_name = {n: p for n, p in zip(names, order)}
    slots: dict[str, tuple[str, str]] = {}
    for key, md in meta.items():
        if not key.startswith("optim."):
            continue
        pname, _, k = key[len("optim."):].rpartition(".")
        if pname not in by_name:
            raise CheckpointError(f"{path}: optimizer state for unknown parameter {pname}")
        p = by_name[pname]
        size = getattr(md, "size", None)
        # the saved dtype, not the parameter's: DCP casts into its target silently (fp32 moments and master
        # weights of bf16 parameters must come back in fp32); global shape (experts: all ranks' rows)
        dtype = md.properties.dtype if size is not None else p.dtype
        like = entries.wrap(pname, torch.zeros_like(p.detach(), dtype=dtype))
        if size is None:  # a non-tensor value
            targets[key] = None
        elif tuple(size) == tuple(like.shape):
            targets[key] = like
        else:
            targets[key] = torch.zeros(tuple(size), dtype=md.properties.dtype)
        slots[key] = (pname, k)
    _dcp_load(path, targets)

    def unwrap(name, t):
        if isinstance(t, DTensor) and name in entries.expert_param:
            return t.to_local()
        return t

    model_sd = {k[len("model."):]: unwrap(k[len("model."):], v) for k, v in targets.items() if k.startswith("model.")}
    with torch.no_grad():
        model.load_state_dict(model_sd)
    opt_state: dict[int, dict] = {}
    index = {n: i for i, n in enumerate(names)}
    for key, (pname, k) in slots.items():
        opt_state.setdefault(index[pname], {})[k] = unwrap(pname, targets[key])
    sd = {k: v for k, v in rest.items() if k != "param_names"}
    sd["state"] = opt_state
    optimizer.load_state_dict(sd)
    rank = _dist()[0]
    rng_file = path / f"rng_rank{rank}.pt"
    if rng_file.exists():
        set_rng_state(torch.load(rng_file, map_location="cpu", weights_only=False))
    return state


def load_model_weights(path: Path, model: nn.Module) -> dict:
    """Only the model weights of a checkpoint (any number of ranks wrote it) into a single-process model."""
    state = read_trainer_state(path)
    targets = {f"model.{k}": v for k, v in model.state_dict().items()}
    meta = _metadata(Path(path))
    missing = sorted(set(targets) - set(meta))
    if missing:
        raise CheckpointError(f"{path}: checkpoint lacks {missing[0]} (the model does not match the run's config)")
    for k, md in meta.items():
        if k in targets and tuple(md.size) != tuple(targets[k].shape):
            raise CheckpointError(f"{path}: {k[len('model.'):]} has shape {tuple(md.size)} in the checkpoint, "
                                  f"{tuple(targets[k].shape)} in the model")
    _dcp_load(Path(path), targets)
    return state
