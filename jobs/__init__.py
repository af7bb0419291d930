"""The pipeline's steps and their one composition (``flow``), for the DAG, the CLI and tests.

``steps`` (resolve, plan, score, validate), ``drift_gate``, ``publishing`` (export,
publish, collection) and ``shadow`` each do one thing to a run folder; ``context`` is
what they share; ``results`` says what each returns; ``flow`` runs them in order with
the rules between them (drift gate, shadow runs, "published earlier").
"""
