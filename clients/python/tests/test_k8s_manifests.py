"""deploy/k8s/: every manifest validates against the Kubernetes schemas (kubernetes-validate,
offline, --strict), and the DaemonSet keeps what the service needs and what keeps it safe.

No cluster is involved: nothing here is applied anywhere.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml  # type: ignore[import-untyped]

K8S = Path(__file__).resolve().parents[3] / "deploy" / "k8s"
# Versions to validate against: an older one still served and the newest of kubernetes-validate.
VERSIONS = ["1.33.0", "1.37.0"]


def manifests() -> list[Path]:
    found = sorted(K8S.glob("*.yaml")) + sorted(K8S.glob("*.yml"))
    assert found, f"no manifests in {K8S}"
    return found


def docs() -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for p in manifests():
        out += [d for d in yaml.safe_load_all(p.read_text()) if d]
    return out


def one(kind: str) -> dict[str, Any]:
    found = [d for d in docs() if d.get("kind") == kind]
    assert len(found) == 1, f"{len(found)} {kind}s in {K8S}"
    return found[0]


@pytest.mark.parametrize("path", manifests(), ids=lambda p: p.name)
def test_manifest_validates(path: Path) -> None:
    args = [sys.executable, "-m", "kubernetes_validate", "--strict"]
    for v in VERSIONS:
        args += ["-k", v]
    r = subprocess.run([*args, str(path)], capture_output=True, text=True, timeout=120)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out
    assert "ERROR" not in out and "WARN" not in out, out
    assert out.count("passed") == len(VERSIONS) * len([d for d in yaml.safe_load_all(path.read_text()) if d])


def test_daemonset_is_privileged_with_the_host_mounts() -> None:
    ds = one("DaemonSet")
    pod = ds["spec"]["template"]["spec"]
    assert pod["hostPID"] is True
    (c,) = pod["containers"]
    assert c["securityContext"]["privileged"] is True
    assert "fsGroup" not in pod.get("securityContext", {})
    mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
    host = {v["name"]: v["hostPath"]["path"] for v in pod["volumes"] if "hostPath" in v}
    for path in ["/var/lib/sandtree", "/sys/fs/bpf", "/sys/kernel/tracing", "/sys/fs/cgroup"]:
        names = [n for n, p in host.items() if p == path]
        assert names, f"no hostPath volume for {path}"
        assert mounts.get(names[0]) == path, f"{path} is not mounted at {path}"
    args = c["args"]
    assert "--data-dir=/var/lib/sandtree" in args
    http = [a for a in args if a.startswith("--http")]
    assert all("127.0.0.1:" in a for a in http), f"/metrics has no auth: {http}"


def test_the_token_comes_from_a_secret_file() -> None:
    ds = one("DaemonSet")
    pod = ds["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    args = c["args"]
    (listen,) = [a for a in args if a.startswith("--listen=")]
    assert listen.startswith("--listen=tcp://")
    (tf,) = [a.removeprefix("--token-file=") for a in args if a.startswith("--token-file=")]
    # Never in the environment or on the command line: only the file's path.
    assert not any("SANDTREE_TOKEN" in e.get("name", "") for e in c.get("env", []))
    (vol,) = [
        v
        for v in pod["volumes"]
        if "secret" in v
        and any(tf.startswith(m["mountPath"] + "/") for m in c["volumeMounts"] if m["name"] == v["name"])
    ]
    sec = vol["secret"]
    assert sec["secretName"] == one("Secret")["metadata"]["name"]
    assert sec["defaultMode"] == 0o400
    assert all(i.get("mode", 0o400) == 0o400 for i in sec.get("items", []))
    assert sec.get("optional") is False


def test_no_token_literal_in_the_manifests() -> None:
    secret = one("Secret")
    # A placeholder with no value: the real token is created with kubectl, never committed.
    assert not secret.get("data") and not secret.get("stringData"), secret
    hexish = re.compile(r"\b[0-9a-fA-F]{24,}\b|\b[A-Za-z0-9+/]{40,}={0,2}")
    for p in manifests():
        text = p.read_text()
        assert not hexish.search(text), f"{p.name}: something that looks like a token"
        for d in yaml.safe_load_all(text):
            if d:
                assert "Bearer" not in yaml.safe_dump(d), p.name
