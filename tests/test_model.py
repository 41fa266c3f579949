"""The hierarchical BART: normalised factorised output, cache, save/load, overfitting,
demographic conditioning, and the objective's pieces. Tiny models on synthetic patients."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from app.cooccurrence import build_cooccurrence
from app.corpus import Patient
from app.vocab import SPECIAL_TOKENS, Vocabulary
from training.config import ModelConfig, ObjectiveConfig, model_config_for
from training.dataset import TOKENS, collate, corrupt, encode_patients
from training.model import NEG_INF, HierBart, segment_logsumexp
from training.objective import compute_loss, cooc_operator

torch.set_num_threads(1)

# real ICD-9-CM codes across several chapters and categories
CODES = ["4019", "4280", "42731", "41401", "25000", "25002", "2724", "5849", "5990", "486",
         "49121", "V5861", "E8790", "2859", "311", "30000", "V270", "6500", "185", "6000"]
MALE = ["185", "6000"]
FEMALE = ["V270", "6500"]


def synthetic_patients(n: int, seed: int = 0) -> list[Patient]:
    """Patients whose codes depend on sex (MALE/FEMALE codes) and age (old: 4019 + 4280)."""
    rng = np.random.default_rng(seed)
    common = [c for c in CODES if c not in MALE + FEMALE and c not in ("4019", "4280")]
    out = []
    for i in range(n):
        sex = "M" if i % 2 else "F"
        age = float(rng.integers(20, 90))
        visits = []
        for _ in range(int(rng.integers(1, 3))):
            codes = set(rng.choice(common, size=int(rng.integers(1, 4)), replace=False))
            codes.add(str(rng.choice(MALE if sex == "M" else FEMALE)))
            if age >= 60:
                codes.update(("4019", "4280"))
            visits.append(tuple(sorted(codes)))
        out.append(Patient(f"p{i}", age, sex, tuple(visits)))
    return out


@pytest.fixture(scope="module")
def vocab() -> Vocabulary:
    return Vocabulary.from_patients([Patient("all", 50.0, "F", (tuple(CODES),))])


def make_model(vocab: Vocabulary, hierarchical: bool = True, seed: int = 0, **kw) -> HierBart:
    torch.manual_seed(seed)
    cfg = model_config_for("tiny", hierarchical=hierarchical, max_positions=64, dropout=0.0, **kw)
    return HierBart(cfg, vocab).eval()


def a_batch(vocab: Vocabulary, n: int = 6, mode: str = "full"):
    enc = encode_patients(synthetic_patients(n), vocab, 64)
    return collate(enc, np.random.default_rng(0), ObjectiveConfig(), mode=mode)


@pytest.mark.parametrize("hierarchical", [True, False])
def test_log_probs_are_normalised_and_structure_tokens_predictable(vocab, hierarchical):
    model = make_model(vocab, hierarchical)
    b = a_batch(vocab)
    with torch.no_grad():
        enc, mask = model.encode(b.input_ids, b.attention_mask, b.age, b.sex)
        lp, past = model.decode(b.decoder_input_ids, b.age, b.sex, enc, mask)
    assert enc.shape[1] == b.input_ids.shape[1] + model.config.n_prompts
    assert mask.shape == enc.shape[:2]
    assert lp.shape == (*b.decoder_input_ids.shape, len(vocab))
    assert torch.allclose(lp.logsumexp(-1), torch.zeros(lp.shape[:2]), atol=1e-4)
    for token in ("<pad>", "<s>", "<mask>"):
        assert (lp[..., SPECIAL_TOKENS.index(token)] <= NEG_INF / 2).all()
    for token in ("</s>", "<v>", "</v>"):
        assert (lp[..., SPECIAL_TOKENS.index(token)] > -30).all()
    assert len(past) == model.config.decoder_layers and len(past[0]) == 4


def test_hierarchical_factorisation(vocab):
    """log P(code) = log P(chapter) + log P(category|chapter) + log P(code|category): the code
    probabilities of a chapter sum to that chapter's top-level probability."""
    model = make_model(vocab)
    b = a_batch(vocab, 2)
    with torch.no_grad():
        h = model(b.input_ids, b.attention_mask, b.decoder_input_ids, b.age, b.sex)
        lp = model.output_log_probs(h)
        top_weight = torch.cat([model.token_embed.weight[:6], model.chapter_embed.weight[:19]])
        top = torch.log_softmax(h @ top_weight.T + model.top_bias + model.output_mask, -1)
    chapters = torch.as_tensor(vocab.category_chapter[vocab.code_category])
    for chapter in chapters.unique():
        members = 6 + torch.nonzero(chapters == chapter).squeeze(1)
        assert torch.allclose(lp[..., members].logsumexp(-1), top[..., 6 + chapter], atol=1e-4)


def test_segment_logsumexp_matches_brute_force():
    x = torch.randn(3, 5, 12) * 40
    seg = torch.tensor([0, 0, 1, 3, 3, 3, 1, 0, 4, 4, 3, 1])
    out = segment_logsumexp(x, seg, 6)
    for s in range(5):
        if (seg == s).any():
            assert torch.allclose(out[..., s], x[..., seg == s].logsumexp(-1), atol=1e-4)
    assert (out[..., 5] < -1e8).all()  # empty segment: finite, very negative


@pytest.mark.parametrize("hierarchical", [True, False])
def test_cached_decoding_equals_full_decoding(vocab, hierarchical):
    model = make_model(vocab, hierarchical)
    b = a_batch(vocab)
    with torch.no_grad():
        enc, mask = model.encode(b.input_ids, b.attention_mask, b.age, b.sex)
        full, _ = model.decode(b.decoder_input_ids, b.age, b.sex, enc, mask)
        lp, past = model.decode(b.decoder_input_ids[:, :2], b.age, b.sex, enc, mask)
        steps = [lp]
        for t in range(2, b.decoder_input_ids.shape[1]):
            lp, past = model.decode(b.decoder_input_ids[:, t:t + 1], b.age, b.sex, enc, mask,
                                    past)
            steps.append(lp)
    assert torch.allclose(torch.cat(steps, 1), full, atol=1e-4)


@pytest.mark.parametrize("hierarchical", [True, False])
def test_save_load_gives_identical_logits(vocab, tmp_path, hierarchical):
    model = make_model(vocab, hierarchical)
    b = a_batch(vocab)
    model.save(tmp_path)
    loaded = HierBart.from_bundle(tmp_path)
    with torch.no_grad():
        a = model.output_log_probs(model(b.input_ids, b.attention_mask, b.decoder_input_ids,
                                         b.age, b.sex))
        c = loaded.output_log_probs(loaded(b.input_ids, b.attention_mask, b.decoder_input_ids,
                                           b.age, b.sex))
    assert torch.equal(a, c)
    assert loaded.config == model.config


def test_input_embedding_is_sum_of_levels(vocab):
    model = make_model(vocab)
    token = vocab.token_id("25000")
    code_category = int(vocab.code_category[vocab.code_id("25000")])
    expected = (model.token_embed.weight[token] + model.category_embed.weight[code_category]
                + model.chapter_embed.weight[int(vocab.category_chapter[code_category])])
    got = model.embed_tokens(torch.tensor([token]))[0]
    assert torch.allclose(got, expected)
    # structure tokens have no category/chapter part
    bos = model.embed_tokens(torch.tensor([TOKENS.bos]))[0]
    assert torch.allclose(bos, model.token_embed.weight[TOKENS.bos])


def greedy(model: HierBart, b, max_len: int = 40) -> list[list[int]]:
    with torch.no_grad():
        enc, mask = model.encode(b.input_ids, b.attention_mask, b.age, b.sex)
        ids = torch.full((len(b), 1), TOKENS.bos)
        lp, past = model.decode(ids, b.age, b.sex, enc, mask)
        out = [[TOKENS.bos] for _ in range(len(b))]
        for _ in range(max_len):
            nxt = lp[:, -1].argmax(-1)
            for i, t in enumerate(nxt.tolist()):
                if out[i][-1] != TOKENS.eos:
                    out[i].append(t)
            if all(o[-1] == TOKENS.eos for o in out):
                break
            lp, past = model.decode(nxt[:, None], b.age, b.sex, enc, mask, past)
    return out


def test_tiny_model_overfits_50_patients(vocab):
    patients = synthetic_patients(50, seed=3)
    enc = encode_patients(patients, vocab, 64)
    cfg = ObjectiveConfig()
    torch.manual_seed(0)
    model = HierBart(model_config_for("small", d_model=96, ffn_dim=192, max_positions=64,
                                      dropout=0.0, encoder_layers=1, decoder_layers=2), vocab)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    rng = np.random.default_rng(0)
    model.train()
    for _ in range(250):
        b = collate(enc, rng, cfg, mode="full", shuffle=False)
        out = compute_loss(model, b, cfg)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    model.eval()
    b = collate(enc, rng, cfg, mode="full", shuffle=False)
    with torch.no_grad():
        final = compute_loss(model, b, cfg)
    assert final.nll_sum / final.n_tokens < 0.05
    decoded = greedy(model, b)
    targets = [[TOKENS.bos, *[t for t in row if t != TOKENS.pad]] for row in b.labels.tolist()]
    assert decoded == targets


def test_age_and_sex_reach_the_model(vocab):
    """An untrained model's output moves with age and sex; after brief training on patients
    whose codes depend on sex and age, generation from demographics follows them."""
    model = make_model(vocab)
    b = a_batch(vocab, 2, mode="demographics")
    with torch.no_grad():
        def first_step(age, sex):
            enc, mask = model.encode(b.input_ids[:1], b.attention_mask[:1], age, sex)
            return model.decode(torch.tensor([[TOKENS.bos, TOKENS.visit]]), age, sex, enc,
                                mask)[0][0, -1]
        base = first_step(torch.tensor([40.0]), torch.tensor([0]))
        assert (first_step(torch.tensor([80.0]), torch.tensor([0])) - base).abs().max() > 1e-4
        assert (first_step(torch.tensor([40.0]), torch.tensor([1])) - base).abs().max() > 1e-4

    enc = encode_patients(synthetic_patients(400, seed=1), vocab, 64)
    cfg = ObjectiveConfig(demographics_only_prob=1.0)
    torch.manual_seed(0)
    model = HierBart(model_config_for("tiny", max_positions=64, dropout=0.0), vocab)
    opt = torch.optim.AdamW(model.parameters(), lr=5e-3)
    rng = np.random.default_rng(0)
    for step in range(120):
        idx = rng.choice(len(enc), 64, replace=False)
        out = compute_loss(model, collate([enc[i] for i in idx], rng, cfg), cfg)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    model.eval()
    male = [vocab.token_id(c) for c in MALE]
    female = [vocab.token_id(c) for c in FEMALE]
    old = [vocab.token_id(c) for c in ("4019", "4280")]
    with torch.no_grad():
        def first_code(age, sex):
            age_t, sex_t = torch.tensor([age]), torch.tensor([sex])
            e, m = model.encode(torch.tensor([[TOKENS.bos, TOKENS.eos]]), torch.ones(1, 2,
                                dtype=torch.long), age_t, sex_t)
            return model.decode(torch.tensor([[TOKENS.bos, TOKENS.visit]]), age_t, sex_t, e,
                                m)[0][0, -1].exp()
        m_old, f_young = first_code(75.0, 1), first_code(30.0, 0)
    assert m_old[male].sum() > 3 * m_old[female].sum()
    assert f_young[female].sum() > 3 * f_young[male].sum()
    assert m_old[old].sum() > 3 * f_young[old].sum()


def test_corruption_views():
    rng = np.random.default_rng(0)
    visits = [np.array([10, 11, 12, 13]), np.array([14, 15]), np.array([16])]
    only = corrupt(visits, rng, ObjectiveConfig(demographics_only_prob=1.0))
    assert only == [TOKENS.bos, TOKENS.eos]
    none = ObjectiveConfig(demographics_only_prob=0, truncate_prob=0, drop_prob=0, mask_prob=0)
    assert corrupt(visits, rng, none) == [1, 3, 10, 11, 12, 13, 4, 3, 14, 15, 4, 3, 16, 4, 2]
    cut = ObjectiveConfig(demographics_only_prob=0, truncate_prob=1.0, drop_prob=0, mask_prob=0)
    assert all(corrupt(visits, rng, cut).count(TOKENS.visit) < 3 for _ in range(20))
    masked = ObjectiveConfig(demographics_only_prob=0, truncate_prob=0, drop_prob=0,
                             mask_prob=0.9)
    views = [corrupt(visits, rng, masked) for _ in range(20)]
    assert any(TOKENS.mask in v for v in views)
    assert all(v.count(TOKENS.visit) == 3 for v in views)


def test_cooccurrence_penalty_and_aux_heads(vocab):
    patients = synthetic_patients(30)
    cooc = cooc_operator(build_cooccurrence(patients, vocab))
    model = make_model(vocab)
    model.train()
    b = collate(encode_patients(patients, vocab, 64), np.random.default_rng(0),
                ObjectiveConfig())
    plain = compute_loss(model, b, ObjectiveConfig())
    reg = compute_loss(model, b, ObjectiveConfig(cooc_weight=1.0, age_weight=1.0,
                                                 sex_weight=1.0), cooc)
    assert {"cooc", "age", "sex"} <= set(reg.parts)
    assert 0 < reg.parts["cooc"] < 20
    assert reg.loss > plain.loss
    reg.loss.backward()
    assert model.code_bias.grad is not None and model.age_head.weight.grad is not None


def test_marginal_divergence_is_the_kl_of_the_mean_code_distribution():
    from training.objective import _code_positions, _marginal_divergence

    n_special = 2
    # two code positions over three codes (columns after the specials)
    probs = np.array([[0.1, 0.1, 0.4, 0.2, 0.2],
                      [0.0, 0.2, 0.2, 0.2, 0.4]]) + 1e-12
    freq = torch.tensor([0.5, 0.25, 0.25])
    got = _marginal_divergence(torch.tensor(np.log(probs), dtype=torch.float64),
                               freq.double(), n_special)
    codes = probs[:, n_special:] / probs[:, n_special:].sum(1, keepdims=True)
    mean = codes.mean(0)
    f = freq.numpy().astype(np.float64)
    assert float(got) == pytest.approx(float((f * np.log(f / mean)).sum()), rel=1e-6)
    # the code positions, thinned evenly past the cap
    target = torch.tensor([0, 3, 4, 1, 5, 6, 2, 7])
    assert _code_positions(target, 3, 10).tolist() == [1, 2, 4, 5, 7]
    assert _code_positions(target, 3, 3).tolist() == [1, 4, 7]


def test_marginal_weight_adds_a_term_with_gradient(vocab):
    from training.objective import code_frequencies

    patients = synthetic_patients(30)
    model = make_model(vocab)
    model.train()
    b = collate(encode_patients(patients, vocab, 64), np.random.default_rng(0),
                ObjectiveConfig())
    freq = code_frequencies(np.asarray(vocab.counts) + 1.0)
    plain = compute_loss(model, b, ObjectiveConfig())
    out = compute_loss(model, b, ObjectiveConfig(marginal_weight=1.0), None, freq)
    assert out.parts["marginal"] > 0 and out.loss > plain.loss
    out.loss.backward()
    assert model.code_bias.grad is not None and float(model.code_bias.grad.abs().sum()) > 0
    with pytest.raises(ValueError):
        code_frequencies(np.zeros(3))


def test_contrastive_pretraining_brings_companions_together(vocab):
    import scipy.sparse as sp

    from training.pretrain import pretrain_code_embeddings

    model = make_model(vocab)
    n = vocab.n_codes
    first, second = list(range(n // 2)), list(range(n // 2, n))
    cooc = np.zeros((n, n))
    for group in (first, second):  # two groups of codes that only keep their own company
        for i in group:
            for j in group:
                if i != j:
                    cooc[i, j] = 10.0
    table = model.token_embed.weight
    specials_before = table[:vocab.n_special].detach().clone()
    norm_before = float(table[vocab.n_special:].detach().norm(dim=-1).mean())

    def within_minus_across() -> float:
        z = torch.nn.functional.normalize(table[vocab.n_special:].detach(), dim=-1)
        sim = (z @ z.T).numpy()
        group = np.arange(n) >= n // 2
        same = group[:, None] == group[None, :]
        off = ~np.eye(n, dtype=bool)
        return float(sim[same & off].mean() - sim[~same].mean())

    before = within_minus_across()
    info = pretrain_code_embeddings(model, sp.csr_matrix(cooc), 60, seed=0, batch_size=64)
    assert info["last_loss"] < info["first_loss"]
    assert within_minus_across() > before + 0.3
    assert torch.equal(table[:vocab.n_special].detach(), specials_before)
    norm_after = float(table[vocab.n_special:].detach().norm(dim=-1).mean())
    assert norm_after == pytest.approx(norm_before, rel=1e-4)


def test_config_round_trip():
    from training.config import FeatureSpec, RunConfig

    cfg = RunConfig(model=ModelConfig(extra_features=[FeatureSpec("race", n_values=5)]))
    again = RunConfig.from_dict(cfg.to_dict())
    assert again == cfg
    assert again.override({"model.d_model": 32}).model.d_model == 32
    with pytest.raises(ValueError):
        cfg.override({"model.nope": 1})


def test_extra_features_reach_the_model(vocab):
    from training.config import FeatureSpec

    torch.manual_seed(0)
    cfg = model_config_for("tiny", max_positions=64, extra_features=[
        FeatureSpec("race", "categorical", n_values=4), FeatureSpec("bmi", "numeric", scale=40)])
    model = HierBart(cfg, vocab).eval()
    b = a_batch(vocab, 2)
    extra = {"race": torch.tensor([0, 3]), "bmi": torch.tensor([22.0, 35.0])}
    with torch.no_grad():
        enc, mask = model.encode(b.input_ids, b.attention_mask, b.age, b.sex, extra)
        assert enc.shape[1] == b.input_ids.shape[1] + 4
        lp, _ = model.decode(b.decoder_input_ids, b.age, b.sex, enc, mask, extra=extra)
        extra2 = {"race": torch.tensor([1, 2]), "bmi": torch.tensor([22.0, 35.0])}
        enc2, mask2 = model.encode(b.input_ids, b.attention_mask, b.age, b.sex, extra2)
        lp2, _ = model.decode(b.decoder_input_ids, b.age, b.sex, enc2, mask2, extra=extra2)
    assert (lp - lp2).abs().max() > 1e-5
