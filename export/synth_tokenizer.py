"""A small, deterministic stand-in for the MiniCPM-o tokenizer (offline, for synthetic checkpoints).

Same pipeline as the real one (Qwen2 byte-level BPE: NFC, the Qwen split regex, ByteLevel) with
all 256 bytes plus a few hundred merges learned from a short embedded text, followed by every
MiniCPM-o added token with the real contents and special flags. The ids differ from the real
tokenizer on purpose: nothing downstream may assume the real ids.

The merges are learned here in plain Python rather than with tokenizers' BpeTrainer, whose
tie-breaking between equally frequent pairs is not guaranteed stable across runs.
"""

from __future__ import annotations

import json
from collections import Counter
from functools import lru_cache
from itertools import pairwise
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, models, normalizers, pre_tokenizers, processors

ASSET = Path(__file__).parent / "assets" / "upstream_tokenizer.json"
NUM_MERGES = 400
SPLIT_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
CORPUS = """\
The little robot woke up early and looked at the picture on the wall. It showed a red house near a
river, two trees, a small boat and a dog running in the grass. "What do you see in this image?" asked
the teacher. The robot said: there is a house, there are trees, and the water is blue and calm.
Please describe the photo in detail. The cat is sitting on the table next to a cup of tea. A man
is reading a book while the children play outside in the garden. The weather is sunny and warm.
You are a helpful assistant. Answer the question and explain your reasoning step by step.
What is the color of the car? How many people are in the room? Where is the nearest station?
Listen to the audio and write down what the speaker says. The speaker talks about the history of
the city, its old bridges, the market on Saturday morning and the music in the evening.
Numbers: 0 1 2 3 4 5 6 7 8 9 10 12 24 48 100 2024 3.14 1,000. Code: def main(): return x + y
Thank you! I think that this is a good answer, but it could be shorter. Let me try again.
"""


@lru_cache(maxsize=1)
def upstream_tokenizer_metadata() -> dict:
    """The real tokenizer_config.json (less its id table) and added tokens, from the bundled asset."""
    return json.loads(ASSET.read_text(encoding="utf-8"))


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map (the alphabet of ByteLevel)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) \
        + list(range(ord("®"), ord("ÿ") + 1))
    extra = [b for b in range(256) if b not in printable]
    chars = printable + [256 + i for i in range(len(extra))]
    return {b: chr(c) for b, c in zip(printable + extra, chars, strict=True)}


def _pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
    ])


def _merge(symbols: list[str], pair: tuple[str, str]) -> list[str]:
    out, i = [], 0
    while i < len(symbols):
        if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == pair:
            out.append(symbols[i] + symbols[i + 1])
            i += 2
        else:
            out.append(symbols[i])
            i += 1
    return out


def learn_merges(text: str, num_merges: int) -> list[tuple[str, str]]:
    """Classic BPE on the pre-tokenized text; ties go to the lexicographically smallest pair."""
    words = Counter(w for w, _ in _pre_tokenizer().pre_tokenize_str(text))
    split = {w: list(w) for w in words}
    merges: list[tuple[str, str]] = []
    for _ in range(num_merges):
        pairs: Counter[tuple[str, str]] = Counter()
        for w, count in words.items():
            for pair in pairwise(split[w]):
                pairs[pair] += count
        if not pairs:
            break
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(best)
        split = {w: _merge(s, best) for w, s in split.items()}
    return merges


def grown_bpe(n_tokens: int, seed: int = 0) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """A base BPE vocabulary of `n_tokens` entries and its merges: the stand-in's merges, then merges of
    two tokens drawn at random (word-like pieces, with and without a leading space) until the size is
    reached. With the added tokens on top (`make_tokenizer(*grown_bpe(REAL_BASE_VOCAB))`) it has the
    real tokenizer's size, for costs that scale with the vocabulary (grammar masks), without ../shared."""
    import random

    vocab = {ch: i for i, ch in enumerate(bytes_to_unicode().values())}
    merges = learn_merges(CORPUS, NUM_MERGES)
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    rng = random.Random(seed)
    pieces = [t for t in vocab if t.lstrip("Ġ").isalnum()]  # letters, digits, "Ġword": mergeable word parts
    while len(vocab) < n_tokens:
        a, b = rng.choice(pieces), rng.choice(pieces)
        if b.startswith("Ġ") or a + b in vocab:
            continue
        merges.append((a, b))
        vocab[a + b] = len(vocab)
        if len(a + b) < 8:  # keeps the pieces short, as most real tokens are
            pieces.append(a + b)
    return vocab, merges


def make_tokenizer(vocab: dict[str, int] | None = None, merges: list[tuple[str, str]] | None = None
                   ) -> tuple[Tokenizer, dict[str, int], list[tuple[str, str]]]:
    """(tokenizer, base vocab, merges), built in memory. Given a base BPE vocabulary and its merges
    (e.g. Qwen2.5's, read from a GGUF), the MiniCPM-o tokenizer over them; else the small stand-in."""
    if vocab is None or merges is None:
        vocab = {ch: i for i, ch in enumerate(bytes_to_unicode().values())}
        merges = learn_merges(CORPUS, NUM_MERGES)
        for a, b in merges:
            vocab.setdefault(a + b, len(vocab))
    tok = Tokenizer(models.BPE(vocab=dict(vocab), merges=list(merges), fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = _pre_tokenizer()
    tok.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    tok = _match_upstream_json(tok)
    for content, special in upstream_tokenizer_metadata()["added_tokens"]:  # one by one: keeps the order
        token = AddedToken(content, single_word=False, lstrip=False, rstrip=False, normalized=False,
                           special=special)
        (tok.add_special_tokens if special else tok.add_tokens)([token])
    return tok, vocab, merges


def _match_upstream_json(tok: Tokenizer) -> Tokenizer:
    """Set the fields the Python constructors leave at other defaults to the upstream values."""
    spec = json.loads(tok.to_str())
    spec["decoder"] = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}
    spec["model"].update(continuing_subword_prefix="", end_of_word_suffix="")
    return Tokenizer.from_str(json.dumps(spec))


def build_tokenizer(out_dir: str | Path, vocab: dict[str, int] | None = None,
                    merges: list[tuple[str, str]] | None = None) -> int:
    """Write tokenizer.json, tokenizer_config.json, special_tokens_map.json, added_tokens.json,
    vocab.json and merges.txt into out_dir; return the vocabulary size (added tokens included).
    vocab, merges: a base BPE to build on (make_tokenizer); None for the small stand-in."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok, vocab, merges = make_tokenizer(vocab, merges)
    tok.save(str(out / "tokenizer.json"))
    added = {content: tok.token_to_id(content) for content, _ in upstream_tokenizer_metadata()["added_tokens"]}
    _write_json(out / "tokenizer_config.json", _tokenizer_config(added))
    cfg = upstream_tokenizer_metadata()["tokenizer_config"]
    keys = ("additional_special_tokens", "bos_token", "eos_token", "pad_token", "unk_token")
    _write_json(out / "special_tokens_map.json", {k: cfg[k] for k in keys})
    _write_json(out / "added_tokens.json", added)
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False, separators=(",", ":")), encoding="utf-8")
    lines = ["#version: 0.2"] + [f"{a} {b}" for a, b in merges]
    (out / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return tok.get_vocab_size(with_added_tokens=True)


def _tokenizer_config(added: dict[str, int]) -> dict:
    meta = upstream_tokenizer_metadata()
    flags = dict(meta["added_tokens"])
    decoder = {str(i): {"content": c, "single_word": False, "lstrip": False, "rstrip": False,
                        "normalized": False, "special": flags[c]} for c, i in added.items()}
    cfg = dict(meta["tokenizer_config"])
    head = {k: cfg.pop(k) for k in ("add_bos_token", "add_prefix_space")}  # upstream key order
    return {**head, "added_tokens_decoder": decoder, **cfg}


def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
