"""Small random checkpoint folders of each family, written by transformers' `save_pretrained` exactly as a
user's fine-tuned model would be (config.json + model.safetensors, tokenizer.json where text needs one)."""

import json
from pathlib import Path

import torch

from edgeprism.models.registry import list_families

WORDS = ("the a cat dog sat on mat ran fast slow red blue big small house tree bird sings loud quiet "
         "river flows north south").split()


def _quiet_transformers():
    transformers = __import__("transformers")
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    return transformers


def word_tokenizer(folder: Path) -> int:
    """A BERT-style tokenizer.json over WORDS ([CLS] text [SEP]); returns its vocabulary size."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    vocab = {tok: i for i, tok in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", *WORDS])}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    tokenizer.save(str(folder / "tokenizer.json"))
    return len(vocab)


def vit_folder(folder: Path, seed: int = 0, num_labels: int = 0) -> Path:
    """ViTModel (with its pooler), or ViTForImageClassification with `num_labels` classes (no pooler)."""
    transformers = _quiet_transformers()
    torch.manual_seed(seed)
    config = transformers.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                                    image_size=32, patch_size=8, num_labels=max(num_labels, 2),
                                    id2label={i: f"class{i}" for i in range(max(num_labels, 2))})
    model = transformers.ViTForImageClassification(config) if num_labels else transformers.ViTModel(config)
    model.save_pretrained(folder)
    return folder


def bert_folder(folder: Path, seed: int = 0) -> Path:
    transformers = _quiet_transformers()
    torch.manual_seed(seed)
    folder.mkdir(parents=True, exist_ok=True)
    vocab = word_tokenizer(folder)
    config = transformers.BertConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=64, max_position_embeddings=64)
    transformers.BertModel(config).save_pretrained(folder)
    return folder


def roberta_folder(folder: Path, seed: int = 0) -> Path:
    """RoBERTa: BERT's blocks, one segment type, positions counted from pad_token_id + 1."""
    transformers = _quiet_transformers()
    torch.manual_seed(seed)
    config = transformers.RobertaConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                        intermediate_size=64, max_position_embeddings=66, type_vocab_size=1,
                                        pad_token_id=1)
    transformers.RobertaModel(config).save_pretrained(folder)
    return folder


def gpt2_folder(folder: Path, seed: int = 0) -> Path:
    """A byte-level GPT-2 (vocabulary 257, BOS = EOS = 256: edgeprism's byte tokenizer convention)."""
    transformers = _quiet_transformers()
    torch.manual_seed(seed)
    config = transformers.GPT2Config(vocab_size=257, n_embd=32, n_layer=2, n_head=4, n_positions=128,
                                     bos_token_id=256, eos_token_id=256)
    transformers.GPT2LMHeadModel(config).save_pretrained(folder)
    return folder


def llama_folder(folder: Path, seed: int = 0) -> Path:
    """A Llama-family decoder (grouped-query attention, untied head), byte-level vocabulary."""
    transformers = _quiet_transformers()
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(vocab_size=257, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                      bos_token_id=256, eos_token_id=256, tie_word_embeddings=False)
    transformers.LlamaForCausalLM(config).save_pretrained(folder)
    return folder


def unsupported_folder(folder: Path, model_type: str = "mpnet") -> Path:
    """A folder whose config.json names an architecture edgeprism does not split (no weights needed)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({"model_type": model_type, "hidden_size": 32}))
    return folder


def has_llama() -> bool:
    return "llama" in list_families()


BUILDERS = {"vit": vit_folder, "bert": bert_folder, "gpt2": gpt2_folder, "llama": llama_folder}
