"""Recovery-data selection for pruned models: PASER and baselines."""

from data_selection.pool import PoolLoad, Record, format_example, load_pool
from data_selection.selection import METHODS, Selection, select_records, write_selection

__all__ = ["METHODS", "PoolLoad", "Record", "Selection", "format_example", "load_pool", "select_records",
           "write_selection"]
