"""Audit reports: what was approved, by whom, on what evidence, as HTML, Markdown or JSON."""
