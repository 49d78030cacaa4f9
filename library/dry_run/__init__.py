"""``--dry_run``: the report of what a training run would do, built without loading the model.

It sits above :mod:`library.training` (the loop's plan, names and schedules). What a method trains and
writes comes from the method itself as a :class:`library.dry_run.plan.DryRunPlan` (each method module's
``dry_run_plan(...)``, passed in by the entry script); no dry-run module imports a method module.
:mod:`.report` assembles the sections, :mod:`.estimate` and :mod:`.memory` the memory estimate, :mod:`.text`
the printed form. The options (``--dry_run``, ``--dry_run_json``) are defined in :mod:`library.training.args`.
"""
