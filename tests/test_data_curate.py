"""Curation: each filter keeps a good Vietnamese and English page and removes a bad one; PII redaction,
mojibake repair, the recipe's switches and the manifest's removal records."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.cli_helpers import run_vinasmol
from tests.data_fixtures import tiny_tokenizer, write_jsonl
from vinasmol_core.common.errors import ConfigError
from vinasmol_core.data import CurationSpec, PrepareSettings, SourceSpec, load_dataset_meta, prepare_dataset
from vinasmol_core.data.curate import Curator, _Doc, c4, fineweb, gopher_quality, gopher_repetition
from vinasmol_core.data.prepare import dataset_manifest
from vinasmol_core.plan.recipe import parse_recipe

VI_GOOD = """Hà Nội là thủ đô của Việt Nam và là một trong những thành phố lâu đời nhất ở Đông Nam Á.
Thành phố nằm bên bờ sông Hồng, nơi có nhiều hồ nước và công viên rộng lớn.
Người dân ở đây thường đi xe máy trên những con phố hẹp của khu phố cổ.
Mỗi năm có hàng triệu du khách đến thăm các đền chùa, bảo tàng và chợ truyền thống.
Ẩm thực Hà Nội nổi tiếng với phở, bún chả và nhiều món ăn đường phố khác.
Mùa thu được coi là mùa đẹp nhất trong năm vì trời mát và có hương hoa sữa.
Trong lịch sử, thành phố đã trải qua nhiều cuộc chiến tranh nhưng vẫn giữ được nét cổ kính."""

EN_GOOD = """The old lighthouse stands at the edge of the cliff, where the sea meets the northern rocks.
For more than a century its keepers have climbed the narrow stairs to light the lamp at dusk.
Sailors who passed the dangerous reef learned to trust the steady beam that swept the water.
In the summer of that year a storm tore the roof away, and the village gathered to rebuild it.
Children still listen to the stories of the keeper who stayed awake for three nights.
Today the tower is a museum, and visitors can see the great lens that once guided the ships.
The path to the top is steep, but the view of the coast is worth every step of the climb."""

GOOD = {"vi": VI_GOOD, "en": EN_GOOD}
SPEC = CurationSpec()


def _rules(lang: str, name: str):  # noqa: ANN202
    return getattr(SPEC.for_lang(lang), name)


@pytest.mark.parametrize("lang", ["vi", "en"])
def test_good_pages_pass_every_filter(lang: str) -> None:
    out = Curator(SPEC).filter(GOOD[lang], lang)
    assert out.text == GOOD[lang] and out.filter is None


@pytest.mark.parametrize("lang", ["vi", "en"])
def test_gopher_repetition(lang: str) -> None:
    rules = _rules(lang, "gopher_repetition")
    assert gopher_repetition(_Doc(GOOD[lang]), rules) is None
    first = GOOD[lang].split("\n")[0]
    repeated = "\n\n".join([GOOD[lang], first, first, first, first])
    assert gopher_repetition(_Doc(repeated), rules).startswith("dup_")
    # one phrase repeated inside lines: the n-gram rules, not the line rules
    phrase = first.rstrip(".") + ", "
    spam = "\n".join(GOOD[lang].split("\n")[1:4] + [phrase * 6 + "."])
    rule = gopher_repetition(_Doc(spam), rules)
    assert rule is not None and "gram" in rule


@pytest.mark.parametrize("lang", ["vi", "en"])
def test_gopher_quality(lang: str) -> None:
    rules = _rules(lang, "gopher_quality")
    assert gopher_quality(_Doc(GOOD[lang]), rules) is None
    short = GOOD[lang].split("\n")[0]
    assert gopher_quality(_Doc(short), rules).startswith("words ")
    numbers = GOOD[lang] + "\n" + " ".join(str(i) for i in range(400)) + "."
    assert gopher_quality(_Doc(numbers), rules).startswith("words with a letter")
    no_stop = " ".join(w for w in GOOD[lang].split() if w not in rules.stop_words)
    assert gopher_quality(_Doc(no_stop), rules).startswith("stop words")


def test_word_length_bounds_are_per_language() -> None:
    """Vietnamese syllables are shorter than English words: a Vietnamese page sits below English's bound."""
    vi_mean = sum(map(len, VI_GOOD.split())) / len(VI_GOOD.split())
    assert vi_mean < 3.9 and _rules("vi", "gopher_quality").min_avg_word_chars < 3.0
    mono = " ".join(["và là có ở"] * 30) + "."  # two-letter syllables only
    assert "mean word length" in gopher_quality(_Doc(mono), _rules("vi", "gopher_quality"))


@pytest.mark.parametrize("lang", ["vi", "en"])
def test_c4(lang: str) -> None:
    rules = _rules(lang, "c4")
    assert c4(GOOD[lang], rules) == (GOOD[lang], "")
    assert c4(GOOD[lang] + "\nLorem ipsum dolor sit amet, consectetur.", rules) == (None, "lorem ipsum")
    assert c4(GOOD[lang] + "\nvar x = {a: 1} is a thing here.", rules) == (None, "curly bracket")
    kept, _ = c4(GOOD[lang] + "\nPlease enable JavaScript to view this page.\nMenu\nSee our privacy policy "
                 "today.\nA line with a citation[12] in it.", rules)
    assert kept is not None and "JavaScript" not in kept and "Menu" not in kept and "privacy" not in kept
    assert kept.endswith("A line with a citation in it.")
    two = "\n".join(GOOD[lang].split("\n")[:2])
    assert c4(two, rules)[0] is None  # fewer than five sentences


@pytest.mark.parametrize("lang", ["vi", "en"])
def test_fineweb(lang: str) -> None:
    rules = _rules(lang, "fineweb")
    assert fineweb(_Doc(GOOD[lang]), rules) is None
    unpunctuated = GOOD[lang].replace(".", "")
    assert fineweb(_Doc(unpunctuated), rules).startswith("lines ending in punctuation")
    listing = GOOD[lang] + "\n" + "\n".join(f"Mục {i}." if lang == "vi" else f"Item {i}." for i in range(40))
    assert fineweb(_Doc(listing), rules).startswith(("short lines", "newlines per word"))
    lines = GOOD[lang].split("\n")
    duplicated = "\n".join(lines + lines[:2])
    assert fineweb(_Doc(duplicated), rules).startswith("characters in repeated lines")


def _flagged_spec(tmp_path: Path, max_ratio: float = 0.02) -> tuple[CurationSpec, dict]:
    words = tmp_path / "flagged.txt"
    words.write_text("# a list made for this test\nchết tiệt\nDarn\n", encoding="utf-8")
    rules = {"enabled": True, "path": str(words), "max_ratio": max_ratio}
    spec = CurationSpec(vi={"flagged_words": rules}, en={"flagged_words": rules})
    settings = PrepareSettings(curation=spec)
    from vinasmol_core.data.prepare import flagged_word_lists

    return spec, flagged_word_lists(settings)


@pytest.mark.parametrize("lang", ["vi", "en"])
def test_flagged_words(lang: str, tmp_path: Path) -> None:
    spec, lists = _flagged_spec(tmp_path)
    assert lists["vi"] == {"chết tiệt", "darn"}
    cur = Curator(spec, lists)
    assert cur.filter(GOOD[lang], lang).text == GOOD[lang]
    curse = " Chết tiệt!" if lang == "vi" else " Darn!"
    assert cur.filter(GOOD[lang] + curse, lang).text is not None  # one in a page: under 2%
    out = cur.filter(GOOD[lang] + curse * 6, lang)
    assert out.text is None and out.filter == "flagged_words"


def test_flagged_words_need_a_readable_list(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="gives no list"):
        CurationSpec(vi={"flagged_words": {"enabled": True}})
    spec = CurationSpec(en={"flagged_words": {"enabled": True, "path": str(tmp_path / "missing.txt")}})
    from vinasmol_core.data.prepare import flagged_word_lists

    with pytest.raises(ConfigError, match=r"curation\.en\.flagged_words\.path: cannot read"):
        flagged_word_lists(PrepareSettings(curation=spec))


def test_pii_redaction() -> None:
    cur = Curator(SPEC)
    text = ("Liên hệ nguyen.van.a@example.com.vn hoặc admin@mail.org để biết thêm. Máy chủ 8.8.8.8 và "
            "2001:4860:4860::8888 công khai; 192.168.1.20, 10.0.0.1 và 127.0.0.1 là nội bộ; "
            "tài liệu 2001:db8::1 cũng vậy. Số 300.1.2.3 không phải địa chỉ.")
    out = cur.redact(text)
    assert "@" not in out and out.count("<email>") == 2
    assert "8.8.8.8" not in out and "2001:4860:4860::8888" not in out and out.count("<ip>") == 2
    for kept in ("192.168.1.20", "10.0.0.1", "127.0.0.1", "2001:db8::1", "300.1.2.3"):
        assert kept in out
    off = Curator(CurationSpec(pii={"emails": False}))
    assert "admin@mail.org" in off.redact(text) and "<ip>" in off.redact(text)


def test_pii_leaves_slices_versions_sections_and_products() -> None:
    cur = Curator(SPEC)
    for text in ("evens = samples[2000::2]", "odd = x[1::2]", "print(a[3000::16])", "tail = data[1024::8]",
                 "Phiên bản Linux 2.6.32.1 được phát hành năm 2009.",
                 "Mục 5.4.3.2 của luật quy định như sau.", "phiên bản ổn định chính thức 1.0.154.36 vào",
                 "và:\n2.1.1.1. Định lượng ≤ 80g/m²", '# sections "8.2.4.44 Bogus" and\n# "8.2.4.45 Markup"',
                 "See RFC 7231, section 7.1.1.1.", "https://tools.ietf.org/html/rfc7231#section-7.1.1.1",
                 "Version 1.2.3.4.5 and 4.3.2.1.0", "'1.0.0.127.in-addr.arpa'", "IPv4Network('224.0.0.0/4')",
                 "return x@self.weight.T + self.bias", "scores = q@k.transpose(-2, -1)", "y = a@b.mT",
                 "user@localhost", "a..b@example.com"):
        assert cur.redact(text) == text, text
    out = cur.redact("Cloudflare DNS is 1.1.1.1 and 8.8.8.8; IPv6 2606:4700:4700::1111. Mail x@ex.com.vn.")
    assert out == "Cloudflare DNS is <ip> and <ip>; IPv6 <ip>. Mail <email>."
    assert cur.redact("Mục 2.\n8.8.8.8 là máy chủ DNS.", "vi") == "Mục 2.\n<ip> là máy chủ DNS."


def test_pii_code_rules() -> None:
    cur = Curator(SPEC)
    source = ('__author__ = "Jane Doe <jane.doe@python.org>"\n'
              "DNS = ['8.8.8.8', '2001:4860:4860::8888']  # version 7.1.4.34\n"
              "out = h@self.proj\nsparse = list(zip(s[::2], s[1::2]))\n")
    out = cur.redact(source, "code")
    assert out == source.replace("jane.doe@python.org", "<email>")
    assert cur.redact("Viết cho lan@studio.photography.", "vi") == "Viết cho <email>."  # any domain in prose
    both = Curator(CurationSpec(pii={"ips_in_code": True})).redact(source, "code")
    assert "['<ip>', '<ip>']" in both and "7.1.4.34" in both


def test_mojibake_repair() -> None:
    import ftfy.bad_codecs  # noqa: F401 - registers sloppy-windows-1252: cp1252 keeping its 5 unused bytes

    cur = Curator(SPEC)
    broken = VI_GOOD.encode("utf-8").decode("sloppy-windows-1252")
    assert broken != VI_GOOD and cur.repair(broken) == VI_GOOD
    latin1 = "Tiếng Việt và café".encode().decode("latin-1")
    assert cur.repair(latin1) == "Tiếng Việt và café"
    for clean in (VI_GOOD, EN_GOOD, "Âm nhạc «ôn» – à la carte"):
        assert cur.repair(clean) == clean
    assert Curator(CurationSpec(encoding={"enabled": False})).repair(latin1) == latin1


def test_code_skips_prose_rules() -> None:
    source = "def f(x):\n    return {x: x}\n" * 3 + "# mail me: dev@example.org\n"
    out = Curator(SPEC).filter(source, "code")
    assert out.text == source
    assert "<email>" in Curator(SPEC).redact(source, "code")


# ----------------------------------------------------------------------------- recipe
def _recipe(data: dict) -> dict:
    return {"name": "r", "base_model": {"source": {"kind": "tiny"}},
            "corpora": [{"name": "v", "lang": "vi", "source": {"kind": "sample"}}],
            "stages": [{"name": "s", "trainable": "all", "lr": 1e-3, "max_tokens": 1_000_000,
                        "mixture": {"vi": 1.0}}],
            "data": data}


def test_recipe_tunes_and_switches_off_filters() -> None:
    recipe = parse_recipe(_recipe({"curation": {"vi": {"gopher_quality": {"min_words": 80},
                                                       "c4": {"enabled": False}},
                                                "pii": {"ips": False}}}))
    cur = recipe.data.curation
    assert cur.vi.gopher_quality.min_words == 80
    assert cur.vi.gopher_quality.stop_words[0] == "là"  # the rest of the Vietnamese defaults stay
    assert cur.vi.gopher_quality.min_avg_word_chars == 2.5
    assert not cur.vi.c4.enabled and cur.en.c4.enabled and not cur.pii.ips
    off = parse_recipe(_recipe({"curation": {"enabled": False}})).data.curation
    assert not off.enabled
    assert Curator(off).filter("x", "vi").text == "x"


def test_recipe_names_an_unknown_curation_field() -> None:
    with pytest.raises(ConfigError, match=r"data\.curation\.vi\.gopher_quality\.min_wordz: unknown field"):
        parse_recipe(_recipe({"curation": {"vi": {"gopher_quality": {"min_wordz": 3}}}}))
    with pytest.raises(ConfigError, match=r"data\.curation\.en\.fineweb\.min_line_punct"):
        parse_recipe(_recipe({"curation": {"en": {"fineweb": {"min_line_punct": 2}}}}))
    with pytest.raises(ConfigError, match=r"data\.cleaning\.min_char: unknown field"):
        parse_recipe(_recipe({"cleaning": {"min_char": 3}}))


# ----------------------------------------------------------------------------- manifest
@pytest.fixture(scope="module")
def tok(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_tokenizer(tmp_path_factory)


def _corpus(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    lines = VI_GOOD.split("\n")
    docs = {
        "good": VI_GOOD,
        "good-2": VI_GOOD.replace("Hà Nội", "Huế"),
        "mail": VI_GOOD + "\nLiên hệ qua thư điện tử hanoi@example.com để biết thêm.",
        "short": lines[0] + "\n" + lines[1],
        "lorem": VI_GOOD + "\nLorem ipsum dolor sit amet.",
        "spam": "\n".join(lines[1:6] + [(lines[0].rstrip(".") + ", ") * 6 + "."]),
        "list": VI_GOOD.replace(".", ""),
        "cut": VI_GOOD.replace("Hà Nội", "Đà Lạt") + "\nMục lục",
    }
    path = write_jsonl(tmp_path / "vi.jsonl", [{"id": k, "text": v} for k, v in docs.items()])
    return path, docs


def test_manifest_records_removals_per_filter(tmp_path: Path, tok: Path, monkeypatch: pytest.MonkeyPatch,
                                              capsys: pytest.CaptureFixture) -> None:
    path, docs = _corpus(tmp_path)
    src = [SourceSpec(name="vi-web", lang="vi", paths=(str(path),))]
    settings = PrepareSettings(val_fraction=0.0, workers=0, curation=CurationSpec())
    info = prepare_dataset(src, tok, tmp_path / "ds", settings)
    stats = info.sources["vi-web"]
    f = stats.filters
    assert stats.train_docs == 4  # good, good-2, mail (redacted), cut (a line cut)
    assert f["gopher_quality"].docs == 1 and f["gopher_quality"].examples[0]["id"] == "short"
    assert f["gopher_quality"].bytes == len(docs["short"].encode())
    assert f["c4"].docs == 1 and f["c4"].examples[0] == {"id": "lorem", "rule": "lorem ipsum",
                                                         "text": docs["lorem"][:160]}
    assert f["c4"].edited == 1 and f["c4"].edited_bytes == len("\nMục lục".encode())
    assert f["gopher_repetition"].docs == 1 and f["gopher_repetition"].examples[0]["id"] == "spam"
    assert f["fineweb"].docs == 1 and f["fineweb"].bytes == len(docs["list"].encode())
    assert f["pii"].edited == 1 and "<email>" in f["pii"].examples[0]["text"]
    assert stats.removed["c4"] == 1 and stats.removed["fineweb"] == 1
    assert all(len(x.examples) <= 3 for x in f.values())
    meta = load_dataset_meta(info.dir)
    assert meta["curation"]["enabled"] and meta["sources"][0]["stats"]["filters"]["c4"]["docs"] == 1
    assert dataset_manifest(meta).stats["vi-web"]["filters"]["fineweb"]["docs"] == 1
    code, out, _ = run_vinasmol(monkeypatch, capsys, "data", "inspect", str(info.dir))
    assert code == 0 and "gopher_repetition" in out and "fineweb" in out and "curation on" in out
    code, out, _ = run_vinasmol(monkeypatch, capsys, "data", "inspect", str(info.dir), "--json")
    assert json.loads(out)["sources"]["vi-web"]["filters"]["pii"]["edited"] == 1


def test_code_source_keeps_its_addresses(tmp_path: Path, tok: Path) -> None:
    source = ("import socket\n\n\ndef resolver() -> str:\n    return '8.8.8.8'\n\n\n"
              "def pairs(x):\n    return list(zip(x[::2], x[1::2]))\n")
    path = write_jsonl(tmp_path / "code.jsonl", [{"id": "a", "text": source},
                                                 {"id": "b", "text": source + "# by ana@python.org\n"}])
    src = [SourceSpec(name="py", lang="code", paths=(str(path),))]
    settings = PrepareSettings(val_fraction=0.0, workers=0, curation=CurationSpec())
    pii = prepare_dataset(src, tok, tmp_path / "ds", settings).sources["py"].filters["pii"]
    assert pii.edited == 1 and pii.examples[0]["id"] == "b"  # only the author's address
    assert pii.examples[0]["text"].endswith("x[1::2]))\n# by <email>\n")


def test_curation_settings_are_in_the_dataset_key(tmp_path: Path, tok: Path) -> None:
    path, _ = _corpus(tmp_path)
    src = [SourceSpec(name="vi-web", lang="vi", paths=(str(path),))]

    def build(out: str, curation: CurationSpec | None):  # noqa: ANN202
        return prepare_dataset(src, tok, tmp_path / out, PrepareSettings(val_fraction=0.0, workers=0,
                                                                          curation=curation))

    on = build("a", CurationSpec())
    tuned = build("b", CurationSpec(vi={"fineweb": {"enabled": False}}))
    off = build("c", CurationSpec(enabled=False))
    assert len({on.key, tuned.key, off.key}) == 3
    assert tuned.sources["vi-web"].train_docs == on.sources["vi-web"].train_docs + 1
    assert off.sources["vi-web"].train_docs == 8 and not off.sources["vi-web"].filters
    assert build("a", CurationSpec()).reused
