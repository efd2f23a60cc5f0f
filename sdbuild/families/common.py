"""What the families' random-weight pipelines share: seeded construction, and tokenizers and text
encoders built from code (no downloads). Imported by the family modules only; imports none of them."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any, Dict


def seeded(**builders):
    """name -> (seed, build) in, name -> built module out: each built right after `torch.manual_seed(seed)`,
    in the order given, so random weights are the same on every machine; the caller's RNG is left as it was."""
    import torch

    state = torch.random.get_rng_state()
    try:
        built = {}
        for name, (seed, build) in builders.items():
            torch.manual_seed(seed)
            built[name] = build()
        return built
    finally:
        torch.random.set_rng_state(state)


def byte_level_vocab() -> Dict[str, int]:
    """A complete byte-level BPE vocabulary with no merges: every string tokenizes, one
    token per character. Real CLIP has 49k merges; the encoder does not care which ids it sees."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    chars = [chr(c) for c in cs]
    tokens = chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(tokens)}


def clip_tokenizer():
    """A CLIPTokenizer over the byte-level vocabulary, and the vocabulary itself."""
    from transformers import CLIPTokenizer

    vocab = byte_level_vocab()
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "vocab.json").write_text(json.dumps(vocab))
        (Path(tmp) / "merges.txt").write_text("#version: 0.2\n")
        # Positional file paths: accepted by transformers 4.x and 5.x alike.
        return CLIPTokenizer(str(Path(tmp) / "vocab.json"), str(Path(tmp) / "merges.txt"), model_max_length=77), vocab


def clip_text_encoder(cls, config: Dict[str, Any], vocab: Dict[str, int]):
    """A CLIP text tower (`cls`: CLIPTextModel or CLIPTextModelWithProjection) sized for `vocab`."""
    from transformers import CLIPTextConfig

    eos = vocab["<|endoftext|>"]
    config = dict(config, vocab_size=max(config.get("vocab_size", 0), len(vocab)))
    return cls(CLIPTextConfig(bos_token_id=vocab["<|startoftext|>"], eos_token_id=eos, pad_token_id=eos, **config)).eval()


def t5_tokenizer(max_length: int = 512):
    """A T5 tokenizer (SentencePiece-style Unigram) over single characters, built from code: every
    printable Latin-1 character is a piece, with and without the word-start marker; T5's special
    tokens keep their ids (pad 0, eos 1, unk 2). Real T5 has 32k pieces; the encoder does not care
    which ids it sees."""
    from transformers import T5Tokenizer

    chars = [chr(c) for c in range(33, 127)] + [chr(c) for c in range(161, 256)]
    vocab = ([("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
             + [(c, -3.0) for c in chars] + [("\u2581" + c, -2.5) for c in chars])
    return T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=max_length)


def t5_encoder(config: Dict[str, Any], tokenizer):
    from transformers import T5Config, T5EncoderModel

    config = dict(config, vocab_size=config["vocab_size"] or len(tokenizer))
    return T5EncoderModel(T5Config(is_encoder_decoder=False, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
                                   **config)).eval()
