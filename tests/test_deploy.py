"""What a platform team deploys: the Dockerfile (and its image where Docker runs), compose.yaml with
Prometheus and Grafana, the systemd units, the file modes of what the pipeline writes, and the reading
recipes of docs/deployment.md; each checked as far as this machine allows, a skip naming what is missing."""

from __future__ import annotations

import fcntl
import json
import os
import re
import shlex
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from canpipe_testing import free_port, start_server

from engine.cli import build_parser
from engine.config import unknown_names

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
UNITS = DEPLOY / "systemd"
CANPIPE_SERVICES = ["receiver", "consumer", "aggregator"]
BENCH_LOCK = "/tmp/canpipe-bench.lock"  # heavy builds never run beside a benchmark


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CANPIPE_")}
    return {**env, **extra}


def parses_as_canpipe(args: list[str]) -> None:
    """argparse exits on a flag canpipe does not have: raise with the arguments instead."""
    try:
        build_parser().parse_args(args)
    except SystemExit as exc:
        raise AssertionError(f"not a canpipe command line: {args}") from exc


# --- file modes: a real pipeline run writes raw files, then `canpipe aggregate` its aggregates ------------


@pytest.fixture(scope="module")
def pipeline_runs(tmp_path_factory):
    """One `canpipe run` and `canpipe aggregate` per umask, data folders by umask (run once per module)."""
    done: dict[int, Path] = {}

    def run(umask: int) -> Path:
        if umask not in done:
            data = tmp_path_factory.mktemp(f"umask{umask:o}") / "data"
            common = dict(cwd=data.parent, capture_output=True, text=True, timeout=100, env=clean_env(), umask=umask)
            args = ["--data-dir", str(data)]
            ran = subprocess.run([sys.executable, "-m", "engine", "run", *args, "--vehicles", "3", "--duration", "1.5",
                                  "--consumers", "1"], **common)  # fmt: skip
            assert ran.returncode == 0 and "missing 0" in ran.stdout, ran.stdout[-2000:] + ran.stderr[-2000:]
            for hour_dir in (data / "raw").glob("year=*/month=*/day=*/hour=*"):
                y, m, d, h = (part.split("=")[1] for part in hour_dir.relative_to(data / "raw").parts)
                agg = subprocess.run([sys.executable, "-m", "engine", "aggregate", *args, "--hour", f"{y}-{m}-{d}T{h}"],
                                     **common)  # fmt: skip
                assert agg.returncode == 0, agg.stdout + agg.stderr
            done[umask] = data
        return done[umask]

    return run


def modes(paths) -> set[str]:
    return {oct(stat.S_IMODE(p.stat().st_mode)) for p in paths}


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_raw_files_and_aggregates_share_one_mode_and_the_queue_is_owner_only(pipeline_runs, umask):
    data = pipeline_runs(umask)
    raw = list((data / "raw").rglob("*.jsonl"))
    aggregates = list((data / "aggregated").glob("aggregated-*.json"))
    assert raw and aggregates and len(aggregates) % 2 == 0  # each hour: its aggregate and its manifest
    expected = {oct(0o644 & ~umask)}
    assert modes(raw) == expected, "raw files"
    assert modes(aggregates) == expected, "aggregates and manifests: whoever reads the raw data reads these"
    queue_files = [p for p in data.glob("queue.db*") if p.is_file()]
    assert queue_files and modes(queue_files) == {"0o600"}, "the queue holds every record in transit"


def doc_commands(prefix: str) -> list[str]:
    text = (ROOT / "docs" / "deployment.md").read_text()
    # run with this interpreter (the one with the [lake] extra), as `python` would in the user's venv
    return [
        shlex.quote(sys.executable) + line[len("python") :] for line in text.splitlines() if line.startswith(prefix)
    ]


def test_the_lake_recipes_of_the_deployment_page_read_every_record(pipeline_runs):
    data = pipeline_runs(0o022)
    records = sum(len(p.read_bytes().splitlines()) for p in (data / "raw").rglob("*.jsonl"))
    duck, arrow = doc_commands('python -c "import duckdb') + doc_commands('python -c "import glob, pyarrow')
    counted = subprocess.run(duck, shell=True, cwd=data.parent, capture_output=True, text=True, timeout=60)
    assert counted.returncode == 0, counted.stderr
    assert sum(int(n) for n in re.findall(r"│ EV-\d+\s+│\s+(\d+) │", counted.stdout)) == records
    counted = subprocess.run(arrow, shell=True, cwd=data.parent, capture_output=True, text=True, timeout=60)
    assert counted.returncode == 0 and int(counted.stdout) == records, counted.stderr


# --- Dockerfile ---------------------------------------------------------------------------------------------


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n\s*", " ", (ROOT / "Dockerfile").read_text())
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in lines]


def stages() -> dict[str, list[tuple[str, str]]]:
    found: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] = []
    for instruction, args in dockerfile_instructions():
        if instruction == "FROM":
            current = found.setdefault(args.split(" AS ")[-1].strip(), [])
        current.append((instruction, args))
    return found


def test_the_image_compiles_in_a_builder_and_runs_canpipe_unprivileged():
    builder, runtime = stages()["builder"], stages()["runtime"]
    assert list(stages()) == ["builder", "runtime"]
    assert ("ENV", "CANPIPE_REQUIRE_COMPILED=1") in builder, "a kernel that does not compile must fail the build"
    assert any(i == "RUN" and "pip wheel" in a for i, a in builder)
    assert not any(i == "COPY" for i, a in runtime), "the runtime stage gets wheels only, never the sources"
    assert not any(i == "RUN" and ("gcc" in a or "apt-get" in a) for i, a in runtime), "no compiler at run time"
    users = [a for i, a in runtime if i == "USER"]
    assert users and users[-1].split(":")[0] not in {"root", "0"}
    assert ("ENTRYPOINT", '["canpipe"]') in runtime and ("VOLUME", '["/data"]') in runtime
    parses_as_canpipe(json.loads(dict(runtime)["CMD"]))
    assert "CANPIPE_DATA_DIR=/data" in dict(runtime)["ENV"]


def test_the_build_context_holds_what_the_builder_copies_and_no_host_build():
    ignored = [line for line in (ROOT / ".dockerignore").read_text().splitlines() if line and line[0] != "#"]
    assert {"**/*.so", "**/*.c", ".venv", "data"} <= set(ignored), "host-built kernels and data stay out"
    for instruction, args in dockerfile_instructions():
        if instruction == "COPY" and "--from" not in args:
            for source in args.split()[:-1]:
                assert (ROOT / source).exists(), f"COPY {source}: not in the build context"
                assert source not in ignored


def healthcheck_code() -> str:
    (args,) = [a for i, a in dockerfile_instructions() if i == "HEALTHCHECK"]
    command = json.loads(args[args.index("CMD") + 3 :].strip())
    assert command[:2] == ["python", "-c"]
    return command[2]


def test_the_image_healthcheck_passes_on_a_healthy_receiver_and_fails_on_a_dead_one(start, env):
    port = free_port()
    start_server(start, env, port, workers=1)
    probe = [sys.executable, "-c", healthcheck_code()]
    healthy = subprocess.run(
        probe, env=clean_env(CANPIPE_HEALTH_URL=f"http://127.0.0.1:{port}/health"), capture_output=True, timeout=30
    )
    assert healthy.returncode == 0, healthy.stderr
    dead = subprocess.run(
        probe,
        env=clean_env(CANPIPE_HEALTH_URL=f"http://127.0.0.1:{free_port()}/health"),
        capture_output=True,
        timeout=30,
    )
    assert dead.returncode != 0


def docker_unusable() -> str | None:
    """Why the image cannot be built here, or None."""
    if shutil.which("docker") is None:
        return "no docker client on PATH"
    info = subprocess.run(["docker", "info", "--format", "{{.ServerVersion}}"], capture_output=True, text=True)
    if info.returncode != 0:
        return f"docker daemon not reachable: {(info.stderr.strip().splitlines() or ['?'])[-1]}"
    base = re.search(r"FROM (\S+) AS builder", (ROOT / "Dockerfile").read_text())
    image = base.group(1).replace("${PYTHON}", "3.11") if base else "python:3.11-slim-bookworm"
    pulled = subprocess.run(["docker", "pull", "-q", image], capture_output=True, text=True, timeout=300)
    if pulled.returncode != 0:
        return f"base image {image} not pullable: {pulled.stderr.strip()[-200:]}"
    return None


@pytest.mark.slow
@pytest.mark.timeout(1200)  # compiles the kernels and downloads the dependencies' wheels
def test_the_image_builds_and_its_canpipe_runs_the_compiled_kernels(tmp_path):
    reason = docker_unusable()
    if reason:
        pytest.skip(reason)
    tag = f"canpipe-test:{os.getpid()}"
    with open(BENCH_LOCK, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        built = subprocess.run(["docker", "build", "-t", tag, str(ROOT)], capture_output=True, text=True, timeout=1000)
    assert built.returncode == 0, built.stderr[-3000:]
    try:
        version = subprocess.run(["docker", "run", "--rm", tag, "--version"], capture_output=True, text=True)
        assert version.stdout.strip().startswith("canpipe "), version.stderr
        checked = subprocess.run(
            ["docker", "run", "--rm", "-e", "CANPIPE_API_KEYS=ops:s3cret", tag, "check"], capture_output=True, text=True
        )
        assert checked.returncode == 0 and "jsonl compiled" in checked.stdout, checked.stdout + checked.stderr
        user = subprocess.run(
            ["docker", "run", "--rm", "--entrypoint", "id", tag, "-u"], capture_output=True, text=True
        )
        assert user.stdout.strip() != "0"
    finally:
        subprocess.run(["docker", "rmi", "-f", tag], capture_output=True)


# --- compose.yaml, Prometheus, Grafana ----------------------------------------------------------------------

VARIABLE = re.compile(r"\$\{(\w+)(?::?([-?])([^}]*))?\}")


def interpolate(value, env: dict[str, str]):
    """Compose's ${VAR}, ${VAR:-default} and ${VAR:?error} over strings, lists and mappings."""
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def one(match: re.Match) -> str:
        name, kind, rest = match.groups()
        if env.get(name):
            return env[name]
        if kind == "?":
            raise KeyError(f"{name}: {rest}")
        return rest or ""

    return VARIABLE.sub(one, value)


def compose(env: dict[str, str]) -> dict:
    return interpolate(yaml.safe_load((ROOT / "compose.yaml").read_text()), env)


def compose_validator(tmp_path: Path) -> list[str] | None:
    """`docker compose -f compose.yaml`, else the Python docker-compose 1.29 on a copy without the top-level
    `name:` (Compose v2's project name, which 1.29 predates and refuses); None when neither is installed."""
    if shutil.which("docker") and subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0:
        return ["docker", "compose", "-f", str(ROOT / "compose.yaml")]
    if shutil.which("docker-compose"):
        text = (ROOT / "compose.yaml").read_text()
        (tmp_path / "compose.yaml").write_text(re.sub(r"^name: .*\n", "", text, flags=re.M))
        return ["docker-compose", "-f", str(tmp_path / "compose.yaml"), "--project-directory", str(ROOT)]
    return None


def test_compose_validates_with_docker_compose_where_it_exists(tmp_path):
    command = compose_validator(tmp_path)
    if command is None:
        pytest.skip("neither `docker compose` (v2 plugin) nor docker-compose is installed; the YAML checks still run")
    valid = subprocess.run(
        [*command, "config", "-q"], capture_output=True, text=True, env=clean_env(CANPIPE_API_KEYS="ops:s3cret"),
        timeout=60, cwd=ROOT,
    )  # fmt: skip
    assert valid.returncode == 0, valid.stderr
    keyless = subprocess.run([*command, "config", "-q"], capture_output=True, text=True, env=clean_env(), cwd=ROOT)
    assert keyless.returncode != 0 and "CANPIPE_API_KEYS" in keyless.stderr, "the receiver needs its keys"


def test_compose_runs_each_role_with_a_canpipe_command_and_known_settings():
    with pytest.raises(KeyError, match="CANPIPE_API_KEYS"):
        compose({})  # the receiver refuses to start without keys, and compose says which variable
    spec = compose({"CANPIPE_API_KEYS": "ops:s3cret"})
    services = spec["services"]
    assert set(CANPIPE_SERVICES + ["prometheus", "grafana"]) <= set(services)
    for name in CANPIPE_SERVICES:
        service = services[name]
        parses_as_canpipe(service["command"])
        assert "canpipe-data:/data" in service["volumes"], f"{name}: the shared data volume"
        assert service["environment"]["CANPIPE_DATA_DIR"] == "/data"
        assert not unknown_names({k: "x" for k in service["environment"]}), f"{name}: a CANPIPE_* typo"
        disabled = bool(service.get("healthcheck", {}).get("disable"))
        assert disabled is (name != "receiver"), f"{name}: only the receiver answers the image's /health check"
    assert services["aggregator"]["command"][:2] == ["aggregate", "--schedule"]
    receiver = services["receiver"]
    port = receiver["command"][receiver["command"].index("--port") + 1]
    assert receiver["ports"] == [f"8000:{port}"] and "0.0.0.0" in receiver["command"]
    named = {v.split(":")[0] for s in services.values() for v in s.get("volumes", []) if not v.startswith(".")}
    assert named <= set(spec["volumes"])
    for service in services.values():
        for volume in service.get("volumes", []):
            if volume.startswith("./"):
                assert (ROOT / volume.split(":")[0]).exists(), f"bind mount {volume}: no such file"


def test_prometheus_scrapes_the_receiver_and_grafana_is_provisioned_with_the_dashboard():
    services = compose({"CANPIPE_API_KEYS": "ops:s3cret"})["services"]
    receiver_port = services["receiver"]["ports"][0].split(":")[-1]
    scrape = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())["scrape_configs"]
    assert [job["metrics_path"] for job in scrape] == ["/metrics"]
    assert scrape[0]["static_configs"][0]["targets"] == [f"receiver:{receiver_port}"]

    grafana = services["grafana"]
    mounts = dict(v.split(":")[:2] for v in grafana["volumes"] if v.startswith("./"))
    assert mounts["./deploy/grafana/provisioning"] == "/etc/grafana/provisioning"
    provisioning = DEPLOY / "grafana" / "provisioning"
    (source,) = yaml.safe_load((provisioning / "datasources" / "prometheus.yml").read_text())["datasources"]
    prometheus_port = services["prometheus"]["ports"][0].split(":")[-1]
    assert source["type"] == "prometheus" and source["url"] == f"http://prometheus:{prometheus_port}"
    assert source["isDefault"]  # the dashboard's datasource variable (type prometheus) picks the default
    (provider,) = yaml.safe_load((provisioning / "dashboards" / "canpipe.yml").read_text())["providers"]
    dashboard_in_container = mounts["./docs/grafana/canpipe.json"]
    assert Path(dashboard_in_container).parent == Path(provider["options"]["path"])
    dashboard = json.loads((ROOT / "docs" / "grafana" / "canpipe.json").read_text())
    assert [v["query"] for v in dashboard["templating"]["list"] if v["type"] == "datasource"] == ["prometheus"]


# --- systemd ------------------------------------------------------------------------------------------------


def unit_files() -> list[Path]:
    return sorted(UNITS.glob("*.service")) + sorted(UNITS.glob("*.timer"))


def environment_file() -> dict[str, str]:
    pairs = (line.split("=", 1) for line in (UNITS / "canpipe.env").read_text().splitlines())
    return {k: v for k, v in (p for p in pairs if len(p) == 2) if not k.startswith("#")}


@pytest.fixture
def rendered_units(tmp_path) -> Path:
    """The units with ExecStart= on this venv's canpipe and the environment file in tmp_path, for verify
    (it refuses an ExecStart= binary that does not exist)."""
    canpipe = Path(sys.executable).parent / "canpipe"
    if not canpipe.exists():
        pytest.skip(f"no canpipe script beside {sys.executable} (pip install -e . makes it)")
    shutil.copy(UNITS / "canpipe.env", tmp_path / "canpipe.env")
    for unit in unit_files():
        text = unit.read_text().replace("/opt/canpipe/bin/canpipe", str(canpipe))
        (tmp_path / unit.name).write_text(text.replace("/etc/canpipe/canpipe.env", str(tmp_path / "canpipe.env")))
    return tmp_path


def test_units_run_canpipe_commands_with_the_environment_file_settings():
    env = environment_file()
    assert not unknown_names(env), "a CANPIPE_* name in canpipe.env that canpipe does not read"
    assert {p.name for p in unit_files()} == {
        "canpipe-receiver.service", "canpipe-consumer.service", "canpipe-aggregate.service", "canpipe-aggregate.timer"
    }  # fmt: skip
    for unit in UNITS.glob("*.service"):
        text = unit.read_text()
        (command,) = re.findall(r"^ExecStart=/opt/canpipe/bin/canpipe (.*)$", text, re.M)
        args = [env[word[1:]].split() if word.startswith("$") else [word] for word in shlex.split(command)]
        parses_as_canpipe([a for group in args for a in group])
        for option in ("NoNewPrivileges=yes", "ProtectSystem=strict", "ReadWritePaths=/var/lib/canpipe",
                       "PrivateTmp=yes", "ProtectHome=yes", "CapabilityBoundingSet=\n", "MemoryDenyWriteExecute=yes",
                       "EnvironmentFile=/etc/canpipe/canpipe.env", "User=canpipe", "UMask=0027"):  # fmt: skip
            assert option in text, f"{unit.name}: {option.strip()}"
        assert env["CANPIPE_DATA_DIR"] == "/var/lib/canpipe", "the one folder the units may write"


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed here")
def test_units_pass_systemd_analyze_verify(rendered_units):
    units = [str(rendered_units / p.name) for p in unit_files()]
    done = subprocess.run(["systemd-analyze", "verify", "--man=no", *units], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and not done.stdout.strip(), done.stdout + done.stderr
    problems = [line for line in done.stderr.splitlines() if "canpipe" in line]
    assert not problems, problems


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed here")
def test_services_are_rated_well_hardened_by_systemd_analyze_security(rendered_units):
    for unit in sorted(rendered_units.glob("*.service")):
        done = subprocess.run(
            ["systemd-analyze", "security", "--offline=yes", "--threshold=20", "--no-pager", str(unit)],
            capture_output=True, text=True, timeout=60, cwd=rendered_units,
        )  # fmt: skip
        if "--offline" in done.stderr and "unrecognized" in done.stderr:  # systemd before 252
            pytest.skip("systemd-analyze security --offline needs systemd 252")
        assert done.returncode == 0, f"{unit.name}: exposure above 2.0\n{done.stdout[-1500:]}"


MDWE_LAUNCHER = r"""
#include <stdio.h>
#include <sys/prctl.h>
#include <unistd.h>
int main(int argc, char **argv) {
    if (prctl(65 /* PR_SET_MDWE */, 1UL /* PR_MDWE_REFUSE_EXEC_GAIN */, 0UL, 0UL, 0UL) != 0) {
        perror("PR_SET_MDWE");
        return 125;
    }
    execvp(argv[1], argv + 1);
    perror("execvp");
    return 126;
}
"""


def test_the_pipeline_runs_under_memory_deny_write_execute(tmp_path):
    # the units' MemoryDenyWriteExecute=yes, as the kernel's own MDWE (Linux 6.3+, inherited by every child):
    # a library that maps writable code (a JIT, ctypes callbacks without libffi's trampolines) would fail here
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        pytest.skip("no C compiler to build the PR_SET_MDWE launcher")
    (tmp_path / "mdwe.c").write_text(MDWE_LAUNCHER)
    subprocess.run([compiler, "-o", str(tmp_path / "mdwe"), str(tmp_path / "mdwe.c")], check=True, timeout=60)
    in_force = "import mmap\ntry:\n    mmap.mmap(-1, 4096, prot=7)\nexcept PermissionError:\n    print('refused')"
    probe = subprocess.run([tmp_path / "mdwe", sys.executable, "-c", in_force], capture_output=True, text=True)
    if probe.returncode == 125:
        pytest.skip(f"this kernel has no PR_SET_MDWE (Linux 6.3+): {probe.stderr.strip()}")
    assert probe.stdout.strip() == "refused", "MDWE was not in force: the test would prove nothing"
    data = tmp_path / "data"
    common = dict(cwd=tmp_path, capture_output=True, text=True, timeout=100, env=clean_env())
    run = [tmp_path / "mdwe", sys.executable, "-m", "engine", "run", "--data-dir", str(data), "--vehicles", "3",
           "--duration", "1.5", "--consumers", "1"]  # fmt: skip
    ran = subprocess.run(run, **common)
    assert ran.returncode == 0 and "missing 0" in ran.stdout, ran.stdout[-2000:] + ran.stderr[-2000:]
    (hour_dir, *_) = sorted((data / "raw").glob("year=*/month=*/day=*/hour=*"))
    y, m, d, h = (part.split("=")[1] for part in hour_dir.relative_to(data / "raw").parts)
    aggregate = [tmp_path / "mdwe", sys.executable, "-m", "engine", "aggregate", "--data-dir", str(data), "--hour",
                 f"{y}-{m}-{d}T{h}"]  # fmt: skip
    aggregated = subprocess.run(aggregate, **common)
    assert aggregated.returncode == 0, aggregated.stderr[-2000:]
    assert list((data / "aggregated").glob("aggregated-*.json"))
