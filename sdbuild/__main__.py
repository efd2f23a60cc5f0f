"""`python -m sdbuild [group=option ...]`: build, run and measure one pipeline (or a sweep with --multirun)."""

from __future__ import annotations

import string
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from .config import config_dir
from .errors import SpecError, problem
from .spec import GROUPS, check_keys, register_configs


def own_plugins_on_path() -> None:
    """Make Hydra's plugin scan see sdbuild's sweepers (hydra_plugins/sdbuild_ladder: the ladder and the
    interleaved sweeper) in an editable install run from another folder: `pip install -e .` maps the
    `sdbuild` package by an import hook, which `pkgutil.iter_modules` over the `hydra_plugins`
    namespace (how Hydra finds plugins) does not consult, so `hydra/sweeper=interleaved` was "Could
    not find" outside the checkout. The checkout's root goes at the end of sys.path (what setuptools'
    compat editable mode does), only when its plugin folder is not already a portion of the
    namespace (a regular install has it in site-packages)."""
    root = Path(__file__).resolve().parent.parent
    if not (root / "hydra_plugins" / "sdbuild_ladder").is_dir() or str(root) in sys.path:
        return
    import hydra_plugins

    if not any(Path(p).resolve() == root / "hydra_plugins" for p in hydra_plugins.__path__ if Path(p).is_dir()):
        sys.path.append(str(root))


own_plugins_on_path()
register_configs()


def main() -> None:
    """The CLI. A bare `--help` is answered here, fast; everything else goes to Hydra."""
    if len(sys.argv) == 2 and sys.argv[1] in ("--help", "-h"):
        print(fast_help())
        return
    if problems := (unreadable_overrides(sys.argv[1:]) or
                    plain_typos(sys.argv[1:]) + unknown_options(sys.argv[1:]) + mistyped_values(sys.argv[1:])):
        print(f"sdbuild: refused:\n{SpecError(problems)}", file=sys.stderr)
        sys.exit(2)
    import signal

    def sigterm(signum, frame):  # a scheduler's or `timeout`'s SIGTERM, also between a sweep's jobs
        from .job import Interrupted

        raise Interrupted("SIGTERM")

    signal.signal(signal.SIGTERM, sigterm)
    try:
        hydra_main()
    except SystemExit as exc:
        # Hydra exits 1 when it cannot compose the job (a key a preset or --config-dir file adds that
        # the typed spec lacks, `_target_` included; a file it cannot parse), having printed why. In a
        # single run nothing of sdbuild ran yet: a user's mistake, refused with exit 2 like the others.
        # In Hydra's basic sweep it composes every job first, so no job ran: the lock is released and
        # the sweep refused alike. Other sweepers and launchers (remote ones, whose task function never
        # runs in this process) are left to say what they say.
        if exc.code == 1 and not _TASK.started:
            from .sweep import end_uncomposable_sweep

            sweep = _multirun(sys.argv[1:])
            ladder = sys.modules.get("hydra_plugins.sdbuild_ladder.ladder_sweeper")
            if sweep and ladder is not None and ladder.LadderError.raised:
                # the ladder's or interleaved sweeper's refusal of its settings, printed above; the
                # sweep's lock (taken at its start) is released and its empty report written
                from .sweep import finish_interrupted_sweep

                finish_interrupted_sweep()
                sys.exit(2)
            if not sweep or end_uncomposable_sweep():
                print("sdbuild: refused: Hydra could not compose this configuration" +
                      (" (a job of this sweep; no job ran, the sweep's lock is released)" if sweep else "") +
                      " (why is above); fix or drop the key or file it names (the spec's fields: "
                      "docs/options.md; a team's presets: docs/teams-and-safety.md)", file=sys.stderr)
                sys.exit(2)
        raise
    except KeyboardInterrupt as exc:  # Ctrl-C or SIGTERM: the job's row is written; one line, no traceback
        from .sweep import finish_interrupted_sweep

        signame = getattr(exc, "signame", "SIGINT")
        where = finish_interrupted_sweep()
        print(f"sdbuild: interrupted ({signame})" + (f"; {where}" if where else ""), file=sys.stderr, flush=True)
        sys.exit(130 if signame == "SIGINT" else 128 + int(getattr(signal, signame, signal.SIGTERM)))


class _TASK:
    started = False  # set when Hydra calls the task function: composing succeeded


def _multirun(argv: list[str]) -> bool:
    parsed = _parsed(argv)
    return bool(parsed and parsed[0].multirun) or "-m" in argv or "--multirun" in argv


def plain_typos(argv: list[str]) -> list[str]:
    """The plain `key=value` overrides (no `+`) whose key is neither a spec field nor a config
    group, each named with the nearest valid key, as `+key=value` is refused after composition.
    Hydra would refuse them too, but with "To append to your config use +key=value", which sends
    a typo the wrong way. Read with Hydra's own argument and override parsers, before composing;
    anything they cannot parse is left to Hydra's message."""
    from hydra.core.override_parser.types import OverrideType

    from .spec import unknown_keys

    overrides = _checkable_overrides(argv)
    if overrides is None:
        return []
    groups = {d.name for d in Path(config_dir()).iterdir() if d.is_dir()}
    typed: dict = {}
    for override in overrides:
        key = override.key_or_group
        if (override.type is not OverrideType.CHANGE or override.package is not None or "/" in key
                or key.split(".")[0] in groups - set(GROUPS) or key.split(".")[0] == "hydra"):
            continue
        node = typed
        *parents, leaf = key.split(".")
        for part in parents:  # `model=sd15 model.pth=/x`: the group's choice and a field under it
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]
        node.setdefault(leaf, None)
    return unknown_keys(typed)


def unreadable_overrides(argv: list[str]) -> list[str]:
    """Each override Hydra's grammar cannot read (`precision=[a`, an unbalanced quote), with the
    parser's own reason. Hydra would refuse them too, with exit 1 and its traceback hint; this is a
    user's mistake: exit 2, before anything loads. Arguments argparse itself refuses are argparse's."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    if (args := _hydra_args(argv)) is None:
        return []
    parser, problems = OverridesParser.create(), []
    for text in args.overrides:
        try:
            parser.parse_overrides([text])
        except Exception as exc:
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            problems.append(problem(text, f"is not an override Hydra can read ({reason})",
                                    "Write key=value, a sweep as key=a,b; quote a value with spaces, commas or "
                                    "brackets (\"key='a, b'\"); the grammar: "
                                    "https://hydra.cc/docs/advanced/override_grammar/basic/"))
    return problems


def mistyped_values(argv: list[str]) -> list[str]:
    """Each `field=value` (or sweep value) that the typed spec cannot hold (`run.steps=abc`,
    `run.steps=`, `precision.tf32=maybe`), checked against the Spec schema before composing.
    Hydra would refuse it while composing, with exit 1 (in a sweep: when it reaches that job,
    after the jobs before it ran); here it is refused at once with exit 2, naming the value.
    Interpolations (`${...}`) are left to the resolver checks, ranges and globs to Hydra."""
    import dataclasses

    from hydra.core.override_parser.types import OverrideType
    from omegaconf import OmegaConf
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException

    from .spec import Spec

    overrides = _checkable_overrides(argv)
    if overrides is None:
        return []
    fields = {f.name for f in dataclasses.fields(Spec)}
    schema = OmegaConf.structured(Spec)
    problems = []
    for override in overrides:
        key = override.key_or_group
        if (override.type is not OverrideType.CHANGE or override.package is not None or "." not in key
                or key.split(".")[0] not in fields):
            continue
        try:
            values = list(override.sweep_iterator()) if override.is_sweep_override() else [override.value()]
        except Exception:  # a glob, or a sweep only Hydra can expand
            continue
        for value in values:
            if isinstance(value, str) and "${" in value:
                continue
            try:
                OmegaConf.update(schema.copy(), key, value, merge=True)
            except (ConfigKeyError, ConfigAttributeError):  # a key the schema lacks: plain_typos names it
                break
            except OmegaConfBaseException as exc:
                reason = str(exc).strip().splitlines()[0]
                problems.append(problem(f"{key}={value}", f"is not a value this field can hold ({reason})",
                                        "Give a value of the field's type; docs/options.md lists each field "
                                        "with its type and default"))
            except Exception:  # a key the schema does not have: plain_typos names it
                continue
    return problems


def _hydra_args(argv: list[str]):
    """Hydra's parsed command line (its argparse namespace), or None where argparse refuses it
    (Hydra then says why)."""
    import contextlib
    import io

    from hydra._internal.utils import get_args_parser

    try:
        with contextlib.redirect_stderr(io.StringIO()):
            return get_args_parser().parse_args(argv)
    except (SystemExit, Exception):
        return None


def _parsed(argv: list[str]):
    """(Hydra's parsed arguments, its parsed overrides), or None where Hydra's parsers refuse them
    (Hydra then says why)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    if (args := _hydra_args(argv)) is None:
        return None
    try:
        return args, OverridesParser.create().parse_overrides(args.overrides)
    except Exception:
        return None


def _checkable_overrides(argv: list[str]):
    """Hydra's parsed overrides of a command line sdbuild checks before composing; None where Hydra's
    parsers refuse it (Hydra then says why) or for shell completion (nothing runs)."""
    parsed = _parsed(argv)
    if parsed is None or parsed[0].shell_completion:
        return None
    return parsed[1]


def unknown_options(argv: list[str]) -> list[str]:
    """`group=option` (or `+group=option`, or a sweep `group=a,b`) naming an option that is not a
    file of sdbuild's conf/<group>/, each with the group's options. Hydra would refuse it too, after
    composing, with its traceback hint and exit 1; this is a user's mistake: exit 2, before anything
    loads. Left to Hydra where its own search path can hold other options (`hydra.searchpath`,
    `--config-dir`, `--config-path`) and for overrides only it can read (ranges, globs)."""
    from hydra.core.override_parser.types import OverrideType

    parsed = _parsed(argv)
    if parsed is None:
        return []
    args, overrides = parsed
    if args.shell_completion or args.config_dir or args.config_path or any(
            o.key_or_group.startswith("hydra.searchpath") for o in overrides):
        return []
    conf = Path(config_dir())
    problems = []
    for override in overrides:
        group = override.key_or_group
        folder = conf / group
        if override.type not in (OverrideType.CHANGE, OverrideType.ADD) or override.package is not None \
                or "." in group or group == "hydra" or group.startswith("hydra/") or not folder.is_dir():
            continue
        try:
            values = (list(override.sweep_string_iterator()) if override.is_sweep_override()
                      else [override.get_value_element_as_str()])
        except Exception:  # a range, glob or interpolation: Hydra's to read
            continue
        options = sorted(f.stem for f in folder.glob("*.yaml"))
        for value in values:
            if value not in options and value != "null":
                problems.append(problem(f"{group}={value}", f"is not an option of the {group} group",
                                        f"Use one of: {', '.join(options)} (`sdbuild --help` lists every group)"))
    return problems


def group_listing(conf: Path) -> str:
    """`group: option, option` for every group folder of `conf/`, in Hydra's own help format,
    read from the file names alone (Hydra's listing composes each of the ~100 options)."""
    groups = sorted(d for d in conf.iterdir() if d.is_dir() and d.name != "hydra")
    return "".join(f"{d.name}: {', '.join(sorted(f.stem for f in d.glob('*.yaml')))}\n" for d in groups)


def fast_help() -> str:
    """sdbuild's help template (conf/hydra/help/sdbuild.yaml), rendered without composing."""
    from omegaconf import OmegaConf

    conf = Path(config_dir())
    template = OmegaConf.load(conf / "hydra" / "help" / "sdbuild.yaml").template
    return string.Template(template).substitute(APP_CONFIG_GROUPS=group_listing(conf))


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="config")
def hydra_main(cfg: DictConfig) -> dict | None:
    """Hydra's task function: returns the job's row (Hydra callbacks and launchers get it as
    `JobReturn.return_value`); a failed single run exits non-zero."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    _TASK.started = True
    multirun = HydraConfig.get().mode == RunMode.MULTIRUN
    try:
        check_keys(cfg)  # before anything runs: an unknown key is a user mistake, not a row
    except SpecError as exc:
        if not multirun:
            print(f"sdbuild: refused:\n{exc}", file=sys.stderr)
            sys.exit(2)
        if cfg.get("dry_run") is True:
            print(f"sdbuild: refused:\n{exc}", flush=True)
            return None
        from .app import refused_job  # in a sweep a refused job is an `unsupported` row; the sweep goes on

        return refused_job(exc)
    if cfg.get("dry_run"):
        if code := dry_run(cfg):
            sys.exit(code)
        return None
    from .app import exit_code, run_from_hydra

    row = run_from_hydra(cfg)
    if row is None:  # a SLURM task that ran a rank other than 0: rank 0's task has the row
        return None
    code = exit_code(row, HydraConfig.get().mode == RunMode.MULTIRUN)
    if code:
        sys.exit(code)
    return row


def dry_run(cfg: DictConfig) -> int:
    """`dry_run=true`: print the resolved spec and the build plan, or the refusal; load nothing.
    In a sweep every job prints its plan and the sweep goes on."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from .dryrun import say

    if say(cfg):
        return 0
    return 0 if HydraConfig.get().mode == RunMode.MULTIRUN else 2


if __name__ == "__main__":
    main()
