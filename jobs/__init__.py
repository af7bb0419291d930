"""One function per pipeline step; Airflow tasks, the CLI and the tests all call these."""
