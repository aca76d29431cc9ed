"""Atomic checkpoints of the whole training state, and plain epitome files.

A checkpoint is one ``.npz`` file holding every leaf of a :class:`epilsr.train.TrainState`
(epitome parameters, optax state, location-promotion counters, step, and the PRNG key as
``jax.random.key_data``) plus a JSON metadata record (shapes, dtypes, step, epilsr and JAX
versions) stored in the same archive under ``__metadata__``. Files are written atomically:
to a temporary file in the destination directory, flushed and ``fsync``-ed, then moved into
place with ``os.replace`` (and the directory ``fsync``-ed), so a crash or ``SIGKILL`` never
leaves a truncated checkpoint under the final name.

Training is resumable exactly when each step's randomness is derived from the step index,
``jax.random.fold_in(state.key, state.step)`` (:func:`epilsr.train.step_key`).

The final epitome is saved separately by :func:`save_epitome` as a plain ``.npz`` with arrays
``mean``, ``log_var`` and ``prior_logits``, readable by :func:`load_epitome` (or ``np.load``)
without Hydra or any training code.

Loading never unpickles (``allow_pickle=False``): a truncated, empty or foreign file raises
:class:`CheckpointError` naming the file, and every archive is validated (format, version, the
recorded shapes and dtypes) before any value is used. :func:`restore_latest` falls back to the
newest readable checkpoint of a folder, logging which files it skipped.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import zipfile
import zlib
from importlib import metadata as _metadata
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from epilsr.epitome import Epitome
from epilsr.io.atomic import atomic_write

__all__ = [
    "CheckpointError",
    "save",
    "restore",
    "restore_latest",
    "latest",
    "verify",
    "checkpoint_path",
    "read_metadata",
    "save_epitome",
    "load_epitome",
]

_META = "__metadata__"
_FORMAT = "epilsr.checkpoint"
_EPITOME_FORMAT = "epilsr.epitome"
_FORMAT_VERSION = 1
_NAME = re.compile(r"^checkpoint_(\d+)\.npz$")
#: What a damaged archive raises inside ``np.load`` / member reads (never an unpickling hint).
_READ_ERRORS = (zipfile.BadZipFile, zlib.error, EOFError, ValueError, OSError, KeyError,
                json.JSONDecodeError, UnicodeDecodeError)

log = logging.getLogger("epilsr.checkpoint")


class CheckpointError(ValueError):
    """A checkpoint or epitome file that cannot be read: missing, truncated, corrupted, foreign."""


def _version() -> str:
    try:
        return _metadata.version("epilsr")
    except _metadata.PackageNotFoundError:  # pragma: no cover - source checkout
        return "unknown"


def _is_key(x) -> bool:
    return isinstance(x, jax.Array) and jnp.issubdtype(x.dtype, jax.dtypes.prng_key)


def _to_numpy(x) -> np.ndarray:
    """Host copy of a leaf; fully replicated multi-process arrays use the local copy."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        if not x.is_fully_replicated:
            raise ValueError(
                "checkpoint: a leaf is sharded across processes; replicate or gather it first"
            )
        x = x.addressable_data(0)
    return np.asarray(x)


def _flatten(tree) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Leaves by ``keystr`` path; typed PRNG keys as their key data (and their impl name)."""
    arrays, keys = {}, {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        name = jax.tree_util.keystr(path)
        if _is_key(leaf):
            keys[name] = str(jax.random.key_impl(leaf))
            leaf = jax.random.key_data(leaf)
        arrays[name] = _to_numpy(leaf)
    return arrays, keys


def _write_npz(fileobj, arrays: dict[str, np.ndarray]) -> None:
    np.savez(fileobj, **arrays)


def _atomic_write(path: Path, arrays: dict[str, np.ndarray]) -> Path:
    return atomic_write(path, lambda f: _write_npz(f, arrays))


def _encode(meta: dict) -> np.ndarray:
    return np.frombuffer(json.dumps(meta, sort_keys=True).encode(), dtype=np.uint8)


def _decode(z, path) -> dict:
    if _META not in z.files:
        raise CheckpointError(f"{path}: no {_META} record; not an epilsr checkpoint or epitome")
    meta = json.loads(bytes(z[_META]).decode())
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path}: the {_META} record is not a JSON object")
    return meta


@contextlib.contextmanager
def _open(path):
    """``np.load(path, allow_pickle=False)`` as an ``NpzFile``; every read error (also inside
    the ``with`` body, where members are decoded lazily) becomes a :class:`CheckpointError`
    that names the file, so no message ever suggests unpickling."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint file")
    try:
        z = np.load(path, allow_pickle=False)
    except _READ_ERRORS as err:
        raise CheckpointError(f"{path}: not a readable .npz archive ({_reason(err)}); the file "
                              "is truncated, corrupted or not an epilsr checkpoint") from err
    if not isinstance(z, np.lib.npyio.NpzFile):
        raise CheckpointError(f"{path}: a single .npy array, expected an epilsr .npz archive")
    try:
        with z:
            yield z
    except CheckpointError:
        raise
    except _READ_ERRORS as err:
        raise CheckpointError(f"{path}: damaged archive ({_reason(err)}); the file is "
                              "truncated or corrupted") from err


def _reason(err: BaseException) -> str:
    text = str(err) or type(err).__name__
    if "pickle" in text:  # numpy's hint to load unsafely: never pass it on
        return "unrecognised content"
    return f"{type(err).__name__}: {text}"


def _check_meta(path, meta: dict, files, fmt: str) -> None:
    """Format, version and the recorded leaves against the archive's members."""
    if meta.get("format") != fmt:
        raise CheckpointError(f"{path}: expected a {fmt} file, got format {meta.get('format')!r}")
    version = meta.get("format_version")
    if not isinstance(version, int) or not 1 <= version <= _FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: format_version {version!r} is not one this epilsr reads "
            f"(1..{_FORMAT_VERSION}); written by epilsr {meta.get('epilsr_version')}"
        )
    leaves = meta.get("leaves")
    if fmt == _FORMAT:
        if not isinstance(leaves, dict):
            raise CheckpointError(f"{path}: metadata lacks the 'leaves' record")
        members = set(files) - {_META}
        if set(leaves) != members:
            raise CheckpointError(
                f"{path}: metadata lists leaves {sorted(leaves)} but the archive holds "
                f"{sorted(members)}"
            )


def checkpoint_path(directory: str | os.PathLike, step: int) -> Path:
    """``directory / "checkpoint_{step:09d}.npz"`` (the names :func:`latest` looks for)."""
    return Path(directory) / f"checkpoint_{int(step):09d}.npz"


def save(path: str | os.PathLike, state) -> Path:
    """Atomically saves a whole training state (any pytree; normally a ``TrainState``).

    Args:
      path: destination ``.npz`` file (parent directories are created).
      state: the pytree; in a multi-process run leaves must be replicated (call on process 0).

    Returns:
      ``Path(path)``.
    """
    arrays, keys = _flatten(state)
    if _META in arrays:
        raise ValueError(f"checkpoint: a leaf is named {_META!r}")
    step = getattr(state, "step", None)
    params = getattr(state, "params", None)
    meta = {
        "format": _FORMAT,
        "format_version": _FORMAT_VERSION,
        "epilsr_version": _version(),
        "jax_version": jax.__version__,
        "step": None if step is None else int(_to_numpy(step)),
        "epitome_shape": list(params.mean.shape) if isinstance(params, Epitome) else None,
        "leaves": {k: {"shape": list(v.shape), "dtype": str(v.dtype)} for k, v in arrays.items()},
        "keys": keys,
    }
    return _atomic_write(Path(path), {**arrays, _META: _encode(meta)})


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The JSON metadata of a checkpoint or epitome file."""
    with _open(path) as z:
        return _decode(z, path)


def restore(path: str | os.PathLike, template):
    """Loads a checkpoint into the structure of ``template`` (e.g. a fresh ``train_init``).

    Args:
      path: a file written by :func:`save`.
      template: a pytree of the same structure; its leaves give the expected shapes, dtypes
        and PRNG key implementations.

    Returns:
      A pytree like ``template`` holding the saved values (exact bit copies).

    Raises:
      FileNotFoundError: no such file.
      CheckpointError: the file is truncated, corrupted, of another format or version, or its
        arrays disagree with its own metadata.
      ValueError: if a leaf is missing or extra, or its shape or dtype differs from the
        template; an epitome-shape mismatch names both shapes.
    """
    with _open(path) as z:
        meta = _decode(z, path)
        _check_meta(path, meta, z.files, _FORMAT)
        saved = {name: z[name] for name in z.files if name != _META}
    for name, rec in meta["leaves"].items():
        got = (list(saved[name].shape), str(saved[name].dtype))
        if got != (list(rec.get("shape", [])), rec.get("dtype")):
            raise CheckpointError(
                f"{path}: leaf {name} holds {got[1]}{got[0]} but the metadata records "
                f"{rec.get('dtype')}{rec.get('shape')}; the file is corrupted"
            )
    params = getattr(template, "params", None)
    if isinstance(params, Epitome) and meta.get("epitome_shape") is not None:
        want, got = tuple(params.mean.shape), tuple(meta["epitome_shape"])
        if want != got:
            raise ValueError(
                f"{path}: checkpoint epitome shape {got} ([L, N1, N2, C]) does not match the "
                f"template epitome shape {want}"
            )
    leaves_with_path, treedef = jax.tree_util.tree_flatten_with_path(template)
    names = [jax.tree_util.keystr(p) for p, _ in leaves_with_path]
    extra = sorted(set(saved) - set(names))
    if extra:
        raise ValueError(f"{path}: checkpoint has leaves {extra} that the template lacks")
    out = []
    for name, (_, leaf) in zip(names, leaves_with_path, strict=True):
        if name not in saved:
            raise ValueError(f"{path}: checkpoint lacks the leaf {name}")
        value = saved[name]
        expect = jax.random.key_data(leaf) if _is_key(leaf) else leaf
        want_shape, want_dtype = tuple(np.shape(expect)), np.asarray(expect).dtype
        if value.shape != want_shape:
            raise ValueError(
                f"{path}: leaf {name} has shape {value.shape} in the checkpoint but "
                f"{want_shape} in the template"
            )
        if value.dtype != want_dtype:
            raise ValueError(
                f"{path}: leaf {name} has dtype {value.dtype} in the checkpoint but "
                f"{want_dtype} in the template"
            )
        if _is_key(leaf):
            impl = jax.random.key_impl(leaf)
            if meta.get("keys", {}).get(name, str(impl)) != str(impl):
                raise ValueError(
                    f"{path}: key {name} uses {meta['keys'][name]} in the checkpoint but "
                    f"{impl} in the template"
                )
            out.append(jax.random.wrap_key_data(jnp.asarray(value), impl=impl))
        elif isinstance(leaf, jax.Array | np.ndarray | np.generic):
            out.append(jnp.asarray(value))
        else:  # Python scalars in exotic optimizer states stay Python scalars
            out.append(type(leaf)(value.item()) if np.ndim(value) == 0 else value)
    return jax.tree_util.tree_unflatten(treedef, out)


def _candidates(directory: Path) -> list[Path]:
    """``checkpoint_*.npz`` files of ``directory``, highest step first."""
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), e) for e in directory.iterdir()
             if (m := _NAME.match(e.name)) and e.is_file()]
    return [e for _, e in sorted(found, key=lambda t: t[0], reverse=True)]


def verify(path: str | os.PathLike) -> dict[str, Any]:
    """Reads every array of a checkpoint and checks it against the metadata; returns the
    metadata. Raises :class:`CheckpointError` (or ``FileNotFoundError``) naming the file."""
    with _open(path) as z:
        meta = _decode(z, path)
        _check_meta(path, meta, z.files, _FORMAT)
        for name, rec in meta["leaves"].items():
            arr = z[name]
            if list(arr.shape) != list(rec.get("shape", [])) or str(arr.dtype) != rec.get("dtype"):
                raise CheckpointError(f"{path}: leaf {name} disagrees with its metadata")
    return meta


def latest(directory: str | os.PathLike, *, readable: bool = False) -> Path | None:
    """The checkpoint with the highest step in ``directory`` (``checkpoint_*.npz``), or None.

    Temporary files of interrupted writes (``.checkpoint_*.tmp``) are ignored. With
    ``readable=True`` files that fail :func:`verify` are skipped (with a logged warning naming
    each), so the newest *readable* checkpoint is returned.
    """
    for path in _candidates(Path(directory)):
        if not readable:
            return path
        try:
            verify(path)
        except (CheckpointError, FileNotFoundError) as err:
            log.warning("skipping unreadable checkpoint %s: %s", path, err)
            continue
        return path
    return None


def restore_latest(directory: str | os.PathLike, template) -> tuple[Any, Path | None]:
    """:func:`restore` of the newest readable checkpoint in ``directory``.

    Unreadable files (truncated, empty, corrupted) are skipped with a warning naming each, and
    the next older one is tried. A template mismatch (other epitome size, optimizer) is not
    skipped: it raises, since every checkpoint of the folder would share it.

    Returns:
      ``(state, path)``; ``(template, None)`` when the folder holds no checkpoint.

    Raises:
      CheckpointError: checkpoints exist but none is readable (lists the files).
    """
    tried = []
    for path in _candidates(Path(directory)):
        try:
            state = restore(path, template)
        except CheckpointError as err:
            log.warning("skipping unreadable checkpoint %s (falling back to an older one): %s",
                        path, err)
            tried.append(path.name)
            continue
        if tried:
            log.warning("resumed from %s; skipped unreadable %s", path, ", ".join(tried))
        return state, path
    if tried:
        raise CheckpointError(f"{directory}: no readable checkpoint (all of {tried} are "
                              "truncated or corrupted); pass resume=false to start over")
    return template, None


def save_epitome(path: str | os.PathLike, epitome: Epitome) -> Path:
    """Atomically saves an epitome as ``.npz`` (``mean``, ``log_var``, ``prior_logits``).

    The file needs nothing but NumPy to read (see :func:`load_epitome`).
    """
    epitome.check()
    arrays = {
        "mean": _to_numpy(epitome.mean).astype(np.float32),
        "log_var": _to_numpy(epitome.log_var).astype(np.float32),
        "prior_logits": _to_numpy(epitome.prior_logits).astype(np.float32),
    }
    meta = {
        "format": _EPITOME_FORMAT,
        "format_version": _FORMAT_VERSION,
        "epilsr_version": _version(),
        "shape": list(arrays["mean"].shape),
        "layout": "mean/log_var [L, N1, N2, C], prior_logits [L, N1, N2]",
    }
    return _atomic_write(Path(path), {**arrays, _META: _encode(meta)})


def load_epitome(path: str | os.PathLike) -> Epitome:
    """Reads a file written by :func:`save_epitome` (or any ``.npz`` with the three arrays)."""
    with _open(path) as z:
        missing = [k for k in ("mean", "log_var", "prior_logits") if k not in z.files]
        if missing:
            raise CheckpointError(f"{path}: not an epitome file, missing arrays {missing}")
        epitome = Epitome(
            mean=jnp.asarray(z["mean"], jnp.float32),
            log_var=jnp.asarray(z["log_var"], jnp.float32),
            prior_logits=jnp.asarray(z["prior_logits"], jnp.float32),
        )
    return epitome.check()
