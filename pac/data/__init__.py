"""Data loading, splitting and tokenisation: files on disk -> Records -> TokenizedSet tensors."""

from pac.data.records import Record
from pac.data.sources import bundled_bbc_news_dir, load_records
from pac.data.split import check_labels, split_records
from pac.data.tokenize import TokenizedSet, tokenize_records

__all__ = [
    "Record",
    "TokenizedSet",
    "bundled_bbc_news_dir",
    "check_labels",
    "load_records",
    "split_records",
    "tokenize_records",
]
