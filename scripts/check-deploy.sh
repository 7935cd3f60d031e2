#!/usr/bin/env bash
# Static checks of the deployment files, for CI machines that have no Docker
# engine and no Kubernetes cluster:
#   - every YAML file under deploy/k8s and docker-compose.yml parses;
#   - Kubernetes: each document names apiVersion, kind and metadata.name;
#     workloads' selectors match their pod labels, containers have images,
#     probes name ports that exist, Services select some pods, referenced
#     Secrets and keys exist, kustomization.yaml lists files that exist (and
#     every manifest is listed);
#   - Compose: each service has an image or a build whose Dockerfile exists,
#     depends_on names real services, named volumes are declared;
#   - Dockerfiles: have a FROM, and the binaries they build are binaries of
#     the crates under services/; commands that run our image name one of them;
#   - `docker compose config` / `docker-compose config` where available
#     (Debian's docker-compose is installed for this when running as root),
#     and `kubectl kustomize` where kubectl is installed.
# Exits non-zero with a message per problem.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

if ! python3 -c 'import yaml' 2>/dev/null; then
    echo "check-deploy: PyYAML missing; installing it with pip"
    python3 -m pip install -q pyyaml
fi

python3 - <<'PY'
import pathlib, re, shlex, sys, tomllib

import yaml

ROOT = pathlib.Path(".")
K8S = ROOT / "deploy" / "k8s"
COMPOSE = ROOT / "docker-compose.yml"
IMAGE_NAME = "rt-realtime"  # what deploy/Dockerfile's image is tagged as
errors = []


def err(msg):
    errors.append(msg)


def load_all(path):
    try:
        return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    except (OSError, yaml.YAMLError) as e:
        err(f"{path}: does not parse as YAML: {e}")
        return []


# --- binaries the workspace's service crates build ---------------------------
def crate_binaries():
    bins = set()
    for manifest in sorted(ROOT.glob("services/*/Cargo.toml")):
        data = tomllib.loads(manifest.read_text())
        pkg = data.get("package", {})
        crate = manifest.parent
        explicit = {(crate / b["path"]).resolve() for b in data.get("bin", []) if "path" in b}
        for b in data.get("bin", []):
            bins.add(b["name"])
        # Cargo's automatic targets: src/main.rs is a binary named like the
        # package, src/bin/x.rs one named x, unless a [[bin]] already uses
        # that file.
        if pkg.get("autobins", True):
            main = crate / "src" / "main.rs"
            if main.exists() and main.resolve() not in explicit and "name" in pkg:
                bins.add(pkg["name"])
            bins.update(p.stem for p in (crate / "src" / "bin").glob("*.rs")
                        if p.resolve() not in explicit)
    return bins


CRATE_BINS = crate_binaries()


# --- Dockerfiles ---------------------------------------------------------------
def check_dockerfile(path):
    """Returns the binaries it builds (empty if it cannot tell)."""
    try:
        text = path.read_text()
    except OSError as e:
        err(f"{path}: cannot read: {e}")
        return set()
    # Join continuation lines, drop comments: one instruction per line.
    lines = [l for l in text.splitlines() if not l.lstrip().startswith("#")]
    instructions = [i.strip() for i in "\n".join(lines).replace("\\\n", " ").splitlines() if i.strip()]
    if not any(re.match(r"(?i)FROM\s+\S", i) for i in instructions):
        err(f"{path}: no FROM instruction")
    first = instructions[0].split()[0].upper() if instructions else ""
    if first not in ("FROM", "ARG"):
        err(f"{path}: must start with FROM (or ARG), starts with {first or 'nothing'}")
    # The binaries: `ARG BINS="a b"` (the list to build) and any literal `--bin x`.
    built = set()
    for i in instructions:
        m = re.match(r'(?i)ARG\s+BINS=(?:"([^"]*)"|(\S+))', i)
        if m:
            built.update((m.group(1) or m.group(2)).split())
        built.update(re.findall(r"--bin[ =]([A-Za-z0-9_-]+)", i))
    if not built:
        err(f"{path}: cannot tell which binaries it builds (no ARG BINS=... or --bin NAME)")
    for b in sorted(built - CRATE_BINS):
        err(f"{path}: builds binary {b!r}, which no crate under services/ defines "
            f"(binaries there: {', '.join(sorted(CRATE_BINS)) or 'none'})")
    for i in instructions:
        m = re.match(r"(?i)CMD\s+(.*)", i)
        if m and built:
            cmd = command_words(m.group(1))
            if cmd and cmd[0] not in built:
                err(f"{path}: CMD runs {cmd[0]!r}, which this Dockerfile does not build")
    return built


def command_words(cmd):
    """A command as a list of words, from YAML list, JSON array or shell string."""
    if isinstance(cmd, list):
        return [str(c) for c in cmd]
    cmd = str(cmd).strip()
    if cmd.startswith("["):
        try:
            return [str(c) for c in yaml.safe_load(cmd)]
        except yaml.YAMLError:
            return []
    try:
        return shlex.split(cmd)
    except ValueError:
        return []


DOCKERFILE = ROOT / "deploy" / "Dockerfile"
IMAGE_BINS = check_dockerfile(DOCKERFILE)


def is_our_image(image):
    # registry.example.com/rt-realtime:1.2 -> rt-realtime
    name = str(image).split("@")[0].rsplit("/", 1)[-1].split(":")[0]
    return name == IMAGE_NAME


# --- Kubernetes ----------------------------------------------------------------
WORKLOADS = {"Deployment", "StatefulSet", "DaemonSet", "ReplicaSet"}
k8s_files = sorted(p for p in K8S.rglob("*") if p.suffix in (".yaml", ".yml"))
if not k8s_files:
    err(f"{K8S}: no YAML files")
docs = []  # (file, document)
kustomizations = []
for f in k8s_files:
    for d in load_all(f):
        if not isinstance(d, dict):
            err(f"{f}: a document is not a mapping")
        elif d.get("kind") == "Kustomization":
            kustomizations.append((f, d))
        else:
            docs.append((f, d))

for f, d in docs:
    meta = d.get("metadata") if isinstance(d.get("metadata"), dict) else {}
    where = f"{f}: {d.get('kind', '?')}/{meta.get('name', '?')}"
    for key, val in (("apiVersion", d.get("apiVersion")), ("kind", d.get("kind")),
                     ("metadata.name", meta.get("name"))):
        if not isinstance(val, str) or not val:
            err(f"{where}: missing {key}")

secrets = {
    d["metadata"]["name"]: set((d.get("stringData") or {}) | (d.get("data") or {}))
    for _, d in docs if d.get("kind") == "Secret" and isinstance(d.get("metadata"), dict)
}
services = {d["metadata"].get("name"): (f, d) for f, d in docs
            if d.get("kind") == "Service" and isinstance(d.get("metadata"), dict)}
pod_labels = []  # every workload's pod template labels

for f, d in docs:
    if d.get("kind") not in WORKLOADS:
        continue
    where = f"{f}: {d['kind']}/{d.get('metadata', {}).get('name', '?')}"
    spec = d.get("spec") or {}
    template = spec.get("template") or {}
    labels = (template.get("metadata") or {}).get("labels") or {}
    pod_labels.append(labels)
    selector = (spec.get("selector") or {}).get("matchLabels") or {}
    if not selector:
        err(f"{where}: spec.selector.matchLabels is empty")
    for k, v in selector.items():
        if labels.get(k) != v:
            err(f"{where}: selector {k}={v} does not match the pod template's labels {labels}")
    if d["kind"] == "StatefulSet":
        svc = spec.get("serviceName")
        if svc and svc not in services:
            err(f"{where}: serviceName {svc!r} is not a Service in {K8S}")
    pod = template.get("spec") or {}
    containers = (pod.get("containers") or []) + (pod.get("initContainers") or [])
    if not pod.get("containers"):
        err(f"{where}: no containers")
    for c in containers:
        cw = f"{where} container {c.get('name', '?')}"
        if not c.get("name"):
            err(f"{cw}: no name")
        if not c.get("image"):
            err(f"{cw}: no image")
        elif is_our_image(c["image"]) and IMAGE_BINS:
            cmd = command_words(c.get("command") or c.get("args") or [])
            if cmd and cmd[0] not in IMAGE_BINS:
                err(f"{cw}: runs {cmd[0]!r}, which {DOCKERFILE} does not build")
        ports = {p.get("name") for p in c.get("ports") or [] if p.get("name")}
        for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
            for kind in ("httpGet", "tcpSocket", "grpc"):
                port = ((c.get(probe) or {}).get(kind) or {}).get("port")
                if isinstance(port, str) and port not in ports:
                    err(f"{cw}: {probe} uses port {port!r}, not a named port of the container")
        refs = [(e["valueFrom"]["secretKeyRef"].get("name"), e["valueFrom"]["secretKeyRef"].get("key"))
                for e in c.get("env") or [] if (e.get("valueFrom") or {}).get("secretKeyRef")]
        refs += [((e.get("secretRef") or {}).get("name"), None) for e in c.get("envFrom") or []
                 if e.get("secretRef")]
        for name, key in refs:
            if name not in secrets:
                err(f"{cw}: uses Secret {name!r}, which no manifest in {K8S} defines")
            elif key is not None and key not in secrets[name]:
                err(f"{cw}: uses key {key!r} of Secret {name!r}, which has {sorted(secrets[name])}")

for name, (f, d) in services.items():
    selector = (d.get("spec") or {}).get("selector") or {}
    if selector and not any(all(l.get(k) == v for k, v in selector.items()) for l in pod_labels):
        err(f"{f}: Service/{name}: selector {selector} matches no pod template in {K8S}")

for f, k in kustomizations:
    listed = set()
    for res in k.get("resources") or []:
        target = (f.parent / res)
        listed.add(target.resolve())
        if not target.exists():
            err(f"{f}: lists {res}, which does not exist")
    # A manifest left out of the list would silently never be applied.
    if f.parent == K8S:
        for m in k8s_files:
            if m.parent == K8S and m != f and m.resolve() not in listed:
                err(f"{f}: does not list {m.name}")
if not any(f.parent == K8S for f, _ in kustomizations):
    err(f"{K8S}: no kustomization.yaml")

# --- Compose -------------------------------------------------------------------
compose_docs = load_all(COMPOSE) if COMPOSE.exists() else []
if not COMPOSE.exists():
    err(f"{COMPOSE}: missing")
elif len(compose_docs) != 1 or not isinstance(compose_docs[0], dict):
    err(f"{COMPOSE}: must hold one YAML mapping")
else:
    compose = compose_docs[0]
    svcs = compose.get("services")
    if not isinstance(svcs, dict) or not svcs:
        err(f"{COMPOSE}: no services")
        svcs = {}
    volumes = set((compose.get("volumes") or {}).keys())
    for name, s in svcs.items():
        where = f"{COMPOSE}: service {name}"
        if not isinstance(s, dict):
            err(f"{where}: not a mapping")
            continue
        if not s.get("image") and not s.get("build"):
            err(f"{where}: has neither image nor build")
        deps = s.get("depends_on") or []
        for dep in (deps.keys() if isinstance(deps, dict) else deps):
            if dep not in svcs:
                err(f"{where}: depends_on {dep!r}, which is not a service")
        build = s.get("build")
        built = set()
        if build:
            context = build if isinstance(build, str) else build.get("context", ".")
            dockerfile = "Dockerfile" if isinstance(build, str) else build.get("dockerfile", "Dockerfile")
            path = COMPOSE.parent / context / dockerfile
            if not path.is_file():
                err(f"{where}: build's Dockerfile {path} does not exist")
            elif path.resolve() == DOCKERFILE.resolve():
                built = IMAGE_BINS
            else:
                built = check_dockerfile(path)
        if built and "command" in s:
            cmd = command_words(s["command"])
            if cmd and cmd[0] not in built:
                err(f"{where}: command runs {cmd[0]!r}, which its image does not build")
        for v in s.get("volumes") or []:
            # Named volumes only: "name:/path" or {type: volume, source: name};
            # paths (./x, /x, ~/x) are bind mounts, a lone path is anonymous.
            if isinstance(v, dict):
                source = v.get("source") if v.get("type") == "volume" else None
            else:
                parts = str(v).split(":")
                source = parts[0] if len(parts) > 1 and not parts[0].startswith((".", "/", "~", "$")) else None
            if source and source not in volumes:
                err(f"{where}: volume {source!r} is not declared under top-level volumes")

if errors:
    print("check-deploy: FAILED", file=sys.stderr)
    for e in dict.fromkeys(errors):  # once each, in order
        print(f"  - {e}", file=sys.stderr)
    sys.exit(1)
print(f"check-deploy: YAML and Dockerfile checks passed "
      f"({len(k8s_files)} Kubernetes files, {len(docs)} objects; compose; "
      f"image binaries: {' '.join(sorted(IMAGE_BINS))})")
PY

# Compose's own validation (interpolation, schema), which needs no engine.
# Prefer the v2 plugin; else Debian's docker-compose v1, installed here only
# when running as root with apt-get (as CI does). Skipped, not failed, when
# neither can be had: the checks above still ran.
compose=()
if docker compose version >/dev/null 2>&1; then
    compose=(docker compose)
elif command -v docker-compose >/dev/null 2>&1; then
    compose=(docker-compose)
elif [[ $(id -u) == 0 ]] && command -v apt-get >/dev/null 2>&1; then
    echo "check-deploy: installing Debian's docker-compose to validate docker-compose.yml"
    export DEBIAN_FRONTEND=noninteractive
    apt_log=$(mktemp)
    if apt-get install -y -q docker-compose >"$apt_log" 2>&1 ||
        { apt-get update -q >>"$apt_log" 2>&1 &&
          apt-get install -y -q docker-compose >>"$apt_log" 2>&1; }; then
        compose=(docker-compose)
    else
        echo "check-deploy: SKIPPED compose config: apt-get install docker-compose failed:"
        tail -n 5 "$apt_log" | sed 's/^/    /'
    fi
    rm -f "$apt_log"
else
    echo "check-deploy: SKIPPED compose config: no 'docker compose' or docker-compose," \
        "and not root with apt-get to install it"
fi
if ((${#compose[@]})); then
    if ! "${compose[@]}" -f docker-compose.yml config -q; then
        echo "check-deploy: FAILED: '${compose[*]} -f docker-compose.yml config' rejects docker-compose.yml" >&2
        exit 1
    fi
    echo "check-deploy: '${compose[*]} config' accepts docker-compose.yml"
fi

# kustomize renders the manifests offline; only where kubectl is installed.
if command -v kubectl >/dev/null 2>&1; then
    if ! kubectl kustomize deploy/k8s >/dev/null; then
        echo "check-deploy: FAILED: 'kubectl kustomize deploy/k8s' cannot render the manifests" >&2
        exit 1
    fi
    echo "check-deploy: 'kubectl kustomize deploy/k8s' renders"
else
    echo "check-deploy: SKIPPED kubectl kustomize: kubectl not installed"
fi

echo "check-deploy: OK"
