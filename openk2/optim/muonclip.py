"""MuonClip (K2 report, Algorithm 1): Muon for matrices, AdamW for the rest, then QK-Clip.

For every matrix weight W (n x m), and per expert for stacked [E, n, m] experts:

    M_t = mu * M_{t-1} + G_t
    O_t = NewtonSchulz(G_t + mu * M_t  (Nesterov)  or  M_t) * sqrt(max(n, m)) * update_rms
    W_t = W_{t-1} - lr * (O_t + weight_decay * W_{t-1})

update_rms = 0.2 matches the update RMS of AdamW, so AdamW's lr and weight
decay carry over (Moonlight). Embeddings, the output head, norms, biases and
router weights take AdamW. After the update, QK-Clip rescales the query/key
weights of attention heads whose max logit exceeded tau (see qk_clip.py).

Speed: matrices of one shape are stacked and orthogonalised together (one
batched matmul per Newton-Schulz product); the moment and weight updates are
per parameter, so a stacked [E, n, m] expert tensor costs a handful of ops,
not E of them. Under FSDP2 (DTensor parameters) a matrix split across ranks
is all-gathered, orthogonalised whole and each rank keeps its rows (as in
Moonlight's distributed Muon); experts sharded along E are already whole.
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer

from openk2.optim.newton_schulz import _newton_schulz, _ns_kernel, matmul_dtype_for, ns_schedule
from openk2.optim.qk_clip import QKClip

# Module names whose weights are not hidden-layer matrices (embeddings, heads, routers).
_ADAMW_MODULES = re.compile(
    r"(^|\.)(embed_tokens|embed|embeddings|word_embeddings|position_embeddings|wte|wpe|tok_embeddings|"
    r"lm_head|output|head|classifier|score|router|gate)(\.(weight|bias))?$"
)


def is_muon_param(name: str, p: torch.Tensor) -> bool:
    """The default rule: 2-D matrices and 3-D [E, n, m] expert stacks, except embeddings, heads, routers
    and biases (a stacked expert bias [E, n] is a set of vectors, not a matrix)."""
    if p.ndim not in (2, 3) or min(p.shape[-2:]) < 2 or name.endswith("bias"):
        return False
    return _ADAMW_MODULES.search(name) is None


def param_groups(model: nn.Module, **group_options: Any) -> list[dict[str, Any]]:
    """The default partition of `model`: [{"use_muon": True, ...}, {"use_muon": False, ...}] with names.

    AdamW: nn.Embedding weights, the output head (get_output_embeddings() or
    a module named lm_head/output/head) and anything tied to them, router
    weights (openk2 MoE `gate`, HF `...mlp.gate`), norms, biases, [1, n]
    vectors. Muon: every other 2-D or 3-D parameter. Parameters of fewer than
    2 dims (norm gains, biases) get their own AdamW group with weight_decay 0,
    the usual AdamW practice, so a MuonClip run and an AdamW baseline that
    skips decay on them differ in the optimizer only.
    """
    adamw_ids: set[int] = set()
    for m in model.modules():
        if isinstance(m, nn.Embedding):
            adamw_ids.update(id(p) for p in m.parameters(recurse=False))
    get_out = getattr(model, "get_output_embeddings", None)
    head = get_out() if callable(get_out) else None
    if isinstance(head, nn.Module):
        adamw_ids.update(id(p) for p in head.parameters(recurse=False))
    modules = dict(model.named_modules())
    muon, fused, adamw = [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if id(p) in adamw_ids or not is_muon_param(name, p):
            adamw.append((name, p))
        elif _fused_gate_up(name, p, modules.get(name.rpartition(".")[0])):
            fused.append((name, p))
        else:
            muon.append((name, p))
    groups = []
    if muon:
        groups.append({"params": muon, "use_muon": True, **group_options})
    if fused:
        groups.append({"params": fused, "use_muon": True, "ns_split": 2, **group_options})
    decay = [(n, p) for n, p in adamw if p.ndim >= 2]
    vectors = [(n, p) for n, p in adamw if p.ndim < 2]
    if decay:
        groups.append({"params": decay, "use_muon": False, **group_options})
    if vectors:
        groups.append({"params": vectors, "use_muon": False, **group_options, "weight_decay": 0.0})
    return groups


def _fused_gate_up(name: str, p: torch.Tensor, module: nn.Module | None = None) -> bool:
    """transformers-5 fused expert gate and up weights, [E, 2I, H] (first I rows gate, last I up).

    Muon orthogonalises them as two [I, H] matrices per expert, as openk2's own stacked gate_proj /
    up_proj (and Moonlight) do. With the owning module at hand, its intermediate size (`intermediate_dim`,
    or `intermediate_size`) must confirm the layout, else the tensor is left whole: other layouts
    ([E, H, 2I]: GPT-OSS, Aria) are never split along H. Without the module (a bare named-parameter list)
    the transformers DeepSeek-V3 layout is assumed.
    """
    if not name.endswith("gate_up_proj") or p.ndim != 3 or p.shape[-2] % 2:
        return False
    if module is None:
        return True
    inter = getattr(module, "intermediate_dim", None) or getattr(module, "intermediate_size", None)
    return isinstance(inter, int) and p.shape[-2] == 2 * inter


def _fused_adamw_devices() -> tuple[str, ...]:
    try:
        from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

        return tuple(_get_fused_kernels_supported_devices())
    except ImportError:  # older torch
        return ("cpu", "cuda")


# device types whose parameters take torch._fused_adamw_ (as torch.optim.AdamW(fused=True) decides)
_FUSED_DEVICES = _fused_adamw_devices()


def _fused_adamw_for(t: torch.Tensor) -> bool:
    return getattr(torch, "_fused_adamw_", None) is not None and t.device.type in _FUSED_DEVICES


def _local(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


def _splits_matrices(p: torch.Tensor) -> bool:
    """True for a DTensor whose sharding cuts its matrices (the last two dims): it must be gathered first."""
    from torch.distributed.tensor import DTensor, Replicate, Shard

    if not isinstance(p, DTensor):
        return False
    for pl in p.placements:
        if isinstance(pl, Replicate):
            continue
        if isinstance(pl, Shard) and pl.dim % p.ndim < p.ndim - 2:
            continue  # sharded along the expert dim: each rank holds whole matrices
        return True
    return False


def _check_number(name: str, value: Any, lo: float | None = None, hi: float | None = None,
                  lo_open: bool = False, hi_open: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok and lo is not None:
        ok = value > lo if lo_open else value >= lo
    if ok and hi is not None:
        ok = value < hi if hi_open else value <= hi
    if not ok:
        lo_s = "" if lo is None else ("(" if lo_open else "[") + f"{lo:g}"
        hi_s = "" if hi is None else f"{hi:g}" + (")" if hi_open else "]")
        if lo is not None and hi is not None:
            rng = f"in {lo_s}, {hi_s}"
        else:
            rng = f"> {lo:g}" if lo_open else f">= {lo:g}"
        raise ValueError(f"MuonClip: {name} must be a finite number {rng}, got {value!r}")


class MuonClip(Optimizer):
    """One optimizer for a whole model: Muon (matrices), AdamW (the rest), QK-Clip (attention heads).

    `params`: `model.named_parameters()` (the default partition by name),
    `param_groups(model)`, or groups with an explicit `"use_muon"`; any
    hyper-parameter below can be overridden per group. A plain tensor list is
    refused: without names an embedding looks like any other matrix.

    `qk_clip`: a `QKClip` (e.g. `QKClip.from_model(model, tau=100)`) run
    after every step; `clip_stats` then holds its logging stats.
    `master_weights=True` keeps fp32 copies of low-precision parameters in the
    optimizer state (updated, then copied back; QK-Clip scales both).
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 2e-4,
        *,
        weight_decay: float = 0.1,
        momentum: float = 0.95,
        nesterov: bool = True,
        ns_steps: int = 5,
        ns_coefficients: Any = "muon",
        ns_dtype: torch.dtype = torch.bfloat16,
        ns_eps: float = 1e-7,
        ns_matmul: str = "auto",
        update_rms: float = 0.2,
        betas: tuple[float, float] = (0.9, 0.95),
        eps: float = 1e-8,
        qk_clip: QKClip | None = None,
        master_weights: bool = False,
        compile_ns: bool = False,
        ns_split: int = 1,
    ):
        defaults = dict(lr=lr, weight_decay=weight_decay, momentum=momentum, nesterov=nesterov, ns_steps=ns_steps,
                        ns_coefficients=ns_coefficients, ns_dtype=ns_dtype, ns_eps=ns_eps, ns_matmul=ns_matmul,
                        update_rms=update_rms, ns_split=ns_split,
                        betas=tuple(betas), eps=eps)
        self._validate(defaults, "")
        if qk_clip is not None and not isinstance(qk_clip, QKClip):
            raise TypeError(f"MuonClip: qk_clip must be a QKClip or None, got {type(qk_clip).__name__}")
        super().__init__(self._partition(params), defaults)
        self.qk_clip = qk_clip
        self.master_weights = master_weights
        self.clip_stats: dict[str, Any] = {}
        self._ns_kernel = torch.compile(_ns_kernel, dynamic=None) if compile_ns else _ns_kernel
        self._workspace: dict[Any, torch.Tensor] = {}

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if "use_muon" not in param_group:
            parts = self._partition([param_group])
            if len(parts) != 1:
                raise ValueError("MuonClip.add_param_group: the group holds both Muon and AdamW parameters; "
                                 "add them as two groups or set 'use_muon'")
            param_group = parts[0]
        super().add_param_group(param_group)
        try:
            self._check_group(self.param_groups[-1], f"param group {len(self.param_groups) - 1}: ")
        except ValueError:
            self.param_groups.pop()  # leave the optimizer as it was
            raise
        if hasattr(self, "_workspace"):
            self._workspace.clear()

    @classmethod
    def _check_group(cls, group: Mapping[str, Any], where: str) -> None:
        cls._validate(group, where)
        if group["use_muon"]:
            names = group.get("param_names") or [None] * len(group["params"])
            for name, p in zip(names, group["params"]):
                what = f"'{name}'" if name else "a parameter"
                if p.ndim in (2, 3) and p.shape[-2] % group.get("ns_split", 1):
                    raise ValueError(f"MuonClip: {where}{what} of shape {tuple(p.shape)}: its {p.shape[-2]} rows do not "
                                     f"split into ns_split={group.get('ns_split', 1)} matrices")
                if p.ndim not in (2, 3):
                    raise ValueError(
                        f"MuonClip: {where}{what} of shape {tuple(p.shape)} is in a Muon group (use_muon=True), "
                        "but Muon takes 2-D matrices [n, m] or 3-D expert stacks [E, n, m]; put it in a group with "
                        "use_muon=False (AdamW)")

    # ------------------------------------------------------------ construction
    @classmethod
    def for_model(cls, model: nn.Module, lr: float = 2e-4, *, qk_clip_tau: float | None = 100.0,
                  qk_clip_alpha: float = 0.5, **kwargs: Any) -> "MuonClip":
        """The default partition of `model` plus QK-Clip on its attention layers (qk_clip_tau=None: plain Muon)."""
        qk = None if qk_clip_tau is None else QKClip.from_model(model, tau=qk_clip_tau, alpha=qk_clip_alpha)
        return cls(param_groups(model), lr=lr, qk_clip=qk, **kwargs)

    @staticmethod
    def _validate(g: Mapping[str, Any], where: str) -> None:
        def num(key, *a, **k):
            try:
                _check_number(key, g[key], *a, **k)
            except ValueError as e:
                raise ValueError(str(e).replace("MuonClip: ", f"MuonClip: {where}")) from None

        num("lr", 0.0)
        num("weight_decay", 0.0)
        num("momentum", 0.0, 1.0, hi_open=True)
        num("update_rms", 0.0, lo_open=True)
        num("eps", 0.0)
        num("ns_eps", 0.0, lo_open=True)
        betas = g["betas"]
        if not (isinstance(betas, (tuple, list)) and len(betas) == 2):
            raise ValueError(f"MuonClip: {where}betas must be a pair (beta1, beta2), got {betas!r}")
        for i, b in enumerate(betas):
            try:
                _check_number(f"betas[{i}]", b, 0.0, 1.0, hi_open=True)
            except ValueError as e:
                raise ValueError(str(e).replace("MuonClip: ", f"MuonClip: {where}")) from None
        try:
            ns_schedule(g["ns_coefficients"], g["ns_steps"])
        except ValueError as e:
            raise ValueError(f"MuonClip: {where}{e}") from None
        if g["ns_dtype"] not in (torch.bfloat16, torch.float16, torch.float32, torch.float64):
            raise ValueError(f"MuonClip: {where}ns_dtype must be a floating dtype, got {g['ns_dtype']!r}")
        split = g.get("ns_split", 1)
        if isinstance(split, bool) or not isinstance(split, int) or split < 1:
            raise ValueError(f"MuonClip: {where}ns_split must be a positive integer, got {split!r}")
        if g["ns_matmul"] not in ("auto", "native", "fp32"):
            raise ValueError(f"MuonClip: {where}ns_matmul must be 'auto', 'native' or 'fp32', got {g['ns_matmul']!r}")

    @staticmethod
    def _partition(params: Iterable[Any]) -> list[dict[str, Any]]:
        items = list(params)
        if not items:
            raise ValueError("MuonClip: got an empty parameter list")
        groups = [dict(g) for g in items] if all(isinstance(x, dict) for x in items) else [{"params": items}]
        out = []
        for g in groups:
            ps = g["params"]
            ps = [ps] if isinstance(ps, torch.Tensor) else list(ps)
            if "use_muon" in g:
                out.append({**g, "params": ps})
                continue
            if not all(isinstance(x, tuple) and len(x) == 2 and isinstance(x[0], str) for x in ps):
                raise ValueError(
                    "MuonClip cannot tell hidden matrices from embeddings and output heads in an unnamed parameter "
                    "list: pass model.named_parameters(), openk2.optim.param_groups(model), or groups with "
                    "'use_muon': True/False")
            muon = [(n, p) for n, p in ps if is_muon_param(n, p) and not _fused_gate_up(n, p)]
            fused = [(n, p) for n, p in ps if is_muon_param(n, p) and _fused_gate_up(n, p)]
            adamw = [(n, p) for n, p in ps if not is_muon_param(n, p)]
            rest = {k: v for k, v in g.items() if k != "params"}
            if muon:
                out.append({**rest, "params": muon, "use_muon": True})
            if fused:
                out.append({"ns_split": 2, **rest, "params": fused, "use_muon": True})
            if adamw:
                out.append({**rest, "params": adamw, "use_muon": False})
        return out

    # -------------------------------------------------------------------- step
    @torch.no_grad()
    def step(self, closure=None):
        """Muon / AdamW update of every parameter with a gradient, then QK-Clip."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._muon_step()
        self._adamw_step()
        if self.qk_clip is not None:
            self.clip_stats = self.qk_clip.step(self._masters() if self.master_weights else None)
        return loss

    def _target(self, p: torch.Tensor, state: dict) -> torch.Tensor:
        """The tensor the update applies to: the fp32 master copy if kept, else the parameter."""
        if self.master_weights and p.dtype != torch.float32:
            if "master_weight" not in state:
                state["master_weight"] = p.detach().float().clone()
            return state["master_weight"]
        return p

    def _masters(self) -> dict[torch.Tensor, torch.Tensor]:
        return {p: s["master_weight"] for p, s in self.state.items() if "master_weight" in s}

    @staticmethod
    def _grad(p: torch.Tensor) -> torch.Tensor:
        g = p.grad
        if g.is_sparse:
            raise RuntimeError("MuonClip does not support sparse gradients")
        if torch.is_complex(g):
            raise RuntimeError("MuonClip does not support complex parameters")
        from torch.distributed.tensor import DTensor

        if isinstance(p, DTensor) and isinstance(g, DTensor) and g.placements != p.placements:
            g = g.redistribute(p.device_mesh, p.placements)
        return g

    def _muon_step(self) -> None:
        buckets: dict[Any, list] = defaultdict(list)
        for group in self.param_groups:
            if not group["use_muon"]:
                continue
            schedule = ns_schedule(group["ns_coefficients"], group["ns_steps"])
            ns_key = (schedule, group["ns_dtype"], group["ns_eps"], group["ns_matmul"])
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = self._grad(p)
                state = self.state[p]
                target = self._target(p, state)
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(target, memory_format=torch.preserve_format)
                m, gl = _local(state["momentum_buffer"]), _local(g)
                torch.add(gl, m, alpha=group["momentum"], out=m)  # M = mu M + G
                split = group.get("ns_split", 1)
                n, k = p.shape[-2:]
                if _splits_matrices(p):
                    key = ("gather", tuple(p.shape), tuple(p.placements), p.device_mesh, split, ns_key)
                else:
                    key = ("local", n // split, k, gl.device, split, ns_key)
                buckets[key].append((p, group, target, gl, m))
        for key, items in buckets.items():
            self._muon_bucket(key, items)

    def _muon_bucket(self, key, items) -> None:
        kind, *_, split, (schedule, ns_dtype, ns_eps, ns_matmul) = key
        n, m = items[0][0].shape[-2:]
        n //= split  # ns_split: each [n, m] matrix is `split` stacked [n / split, m] matrices
        shapes = [_local(it[2]).shape for it in items]
        local_split = 1 if kind == "gather" else split  # gathered matrices are split after the gather
        counts = [math.prod(s[:-2]) * local_split for s in shapes]
        rows, cols = shapes[0][-2] // local_split, shapes[0][-1]
        total = sum(counts)
        ws_key = (key, total)
        U = self._workspace.get(ws_key)
        if U is None:
            dtype = torch.promote_types(items[0][4].dtype, torch.float32)  # the momentum's dtype, at least fp32
            U = torch.empty(total, rows, cols, dtype=dtype, device=items[0][3].device)
            self._workspace[ws_key] = U
        off = 0
        views = []
        for (p, group, target, gl, mbuf), c, s in zip(items, counts, shapes):
            u = U[off:off + c].view(s)
            if group["nesterov"]:
                torch.add(gl, mbuf, alpha=group["momentum"], out=u)  # G + mu M
            else:
                u.copy_(mbuf)
            views.append((off, c, s))
            off += c
        mm_dtype = matmul_dtype_for(U.device, ns_dtype, ns_matmul)
        if kind == "gather":
            O_local = self._orthogonalise_sharded(U, items[0][0], schedule, ns_dtype, ns_eps, mm_dtype, split)
        else:
            O_local = _newton_schulz(U, schedule, ns_eps, ns_dtype, mm_dtype, out=U, kernel=self._ns_kernel)
        scale = math.sqrt(max(n, m))
        # one foreach call per (lr, weight_decay, update_rms) in the bucket
        by_hp: dict[tuple, tuple[list, list, list]] = defaultdict(lambda: ([], [], []))
        for (p, group, target, gl, mbuf), (o, c, s) in zip(items, views):
            hp = (group["lr"], group["weight_decay"], group["update_rms"])
            ts, os_, ps = by_hp[hp]
            ts.append(_local(target))
            os_.append(O_local[o:o + c].view(s))
            ps.append((p, target))
        for (lr, wd, rms), (ts, os_, ps) in by_hp.items():
            if wd:
                torch._foreach_mul_(ts, 1.0 - lr * wd)
            torch._foreach_add_(ts, os_, alpha=-lr * rms * scale)
            for p, target in ps:
                if target is not p:
                    _local(p).copy_(_local(target))

    def _orthogonalise_sharded(self, U_local, p, schedule, ns_dtype, ns_eps, mm_dtype, split=1) -> torch.Tensor:
        """All-gather the stacked shards [k, ...local] of same-shaped DTensor matrices, orthogonalise, keep ours."""
        from torch.distributed.tensor import DTensor, Replicate, Shard

        k = U_local.shape[0] // math.prod(_local(p).shape[:-2])
        local = U_local.view(k, *_local(p).shape)
        placements = tuple(Shard(pl.dim % p.ndim + 1) if isinstance(pl, Shard) else pl for pl in p.placements)
        gshape = (k, *p.shape)
        gstride = torch.empty(gshape, device="meta").stride()
        full = DTensor.from_local(local, p.device_mesh, placements, run_check=False, shape=torch.Size(gshape),
                                  stride=gstride).full_tensor()
        n, m = p.shape[-2:]
        mats = full.view(-1, n // split, m)
        O = _newton_schulz(mats, schedule, ns_eps, ns_dtype, mm_dtype, out=mats, kernel=self._ns_kernel).view(gshape)
        O = DTensor.from_local(O, p.device_mesh, [Replicate()] * p.device_mesh.ndim, run_check=False)
        return O.redistribute(p.device_mesh, placements).to_local().reshape(U_local.shape)

    def _adamw_step(self) -> None:
        for group in self.param_groups:
            if group["use_muon"]:
                continue
            targets, grads, exp_avgs, exp_avg_sqs, steps, synced = [], [], [], [], [], []
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = self._grad(p)
                state = self.state[p]
                target = self._target(p, state)
                t = _local(target)
                if "step" not in state:
                    # the fused kernel reads the step counter on the parameter's device (as torch's fused
                    # AdamW keeps it); the foreach fallback reads it on the host
                    state["step"] = torch.zeros((), dtype=torch.float32,
                                                device=t.device if _fused_adamw_for(t) else "cpu")
                    state["exp_avg"] = torch.zeros_like(target, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(target, memory_format=torch.preserve_format)
                elif _fused_adamw_for(t) and state["step"].device != t.device:  # e.g. loaded onto the CPU
                    state["step"] = state["step"].to(device=t.device, dtype=torch.float32)
                gl = _local(g)
                targets.append(t)
                grads.append(gl if gl.dtype == t.dtype else gl.to(t.dtype))
                exp_avgs.append(_local(state["exp_avg"]))
                exp_avg_sqs.append(_local(state["exp_avg_sq"]))
                steps.append(state["step"])
                if target is not p:
                    synced.append((p, target))
            if not targets:
                continue
            _adamw(targets, grads, exp_avgs, exp_avg_sqs, steps, lr=group["lr"], betas=group["betas"],
                   eps=group["eps"], weight_decay=group["weight_decay"])
            for p, target in synced:
                _local(p).copy_(_local(target))

    # -------------------------------------------------------------- checkpoint
    def state_dict(self) -> dict[str, Any]:
        sd = super().state_dict()
        if self.qk_clip is not None:
            sd["qk_clip"] = self.qk_clip.state_dict()
        return sd

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        sd = dict(state_dict)
        qk = sd.pop("qk_clip", None)
        super().load_state_dict(sd)
        # Optimizer.load_state_dict casts every state tensor to its parameter's dtype; fp32 masters and
        # their moments must stay fp32.
        order = [p for g in self.param_groups for p in g["params"]]
        for i, p in enumerate(order):
            src = sd["state"].get(i)
            if not src or p.dtype == torch.float32:
                continue
            for k, v in src.items():
                if isinstance(v, torch.Tensor) and v.dtype == torch.float32 and k != "step":
                    self.state[p][k] = v.to(device=p.device, copy=True)
        if qk is not None and self.qk_clip is not None:
            self.qk_clip.load_state_dict(qk)
        self._workspace.clear()


def _adamw(params, grads, exp_avgs, exp_avg_sqs, steps, *, lr, betas, eps, weight_decay) -> None:
    """AdamW (Loshchilov & Hutter) as torch.optim.AdamW computes it; one fused kernel where torch has one."""
    beta1, beta2 = betas
    torch._foreach_add_(steps, 1.0)
    fused = getattr(torch, "_fused_adamw_", None)
    same_kind = len({(t.dtype, t.device) for t in params}) == 1 and all(s.device == params[0].device for s in steps)
    if fused is not None and _fused_adamw_for(params[0]) and same_kind:
        fused(params, grads, exp_avgs, exp_avg_sqs, [], steps, lr=lr, beta1=beta1, beta2=beta2,
              weight_decay=weight_decay, eps=eps, amsgrad=False, maximize=False)
        return
    if weight_decay:
        torch._foreach_mul_(params, 1.0 - lr * weight_decay)
    torch._foreach_lerp_(exp_avgs, grads, 1.0 - beta1)  # m = beta1 m + (1 - beta1) g
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, 1.0 - beta2)  # v = beta2 v + (1 - beta2) g^2
    bc1 = [1.0 - beta1 ** float(s) for s in steps]
    bc2 = [math.sqrt(1.0 - beta2 ** float(s)) for s in steps]
    denom = torch._foreach_sqrt(exp_avg_sqs)
    torch._foreach_div_(denom, bc2)
    torch._foreach_add_(denom, eps)  # sqrt(v / bc2) + eps
    torch._foreach_addcdiv_(params, exp_avgs, denom, [-lr / b for b in bc1])
