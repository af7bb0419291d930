"""What the DAG files share: job configs (``config``), the pipeline DAG (``pipeline``), callbacks.

Airflow puts the DAGs folder (the DAG bundle's root) on ``sys.path`` when it parses DAG
files, runs tasks and runs callbacks, so the DAG files import this package by its name.
``.airflowignore`` keeps Airflow from parsing it as DAG files itself.
"""
