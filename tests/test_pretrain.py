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
