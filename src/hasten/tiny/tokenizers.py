"""Tokenizers for the tiny models, trained here on a small built-in English corpus.

Real transformers tokenizer classes (CLIP byte-level BPE, T5 Unigram, Llama Metaspace BPE) with
vocabularies and merges learned by a small deterministic trainer of our own, so every machine
builds identical token ids without downloading anything.
"""

from __future__ import annotations

import collections
import functools
import math
import re
import string

__all__ = ["clip_tokenizer", "llama_tokenizer", "sentences", "t5_tokenizer"]

_CORPUS = """\
A red fox walks through the snow at sunrise.
A small cat sleeps on a warm window sill in the afternoon light.
An astronaut rides a white horse across the surface of the moon.
A bowl of fresh fruit on a wooden kitchen table, oil painting.
A busy city street at night with neon signs reflected in the rain.
A golden retriever runs along the beach as waves crash behind it.
A mountain lake surrounded by pine trees under a clear blue sky.
A cup of coffee with steam rising, close-up photograph, soft focus.
An old lighthouse on a rocky cliff during a violent storm.
A hot air balloon floats over green fields and a quiet village.
A portrait of a young woman with curly hair, studio lighting.
A robot reads a book in a library full of tall shelves.
A field of sunflowers stretches toward the distant hills.
A snowy cabin in the woods with smoke coming from the chimney.
A colorful parrot sits on a branch in the tropical rain forest.
A train crosses a stone bridge over a deep green valley.
Two children fly a kite on a windy day in the park.
A plate of pasta with tomato sauce and basil leaves.
A sailboat drifts on calm water at sunset, watercolor style.
A dragon made of clouds flies above the castle towers.
The camera slowly pans across a desert with tall sand dunes.
A panda eats bamboo while sitting in the shade of a tree.
A cyberpunk city skyline with flying cars, digital art.
A cozy living room with a fireplace, a sofa and a sleeping dog.
A jellyfish glows softly in the dark blue ocean.
A man in a black coat walks his bike down a narrow street.
Cherry blossoms fall gently onto a wooden bridge over a pond.
A close-up of a butterfly resting on a purple flower.
A vintage car parked in front of a small diner at dusk.
The waves roll onto the shore while seagulls circle overhead.
A chef chops vegetables quickly in a bright restaurant kitchen.
A waterfall pours into a clear pool in the middle of the jungle.
An owl with large yellow eyes watches from a branch at night.
A tiny house built on top of a giant mushroom, fantasy art.
Fireworks light up the sky above the river and the old town.
A horse gallops across the meadow, cinematic slow motion.
A glass of orange juice on a table next to a stack of pancakes.
A knight in shining armor stands in front of a burning village.
Rain drops slide down the window of a moving car.
A snowy owl spreads its wings and lifts off from a fence post, 4k, high quality, 8 frames per second.
Describe the video by detailing the following aspects: the main content and theme of the video, \
the color, shape, size, texture, quantity, text, and spatial relationships of the objects, \
actions, events, behaviors, temporal relationships, physical movement changes of the objects, \
background environment, light, style and atmosphere, camera angles, movements, and transitions \
used in the video.
"""


def sentences() -> list[str]:
    """The corpus, one sentence per item (also a source of prompts for tiny-model demos)."""
    return [line for line in _CORPUS.splitlines() if line]


def _learn_bpe(words: collections.Counter, num_merges: int) -> list[tuple[str, str]]:
    """Learn up to ``num_merges`` BPE merges from ``words`` (symbol tuples -> counts).

    Plain Python and fully deterministic: the most frequent pair wins, ties go to the smallest
    pair in string order.
    """
    vocab = dict(words)
    merges: list[tuple[str, str]] = []
    for _ in range(num_merges):
        pairs: collections.Counter = collections.Counter()
        for word, count in vocab.items():
            for pair in zip(word, word[1:]):
                pairs[pair] += count
        if not pairs:
            break
        best = min(pairs.items(), key=lambda item: (-item[1], item[0]))[0]
        merges.append(best)
        merged = best[0] + best[1]
        new_vocab: dict[tuple[str, ...], int] = {}
        for word, count in vocab.items():
            out: list[str] = []
            i = 0
            while i < len(word):
                if i + 1 < len(word) and (word[i], word[i + 1]) == best:
                    out.append(merged)
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            key = tuple(out)
            new_vocab[key] = new_vocab.get(key, 0) + count
        vocab = new_vocab
    return merges


def _bytes_to_unicode() -> list[str]:
    """The 256 printable characters byte-level BPE (GPT-2, CLIP) uses for bytes 0..255, in byte order."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            chars[byte] = chr(byte)
        else:
            chars[byte] = chr(256 + extra)
            extra += 1
    return [chars[byte] for byte in range(256)]


@functools.cache
def _clip_vocab() -> tuple[dict[str, int], tuple[tuple[str, str], ...]]:
    from transformers import CLIPTokenizer

    # Pre-tokenize exactly as CLIPTokenizer does (lowercase, regex split, byte-level chars).
    backend = CLIPTokenizer().backend_tokenizer
    words: collections.Counter = collections.Counter()
    for sentence in sentences():
        for piece, _ in backend.pre_tokenizer.pre_tokenize_str(backend.normalizer.normalize_str(sentence)):
            words[tuple(piece[:-1]) + (piece[-1] + "</w>",)] += 1
    merges = _learn_bpe(words, 1000)  # every corpus word ends up one token
    alphabet = _bytes_to_unicode()
    tokens = alphabet + [c + "</w>" for c in alphabet] + [a + b for a, b in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {token: i for i, token in enumerate(tokens)}, tuple(merges)


def clip_tokenizer():
    """A CLIPTokenizer (byte-level BPE with ``</w>``): 256 + 256 base tokens, corpus merges, bos/eos."""
    from transformers import CLIPTokenizer

    vocab, merges = _clip_vocab()
    return CLIPTokenizer(vocab=dict(vocab), merges=list(merges), model_max_length=77)


_T5_SPECIALS = ("<pad>", "</s>", "<unk>")


@functools.cache
def _t5_vocab() -> tuple[tuple[str, float], ...]:
    counts: collections.Counter = collections.Counter()
    for sentence in sentences():
        for chunk in sentence.split():
            for word in re.findall(r"[A-Za-z0-9]+|[^A-Za-z0-9]", chunk):
                counts[word] += 1
                counts[word.lower()] += 0  # lower-case forms are pieces too
    total = sum(counts.values())
    pieces: list[tuple[str, float]] = [(token, 0.0) for token in _T5_SPECIALS]
    pieces.append(("▁", -4.0))
    seen = {piece for piece, _ in pieces}
    # Whole words as "▁word" (start of a chunk) and "word" (after punctuation); log-frequency scores.
    for word in sorted(counts, key=lambda w: (-counts[w], w)):
        score = math.log(max(counts[word], 1) / total)
        for piece in ("▁" + word, word):
            if len(piece) > 1 and piece not in seen:
                pieces.append((piece, round(score, 4)))
                seen.add(piece)
    # Every printable ASCII character as a last resort, so most prompts never hit <unk>.
    for char in string.ascii_letters + string.digits + string.punctuation:
        if char not in seen:
            pieces.append((char, -20.0))
            seen.add(char)
    return tuple(pieces)


def t5_tokenizer():
    """A T5Tokenizer (SentencePiece-style Unigram): <pad>=0, </s>=1, <unk>=2, corpus words, ASCII chars."""
    from transformers import T5Tokenizer

    return T5Tokenizer(vocab=list(_t5_vocab()), extra_ids=0, model_max_length=512)


# HunyuanVideo's prompt template (diffusers' DEFAULT_PROMPT_TEMPLATE) uses these Llama-3 markers.
_LLAMA_SPECIALS = ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")


@functools.cache
def _llama_vocab() -> tuple[dict[str, int], tuple[tuple[str, str], ...]]:
    words: collections.Counter = collections.Counter()
    for sentence in sentences():
        # LlamaTokenizer: no normalizer, Metaspace "▁" for spaces, prepended at the start.
        for piece in re.findall(r"▁[^▁]*", "▁" + sentence.replace(" ", "▁")):
            words[tuple(piece)] += 1
    merges = _learn_bpe(words, _LLAMA_MERGES)
    chars = sorted({c for word in words for c in word} | set(string.printable.strip()) | {"▁"})
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{byte:02X}>" for byte in range(256)] + chars
    tokens += [a + b for a, b in merges]
    return {token: i for i, token in enumerate(tokens)}, tuple(merges)


# Chosen so that diffusers' default HunyuanVideo template tokenizes to exactly its crop_start (95)
# tokens before the prompt, as with the real Llama-3 tokenizer (checked in tests/test_tiny.py).
_LLAMA_MERGES = 872


def llama_tokenizer(**kwargs):
    """A LlamaTokenizer (Metaspace BPE with byte fallback), right padding, <pad> and Llama-3 header tokens.

    ``kwargs`` go to the ``LlamaTokenizer`` constructor, e.g. ``extra_special_tokens={"image_token":
    "<image>"}`` for a multimodal model's named tokens (add them to the vocabulary with
    ``add_tokens(..., special_tokens=True)``).
    """
    from transformers import LlamaTokenizer

    vocab, merges = _llama_vocab()
    kwargs = {"add_bos_token": True, "padding_side": "right", "model_max_length": 1024, **kwargs}
    tokenizer = LlamaTokenizer(vocab=dict(vocab), merges=list(merges), **kwargs)
    tokenizer.add_special_tokens({"pad_token": "<pad>"})
    tokenizer.add_tokens(list(_LLAMA_SPECIALS), special_tokens=True)
    return tokenizer
