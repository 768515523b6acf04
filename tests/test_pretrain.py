"""Pre-training loop: learning, exact resumption, atomic checkpoints, bad input."""

import json
import subprocess
import sys

import pytest
import torch

from openk2.errors import CheckpointError, ConfigError
from openk2.model.transformer import K2ForCausalLM
from openk2.train.checkpoint import latest_checkpoint, load_model_weights, read_trainer_state
from openk2.train.pretrain import TrainConfig, pretrain
from openk2.train.schedule import wsd_lr


@pytest.fixture()
def data_dir(tiny_data_dir):
    return tiny_data_dir


def _cfg(tmp_path, data_dir, **kw):
    base = dict(preset="k2-nano", runs_dir=str(tmp_path / "runs"), data_dir=str(data_dir), corpus="tiny",
                vocab_size=1024, seq_len=32, batch_size=8, max_steps=6, val_every=3, val_batches=2, ckpt_every=3,
                optimizer="adamw", lr=3e-3, progress=False, plots=False, dtype="float32", time_budget_min=None)
    base.update(kw)
    return TrainConfig(**base)


def _losses(run_dir):
    return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()
            if "loss" in json.loads(line)]


def test_wsd_schedule_shape():
    lrs = [wsd_lr(s, 100, 1.0, 10, 0.3, 0.1) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(x == 1.0 for x in lrs[10:70])
    assert lrs[-1] == pytest.approx(0.1, abs=0.01) and lrs[80] < 1.0
    assert all(a >= b for a, b in zip(lrs[70:], lrs[71:]))


@pytest.mark.parametrize("optimizer", ["adamw", "muonclip"])
def test_resume_reproduces_uninterrupted_losses(tmp_path, data_dir, optimizer):
    pytest.importorskip("openk2.optim", reason="optimizer package")
    if optimizer == "muonclip":
        pytest.importorskip("openk2.optim.muonclip")
    full = _cfg(tmp_path, data_dir, run_name="full", optimizer=optimizer)
    pretrain(full, log=lambda *a: None)
    cut = _cfg(tmp_path, data_dir, run_name="cut", optimizer=optimizer)
    assert pretrain(cut, log=lambda *a: None, stop_after=4) == {"stopped_at": 4}  # dies after step 4, ckpt at 3
    pretrain(cut, log=lambda *a: None)
    a, b = _losses(full.run_dir), _losses(cut.run_dir)
    assert len(a) == len(b) == 6
    assert a == b  # bit-exact on CPU
    sa, sb = _final_weights(full), _final_weights(cut)
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def _final_weights(cfg):
    import openk2

    ckpt = latest_checkpoint(cfg.run_dir)
    assert ckpt.name == f"step_{cfg.max_steps:07d}"
    model = K2ForCausalLM(openk2.from_pretrained(cfg.run_dir / "hf").config, init_weights=False)
    load_model_weights(ckpt, model)
    return model.state_dict()


def test_training_beats_unigram_and_exports_hf(tmp_path, data_dir):
    import openk2

    cfg = _cfg(tmp_path, data_dir, run_name="learn", max_steps=120, val_every=60, ckpt_every=60, lr=5e-3,
               batch_size=16, seq_len=64,
               plots=True)
    summary = pretrain(cfg, log=lambda *a: None)
    assert summary["val_loss"] < summary["unigram_baseline"] - 0.2
    model = openk2.from_pretrained(summary["hf_checkpoint"])
    assert model.config.vocab_size == 1024
    assert {p.split("/")[-1] for p in summary["plots"]} >= {"loss.png", "max_logit.png", "expert_load.png"}
    rows = [json.loads(x) for x in (cfg.run_dir / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "loss" in r]
    for key in ("lr", "grad_norm", "tokens_per_s", "mfu", "max_logit_per_layer", "expert_load_max_over_mean"):
        assert key in train_rows[-1]
    assert len(train_rows[-1]["max_logit_per_layer"]) == model.config.num_hidden_layers


def test_corrupted_checkpoint_is_reported(tmp_path, data_dir):
    cfg = _cfg(tmp_path, data_dir, run_name="bad", max_steps=3)
    pretrain(cfg, log=lambda *a: None)
    ck = cfg.run_dir / "checkpoints" / "step_0000003"
    tr = ck / "trainer.pt"
    good = tr.read_bytes()
    tr.write_bytes(good[:1000])
    with pytest.raises(CheckpointError, match="step_0000003"):
        read_trainer_state(ck)
    with pytest.raises(CheckpointError, match="step_0000003"):
        pretrain(cfg, log=lambda *a: None)
    tr.write_bytes(good)  # now truncate a tensor shard instead
    shard = next(ck.glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:2000])
    with pytest.raises(CheckpointError, match="step_0000003"):
        pretrain(cfg, log=lambda *a: None)


def test_interrupted_save_leaves_no_checkpoint(tmp_path, data_dir):
    """A step_N.tmp directory (a save that died before its rename) is never taken for a checkpoint."""
    cfg = _cfg(tmp_path, data_dir, run_name="tmp", max_steps=3)
    pretrain(cfg, log=lambda *a: None)
    ck = latest_checkpoint(cfg.run_dir)
    (ck.parent / "step_0000009.tmp").mkdir()
    assert latest_checkpoint(cfg.run_dir) == ck


def test_changed_settings_refuse_to_resume(tmp_path, data_dir):
    cfg = _cfg(tmp_path, data_dir, run_name="chg", max_steps=3)
    pretrain(cfg, log=lambda *a: None)
    with pytest.raises(ConfigError, match="seq_len"):
        pretrain(_cfg(tmp_path, data_dir, run_name="chg", max_steps=3, seq_len=64), log=lambda *a: None)


@pytest.mark.parametrize("flags,needle", [
    (["--preset", "k2-huge"], "unknown preset"),
    (["--lr", "-1"], "'lr'"),
    (["--batch-size", "6", "--grad-accum", "4"], "grad_accum"),
    (["--config", "/nonexistent.json"], "nonexistent.json"),
])
def test_cli_bad_input_exits_2_with_one_line(flags, needle, tmp_path):
    r = subprocess.run([sys.executable, "-m", "openk2.cli", "pretrain", "--runs-dir", str(tmp_path), *flags],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert needle in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert "Traceback" not in r.stderr


def test_export_cli_writes_loadable_hf_dir(tmp_path, data_dir):
    import openk2

    cfg = _cfg(tmp_path, data_dir, run_name="exp", max_steps=3)
    pretrain(cfg, log=lambda *a: None)
    out = tmp_path / "exported"
    r = subprocess.run([sys.executable, "-m", "openk2.cli", "export", str(cfg.run_dir), str(out)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "step 3" in r.stdout
    a, b = openk2.from_pretrained(out), openk2.from_pretrained(cfg.run_dir / "hf")
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert (out / "tokenizer.json").exists()


def test_adamw_baseline_and_muonclip_decay_the_same_parameters():
    """The Muon-vs-AdamW comparison changes the optimizer only: both skip decay on norms and biases."""
    from openk2.model.config import get_preset
    from openk2.model.transformer import build_model
    from openk2.train.pretrain import build_optimizer

    model = build_model(get_preset("k2-nano"))

    def decay_of(opt):
        return {id(p): g["weight_decay"] for g in opt.param_groups for p in g["params"]}

    a = decay_of(build_optimizer(model, TrainConfig(optimizer="adamw", weight_decay=0.1)))
    m = decay_of(build_optimizer(model, TrainConfig(optimizer="muonclip", weight_decay=0.1)))
    assert a == m
    names = {id(p): n for n, p in model.named_parameters()}
    assert {names[i] for i, wd in a.items() if wd == 0} == {n for n, p in model.named_parameters() if p.dim() < 2}
    assert sum(wd > 0 for wd in a.values()) > 0


def _simulate(budget, step_s, eval_s=2.0, max_steps=400, val_every=150):
    from openk2.train.schedule import StepBudget

    b = StepBudget(max_steps, 20, 0.35, budget, val_every=val_every)
    elapsed, step, lrs = 0.0, 0, []
    while step < b.total_steps:
        lrs.append(wsd_lr(step, b.total_steps, 1.0, 20, 0.35, 0.1))
        elapsed += step_s
        step += 1
        if step % val_every == 0 or step == b.total_steps:
            elapsed += eval_s
            b.record_eval(eval_s)
        b.update(step, elapsed)
    return b, elapsed, lrs


def test_time_budget_places_the_decay_from_throughput():
    # a fast machine trains every step, exactly as without a budget
    b, elapsed, lrs = _simulate(budget=720, step_s=0.9)
    assert b.total_steps == 400 and lrs == [wsd_lr(s, 400, 1.0, 20, 0.35, 0.1) for s in range(400)]
    # a 4x slower one stops the stable phase early, still ends with the full decay, and ends near the budget
    b, elapsed, lrs = _simulate(budget=720, step_s=3.6)
    assert 180 <= b.total_steps <= 200 and b.fixed
    assert elapsed <= 720 + 2.0 + 3.6  # at most the first evaluation (unmeasured when the plan was fixed) over
    assert lrs[-1] == pytest.approx(0.1, abs=0.02) and max(lrs) == 1.0
    decay = [x for x in lrs if x < 1.0][20:]
    assert all(a >= b for a, b in zip(decay, decay[1:]))  # the decay is monotone: no restart of the plan


def test_time_budget_end_to_end_stops_early(tmp_path, data_dir):
    """A budget far below max_steps' time: the run ends early, with the decay, and says how far it got."""
    cfg = _cfg(tmp_path, data_dir, run_name="budget", max_steps=100000, val_every=1000, ckpt_every=1000,
               time_budget_min=0.1)
    lines = []
    summary = pretrain(cfg, log=lines.append)
    assert 5 < summary["steps"] < 100000 and summary["tokens"] == summary["steps"] * 8 * 32
    assert summary["train_minutes"] < 0.1 * 1.5
    assert any(f"trained on {summary['tokens']:,} tokens in {summary['steps']} steps" in x for x in lines)
    rows = [json.loads(x) for x in (cfg.run_dir / "metrics.jsonl").read_text().splitlines() if '"lr"' in x]
    assert rows[-1]["lr"] < 0.2 * 3e-3  # it decayed to near the final lr


def test_every_setting_has_one_flag_and_flags_override_the_config_file(tmp_path):
    import argparse
    import dataclasses

    from openk2.train.config import add_config_flags, config_from_args

    p = argparse.ArgumentParser()
    p.add_argument("--config")
    add_config_flags(p)
    dests = [a.dest for a in p._actions if a.dest not in ("help", "config")]
    assert sorted(dests) == sorted(f.name for f in dataclasses.fields(TrainConfig))
    f = tmp_path / "c.json"
    f.write_text(json.dumps({"lr": 0.01, "seq_len": 64, "qk_clip_tau": 0, "betas": [0.8, 0.9]}))
    cfg = config_from_args(p.parse_args(["--config", str(f), "--lr", "0.02", "--steps", "7", "--no-progress",
                                         "--model-overrides", '{"num_hidden_layers": 2}']))
    assert (cfg.lr, cfg.seq_len, cfg.max_steps, cfg.progress, cfg.qk_clip_tau) == (0.02, 64, 7, False, None)
    assert cfg.betas == (0.8, 0.9) and cfg.model_overrides == {"num_hidden_layers": 2}
    assert config_from_args(p.parse_args([])) == TrainConfig()


def test_rerunning_a_finished_run_prints_the_same_result(tmp_path, data_dir):
    cfg = _cfg(tmp_path, data_dir, run_name="again", max_steps=3)
    first = pretrain(cfg, log=lambda *a: None)
    lines = []
    second = pretrain(cfg, log=lines.append)  # resumes at the last step: nothing to train
    assert second["val_loss"] == first["val_loss"] and second["steps"] == 3
    assert any("validation loss" in x for x in lines)
    finals = [x for x in (cfg.run_dir / "metrics.jsonl").read_text().splitlines() if '"final": true' in x]
    assert len(finals) == 1


def test_checkpoint_keeps_fp32_optimizer_state_of_bf16_parameters(tmp_path):
    """DCP casts into its load target: targets take the saved dtype, so fp32 masters and moments stay fp32."""
    from torch import nn

    from openk2.optim import MuonClip
    from openk2.train.checkpoint import load_training_state, save_training_state

    def make():
        torch.manual_seed(0)
        m = nn.Sequential(nn.Linear(16, 16, bias=False), nn.LayerNorm(16)).to(torch.bfloat16)
        return m, MuonClip(m.named_parameters(), lr=1e-2, master_weights=True)

    model, opt = make()
    model(torch.randn(4, 16, dtype=torch.bfloat16)).float().pow(2).sum().backward()
    opt.step()
    saved = {id(p): {k: v.clone() for k, v in s.items()} for p, s in opt.state.items()}
    assert any(v.dtype == torch.float32 and v.dim() > 0 for s in saved.values() for v in s.values())
    save_training_state(tmp_path / "step_0000001", model, opt, {"step": 1, "data": {}, "train_config": {}})
    model2, opt2 = make()
    load_training_state(tmp_path / "step_0000001", model2, opt2)
    for (p, s), p2 in zip(opt.state.items(), [q for g in opt2.param_groups for q in g["params"]]):
        for k, v in s.items():
            w = opt2.state[p2][k]
            assert w.dtype == v.dtype and torch.equal(w.cpu(), v.cpu()), k
