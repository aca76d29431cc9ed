"""Many processes over one list of rasters: who owns what, and is the set complete.

Every process computes the same :func:`assign` from the same input list (names, pixel counts),
runs only its own inputs (:func:`owned`), writes their outputs itself and, after each input,
records them in its own manifest ``<run>/hosts/manifest-<p>.json`` (atomic rewrite, only
process ``p`` writes it). The plan ``<run>/hosts/plan.json`` lists every expected input with
its owner and input fingerprint. :func:`check` reads the plan and all manifests and reports,
per input, what is missing, unfinished, changed since written, or stale (its input changed
since its outputs were written). No JAX here: pure file and list logic.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

from epilsr.io.atomic import write_json_atomic

__all__ = [
    "HOSTS_DIR",
    "Problem",
    "Report",
    "assign",
    "owned",
    "bands_per_input",
    "make_plan",
    "write_plan",
    "read_plan",
    "output_entry",
    "record_done",
    "read_manifests",
    "recorded",
    "check",
    "complete_bands",
]

HOSTS_DIR = "hosts"  # inside the run folder
_PLAN = "plan.json"


def assign(pixels: Sequence[int], count: int) -> list[int]:
    """Owner process of each input: greedy largest-first onto the least-loaded process.

    Deterministic (ties broken by input index, then process index), so every process computes
    the same answer; the largest process load is at most ``4/3`` of the optimum (LPT bound).

    Args:
      pixels: ``[n]`` work per input (pixel count).
      count: number of processes (>= 1).

    Returns:
      ``[n]`` owner in ``[0, count)``.
    """
    if count < 1:
        raise ValueError(f"count: expected >= 1 processes, got {count}")
    if any(int(p) < 0 for p in pixels):
        raise ValueError(f"pixels: expected non-negative pixel counts, got {list(pixels)}")
    loads, owner = [0] * count, [0] * len(pixels)
    for i in sorted(range(len(pixels)), key=lambda i: (-int(pixels[i]), i)):
        p = min(range(count), key=lambda q: (loads[q], q))
        owner[i] = p
        loads[p] += int(pixels[i])
    return owner


def owned(pixels: Sequence[int], index: int, count: int) -> list[int]:
    """Indices (in input order) of the inputs process ``index`` of ``count`` owns."""
    if not 0 <= index < count:
        raise ValueError(f"index: expected a process index in [0, {count}), got {index}")
    return [i for i, p in enumerate(assign(pixels, count)) if p == index]


def bands_per_input(pixels: Sequence[int], strips: Sequence[int], count: int,
                    band_pixels: int | None) -> list[int]:
    """Number of bands of window strips each input (raster) is divided into.

    ``band_pixels`` None (automatic): every input is one unit, unless there are fewer inputs
    than processes: then each is cut into ``ceil(count / n)`` bands. Else an input larger than
    ``band_pixels`` is cut into ``ceil(pixels / band_pixels)`` bands. Never more bands than the
    input's window strips ``strips[i]``.

    Args:
      pixels: ``[n]`` pixel count per input.
      strips: ``[n]`` window strips per input (>= 1).
      count: number of processes (>= 1).
      band_pixels: target pixels per band, or None.

    Returns:
      ``[n]`` bands per input (1 = the whole raster, no bands).
    """
    if count < 1:
        raise ValueError(f"count: expected >= 1 processes, got {count}")
    if band_pixels is not None and band_pixels <= 0:
        raise ValueError(f"distributed.band_mpx: expected a positive size, got {band_pixels} px")
    if len(pixels) != len(strips) or any(int(s) < 1 for s in strips):
        raise ValueError(f"strips: expected one count >= 1 per input, got {list(strips)}")
    if not pixels:
        return []
    if band_pixels is None:
        want = [-(-count // len(pixels)) if len(pixels) < count else 1] * len(pixels)
    else:
        want = [max(1, -(-int(px) // int(band_pixels))) for px in pixels]
    return [min(k, int(s)) for k, s in zip(want, strips, strict=True)]


def make_plan(names: Sequence[str], pixels: Sequence[int], fingerprints: Sequence[str | None],
              count: int, extra: Sequence[Mapping[str, Any]] | None = None) -> dict:
    """The JSON plan: ``{"count", "items": [{"name", "pixels", "owner", "input"}, ...]}``;
    ``extra[i]`` adds keys to item ``i`` (a band: its ``raster``, ``band``, ``bands``,
    ``strips``, ``rows``)."""
    if len(set(names)) != len(names):
        raise ValueError(f"names: expected unique input names, got {list(names)}")
    extra = [{}] * len(names) if extra is None else list(extra)
    if not len(names) == len(pixels) == len(fingerprints) == len(extra):
        raise ValueError("names, pixels, fingerprints: expected one entry per input each")
    owners = assign(pixels, count)
    items = [{"name": n, "pixels": int(px), "owner": o, "input": fp, **x}
             for n, px, fp, o, x in zip(names, pixels, fingerprints, owners, extra, strict=True)]
    return {"count": int(count), "items": items}


def _hosts(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / HOSTS_DIR


def write_plan(run_dir: str | os.PathLike, plan: Mapping[str, Any]) -> Path:
    """Writes ``<run>/hosts/plan.json`` atomically (every process writes the same content)."""
    return write_json_atomic(_hosts(run_dir) / _PLAN, dict(plan))


def read_plan(run_dir: str | os.PathLike) -> dict:
    path = _hosts(run_dir) / _PLAN
    if not path.exists():
        raise FileNotFoundError(f"{path}: no plan; is {run_dir} the folder of a run?")
    return json.loads(path.read_text())


def output_entry(path: str | os.PathLike, run_dir: str | os.PathLike,
                 state: str | os.PathLike | None = None) -> dict:
    """A manifest entry for one finished output file: path relative to the run folder, size,
    ``mtime_ns`` and optionally its resume-state ``progress.json``."""
    path, run_dir = Path(path), Path(run_dir)
    st = path.stat()
    entry = {"path": os.path.relpath(path, run_dir), "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    if state is not None:
        entry["state"] = os.path.relpath(state, run_dir)
    return entry


def record_done(run_dir: str | os.PathLike, index: int, name: str, outputs: Sequence[dict],
                fingerprint: str | None) -> Path:
    """Adds (or replaces) input ``name`` in process ``index``'s manifest, atomically."""
    path = _hosts(run_dir) / f"manifest-{index}.json"
    manifest = json.loads(path.read_text()) if path.exists() else {"process": index, "items": {}}
    manifest["items"][name] = {"input": fingerprint, "outputs": list(outputs)}
    return write_json_atomic(path, manifest)


def read_manifests(run_dir: str | os.PathLike) -> dict[int, dict]:
    """Every process's manifest, by process index."""
    out = {}
    for path in sorted(_hosts(run_dir).glob("manifest-*.json")):
        m = json.loads(path.read_text())
        out[int(m["process"])] = m
    return out


def recorded(run_dir: str | os.PathLike, index: int, name: str,
             fingerprint: str | None) -> bool:
    """Whether process ``index``'s manifest records ``name`` done with this input fingerprint
    and its outputs present, unchanged and complete."""
    path = _hosts(run_dir) / f"manifest-{index}.json"
    got = json.loads(path.read_text())["items"].get(name) if path.exists() else None
    return (got is not None and got["input"] == fingerprint and bool(got["outputs"])
            and all(_output_problem(Path(run_dir), e) is None for e in got["outputs"]))


class Problem(NamedTuple):
    name: str  # input
    owner: int  # process that owns it
    why: str


class Report(NamedTuple):
    expected: int  # inputs in the plan
    done: int  # inputs complete
    problems: list[Problem]

    @property
    def ok(self) -> bool:
        return not self.problems

    def text(self) -> str:
        head = f"{self.done}/{self.expected} inputs complete"
        if self.ok:
            return head
        lines = [f"{head}; {len(self.problems)} not:"]
        lines += [f"  {p.name} (process {p.owner}): {p.why}" for p in self.problems]
        owners = sorted({p.owner for p in self.problems})
        lines.append(f"rerun process(es) {owners} with the same settings to complete the set")
        return "\n".join(lines)


def _output_problem(run_dir: Path, entry: Mapping[str, Any]) -> str | None:
    path = run_dir / entry["path"]
    if not path.exists():
        return f"{entry['path']} is missing"
    st = path.stat()
    if (st.st_size, st.st_mtime_ns) != (entry["size"], entry["mtime_ns"]):
        return f"{entry['path']} changed since it was recorded"
    if entry.get("state"):
        state = run_dir / entry["state"]
        if state.exists() and not json.loads(state.read_text()).get("complete", False):
            return f"{entry['path']}: its run was restarted and is unfinished ({entry['state']})"
    return None


def check(run_dir: str | os.PathLike) -> Report:
    """Completeness of a run folder: every planned input recorded in some manifest, with the
    plan's input fingerprint (else *stale*), and each recorded output present, unchanged and its
    resume state complete."""
    run_dir = Path(run_dir)
    plan = read_plan(run_dir)
    done: dict[str, dict] = {}
    for m in read_manifests(run_dir).values():
        done.update(m["items"])
    problems = []
    for item in plan["items"]:
        name, owner = item["name"], item["owner"]
        got = done.get(name)
        if got is None:
            problems.append(Problem(name, owner, "not done (no manifest records it)"))
        elif got["input"] != item["input"]:
            problems.append(Problem(name, owner, "stale: its input changed since its outputs "
                                    "were written"))
        elif not got["outputs"]:
            problems.append(Problem(name, owner, "no outputs recorded"))
        else:
            why = [w for e in got["outputs"] if (w := _output_problem(run_dir, e)) is not None]
            if why:
                problems.append(Problem(name, owner, "; ".join(why)))
    return Report(len(plan["items"]), len(plan["items"]) - len(problems), problems)


def complete_bands(plan: Mapping[str, Any], report: Report) -> dict[str, list[dict]]:
    """``{raster: its band items in raster order}`` for every raster divided into bands whose
    bands are all complete in ``report`` (:func:`check`)."""
    bad = {p.name for p in report.problems}
    bands: dict[str, list[dict]] = {}
    for item in plan["items"]:
        if "band" in item:
            bands.setdefault(item["raster"], []).append(item)
    return {r: sorted(items, key=lambda i: i["band"]) for r, items in bands.items()
            if len(items) == items[0]["bands"] and not any(i["name"] in bad for i in items)}
