"""A small torch ancestral sampler with the visit grammar, for measuring training choices.

Not the serving engine (that is ``app/decoding`` over ONNX): this exists so that the training
ablation (co-occurrence regulariser, auxiliary heads, hierarchy) is judged by generation
fidelity, not only perplexity. Grammar: ``<s> (<v> code+ </v>)+ </s>``, no repeated code in a
visit, at most ``max_codes`` codes per visit and ``max_visits`` visits.

    python -m training.sample --preset demo /tmp/runs/demo /tmp/runs/demo-cooc
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from app.corpus import SEX_IDS, Patient
from app.vocab import Vocabulary
from training.dataset import TOKENS
from training.model import NEG_INF, HierBart

__all__ = ["main", "sample_patients"]


@torch.no_grad()
def sample_patients(model: HierBart, vocab: Vocabulary, demographics: list[tuple[float, str]],
                    seed: int = 0, batch_size: int = 256, max_visits: int = 20,
                    max_codes: int = 40) -> list[Patient]:
    model.eval()
    gen = torch.Generator().manual_seed(seed)
    out: list[Patient] = []
    n_special = TOKENS.n_special
    for start in range(0, len(demographics), batch_size):
        chunk = demographics[start: start + batch_size]
        b = len(chunk)
        age = torch.tensor([a for a, _ in chunk], dtype=torch.float32)
        sex = torch.tensor([SEX_IDS[s] for _, s in chunk])
        src = torch.tensor([[TOKENS.bos, TOKENS.eos]] * b)
        enc, mask = model.encode(src, torch.ones_like(src), age, sex)
        tokens = torch.full((b, 1), TOKENS.bos)
        lp, past = model.decode(tokens, age, sex, enc, mask)
        last = torch.full((b,), TOKENS.bos)
        in_visit = torch.zeros(b, len(vocab), dtype=torch.bool)
        n_in_visit = torch.zeros(b, dtype=torch.long)
        n_visits = torch.zeros(b, dtype=torch.long)
        done = torch.zeros(b, dtype=torch.bool)
        rows: list[list[list[int]]] = [[] for _ in range(b)]
        for _ in range(max_visits * (max_codes + 2) + 2):
            allowed = torch.zeros(b, len(vocab), dtype=torch.bool)
            after_bos_or_close = (last == TOKENS.bos) | (last == TOKENS.end_visit)
            allowed[:, TOKENS.visit] = after_bos_or_close & (n_visits < max_visits)
            allowed[:, TOKENS.eos] = (last == TOKENS.end_visit) | (
                after_bos_or_close & (n_visits >= max_visits))
            codes_ok = ((last == TOKENS.visit) | (last >= n_special)) & (n_in_visit < max_codes)
            allowed[:, n_special:] = codes_ok[:, None] & ~in_visit[:, n_special:]
            allowed[:, TOKENS.end_visit] = last >= n_special
            logits = lp[:, -1] + torch.where(allowed, 0.0, NEG_INF)
            nxt = torch.multinomial(torch.softmax(logits, -1), 1, generator=gen).squeeze(1)
            nxt = torch.where(done, TOKENS.pad, nxt)
            for i in torch.nonzero(~done).squeeze(1).tolist():
                t = int(nxt[i])
                if t == TOKENS.visit:
                    rows[i].append([])
                elif t >= n_special:
                    rows[i][-1].append(t)
            is_code = nxt >= n_special
            in_visit[is_code, nxt[is_code]] = True
            n_in_visit = torch.where(is_code, n_in_visit + 1, n_in_visit)
            opened = nxt == TOKENS.visit
            n_visits = n_visits + opened.long()
            in_visit[opened] = False
            n_in_visit = torch.where(opened, 0, n_in_visit)
            done = done | (nxt == TOKENS.eos)
            last = torch.where(done, TOKENS.eos, nxt)
            if bool(done.all()):
                break
            lp, past = model.decode(nxt[:, None], age, sex, enc, mask, past)
        for i, (a, s) in enumerate(chunk):
            visits = tuple(tuple(sorted(vocab.tokens[t] for t in v)) for v in rows[i] if v)
            out.append(Patient(f"synthetic-{start + i}", a, s, visits))
    return out


def main(argv: list[str] | None = None) -> None:
    from app.evaluation.cohort import evaluate_cohort
    from training.loaders import load_corpus
    from training.splits import split_patients

    parser = argparse.ArgumentParser(description="Fidelity of bundles' plain sampling.")
    parser.add_argument("bundles", nargs="+", type=Path)
    parser.add_argument("--source")
    parser.add_argument("--data", type=Path)
    parser.add_argument("--preset")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--limit", type=int, default=0, help="score on this many test patients")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.preset:
        from training.simulate import simulate_corpus
        corpus = simulate_corpus(args.preset, 0).corpus
    else:
        corpus = load_corpus(args.source, args.data)
    split = split_patients(corpus.patients)
    test = split.test[: args.limit] if args.limit else split.test
    demo = [(p.age, p.sex) for p in test]
    keys = ("jsd", "top100_overlap", "unigram_r2", "bigram_r2", "cooccurrence_score",
            "ks_codes_per_visit", "ks_visits_per_patient")
    print("| bundle | " + " | ".join(keys) + " |")
    print("|" + " --- |" * (len(keys) + 1))
    for bundle in args.bundles:
        model = HierBart.from_bundle(bundle)
        vocab = Vocabulary.load(bundle / "vocab.json")
        synth = sample_patients(model, vocab, demo, seed=0)
        scores = evaluate_cohort(synth, test, split.train, mia_size=200)
        print(f"| {bundle.name} | " + " | ".join(f"{scores[k]:.3f}" for k in keys) + " |")


if __name__ == "__main__":
    main()
