"""The ground floor: settings, the error tree, the namespace rule, durable writes.

Every layer imports from here; nothing here imports from any other part of the project
(``docs/architecture.md``; ``tests/unit/test_layers.py`` holds it).
"""
