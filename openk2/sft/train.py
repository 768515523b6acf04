"""Supervised fine-tuning (K2 report §3.1) on the shared training core.

`sft(cfg)` runs the whole job:

1. load the base (openk2.sft.base: an openk2 checkpoint or a transformers causal LM, K2's special
   tokens added if missing);
2. load the sources, hold out `val_fraction` of each, render with the loss on assistant tokens only,
   truncate at turn boundaries, pack (openk2.sft.data);
3. train with the shared `Trainer` (openk2.train.trainer: MuonClip with QK-Clip by default or AdamW,
   WSD / cosine, gradient accumulation, sharded resumable checkpoints, metrics, progress, FSDP2 under
   torchrun), evaluating the held-out assistant-token loss every `val_every` steps;
4. export an HF checkpoint (`RUN/hf`) that `openk2 serve` serves with tool calls;
5. generate answers to held-out single-call tool tasks through the serving path, for the SFT'd model
   and for its base (openk2.sft.evaluate), and write `report.md`, `summary.json` and the loss PNG.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from openk2.errors import ConfigError, DataError
from openk2.model.loss import IGNORE_INDEX, linear_cross_entropy
from openk2.sft.config import RESUME_MUST_MATCH, SFTConfig
from openk2.train.parallel import rank_world as _dist

__all__ = ["SFTConfig", "sft", "sft_loss", "prepare_sft_data"]


# ----------------------------------------------------------------- the loss
def sft_loss(model: torch.nn.Module, batch: dict) -> tuple[torch.Tensor, int]:
    """Mean cross-entropy over the tokens that carry loss (assistant turns), for openk2 and transformers models.

    Packed batches carry `document_ids`: openk2 builds the block-diagonal causal mask from them;
    a transformers model gets the restarting `position_ids` with no attention mask, from which it
    builds the same mask (transformers' packed-sequence detection).
    """
    from openk2.model.transformer import K2ForCausalLM

    targets = batch["labels"]
    n = int((targets != IGNORE_INDEX).sum())
    inner = getattr(model, "module", model)
    if isinstance(inner, K2ForCausalLM):
        from openk2.train.trainer import lm_loss

        return lm_loss(model, {k: v for k, v in batch.items() if k != "real_mask"})[0], n
    kw = {"position_ids": batch["position_ids"]} if "document_ids" in batch else {}
    body, head = getattr(inner, "model", None), getattr(inner, "lm_head", None)
    if body is not None and head is not None:  # fused head + loss: no [B, T, V] logits
        h = body(input_ids=batch["input_ids"], use_cache=False, **kw).last_hidden_state
        return linear_cross_entropy(h, head.weight, targets), n
    logits = model(input_ids=batch["input_ids"], use_cache=False, **kw).logits
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX), n


def _sft_count(batch: dict) -> int:
    return int((batch["labels"] != IGNORE_INDEX).sum())


# ------------------------------------------------------------------ the data
def prepare_sft_data(cfg: SFTConfig, fmt, log=print) -> dict[str, Any]:
    """Sources -> {"train": {source: [Example]}, "val": {...}, "val_conversations": [...], "stats": ...}."""
    from openk2.sft.data import EncodeStats, encode_all, load_source, split

    train, val, val_convs, stats, counts = {}, {}, [], {}, {}
    for name in cfg.sources:
        convs = load_source(name, cfg.math_count, cfg.seed)
        tr, va = split(convs, cfg.val_fraction)
        st_tr, st_va = EncodeStats(), EncodeStats()
        train[name] = encode_all(fmt, tr, cfg.seq_len, st_tr)
        val[name] = encode_all(fmt, va, cfg.seq_len, st_va)
        if cfg.sources[name] > 0 and not train[name]:
            raise DataError(f"SFT source {name!r}: no conversation fits seq_len={cfg.seq_len} "
                            f"({st_tr.dropped} dropped, {st_tr.failed} failed)")
        val_convs += va
        stats[name] = {"train": st_tr.to_dict(), "val": st_va.to_dict()}
        counts[name] = {"conversations": len(convs), "train": len(train[name]), "val": len(val[name])}
    return {"train": train, "val": val, "val_conversations": val_convs, "stats": stats, "counts": counts}


def packing_stats(examples: dict, seq_len: int, batch_rows: int, pad_id: int, weights: dict, seed: int,
                  rows: int = 256) -> dict[str, Any]:
    """Token efficiency of the same sample stream packed and unpacked: positions computed per loss token."""
    from openk2.sft.data import SFTDataset, token_stats

    out = {}
    for pack in (True, False):
        ds = SFTDataset(examples, weights, seq_len, pad_id, pack=pack, seed=seed)
        it = ds.batches(batch_rows)
        tot = {"positions": 0, "real_tokens": 0, "loss_tokens": 0}
        n_rows = 0
        while n_rows < rows:
            s = token_stats(next(it))
            for k in tot:
                tot[k] += s[k]
            n_rows += batch_rows
        out["packed" if pack else "unpacked"] = {
            **tot, "conversations": ds._samples if pack else n_rows,
            "padding_fraction": round(1 - tot["real_tokens"] / tot["positions"], 4),
            "loss_fraction": round(tot["loss_tokens"] / tot["positions"], 4)}
    # per loss token, the positions each layout computes (unpacked: fewer conversations per row)
    p, u = out["packed"], out["unpacked"]
    out["positions_per_loss_token"] = {"packed": round(p["positions"] / p["loss_tokens"], 3),
                                       "unpacked": round(u["positions"] / u["loss_tokens"], 3)}
    return out


# ------------------------------------------------------------------- export
def export_hf(model, base, cfg: SFTConfig, hf_dir: Path) -> None:
    """The fine-tuned model as an HF directory `openk2 serve` loads (tokenizer and chat template included)."""
    from openk2.train.parallel import gather_model_state

    state = gather_model_state(model)  # a collective under torchrun
    if _dist()[0] != 0:
        return
    tmp = hf_dir.with_name(hf_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    if base.kind == "k2":
        from openk2.model.transformer import K2ForCausalLM

        export = K2ForCausalLM(model.config, init_weights=False)
        export.load_state_dict(state, strict=False)
        export.reset_buffers()
        export.save_pretrained(tmp)
        base.tokenizer.save(tmp)
    else:
        model.save_pretrained(tmp)  # one process (checked at the start)
        base.tokenizer.save_pretrained(tmp)
    shutil.rmtree(hf_dir, ignore_errors=True)
    tmp.rename(hf_dir)


# ------------------------------------------------------------------ the job
def _check_resumable(ckpt, state: dict, cfg: SFTConfig) -> None:
    saved = SFTConfig.from_dict(state["train_config"])
    for k in RESUME_MUST_MATCH:
        if getattr(saved, k) != getattr(cfg, k):
            raise ConfigError(f"{ckpt}: run was started with {k}={getattr(saved, k)!r}, now {getattr(cfg, k)!r}; "
                              f"use another --name or pass --restart")


def sft(cfg: SFTConfig, resume: bool = True, log=print, stop_after: int | None = None) -> dict:
    """Run (or resume) an SFT job; returns the summary (see the module docstring)."""
    from openk2.sft.base import load_base
    from openk2.sft.data import ChatFormat, SFTDataset, fixed_batches, mixture_counts
    from openk2.train.checkpoint import latest_checkpoint, read_trainer_state
    from openk2.train.parallel import maybe_parallelize
    from openk2.train.trainer import Trainer, resolve_precision
    from openk2.utils import atomic_write

    cfg.validate()
    rank, world = _dist()
    is_main = rank == 0
    run_dir = cfg.run_dir
    if not resume and is_main and (run_dir / "checkpoints").exists():
        shutil.rmtree(run_dir / "checkpoints")
    if world > 1:
        torch.distributed.barrier()
    ckpt = latest_checkpoint(run_dir) if resume else None
    saved_precision = None
    if ckpt is not None:
        saved = read_trainer_state(ckpt)
        _check_resumable(ckpt, saved, cfg)
        saved_precision = saved.get("precision")
    if is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write(run_dir / "train_config.json", json.dumps(cfg.to_dict(), indent=2) + "\n")

    t_load = time.perf_counter()
    base = load_base(cfg.base)
    kind = base.kind if cfg.chat_format == "auto" else cfg.chat_format
    if kind == "k2" and base.kind == "hf":
        log("note: a transformers model trained in K2's format; openk2 serve prompts such a model with its own "
            "template, so serve it with --chat-template k2-instruct-0905 (tool calls then come back as text)")
    fmt = ChatFormat(base.tokenizer, kind)
    data = prepare_sft_data(cfg, fmt, log)
    if world > 1 and base.kind != "k2":
        raise ConfigError("torchrun SFT (FSDP2) is for openk2 models; train a transformers model on one process")
    weights = {k: float(v) for k, v in cfg.sources.items()}
    train_ds = SFTDataset(data["train"], weights, cfg.seq_len, base.pad_id, pack=cfg.pack, seed=cfg.seed,
                          rank=rank, world_size=world)
    val_examples = [e for v in data["val"].values() for e in v]
    if not val_examples:
        raise DataError("SFT data: the held-out split is empty (raise val_fraction or add data)")
    val_all = fixed_batches(val_examples, cfg.seq_len, base.pad_id, max(1, min(cfg.batch_size, 8)), pack=True)
    val_set = val_all[: cfg.val_batches]  # every rank evaluates the same batches (FSDP: same forwards everywhere)
    if is_main:
        atomic_write(run_dir / "data.json", json.dumps({"counts": data["counts"], "encoding": data["stats"],
                                                        "tokens": mixture_counts(data["train"])}, indent=2) + "\n")

    torch.manual_seed(cfg.seed)
    model = base.model
    if cfg.recompute != "none" and hasattr(model, "set_recompute"):
        model.set_recompute(cfg.recompute)
    model = maybe_parallelize(model) if base.kind == "k2" else model
    model.train()
    if hasattr(model, "set_track_max_logit"):
        model.set_track_max_logit(cfg.track_max_logit or (cfg.optimizer == "muonclip" and cfg.qk_clip_tau is not None))
    precision = resolve_precision(cfg, next(model.parameters()).device, saved_precision)
    opt = _build_optimizer(model, cfg, precision["ns_matmul"])

    def evaluate(trainer: Trainer) -> dict:
        total = torch.zeros(2, dtype=torch.float64, device=trainer.device)
        from openk2.train.trainer import _to

        for b in val_set:
            loss, k = sft_loss(trainer.model, _to(b, trainer.device))
            total += torch.tensor([float(loss) * k, k], dtype=torch.float64, device=trainer.device)
        return {"val_loss": float(total[0] / total[1].clamp(min=1))}

    trainer = Trainer(model, opt, cfg, train_ds, loss_fn=sft_loss, evaluate_fn=evaluate, count_fn=_sft_count,
                      precision=precision, name="sft", run_dir=run_dir)
    base_val = None
    if ckpt is not None:
        trainer.load(ckpt)
        base_val = trainer.extra_state.get("base_val_loss")
        if is_main:
            log(f"resumed from {ckpt} at step {trainer.step}")
    else:
        base_val = trainer.evaluate()["val_loss"]
        trainer.last_eval = {}
    trainer.extra_state["base_val_loss"] = base_val  # kept in every checkpoint
    if is_main:
        n_train = sum(len(v) for v in data["train"].values())
        added = f", added {len(base.added_tokens)} K2 tokens" if base.added_tokens else ""
        log(f"base {cfg.base} ({base.kind}{added}), {sum(p.numel() for p in model.parameters()):,} parameters, "
            f"loaded in {time.perf_counter() - t_load:.1f} s; "
            f"format {kind}; {n_train} training / {len(val_examples)} held-out conversations from "
            f"{', '.join(f'{k} (w={v:g})' for k, v in cfg.sources.items())}; optimizer {cfg.optimizer}"
            + (f" (QK-Clip tau={cfg.qk_clip_tau:g})" if cfg.optimizer == "muonclip" and cfg.qk_clip_tau else "")
            + f"; up to {cfg.max_steps} steps x {cfg.batch_size} rows of {cfg.seq_len}"
            + (" (packed)" if cfg.pack else " (unpacked)") + f"; held-out loss of the base {base_val:.4f}")
        enc = [v["train"] for v in data["stats"].values()]
        log(f"encoding: {sum(e['truncated'] for e in enc)} conversations cut after their last whole assistant turn "
            f"that fits, {sum(e['dropped'] for e in enc)} dropped (first assistant turn longer than seq_len + 1), "
            f"{sum(e['failed'] for e in enc)} failed to render")
    result = trainer.fit(resumed=ckpt is not None, stop_after=stop_after)
    if "stopped_at" in result:
        return result
    hf_dir = run_dir / "hf"
    export_hf(model, base, cfg, hf_dir)
    summary: dict[str, Any] = {}
    if is_main:
        summary = _finish(cfg, base, kind, data, trainer, base_val, hf_dir, log)
    if world > 1:
        torch.distributed.barrier()
    return summary


def _finish(cfg: SFTConfig, base, kind: str, data: dict, trainer, base_val: float, hf_dir: Path, log) -> dict:
    from openk2.sft.evaluate import single_call_tasks, tool_call_eval
    from openk2.sft.report import write_report
    from openk2.utils import atomic_write

    run_dir = cfg.run_dir
    pstats = packing_stats(data["train"], cfg.seq_len, cfg.batch_size, base.pad_id,
                           {k: float(v) for k, v in cfg.sources.items()}, cfg.seed)
    tasks = single_call_tasks(data["val_conversations"], cfg.eval_tasks) if cfg.eval_tasks else []
    evals: dict[str, Any] = {}
    if tasks:
        from openk2.serve.backends import load_chat_model

        t0 = time.perf_counter()
        evals["sft"] = tool_call_eval(load_chat_model(hf_dir), tasks, cfg.eval_max_tokens)
        if cfg.eval_base:
            base_spec = str(base.path / base.gguf_file) if base.gguf_file else str(base.path)
            evals["base"] = tool_call_eval(load_chat_model(base_spec), tasks, cfg.eval_max_tokens)
        evals["seconds"] = round(time.perf_counter() - t0, 1)
    val_loss = trainer.last_eval.get("val_loss")
    summary = {"run_dir": str(run_dir), "base": cfg.base, "format": kind, "steps": trainer.step,
               "tokens": trainer.tokens, "train_minutes": round(trainer.elapsed / 60, 2),
               "val_loss": val_loss, "base_val_loss": base_val, "hf_checkpoint": str(hf_dir),
               "packing": pstats, "data": data["counts"],
               "encoding": {k: {s: {x: v[s][x] for x in ("truncated", "dropped", "failed")} for s in v}
                            for k, v in data["stats"].items()},
               "tool_calls": {k: {x: y for x, y in v.items() if x != "samples"} if isinstance(v, dict) else v
                              for k, v in evals.items()}}
    trainer.write_metrics({"step": trainer.step, "final": True, "val_loss": val_loss})
    if cfg.plots:
        from openk2.train.plot import plot_run

        summary["plots"] = [str(p) for p in plot_run(run_dir)]
    write_report(run_dir, cfg, summary, evals)
    atomic_write(run_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
    log(f"trained on {trainer.tokens:,} assistant tokens in {trainer.step} steps, {trainer.elapsed / 60:.1f} min")
    log(f"held-out assistant-token loss {val_loss:.4f} (base {base_val:.4f}); HF checkpoint: {hf_dir}")
    if "sft" in evals:
        e, b = evals["sft"], evals.get("base")
        log(f"held-out single-call tool tasks ({e['tasks']}): parse+validate {e['valid_rate']:.1%}, exact match "
            f"{e['exact_rate']:.1%}" + (f" (base: {b['valid_rate']:.1%}, {b['exact_rate']:.1%})" if b else ""))
    log(f"report: {run_dir / 'report.md'}")
    return summary


def _build_optimizer(model, cfg: SFTConfig, ns_matmul: str):
    from openk2.train.pretrain import build_optimizer

    return build_optimizer(model, cfg, ns_matmul=ns_matmul)
