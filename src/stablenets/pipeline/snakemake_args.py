"""A Snakemake command line read as Snakemake reads it: its options' values, the profiles it
loads and the config files it reads before the Snakefile. For the tools the make targets run
before Snakemake with its options (``pipeline.locks``, ``python -m stablenets.pipeline.config``)."""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import yaml

__all__ = ["options", "profile_settings", "config_files"]


def options(args: Sequence[str]) -> Iterator[tuple[str, str]]:
    """``(flag, value)`` of each option that may take one: ``--flag value`` or ``--flag=value``."""
    for i, arg in enumerate(args):
        following = args[i + 1] if i + 1 < len(args) else ""
        flag, equals, value = arg.partition("=")
        yield (flag, value) if equals and flag.startswith("--") else (arg, following)


def _profiles(args: Sequence[str]) -> list[tuple[str, bool]]:
    """``(profile, by_name)`` of each profile the run loads, in order: ``$SNAKEMAKE_PROFILE`` and
    each ``--profile`` (found by name too), then the workflow profile (``default`` without
    ``--workflow-profile``, none with ``none``)."""
    found = [(os.environ.get("SNAKEMAKE_PROFILE", ""), True)]
    workflow = "default"
    for flag, value in options(args):
        if flag == "--profile":
            found.append((value, True))
        if flag == "--workflow-profile":
            workflow = "" if value == "none" else value
    return [(p, by_name) for p, by_name in [*found, (workflow, False)] if p]


def _profile_files(profile: str, directory: Path, by_name: bool) -> list[Path]:
    """The config files a profile may be read from: the file ``profile``, or ``config.yaml``
    in the folder ``profile``, relative to ``directory`` or to where this runs; for a workflow
    profile also ``profiles/<profile>`` there and beside the Snakefile (``workflow/``), as
    Snakemake looks; for a ``--profile`` the one Snakemake finds by name
    (``snakemake.cli.get_profile_dir``: the user's and the system's profile folders,
    ``profile.yaml`` too)."""
    places = [directory, Path()]
    if not by_name:
        places += [directory / "profiles", directory / "workflow" / "profiles"]
    found = [
        path if path.is_file() else path / "config.yaml" for path in (p / profile for p in places)
    ]
    if by_name:
        try:
            from snakemake.cli import get_profile_dir

            named = get_profile_dir(profile)
        except Exception:  # noqa: BLE001 - Snakemake absent or changed: the paths above stay
            named = None
        if named is not None:
            found.append(Path(named[1]))
    return found


def profile_settings(args: Sequence[str], directory: Path) -> list[dict[str, Any]]:
    """The settings of every profile file the run of ``args`` in ``directory`` may load
    (``_profiles``, ``_profile_files``), in order; unreadable ones left out."""
    settings = []
    for profile, by_name in _profiles(args):
        for path in dict.fromkeys(_profile_files(profile, directory, by_name)):
            try:
                loaded = yaml.safe_load(path.read_text())
            except (OSError, yaml.YAMLError):
                continue
            if isinstance(loaded, dict):
                settings.append(loaded)
    return settings


def config_files(args: Sequence[str], directory: Path) -> list[str]:
    """The config files the run of ``args`` reads before its Snakefile, in order: each
    ``--configfile`` (``--configfile a b`` or ``--configfile=a``), or where none is given its
    profiles' ``configfile`` (a profile gives defaults, the command line overrides them)."""
    given: list[str] = []
    for i, arg in enumerate(args):
        flag, equals, value = arg.partition("=")
        if flag not in ("--configfile", "--configfiles"):
            continue
        if equals:
            given.append(value)
            continue
        for later in args[i + 1 :]:
            if later.startswith("-"):
                break
            given.append(later)
    if given:
        return given
    listed: list[str] = []
    for settings in profile_settings(args, directory):
        files = settings.get("configfile", [])
        listed = [files] if isinstance(files, str) else list(files or listed)
    return listed
