"""Shared driver plumbing: one-line errors, the run-folder lock, data loading from configs,
result tables."""

from __future__ import annotations

import atexit
import functools
import logging
import os
import sys
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

import jax
import numpy as np
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from epilsr import parallel
from epilsr.cli.tables import format_table  # noqa: F401 - re-exported for the drivers
from epilsr.correlate import ROUTES, resolve_route
from epilsr.data import chesapeake, synthetic
from epilsr.epitome import as_float_image
from epilsr.io.atomic import atomic_write_path
from epilsr.io.geotiff import read_geoinfo
from epilsr.io.lock import LockError, RunLock
from epilsr.pipelines.patch_stream import PatchStream

log = logging.getLogger("epilsr")
logging.getLogger("jax").setLevel(logging.WARNING)  # no "Unable to initialize backend" noise


class LabelledTile(NamedTuple):
    name: str
    image: np.ndarray  # [H, W, C] uint8 or float
    classes: np.ndarray  # [H, W] int32 rows of table
    labels: np.ndarray | None  # [H, W] ground truth or None
    table: np.ndarray  # [Cc, n] p(label | class)
    label_names: tuple[str, ...]
    label_colors: np.ndarray
    geo: object = None  # epilsr.io.geotiff.GeoInfo of the imagery, when read from a GeoTIFF


def _debug(cfg=None) -> bool:
    if cfg is not None and bool(cfg.get("debug", False)):
        return True
    return any(a in ("debug=true", "debug=True") for a in sys.argv)


def _user_error(err: BaseException) -> bool:
    """Errors a user can cause with inputs, settings or the file system (one line, exit 2)."""
    if isinstance(err, ValueError | KeyError | OSError | LockError | MemoryError):
        return True
    # imagecodecs' codec errors (corrupted compressed strips) subclass RuntimeError
    return isinstance(err, RuntimeError) and type(err).__module__.startswith("imagecodecs")


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    if isinstance(err, MemoryError):
        text = f"out of memory ({text}); lower data.max_bytes/data.max_pixels or the batch sizes"
    elif isinstance(err, OSError) and not isinstance(err, FileNotFoundError):
        text = f"{type(err).__name__}: {text}"
    return text


def _fail(err: BaseException) -> None:
    print(f"error: {_one_line(err)} (rerun with debug=true for a traceback)", file=sys.stderr)
    sys.exit(2)


def one_line_errors(main: Callable) -> Callable:
    """Drivers print ``error: ...`` (one line) and exit 2 on errors a user can cause: bad
    inputs and settings, unreadable/corrupted files, read-only or misplaced output folders,
    a folder locked by another run. ``debug=true`` re-raises with the traceback."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except Exception as err:
            if _debug() or not _user_error(err):
                raise
            _fail(err)

    return wrapper


class RunFolderLock(Callback):
    """Hydra callback (``hydra.callbacks.run_lock`` in every driver config): before Hydra
    creates the run folder or writes ``.hydra/config.yaml``, checks that ``hydra.run.dir`` can
    be a folder we write into and takes its :class:`epilsr.io.lock.RunLock`. A second run into
    the same folder stops here with one line (exit 2), leaving the first run's
    ``.hydra/config.yaml`` untouched. Processes other than ``distributed.process_id`` 0 share
    process 0's folder and do not lock."""

    def __init__(self) -> None:
        self.lock: RunLock | None = None

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        try:
            self._take(config)
        except (OSError, LockError) as err:
            if _debug(config):
                raise
            _fail(err)

    def _take(self, config: DictConfig) -> None:
        dist = config.get("distributed")
        if dist is not None and int(dist.get("process_id") or 0) != 0:
            return
        folder = Path(str(config.hydra.run.dir)).absolute()
        for parent in (folder, *folder.parents):
            if parent.exists():
                if not parent.is_dir():
                    raise NotADirectoryError(
                        f"hydra.run.dir: {parent} is a file; expected a folder (or a path "
                        "whose existing parts are folders)"
                    )
                break
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise type(err)(
                f"hydra.run.dir: cannot create {folder} ({err.strerror or err})"
            ) from None
        if not os.access(folder, os.W_OK | os.X_OK):
            raise PermissionError(f"hydra.run.dir: {folder} is not writable")
        self.lock = RunLock(folder)
        try:
            self.lock.acquire()
        except OSError as err:  # e.g. a read-only mount that lets mkdir pass (folder existed)
            raise type(err)(f"hydra.run.dir: cannot write into {folder} "
                            f"({err.strerror or err})") from None
        atexit.register(self.lock.release)

    def on_run_end(self, config: DictConfig, **kwargs: Any) -> None:
        if self.lock is not None:
            self.lock.release()


#: Config keys renamed since a release (old -> new): old command-line overrides still work.
RENAMED_KEYS = {"train.method": "train.route", "segment.method": "segment.route"}


def rename_overrides(argv: list[str], renamed: dict[str, str] = RENAMED_KEYS) -> list[str]:
    """``argv`` with renamed keys replaced (``train.method=fft`` -> ``train.route=fft``, also
    ``+key=...`` and ``~key``), printing a one-line deprecation warning for each."""
    out = []
    for arg in argv:
        prefix = arg[: len(arg) - len(arg.lstrip("+~"))]
        key, sep, value = arg[len(prefix):].partition("=")
        if key in renamed:
            print(f"warning: {key} is deprecated; use {renamed[key]}", file=sys.stderr)
            arg = f"{prefix}{renamed[key]}{sep}{value}"
        out.append(arg)
    return out


def renamed_keys(hydra_main: Callable) -> Callable:
    """Outermost decorator of a ``@hydra.main`` driver: renames deprecated keys in
    ``sys.argv`` (:func:`rename_overrides`) before Hydra parses the overrides."""

    @functools.wraps(hydra_main)
    def wrapper(*args, **kwargs):
        if not args and not kwargs:  # the command line (Hydra reads sys.argv)
            sys.argv = rename_overrides(sys.argv)
        return hydra_main(*args, **kwargs)

    return wrapper


def use_cpu_devices(cfg: DictConfig) -> None:
    """The ``cpu_devices`` key (:func:`epilsr.parallel.use_cpu_devices`): the CPU split into
    that many JAX devices. Call it first in a driver, before any other JAX call."""
    n = parallel.use_cpu_devices(cfg.get("cpu_devices"))
    if n is not None:
        log.info("cpu_devices=%s: %d CPU devices", cfg.cpu_devices, n)


def check_route(value, key: str) -> str:
    """A config's correlation route (null: ``"auto"``), checked up front: a one-line error
    naming ``key`` unless it is ``auto`` or one of :data:`epilsr.correlate.ROUTES` (the old
    names ``hybrid``/``dft`` pass; the library warns where it uses them)."""
    route = "auto" if value is None else str(value)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            resolve_route(route)
    except ValueError:
        raise ValueError(f"{key}: expected auto | {' | '.join(ROUTES)}, got {value!r}") from None
    return route


def renamed_settings(settings: dict) -> dict:
    """A run's saved settings (``run_settings.json`` of an older run) with renamed keys
    (:data:`RENAMED_KEYS`) under their new names, so that it resumes."""
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in settings.items()}
    for old, new in RENAMED_KEYS.items():
        (group, key), (_, new_key) = old.split("."), new.split(".")
        if isinstance(out.get(group), dict) and key in out[group]:
            out[group].setdefault(new_key, out[group].pop(key))
    return out


def read_limits(data) -> dict:
    """``max_pixels``, ``max_bytes``, ``warn_mpx`` of a ``data`` config group (library defaults
    when absent) for :func:`epilsr.data.chesapeake.load_tile`."""
    defaults = {"max_pixels": chesapeake.MAX_PIXELS, "max_bytes": chesapeake.MAX_BYTES,
                "warn_mpx": chesapeake.WARN_MPX}
    return {k: data.get(k, v) for k, v in defaults.items()}


def _stems(data) -> list:
    """The tile stems of a ``chesapeake`` / ``chesapeake_lila`` data group."""
    root = Path(data.root)
    if data.kind == "chesapeake":
        return chesapeake.find_tiles(root)
    # LILA region: whole tiles of the chosen states/split, at most max_tiles
    stems = chesapeake.find_lila_tiles(root, states=list(data.states), split=data.split)
    return stems[: int(data.max_tiles)]


def count_tiles(data) -> int:
    """How many tiles :func:`iter_tiles` yields (without reading them)."""
    return 1 if data.kind == "synthetic" else len(_stems(data))


def iter_tiles(data) -> Iterator[LabelledTile]:
    """Tiles described by a ``data`` config group (``kind: synthetic`` or ``chesapeake``)."""
    if data.kind == "synthetic":
        scene = synthetic.make_scene(int(data.seed), size=int(data.size), block=int(data.block))
        colors = chesapeake.LABEL_COLORS  # the same four labels as Chesapeake
        yield LabelledTile(
            f"synthetic_seed{data.seed}_{data.size}",
            scene.image,
            scene.classes,
            scene.labels,
            scene.label_given_class,
            scene.label_names,
            colors,
        )
    elif data.kind in ("chesapeake", "chesapeake_lila"):
        csv = Path(data.root) / "nlcd_label_priors.csv"
        table = chesapeake.load_nlcd_table(csv if csv.exists() else None)
        for stem in _stems(data):
            tile = chesapeake.load_tile(stem, **read_limits(data))
            yield LabelledTile(
                tile.name,
                tile.image,
                table.index(tile.nlcd),
                tile.labels,
                table.mean,
                chesapeake.LABEL_NAMES,
                chesapeake.LABEL_COLORS,
                read_geoinfo(f"{stem}_naip-new.tif"),
            )
    else:
        raise ValueError(
            f"data.kind: expected 'synthetic', 'chesapeake' or 'chesapeake_lila', got {data.kind!r}"
        )


def atomic_write(path: Path, write) -> None:
    """Calls ``write(tmp_path)`` then renames onto ``path``: never a half-written output."""
    atomic_write_path(path, write)


def load_training_images(data) -> tuple[np.ndarray, np.ndarray | None, int]:
    """Imagery ``[T, H, W, C]`` float32 in [0, 1], labels ``[T, H, W]`` (or None), n_labels."""
    if data.kind == "chesapeake_lila":
        stems = chesapeake.find_lila_tiles(data.root, states=list(data.states), split=data.split)
        stems = stems[jax.process_index() :: jax.process_count()][: int(data.max_tiles)]
        images, labels = [], []
        for stem in stems:
            tile = chesapeake.load_tile(stem, **read_limits(data))
            h, w = tile.image.shape[:2]
            c = min(int(data.crop), h, w)
            r0, c0 = (h - c) // 2, (w - c) // 2
            images.append(np.asarray(as_float_image(tile.image[r0 : r0 + c, c0 : c0 + c])))
            labels.append(None if tile.labels is None else tile.labels[r0 : r0 + c, c0 : c0 + c])
        image = np.stack(images)
        label = None if any(lab is None for lab in labels) else np.stack(labels)
        return image, label, 4
    tiles = list(iter_tiles(data))
    image = np.stack([np.asarray(as_float_image(t.image)) for t in tiles])
    labels = None if any(t.labels is None for t in tiles) else np.stack([t.labels for t in tiles])
    return image, labels, tiles[0].table.shape[1]


def streams(data) -> bool:
    """Whether a ``data`` group asks for streamed training patches (``data.stream``)."""
    if not bool(data.get("stream", False)):
        return False
    if data.kind not in ("chesapeake", "chesapeake_lila"):
        raise ValueError(f"data.stream: streaming reads Chesapeake/LILA tiles; data.kind "
                         f"{data.kind!r} is loaded in memory (set data.stream=false)")
    return True


def open_patch_stream(data, *, max_size: int, index_file: Path | None = None) -> PatchStream:
    """A :class:`epilsr.pipelines.patch_stream.PatchStream` over EVERY tile of a ``chesapeake``
    folder or LILA region (``max_tiles`` and ``crop`` do not apply): ``data.block``,
    ``data.windows`` (per step), ``data.cache_bytes`` and ``data.read_threads`` set its reads;
    labels are the 4 Chesapeake classes of ``<tile>_lc.tif`` (tiles without one: no
    label-conditioned sampling). ``index_file``: where the label index is kept between runs
    (e.g. for a resume)."""
    root = Path(data.root)
    if data.kind == "chesapeake":
        stems = chesapeake.find_tiles(root)
    else:
        stems = chesapeake.find_lila_tiles(root, states=list(data.states), split=data.split)
    tiles = []
    for stem in stems:
        lc = Path(f"{stem}_lc.tif")
        tiles.append((f"{stem}_naip-new.tif", lc if lc.exists() else None))
    return PatchStream(tiles, max_size=max_size, block=int(data.get("block", 512)),
                       windows=int(data.get("windows", 16)),
                       cache_bytes=int(data.get("cache_bytes", 2**30)),
                       threads=int(data.get("read_threads", 4)), index_file=index_file,
                       label_map=chesapeake.lc_to_labels, n_labels=len(chesapeake.LABEL_NAMES))
