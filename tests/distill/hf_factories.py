"""Tiny Hugging Face models and tokenizers for tests, built offline in milliseconds.

- :func:`make_word_tokenizer`: a word-level fast tokenizer (one id per word, split on
  whitespace) with specials ``<unk>`` (0), ``<pad>`` (1), ``<eos>`` (2), then the words.
- :func:`tiny_gpt2`, :func:`tiny_llama`, :func:`tiny_bert_classifier`: randomly initialised
  (seeded) models sized to that tokenizer.
- :func:`synthetic_language`: sentences of a toy grammar with number agreement
  (``the cat sees a dog .`` / ``the cats see a dog .``) that a small model learns quickly;
  :data:`SYNTHETIC_WORDS` is its whole vocabulary.
- :func:`save_model_dir`: ``save_pretrained`` of model + tokenizer (safetensors only).
"""

from __future__ import annotations

import random
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

__all__ = [
    "SPECIAL_TOKENS",
    "SYNTHETIC_WORDS",
    "CHAT_TEMPLATE",
    "make_word_tokenizer",
    "tiny_gpt2",
    "tiny_llama",
    "tiny_bert_classifier",
    "synthetic_language",
    "save_model_dir",
]

SPECIAL_TOKENS = ["<unk>", "<pad>", "<eos>"]

# A simple chat template over words the tokenizer knows ("user", "assistant", ":").
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] }} : {{ message['content'] }} <eos> {% endfor %}"
    "{% if add_generation_prompt %}assistant :{% endif %}"
)

_DETERMINERS = ["the", "a", "every", "some"]
_NOUNS = ["cat", "dog", "bird", "child", "teacher", "robot"]
_PLURAL = {"child": "children"}
_VERBS = ["see", "chase", "like", "help", "follow"]
_ADJECTIVES = ["big", "small", "red", "quiet"]
_ADVERBS = ["often", "never", "quickly"]


def _plural(noun: str) -> str:
    return _PLURAL.get(noun, noun + "s")


def _third_person(verb: str) -> str:
    return verb + ("es" if verb.endswith(("s", "sh", "ch")) else "s")


SYNTHETIC_WORDS: list[str] = sorted(
    set(_DETERMINERS + ["the", "these", "those", "and", ".", "user", "assistant", ":"]
        + _NOUNS + [_plural(n) for n in _NOUNS] + _VERBS + [_third_person(v) for v in _VERBS]
        + _ADJECTIVES + _ADVERBS)
)


def make_word_tokenizer(words: list[str], with_chat_template: bool = False) -> PreTrainedTokenizerFast:
    """A word-level tokenizer: ids 0..2 are ``<unk> <pad> <eos>``, then ``words`` in order
    (duplicates dropped). Unknown words map to ``<unk>``; decode joins words with spaces."""
    vocab: dict[str, int] = {}
    for token in [*SPECIAL_TOKENS, *words]:
        vocab.setdefault(token, len(vocab))
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins tokens with single spaces
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", pad_token="<pad>",
                                        eos_token="<eos>", model_max_length=1024)
    if with_chat_template:
        tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def _ids(tokenizer) -> dict:
    return {"bos_token_id": tokenizer.eos_token_id, "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id}


def tiny_gpt2(tokenizer, n_layer: int = 4, n_embd: int = 64, n_head: int = 4, n_positions: int = 128,
              vocab_size: int | None = None, seed: int = 0) -> GPT2LMHeadModel:
    """A GPT-2 LM (tied embeddings) with ``vocab_size`` rows (default ``len(tokenizer)``); bos = eos."""
    config = GPT2Config(vocab_size=vocab_size or len(tokenizer), n_layer=n_layer, n_embd=n_embd, n_head=n_head,
                        n_positions=n_positions, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **_ids(tokenizer))
    torch.manual_seed(seed)
    return GPT2LMHeadModel(config).eval()


def tiny_llama(tokenizer, num_hidden_layers: int = 4, hidden_size: int = 64, intermediate_size: int = 128,
               num_attention_heads: int = 4, num_key_value_heads: int = 2, max_position_embeddings: int = 128,
               vocab_size: int | None = None, tie_word_embeddings: bool = False, seed: int = 0) -> LlamaForCausalLM:
    """A small Llama LM (grouped-query attention, untied head by default); bos = eos."""
    config = LlamaConfig(vocab_size=vocab_size or len(tokenizer), hidden_size=hidden_size,
                         intermediate_size=intermediate_size, num_hidden_layers=num_hidden_layers,
                         num_attention_heads=num_attention_heads, num_key_value_heads=num_key_value_heads,
                         max_position_embeddings=max_position_embeddings, tie_word_embeddings=tie_word_embeddings,
                         **_ids(tokenizer))
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()


def tiny_bert_classifier(tokenizer, num_labels: int, num_hidden_layers: int = 4, hidden_size: int = 64,
                         num_attention_heads: int = 4, intermediate_size: int = 128, seed: int = 0
                         ) -> BertForSequenceClassification:
    """A small BERT sequence classifier with ``num_labels`` outputs."""
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=hidden_size, num_hidden_layers=num_hidden_layers,
                        num_attention_heads=num_attention_heads, intermediate_size=intermediate_size,
                        max_position_embeddings=128, num_labels=num_labels, pad_token_id=tokenizer.pad_token_id,
                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    torch.manual_seed(seed)
    return BertForSequenceClassification(config).eval()


def synthetic_language(n_sentences: int, seed: int) -> list[str]:
    """Sentences ``DET [ADJ] NOUN [ADV] VERB DET [ADJ] NOUN [and VERB DET NOUN] .`` where the verb
    agrees in number with the subject (singular subject -> ``sees``, plural -> ``see``) and
    plural subjects take ``the``/``these``/``those``/``some``. Deterministic for a seed."""
    rng = random.Random(seed)

    def noun_phrase(plural: bool) -> list[str]:
        det = rng.choice(["the", "these", "those", "some"] if plural else ["the", "a", "every"])
        words = [det]
        if rng.random() < 0.3:
            words.append(rng.choice(_ADJECTIVES))
        noun = rng.choice(_NOUNS)
        words.append(_plural(noun) if plural else noun)
        return words

    def verb(plural: bool) -> str:
        v = rng.choice(_VERBS)
        return v if plural else _third_person(v)

    sentences = []
    for _ in range(n_sentences):
        plural = rng.random() < 0.5
        words = noun_phrase(plural)
        if rng.random() < 0.2:
            words.append(rng.choice(_ADVERBS))
        words.append(verb(plural))
        words += noun_phrase(rng.random() < 0.5)
        if rng.random() < 0.25:
            words += ["and", verb(plural), *noun_phrase(rng.random() < 0.5)]
        words.append(".")
        sentences.append(" ".join(words))
    return sentences


def save_model_dir(model, tokenizer, path) -> Path:
    """Write ``model`` (safetensors) and ``tokenizer`` to ``path``; returns the path."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
