"""The cluster recipes under deploy/ agree with the CLI, with the scan's sizing, with each other and
with pyproject.toml.

No cluster, container engine or network is needed: manifests are parsed, every ``lensscan`` command
in them (and in deploy/README.md) goes through lensscan's own argument parser, and the sizes of
pods, nodes and actor pools are checked against each other.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shlex
import tomllib
from pathlib import Path
from typing import Any, Iterator

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name

from scanner.cli import build_parser
from scanner.config import ScanConfig
from scanner.registry import resolve_version_dirs

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
DOCKERFILE = DEPLOY / "docker" / "Dockerfile"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]

# CPUs left for cutting stamps per GPU, at least. Cutting is the stage that bounds a node: one core
# cut 700-2,400 stamps/s from plain FITS and 440-1,100 from .fits.fz (deploy/README.md, "Sizing"),
# so 8 CPUs feed a GPU 3,500-19,000 stamps/s; fewer would leave idle the GPU one pays for.
MIN_CUT_CPUS_PER_GPU = 8

CLOUD_SCHEMES = ("s3://", "gs://")
CREDENTIAL_NAMES = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")


def yaml_files() -> list[Path]:
    return sorted(p for p in DEPLOY.rglob("*") if p.suffix in (".yaml", ".yml"))


def documents() -> Iterator[tuple[Path, dict[str, Any]]]:
    for path in yaml_files():
        for doc in yaml.safe_load_all(path.read_text()):
            if doc is not None:
                yield path, doc


def one(kind: str) -> dict[str, Any]:
    found = [doc for _, doc in documents() if doc.get("kind") == kind]
    assert len(found) == 1, f"expected one {kind} under deploy/, found {len(found)}"
    return found[0]


def launcher_config() -> dict[str, Any]:
    found = [doc for _, doc in documents() if doc.get("provider", {}).get("type") == "aws"]
    assert len(found) == 1, f"expected one AWS cluster-launcher config under deploy/, found {len(found)}"
    return found[0]


def strings(node: Any) -> Iterator[str]:
    if isinstance(node, str):
        yield node
    elif isinstance(node, dict):
        for v in node.values():
            yield from strings(v)
    elif isinstance(node, list):
        for v in node:
            yield from strings(v)


def lensscan_commands_in_manifests() -> list[tuple[str, list[str]]]:
    """Every string in a manifest that runs ``lensscan ...``, split as a shell would."""
    found = []
    for path, doc in documents():
        for text in strings(doc):
            argv = shlex.split(text) if "lensscan " in text else []
            if argv[:1] == ["lensscan"]:
                found.append((str(path.relative_to(ROOT)), argv))
    return found


def shell_blocks(markdown: str) -> Iterator[str]:
    """The text of each fenced code block marked bash or sh, or not marked at all."""
    block: list[str] | None = None
    language = ""
    for line in markdown.splitlines():
        if line.lstrip().startswith("```"):
            if block is None:
                block, language = [], line.strip()[3:].strip()
            else:
                if language in ("", "bash", "sh"):
                    yield "\n".join(block)
                block = None
        elif block is not None:
            block.append(line)


def lensscan_commands_in_readme() -> list[tuple[str, list[str]]]:
    """Every ``lensscan scan`` command in deploy/README.md's shell blocks (also after ``ray job submit --``)."""
    found = []
    for block in shell_blocks((DEPLOY / "README.md").read_text()):
        for line in block.replace("\\\n", " ").splitlines():
            argv = shlex.split(line, comments=True)
            starts = [i for i in range(len(argv) - 1) if argv[i:i + 2] == ["lensscan", "scan"]]
            if starts:
                found.append(("deploy/README.md", argv[starts[0]:]))
    return found


def parse_scan(argv: list[str]):
    try:
        args = build_parser().parse_args(argv[1:])
    except SystemExit as exc:
        raise AssertionError(f"`{shlex.join(argv)}` is not a valid lensscan command "
                             f"(argparse exit {exc.code})") from None
    return args


def workers(spec: dict[str, Any]) -> dict[str, Any]:
    groups = spec["workerGroupSpecs"]
    assert len(groups) == 1, "the recipes expect one GPU worker group"
    return groups[0]


def container(template: dict[str, Any]) -> dict[str, Any]:
    return template["spec"]["containers"][0]


def all_containers(doc: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every container of a RayJob's or RayCluster's pods."""
    spec = doc["spec"].get("rayClusterSpec", doc["spec"])
    yield from spec["headGroupSpec"]["template"]["spec"]["containers"]
    for group in spec["workerGroupSpecs"]:
        yield from group["template"]["spec"]["containers"]


def quantity(value: Any) -> float:
    """A Kubernetes CPU or GPU quantity as a number ("46", 46, "500m")."""
    text = str(value)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the Dockerfile, continuation lines joined, comments dropped."""
    lines = [ln for ln in DOCKERFILE.read_text().splitlines() if not ln.lstrip().startswith("#")]
    joined = "\n".join(lines).replace("\\\n", " ")
    out = []
    for ln in joined.splitlines():
        if ln.strip():
            word, _, rest = ln.strip().partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def dockerfile_args() -> dict[str, str]:
    return dict(a.split("=", 1) for kind, a in dockerfile_instructions() if kind == "ARG" and "=" in a)


def image_version_label() -> str:
    labels = " ".join(a for kind, a in dockerfile_instructions() if kind == "LABEL")
    match = re.search(r'org\.opencontainers\.image\.version="([^"]+)"', labels)
    assert match, "the Dockerfile must carry an org.opencontainers.image.version label"
    return match.group(1)


def constraint_pins() -> dict[str, str]:
    pins = {}
    for line in (DEPLOY / "docker" / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, sep, version = line.partition("==")
            assert sep, f"constraints.txt line {line!r} is not an exact pin (name==version)"
            pins[canonicalize_name(name)] = version.strip()
    return pins


def runtime_requirements() -> list[Requirement]:
    return [Requirement(r) for r in PYPROJECT["dependencies"] + PYPROJECT["optional-dependencies"]["cloud"]]


# -- manifests and their scan commands ----------------------------------------------------------

CLUSTER_SCANS = lensscan_commands_in_manifests() + lensscan_commands_in_readme()


def test_every_yaml_under_deploy_parses_and_the_three_recipes_exist():
    assert yaml_files(), "no YAML under deploy/"
    assert all(isinstance(doc, dict) for _, doc in documents())
    assert one("RayJob")["apiVersion"] == "ray.io/v1"
    assert one("RayCluster")["apiVersion"] == "ray.io/v1"
    assert launcher_config()["cluster_name"]


def test_every_lensscan_command_parses_with_the_cli_parser():
    assert any(where.endswith("rayjob-scan.yaml") for where, _ in CLUSTER_SCANS)
    assert any(where == "deploy/README.md" for where, _ in CLUSTER_SCANS)
    for _, argv in CLUSTER_SCANS:
        assert parse_scan(argv).command == "scan"


@pytest.mark.parametrize("where,argv", CLUSTER_SCANS, ids=[f"{w}#{i}" for i, (w, _) in enumerate(CLUSTER_SCANS)])
def test_cluster_scans_read_and_write_cloud_storage_and_resume(where, argv):
    args = parse_scan(argv)
    assert args.tiles and args.catalog and args.out, f"{where}: a cluster scan needs --tiles, --catalog, --out"
    for flag in ("tiles", "catalog", "out"):
        assert getattr(args, flag).startswith(CLOUD_SCHEMES), \
            f"{where}: --{flag} {getattr(args, flag)} is not on storage every node sees (s3://, gs://)"
    assert args.address == "auto", f"{where}: a cluster scan joins the cluster it runs in (--address auto)"
    assert args.num_gpus_per_actor > 0, f"{where}: scoring actors should take GPUs"
    assert args.resume, f"{where}: without --resume a resubmitted scan is refused instead of finished"
    assert not args.overwrite, f"{where}: --overwrite would delete the finished tiles of a resubmitted scan"


def test_scan_models_are_the_registry_baked_into_the_image():
    copies = [a.split() for kind, a in dockerfile_instructions() if kind == "COPY" and "${MODELS}" in a]
    assert len(copies) == 1, "the Dockerfile copies the model registry once, from ${MODELS}"
    in_image = copies[0][-1]
    for where, argv in CLUSTER_SCANS:
        assert parse_scan(argv).models == [in_image], f"{where}: --models must be {in_image}, the image's registry"
    assert resolve_version_dirs(ROOT / dockerfile_args()["MODELS"]), "the default MODELS holds no model version"


# -- resources --------------------------------------------------------------------------------


def test_gpu_actors_fill_whole_worker_nodes(monkeypatch):
    """Actors per node = GPUs per node / GPUs per actor is whole, and the pool the scan builds at
    full scale covers every GPU the autoscaler may add, one CPU per actor leaving the rest to cutting."""
    import ray

    from scanner.pipeline import _actor_pool

    job = one("RayJob")
    group = workers(job["spec"]["rayClusterSpec"])
    limits = container(group["template"])["resources"]["limits"]
    gpus_per_node, cpus_per_node = quantity(limits["nvidia.com/gpu"]), quantity(limits["cpu"])
    [(_, argv)] = [(w, a) for w, a in lensscan_commands_in_manifests() if w.endswith("rayjob-scan.yaml")]
    args = parse_scan(argv)

    actors_per_node = gpus_per_node / args.num_gpus_per_actor
    assert actors_per_node == int(actors_per_node) >= 1, \
        f"{gpus_per_node} GPUs per worker / --num-gpus-per-actor {args.num_gpus_per_actor} is not whole"

    full = {"CPU": cpus_per_node * group["maxReplicas"], "GPU": gpus_per_node * group["maxReplicas"]}
    monkeypatch.setattr(ray, "cluster_resources", lambda: full)
    config = ScanConfig(tiles=args.tiles, catalog=args.catalog, out=args.out, model_dirs=tuple(args.models),
                        num_actors=args.num_actors, num_gpus_per_actor=args.num_gpus_per_actor)
    pool = _actor_pool(config)
    n_actors, cpus_per_actor, gpus_per_actor = pool.actors, pool.cpus_per_actor, pool.gpus_per_actor
    assert gpus_per_actor == args.num_gpus_per_actor
    assert n_actors == actors_per_node * group["maxReplicas"], \
        f"--num-actors {n_actors} should be maxReplicas x actors per node = {actors_per_node * group['maxReplicas']:.0f}"
    assert n_actors == _actor_pool(dataclasses.replace(config, num_actors=None)).actors, \
        "at full size the pool is what the scan would choose by itself"

    cut_cpus_per_gpu = (cpus_per_node - actors_per_node * cpus_per_actor) / gpus_per_node
    assert cut_cpus_per_gpu >= MIN_CUT_CPUS_PER_GPU, \
        f"{cut_cpus_per_gpu:.1f} CPUs per GPU left for cutting, fewer than {MIN_CUT_CPUS_PER_GPU}"


def test_head_takes_no_ray_work_and_no_gpu():
    for spec in (one("RayJob")["spec"]["rayClusterSpec"], one("RayCluster")["spec"]):
        head = spec["headGroupSpec"]
        assert head["rayStartParams"]["num-cpus"] == "0"
        for section in container(head["template"])["resources"].values():
            assert "nvidia.com/gpu" not in section
    launcher = launcher_config()
    assert launcher["available_node_types"][launcher["head_node_type"]]["resources"] == {"CPU": 0}


def test_gpu_workers_autoscale_from_at_least_one_node():
    """minReplicas >= 1: the scan refuses --num-gpus-per-actor on a cluster with no GPU yet."""
    for spec in (one("RayJob")["spec"]["rayClusterSpec"], one("RayCluster")["spec"]):
        assert spec["enableInTreeAutoscaling"] is True
        group = workers(spec)
        assert 1 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]


def test_pods_reserve_exactly_what_ray_is_told_it_has():
    """KubeRay gives Ray the container limits; Kubernetes must reserve the same (requests)."""
    for spec in (one("RayJob")["spec"]["rayClusterSpec"], one("RayCluster")["spec"]):
        for template in (spec["headGroupSpec"]["template"], workers(spec)["template"]):
            resources = container(template)["resources"]
            assert resources["requests"] == resources["limits"]


def test_raycluster_is_the_cluster_the_rayjob_creates():
    assert one("RayCluster")["spec"] == one("RayJob")["spec"]["rayClusterSpec"]


def test_ray_version_of_the_clusters_is_the_pinned_ray():
    ray_pin = constraint_pins()["ray"]
    for spec in (one("RayJob")["spec"]["rayClusterSpec"], one("RayCluster")["spec"]):
        assert spec["rayVersion"] == ray_pin


def test_launcher_gpu_nodes_match_the_kuberay_worker_pods():
    """The same scan command (--num-actors, --num-gpus-per-actor) fits both kinds of cluster."""
    launcher = launcher_config()
    gpu_types = [t for t in launcher["available_node_types"].values() if t["resources"].get("GPU")]
    assert len(gpu_types) == 1
    node = gpu_types[0]
    group = workers(one("RayJob")["spec"]["rayClusterSpec"])
    limits = container(group["template"])["resources"]["limits"]
    assert node["resources"] == {"CPU": quantity(limits["cpu"]), "GPU": quantity(limits["nvidia.com/gpu"])}
    assert 1 <= node["min_workers"] <= node["max_workers"] == launcher["max_workers"] == group["maxReplicas"]
    assert node["node_config"]["IamInstanceProfile"]["Arn"], "workers read and write S3 through their role"


def test_launcher_config_follows_rays_own_schema():
    import jsonschema
    import ray.autoscaler

    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(launcher_config(), schema)


# -- credentials and images ---------------------------------------------------------------------


def test_credentials_come_from_a_secret_never_from_the_manifests():
    text = "\n".join(p.read_text() for p in DEPLOY.rglob("*") if p.is_file())
    assert not re.search(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b", text), "an AWS access key ID is written in deploy/"
    for spec in (one("RayJob")["spec"]["rayClusterSpec"], one("RayCluster")["spec"]):
        for template in (spec["headGroupSpec"]["template"], workers(spec)["template"]):
            c = container(template)
            for env in c.get("env", []):
                assert not (env["name"] in CREDENTIAL_NAMES and "value" in env), \
                    f"{env['name']} is written in the manifest; take it from a Secret"
            assert any("secretRef" in e for e in c.get("envFrom", [])), \
                f"container {c['name']} gets no AWS_* variables from a Secret"


def test_every_image_is_the_one_the_dockerfile_builds():
    version = PYPROJECT["version"]
    assert image_version_label() == version, "the Dockerfile's version label is not pyproject's version"
    images = {c["image"] for _, doc in documents() if doc.get("kind") in ("RayJob", "RayCluster")
              for c in all_containers(doc)}
    images.add(launcher_config()["docker"]["image"])
    assert len(images) == 1, f"the recipes name different images: {sorted(images)}"
    [image] = images
    assert image.rsplit("/", 1)[-1] == f"lensscan:{version}"
    assert f"-t {image} " in DOCKERFILE.read_text(), "the Dockerfile's build command names another tag"


# -- the image recipe ---------------------------------------------------------------------------


def test_dockerfile_installs_lensscan_with_the_pinned_constraints():
    instructions = dockerfile_instructions()
    kinds = [k for k, _ in instructions]
    assert "FROM" in kinds and set(kinds[:kinds.index("FROM")]) <= {"ARG"}, "the Dockerfile starts FROM a base"
    copies = [a.split() for k, a in instructions if k == "COPY"]
    [constraints_copy] = [c for c in copies if c[0] == "deploy/docker/constraints.txt"]
    in_image = constraints_copy[-1]
    assert (ROOT / constraints_copy[0]).is_file()
    installs = [a for k, a in instructions if k == "RUN" and "pip install" in a]
    assert any(f"-c {in_image}" in a and "[cloud]" in a for a in installs), \
        "lensscan[cloud] is not installed with -c <constraints>"
    assert any(k == "USER" and a not in ("root", "0") for k, a in instructions), "the image runs as root"


def test_dockerfile_python_satisfies_requires_python():
    python = dockerfile_args()["PYTHON_VERSION"]
    assert SpecifierSet(PYPROJECT["requires-python"]).contains(python), \
        f"the image's Python {python} is outside requires-python {PYPROJECT['requires-python']}"


def test_constraints_pin_every_runtime_dependency_within_pyproject():
    pins = constraint_pins()
    for req in runtime_requirements():
        name = canonicalize_name(req.name)
        assert name in pins, f"deploy/docker/constraints.txt does not pin {req.name}"
        assert req.specifier.contains(pins[name], prereleases=True), \
            f"{req.name}=={pins[name]} in constraints.txt is outside pyproject's {req}"
    assert "lensscan" not in pins, "the constraints pin dependencies, not lensscan itself"


def test_workers_get_the_named_storage_settings_and_no_secrets(monkeypatch):
    from scanner.storage import WORKER_ENV_NAMES, worker_env

    settings = {"AWS_ENDPOINT_URL": "http://127.0.0.1:9000", "AWS_DEFAULT_REGION": "eu-west-1",
                "GOOGLE_APPLICATION_CREDENTIALS": "/var/secrets/google/key.json"}
    not_forwarded = {"AWS_ACCESS_KEY_ID": "AKIA", "AWS_SECRET_ACCESS_KEY": "secret",
                     "AWS_SESSION_TOKEN": "token", "FSSPEC_S3_KEY": "key", "FSSPEC_S3_SECRET": "secret",
                     "FSSPEC_GCS_TOKEN": "token", "GCSFS_TOKEN": "token",
                     "LENSSCAN_TEST_KILL_SCORER": "/tmp/kill", "LENSSCAN_CACHE": "/tmp/cache"}
    for name in WORKER_ENV_NAMES:
        monkeypatch.delenv(name, raising=False)
    for name, value in {**settings, **not_forwarded}.items():
        monkeypatch.setenv(name, value)
    assert worker_env() == settings


@pytest.mark.parametrize("readme", ["README.md", "deploy/README.md"])
def test_readmes_name_exactly_the_variables_forwarded_to_workers(readme):
    from scanner.storage import WORKER_ENV_NAMES

    text = (ROOT / readme).read_text()
    (listed,) = re.findall(r"forwards exactly these variables[^:]*:(.*?)\.\s", text, flags=re.S)
    assert re.findall(r"`([A-Z][A-Z0-9_]*)`", listed) == list(WORKER_ENV_NAMES)
    assert "`AWS_*`" not in text and "`GOOGLE_*`" not in text
