"""Everything under cluster/ checked offline: every YAML/manifest parses and has its required keys,
every `python -m pipelines.<name>` entry point exists and its --config (with its key=value
overrides) loads with the pipeline's config class, the clusters fit the configs they run (GPUs and
CPUs per actor, actors per cluster, mounted paths), token auth is on everywhere, local dashboards
listen on 127.0.0.1, and no file in cluster/ or configs/ carries a literal secret."""
from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import yaml

from layercard.config import load_config
from layercard.card.drift import ReprofileConfig
from layercard.profile.config import ProfileConfig

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
YAMLS = sorted(p for p in CLUSTER.rglob("*") if p.suffix in (".yaml", ".yml"))
TEXT_FILES = sorted(p for p in CLUSTER.rglob("*") if p.is_file())
CONFIG_CLASSES = {"pipelines.profile": ProfileConfig, "pipelines.reprofile": ReprofileConfig}
TOKEN_SECRET = "layercard-ray-token"
RAY_VERSION = "2.60.0"


def docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def manifests(kind: str) -> list[tuple[Path, dict]]:
    return [(p, d) for p in YAMLS for d in docs(p) if isinstance(d, dict) and d.get("kind") == kind]


def launcher() -> dict:
    return docs(CLUSTER / "ray-cluster.yaml")[0]


def containers(pod_spec: dict) -> list[dict]:
    return pod_spec.get("containers", [])


def env_of(container: dict) -> dict:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container.get("env", [])}


def cpu_quantity(q) -> float:
    q = str(q)
    return float(q[:-1]) / 1000 if q.endswith("m") else float(q)


# ---------------------------------------------------------------------------------------------
# Entry points: every `python -m pipelines.<name> …` written anywhere under cluster/
# ---------------------------------------------------------------------------------------------
def commands() -> list[tuple[Path, str, list[str]]]:
    """(file, module, argv) of every `python -m pipelines.X` line, backslash continuations joined."""
    out = []
    for path in TEXT_FILES:
        text = re.sub(r"\\\n[ \t#]*", " ", path.read_text())
        for m in re.finditer(r"python3? -m (pipelines\.\w+)([^\n'|;&]*)", text):
            out.append((path, m.group(1), shlex.split(m.group(2).replace("$(", "").replace(")", ""))))
    return out


def config_of(argv: list[str]) -> tuple[str | None, list[str]]:
    config = argv[argv.index("--config") + 1] if "--config" in argv else None
    overrides = [a for a in argv if re.match(r"^[a-z_]+(\.[a-z_]+)+=", a)]
    return config, overrides


def run_configs() -> list[tuple[Path, str, ProfileConfig, list[str]]]:
    out = []
    for path, module, argv in commands():
        config, overrides = config_of(argv)
        if module in CONFIG_CLASSES and config:
            out.append((path, module, load_config(CONFIG_CLASSES[module], ROOT / config, overrides), argv))
    return out


def gpu_configs() -> list[tuple[str, ProfileConfig]]:
    """The distinct cluster-sized configs the files run (tiny local examples excluded)."""
    seen = {}
    for path, module, cfg, argv in run_configs():
        if cfg.ray.num_gpus_per_actor > 0:
            seen[(config_of(argv)[0], tuple(config_of(argv)[1]))] = cfg
    return [(k[0], v) for k, v in seen.items()]


def test_every_yaml_parses_and_there_is_one_of_each():
    assert YAMLS, "cluster/ has no YAML"
    for p in YAMLS:
        assert docs(p), f"{p} is empty"
    kinds = {d.get("kind") for p in YAMLS for d in docs(p)}
    assert {"RayCluster", "RayJob", "CronJob"} <= kinds
    assert (CLUSTER / "ray-cluster.yaml").is_file() and (CLUSTER / "README.md").is_file()


def test_entry_points_exist_and_their_configs_load():
    cmds = commands()
    modules = {m for _, m, _ in cmds}
    assert {"pipelines.profile", "pipelines.reprofile"} <= modules
    for path, module, argv in cmds:
        assert (ROOT / (module.replace(".", "/") + ".py")).is_file(), f"{path.name}: {module} does not exist"
        config, _ = config_of(argv)
        if module in CONFIG_CLASSES:
            assert config, f"{path.name}: `{module}` without --config"
            assert (ROOT / config).is_file(), f"{path.name}: {config} does not exist"
            assert "--out" in argv, f"{path.name}: `{module}` without --out"
        if module == "pipelines.reprofile":
            assert "--store" in argv, f"{path.name}: reprofile without --store"
    assert len(run_configs()) >= 6
    assert "configs/qwen3-8b.yaml" in {c for c, _ in gpu_configs()}


def test_readme_has_the_job_submit_entry_points():
    readme = (CLUSTER / "README.md").read_text()
    for name in ("profile", "reprofile"):
        assert re.search(rf"ray job submit [^\n]*--working-dir \. [^\n]*\\\n\s+-- python -m pipelines\.{name} "
                         rf"--config configs/qwen3-8b\.yaml", readme), name
    for word in ("working_dir", "uv", "env_vars", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "exit 0", "3 = drift"):
        assert word in readme, word


# ---------------------------------------------------------------------------------------------
# Required keys
# ---------------------------------------------------------------------------------------------
def test_launcher_required_keys():
    c = launcher()
    for key in ("cluster_name", "max_workers", "provider", "available_node_types", "head_node_type",
                "setup_commands", "head_start_ray_commands", "worker_start_ray_commands", "file_mounts"):
        assert key in c, key
    assert c["provider"]["type"] and c["head_node_type"] in c["available_node_types"]
    for name, node in c["available_node_types"].items():
        assert {"node_config", "resources", "max_workers"} <= set(node), name
    assert any(t["resources"].get("GPU", 0) > 0 for t in c["available_node_types"].values())
    assert RAY_VERSION in c["docker"]["image"]


def test_kuberay_required_keys():
    (path, rc), = manifests("RayCluster")
    assert rc["apiVersion"] == "ray.io/v1" and rc["spec"]["rayVersion"] == RAY_VERSION
    head = rc["spec"]["headGroupSpec"]
    assert containers(head["template"]["spec"])[0]["image"]
    groups = rc["spec"]["workerGroupSpecs"]
    assert groups and all({"groupName", "maxReplicas", "template"} <= set(g) for g in groups)
    for _, job in manifests("RayJob"):
        spec = job["spec"]
        assert job["apiVersion"] == "ray.io/v1" and spec["entrypoint"].startswith("python -m pipelines.")
        assert spec.get("clusterSelector", {}).get("ray.io/cluster") == rc["metadata"]["name"] or "rayClusterSpec" in spec
        env = yaml.safe_load(spec["runtimeEnvYAML"])
        assert env["working_dir"] and isinstance(env["env_vars"], dict)
    for _, cron in manifests("CronJob"):
        assert cron["apiVersion"] == "batch/v1"
        assert len(cron["spec"]["schedule"].split()) == 5
        pod = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]
        assert pod["restartPolicy"] == "Never" and cron["spec"]["jobTemplate"]["spec"]["backoffLimit"] == 0
        script = " ".join(containers(pod)[0]["args"])
        assert f"http://{rc['metadata']['name']}-head-svc:8265" in str(env_of(containers(pod)[0]))
        assert "driver_exit_code" in script and "--working-dir" in script
    claims = {d["metadata"]["name"] for _, d in manifests("PersistentVolumeClaim")}
    for spec in [head["template"]["spec"]] + [g["template"]["spec"] for g in groups]:
        for v in spec.get("volumes", []):
            if "persistentVolumeClaim" in v:
                assert v["persistentVolumeClaim"]["claimName"] in claims


def test_runtime_env_file():
    env = docs(CLUSTER / "runtime-env.yaml")[0]
    assert all(isinstance(v, str) for v in env["env_vars"].values())
    # the nodes install the GPU lock, as the image does: every requirement pinned and hash-checked
    from ray._private.runtime_env.validation import parse_and_validate_uv

    lock = ROOT / env["uv"]
    assert env["uv"] == "requirements-gpu.lock" and lock.is_file()
    assert f"-r {env['uv']}" in (CLUSTER / "Dockerfile").read_text().replace("--require-hashes ", "")
    import os

    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        lines = parse_and_validate_uv(env["uv"])["packages"]
    finally:
        os.chdir(cwd)
    text = "\n".join(lines)
    pins = re.findall(r"^([A-Za-z0-9_.-]+)==(\S+) \\$", text, flags=re.M)
    assert ("torch", "2.13.0") in pins and not any(n == "ray" for n, _ in pins)
    blocks = re.split(r"\n(?=[A-Za-z0-9_.-]+==)", text.split("\n", 2)[-1].lstrip())
    assert all("--hash=sha256:" in b for b in blocks if "==" in b.split("\n")[0])
    assert "working_dir" not in env, "--working-dir . gives it on the command line"


# ---------------------------------------------------------------------------------------------
# Resources against the configs they run
# ---------------------------------------------------------------------------------------------
def _check_fit(where: str, cfg: ProfileConfig, gpus_per_node: float, cpus_per_node: float, max_nodes: int):
    r = cfg.ray
    assert gpus_per_node >= r.num_gpus_per_actor, f"{where}: {gpus_per_node} GPUs per node < ray.num_gpus_per_actor"
    actors_per_node = min(r.num_actors, int(gpus_per_node // r.num_gpus_per_actor))
    assert actors_per_node * max_nodes >= r.num_actors, \
        f"{where}: at most {actors_per_node * max_nodes} GPU actors fit, ray.num_actors is {r.num_actors}"
    assert cpus_per_node >= actors_per_node * r.num_cpus_per_actor, \
        f"{where}: {cpus_per_node} CPUs per node < {actors_per_node} actors × ray.num_cpus_per_actor"
    assert cfg.model.device.startswith("cuda"), f"{where}: GPU actors but model.device is {cfg.model.device}"


def test_clusters_fit_the_configs():
    cfgs = gpu_configs()
    assert cfgs
    nodes = launcher()["available_node_types"]
    gpu_nodes = {n: t for n, t in nodes.items() if t["resources"].get("GPU", 0) > 0}
    (_, rc), = manifests("RayCluster")
    for name, cfg in cfgs:
        for n, t in gpu_nodes.items():
            _check_fit(f"ray-cluster.yaml:{n} × {name}", cfg, t["resources"]["GPU"], t["resources"]["CPU"],
                       min(t["max_workers"], launcher()["max_workers"]))
        for g in rc["spec"]["workerGroupSpecs"]:
            c = containers(g["template"]["spec"])[0]
            limits = c["resources"]["limits"]
            gpus = int(limits.get("nvidia.com/gpu", 0))
            assert int(g["rayStartParams"].get("num-gpus", gpus)) == gpus, "num-gpus disagrees with the GPU limit"
            _check_fit(f"raycluster.yaml:{g['groupName']} × {name}", cfg, gpus, cpu_quantity(limits["cpu"]),
                       g["maxReplicas"])
            assert c["resources"]["requests"] == limits, "requests = limits (Guaranteed QoS for GPU pods)"


def test_config_paths_are_mounted():
    (_, rc), = manifests("RayCluster")
    pods = [rc["spec"]["headGroupSpec"]["template"]["spec"]] + [g["template"]["spec"] for g in rc["spec"]["workerGroupSpecs"]]
    mounts = [{m["mountPath"] for m in containers(p)[0].get("volumeMounts", [])} for p in pods]
    docker_mounts = [o.split()[1].split(":")[1] for o in launcher()["docker"]["run_options"] if o.startswith("-v ")]
    for path, module, cfg, argv in run_configs():
        if cfg.ray.num_gpus_per_actor == 0:
            continue
        paths = [p for p in (cfg.model.path, cfg.data.path, argv[argv.index("--out") + 1]) if p and p.startswith("/")]
        for p in paths:
            for pod_mounts in mounts:
                assert any(p.startswith(m.rstrip("/") + "/") for m in pod_mounts), f"{p} is not mounted in every pod"
            assert any(p.startswith(m.rstrip("/") + "/") for m in docker_mounts), f"{p} is not mounted in the launcher"


# ---------------------------------------------------------------------------------------------
# Security: token auth on, local dashboards on 127.0.0.1
# ---------------------------------------------------------------------------------------------
def _all_pods():
    (_, rc), = manifests("RayCluster")
    yield "ray-head", rc["spec"]["headGroupSpec"]["template"]["spec"]
    for g in rc["spec"]["workerGroupSpecs"]:
        yield g["groupName"], g["template"]["spec"]
    for _, job in manifests("RayJob"):
        yield "submitter", job["spec"]["submitterPodTemplate"]["spec"]
    for _, cron in manifests("CronJob"):
        yield "cronjob", cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]


def test_token_auth_everywhere():
    (_, rc), = manifests("RayCluster")
    # Ray pods: KubeRay's authOptions, so the operator injects the token and uses it itself (RayJob
    # status polling); the containers carry no second, hand-written copy.
    assert rc["spec"]["authOptions"] == {"mode": "token", "secretName": TOKEN_SECRET}
    ray_pods = {"ray-head"} | {g["groupName"] for g in rc["spec"]["workerGroupSpecs"]}
    for name, pod in _all_pods():
        for c in containers(pod):
            env = env_of(c)
            if name in ray_pods:
                assert not {"RAY_AUTH_MODE", "RAY_AUTH_TOKEN"} & set(env), f"{name}: the token comes from authOptions"
                continue
            assert env.get("RAY_AUTH_MODE") == "token", f"{name}: RAY_AUTH_MODE is not token"
            ref = env.get("RAY_AUTH_TOKEN")
            assert isinstance(ref, dict) and ref["secretKeyRef"]["name"] == TOKEN_SECRET, \
                f"{name}: RAY_AUTH_TOKEN must come from the Secret {TOKEN_SECRET}"
    for cmd in launcher()["head_start_ray_commands"] + launcher()["worker_start_ray_commands"]:
        if "ray start" in cmd:
            assert "RAY_AUTH_MODE=token" in cmd, cmd
    assert "~/.ray/auth_token" in launcher()["file_mounts"]


def test_local_dashboards_listen_on_localhost():
    for path in TEXT_FILES:
        text = re.sub(r"\\\n[ \t#]*", " ", path.read_text())
        for line in text.splitlines():
            if re.search(r"ray start [^\n]*--head", line):
                assert "--dashboard-host=127.0.0.1" in line, f"{path.name}: {line.strip()}"
            for host in re.findall(r"--address[ =]\"?https?://([^:/\"$ ]+)", line):
                in_cluster = path.parent.name == "kuberay" and host.endswith("-head-svc")
                assert host == "127.0.0.1" or in_cluster, f"{path.name}: job address {host}: {line.strip()}"
    (_, rc), = manifests("RayCluster")
    assert rc["spec"]["headGroupSpec"].get("serviceType", "ClusterIP") == "ClusterIP", "never expose the dashboard"
    assert manifests("NetworkPolicy"), "the in-cluster dashboard needs a NetworkPolicy"


def _policies_for(path: Path, cluster: str) -> list[dict]:
    """NetworkPolicies in ``path`` that select the pods of RayCluster ``cluster``."""
    return [d for d in docs(path) if d.get("kind") == "NetworkPolicy"
            and d["spec"]["podSelector"].get("matchLabels", {}).get("ray.io/cluster") == cluster]


def test_network_policy_admits_the_operator_to_the_dashboard():
    (path, rc), = manifests("RayCluster")
    (policy,), name = _policies_for(path, rc["metadata"]["name"]), rc["metadata"]["name"]
    operator = [r for r in policy["spec"]["ingress"] for peer in r["from"]
                if peer.get("podSelector", {}).get("matchLabels") == {"app.kubernetes.io/name": "kuberay-operator"}
                and "namespaceSelector" in peer]        # the operator runs in its own namespace
    assert operator, f"{path.name}: no ingress rule admits the KubeRay operator"
    assert all([p["port"] for p in r["ports"]] == [8265] for r in operator), "the operator needs the dashboard only"
    assert name in str(policy["spec"]["podSelector"])


def test_dashboard_on_all_interfaces_only_behind_the_policy_in_the_same_file():
    for path, rc in manifests("RayCluster"):
        host = rc["spec"]["headGroupSpec"].get("rayStartParams", {}).get("dashboard-host", "127.0.0.1")
        if host in ("127.0.0.1", "localhost"):
            continue
        policies = _policies_for(path, rc["metadata"]["name"])
        assert policies, f"{path.name}: dashboard-host {host} without a NetworkPolicy in the same file"
        for policy in policies:
            assert "Ingress" in policy["spec"]["policyTypes"]
            for rule in policy["spec"]["ingress"]:
                assert rule.get("from"), f"{path.name}: an ingress rule without 'from' admits every pod"
                own = all(p.get("podSelector", {}).get("matchLabels", {}).get("ray.io/cluster") == rc["metadata"]["name"]
                          for p in rule["from"])
                assert own or [p["port"] for p in rule.get("ports", [])] == [8265], \
                    f"{path.name}: a rule admits pods outside the cluster to more than the dashboard"


# ---------------------------------------------------------------------------------------------
# No literal secrets in cluster/ or configs/
# ---------------------------------------------------------------------------------------------
SECRET_WORDS = {"token", "secret", "password", "passwd", "pwd", "apikey", "credential", "credentials"}
SECRET_PAIRS = {("api", "key"), ("access", "key"), ("private", "key"), ("secret", "key"), ("auth", "key")}
REFERENCE_WORDS = {"name", "path", "file", "ref", "mode", "env", "id"}   # a key naming *where* a secret is


def _words(key: str) -> list[str]:
    """``secretKeyRef`` → [secret, key, ref]; ``RAY_AUTH_TOKEN`` → [ray, auth, token]."""
    return [w.lower() for w in re.findall(r"[A-Z]?[a-z0-9]+|[A-Z]+(?![a-z])", key)]


def secret_named(key: str) -> bool:
    """Is ``key`` the name of a secret value (not of a reference to one)?"""
    words = _words(key)
    if not words or words[-1] in REFERENCE_WORDS:
        return False
    return words == ["key"] or bool(SECRET_WORDS & set(words)) or any(p in SECRET_PAIRS for p in zip(words, words[1:]))


PLACEHOLDER = re.compile(r"^(\$\{?\w+\}?|\$\(.*\)|<[^>]*>|\*+|x+|changeme|replace[-_ ]?me|your[-_].*|none|null|)$",
                         re.IGNORECASE)
TEXT_PATTERNS = {
    "AWS access key id": r"\b(AKIA|ASIA|AGPA|AIDA|AROA|AIPA|ANPA|ANVA)[A-Z0-9]{16}\b",
    "AWS secret key": r"aws_secret_access_key\s*[:=]\s*['\"]?[A-Za-z0-9/+=]{40}",
    "private key block": r"-----BEGIN [A-Z ]*PRIVATE KEY-----",
    "GitHub token": r"\bgh[pousr]_[A-Za-z0-9]{30,}",
    "Hugging Face token": r"\bhf_[A-Za-z0-9]{30,}",
    "Slack token": r"\bxox[abprs]-[A-Za-z0-9-]{10,}",
    "Google API key": r"\bAIza[0-9A-Za-z_\-]{35}\b",
    # a key ending in a secret word, assigned a long literal (not $VAR, <placeholder>, a path)
    "assigned secret": r"(?i)\b[\w.-]*(token|secret|password|passwd|api[_-]?key)['\"]?\s*[:=]\s*['\"]?"
                       r"(?![$<{/~.])[A-Za-z0-9_\-/+=]{16,}",
}


def secret_findings_in_yaml(node, path: str = "") -> list[str]:
    """Keys named like a secret with a literal, non-placeholder string value; also k8s env entries
    {name: SOME_TOKEN, value: literal}. References (secretKeyRef, *_PATH, names of Secrets) pass."""
    found = []
    if isinstance(node, dict):
        if isinstance(node.get("name"), str) and "value" in node and secret_named(node["name"]) \
                and isinstance(node["value"], str) and not PLACEHOLDER.match(node["value"].strip()):
            found.append(f"{path}.{node['name']}")
        for k, v in node.items():
            key = str(k)
            if key.endswith("Ref"):
                continue
            if isinstance(v, (str, int)) and not isinstance(v, bool) and secret_named(key):
                value = str(v).strip()
                # a bare `key` is everywhere in Kubernetes (tolerations, selectors): only a credential-like value counts
                bare_ok = _words(key) == ["key"] and not (re.fullmatch(r"[A-Za-z0-9+/=_\-]{16,}", value)
                                                          and re.search(r"\d", value))
                if not PLACEHOLDER.match(value) and not value.startswith(("~", "/", "./")) and not bare_ok:
                    found.append(f"{path}.{key}")
            found += secret_findings_in_yaml(v, f"{path}.{key}")
    elif isinstance(node, list):
        for i, v in enumerate(node):
            found += secret_findings_in_yaml(v, f"{path}[{i}]")
    return found


def secret_findings_in_text(text: str) -> list[str]:
    return [name for name, pat in TEXT_PATTERNS.items() if re.search(pat, text)]


def scanned_files() -> list[Path]:
    files = [p for p in (ROOT / "configs").rglob("*") if p.is_file() and p.suffix in (".yaml", ".yml", ".json", ".toml")]
    return files + TEXT_FILES


@pytest.mark.parametrize("path", scanned_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_no_literal_secrets(path):
    text = path.read_text()
    assert secret_findings_in_text(text) == [], path
    if path.suffix in (".yaml", ".yml"):
        for d in yaml.safe_load_all(text):
            assert secret_findings_in_yaml(d) == [], path


@pytest.mark.parametrize("bad", [
    {"aws_secret_access_key": "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"},
    {"model": {"hf_token": "abcdefabcdefabcdefabcdef"}},
    {"env": [{"name": "RAY_AUTH_TOKEN", "value": "3f9a0c1d2e3b4a5f6e7d8c9b0a1f2e3d"}]},
    {"password": "hunter2-but-longer"},
    {"secretKeyRef": {"key": "auth_token"}, "store": {"api_key": "k-12345"}},
    {"credentials": {"key": "9f8e7d6c5b4a39281706f5e4d3c2b1a0"}},
])
def test_secret_scanner_catches_literals(bad):
    assert secret_findings_in_yaml(bad) or secret_findings_in_text(yaml.safe_dump(bad))


@pytest.mark.parametrize("text", [
    "AWS_ACCESS_KEY_ID: AKIAIOSFODNN7EXAMPLE",
    "export RAY_AUTH_TOKEN=3f9a0c1d2e3b4a5f6e7d8c9b0a1f2e3d",
    "-----BEGIN OPENSSH PRIVATE KEY-----",
    "token: hf_abcdefghijklmnopqrstuvwxyzABCDEF12",
])
def test_secret_scanner_catches_text(text):
    assert secret_findings_in_text(text)


@pytest.mark.parametrize("ok", [
    {"env": [{"name": "RAY_AUTH_TOKEN", "valueFrom": {"secretKeyRef": {"name": "layercard-ray-token", "key": "auth_token"}}}]},
    {"env": [{"name": "RAY_AUTH_MODE", "value": "token"}]},
    {"file_mounts": {"~/.ray/auth_token": "~/.ray/auth_token"}},
    {"token_path": "/var/run/secrets/ray/token", "secretName": "layercard-ray-token", "password": "${DB_PASSWORD}"},
    {"tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists"}], "env_vars": {"TOKENIZERS_PARALLELISM": "false"}},
])
def test_secret_scanner_passes_references(ok):
    assert secret_findings_in_yaml(ok) == [] and secret_findings_in_text(yaml.safe_dump(ok)) == []


# ---------------------------------------------------------------------------------------------
# Ray Train / Tune storage on a multi-node cluster
# ---------------------------------------------------------------------------------------------
MOUNTS = """overlay / overlay rw 0 0
/dev/nvme0n1p1 /home ext4 rw 0 0
fs.example:/export /mnt/shared nfs4 rw 0 0
gcsfuse /mnt/bucket fuse.gcsfuse rw 0 0
"""


@pytest.mark.parametrize("path,nodes,ok", [
    ("/home/me/runs", 1, True),                 # one node: any path
    ("/home/me/runs", 3, False),                # node-local disk on 3 nodes
    ("/mnt/shared/runs", 3, True),              # NFS mounted at the same path everywhere
    ("/mnt/bucket/runs", 2, True),              # a FUSE-mounted bucket
    ("/mnt/shared-not/runs", 2, False),         # a sibling of the mount point is not on it
    ("s3://bucket/runs", 8, True),              # a URI
])
def test_storage_must_be_reachable_from_every_node(path, nodes, ok):
    from layercard.errors import LayercardError
    from layercard.runtime import check_storage_reachable

    if ok:
        check_storage_reachable(path, nodes, "storage_path", mounts=MOUNTS)
        return
    with pytest.raises(LayercardError) as exc:
        check_storage_reachable(path, nodes, "storage_path", mounts=MOUNTS)
    msg = str(exc.value)
    assert f"'{path}'" in msg and f"{nodes} nodes" in msg and "storage_path" in msg and "URI" in msg and "\n" not in msg


def test_train_storage_error_offers_no_uri():
    from layercard.errors import LayercardError
    from layercard.runtime import check_storage_reachable

    with pytest.raises(LayercardError) as exc:   # pipelines.train takes local paths only
        check_storage_reachable("/home/me/runs", 2, "storage_path", uri_ok=False, mounts=MOUNTS)
    assert "shared path" in str(exc.value) and "URI" not in str(exc.value)


def test_storage_on_this_machines_filesystems():
    from layercard.runtime import check_storage_reachable, mount_fstype

    assert mount_fstype("/") != ""                         # /proc/mounts read and matched
    check_storage_reachable("/tmp/x", 1, "storage_path")   # a single-node cluster never refuses
