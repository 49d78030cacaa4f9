"""``--dry_run``: the report of what a training run would do, built without loading the model.

It sits above both :mod:`library.training` (the loop's plan, names and schedules) and
:mod:`library.methods` (what each method trains and writes): :mod:`.report` assembles the sections,
:mod:`.estimate` and :mod:`.memory` the memory estimate, :mod:`.text` the printed form. The options
(``--dry_run``, ``--dry_run_json``) are defined in :mod:`library.training.args`.
"""
