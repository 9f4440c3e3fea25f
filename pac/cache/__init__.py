"""Activation cache: the frozen backbone's per-layer hidden states ("taps"), computed once (phase 1) and read
every epoch of adapter training (phase 2). See :mod:`pac.cache.format` for the on-disk layout."""

from pac.cache.fingerprint import fingerprint_files, fingerprint_json
from pac.cache.format import DTYPES, CacheSpec, cache_dir_for
from pac.cache.quant import DEFAULT_SCHEME, dequantize, quantize
from pac.cache.reader import CacheReader, cache_bytes_per_sample, find_cache
from pac.cache.writer import CacheWriter, choose_dtype

__all__ = [
    "DEFAULT_SCHEME",
    "DTYPES",
    "CacheReader",
    "CacheSpec",
    "CacheWriter",
    "cache_bytes_per_sample",
    "cache_dir_for",
    "choose_dtype",
    "dequantize",
    "find_cache",
    "fingerprint_files",
    "fingerprint_json",
    "quantize",
]
