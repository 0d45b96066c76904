"""Figures and tables from logged runs (local run dirs or W&B), one command: `lorabench-report`.

It reads what runs wrote (summary.json, metrics.jsonl, the job config, or the same from W&B) and
never trains, so it sits above training and imports nothing from it.
"""
