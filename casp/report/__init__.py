"""Reports: a set of eval runs (and analysis / compression reports) as HTML or Markdown with plots."""

from casp.report.report import build_report, collect_inputs, headline_metrics

__all__ = ["build_report", "collect_inputs", "headline_metrics"]
