"""The installed commands (``epilsr-lsr`` ...): entry points, packaged configs, ``--help``."""

from __future__ import annotations

import fnmatch
import importlib
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
PACKAGE = REPO / "src" / "epilsr"
DRIVERS = ("lsr", "train", "segment", "til")


def _installed_command(name: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    """What the console script ``epilsr-<name>`` does, run outside the repository."""
    code = (f"import sys; sys.argv = ['epilsr-{name}', *{list(args)!r}]; "
            f"from epilsr.cli.{name} import main; main()")
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(PACKAGE.parent)}
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True,
                          timeout=120, env=env)


def test_scripts_point_at_the_drivers():
    scripts = PYPROJECT["project"]["scripts"]
    assert sorted(scripts) == sorted([*(f"epilsr-{d}" for d in DRIVERS), "epilsr-lsr-check"])
    for name, target in scripts.items():
        module, func = target.split(":")
        assert module == f"epilsr.cli.{name.removeprefix('epilsr-').replace('-', '_')}"
        assert callable(getattr(importlib.import_module(module), func))


def test_every_config_is_package_data():
    patterns = PYPROJECT["tool"]["setuptools"]["package-data"]["epilsr"]
    configs = sorted((PACKAGE / "cli" / "conf").rglob("*.yaml"))
    assert len(configs) >= 10
    missing = [p for p in configs
               if not any(fnmatch.fnmatch(p.relative_to(PACKAGE).as_posix(), g) for g in patterns)]
    assert not missing, f"not in package-data {patterns}: {missing}"
    assert (PACKAGE / "cli" / "conf" / "__init__.py").exists()  # Hydra's pkg:// needs a package


def test_shims_are_the_cli_modules():
    import epilsr.cli.common
    import experiments.common

    assert experiments.common is epilsr.cli.common


HELP_KEYS = {
    "lsr": ["data=geotiff", "data.image=", "data.coarse=", "data.table=", "data.truth=",
            "output.probs=", "resume=", "seed=", "hydra.run.dir=", "cpu_devices="],
    "train": ["+exp=", "model.size=", "train.steps=", "resume=", "seed=", "cpu_devices="],
    "segment": ["segment.epitome=", "segment.folds=", "seed=", "cpu_devices="],
    "til": ["+til=", "data.root=", "seed="],
}


def _helps(cwd: Path) -> dict[str, str]:
    """``{name: stdout of epilsr-<name> --help}`` as the console scripts run it, every driver
    in one process (one interpreter start instead of four)."""
    code = ("import sys\nfrom hydra.core.global_hydra import GlobalHydra\n"
            f"for name in {list(DRIVERS)!r}:\n"
            "    sys.argv = [f'epilsr-{name}', '--help']\n"
            "    print(f'=== epilsr-{name}', flush=True)\n"
            "    try:\n"
            "        __import__(f'epilsr.cli.{name}', fromlist=['main']).main()\n"
            "    except SystemExit as e:\n"
            "        assert not e.code, (name, e.code)\n"
            "    sys.stdout.flush()\n"
            "    GlobalHydra.instance().clear()\n")
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(PACKAGE.parent)}
    proc = subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True,
                          timeout=240, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    parts = [part.split("\n", 1) for part in proc.stdout.split("=== epilsr-")[1:]]
    return {name: text for name, text in parts}


def test_help_lists_main_keys_from_any_folder(tmp_path):
    helps = _helps(tmp_path)
    assert sorted(helps) == sorted(DRIVERS)
    for name, keys in HELP_KEYS.items():
        lines = helps[name].splitlines()
        for key in keys:  # one line each: the key, then what it does
            hits = [ln for ln in lines if ln.startswith(key)]
            assert len(hits) == 1 and len(hits[0].split(maxsplit=1)) == 2, (name, key, hits)
        assert "== Configuration groups" in helps[name], name
        assert f"epilsr-{name} --cfg job" in helps[name], name
    assert "exp:" in helps["lsr"] and "chesapeake_wv" in helps["lsr"]  # the experiments
    assert not list(tmp_path.iterdir())  # --help writes nothing


def test_route_keys_name_the_library_routes():
    """``train.route`` / ``segment.route`` (formerly ``method``): null/auto or a route name."""
    from hydra import compose, initialize_config_module

    from epilsr.correlate import ROUTES

    with initialize_config_module("epilsr.cli.conf", version_base="1.3"):
        cfg = compose("segment")
    assert "method" not in cfg.train and "method" not in cfg.segment
    assert cfg.train.route is None and cfg.segment.route == "auto"
    text = (PACKAGE / "cli" / "conf" / "train.yaml").read_text()
    assert all(r in text for r in ROUTES)


def test_old_method_keys_are_renamed_with_a_warning(capsys):
    from epilsr.cli.common import rename_overrides, renamed_settings

    argv = ["prog", "train.method=fft", "+segment.method=direct", "~train.method",
            "train.methods=x", "data.method=y", "seed=1"]
    assert rename_overrides(argv) == ["prog", "train.route=fft", "+segment.route=direct",
                                      "~train.route", "train.methods=x", "data.method=y",
                                      "seed=1"]
    assert capsys.readouterr().err.splitlines() == [
        "warning: train.method is deprecated; use train.route",
        "warning: segment.method is deprecated; use segment.route",
        "warning: train.method is deprecated; use train.route"]
    old = {"seed": 0, "train": {"steps": 4, "method": None}, "data": {"kind": "synthetic"}}
    assert renamed_settings(old) == {"seed": 0, "train": {"steps": 4, "route": None},
                                     "data": {"kind": "synthetic"}}
    assert old["train"] == {"steps": 4, "method": None}  # not modified


def test_old_method_override_still_works_on_the_command_line(tmp_path):
    proc = _installed_command("train", "train.method=direct", "--cfg", "job", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "route: direct" in proc.stdout and "method" not in proc.stdout
    assert "warning: train.method is deprecated; use train.route" in proc.stderr


def test_bad_route_is_one_line_naming_the_key(tmp_path):
    from epilsr.cli.common import check_route

    assert check_route(None, "train.route") == "auto" and check_route("fft", "k") == "fft"
    assert check_route("hybrid", "k") == "hybrid"  # an old name: the library maps it, warning
    with pytest.raises(ValueError, match=r"^segment.route: expected auto \| direct .*'bogus'"):
        check_route("bogus", "segment.route")
    proc = _installed_command("train", "train.route=bogus", f"hydra.run.dir={tmp_path / 'o'}",
                              cwd=tmp_path)
    assert proc.returncode == 2 and "error: train.route: expected auto | direct" in proc.stderr


def test_bad_cpu_devices_is_one_line_naming_the_key(tmp_path):
    proc = _installed_command("lsr", "cpu_devices=many", f"hydra.run.dir={tmp_path / 'o'}",
                              cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "error: cpu_devices: expected a positive integer, 'auto' or null, got 'many'" in (
        proc.stderr)
