"""Incremental detokenization (llama_mm.detokenize): the pieces TextStream emits token by token concatenate to the
one-shot decode of all the ids (Llama-3-style byte-level tokenizer with characters split across tokens and special
tokens skipped; a SentencePiece-style decoder that drops a leading space), with a bounded number of ids decoded per
token; AnswerText ends at an end id and cuts at stop strings exactly as cut_at_stops does on the one-shot decode."""
import random

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from llama_mm.detokenize import AnswerText, TextStream, cut_at_stops, find_stop
from tokenizer_fixture import write_tokenizer_files

TEXT = ("Grüße aus Köln — naïve café, 日本語のテキスト, emoji 😀🎉 and ASCII code: def f(x): return x ** 2\n"
        "Ελληνικά, русский, العربية; ✓ ∑ ∫ ≠ ∞.")


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    write_tokenizer_files(d, vocab_size=8192)
    return Tokenizer.from_file(str(d / "tokenizer.json"))


def decoder(tok, calls=None):
    def decode(ids):
        if calls is not None:
            calls.append(len(ids))
        return tok.decode(list(ids), skip_special_tokens=True)
    return decode


def whole_chars(text: str) -> str:
    """decode() of a prefix may end in U+FFFD for a character whose last bytes have not come yet."""
    return text.rstrip("\ufffd")


def test_pieces_concatenate_to_the_one_shot_decode(tok):
    ids = tok.encode(TEXT, add_special_tokens=False).ids
    decode = decoder(tok)
    # characters split across tokens: some prefixes decode to a partial character (U+FFFD)
    assert any(decode(ids[:n]).endswith("\ufffd") for n in range(1, len(ids)))
    special = tok.token_to_id("<|eot_id|>")
    ids = ids[:20] + [special] + ids[20:]  # a special token inside: skipped, as in the one-shot decode
    stream, pieces = TextStream(decode), []
    for n, i in enumerate(ids, 1):
        pieces.append(stream.add(i))
        assert stream.text == "".join(pieces) == whole_chars(decode(ids[:n]))  # never a partial character
    assert "".join(pieces) == decode(ids) == TEXT == stream.full()


def test_bounded_work_per_token(tok):
    """Each token decodes two short windows, however long the answer: no O(n) decode per token."""
    rng = random.Random(0)
    words = TEXT.split()
    ids = tok.encode(" ".join(rng.choice(words) for _ in range(1500)), add_special_tokens=False).ids
    assert len(ids) > 2000
    calls = []
    stream = TextStream(decoder(tok, calls))
    for i in ids:
        stream.add(i)
    assert stream.text == tok.decode(ids)
    assert len(calls) == 2 * len(ids) and max(calls) <= 8


def test_sentencepiece_style_leading_space():
    """A Metaspace decoder drops the leading space of a text's first word: the window's context keeps the spaces
    between pieces."""
    vocab = {"[UNK]": 0, "▁Hello": 1, "▁world": 2, "!": 3, "▁a": 4, "▁b": 5}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    ids = [1, 2, 3, 4, 5, 1]
    decode = decoder(tok)
    assert decode(ids[1:2]) == "world"  # alone, the space goes
    stream = TextStream(decode)
    pieces = [stream.add(i) for i in ids]
    assert pieces[:2] == ["Hello", " world"]
    assert "".join(pieces) == decode(ids) == "Hello world! a b Hello"


@pytest.mark.parametrize("stops", [["e, "], ["日本", "—"], ["x ** 2", "Köln"], ["🎉"], ["not there"], []])
def test_answer_text_cuts_at_stops_like_cut_at_stops(tok, stops):
    ids = tok.encode(TEXT, add_special_tokens=False).ids
    decode = decoder(tok)
    answer = AnswerText(decode, end_ids=(), stops=stops)
    for n, i in enumerate(ids, 1):
        answer.add(i)
        expect, hit = cut_at_stops(whole_chars(decode(ids[:n])), stops)
        assert (answer.text, answer.stopped) == (expect, hit)
        if hit:
            break
    assert answer.finish() == cut_at_stops(TEXT, stops)[0]
    assert answer.stopped == any(s in TEXT for s in stops)


def test_answer_text_ends_at_an_end_id(tok):
    ids = tok.encode(TEXT, add_special_tokens=False).ids
    end = tok.token_to_id("<|eot_id|>")
    answer = AnswerText(decoder(tok), end_ids={end})
    for i in ids[:30] + [end] + ids[30:]:
        answer.add(i)
    assert answer.ended and not answer.stopped
    assert answer.finish() == tok.decode(ids[:30])


def test_find_stop_looks_only_at_new_text():
    assert find_stop("abc STOP def", 0, ["STOP"]) == 4
    assert find_stop("abc STOP def", 5, ["STOP"]) == 4  # ends after 5: found
    assert find_stop("abc STOP def", 9, ["STOP"]) == -1  # ended before the new text
    # as cut_at_stops: a later stop string is looked for before the earlier one's cut
    text = "one two three"
    assert find_stop(text, 0, ["three", "two"]) == len(cut_at_stops(text, ["three", "two"])[0]) == 4
    assert find_stop("one two three", 0, ["two", "three"]) == 4
