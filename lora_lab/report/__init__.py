"""`python -m lora_lab.report`: paper-style tables and plots from the MLflow runs of studies, beside published numbers.

Owns: runs (a selection's runs as typed rows), groups (U-curves, replicated configurations, best LRs), tables (the
table builders), published (the papers' numbers), render (Markdown through lora_lab.markdown, LaTeX, CSV, HTML, the
report folder with report.md and the one-page report.html), figures (which plots, drawn by lora_lab.plots), __main__
(the CLI, `best-lr`). It knows a method only through lora_lab.adaptations' table (labels, what merges, LoRA's ranks),
never by comparing its name. May import: the leaves (config, records, files, markdown, shapes, errors), the torch core
(lora: parameter counts on the meta device; adaptations: the table of methods) and io (tracking, plots); never train,
sweep or bench.
"""
