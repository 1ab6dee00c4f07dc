"""segany.tokenize against open_clip's tokenizer (the test oracle) on a corpus of awkward text."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from segany.text import ClipTokenizer, VocabularyError, tokenize

from .conftest import import_reference

CORPUS = [
    "a dog",
    "",
    "   \t\n  ",
    "The QUICK brown Fox",
    "Café naïve résumé Ærøskøbing ŞİŞLİ",
    "😀 a cat 🐈‍⬛ on a 🏠, 👩🏽‍🚀!",
    "東京の猫と犬 고양이 кошка القط गाय",
    "&amp;lt;b&amp;gt; fish &quot;chips&quot; &#39;n&#39; &eacute; &nbsp;x",
    "!!!??? ... --- *** ((([[{{}}]]))) ~~~ $$$ ,,,;;;",
    "it's they're I'll we've you'd I'm can't",
    "12345 3.14 1,000,000 2nd",
    "\u00e2\u0080\u0099 mojibake â€™ Ã©",
    "tabs\tand\nnew\r\nlines  and   spaces",
    "<start_of_text> hello <end_of_text>",
    "x" * 500,
    " ".join(["word"] * 100),
    "a photo of " + "very " * 80 + "big dog",
    "ﬁne ﬂowers ＡＢＣ ①②",
    "\u200b zero\u200bwidth \u00ad soft",
]


def test_token_ids_identical_to_open_clip():
    open_clip = import_reference("open_clip")
    reference = open_clip.get_tokenizer("ViT-B-32-quickgelu")
    expected = reference(CORPUS)
    got = tokenize(CORPUS)
    assert got.dtype == torch.long and got.shape == (len(CORPUS), 77)
    for text, a, b in zip(CORPUS, got, expected):
        assert torch.equal(a, b), text


def test_structure_and_truncation():
    tok = ClipTokenizer()
    ids = tok(["a dog", "", "word " * 200])
    assert ids[0, 0] == tok.sot_token_id and ids[0, 3] == tok.eot_token_id and ids[0, 4:].eq(0).all()
    assert ids[1, :2].tolist() == [tok.sot_token_id, tok.eot_token_id]
    assert ids[2, -1] == tok.eot_token_id and ids[2].ne(0).all()
    assert tok.vocab_size == 49408
    assert tok.decode(tok.encode("Café 😀 dogs")) == "café 😀 dogs"
    assert tokenize("a dog").shape == (1, 77)


def test_missing_vocabulary_is_one_clear_error(tmp_path):
    with pytest.raises(VocabularyError, match="vocabulary is missing"):
        ClipTokenizer(tmp_path / "bpe_simple_vocab_16e6.txt.gz")
    bad = tmp_path / "bad.txt.gz"
    bad.write_bytes(b"not gzip")
    with pytest.raises(VocabularyError, match="damaged"):
        ClipTokenizer(bad)


def test_missing_extra_names_it():
    code = (
        "import sys; sys.modules['ftfy'] = None\n"
        "from segany.text import tokenize, TextDependencyError\n"
        "try:\n    tokenize('a dog')\nexcept TextDependencyError as e:\n    print(e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "segany[text]" in out and "ftfy" in out
