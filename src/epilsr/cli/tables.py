"""Plain text tables for the drivers and the benchmarks (no Hydra: importable where only the
core is installed, e.g. on a benchmark machine)."""

from __future__ import annotations

__all__ = ["format_table"]


def format_table(
    header: list[str], rows: list[list], *, floats: str = ".4f", align: str = "left"
) -> str:
    """A plain fixed-width text table (floats formatted with ``floats``; ``align`` left/right)."""
    cells = [header] + [[f"{v:{floats}}" if isinstance(v, float) else str(v) for v in r]
                        for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    pad = str.ljust if align == "left" else str.rjust
    lines = ["  ".join(pad(c, w) for c, w in zip(r, widths, strict=True)) for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
