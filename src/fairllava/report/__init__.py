"""Evaluation reports: the §5.7 output folder, Markdown and self-contained HTML with matplotlib figures."""
from .writer import comparison_blocks, evaluation_blocks, write_comparison_report, write_evaluation, write_pooled_report

__all__ = ["write_evaluation", "write_comparison_report", "write_pooled_report", "evaluation_blocks", "comparison_blocks"]
