"""The sweep command (`python -m lora_lab.sweep`): Optuna studies whose trials are training runs.

Owns: the study (sampler, pruner, fingerprint, budget: study.py), its storage (which one, bounded retries, errors that
name it, a torn journal repaired: storage.py), a trial's typed attributes and failure kinds (trials.py), the
objective (objective.py), who runs trials (workers.py), the checks before anything is written (preflight.py), the
comparison with full fine-tuning (compare.py), the files and numbers a study reports (outputs.py), the search space
(search.py), Optuna's internals (optuna_internals.py) and the command line (cli.py, __main__.py).

May import: lora_lab's leaves (config, records, files, errors, markdown), io (models, data, tracking, plots), train (and
warm); never report or bench, which sit beside sweep. Callers import from the module that is a name's home.
"""
