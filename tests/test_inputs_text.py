"""edgeprism.inputs for text: tokenizer.json and the byte-level convention vs transformers; pooling; classifier."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from edgeprism.assets import gpt2_shakespeare_dir
from edgeprism.inputs import load_io, save_classifier
from edgeprism.models.config import ModelConfig, get_config
from edgeprism.models.loading import config_from_hf, load_pretrained

pytest.importorskip("tokenizers")
transformers = pytest.importorskip("transformers")

WORDS = ("the a of to and in is it you that he was for on are with as his they be at one have this from or had by "
         "hot word but what some we can out other were all there when up use your how said an each she which do "
         "their time if will way about many then them write would like so these her long make thing see him two "
         "has look more day could go come did number sound no most people my over know water than call first who "
         "may down side been now find un ##able ##ing ##ed ##s ##ly , . ! ? ' é").split()
TEXTS = ["The water was hot.", "how many people know you?", "Unable! Thinking of zebras", "é", "  a  ,  b  "]


def _write_tokenizer(folder, pad_to: int = 16) -> int:
    """A tiny uncased WordPiece tokenizer.json written as BERT's: [CLS] A [SEP]; padding/truncation set to 16 in
    the file, which edgeprism must ignore."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    vocab = {tok: i for i, tok in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS])}
    tokenizer = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]", max_input_chars_per_word=100))
    tokenizer.add_special_tokens(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"])  # already in vocab: same ids
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    tokenizer.decoder = decoders.WordPiece()
    tokenizer.enable_padding(length=pad_to, pad_id=0, pad_token="[PAD]")
    tokenizer.enable_truncation(max_length=pad_to)
    tokenizer.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "BertTokenizer", "do_lower_case": True, "unk_token": "[UNK]", "sep_token": "[SEP]",
        "pad_token": "[PAD]", "cls_token": "[CLS]", "mask_token": "[MASK]", "model_max_length": 64}))
    return len(vocab)


def _write_sentence_transformers(folder, normalize: bool = True, pooling: dict | None = None) -> None:
    """The files sentence-transformers writes next to a BertModel (all-MiniLM-L6-v2's layout)."""
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
    if normalize:
        modules.append({"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"})
    (folder / "modules.json").write_text(json.dumps(modules))
    (folder / "1_Pooling").mkdir(exist_ok=True)
    (folder / "1_Pooling" / "config.json").write_text(json.dumps(pooling or {
        "word_embedding_dimension": 32, "pooling_mode_cls_token": False, "pooling_mode_mean_tokens": True,
        "pooling_mode_max_tokens": False, "pooling_mode_mean_sqrt_len_tokens": False}))
    (folder / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 24, "do_lower_case": False}))


@pytest.fixture(scope="module")
def bert_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-bert")
    vocab_size = _write_tokenizer(folder)
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2,
                                     num_attention_heads=4, intermediate_size=64, max_position_embeddings=64,
                                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    transformers.BertModel(config).eval().save_pretrained(folder)
    _write_sentence_transformers(folder)
    return folder


def _config(folder) -> ModelConfig:
    return config_from_hf(json.loads((folder / "config.json").read_text()), "tiny-bert")


def test_tokens_equal_transformers_autotokenizer(bert_folder):
    io = load_io(_config(bert_folder), bert_folder)
    reference = transformers.AutoTokenizer.from_pretrained(bert_folder)
    for text in TEXTS:
        ours = io.encode_texts([text])
        theirs = reference(text)
        assert ours["input_ids"][0].tolist() == theirs["input_ids"], text
        assert ours["token_type_ids"][0].tolist() == theirs["token_type_ids"]
    ours = io.encode_texts(TEXTS)
    theirs = reference(TEXTS, padding=True, return_tensors="pt")
    for key in ("input_ids", "attention_mask", "token_type_ids"):
        assert ours[key].dtype == torch.int64
        assert torch.equal(ours[key], theirs[key]), key
    assert io.count_tokens(TEXTS) == [len(reference(t)["input_ids"]) for t in TEXTS]


def test_file_padding_and_truncation_do_not_apply(bert_folder):
    io = load_io(_config(bert_folder), bert_folder)
    long_text = " ".join(["water"] * 20)  # 22 tokens: past the file's 16, within sentence_bert_config's 24
    batch = io.encode_texts([long_text, "hot"])
    assert batch["input_ids"].shape == (2, 22)
    assert batch["attention_mask"].sum(1).tolist() == [22, 3]
    assert io.max_tokens == 24  # sentence_bert_config.json's max_seq_length < the model's 64 positions


def test_embeddings_equal_sentence_transformers_mean_l2(bert_folder):
    io = load_io(_config(bert_folder), bert_folder)
    assert io.pooling.modes == ("mean",) and io.pooling.normalize
    model = load_pretrained(bert_folder)
    inputs = io.encode_texts(TEXTS)
    with torch.no_grad():
        ours = io.embeddings(model(inputs), inputs)
        hidden = transformers.BertModel.from_pretrained(bert_folder).eval()(**inputs).last_hidden_state
    mask = inputs["attention_mask"][..., None].float()
    expected = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)
    assert ours.dtype == torch.float32 and ours.shape == (len(TEXTS), 32)
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=0)


def test_embeddings_without_sentence_transformers_files_are_cls(bert_folder, tmp_path):
    for name in ("tokenizer.json", "config.json", "model.safetensors"):
        (tmp_path / name).write_bytes((bert_folder / name).read_bytes())
    io = load_io(_config(tmp_path), tmp_path)
    model = load_pretrained(tmp_path)
    inputs = io.encode_texts(TEXTS[:2])
    with torch.no_grad():
        outputs = model(inputs)
    torch.testing.assert_close(io.embeddings(outputs, inputs), outputs["cls"])
    assert io.classify(outputs, inputs) is None


def test_mean_sqrt_len_and_cls_concatenate(bert_folder, tmp_path):
    for name in ("tokenizer.json", "config.json", "model.safetensors"):
        (tmp_path / name).write_bytes((bert_folder / name).read_bytes())
    _write_sentence_transformers(tmp_path, normalize=False, pooling={
        "pooling_mode_cls_token": True, "pooling_mode_mean_sqrt_len_tokens": True})
    io = load_io(_config(tmp_path), tmp_path)
    inputs = io.encode_texts(TEXTS[:3])
    with torch.no_grad():
        outputs = load_pretrained(tmp_path)(inputs)
    counts = inputs["attention_mask"].sum(1, keepdim=True).float()
    expected = torch.cat([outputs["cls"], outputs["mean"] * counts.sqrt()], dim=-1)
    torch.testing.assert_close(io.embeddings(outputs, inputs), expected)


def test_classifier_file_over_embeddings(bert_folder, tmp_path):
    for name in ("tokenizer.json", "config.json", "model.safetensors", "modules.json", "sentence_bert_config.json"):
        (tmp_path / name).write_bytes((bert_folder / name).read_bytes())
    (tmp_path / "1_Pooling").mkdir()
    (tmp_path / "1_Pooling" / "config.json").write_bytes((bert_folder / "1_Pooling" / "config.json").read_bytes())
    weight, bias = torch.randn(3, 32, generator=torch.Generator().manual_seed(1)), torch.tensor([0.1, -0.2, 0.3])
    save_classifier(tmp_path, weight, bias, ["greet", "order", "cancel"], source="test head")
    io = load_io(_config(tmp_path), tmp_path)
    inputs = io.encode_texts(TEXTS[:2])
    with torch.no_grad():
        outputs = load_pretrained(tmp_path)(inputs)
    answers = io.classify(outputs, inputs, top_k=10)
    probs = (io.embeddings(outputs, inputs) @ weight.T + bias).softmax(-1)
    for row, answer in enumerate(answers):
        assert len(answer) == 3 and [s for _, s in answer] == sorted((s for _, s in answer), reverse=True)
        for label, score in answer:
            assert score == pytest.approx(float(probs[row, ["greet", "order", "cancel"].index(label)]), abs=1e-6)
    assert len(io.classify(outputs, inputs, top_k=1)[0]) == 1
    with pytest.raises(ValueError, match="top_k is 0; ask for at least 1 label"):
        io.classify(outputs, inputs, top_k=0)


def test_text_value_errors(bert_folder):
    io = load_io(_config(bert_folder), bert_folder)
    too_long = " ".join(["water"] * 30)  # 32 tokens with [CLS]/[SEP]
    with pytest.raises(ValueError, match=r"text 1 has 32 tokens; tiny-bert takes at most 24 per text.*truncate=True"):
        io.encode_texts(["hot", too_long])
    cut = io.encode_texts(["hot", too_long], truncate=True)["input_ids"]
    assert cut.shape == (2, 24) and cut[1, 0] == 2 and cut[1, -1] == 3  # [CLS] ... [SEP] kept
    assert io.encode_texts([too_long], max_tokens=5, truncate=True)["input_ids"].shape == (1, 5)
    with pytest.raises(ValueError, match="text 2 is empty: it has no tokens besides the special ones"):
        io.encode_texts(["hot", "a", "   "])
    with pytest.raises(ValueError, match="text 1 is of type int, not a string"):
        io.encode_texts(["hot", 3])
    with pytest.raises(ValueError, match="no texts given: the list is empty"):
        io.encode_texts([])
    with pytest.raises(ValueError, match="give a list of texts, not one string"):
        io.count_tokens("hot water")
    with pytest.raises(ValueError, match="max_tokens is 100; tiny-bert takes 3..24"):
        io.encode_texts(["hot"], max_tokens=100)
    with pytest.raises(ValueError, match="tiny-bert is a text-encoder; encode_prompts needs a text-decoder"):
        io.encode_prompts(["hot"])
    with pytest.raises(ValueError, match="tiny-bert is a text-encoder; encode_images needs an image model"):
        io.encode_images([b"x"])


def test_load_value_errors(bert_folder, tmp_path):
    config = _config(bert_folder)
    with pytest.raises(ValueError, match="bert-tiny-test is a text model: load_io needs its checkpoint folder with "
                                         "tokenizer.json"):
        load_io(get_config("bert-tiny-test"), None)
    with pytest.raises(ValueError, match="checkpoint folder .*missing does not exist"):
        load_io(config, tmp_path / "missing")
    (tmp_path / "config.json").write_text(json.dumps({"vocab_size": 1000}))
    with pytest.raises(ValueError, match="has no tokenizer.json, and its config.json \\(vocab_size 1000.*needs the "
                                         "checkpoint's tokenizer.json for text"):
        load_io(config, tmp_path)
    (tmp_path / "tokenizer.json").write_bytes((bert_folder / "tokenizer.json").read_bytes())
    small = ModelConfig("small-bert", "bert", 32, 2, 4, 64, vocab_size=50, max_positions=64)
    with pytest.raises(ValueError, match=r"has 1\d\d token ids but small-bert embeds only 50"):
        load_io(small, tmp_path)
    _write_sentence_transformers(tmp_path, pooling={"pooling_mode_max_tokens": True})
    with pytest.raises(ValueError, match=r"asks for \['pooling_mode_max_tokens'\]"):
        load_io(config, tmp_path)
    _write_sentence_transformers(tmp_path)
    modules = json.loads((tmp_path / "modules.json").read_text())
    modules.append({"idx": 3, "name": "3", "path": "3_Dense", "type": "sentence_transformers.models.Dense"})
    (tmp_path / "modules.json").write_text(json.dumps(modules))
    with pytest.raises(ValueError, match="lists module 'sentence_transformers.models.Dense' at '3_Dense'"):
        load_io(config, tmp_path)
    (tmp_path / "modules.json").unlink()
    save_classifier(tmp_path, torch.zeros(2, 7), torch.zeros(2), ["x", "y"])
    with pytest.raises(ValueError, match="takes 7 features of embedding, but tiny-bert gives 32"):
        load_io(config, tmp_path)
    (tmp_path / "classifier.json").unlink()
    with pytest.raises(ValueError, match="has only one of classifier.json and classifier.safetensors"):
        load_io(config, tmp_path)
    with pytest.raises(ValueError, match="do not agree on the number of classes"):
        save_classifier(tmp_path, torch.zeros(2, 7), torch.zeros(3), ["x", "y"])


def test_byte_level_gpt2_shakespeare():
    io = load_io(get_config("gpt2-shakespeare"), gpt2_shakespeare_dir())
    assert io.task == "text-decoder" and io.max_tokens == 256 and io.eos_token_id == 256
    prompts = ["ROMEO:", "naïve 🙂", ""]
    ids = io.encode_prompts(prompts)
    assert ids[0] == list(b"ROMEO:") and ids[1] == list("naïve 🙂".encode()) and ids[2] == [256]
    assert io.decode_tokens([256, *ids[1], 256]) == "naïve 🙂"
    assert io.decode_tokens(list("é".encode())[:1]) == "\ufffd"  # a cut UTF-8 sequence decodes as U+FFFD
    batch = io.encode_texts(["ab", "abcd"])
    assert set(batch) == {"input_ids", "attention_mask"} and batch["input_ids"].shape == (2, 4)
    assert io.count_tokens(["héllo"]) == [6]
    with pytest.raises(ValueError, match="prompt 1 has 300 tokens; gpt2-shakespeare has 256 positions"):
        io.encode_prompts(["x", "y" * 300])
    with pytest.raises(ValueError, match=r"token ids \[257\] are outside gpt2-shakespeare's vocabulary \(0..256\)"):
        io.decode_tokens([65, 257])
    with pytest.raises(ValueError, match="gpt2-shakespeare is a text-decoder; embeddings come from encoders"):
        io.embeddings({}, {})
    with pytest.raises(ValueError, match="gpt2-shakespeare is a text model: load_io needs its checkpoint folder"):
        load_io(get_config("gpt2-shakespeare"), None)


def test_decoder_with_tokenizer_json(bert_folder, tmp_path, caplog):
    (tmp_path / "tokenizer.json").write_bytes((bert_folder / "tokenizer.json").read_bytes())
    (tmp_path / "config.json").write_text(json.dumps({"eos_token_id": [3, 4], "bos_token_id": None}))
    config = ModelConfig("tiny-decoder", "gpt2", 32, 2, 4, 64, vocab_size=200, max_positions=32, pooler="none")
    with caplog.at_level(logging.INFO, logger="edgeprism.inputs.io"):
        io = load_io(config, tmp_path)
    assert "tiny-decoder: text-decoder" in caplog.text
    assert io.eos_token_id == 3 and io.bos_token_id is None
    assert io.encode_prompts(["hot water"]) == [[2, WORDS.index("hot") + 5, WORDS.index("water") + 5, 3]]
    assert io.decode_tokens([2, WORDS.index("hot") + 5, 3]) == "hot"
