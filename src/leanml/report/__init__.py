"""The `leanml optimize` report: Markdown, self-contained HTML and PNG figures (:func:`write_report`)."""

from .render import write_report

__all__ = ["write_report"]
