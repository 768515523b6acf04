"""Rephrasing vs repetition at an equal token budget (report Table 2 in miniature).

K2's Table 2 (SimpleQA accuracy): raw wiki-text for 10 epochs 23.76; one
rephrasing for 10 epochs 27.39; ten rephrasings for 1 epoch 28.94. Here the
knowledge is a generated set of fictional people (deterministic from a seed),
each with four attributes (birth city, birth year, profession, employer),
written as a short raw biography. The rephrasings come from the rephrasing
pipeline (:mod:`openk2.rephrase`) run on those biographies with an LLM
(offline default: SmolLM2-135M-Instruct in process); the fidelity gate is the
pipeline's model-free checks, the LLM judge's verdicts are recorded, and both
are compared with the ground truth (every attribute value present in the
rewrite), which only a generated corpus makes possible.

Arms, all trained from scratch for the same number of tokens (same steps,
batch and sequence length), so the epochs differ:

* ``raw``: the raw biographies, repeated;
* ``one``: one kept rephrasing per person (the raw biography where none was kept), repeated;
* ``many``: every kept rephrasing (up to ``rephrasings`` per person), each fewer times;
* ``template`` (control): ``rephrasings`` template rewrites per person (perfect fidelity, shallow diversity).

Probes rank the true attribute value among all values of that attribute
(12 candidates: chance 1/12) by the model's log-probability, after a prompt in
two formats: the raw biography's own wording ("statement") and a question
("question"). Held-out people's raw biographies are every arm's validation set.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass
from pathlib import Path

from openk2.experiments.analysis import fmt_pm, mean_std
from openk2.experiments.common import Run, Runner, Scale, md_table, pyplot, save_fig

NAME = "rephrase"
TITLE = "Rephrasing vs repetition at an equal token budget (report Table 2 in miniature)"

CITIES = ["Port Amsel", "Vessary", "Caldor", "Brenmoor", "Talwick", "Orsino Bay", "Kestrel Ford", "Mirefield",
          "Dunhollow", "Lark Harbour", "Silvane", "Quorra"]
YEARS = ["1812", "1827", "1835", "1843", "1856", "1861", "1874", "1888", "1895", "1903", "1916", "1929"]
PROFESSIONS = ["glassblower", "cartographer", "beekeeper", "clockmaker", "astronomer", "shipwright", "botanist",
               "violinist", "stonemason", "archivist", "perfumer", "falconer"]
EMPLOYERS = ["the Meridian Company", "the Halvard Works", "the Crown Observatory", "the Ostrel Guild",
             "the Baywater Trust", "the Norrin Foundry", "the Elmstead Press", "the Corvane Institute",
             "the Tessaly Mill", "the Ashgrove Library", "the Pellham Yard", "the Varda Conservatory"]
ATTRIBUTES = {"city": CITIES, "year": YEARS, "profession": PROFESSIONS, "employer": EMPLOYERS}
_SYL = ["zor", "van", "kel", "tiq", "mar", "en", "os", "lia", "dra", "bel", "tor", "vin", "ra", "sel", "quin", "ta",
        "dor", "mi", "ka", "lun", "fen", "ri", "gal", "eth", "nor", "sa", "bri", "ul", "hes", "pa"]

# the raw biography and the probes
RAW = ("{name} was born in {year} in {city}. {name} worked as a {profession} for {employer}.")
STATEMENT = {"city": "{name} was born in {year} in", "year": "{name} was born in",
             "profession": "{name} worked as a", "employer": "{name} worked as a {profession} for"}
QUESTION = {"city": "Question: In which city was {name} born? Answer:",
            "year": "Question: In which year was {name} born? Answer:",
            "profession": "Question: What was the profession of {name}? Answer: a",
            "employer": "Question: Who employed {name}? Answer:"}
TEMPLATES = [
    "Born in {city} in {year}, {name} became a {profession} and was employed by {employer}.",
    "{employer} employed {name}, a {profession} who was born in {city} in the year {year}.",
    "Q: Where was {name} born? A: In {city}, in {year}. "
    "Q: What did {name} do? A: {name} was a {profession} at {employer}.",
    "The {profession} {name} came from {city}, where {name} was born in {year}; later {name} worked for {employer}.",
    "In {year}, {name} was born in {city}. As an adult, {name} joined {employer} as a {profession}.",
    "- {name}\n- born: {year}, {city}\n- profession: {profession}\n- employer: {employer}",
    "{name}, who worked for {employer} as a {profession}, was a native of {city} and was born in {year}.",
    "Student: Who was {name}? Teacher: A {profession} born in {city} in {year} who worked for {employer}.",
    "I am {name}. I was born in {city} in {year}, and I work as a {profession} for {employer}.",
    "Records of {employer} list {name} as a {profession}; {name} was born in {year} in the town of {city}.",
]


@dataclass
class Settings(Scale):
    preset: str = "k2-nano"
    seq_len: int = 64
    batch_size: int = 16
    steps: int = 240
    lr: float = 3e-3
    vocab_size: int = 2048
    val_every: int = 40
    val_batches: int = 4
    seeds: tuple[int, ...] = (0, 1)
    entities: int = 20  # people whose facts are probed
    heldout: int = 6  # people whose raw biographies are the validation set
    rephrasings: int = 4  # asked per person (the "many" arm keeps those that pass the checks)
    llm: str = "smollm2"  # the rephrasing model: smollm2 (offline) or an OpenAI-compatible endpoint URL
    judge: str = "record"  # the pipeline's judge policy (SmolLM2 as a judge: verdicts recorded, not gating)
    retries: int = 1
    temperature: float = 0.6
    max_length_ratio: float = 4.0  # a 30-token biography may grow 4x as a dialogue or Q&A
    gen_concurrency: int = 16
    arms: tuple[str, ...] = ("raw", "one", "many", "template")
    world_seed: int = 0
    # each arm's documents are written this many times, each copy in its own shuffled order: the packer cuts a
    # stream into fixed windows, and a tiny corpus repeated as one stream would be memorised as windows, not facts
    doc_copies: int = 32


def default_settings() -> Settings:
    return Settings()


def quick_settings() -> Settings:
    return Settings(vocab_size=512, seq_len=32, batch_size=4, steps=6, val_every=3, val_batches=1, dtype="float32",
                    seeds=(0,), entities=6, heldout=3, rephrasings=2, gen_concurrency=8, doc_copies=2)


# ------------------------------------------------------------------------------------------------ the world
def make_people(n: int, seed: int) -> list[dict]:
    """`n` fictional people with unique names and attributes drawn from the pools, deterministic from `seed`."""
    rng = random.Random(seed)
    people, names = [], set()
    while len(people) < n:
        first = "".join(rng.sample(_SYL, 2)).capitalize()
        last = "".join(rng.sample(_SYL, 2)).capitalize()
        name = f"{first} {last}"
        if name in names:
            continue
        names.add(name)
        people.append({"name": name, **{k: rng.choice(v) for k, v in ATTRIBUTES.items()}})
    return people


def raw_bio(p: dict) -> str:
    return RAW.format(**p)


def template_bios(p: dict, n: int) -> list[str]:
    h = int(hashlib.sha256(p["name"].encode()).hexdigest()[:8], 16)
    return [TEMPLATES[(h + k) % len(TEMPLATES)].format(**p) for k in range(n)]


def facts_present(p: dict, text: str) -> dict[str, bool]:
    """Ground truth fidelity: which attribute values (and the full name) a rewrite states verbatim."""
    t = text.lower()
    out = {k: p[k].lower().removeprefix("the ") in t for k in ATTRIBUTES}
    out["name"] = p["name"].lower() in t
    return out


# ------------------------------------------------------------------------------------------------ rephrasing
def rephrase_people(s: Settings, people: list[dict], out_dir: Path, log) -> tuple[dict[int, list[dict]], dict]:
    """Kept rewrites per person from the pipeline (cached in out_dir: a rerun makes no LLM call), and statistics."""
    from openk2.llm import make_client
    from openk2.rephrase import Rephraser, RephraseConfig, SourceDoc, read_output

    from openk2.rephrase import CheckConfig

    cfg = RephraseConfig(mode="knowledge", rephrasings=s.rephrasings, chunk_tokens=256, retries=s.retries,
                         judge=s.judge, temperature=s.temperature, seed=s.world_seed, concurrency=s.gen_concurrency,
                         judge_max_tokens=64, output_ratio=s.max_length_ratio - 0.5,
                         checks=CheckConfig(max_length_ratio=s.max_length_ratio))
    docs = [SourceDoc(f"person-{i}", raw_bio(p), "text", "people") for i, p in enumerate(people)]
    summary_path = out_dir / "summary.json"
    done = summary_path.exists() and json.loads(summary_path.read_text()).get("rewrites") == len(docs) * s.rephrasings \
        and (out_dir / "config.json").exists() \
        and json.loads((out_dir / "config.json").read_text()).get("fingerprint") == cfg.fingerprint()
    if done:
        summary = json.loads(summary_path.read_text())
        log(f"rephrasings: cached in {out_dir} ({summary['kept']} kept of {summary['rewrites']})")
    else:
        if s.llm.startswith(("http://", "https://")):
            client = make_client(s.llm, max_concurrency=s.gen_concurrency, cache_dir=out_dir / "llm-cache")
            count = lambda t: len(t.split()) * 4 // 3 + 1  # noqa: E731  (only decides chunking: a bio is one chunk)
        else:
            log(f"rephrasings: {len(docs)} people x {s.rephrasings} with {s.llm} (in process) ...")
            client = make_client(s.llm, cache_dir=out_dir / "llm-cache", max_batch_size=s.gen_concurrency)
            count = None
        summary = Rephraser(client, cfg, out_dir, count_tokens=count, domain="text-rephrased",
                            progress=True, log=log).run(docs).as_dict()
    kept: dict[int, list[dict]] = {}
    for r in read_output(out_dir):
        kept.setdefault(int(r["source_id"].split("-")[1]), []).append(r)
    # ground truth: each kept rewrite's facts, and how the judge's verdicts line up with them
    stats = {"summary": summary, "kept_per_person": [len(kept.get(i, [])) for i in range(len(people))]}
    exact, judged = [], {"faithful": [0, 0], "other": [0, 0]}  # [all facts present, not]
    for i, rs in kept.items():
        for r in sorted(rs, key=lambda r: r["rephrasing_index"]):
            fp = facts_present(people[i], r["text"])
            ok = all(fp.values())
            exact.append(ok)
            judged["faithful" if r["fidelity"]["judge"] == "faithful" else "other"][0 if ok else 1] += 1
    stats["kept_with_all_facts"] = sum(exact)
    stats["kept"] = len(exact)
    stats["judge_vs_truth"] = judged
    return kept, stats


# ------------------------------------------------------------------------------------------------ corpus
def _pick_id(domain: str, base: str, want: str, val_fraction: float, source: str) -> str:
    """An id starting with `base` whose provenance hash puts the document in split `want`."""
    from openk2.data.corpus import Document, split_of

    for k in range(10_000):
        i = base if k == 0 else f"{base}.{k}"
        if split_of(Document(domain, source, i, ""), val_fraction) == want:
            return i
    raise RuntimeError("no id lands in the split")  # pragma: no cover (probability ~0)


def build_arms(s: Settings, people: list[dict], heldout: list[dict], kept: dict[int, list[dict]],
               out_dir: Path) -> tuple[dict, dict[str, dict]]:
    """One JSONL per arm (a derived domain text-ARM) and the corpus config that holds them; per-arm statistics."""
    vf = 0.2
    arms: dict[str, list[tuple[str, str]]] = {a: [] for a in s.arms}
    info: dict[str, dict] = {}
    fallback = {"one": 0, "many": 0}
    for i, p in enumerate(people):
        texts = {
            "raw": [raw_bio(p)],
            "template": template_bios(p, s.rephrasings),
        }
        ks = [r["text"] for r in sorted(kept.get(i, []), key=lambda r: r["rephrasing_index"])]
        for arm, docs in (("one", ks[:1]), ("many", ks)):
            if not docs:
                fallback[arm] += 1
            texts[arm] = docs or [raw_bio(p)]
        for arm in s.arms:
            arms[arm] += [(f"p{i}-{k}", t) for k, t in enumerate(texts[arm])]
    files = {}
    data = out_dir / "arms"
    data.mkdir(parents=True, exist_ok=True)
    for arm, docs in arms.items():
        domain = f"text-{arm}"
        path = data / f"{arm}.jsonl"
        source = f"local:{path.name}"
        # copies in different orders: the corpus orders documents by a hash of their id, so each copy lands elsewhere
        lines = [{"id": _pick_id(domain, f"{i}~{c}", "train", vf, source), "text": t}
                 for c in range(s.doc_copies) for i, t in docs]
        lines += [{"id": _pick_id(domain, f"h{j}", "val", vf, source), "text": raw_bio(p)}
                  for j, p in enumerate(heldout)]
        path.write_text("".join(json.dumps(x, ensure_ascii=False) + "\n" for x in lines))
        files[domain] = [str(path.resolve())]
        info[arm] = {"train_docs": len(docs), "fallback_to_raw": fallback.get(arm, 0)}
    from openk2.data.corpus import CorpusConfig

    # the content's hash in the name: new rephrasings make a new corpus fingerprint (shards rebuilt, runs retrained)
    content = hashlib.sha256(b"".join(Path(f[0]).read_bytes() for f in files.values())).hexdigest()[:12]
    cfg = CorpusConfig(name=f"rephrase-experiment-{content}", shakespeare=False, bible=False, stdlib=False,
                       math_problems={},
                       evals_excerpts=False, local_files=files, val_fraction=vf, seed=s.world_seed)
    return cfg.to_dict(), info


def prepare_corpus(s: Settings, runner: Runner, corpus: dict):
    """The tokenizer (trained on every arm's train text) and the token shards, in runner.data_dir."""
    from openk2.data.dataset import build_dataset
    from openk2.data.tokenizer import load_tokenizer, train_tokenizer

    tok_dir = runner.data_dir / "tokenizer"
    weights = {d: 1.0 for d in corpus["local_files"]}
    fp = hashlib.sha256(json.dumps(corpus, sort_keys=True).encode()).hexdigest()
    stamp = runner.data_dir / "corpus.sha256"
    if not (tok_dir / "tokenizer.json").exists() or not stamp.exists() or stamp.read_text() != fp:
        tok, _ = train_tokenizer(corpus, s.vocab_size, weights=weights)
        tok.save(tok_dir)
        stamp.parent.mkdir(parents=True, exist_ok=True)
        stamp.write_text(fp)
    tok = load_tokenizer(tok_dir)
    index = build_dataset(runner.data_dir, tok, corpus, progress=False)
    runner._tokenizer = tok  # Runner.prepare: done
    return tok, index


# ------------------------------------------------------------------------------------------------ probes
def probe(run: Run, people: list[dict]) -> dict:
    """Top-1 accuracy of ranking the true value among all values of each attribute, per prompt format."""
    from openk2.data.tokenizer import load_tokenizer
    from openk2.model.transformer import build_model
    from openk2.train.checkpoint import list_checkpoints, load_model_weights
    from openk2.train.pretrain import TrainConfig, model_config

    cfg = TrainConfig.from_dict({k: v for k, v in run.config.items() if k != "analysis"})
    tok = load_tokenizer(Path(cfg.resolved_data_dir()) / "tokenizer")
    model = build_model(model_config(cfg, tok))
    load_model_weights(list_checkpoints(run.run_dir / "checkpoints")[-1], model)
    model.eval()
    out: dict = {}
    for fmt, prompts in (("statement", STATEMENT), ("question", QUESTION)):
        seqs, meta = [], []
        for pi, p in enumerate(people):
            for attr, pool in ATTRIBUTES.items():
                prompt = [tok.eos_id] + tok.encode(prompts[attr].format(**p))
                for ci, cand in enumerate(pool):
                    c = tok.encode(" " + cand)
                    seqs.append((prompt, c))
                    meta.append((pi, attr, ci))
        scores = _score(model, seqs, tok.pad_id)
        correct: dict[str, list[int]] = {a: [] for a in ATTRIBUTES}
        best: dict[tuple[int, str], tuple[float, int]] = {}
        for (pi, attr, ci), sc in zip(meta, scores):
            if (pi, attr) not in best or sc > best[(pi, attr)][0]:
                best[(pi, attr)] = (sc, ci)
        for (pi, attr), (_, ci) in best.items():
            correct[attr].append(int(ATTRIBUTES[attr][ci] == people[pi][attr]))
        out[fmt] = {a: sum(v) / len(v) for a, v in correct.items()}
        out[fmt]["all"] = sum(sum(v) for v in correct.values()) / sum(len(v) for v in correct.values())
    return out


def _score(model, seqs: list[tuple[list[int], list[int]]], pad_id: int, batch: int = 256) -> list[float]:
    """Sum of log-probabilities of each candidate's tokens after its prompt."""
    import torch

    scores: list[float] = []
    with torch.no_grad():
        for b in range(0, len(seqs), batch):
            chunk = seqs[b:b + batch]
            n = max(len(p) + len(c) for p, c in chunk)
            ids = torch.full((len(chunk), n), pad_id, dtype=torch.long)
            for r, (p, c) in enumerate(chunk):
                ids[r, :len(p) + len(c)] = torch.tensor(p + c)
            logp = torch.log_softmax(model(ids).logits.float(), dim=-1)
            for r, (p, c) in enumerate(chunk):
                pos = torch.arange(len(p) - 1, len(p) + len(c) - 1)
                scores.append(float(logp[r, pos, torch.tensor(c)].sum()))
    return scores


# ------------------------------------------------------------------------------------------------ the experiment
ARM_LABEL = {"raw": "raw x repeated", "one": "1 rephrasing x repeated", "many": "many rephrasings",
             "template": "template rewrites (control)"}


def run(s: Settings, runner: Runner) -> tuple[str, dict]:
    people_all = make_people(s.entities + s.heldout, s.world_seed)
    people, heldout = people_all[:s.entities], people_all[s.entities:]
    runner.out_dir.mkdir(parents=True, exist_ok=True)
    kept, gen = rephrase_people(s, people, runner.out_dir / "rephrasings", runner.log)
    corpus, arm_info = build_arms(s, people, heldout, kept, runner.out_dir)
    runner.data_dir = runner.out_dir / "data"
    _, index = prepare_corpus(s, runner, corpus)
    budget = s.steps * s.batch_size * s.seq_len
    for arm in s.arms:
        sh = index.shard("train", f"text-{arm}")
        arm_info[arm]["train_tokens"] = sh.num_tokens // s.doc_copies  # one copy
        arm_info[arm]["epochs"] = budget / arm_info[arm]["train_tokens"]
    runner.planned = len(s.arms) * len(s.seeds)
    runs: dict[str, list[Run]] = {a: [] for a in s.arms}
    for arm in s.arms:
        for seed in s.seeds:
            runs[arm].append(runner.run(
                f"{arm}-s{seed}", f"{ARM_LABEL[arm]} ({arm_info[arm]['epochs']:.1f} epochs) seed={seed}",
                keep_checkpoint_files=False, after=lambda r: probe(r, people), corpus=corpus,
                mixture={f"text-{arm}": 1.0}, seed=seed, ckpt_every=s.steps))
    return _report(s, runner, runs, arm_info, gen, budget)


def _report(s: Settings, runner: Runner, runs: dict[str, list[Run]], arm_info: dict, gen: dict,
            budget: int) -> tuple[str, dict]:
    chance = 1 / 12
    rows, res_arms = [], {}
    for arm, rs in runs.items():
        st = [r.config["analysis"]["statement"]["all"] for r in rs]
        qu = [r.config["analysis"]["question"]["all"] for r in rs]
        vl = [r.final_val_loss for r in rs]
        res_arms[arm] = {**arm_info[arm], "statement_acc": st, "question_acc": qu, "val_loss": vl,
                         "per_attribute": [r.config["analysis"] for r in rs]}
        rows.append([ARM_LABEL[arm], arm_info[arm]["train_docs"], arm_info[arm]["train_tokens"],
                     f"{arm_info[arm]['epochs']:.1f}", fmt_pm([100 * x for x in st], 1),
                     fmt_pm([100 * x for x in qu], 1),
                     fmt_pm(vl, 3), arm_info[arm].get("fallback_to_raw", 0)])
    summ = gen["summary"]
    jt = gen["judge_vs_truth"]
    kept_n = gen["kept"]
    gen_line = (f"Rephrasings: {summ['rewrites']} asked ({s.entities} people x {s.rephrasings}) from {summ['model']} "
                f"via `openk2.rephrase` (judge policy `{s.judge}`, {s.retries} retry); kept {summ['kept']} "
                f"({100 * summ['kept'] / max(1, summ['rewrites']):.0f}% pass the model-free fidelity checks); "
                f"dropped by "
                f"reason: {summ['dropped'] or 'none'}; failed tries: {summ['attempt_failures'] or 'none'}; "
                f"{summ['requests']} requests, {summ['tokens_in']:,} tokens in, {summ['tokens_out']:,} out, "
                f"{summ['seconds']:.0f} s (0 s when cached).")
    truth = (f"Ground truth on the kept rewrites: {gen['kept_with_all_facts']} of {kept_n} state all four "
             f"attributes and "
             f"the full name verbatim. Judge verdict vs truth: 'faithful' on {jt['faithful'][0]} correct and "
             f"{jt['faithful'][1]} incorrect rewrites; not 'faithful' on {jt['other'][0]} correct and "
             f"{jt['other'][1]} incorrect ones.")
    st = {a: mean_std(v["statement_acc"])[0] for a, v in res_arms.items()}
    qu = {a: mean_std(v["question_acc"])[0] for a, v in res_arms.items()}
    order = " > ".join(ARM_LABEL[a] for a in sorted(qu, key=lambda a: -qu[a]))
    body = [
        f"Knowledge: {s.entities} fictional people x 4 attributes (deterministic from seed {s.world_seed}); "
        f"probes rank the "
        f"true value among 12 (chance {100 * chance:.1f}%). Every arm trains {s.preset} for {s.steps} steps x "
        f"{s.batch_size} x {s.seq_len} = {budget:,} tokens; {len(s.seeds)} seed(s).",
        "",
        gen_line,
        "",
        truth,
        "",
        md_table(["arm", "train docs", "train tokens", "epochs", "statement-probe acc %", "question-probe acc %",
                  "val loss (held-out raw bios)", "people with no kept rewrite (raw used)"], rows),
        "",
        f"Question-probe ranking: {order}. The report's ordering is raw < 1 rephrasing x 10 < 10 rephrasings x 1.",
        "",
        "![probe accuracy](accuracy.png)",
        "",
        "![validation loss](loss.png)",
    ]
    _plots(runner, runs, chance)
    results = {"arms": res_arms, "generation": gen, "budget_tokens": budget, "chance": chance,
               "statement_mean": st, "question_mean": qu}
    return "\n".join(body), results


def _plots(runner: Runner, runs: dict[str, list[Run]], chance: float) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 4))
    arms = list(runs)
    w = 0.38
    for j, fmt in enumerate(("statement", "question")):
        means, errs = [], []
        for a in arms:
            m, sd = mean_std([100 * r.config["analysis"][fmt]["all"] for r in runs[a]])
            means.append(m)
            errs.append(sd)
        ax.bar([i + (j - 0.5) * w for i in range(len(arms))], means, w, yerr=errs, capsize=3, label=f"{fmt} probe")
    ax.axhline(100 * chance, color="k", ls="--", lw=1, label="chance")
    ax.set_xticks(range(len(arms)), [ARM_LABEL[a] for a in arms], fontsize=8)
    ax.set_ylabel("accuracy (%)")
    ax.set_title("fact probes at an equal token budget")
    ax.legend(fontsize=8)
    save_fig(fig, runner.out_dir / "accuracy.png")
    fig, ax = plt.subplots(figsize=(7, 4))
    for a in arms:
        for k, r in enumerate(runs[a]):
            t, v = r.val_curve()
            ax.plot(t, v, lw=1.2, color=f"C{arms.index(a)}", alpha=1 if k == 0 else 0.5,
                    label=ARM_LABEL[a] if k == 0 else None)
    ax.set_xlabel("training tokens")
    ax.set_ylabel("validation loss (held-out raw biographies)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    save_fig(fig, runner.out_dir / "loss.png")
