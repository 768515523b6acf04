"""K2-style pre-training (report §2): MuonClip, WSD schedule, packed multi-domain data.

`pretrain(cfg)` runs the whole job: it prepares the tokenizer and token
shards if needed, builds the model and the optimizer, and hands them to the
shared `Trainer` (openk2.train.trainer: the step, validation, sharded
resumable checkpoints, metrics, progress), then exports an HF-format
checkpoint and draws the curves. The same code runs under torchrun (FSDP2
data parallel + expert parallel, see parallel.py).
"""

from __future__ import annotations

import json
import math

import torch

from openk2.errors import ConfigError
from openk2.model.config import K2Config, get_preset
from openk2.model.transformer import K2ForCausalLM, build_model
from openk2.train.checkpoint import latest_checkpoint, read_trainer_state
from openk2.train.config import TrainConfig
from openk2.train.flops import train_flops_per_token
from openk2.train.parallel import rank_world as _dist
from openk2.train.trainer import Trainer, resolve_precision

__all__ = ["TrainConfig", "pretrain", "prepare_data", "model_config", "build_optimizer", "latest_checkpoint"]

# settings a resumed run must share with the checkpoint it resumes
RESUME_MUST_MATCH = ("preset", "model_overrides", "seq_len", "batch_size", "optimizer", "corpus", "vocab_size",
                     "max_steps")


# ------------------------------------------------------------------ helpers
def prepare_data(cfg: TrainConfig, progress: bool = True):
    """Tokenizer + token shards for cfg (built once, reused by later runs). Returns (tokenizer, data_dir)."""
    from openk2.data.dataset import build_dataset
    from openk2.data.tokenizer import load_tokenizer, train_tokenizer

    data_dir = cfg.resolved_data_dir()
    tok_dir = data_dir / "tokenizer"
    rank, world = _dist()
    if rank == 0:
        if not (tok_dir / "tokenizer.json").exists():
            tok, _ = train_tokenizer(cfg.corpus, cfg.vocab_size, weights=cfg.mixture)
            tok.save(tok_dir)
        tok = load_tokenizer(tok_dir)
        build_dataset(data_dir, tok, cfg.corpus, progress=progress)
    if world > 1:
        torch.distributed.barrier()
    tok = load_tokenizer(tok_dir)
    return tok, data_dir


def model_config(cfg: TrainConfig, tokenizer) -> K2Config:
    mc = get_preset(cfg.preset)
    changes = dict(cfg.model_overrides)
    changes.setdefault("vocab_size", tokenizer.vocab_size)
    changes.setdefault("bos_token_id", tokenizer.bos_id)
    changes.setdefault("eos_token_id", tokenizer.eos_id)
    changes.setdefault("pad_token_id", tokenizer.pad_id)
    changes.setdefault("max_position_embeddings", max(mc.max_position_embeddings, cfg.seq_len))
    if cfg.router_bias_update_rate is not None:
        changes["router_bias_update_rate"] = cfg.router_bias_update_rate
    try:
        return mc.replace(**changes)
    except TypeError as e:
        raise ConfigError(f"model_overrides: {e}") from None


def _no_decay(p: torch.Tensor) -> bool:
    """Norm gains and biases (fewer than 2 dims) take no weight decay, under either optimizer."""
    return p.dim() < 2


def build_optimizer(model: K2ForCausalLM, cfg: TrainConfig, ns_matmul: str = "auto"):
    """AdamW (the baseline) or MuonClip; both decay matrices, embeddings and the head, not norms or biases.

    `ns_matmul`: Newton-Schulz arithmetic ("auto" measures; the trainer passes the run's fixed choice).
    """
    if cfg.optimizer == "adamw":
        decay = [p for p in model.parameters() if p.requires_grad and not _no_decay(p)]
        no_decay = [p for p in model.parameters() if p.requires_grad and _no_decay(p)]
        return torch.optim.AdamW(
            [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=cfg.lr, betas=cfg.betas, eps=1e-8)
    from openk2.optim import MuonClip

    return MuonClip.for_model(  # its default partition skips decay on < 2-D parameters too
        model, lr=cfg.lr, weight_decay=cfg.weight_decay, momentum=cfg.momentum, betas=cfg.betas,
        qk_clip_tau=cfg.qk_clip_tau, qk_clip_alpha=cfg.qk_clip_alpha, ns_dtype=getattr(torch, cfg.muon_ns_dtype),
        ns_matmul=ns_matmul)


def validation_fn(data_dir, cfg: TrainConfig):
    """Mean next-token loss over `cfg.val_batches` fixed batches of the validation split (all ranks)."""
    from openk2.data.packing import PackedDataset

    def evaluate(trainer: Trainer) -> dict:
        rank, world = trainer.rank, trainer.world
        val = PackedDataset(data_dir, "val", cfg.seq_len, cfg.mixture, seed=1234, rank=rank, world_size=world)
        bs = max(world, min(cfg.batch_size, 16) // world * world)
        total, n = 0.0, 0
        it = val.batches(bs)
        for _ in range(cfg.val_batches):
            batch = next(it).to(trainer.device)
            loss, k = trainer.loss_fn(trainer.model, batch)
            total += loss.item() * k
            n += k
        if world > 1:
            t = torch.tensor([total, n], dtype=torch.float64, device=trainer.device)
            torch.distributed.all_reduce(t)
            total, n = float(t[0]), float(t[1])
        return {"val_loss": total / n}

    return evaluate


def _check_resumable(ckpt, state: dict, cfg: TrainConfig) -> None:
    saved = TrainConfig.from_dict(state["train_config"])
    for k in RESUME_MUST_MATCH:
        if getattr(saved, k) != getattr(cfg, k):
            raise ConfigError(f"{ckpt}: run was started with {k}={getattr(saved, k)!r}, now {getattr(cfg, k)!r}; "
                              f"use another --name or remove {cfg.run_dir}")


def pretrain(cfg: TrainConfig, resume: bool = True, log=print, stop_after: int | None = None) -> dict:
    """Run (or resume) a pre-training job; returns the final summary dict.

    `stop_after` ends the process's work after that many steps as if it had
    been killed (the last checkpoint stays; used to test resumption).
    """
    from openk2.data.packing import PackedDataset
    from openk2.train.parallel import gather_model_state, maybe_parallelize

    cfg.validate()
    rank, world = _dist()
    is_main = rank == 0
    if not resume and is_main and (cfg.run_dir / "checkpoints").exists():
        import shutil

        shutil.rmtree(cfg.run_dir / "checkpoints")
    if world > 1:
        torch.distributed.barrier()
    ckpt = latest_checkpoint(cfg.run_dir) if resume else None
    saved_precision = None
    if ckpt is not None:
        saved = read_trainer_state(ckpt)
        _check_resumable(ckpt, saved, cfg)
        saved_precision = saved.get("precision")
    if is_main:
        from openk2.utils import atomic_write

        atomic_write(cfg.run_dir / "train_config.json", json.dumps(cfg.to_dict(), indent=2) + "\n")

    tok, data_dir = prepare_data(cfg, progress=cfg.progress and is_main)
    torch.manual_seed(cfg.seed)
    mcfg = model_config(cfg, tok)
    model = build_model(mcfg)
    if cfg.recompute != "none":
        model.set_recompute(cfg.recompute)
    model = maybe_parallelize(model)
    model.train()
    model.set_track_max_logit(cfg.track_max_logit or (cfg.optimizer == "muonclip" and cfg.qk_clip_tau is not None))
    precision = resolve_precision(cfg, next(model.parameters()).device, saved_precision)
    opt = build_optimizer(model, cfg, ns_matmul=precision["ns_matmul"])
    data = PackedDataset(data_dir, "train", cfg.seq_len, cfg.mixture, seed=cfg.seed, rank=rank, world_size=world)
    trainer = Trainer(model, opt, cfg, data, evaluate_fn=validation_fn(data_dir, cfg),
                      flops_per_token=train_flops_per_token(mcfg, cfg.seq_len), precision=precision, name="pretrain")
    if ckpt is not None:
        trainer.load(ckpt)
        if is_main:
            log(f"resumed from {ckpt} at step {trainer.step}")
    if is_main:
        n = model.num_parameters() if hasattr(model, "num_parameters") else {}
        budget = f"; time budget {cfg.time_budget_min:g} min" if cfg.time_budget_min else ""
        log(f"model {cfg.preset}: {n.get('total', 0):,} parameters ({n.get('activated', 0):,} activated), "
            f"vocab {mcfg.vocab_size}; optimizer {cfg.optimizer}"
            + (f" (QK-Clip tau={cfg.qk_clip_tau:g})" if cfg.optimizer == "muonclip" and cfg.qk_clip_tau else "")
            + f"; up to {cfg.max_steps} steps x {cfg.batch_size * cfg.seq_len:,} tokens{budget}; "
              f"{precision['dtype']} matmuls" + (f", Newton-Schulz {_ns_words(cfg, precision)}"
                                                 if cfg.optimizer == "muonclip" else "") + f"; world size {world}")
    result = trainer.fit(resumed=ckpt is not None, stop_after=stop_after)
    if "stopped_at" in result:
        return result
    final_state = gather_model_state(model)  # a collective: every rank takes part
    summary = {}
    if is_main:
        summary = _finish(final_state, tok, data_dir, cfg, mcfg, trainer, log)
    if world > 1:
        torch.distributed.barrier()
    return summary


def _ns_words(cfg: TrainConfig, precision: dict) -> str:
    if cfg.muon_ns_dtype == "float32":
        return "in fp32"
    return "in bf16" + (" matmuls" if precision["ns_matmul"] == "native" else " values on fp32 matmuls")


def _finish(model_state, tok, data_dir, cfg: TrainConfig, mcfg: K2Config, trainer: Trainer, log) -> dict:
    from openk2.data.dataset import unigram_baseline
    from openk2.utils import atomic_write

    val_loss = trainer.last_eval.get("val_loss")
    hf_dir = cfg.run_dir / "hf"
    export = K2ForCausalLM(mcfg, init_weights=False)
    export.load_state_dict(model_state, strict=False)
    export.reset_buffers()
    export.save_pretrained(hf_dir)
    tok.save(hf_dir)
    base = unigram_baseline(data_dir, "val", cfg.mixture)
    summary = {"run_dir": str(cfg.run_dir), "steps": trainer.step, "tokens": trainer.tokens,
               "train_minutes": round(trainer.elapsed / 60, 2), "val_loss": val_loss, "unigram_baseline": base,
               "val_ppl": math.exp(val_loss) if val_loss is not None else None, "hf_checkpoint": str(hf_dir)}
    trainer.write_metrics({"step": trainer.step, "final": True, "val_loss": val_loss, "unigram_baseline": base})
    atomic_write(cfg.run_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
    if cfg.plots:
        from openk2.train.plot import plot_run

        summary["plots"] = [str(p) for p in plot_run(cfg.run_dir)]
    short = "" if trainer.step == cfg.max_steps else f" (time budget: {cfg.max_steps} planned)"
    log(f"trained on {trainer.tokens:,} tokens in {trainer.step} steps{short}, {trainer.elapsed / 60:.1f} min")
    val = f"{val_loss:.4f}" if val_loss is not None else "n/a"
    log(f"validation loss {val} nats/token (unigram baseline {base:.4f}); HF checkpoint: {hf_dir}")
    return summary
