"""A GDAL VRT (XML) mosaicking row bands of one raster: ``<band_i>.tif`` at row ``row0_i``."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from xml.sax.saxutils import escape

import numpy as np

from epilsr.io.atomic import write_bytes_atomic
from epilsr.io.geotiff import GeoInfo

__all__ = ["write_row_vrt"]

_GDAL_TYPES = {"uint8": "Byte", "uint16": "UInt16", "int16": "Int16", "uint32": "UInt32",
               "int32": "Int32", "float32": "Float32", "float64": "Float64"}


def write_row_vrt(path: str | os.PathLike, sources: Sequence[tuple[str | os.PathLike, int, int]],
                  *, width: int, height: int, dtype, bands: int = 1, geo: GeoInfo | None = None,
                  nodata: float | int | None = None) -> Path:
    """Write a VRT of ``height x width`` (``bands`` bands) whose rows ``row0 .. row0 + h - 1``
    come from the GeoTIFF of each ``(file, row0, h)``; ``geo`` = the whole raster's
    georeferencing (geotransform and EPSG code, when known). File paths are stored relative
    to the VRT when they lie beside or below it."""
    path = Path(path)
    name = np.dtype(dtype).name
    if name not in _GDAL_TYPES:
        raise ValueError(f"write_row_vrt: dtype {name} has no GDAL VRT type; expected one of "
                         f"{sorted(_GDAL_TYPES)}")
    lines = [f'<VRTDataset rasterXSize="{int(width)}" rasterYSize="{int(height)}">']
    if geo is not None and geo.epsg is not None:
        lines.append(f"  <SRS>EPSG:{geo.epsg}</SRS>")
    if geo is not None and geo.geotransform is not None:
        lines.append("  <GeoTransform>" + ", ".join(repr(float(v)) for v in geo.geotransform)
                     + "</GeoTransform>")
    for b in range(1, bands + 1):
        lines.append(f'  <VRTRasterBand dataType="{_GDAL_TYPES[name]}" band="{b}">')
        if nodata is not None:
            lines.append(f"    <NoDataValue>{nodata}</NoDataValue>")
        for file, row0, h in sources:
            rel, src = _source_name(path, Path(file))
            lines += ["    <SimpleSource>",
                      f'      <SourceFilename relativeToVRT="{rel}">{escape(src)}'
                      "</SourceFilename>",
                      f"      <SourceBand>{b}</SourceBand>",
                      f'      <SrcRect xOff="0" yOff="0" xSize="{width}" ySize="{h}"/>',
                      f'      <DstRect xOff="0" yOff="{row0}" xSize="{width}" ySize="{h}"/>',
                      "    </SimpleSource>"]
        lines.append("  </VRTRasterBand>")
    lines.append("</VRTDataset>\n")
    write_bytes_atomic(path, "\n".join(lines).encode())
    return path


def _source_name(vrt: Path, file: Path) -> tuple[int, str]:
    try:
        return 1, file.resolve().relative_to(vrt.resolve().parent).as_posix()
    except ValueError:
        return 0, os.fspath(file.resolve())
