"""Every command shown in README.md and docs/ is one the CLI accepts as written: train.py's
overrides parse and compose (sweeps at their first value; nothing trains), the analysis and
benchmark scripts' arguments pass their argparse (and the benchmarks' own checks)."""
from __future__ import annotations

import argparse
import importlib
import re
import shlex

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override
from hydra.errors import HydraException

import ablate.resolvers  # noqa: F401  (${scaled:N}, ${job_folder:...}: what train.py registers)
from conftest import CONF, REPO

PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
SCRIPT = re.compile(r"(ablate/train|analysis/\w+|benchmarks/\w+)\.py")  # the entry points a reader types


def code_blocks(text: str) -> list[str]:
    """The fenced code blocks and the `inline code` of a markdown page."""
    fenced = re.findall(r"^```[^\n]*\n(.*?)^```", text, flags=re.S | re.M)
    rest = re.sub(r"^```[^\n]*\n.*?^```", "", text, flags=re.S | re.M)
    return fenced + [code.replace("\n", " ") for code in re.findall(r"`([^`]+)`", rest)]  # may wrap lines


def commands() -> list[tuple[str, str]]:
    """(page, command) for every `python <script> ...` line, continuations joined, comments cut."""
    found = []
    for page in PAGES:
        for block in code_blocks(page.read_text()):
            shell = {}  # VAR="..." lines of the block, as the shell would expand $VAR after them
            for line in block.replace("\\\n", " ").splitlines():
                assigned = re.fullmatch(r"(\w+)=(['\"]?)(.*)\2", line.strip())
                if assigned:
                    shell[assigned[1]] = assigned[3]
                for name, value in shell.items():
                    line = line.replace(f"${name}", value)
                start = line.find("python ")
                if start < 0:
                    continue
                command = re.split(r"\s+#\s", line[start:])[0].strip()
                if command.split()[1:2] and SCRIPT.fullmatch(command.split()[1]) and "..." not in command:
                    found.append((page.name, command))
    return found


COMMANDS = commands()


def test_the_pages_show_commands_of_every_kind():
    scripts = {c.split()[1] for _, c in COMMANDS}
    assert {"ablate/train.py", "analysis/make_tables.py", "benchmarks/throughput.py"} <= scripts
    assert len(COMMANDS) > 40


def test_a_command_pasted_into_a_shell_runs_as_shown():
    # data.root=<cifar10> would be read by the shell as a redirect from a file named cifar10
    assert [c for _, c in COMMANDS if re.search(r"[<>|;&]", c)] == []


def first_values(overrides: list[Override]) -> list[str]:
    """A sweep's first value for each swept key: the config every job of it starts from."""
    out = []
    for o in overrides:
        value = next(iter(o.sweep_string_iterator())) if o.is_sweep_override() else o.get_value_element_as_str()
        out.append(f"{o.get_key_element()}={value}" if not o.is_delete() else o.input_line)
    return out


def check_train(command: str) -> None:
    """Parse the overrides as Hydra does and compose the config they make (nothing trains)."""
    args = [a for a in shlex.split(command)[2:] if a not in ("-m", "--multirun")]
    if any(a.startswith("--") for a in args):  # --help, --cfg job: Hydra's own flags
        assert {a for a in args if a.startswith("--")} <= {"--help", "--cfg", "--info", "--hydra-help"}
        return
    overrides = OverridesParser.create().parse_overrides(args)
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=first_values(overrides), return_hydra_config=True)
    assert cfg.epochs >= 1 and cfg.hydra.run.dir  # composed and resolved: every key and option exists


@pytest.mark.parametrize("page, command", [c for c in COMMANDS if c[1].split()[1] == "ablate/train.py"])
def test_train_commands_parse_and_compose(page, command):
    check_train(command)


def parsed(module, argv: list[str], monkeypatch) -> argparse.Namespace:
    """Run a script's main() up to the end of its argument parsing, and no further."""
    class Parsed(Exception):
        pass

    real = argparse.ArgumentParser.parse_args

    def stop_after(self, args=None, namespace=None):
        raise Parsed(real(self, args, namespace))

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", stop_after)
    try:
        module.main(argv)
    except Parsed as done:
        return done.args[0]
    raise AssertionError(f"{module.__name__}.main did not parse its arguments")


def check_script(command: str, monkeypatch) -> None:
    script, *argv = shlex.split(command)[1:]
    monkeypatch.syspath_prepend(str(REPO))
    module = importlib.import_module(script.removesuffix(".py").replace("/", "."))
    if hasattr(module, "parse_args"):  # the benchmarks: parse_args also runs their checks
        module.parse_args(argv)
    else:
        assert parsed(module, argv, monkeypatch) is not None


@pytest.mark.parametrize("page, command", [c for c in COMMANDS if c[1].split()[1] != "ablate/train.py"])
def test_script_commands_pass_their_argparse(page, command, monkeypatch):
    check_script(command, monkeypatch)


@pytest.mark.parametrize("command", ["python ablate/train.py loss=no_such_loss",
                                     "python ablate/train.py -m optim.lrr=1e-3,1e-2",
                                     "python ablate/train.py model.filters=[8,16"])
def test_a_train_command_the_cli_refuses_fails_the_check(command):
    with pytest.raises(HydraException):  # a bad override, an unknown key, no such option
        check_train(command)


@pytest.mark.parametrize("command", ["python analysis/make_tables.py --roots multirun",
                                     "python benchmarks/throughput.py --device cpu --images 512 --no-plain"])
def test_a_script_command_the_cli_refuses_fails_the_check(command, monkeypatch):
    with pytest.raises(SystemExit):  # argparse's error, or the benchmark's "fewer than 20 batches"
        check_script(command, monkeypatch)
