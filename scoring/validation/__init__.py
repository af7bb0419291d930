"""Validate a run's output with Great Expectations: per part on the workers, globally once.

Two kinds of expectations (docs/quality.md):

- **per part**, a GX suite run on the Dask worker that scored the part, at the end of
  the shard's task while the part is still in memory (``check_part``): the part has
  its shard's rows, the key is not null and unique within the part, every output is
  not null and finite, plus per output a range (probabilities: [0, 1] by default) and
  a known set of class labels. The result lands next to the run's parts
  (``<run>/validation/part-NNNNN.json``); one that is missing or stale (another
  suite, a re-written part) is checked again by the validate step, on a cluster
  (``check_parts_on``);
- **across parts**, once in the validate step (``validate_parts``): the total row
  count equals the input's (less rows of tolerated failed shards), and the key is
  unique across all parts. Parts are sorted by key: two parts whose key ranges do
  not overlap cannot share a key, and parts whose ranges overlap are merged in key
  order a row group at a time (``duplicate_keys``), so memory is bounded by parts ×
  row-group size, not by rows.

The per-part results are summed into one suite result (unexpected counts added, the
failing parts named) which, with the global checks, is the run's verdict and the page
of its Data Docs; each failing part gets its own page too. GX is imported on first use,
once per process, never when this module is imported.

The package's modules, one per seam: ``suite`` (per part, on the workers), ``keys``
(key uniqueness across parts), ``report`` (the verdict), ``docs`` (Data Docs), ``gx``
(the import) and ``documents`` (the stored JSON).
"""

from __future__ import annotations

from scoring.validation.docs import DOCS_SITE, build_data_docs
from scoring.validation.gx import import_gx
from scoring.validation.keys import KeyDuplicates, duplicate_keys, overlapping_groups
from scoring.validation.report import (
    DocsBuilder,
    Outcome,
    ValidationReport,
    merge_results,
    validate_parts,
)
from scoring.validation.suite import (
    SUITE,
    SUITE_VERSION,
    PartChecks,
    PartReport,
    PartTarget,
    check_part,
    check_part_file,
    check_parts_on,
    fresh_report,
)

__all__ = [
    "DOCS_SITE",
    "SUITE",
    "SUITE_VERSION",
    "DocsBuilder",
    "KeyDuplicates",
    "Outcome",
    "PartChecks",
    "PartReport",
    "PartTarget",
    "ValidationReport",
    "build_data_docs",
    "check_part",
    "check_part_file",
    "check_parts_on",
    "duplicate_keys",
    "fresh_report",
    "import_gx",
    "merge_results",
    "overlapping_groups",
    "validate_parts",
]
