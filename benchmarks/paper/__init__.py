"""The parts of benchmarks/paper_table.py: rows, search records, event timing, tables, plots."""
