"""Small built-in corpora for the demo and the tests: synthetic Vietnamese and English prose
generated from hand-written sentence parts, and real Python code read from the running
interpreter's standard library. Deterministic for a given seed."""

from __future__ import annotations

import json
import random
import sysconfig
from pathlib import Path

VI_SUBJECTS = [
    "Hà Nội", "Thành phố Hồ Chí Minh", "Người nông dân", "Các nhà khoa học", "Học sinh trong lớp",
    "Bà tôi", "Chính phủ Việt Nam", "Đội bóng đá quốc gia", "Những người thợ thủ công", "Cô giáo",
    "Sông Mê Kông", "Vịnh Hạ Long", "Nhà văn trẻ", "Các doanh nghiệp nhỏ", "Người dân miền Trung",
    "Bác sĩ ở bệnh viện", "Tiếng Việt", "Nền kinh tế", "Lịch sử dân tộc", "Ngôi chùa cổ",
]
VI_VERBS = [
    "đã xây dựng", "thường nghiên cứu", "đang phát triển", "luôn bảo vệ", "vừa công bố",
    "được biết đến với", "có ảnh hưởng lớn đến", "đóng góp nhiều cho", "mô tả chi tiết", "giữ gìn",
    "đã thay đổi", "nổi tiếng về", "tổ chức", "giới thiệu", "chuẩn bị cho",
]
VI_OBJECTS = [
    "những cánh đồng lúa xanh", "một ngôi trường mới", "nền văn hóa truyền thống", "các lễ hội mùa xuân",
    "hệ thống giao thông công cộng", "những món ăn đặc sản", "nghề dệt lụa", "khu bảo tồn thiên nhiên",
    "các công trình kiến trúc cổ", "chương trình giáo dục phổ thông", "những bài hát dân ca",
    "cuộc sống ở nông thôn", "các loài chim quý hiếm", "thị trường xuất khẩu gạo", "bảo tàng lịch sử",
    "những phát minh quan trọng", "mùa mưa ở đồng bằng", "các tuyến đường sắt", "nghệ thuật múa rối nước",
]
VI_TAILS = [
    "trong nhiều thế kỷ qua", "từ năm 1945", "vào đầu thế kỷ hai mươi", "ở khắp các tỉnh phía Bắc",
    "với sự giúp đỡ của cộng đồng", "theo các tài liệu lịch sử", "mặc dù gặp nhiều khó khăn",
    "để phục vụ người dân", "nhờ những chính sách mới", "trong suốt mùa hè năm ngoái", "",
]
VI_OPENERS = ["Ngoài ra,", "Tuy nhiên,", "Theo các chuyên gia,", "Hiện nay,", "Trước đây,", "Đặc biệt,", ""]

EN_SUBJECTS = [
    "The old captain", "A young scientist", "The village council", "My grandmother", "The river",
    "Every traveller", "The railway company", "The small museum", "Her brother", "The orchestra",
    "The northern farmers", "A quiet librarian", "The committee", "The city engineers", "Our teacher",
]
EN_VERBS = [
    "described", "carefully studied", "built", "remembered", "defended", "announced", "painted",
    "travelled across", "wrote a letter about", "argued for", "discovered", "restored", "measured",
]
EN_OBJECTS = [
    "the ancient bridge", "a forgotten manuscript", "the harvest of that year", "the winding coast",
    "a new method of printing", "the quarrel between the two families", "the bells of the cathedral",
    "the price of bread", "a map of the southern islands", "the rules of the old game",
    "the strange light over the hills", "the history of the town", "a remarkable collection of birds",
]
EN_TAILS = [
    "before the winter came", "with great patience", "in the spring of 1851", "for many years",
    "despite the rain", "as everyone expected", "without saying a word", "near the harbour", "",
]
EN_OPENERS = ["However,", "In those days,", "At last,", "Meanwhile,", "Of course,", "Later,", ""]


def _sentence(rng: random.Random, openers: list[str], subj: list[str], verbs: list[str],
              objs: list[str], tails: list[str]) -> str:
    parts = [rng.choice(openers), rng.choice(subj), rng.choice(verbs), rng.choice(objs), rng.choice(tails)]
    text = " ".join(p for p in parts if p)
    return text + "."


def _prose(rng: random.Random, lang: str) -> str:
    lists = (
        (VI_OPENERS, VI_SUBJECTS, VI_VERBS, VI_OBJECTS, VI_TAILS)
        if lang == "vi"
        else (EN_OPENERS, EN_SUBJECTS, EN_VERBS, EN_OBJECTS, EN_TAILS)
    )
    paragraphs = []
    for _ in range(rng.randint(1, 4)):
        paragraphs.append(" ".join(_sentence(rng, *lists) for _ in range(rng.randint(2, 7))))
    return "\n".join(paragraphs)


def _stdlib_sources(limit: int) -> list[tuple[str, str]]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in stdlib.glob("*.py") if p.stat().st_size < 40_000)
    out = []
    for path in files[:limit]:
        out.append((path.name, path.read_text(encoding="utf-8", errors="replace")))
    return out


def sample_texts(lang: str, docs: int, seed: int = 0) -> list[str]:
    """`docs` documents of one language: "vi", "en" (synthetic prose) or "code" (stdlib sources)."""
    if lang == "code":
        return [text for _, text in _stdlib_sources(docs)]
    rng = random.Random(f"{lang}-{seed}")
    return [_prose(rng, lang) for _ in range(docs)]


def write_sample_corpora(out_dir: Path, docs_per_lang: int = 200, seed: int = 0) -> dict[str, Path]:
    """Write vi.jsonl, en.jsonl and code.jsonl (fields id, text, source) under out_dir."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    sources = {"vi": "sample-vi", "en": "sample-en", "code": "python-stdlib"}
    for lang, source in sources.items():
        path = out_dir / f"{lang}.jsonl"
        with path.open("w", encoding="utf-8") as f:
            for i, text in enumerate(sample_texts(lang, docs_per_lang, seed)):
                f.write(json.dumps({"id": f"{lang}-{seed}-{i}", "text": text, "source": source},
                                   ensure_ascii=False) + "\n")
        paths[lang] = path
    return paths
