"""Streaming text equals one-shot decode: multi-byte UTF-8, byte-level BPE and SentencePiece spaces; stops."""
import pytest
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from server.engine.detokenizer import IncrementalDetokenizer
from server.engine.stop import StopStringMatcher
from tests import smollm2

TEXTS = [
    "Hello world, this is plain ASCII text with  double  spaces.",
    "Café naïve résumé — “quotes” and ellipsis… done",
    "日本語のテキストと中文混合 text 🙂🚀 emoji 👩‍👩‍👧 family",
    "\n\n  indented\tcode:\n    return x  # comment\n",
    "Ünïcödé ẞ ø å Ωμέγα Кириллица עברית",
]


@pytest.fixture(scope="module")
def bpe_tokenizer():
    return smollm2.loaded().tokenizer  # SmolLM2: byte-level BPE


@pytest.fixture(scope="module")
def sentencepiece_tokenizer():
    """A SentencePiece-style tokenizer (metaspace + byte fallback) trained in memory."""
    tok = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>"))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never", split=False)
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    bytes_ = [f"<0x{i:02X}>" for i in range(256)]
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "<s>", "</s>"] + bytes_,
                                  initial_alphabet=list("abcdefghijklmnopqrstuvwxyz▁"))
    tok.train_from_iterator(["hello world this is text with words", "the quick brown fox jumps"] * 20, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def _stream(tok, prompt_ids, ids):
    d = IncrementalDetokenizer(tok, prompt_ids)
    parts = [d.step([t]) for t in ids]
    parts.append(d.flush())
    return parts


@pytest.mark.parametrize("which", ["bpe_tokenizer", "sentencepiece_tokenizer"])
@pytest.mark.parametrize("text", TEXTS)
def test_streamed_text_equals_decode(which, text, request):
    tok = request.getfixturevalue(which)
    prompt = tok("Prompt: the start", add_special_tokens=False).input_ids
    full = tok(prompt and tok.decode(prompt) + " " + text, add_special_tokens=False).input_ids
    gen = full[len(prompt):] if full[:len(prompt)] == prompt else tok(text, add_special_tokens=False).input_ids
    parts = _stream(tok, prompt, gen)
    want = tok.decode(prompt + gen, skip_special_tokens=True)[len(tok.decode(prompt, skip_special_tokens=True)):]
    assert "".join(parts) == want
    assert all("\ufffd" not in p for p in parts if p)  # never a half character mid-stream


def test_incomplete_character_held_then_flushed(bpe_tokenizer):
    tok = bpe_tokenizer
    ids = tok("🚀", add_special_tokens=False).input_ids
    assert len(ids) > 1  # one emoji, several byte tokens
    d = IncrementalDetokenizer(tok, tok("x", add_special_tokens=False).input_ids)
    assert [d.step([t]) for t in ids[:-1]] == [""] * (len(ids) - 1)
    assert d.step(ids[-1:]) == "🚀"
    d2 = IncrementalDetokenizer(tok, [])
    d2.step(ids[:1])
    assert d2.flush() == "\ufffd"  # cut short: the partial byte is shown at the end, not lost


@pytest.mark.parametrize("chunks,stops,emitted,stopped", [
    (["Hello ", "wor", "ld"], ["world"], "Hello ", True),
    (["abc", "STO", "X"], ["STOP"], "abcSTOX", False),
    (["a", "b", "c"], ["bc", "abcd"], "a", True),
    (["one\n", "\ntwo"], ["\n\n"], "one", True),
    (["xx#", "#", "#yy"], ["###"], "xx", True),
    (["plain"], [], "plain", False),
])
def test_stop_strings_never_leak(chunks, stops, emitted, stopped):
    m = StopStringMatcher(stops)
    out, hit = "", False
    for c in chunks:
        t, hit = m.feed(c)
        out += t
        for s in stops:  # no emitted prefix of the stream ever ends inside a stop string
            assert s not in out
        if hit:
            break
    if not hit:
        out += m.flush()
    assert (out, hit) == (emitted, stopped)
