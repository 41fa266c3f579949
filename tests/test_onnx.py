"""ONNX export and the ONNX Runtime step model: parity with torch, same patients for a seed."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("onnxruntime")

from app.corpus import Patient
from app.decoding import Engine
from app.decoding.onnx_model import OnnxStepModel
from app.decoding.prompt import pad_prompts, prompt_ids
from app.vocab import Vocabulary
from training.config import model_config_for
from training.export import GRAPHS, export_onnx
from training.model import HierBart
from training.torch_step import TorchStepModel

CODES = ["4019", "25000", "4280", "42731", "5849", "2724", "41401", "V220", "185", "64891",
         "7620", "486", "E8497"]


@pytest.fixture(scope="module", params=[True, False], ids=["hierarchical", "flat"])
def exported(request, tmp_path_factory):
    vocab = Vocabulary.from_patients([Patient("all", 50.0, "F", (tuple(CODES),))])
    torch.manual_seed(3)
    cfg = model_config_for("tiny", hierarchical=request.param, max_positions=64, dropout=0.0,
                           decoder_layers=2)
    model = HierBart(cfg, vocab).eval()
    # Untrained weights are nearly uniform; spread them so parity is tested on real contrasts.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    directory = tmp_path_factory.mktemp("bundle")
    written = export_onnx(model, directory)
    return vocab, model, directory, written


def _inputs(vocab):
    prompts = [prompt_ids(vocab, [["4019", None, "25000"], [None]]), [1, 2],
               prompt_ids(vocab, [["V220"]])]
    ids, mask = pad_prompts(prompts)
    age = np.array([70.0, 0.0, 31.5], dtype=np.float32)
    sex = np.array([1, 0, 0], dtype=np.int64)
    return ids, mask, age, sex


def test_export_writes_the_graphs(exported) -> None:
    _, _, directory, written = exported
    assert written == list(GRAPHS)
    assert all((Path(directory) / name).stat().st_size > 0 for name in GRAPHS)


def test_logits_match_torch_step_by_step(exported) -> None:
    vocab, model, directory, _ = exported
    ort_model, torch_model = OnnxStepModel(directory), TorchStepModel(model)
    ids, mask, age, sex = _inputs(vocab)
    s_ort = ort_model.start(ids, mask, age, sex)
    s_pt = torch_model.start(ids, mask, age, sex)
    feeds = [np.array([[1], [1], [1]]), np.array([[3], [3], [3]]),
             np.array([[vocab.index["4019"]], [vocab.index["185"]], [4]]),
             np.array([[4, 2], [4, 3], [3, 8]])]  # a two-token feed too
    for step, tokens in enumerate(feeds):
        lp_ort, s_ort = ort_model.step(s_ort, tokens)
        lp_pt, s_pt = torch_model.step(s_pt, tokens)
        assert lp_ort.shape == (3, len(vocab))
        assert np.abs(lp_ort - lp_pt).max() < 1e-4, step
        if step == 1:  # dropping and reordering rows keeps the cache consistent
            rows = np.array([2, 0, 1])
            s_ort, s_pt = ort_model.select(s_ort, rows), torch_model.select(s_pt, rows)
    # Batch of one, a longer prompt: dynamic axes.
    long_ids, long_mask = pad_prompts([prompt_ids(vocab, [CODES[:8], CODES[8:]] * 2)])
    a = ort_model.step(ort_model.start(long_ids, long_mask, age[:1], sex[:1]), feeds[0][:1])[0]
    b = torch_model.step(torch_model.start(long_ids, long_mask, age[:1], sex[:1]),
                         feeds[0][:1])[0]
    assert np.abs(a - b).max() < 1e-4


@pytest.mark.parametrize("strategy,params", [("plain", None), ("rerank", {"candidates": 3,
                                                                          "coherence_weight": 0})])
def test_same_seed_same_patients_on_torch_and_onnx(exported, strategy, params) -> None:
    vocab, model, directory, _ = exported
    demo = [(float(a), s) for a, s in zip(np.linspace(0, 90, 40), ["F", "M"] * 20, strict=True)]
    kwargs = {"max_visits": 3, "max_codes_per_visit": 4, "max_length": 40, "batch_size": 16}
    ort_engine = Engine(OnnxStepModel(directory), vocab, **kwargs)
    torch_engine = Engine(TorchStepModel(model), vocab, **kwargs)
    a = ort_engine.generate(demo, strategy, params, seed=5, must_include=["4019"])
    b = torch_engine.generate(demo, strategy, params, seed=5, must_include=["4019"])
    assert a.token_ids == b.token_ids
    assert np.allclose(a.log_likelihood, b.log_likelihood, atol=1e-3)
    again = Engine(OnnxStepModel(directory), vocab, **kwargs).generate(
        demo, strategy, params, seed=5, must_include=["4019"])
    assert again.to_json() == a.to_json()


def test_onnx_path_imports_no_torch(exported) -> None:
    directory = exported[2]
    code = ("import sys\n"
            "from app.decoding.onnx_model import OnnxStepModel\n"
            "from app.decoding import Engine\n"
            "from app.vocab import Vocabulary\n"
            f"m = OnnxStepModel({str(directory)!r})\n"
            "import numpy as np\n"
            "s = m.start(np.array([[1, 2]]), np.array([[1, 1]]), np.array([40.0], 'float32'),"
            " np.array([0]))\n"
            "lp, s = m.step(s, np.array([[1]]))\n"
            "assert 'torch' not in sys.modules, 'torch imported'\n")
    subprocess.run([sys.executable, "-c", code], check=True,
                   cwd=Path(__file__).resolve().parents[1])


def test_engine_from_a_trained_bundle_runs_every_strategy(tmp_path) -> None:
    from app.bundle import load_bundle
    from app.cooccurrence import build_cooccurrence
    from app.decoding import RetrievalIndex  # noqa: F401
    from training.bundle import write_bundle

    rng = np.random.default_rng(0)
    train = [Patient(f"t{i}", float(rng.integers(18, 90)), "FM"[i % 2],
                     tuple(tuple(sorted(set(rng.choice(CODES[:7], 3).tolist())))
                           for _ in range(int(rng.integers(1, 3)))))
             for i in range(120)]
    vocab = Vocabulary.from_patients(train)
    torch.manual_seed(0)
    model = HierBart(model_config_for("tiny", max_positions=48, dropout=0.0), vocab).eval()
    write_bundle(tmp_path, model=model, vocab=vocab,
                 cooccurrence=build_cooccurrence(train, vocab), train_patients=train,
                 run_config={}, data={}, splits={"train": len(train)}, metrics={})
    export_onnx(model, tmp_path)
    bundle = load_bundle(tmp_path)  # checksums of the graphs verified
    engine = Engine.from_bundle(bundle, intra_op_threads=1)
    assert engine.max_length == 48 and engine.retrieval is not None
    assert engine.max_codes_per_visit == 3
    demo = [(40.0, "F"), (70.0, "M")] * 5
    train_exact = {tuple(tuple(sorted(v)) for v in p.visits) for p in train}
    for strategy in ("plain", "cooccurrence", "rerank", "retrieve_edit"):
        # A 7-code world holds nearly every small code set: guard exact copies only.
        params = {"min_distance": 0.0} if strategy == "retrieve_edit" else None
        result = engine.generate(demo, strategy, params, seed=1, must_include=["4019"])
        for p in result.patients:
            assert any("4019" in v for v in p.visits)
            assert all(len(v) <= 3 for v in p.visits)
        if strategy == "retrieve_edit":
            assert not any(tuple(tuple(sorted(v)) for v in p.visits) in train_exact
                           for p in result.patients)


def test_int8_decoders_run_close_to_fp32(exported, tmp_path) -> None:
    from app.decoding.onnx_model import INT8_GRAPHS

    vocab, model, _, _ = exported
    written = export_onnx(model, tmp_path, quantize=True)
    assert written == [*GRAPHS, *INT8_GRAPHS.values()]
    fp32, int8 = OnnxStepModel(tmp_path), OnnxStepModel(tmp_path, quantize=True)
    assert int8.quantized and int8.vocab_size == len(vocab)
    ids, mask, age, sex = _inputs(vocab)
    s32, s8 = fp32.start(ids, mask, age, sex), int8.start(ids, mask, age, sex)
    for tokens in (np.array([[1], [1], [1]]), np.array([[3], [3], [3]])):
        a, s32 = fp32.step(s32, tokens)
        b, s8 = int8.step(s8, tokens)
        live = a > -1e8  # never-predicted tokens stay at the -1e9 floor
        assert np.array_equal(live, b > -1e8)
        assert np.allclose(np.exp(b).sum(axis=1), 1.0, atol=1e-4)  # normalised
        # the fixture's weights are spread on purpose (int8 rounds them coarsely): the same
        # distribution roughly; bench/int8_fidelity.py measures fidelity on a trained model
        assert np.corrcoef(a[live], b[live])[0, 1] > 0.9
    # a plain fp32 re-export removes int8 graphs of older weights
    assert export_onnx(model, tmp_path) == list(GRAPHS)
    assert not any((tmp_path / name).exists() for name in INT8_GRAPHS.values())


def test_fused_step_graph_matches_the_traced_step_of_older_bundles(exported, tmp_path) -> None:
    """Bundles exported before the fused step graph (traced ``decoder.onnx``) still load and
    give the same log-probabilities as the fused graph, token by token and for a multi-token
    feed; the fused graph uses ONNX Runtime's fused attention."""
    import onnx

    vocab, model, directory, _ = exported
    export_onnx(model, tmp_path, fused_step=False)
    fused, traced = OnnxStepModel(directory), OnnxStepModel(tmp_path)
    assert fused.fused_step and not traced.fused_step
    ops = {n.op_type for n in onnx.load(str(Path(directory) / "decoder.onnx")).graph.node}
    assert {"MultiHeadAttention", "SkipLayerNormalization"} <= ops
    ids, mask, age, sex = _inputs(vocab)
    s_f, s_t = fused.start(ids, mask, age, sex), traced.start(ids, mask, age, sex)
    feeds = [np.array([[1], [1], [1]]), np.array([[3], [3], [3]]),
             np.array([[4, 2], [4, 3]]), np.array([[5], [6]])]
    for step, tokens in enumerate(feeds):
        a, s_f = fused.step(s_f, tokens)
        b, s_t = traced.step(s_t, tokens)
        assert np.abs(a - b).max() < 1e-5, step
        if step == 1:
            rows = np.array([2, 0])
            s_f, s_t = fused.select(s_f, rows), traced.select(s_t, rows)
