"""Hostile and unlucky inputs at the data layer: each refused with one line naming the file
(and the row/column for tables), or handled as documented, never silently wrong (issue 18)."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import tifffile

from epilsr.data import chesapeake

SHIPPED = Path(chesapeake.__file__).with_name("nlcd_label_priors.csv").read_text()
HEADER, *ROWS = SHIPPED.splitlines()


def _table(tmp_path, lines: list[str]) -> Path:
    path = tmp_path / "nlcd_label_priors.csv"
    path.write_text("\n".join([HEADER, *lines]) + "\n")
    return path


def _row(code: str) -> tuple[int, str]:
    """(index in ROWS, line) of the shipped row of an NLCD code."""
    i = next(i for i, r in enumerate(ROWS) if r.split(",")[0] == code)
    return i, ROWS[i]


def test_shipped_table_passes_the_checks(tmp_path):
    table = chesapeake.load_nlcd_table(_table(tmp_path, ROWS))
    assert len(table.codes) == len(ROWS) == len(set(table.codes.tolist()))


def test_duplicate_code_is_refused(tmp_path):
    i, line = _row("41")
    dup = line.replace(",0.92,", ",0.10,").replace("0.04,0.92", "0.86,0.10")
    path = _table(tmp_path, ROWS + [dup])
    with pytest.raises(ValueError, match=r"line \d+: NLCD code 41 repeats line 10") as info:
        chesapeake.load_nlcd_table(path)
    assert str(path) in str(info.value)


def test_percentage_instead_of_probability_is_refused(tmp_path):
    i, line = _row("41")
    rows = list(ROWS)
    parts = line.split(",")
    parts[3] = "92"  # p_tree_canopy written as a percentage
    rows[i] = ",".join(parts)
    path = _table(tmp_path, rows)
    with pytest.raises(ValueError, match=rf"line {i + 2}, column p_tree_canopy: expected a value "
                                         r"in \[0, 1\], got 92 \(a percentage"):
        chesapeake.load_nlcd_table(path)


def test_header_only_table_is_refused(tmp_path):
    path = _table(tmp_path, [])
    with pytest.raises(ValueError, match="no rows \\(header only\\)") as info:
        chesapeake.load_nlcd_table(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("value", ["nan", "inf", "abc", ""])
def test_non_numbers_are_refused_with_row_and_column(tmp_path, value):
    i, line = _row("82")
    rows = list(ROWS)
    parts = line.split(",")
    parts[-1] = value  # sd_impervious
    rows[i] = ",".join(parts)
    path = _table(tmp_path, rows)
    where = rf"{path}, line {i + 2}, column sd_impervious"
    with pytest.raises(ValueError, match=where + ": expected a"):
        chesapeake.load_nlcd_table(path)


def test_row_not_summing_to_one_is_refused(tmp_path):
    i, line = _row("11")
    rows = list(ROWS)
    rows[i] = line.replace("0.97,0.01,0.01,0.02", "0.50,0.01,0.01,0.02")
    with pytest.raises(ValueError, match=rf"line {i + 2} \(code 11\): probabilities .* sum to"):
        chesapeake.load_nlcd_table(_table(tmp_path, rows))


def test_missing_table_names_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.csv"):
        chesapeake.load_nlcd_table(tmp_path / "nope.csv")


def _tile(tmp_path, image, nlcd=None, stem="t") -> str:
    h, w = image.shape[:2]
    tifffile.imwrite(tmp_path / f"{stem}_naip-new.tif", image, photometric="rgb",
                     extrasamples=[0])
    tifffile.imwrite(tmp_path / f"{stem}_nlcd.tif",
                     np.full((h, w), 41, np.uint8) if nlcd is None else nlcd)
    return str(tmp_path / stem)


def test_nan_imagery_is_refused_naming_the_file(tmp_path):
    image = np.random.default_rng(0).uniform(size=(16, 16, 4)).astype(np.float32)
    image[3, 5, 1] = np.nan
    image[7, 2, 0] = np.inf
    with pytest.raises(ValueError, match=r"t_naip-new.tif: 2 NaN/inf pixel values \(first at "
                                         r"row 3, col 5\)"):
        chesapeake.load_tile(_tile(tmp_path, image))


def test_float_imagery_in_0_255_is_rescaled_with_a_warning(tmp_path, caplog):
    counts = np.random.default_rng(1).integers(0, 256, (16, 16, 4)).astype(np.uint8)
    with caplog.at_level(logging.WARNING, logger="epilsr.data"):
        tile = chesapeake.load_tile(_tile(tmp_path, counts.astype(np.float32)))
    assert "looks like 0-255 counts" in caplog.text
    np.testing.assert_allclose(tile.image, counts / np.float64(255), rtol=1e-6)
    reflectance = counts.astype(np.float32) / 255
    tile = chesapeake.load_tile(_tile(tmp_path, reflectance, stem="r"))
    np.testing.assert_array_equal(tile.image, reflectance)  # [0, 1] floats pass unchanged
    with pytest.raises(ValueError, match="expected reflectance in"):
        chesapeake.load_tile(_tile(tmp_path, reflectance * 1000, stem="s"))


def test_float_nlcd_must_be_integral(tmp_path):
    image = np.zeros((8, 8, 4), np.uint8)
    nlcd = np.full((8, 8), 41.0, np.float32)
    tile = chesapeake.load_tile(_tile(tmp_path, image, nlcd))
    assert tile.nlcd.dtype == np.uint8 and np.all(tile.nlcd == 41)
    nlcd[2, 6] = 41.7  # was silently truncated to 41
    with pytest.raises(ValueError, match=r"t_nlcd.tif: float class raster with 1 non-integer "
                                         r"values \(first 41.7.* at row 2, col 6\)"):
        chesapeake.load_tile(_tile(tmp_path, image, nlcd))
    with pytest.raises(ValueError, match=r"u_nlcd.tif: class codes in \[300, 300\]"):
        chesapeake.load_tile(_tile(tmp_path, image, np.full((8, 8), 300, np.uint16), stem="u"))


def test_larger_class_raster_is_refused_not_cropped(tmp_path):
    with pytest.raises(ValueError, match=r"t_nlcd.tif: nlcd shape \(10, 8\) != imagery"):
        chesapeake.load_tile(_tile(tmp_path, np.zeros((8, 8, 4), np.uint8),
                                   np.full((10, 8), 41, np.uint8)))


def _bomb(path: Path, side: int) -> Path:
    """A 16 x 16 DEFLATE GeoTIFF whose tags claim ``side x side`` in one strip."""
    tifffile.imwrite(path, np.zeros((16, 16), np.uint8), compression="zlib", rowsperstrip=16)
    with tifffile.TiffFile(path, mode="r+b") as tif:
        for tag in ("ImageWidth", "ImageLength", "RowsPerStrip"):
            tif.pages[0].tags[tag].overwrite(side)
    return path


def test_decompression_bomb_is_refused_before_allocation(tmp_path):
    path = _bomb(tmp_path / "bomb.tif", 200_000)  # would need 37 GiB
    with pytest.raises(ValueError, match=r"bomb.tif: 200000x200000 raster \(40000.0 Mpx\) exceeds "
                                         r"data.max_pixels"):
        chesapeake.read_raster(path)
    with pytest.raises(ValueError, match=r"bomb.tif: .* needs 38147 MiB to decode, more than "
                                         r"data.max_bytes"):
        chesapeake.read_raster(path, max_pixels=None)


def test_limits_are_configurable_and_large_rasters_warn(tmp_path, caplog):
    path = tmp_path / "a.tif"
    tifffile.imwrite(path, np.ones((40, 50), np.uint8))
    with pytest.raises(ValueError, match="exceeds data.max_pixels=1000"):
        chesapeake.read_raster(path, max_pixels=1000)
    with pytest.raises(ValueError, match="more than data.max_bytes=1999"):
        chesapeake.read_raster(path, max_bytes=1999)
    with caplog.at_level(logging.WARNING, logger="epilsr.data"):
        assert chesapeake.read_raster(path, warn_mpx=0.001).shape == (40, 50)
    assert "a large raster (40x50" in caplog.text


@pytest.mark.parametrize("compression", ["zlib", "lzw"])
def test_corrupted_compressed_tile_is_one_line_naming_the_file(tmp_path, compression):
    path = tmp_path / f"c_{compression}.tif"
    image = np.random.default_rng(0).integers(0, 255, (64, 64, 4), dtype=np.uint8)
    tifffile.imwrite(path, image, compression=compression, tile=(16, 16), photometric="rgb",
                     extrasamples=[0])
    with tifffile.TiffFile(path) as tif:
        off, cnt = tif.pages[0].dataoffsets[3], tif.pages[0].databytecounts[3]
    data = bytearray(path.read_bytes())
    data[off : off + cnt] = bytes((b * 7 + 13) % 256 for b in data[off : off + cnt])
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="cannot decode the pixel data") as info:
        chesapeake.read_raster(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)
