"""The outcome of a run: one :class:`~dask_merge.tasks.Record` per pair, as text, JSON or HTML."""

from __future__ import annotations

import dataclasses
import html
import json
import typing
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .atomic import atomic_write
from .tasks import Record

if TYPE_CHECKING:
    import pandas

HTML_ROWS = 200  # rows of a plan or report shown in a notebook
DROP_WARNING = 0.1  # see Report.warnings


@dataclass(repr=False)
class Report:
    """The outcome of a run: one record per pair found, skipped ones included.

    >>> Report([Record("output_0", "merged", rows=300), Record("output_1", "skipped"),
    ...         Record("output_2", "failed", error="truncated")], [], 3.14, "processes")
    <Report: merged 1, skipped 1, failed 1 in 3.1 s on processes>
    """

    records: list[Record]
    unpaired: list[str]
    seconds: float
    scheduler: str
    dashboard: str | None = None

    @property
    def counts(self) -> dict[str, int]:
        counts = dict.fromkeys(("merged", "skipped", "failed"), 0)
        for record in self.records:
            counts[record.status] += 1
        return counts

    @property
    def failures(self) -> list[Record]:
        return [r for r in self.records if r.status == "failed"]

    @property
    def ok(self) -> bool:
        return not self.failures

    def to_dict(self) -> dict:
        """The JSON report: ``counts``, ``seconds``, ``pairs``, ``unpaired`` (a stable contract)."""
        return {
            "counts": self.counts,
            "seconds": round(self.seconds, 3),
            "pairs": [r.to_dict() for r in self.records],
            "unpaired": self.unpaired,
            "scheduler": self.scheduler,
            "dashboard": self.dashboard,
        }

    def to_dataframe(self) -> pandas.DataFrame:
        """A pandas DataFrame with one row per pair, the JSON report's keys as columns.

        The columns are those of :meth:`Record.to_dict <dask_merge.Record.to_dict>`
        (``name``, ``status``, ``rows``, ...), in its order, even with no pairs.

        >>> Report([Record("output_0", "merged", rows=300)], [], 1.0, "sync").to_dataframe()[
        ...     ["name", "status", "rows"]]
               name  status  rows
        0  output_0  merged   300

        Raises
        ------
        ImportError
            pandas is not installed (the message says how to install it).
        """
        try:
            import pandas
        except ImportError as err:
            raise ImportError("Report.to_dataframe needs pandas, which is not installed: "
                              "pip install pandas (or to_dict() for plain data)") from err
        columns = [f.name for f in dataclasses.fields(Record)]
        frame = pandas.DataFrame([r.to_dict() for r in self.records], columns=columns)
        # Counts as integers that may be missing (pandas' Int64), not floats with NaN.
        hints = typing.get_type_hints(Record)
        return frame.astype({name: "Int64" for name in columns
                             if int in typing.get_args(hints[name])})

    def to_json(self, path: str) -> None:
        """Write the report to ``path``, complete or not at all (:class:`OutputError`)."""
        text = json.dumps(self.to_dict(), indent=1)
        atomic_write(path, lambda f: f.write(text.encode()), durable=False)

    def summary(self, errors: int = 5) -> str:
        """A few lines for a terminal: counts, ids dropped on each side, failures."""
        counts = self.counts
        merged = [r for r in self.records if r.status == "merged"]
        rows = sum(r.rows or 0 for r in merged)
        lines = [
            f"merged {counts['merged']}, skipped {counts['skipped']}, failed {counts['failed']} "
            f"pairs; {rows:,} rows written in {self.seconds:.1f} s ({self.scheduler})"
        ]
        if merged:
            lines.append("ids dropped: " + "; ".join(
                _dropped(merged, side, partner)
                for side, partner in (("nucleotide", "protein"), ("protein", "nucleotide"))))
        if self.unpaired:
            lines.append(f"{len(self.unpaired)} files without a partner, e.g. {self.unpaired[0]}")
        for record in self.failures[:errors]:
            lines.append(f"  FAILED {record.name}: {record.error.splitlines()[0]}")
        if len(self.failures) > errors:
            lines.append(f"  ... and {len(self.failures) - errors} more failures")
        return "\n".join(lines)

    def warnings(self, share: float = DROP_WARNING) -> list[str]:
        """Lines about merged pairs that dropped more than ``share`` of a file's ids.

        Real chunks drop few: every protein comes from one of the chunk's
        sequences, and only sequences without an ORF lose their protein
        vector (the upstream test data drop none).  A larger share means two
        files of different runs or chunks, e.g. a wrong ``--protein-dir``.
        """
        lines = []
        for side, partner in (("nucleotide", "protein"), ("protein", "nucleotide")):
            over = [r for r in self.records if r.status == "merged" and _share(r, side) > share]
            if over:
                worst = max(over, key=lambda r: _share(r, side))
                lines.append(
                    f"WARNING: {len(over)} merged pairs drop more than {share:.0%} of their {side} "
                    f"ids (worst: {worst.name}, {_dropped_of(worst, side)} without a {partner} "
                    f"vector): are the folders of one run? (max_dropped, --max-dropped, makes such pairs fail)")
        return lines

    def __repr__(self) -> str:
        counts = ", ".join(f"{k} {v}" for k, v in self.counts.items())
        return f"<Report: {counts} in {self.seconds:.1f} s on {self.scheduler}>"

    def _repr_html_(self) -> str:
        counts = ", ".join(f"{k} {v}" for k, v in self.counts.items())
        rows = [(r.name, r.status, "" if r.rows is None else r.rows,
                 "" if r.nucleotide_only is None else f"{r.nucleotide_only} + {r.protein_only}",
                 "" if r.seconds is None else f"{r.seconds:.2f}", (r.error or r.reason or "")[:200])
                for r in self.records]
        return _html_table(
            f"<b>dask_merge report</b>: {counts} in {self.seconds:.1f} s on {_html(self.scheduler)}",
            ("pair", "status", "rows", "dropped", "seconds", "error"), rows)


def _dropped_count(record: Record, side: str) -> int:
    return getattr(record, f"{side}_only") or 0


def _share(record: Record, side: str) -> float:
    """The share of ``side``'s ids that a merged pair dropped."""
    dropped = _dropped_count(record, side)
    return dropped / ((record.rows or 0) + dropped or 1)


def _dropped_of(record: Record, side: str) -> str:
    dropped = _dropped_count(record, side)
    return f"{dropped:,} of {(record.rows or 0) + dropped:,}"


def _dropped(merged: list[Record], side: str, partner: str) -> str:
    """``side``'s ids dropped in all, and the pair that dropped the largest share."""
    total = sum(_dropped_count(r, side) for r in merged)
    if not total:
        return f"no {side} id without a {partner} vector"
    worst = max(merged, key=lambda r: _share(r, side))
    return (f"{total:,} {side} ids without a {partner} vector "
            f"(worst: {worst.name}, {_dropped_of(worst, side)})")


def _html(value: object) -> str:
    """``value`` escaped for HTML, with undecodable file-name bytes shown as ``\\udcff``.

    Jupyter sends HTML as UTF-8, which a lone surrogate would break.

    >>> import os
    >>> _html("<b>" + os.fsdecode(b"\\xff"))
    '&lt;b&gt;\\\\udcff'
    """
    return html.escape(str(value)).encode("utf-8", "backslashreplace").decode("utf-8")


def _html_table(title: str, head: tuple[str, ...], rows: list[tuple]) -> str:
    """A title, a table of the first :data:`HTML_ROWS` rows, and how many more there are."""
    heads = "".join(f"<th>{h}</th>" for h in head)
    body = "".join("<tr>" + "".join(f"<td>{_html(v)}</td>" for v in row) + "</tr>"
                   for row in rows[:HTML_ROWS])
    more = f"<p>... {len(rows) - HTML_ROWS} more</p>" if len(rows) > HTML_ROWS else ""
    return f"<p>{title}</p><table><tr>{heads}</tr>{body}</table>{more}"
