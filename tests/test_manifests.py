"""The KubeRay manifests in cluster/kuberay/ are what the API server accepts and what a campaign needs.

Each RayCluster / RayJob document is validated against the ``openAPIV3Schema`` of version v1 of KubeRay's CRDs
(a copy in cluster/kuberay/crds/, its source and licence in SOURCE.md there) with ``jsonschema``, after turning the
schema's Kubernetes extensions into what the API server does with them: ``x-kubernetes-int-or-string`` takes an
integer or a string, ``nullable`` admits null, fields the schema does not list are rejected (the server prunes them
and ``kubectl apply``'s default strict field validation refuses them), ``x-kubernetes-list-type: map`` lists are keyed
by their ``list-map-keys``, ``set`` lists hold no duplicates, int32/int64 formats are range-checked. CEL rules
(``x-kubernetes-validations``) are not evaluated here: a manifest that sets a field carrying one fails, so such a field
gets a check of its own before it is used. Then Ray's own KubeRay autoscaler code reads the RayCluster, and the
campaign in the ConfigMap is parsed and checked against the cluster it would run on.
"""

from __future__ import annotations

import copy
import hashlib
import re
import shlex
import tomllib
from pathlib import Path

import jsonschema
import pytest
import yaml
from packaging.requirements import Requirement

from nashray.cluster.config import parse_config
from nashray.cluster.placement import NodeShape, check_placeable

ROOT = Path(__file__).resolve().parents[1]
KUBERAY = ROOT / "cluster" / "kuberay"
CRDS = KUBERAY / "crds"
CRD_FILES = {"RayCluster": "ray.io_rayclusters.yaml", "RayJob": "ray.io_rayjobs.yaml"}
ROLE_RESOURCE = {"generators": "inference", "learner": "training", "judges": "judge"}
DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
HANDLED_EXTENSIONS = {"x-kubernetes-int-or-string", "x-kubernetes-preserve-unknown-fields",
                      "x-kubernetes-list-type", "x-kubernetes-list-map-keys", "x-kubernetes-map-type",
                      "x-kubernetes-validations", "x-kubernetes-embedded-resource"}
INT_RANGES = {"int32": (-2**31, 2**31 - 1), "int64": (-2**63, 2**63 - 1)}


# --------------------------------------------------------------------- CRD schema → jsonschema validator

def structural(node):
    """A copy of a CRD schema node with its Kubernetes extensions spelled out as JSON Schema."""
    if isinstance(node, list):
        return [structural(n) for n in node]
    if not isinstance(node, dict):
        return node
    unknown = {k for k in node if k.startswith("x-kubernetes-")} - HANDLED_EXTENSIONS
    if unknown:
        raise ValueError(f"schema extension(s) {sorted(unknown)} not handled by this validator")
    out = {k: structural(v) if k in ("items", "additionalProperties", "anyOf", "allOf", "oneOf", "not") else v
           for k, v in node.items() if k != "properties"}
    if "properties" in node:
        out["properties"] = {name: structural(sub) for name, sub in node["properties"].items()}
    if node.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        out.setdefault("anyOf", [{"type": "integer"}, {"type": "string"}])
    if node.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"]
    if node.get("x-kubernetes-embedded-resource"):
        out.setdefault("properties", {}).update({"apiVersion": {"type": "string"}, "kind": {"type": "string"},
                                                 "metadata": {"type": "object"}})
    if ("properties" in out and "additionalProperties" not in out
            and not node.get("x-kubernetes-preserve-unknown-fields")):
        out["additionalProperties"] = False
    if node.get("x-kubernetes-list-type") == "set":
        out["uniqueItems"] = True
    return out


def _list_type(validator, list_type, instance, schema):
    if list_type != "map" or not validator.is_type(instance, "array"):
        return
    keys = schema.get("x-kubernetes-list-map-keys", [])
    seen = set()
    for item in instance:
        key = tuple(item.get(k) for k in keys) if isinstance(item, dict) else (item,)
        if key in seen:
            yield jsonschema.ValidationError(f"duplicate entry for key {dict(zip(keys, key))} in a list keyed by "
                                             f"{keys}")
        seen.add(key)


def _cel_rules(validator, rules, instance, schema):
    unchecked = [r["rule"] for r in rules if "oldSelf" not in r["rule"]]  # oldSelf: update-time rules only
    if unchecked:
        yield jsonschema.ValidationError(f"this field carries CEL rule(s) not evaluated offline: {unchecked}; "
                                         f"add a check for it to tests/test_manifests.py before using it")


FORMATS = jsonschema.FormatChecker()
for _fmt, (_lo, _hi) in INT_RANGES.items():
    FORMATS.checks(_fmt)(lambda value, lo=_lo, hi=_hi: not isinstance(value, int) or lo <= value <= hi)

KubernetesValidator = jsonschema.validators.extend(
    jsonschema.Draft7Validator, {"x-kubernetes-list-type": _list_type, "x-kubernetes-validations": _cel_rules})


def crd_validator(kind: str) -> jsonschema.Validator:
    crd = yaml.load((CRDS / CRD_FILES[kind]).read_text(encoding="utf-8"), Loader=getattr(yaml, "CSafeLoader",
                                                                                          yaml.SafeLoader))
    assert crd["spec"]["names"]["kind"] == kind
    (v1,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    return KubernetesValidator(structural(v1["schema"]["openAPIV3Schema"]), format_checker=FORMATS)


def schema_errors(validator: jsonschema.Validator, doc: dict) -> list[str]:
    errors = [f"{'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}" for e in validator.iter_errors(doc)]
    if doc.get("apiVersion") != "ray.io/v1":
        errors.append(f"apiVersion: {doc.get('apiVersion')!r}, the CRD serves ray.io/v1")
    name = (doc.get("metadata") or {}).get("name", "")
    if not (DNS_LABEL.match(name) and len(name) <= 63):
        errors.append(f"metadata.name: {name!r} is not a DNS-1123 label")
    return errors


# -------------------------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def validators() -> dict[str, jsonschema.Validator]:
    return {kind: crd_validator(kind) for kind in CRD_FILES}


def _docs(name: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((KUBERAY / name).read_text(encoding="utf-8")) if d]


def _one(kind: str) -> dict:
    (doc,) = [d for f in sorted(KUBERAY.glob("*.yaml")) for d in _docs(f.name) if d["kind"] == kind]
    return doc


@pytest.fixture(scope="module")
def raycluster() -> dict:
    return _one("RayCluster")


@pytest.fixture(scope="module")
def rayjob() -> dict:
    return _one("RayJob")


def _groups(raycluster: dict) -> dict[str, dict]:
    return {g["groupName"]: g for g in raycluster["spec"]["workerGroupSpecs"]}


def _pods(raycluster: dict) -> list[dict]:
    return [raycluster["spec"]["headGroupSpec"]["template"]["spec"]] + [
        g["template"]["spec"] for g in raycluster["spec"]["workerGroupSpecs"]]


def _campaign_text(rayjob: dict) -> tuple[str, str]:
    """(ConfigMap key, campaign YAML) of the config the RayJob's entrypoint runs."""
    mount = rayjob["spec"]["submitterPodTemplate"]["spec"]
    (volume,) = [v for v in mount["volumes"] if "configMap" in v]
    (configmap,) = [d for d in _docs("rayjob.yaml") if d["kind"] == "ConfigMap"]
    assert volume["configMap"]["name"] == configmap["metadata"]["name"]
    key = shlex.split(rayjob["spec"]["entrypoint"])[-1]
    return key, configmap["data"][key]


def _autoscaling_config(raycluster: dict) -> dict:
    """The autoscaling config that Ray's KubeRay autoscaler derives from the RayCluster (Ray's own code)."""
    from ray.autoscaler._private.kuberay.autoscaling_config import _derive_autoscaling_config_from_ray_cr
    cr = copy.deepcopy(raycluster)
    cr["metadata"].setdefault("namespace", "default")
    return _derive_autoscaling_config_from_ray_cr(cr)


def _shapes_at_full_size(raycluster: dict) -> list[NodeShape]:
    return [NodeShape({k: float(v) for k, v in t["resources"].items()}, t["max_workers"] or 1)
            for t in _autoscaling_config(raycluster)["available_node_types"].values()]


# --------------------------------------------------------------------------------- schema validation

def test_the_crd_copies_are_the_ones_their_source_names():
    listed = dict(re.findall(r"^\| `(ray\.io_\w+\.yaml)` \| `([0-9a-f]{64})` \|$",
                             (CRDS / "SOURCE.md").read_text(encoding="utf-8"), re.M))
    assert sorted(listed) == sorted(CRD_FILES.values())
    for name, sha256 in listed.items():
        assert hashlib.sha256((CRDS / name).read_bytes()).hexdigest() == sha256, name


def test_every_kuberay_document_matches_its_crd(validators):
    checked = []
    for path in sorted(KUBERAY.glob("*.yaml")):
        for doc in _docs(path.name):
            if doc["kind"] in validators:
                assert schema_errors(validators[doc["kind"]], doc) == [], f"{path.name}: {doc['kind']}"
                checked.append(doc["kind"])
    assert sorted(checked) == ["RayCluster", "RayJob"]


def _break(doc: dict, path: str, value) -> dict:
    """A copy of ``doc`` with the dotted ``path`` (list indices as numbers) set to ``value``; None deletes."""
    broken = copy.deepcopy(doc)
    *parents, leaf = [int(p) if p.isdigit() else p for p in path.split(".")]
    node = broken
    for p in parents:
        node = node[p]
    if value is None:
        del node[leaf]
    else:
        node[leaf] = value
    return broken


@pytest.mark.parametrize(("path", "value", "error"), [
    ("spec.workerGroupSpecs.0.replicas", "2", "spec.workerGroupSpecs.0.replicas: '2' is not of type 'integer'"),
    ("spec.workerGroupSpecs.0.maxReplicas", 2**31, "spec.workerGroupSpecs.0.maxReplicas: 2147483648 is not a "
                                                   "'int32'"),
    ("spec.workerGroupSpecs.0.replica", 2, "spec.workerGroupSpecs.0: Additional properties are not allowed "
                                           "('replica' was unexpected)"),
    ("spec.workerGroupSpecs.1.groupName", None, "spec.workerGroupSpecs.1: 'groupName' is a required property"),
    ("spec.enableInTreeAutoscaling", "true", "spec.enableInTreeAutoscaling: 'true' is not of type 'boolean'"),
    ("spec.workerGroupSpecs.0.rayStartParams.num-gpus", 1,
     "spec.workerGroupSpecs.0.rayStartParams.num-gpus: 1 is not of type 'string'"),
    ("spec.headGroupSpec.template.spec.containers.0.resources.limits.cpu", "four",
     "spec.headGroupSpec.template.spec.containers.0.resources.limits.cpu: 'four' does not match"),
    ("spec.headGroupSpec.template.spec.containers.0.resources.limits.cpu", True,
     "spec.headGroupSpec.template.spec.containers.0.resources.limits.cpu: True is not valid under any"),
    ("spec.managedBy", "someone", "spec.managedBy: this field carries CEL rule(s) not evaluated offline"),
    ("metadata.name", "Nash_Ray", "metadata.name: 'Nash_Ray' is not a DNS-1123 label"),
])
def test_a_broken_raycluster_is_refused(validators, raycluster, path, value, error):
    errors = schema_errors(validators["RayCluster"], _break(raycluster, path, value))
    assert any(e.startswith(error) for e in errors), errors


def test_int_or_string_takes_either_and_duplicate_keys_are_refused(validators, raycluster):
    limits = "spec.headGroupSpec.template.spec.containers.0.resources.limits"
    for quantity in (4, "4", "3500m", "16Gi"):
        assert schema_errors(validators["RayCluster"], _break(raycluster, f"{limits}.cpu", quantity)) == []
    head = "spec.headGroupSpec.template.spec.containers"
    twin = copy.deepcopy(raycluster["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0])
    errors = schema_errors(validators["RayCluster"], _break(raycluster, head, [twin, twin]))
    assert any("duplicate entry for key {'name': 'ray-head'}" in e for e in errors), errors


def test_a_broken_rayjob_is_refused(validators, rayjob):
    errors = schema_errors(validators["RayJob"], _break(rayjob, "spec.backoffLimit", "0"))
    assert errors == ["spec.backoffLimit: '0' is not of type 'integer'"]
    errors = schema_errors(validators["RayJob"], _break(rayjob, "spec.entrypoint_", "x"))
    assert errors == ["spec: Additional properties are not allowed ('entrypoint_' was unexpected)"]


def test_structural_rewrite_of_kubernetes_extensions():
    schema = structural({"type": "object", "properties": {
        "q": {"x-kubernetes-int-or-string": True},
        "n": {"type": "string", "nullable": True},
        "free": {"type": "object", "x-kubernetes-preserve-unknown-fields": True, "properties": {"a": {}}},
        "tags": {"type": "array", "items": {"type": "string"}, "x-kubernetes-list-type": "set"}}})
    check = KubernetesValidator(schema, format_checker=FORMATS)
    assert check.is_valid({"q": 3, "n": None, "free": {"anything": 1}, "tags": ["a", "b"]})
    assert check.is_valid({"q": "3"})
    assert not check.is_valid({"q": 3.5})
    assert not check.is_valid({"tags": ["a", "a"]})
    assert not check.is_valid({"unknown": 1})
    with pytest.raises(ValueError, match="x-kubernetes-new-thing"):
        structural({"x-kubernetes-new-thing": True})


# ------------------------------------------------------------------------ what a campaign needs of them

def test_worker_groups_advertise_role_resources_as_rays_autoscaler_reads_them(raycluster):
    assert raycluster["spec"]["enableInTreeAutoscaling"] is True
    node_types = _autoscaling_config(raycluster)["available_node_types"]
    for group, resource in ROLE_RESOURCE.items():
        own = {r for r in ROLE_RESOURCE.values() if node_types[group]["resources"].get(r)}
        assert own == {resource}, group
    assert node_types["generators"]["resources"]["GPU"] >= 1 and node_types["learner"]["resources"]["GPU"] >= 1
    assert node_types["learner"]["resources"]["training"] == node_types["learner"]["resources"]["GPU"]
    assert node_types["headgroup"]["resources"]["CPU"] == 0  # actors never land on the head


def test_generators_and_judges_scale_the_learner_does_not(raycluster):
    groups = _groups(raycluster)
    assert set(groups) == set(ROLE_RESOURCE)
    for name in ("generators", "judges"):
        g = groups[name]
        assert g["minReplicas"] < g["maxReplicas"] and g["minReplicas"] <= g["replicas"] <= g["maxReplicas"], name
    learner = groups["learner"]
    assert learner["minReplicas"] == learner["maxReplicas"] == learner["replicas"]


def test_one_image_and_the_pinned_ray_everywhere(raycluster, rayjob):
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    (ray_pin,) = [Requirement(r) for r in pyproject["project"]["dependencies"] if r.startswith("ray")]
    assert raycluster["spec"]["rayVersion"] == str(ray_pin.specifier).removeprefix("==")
    images = {c["image"] for pod in _pods(raycluster) for c in pod["containers"]}
    images |= {c["image"] for c in rayjob["spec"]["submitterPodTemplate"]["spec"]["containers"]}
    assert len(images) == 1, f"Ray needs one Python on all nodes, the pods use {images}"
    for pod in _pods(raycluster):
        assert pod["securityContext"]["runAsUser"] != 0


def test_run_directory_is_one_claim_mounted_on_every_ray_pod(raycluster, rayjob):
    (claim,) = _docs("pvc.yaml")
    assert claim["kind"] == "PersistentVolumeClaim" and "ReadWriteMany" in claim["spec"]["accessModes"]
    mounts = set()
    for pod in _pods(raycluster):
        (volume,) = [v for v in pod["volumes"] if "persistentVolumeClaim" in v]
        assert volume["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]
        (mount,) = [m for c in pod["containers"][:1] for m in c["volumeMounts"] if m["name"] == volume["name"]]
        mounts.add(mount["mountPath"])
    assert len(mounts) == 1
    _, text = _campaign_text(rayjob)
    run_dir = Path(parse_config(yaml.safe_load(text)).storage.run_dir)
    assert run_dir.is_absolute() and run_dir.is_relative_to(mounts.pop())


def test_rayjob_runs_the_configmap_campaign_on_the_raycluster(raycluster, rayjob):
    spec = rayjob["spec"]
    assert spec["clusterSelector"] == {"ray.io/cluster": raycluster["metadata"]["name"]}
    assert "rayClusterSpec" not in spec and not spec.get("shutdownAfterJobFinishes", False)
    argv = shlex.split(spec["entrypoint"])
    assert argv[:2] == ["nashray", "run"]
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    assert pyproject["project"]["scripts"]["nashray"] == "nashray.cluster.cli:main"
    # the submitter uploads the mounted ConfigMap as the job's working directory
    working_dir = yaml.safe_load(spec["runtimeEnvYAML"])["working_dir"]
    submitter = spec["submitterPodTemplate"]["spec"]
    (mount,) = submitter["containers"][0]["volumeMounts"]
    assert mount["mountPath"] == working_dir
    assert [v["name"] for v in submitter["volumes"] if "configMap" in v] == [mount["name"]]
    key, _ = _campaign_text(rayjob)
    assert "/" not in key  # a file at the top of the uploaded working directory


def test_example_campaign_parses_and_fits_the_cluster(raycluster, rayjob):
    _, text = _campaign_text(rayjob)
    cfg = parse_config(yaml.safe_load(text), "rayjob.yaml ConfigMap")
    assert cfg.cluster.address == "auto"  # a Ray job joins its cluster, it never starts one
    for role, resource in ROLE_RESOURCE.items():
        assert getattr(cfg, role).resources.custom == {resource: 1}, role
    shapes = _shapes_at_full_size(raycluster)
    check_placeable(cfg, shapes)
    workers = _groups(raycluster)["learner"]["maxReplicas"] * _autoscaling_config(raycluster)[
        "available_node_types"]["learner"]["resources"]["training"]
    too_big = cfg.model_copy(update={"learner": cfg.learner.model_copy(update={"workers": workers + 1})})
    with pytest.raises(ValueError, match=rf"learner.workers={workers + 1} .* the cluster has training={workers}"):
        check_placeable(too_big, shapes)
