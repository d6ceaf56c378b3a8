"""docker/: the site and server images, the entrypoint, the rehearsal compose file and the
build context, checked statically (no Docker engine needed): pinned bases, multi-stage builds,
non-root users, the bundle installed from source, read-only kits and data, hardening, and
agreement with site_configs/. hadolint and `docker compose config` run when installed."""

import os
import re
import shutil
import stat
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from hospital_fl.provisioning.schema import load_site_configs

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "docker"
SITE = DOCKER / "Dockerfile.site"
SERVER = DOCKER / "Dockerfile.server"
ENTRYPOINT = DOCKER / "entrypoint.sh"
COMPOSE = DOCKER / "compose.yaml"
SERVER_SERVICE = "fl-server"
PROJECT_VERSION = re.search(r'^version = "([^"]+)"', (ROOT / "pyproject.toml").read_text(), re.M).group(1)


# ---------------------------------------------------------------- a small Dockerfile parser


@dataclass(frozen=True)
class Instruction:
    cmd: str  # upper case: FROM, RUN, COPY, ...
    args: str  # the rest, continuation lines joined


@dataclass(frozen=True)
class Stage:
    base: str  # the FROM image or an earlier stage's name
    name: str | None
    instructions: tuple[Instruction, ...]

    def all(self, cmd: str) -> list[Instruction]:
        return [i for i in self.instructions if i.cmd == cmd]

    def args(self) -> dict[str, str]:
        """ARG defaults declared in this stage."""
        out = {}
        for i in self.all("ARG"):
            name, _, default = i.args.partition("=")
            out[name.strip()] = default.strip().strip('"')
        return out


def parse_dockerfile(path: Path) -> list[Instruction]:
    """Instructions in order: comments and blank lines dropped, `\\` continuations joined
    (comment lines inside a continuation are dropped too, as Docker does)."""
    instructions, pending = [], ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1].strip() + " "
            continue
        full = (pending + line).strip()
        pending = ""
        cmd, _, args = full.partition(" ")
        instructions.append(Instruction(cmd.upper(), args.strip()))
    assert not pending, f"{path.name}: ends inside a continuation line"
    return instructions


def stages(path: Path) -> list[Stage]:
    out: list[Stage] = []
    base = name = None
    body: list[Instruction] = []
    for ins in parse_dockerfile(path):
        if ins.cmd == "FROM":
            if base is not None:
                out.append(Stage(base, name, tuple(body)))
            words = [w for w in ins.args.split() if not w.startswith("--platform")]
            base = words[0]
            name = words[2] if len(words) >= 3 and words[1].lower() == "as" else None
            body = []
        else:
            assert base is not None, f"{path.name}: {ins.cmd} before the first FROM"
            body.append(ins)
    assert base is not None, f"{path.name}: no FROM"
    out.append(Stage(base, name, tuple(body)))
    return out


def lineage(all_stages: list[Stage], stage: Stage) -> list[Stage]:
    """The stage and the earlier stages it is built FROM, nearest first."""
    by_name = {s.name: s for s in all_stages if s.name}
    chain = [stage]
    while chain[-1].base in by_name:
        chain.append(by_name[chain[-1].base])
    return chain


def base_image(all_stages: list[Stage], stage: Stage) -> str:
    return lineage(all_stages, stage)[-1].base


def expand(value: str, variables: dict[str, str]) -> str:
    return re.sub(r"\$\{?(\w+)\}?", lambda m: variables.get(m.group(1), m.group(0)), value)


def copy_sources(ins: Instruction) -> list[str]:
    words = [w for w in ins.args.split() if not w.startswith("--")]
    return words[:-1]


@pytest.fixture(scope="module", params=["site", "server"])
def dockerfile(request) -> tuple[str, Path, list[Stage]]:
    path = SITE if request.param == "site" else SERVER
    return request.param, path, stages(path)


# ---------------------------------------------------------------- both Dockerfiles


def test_parser_joins_continuations_and_drops_comments(tmp_path):
    f = tmp_path / "Dockerfile"
    f.write_text("# syntax=docker/dockerfile:1\nFROM a:1 AS b\nRUN x \\\n  # note\n  && y\nUSER 1000\n")
    assert parse_dockerfile(f) == [
        Instruction("FROM", "a:1 AS b"),
        Instruction("RUN", "x && y"),
        Instruction("USER", "1000"),
    ]
    (only,) = stages(f)
    assert (only.base, only.name) == ("a:1", "b")


def test_every_base_image_is_pinned(dockerfile):
    kind, path, all_stages = dockerfile
    names = {s.name for s in all_stages if s.name}
    for s in all_stages:
        if s.base in names:
            continue
        image, _, tag = s.base.rpartition(":") if ":" in s.base.split("/")[-1] else (s.base, "", "")
        assert tag, f"{path.name}: FROM {s.base} has no tag"
        assert tag != "latest" and "latest" not in tag, f"{path.name}: FROM {s.base} is not pinned"
        assert "$" not in s.base, f"{path.name}: FROM {s.base} depends on a build argument"


def test_final_stage_base(dockerfile):
    kind, path, all_stages = dockerfile
    base = base_image(all_stages, all_stages[-1])
    if kind == "site":
        assert re.fullmatch(r"nvidia/cuda:12\.\d+(\.\d+)?-(cudnn\d*-)?runtime-ubuntu\d+\.\d+", base), base
    else:
        assert re.fullmatch(r"python:3\.11(\.\d+)?-slim(-\w+)?", base), base


def test_python_is_3_11(dockerfile):
    kind, path, all_stages = dockerfile
    if kind == "server":
        assert base_image(all_stages, all_stages[-1]).startswith("python:3.11")
        return
    runs = " ".join(i.args for s in lineage(all_stages, all_stages[-1]) for i in s.all("RUN"))
    assert re.search(r"apt-get install [^&]*\bpython3\.11\b", runs), "the final image must install python3.11"
    build_runs = " ".join(i.args for s in all_stages for i in s.all("RUN"))
    assert "python3.11 -m venv" in build_runs


def test_multi_stage_keeps_build_tools_out_of_the_final_image(dockerfile):
    kind, path, all_stages = dockerfile
    assert len(all_stages) >= 2, f"{path.name}: not a multi-stage build"
    build_tools = re.compile(r"\b(build-essential|gcc|g\+\+|clang|cmake|make|python3(\.\d+)?-dev)\b")
    final_chain = lineage(all_stages, all_stages[-1])
    for s in final_chain:
        for ins in s.all("RUN"):
            assert not build_tools.search(ins.args), f"{path.name}: build tools reach the final image: {ins.args}"
    assert any(build_tools.search(i.args) for s in all_stages if s not in final_chain for i in s.all("RUN"))
    assert any("--from=" in i.args for i in all_stages[-1].all("COPY")), "the final stage copies nothing built"


def test_final_user_is_not_root(dockerfile):
    kind, path, all_stages = dockerfile
    final = all_stages[-1]
    users = final.all("USER")
    assert users, f"{path.name}: the final stage sets no USER"
    assert final.instructions.index(users[-1]) > max(
        final.instructions.index(i) for i in final.instructions if i.cmd in ("RUN", "COPY")
    ), "USER must come after every RUN and COPY of the final stage"
    user, _, group = expand(users[-1].args, final.args()).partition(":")
    assert user not in ("", "root", "0") and not user.startswith("$"), users[-1].args
    assert group not in ("root", "0"), users[-1].args
    assert user.isdigit() and int(user) >= 1000, "a fixed numeric UID (Kubernetes runAsNonRoot can check it)"
    text = path.read_text()
    assert not re.search(r"\bsudo\b", " ".join(i.args for s in all_stages for i in s.all("RUN"))), "no sudo"
    assert "useradd" in text and "--uid" in text and "--gid" in text


def test_no_remote_add_and_no_jobs_or_whole_context_copied(dockerfile):
    kind, path, all_stages = dockerfile
    for s in all_stages:
        for ins in s.all("ADD"):
            assert not re.search(r"(https?|ftp)://|git@|\.git\b", ins.args), f"{path.name}: remote ADD {ins.args}"
        for ins in s.all("COPY") + s.all("ADD"):
            if "--from=" in ins.args:
                continue
            for src in copy_sources(ins):
                clean = src.strip("./") or "."
                assert clean != ".", f"{path.name}: copies the whole build context ({ins.args})"
                assert not clean.startswith(("jobs", "tests", "workspace", "out")), f"{path.name}: copies {src}"


def test_bundle_is_pip_installed_from_the_copied_source(dockerfile):
    kind, path, all_stages = dockerfile
    for s in all_stages:
        copies = [src.rstrip("/") for i in s.all("COPY") if "--from=" not in i.args for src in copy_sources(i)]
        installs = [i for i in s.all("RUN") if re.search(r"\bpip install\b", i.args)]
        source_installs = [i for i in installs if re.search(r"""\s["']?\.(\[[\w,]+\])?["']?(\s|$)""", i.args)]
        if not source_installs:
            continue
        assert {"pyproject.toml", "README.md", "custom"} <= set(copies), f"{path.name}: {copies}"
        (install,) = source_installs
        assert ".[he]" in install.args, "the HE extra (TenSEAL) is installed"
        assert "-e " not in install.args and "--editable" not in install.args, "a regular install, not editable"
        last_copy = max(s.instructions.index(i) for i in s.all("COPY"))
        assert s.instructions.index(install) > last_copy
        break
    else:
        pytest.fail(f"{path.name}: no stage runs `pip install .` on copied source")


def test_torch_build_and_version(dockerfile):
    kind, path, all_stages = dockerfile
    args = {k: v for s in all_stages for k, v in s.args().items()}
    assert args["TORCH_VERSION"] == "2.13.0"
    index = args["TORCH_INDEX_URL"]
    if kind == "site":
        assert re.fullmatch(r"https://download\.pytorch\.org/whl/cu\d+", index), index
        assert "https://download.pytorch.org/whl/cpu" in path.read_text(), "the CPU alternative is documented"
    else:
        assert index == "https://download.pytorch.org/whl/cpu"
    runs = " ".join(i.args for s in all_stages for i in s.all("RUN"))
    assert '--index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"' in runs


def test_healthcheck_entrypoint_labels_and_volumes(dockerfile):
    kind, path, all_stages = dockerfile
    final = all_stages[-1]
    (health,) = final.all("HEALTHCHECK")
    assert "CMD" in health.args and "NONE" not in health.args.upper().split()
    assert "hospital-fl-entrypoint" in health.args and "healthcheck" in health.args
    (entry,) = final.all("ENTRYPOINT")
    assert entry.args.startswith("[") and "/usr/local/bin/hospital-fl-entrypoint" in entry.args
    assert any(
        "docker/entrypoint.sh" in i.args and "/usr/local/bin/hospital-fl-entrypoint" in i.args
        for i in final.all("COPY")
    )
    labels = " ".join(i.args for i in final.all("LABEL"))
    for key in ("title", "description", "version", "licenses"):
        assert f"org.opencontainers.image.{key}=" in labels, key
    assert final.args()["VERSION"] == PROJECT_VERSION
    volumes = " ".join(i.args for i in final.all("VOLUME"))
    assert "/workspace" in volumes
    env = " ".join(i.args for i in final.all("ENV"))
    assert "FL_KIT_DIR=/kit" in env and "FL_WORKSPACE=/workspace" in env


def test_network_exposure():
    consortium = load_site_configs(ROOT / "site_configs").consortium
    site_stages = stages(SITE)
    assert not [i for s in site_stages for i in s.all("EXPOSE")], "a site listens on nothing: no EXPOSE"
    assert "outbound" in SITE.read_text()
    exposed = {p.split("/")[0] for i in stages(SERVER)[-1].all("EXPOSE") for p in i.args.split()}
    assert exposed == {str(consortium.fl_port), str(consortium.admin_port)} == {"8002", "8003"}


def test_site_image_points_jobs_at_the_data_mount():
    env = " ".join(i.args for i in stages(SITE)[-1].all("ENV"))
    assert "HOSPITAL_FL_SITE_DATA=/data" in env


# ---------------------------------------------------------------- entrypoint


def test_entrypoint_is_executable_bash_that_parses():
    assert ENTRYPOINT.is_file()
    assert ENTRYPOINT.stat().st_mode & stat.S_IXUSR, "docker/entrypoint.sh is not executable"
    assert ENTRYPOINT.read_text().startswith("#!/usr/bin/env bash\n")
    subprocess.run(["bash", "-n", str(ENTRYPOINT)], check=True, capture_output=True)


def test_entrypoint_refuses_a_missing_kit_and_passes_commands_through(tmp_path):
    env = {**os.environ, "FL_KIT_DIR": str(tmp_path / "nokit"), "FL_WORKSPACE": str(tmp_path)}
    missing = subprocess.run(["bash", str(ENTRYPOINT)], env=env, capture_output=True, text=True, timeout=10)
    assert missing.returncode != 0 and "no FLARE startup kit" in missing.stderr
    passed = subprocess.run(
        ["bash", str(ENTRYPOINT), "echo", "ran"], env=env, capture_output=True, text=True, timeout=10
    )
    assert passed.returncode == 0 and passed.stdout == "ran\n"


def test_entrypoint_runs_the_kit_start_script_in_the_workspace(tmp_path):
    kit, workspace = tmp_path / "kit", tmp_path / "workspace"
    (kit / "startup").mkdir(parents=True)
    workspace.mkdir()
    # stands in for FLARE's sub_start.sh: records how it was called
    (kit / "startup" / "sub_start.sh").write_text('echo "$NVFL_WORKSPACE $*" > "$NVFL_WORKSPACE/called"\n')
    env = {**os.environ, "FL_KIT_DIR": str(kit), "FL_WORKSPACE": str(workspace)}
    run = subprocess.run(["bash", str(ENTRYPOINT)], env=env, capture_output=True, text=True, timeout=10)
    assert run.returncode == 0, run.stderr
    assert (workspace / "called").read_text() == f"{workspace} --once\n"
    inside = {**env, "FL_KIT_DIR": str(workspace / "kit")}
    (workspace / "kit" / "startup").mkdir(parents=True)
    (workspace / "kit" / "startup" / "sub_start.sh").write_text("true\n")
    nested = subprocess.run(["bash", str(ENTRYPOINT)], env=inside, capture_output=True, text=True, timeout=10)
    assert nested.returncode != 0 and "outside the workspace" in nested.stderr


# ---------------------------------------------------------------- compose.yaml


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


@pytest.fixture(scope="module")
def hospitals() -> dict:
    return {h.name: h for h in load_site_configs(ROOT / "site_configs").hospitals}


def default_of(value: str) -> str:
    """`${VAR:-default}` -> default; anything else as is."""
    m = re.fullmatch(r"\$\{\w+:?-([^}]*)\}", str(value))
    return m.group(1) if m else str(value)


def mounts(service: dict) -> list[dict]:
    """Volumes in long form; short `src:dst[:opts]` strings are split."""
    out = []
    for v in service.get("volumes", []):
        if isinstance(v, dict):
            out.append(v)
            continue
        parts = v.split(":")
        source, target = parts[0], parts[1] if len(parts) > 1 else parts[0]
        kind = "bind" if source.startswith((".", "/", "~", "$")) else "volume"
        out.append({"type": kind, "source": source, "target": target, "read_only": "ro" in parts[2:]})
    return out


def test_compose_services_match_site_configs(compose, hospitals):
    assert set(compose["services"]) == {SERVER_SERVICE} | set(hospitals)
    assert len(hospitals) == 3


def test_compose_hardening(compose):
    for name, service in compose["services"].items():
        assert service.get("cap_drop") == ["ALL"], name
        assert "no-new-privileges:true" in service.get("security_opt", []), name
        assert service.get("read_only") is True, name
        assert any(str(t).split(":")[0] == "/tmp" for t in service.get("tmpfs", [])), name
        assert service.get("restart"), name
        assert not service.get("privileged"), name
        assert service.get("network_mode") is None, name
        uid, gid = re.fullmatch(r"(\$\{[^}]*\}|[^:]+):(\$\{[^}]*\}|[^:]+)", str(service["user"])).groups()
        assert default_of(uid).isdigit() and default_of(uid) != "0", name
        assert default_of(gid).isdigit() and default_of(gid) != "0", name
        for m in mounts(service):
            assert "docker.sock" not in str(m["source"]), f"{name} mounts the Docker socket"


def test_compose_bind_mounts_are_read_only_and_kits_and_data_in_place(compose, hospitals):
    for name, service in compose["services"].items():
        binds = [m for m in mounts(service) if m["type"] == "bind"]
        for m in binds:
            assert m.get("read_only") is True, f"{name}: {m['source']} is mounted writable"
        targets = {m["target"]: m for m in mounts(service)}
        kit = targets["/kit"]
        assert kit["type"] == "bind"
        # `hospital-fl provision --out workspace/consortium` puts each kit at workspace/consortium/kits/<name>
        assert (DOCKER / kit["source"]).resolve() == ROOT / "workspace" / "consortium" / "kits" / name
        assert targets["/workspace"]["type"] == "volume" and not targets["/workspace"].get("read_only")
        writable = {t for t, m in targets.items() if not m.get("read_only")}
        assert writable <= {"/workspace", "/tmp/nvflare"}, f"{name}: writable {writable}"
        if name in hospitals:
            data = targets["/data"]
            assert data["type"] == "bind"
            assert default_of(data["source"]) == hospitals[name].data_root, name


def test_compose_images_builds_and_gpus(compose, hospitals):
    services = compose["services"]
    server = services[SERVER_SERVICE]
    assert server["build"]["dockerfile"] == "docker/Dockerfile.server"
    assert "deploy" not in server and server.get("hostname") == SERVER_SERVICE
    for name, h in hospitals.items():
        s = services[name]
        assert s["image"] == h.image, name
        assert s["build"]["dockerfile"] == "docker/Dockerfile.site", name
        assert (DOCKER / s["build"]["context"]).resolve() == ROOT, name
        assert not s.get("ports") and not s.get("expose"), f"{name}: a site listens on nothing"
        assert SERVER_SERVICE in s.get("depends_on", []), name
        devices = s.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices", [])
        if h.gpus:
            (gpu,) = devices
            assert (gpu["driver"], gpu["count"], gpu["capabilities"]) == ("nvidia", h.gpus, ["gpu"]), name
            assert h.resources.num_of_gpus <= gpu["count"], name
        else:
            assert not devices, f"{name} has no GPU"
    for ports in server.get("ports", []):
        assert str(ports).startswith("127.0.0.1:"), f"published beyond this host: {ports}"


def test_compose_one_network(compose):
    (network,) = compose["networks"]
    for name, service in compose["services"].items():
        assert service["networks"] == [network], name


def test_compose_config_with_docker():
    docker = shutil.which("docker")
    if docker is None:
        pytest.skip("docker is not installed")
    if subprocess.run([docker, "compose", "version"], capture_output=True, timeout=20).returncode != 0:
        pytest.skip("the docker compose plugin is not installed")
    run = subprocess.run(
        [docker, "compose", "-f", str(COMPOSE), "config", "-q"], capture_output=True, text=True, timeout=60
    )
    assert run.returncode == 0, run.stderr


# ---------------------------------------------------------------- hadolint


@pytest.mark.parametrize("path", [SITE, SERVER], ids=["site", "server"])
def test_hadolint(path):
    hadolint = shutil.which("hadolint")
    if hadolint is None:
        pytest.skip("hadolint is not installed")
    run = subprocess.run(
        [hadolint, "--failure-threshold", "warning", str(path)], capture_output=True, text=True, timeout=60
    )
    assert run.returncode == 0, run.stdout + run.stderr


# ---------------------------------------------------------------- .dockerignore


def dockerignore_excludes(patterns: list[str], path: str) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parent folders wins;
    `!` re-includes; `*` stays within one path element, `**` spans any number."""

    def regex(p: str) -> re.Pattern:
        out, i = "", 0
        while i < len(p):
            if p.startswith("**/", i):
                out, i = out + "(.*/)?", i + 3
            elif p.startswith("**", i):
                out, i = out + ".*", i + 2
            elif p[i] == "*":
                out, i = out + "[^/]*", i + 1
            elif p[i] == "?":
                out, i = out + "[^/]", i + 1
            elif p[i] == "[":
                j = p.index("]", i)
                out, i = out + p[i : j + 1], j + 1
            else:
                out, i = out + re.escape(p[i]), i + 1
        return re.compile(out)

    parts = path.split("/")
    prefixes = ["/".join(parts[: k + 1]) for k in range(len(parts))]
    excluded = False
    for raw in patterns:
        negate = raw.startswith("!")
        rx = regex(raw.lstrip("!").strip("/"))
        if any(rx.fullmatch(p) for p in prefixes):
            excluded = not negate
    return excluded


def test_dockerignore_keeps_the_package_and_drops_everything_else():
    patterns = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    kept = [
        "pyproject.toml",
        "README.md",
        "NOTICE",
        "custom/hospital_fl/__init__.py",
        "custom/hospital_fl/data/assets/pneumoniamnist.npz",
        "docker/entrypoint.sh",
    ]
    dropped = [
        ".venv/bin/python",
        ".git/HEAD",
        "workspace/consortium/kits/hospital-a/startup/client.key",
        "out/report.md",
        "bench/privacy.json",
        "bench_results.json",
        "jobs/cxr_fedavg/meta.json",
        "tests/unit/test_docker_files.py",
        "custom/hospital_fl/__pycache__/cli.cpython-311.pyc",
        "custom/hospital_fl.egg-info/PKG-INFO",
        ".pytest_cache/v/cache/nodeids",
        "docker/compose.yaml",
    ]
    for path in kept:
        assert not dockerignore_excludes(patterns, path), f"{path} is needed in the build context"
    for path in dropped:
        assert dockerignore_excludes(patterns, path), f"{path} must stay out of the build context"
    # every file the Dockerfiles copy from the context is kept
    for dockerfile in (SITE, SERVER):
        for s in stages(dockerfile):
            for ins in s.all("COPY"):
                if "--from=" not in ins.args:
                    for src in copy_sources(ins):
                        assert not dockerignore_excludes(patterns, src.rstrip("/")), src
