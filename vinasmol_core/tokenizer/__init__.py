"""Vietnamese vocabulary extension for byte-level BPE tokenizers (SmolLM2's first).

Pipeline steps: `count_words` ("train tokenizer") and `extend_tokenizer` ("merge vocabulary");
`fertility_report` measures tokens per word and bytes per token for any tokenizers and files.
"""

from vinasmol_core.tokenizer.base import BaseTokenizer
from vinasmol_core.tokenizer.counts import CountStats, WordCounts, WordCountsInfo, count_words
from vinasmol_core.tokenizer.extend import DEFAULT_TARGET_VOCAB_SIZE, ExtendResult, extend_tokenizer
from vinasmol_core.tokenizer.fertility import FertilityReport, fertility_report
from vinasmol_core.tokenizer.text import nfc

__all__ = [
    "DEFAULT_TARGET_VOCAB_SIZE",
    "BaseTokenizer",
    "CountStats",
    "ExtendResult",
    "FertilityReport",
    "WordCounts",
    "WordCountsInfo",
    "count_words",
    "extend_tokenizer",
    "fertility_report",
    "nfc",
]
