"""Data in and out of the records format: converters from public datasets and benchmarks
(:mod:`lavender.data.convert`), mixing and splitting record files (:mod:`lavender.data.mix`).

Formats and record fields are documented in docs/data.md.
"""

from lavender.data.convert import CONVERTERS, ConvertReport, convert
from lavender.data.mix import mix, split

__all__ = ["CONVERTERS", "ConvertReport", "convert", "mix", "split"]
