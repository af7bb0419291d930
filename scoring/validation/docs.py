"""The run's Data Docs (HTML): the summed result, and a page per failing part."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

from scoring.validation.documents import ResultDocument
from scoring.validation.gx import ephemeral_context, gx_version, import_gx
from scoring.validation.suite import SUITE, PartReport

if TYPE_CHECKING:
    from great_expectations.data_context import AbstractDataContext

DOCS_SITE = "run"
DOCS_PART_PAGES = 20  # failing parts with a Data Docs page of their own


def build_data_docs(
    docs_dir: Path,
    run_name: str,
    merged: list[ResultDocument],
    success: bool,
    reports: Sequence[PartReport],
    failing: Sequence[PartReport],
) -> Path | None:
    """The run's Data Docs in ``docs_dir``: the summed result, and a page per failing part
    (the first ``DOCS_PART_PAGES``)."""
    gx = import_gx()
    from great_expectations.core.expectation_validation_result import (
        ExpectationSuiteValidationResultSchema,
    )
    from great_expectations.core.run_identifier import RunIdentifier
    from great_expectations.data_context.types.resource_identifiers import (
        ExpectationSuiteIdentifier,
        ValidationResultIdentifier,
    )

    context = ephemeral_context(gx)
    _add_docs_site(context, docs_dir)
    run_id = RunIdentifier(run_name=run_name, run_time=datetime.now(UTC))
    shown = failing[:DOCS_PART_PAGES]
    failed = ", ".join(r.name for r in shown) or "none"
    if len(failing) > len(shown):
        failed += f" and {len(failing) - len(shown)} more (all in the run's manifest)"
    pages = [("all-parts", merged, success, f"{len(reports)} output parts; failed: {failed}")]
    pages += [(r.name, r.results, r.success, r.part) for r in shown]
    schema = ExpectationSuiteValidationResultSchema()
    for batch, results, passed, what in pages:
        document = _suite_document(results, passed, run_name, what)
        identifier = ValidationResultIdentifier(
            expectation_suite_identifier=ExpectationSuiteIdentifier(name=SUITE),
            run_id=run_id,
            batch_identifier=batch,
        )
        context.validation_results_store.set(identifier, schema.load(document))
    context.build_data_docs(site_names=[DOCS_SITE])
    index = docs_dir / "index.html"
    return index if index.exists() else None


def _suite_document(
    results: list[ResultDocument], success: bool, run_name: str, what: str
) -> dict[str, object]:
    passed = sum(1 for r in results if r.get("success"))
    return {
        "success": success,
        "results": results,
        "suite_name": SUITE,
        "statistics": {
            "evaluated_expectations": len(results),
            "successful_expectations": passed,
            "unsuccessful_expectations": len(results) - passed,
            "success_percent": 100 * passed / len(results) if results else None,
        },
        "meta": {
            "great_expectations_version": gx_version(),
            "run_id": {"run_name": run_name, "run_time": datetime.now(UTC).isoformat()},
            "batch_spec": {"batch_data": what},
        },
    }


def _add_docs_site(context: AbstractDataContext, docs_dir: Path) -> None:
    """A Data Docs site whose files land in ``docs_dir`` (the run folder's ``data_docs``)."""
    docs_dir.mkdir(parents=True, exist_ok=True)
    context.add_data_docs_site(
        site_name=DOCS_SITE,
        site_config={
            "class_name": "SiteBuilder",
            "store_backend": {
                "class_name": "TupleFilesystemStoreBackend",
                "base_directory": str(docs_dir),
            },
            "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
        },
    )
