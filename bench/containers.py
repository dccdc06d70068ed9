"""The compose stack's figures: image sizes, time from `compose up` to the first signature
through the containerised broker, and resident memory per container once it is idle.

On the engine the compose tests use (tests/deploy/engine.py: a Docker engine that
answers, else podman through its Docker API). The images are built first and not timed
here (docs/containers.md gives the cold build); `up` is timed from a stack that does not
exist yet (fresh volumes: setup makes the secrets and the SoftHSM token, init runs the
ceremony), so the figure includes the whole first start a user sees.

    python -m bench.containers [--out bench/results]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from importlib import import_module
from pathlib import Path
from typing import Any

from mgmt.natsserver import free_port
from tests.deploy.engine import ROOT, Engine, EngineUnavailable, build_images, engine

IMAGE_UID = 10001
# Sums VmRSS over every process of the container's own pid namespace but this shell.
RSS_SCRIPT = (
    "total=0; for s in /proc/[0-9]*/status; do p=${s#/proc/}; p=${p%/status}; "
    '[ "$p" = "$$" ] && continue; '
    'v=$(sed -n "s/^VmRSS:[[:space:]]*\\([0-9]*\\) kB/\\1/p" "$s" 2>/dev/null); '
    "total=$((total + ${v:-0})); done; echo $total"
)


def _sdk_client(env: dict[str, str]) -> Any:
    # importlib: mypy would take the repository's docker/ folder for the SDK.
    sdk = import_module("docker")
    return sdk.DockerClient(base_url=env.get("DOCKER_HOST"), timeout=60)


def image_sizes(found: Engine) -> dict[str, int]:
    """Bytes of each image the stack runs (the engine's own `Size`: all layers)."""
    client = _sdk_client(found.env)
    try:
        names = {
            "edgekms:dev": "edgekms:dev",
            "edgekms-swtpm:dev": "edgekms-swtpm:dev",
            "base": "docker.io/library/debian:bookworm-slim",
        }
        return {label: int(client.images.get(ref).attrs["Size"]) for label, ref in names.items()}
    finally:
        client.close()


def _compose(found: Engine, env: dict[str, str], project: str, *args: str) -> str:
    argv = [*found.compose, "-p", project, "-f", "compose.yaml", *args]
    return Engine(found.kind, env, found.compose).run(argv, 600.0).stdout


def _first_signature(client_dir: Path, deadline: float) -> float:
    """Poll until a key can be made and used through the broker; the time it succeeded."""
    from mgmt.client import KMSClient

    last: Exception | None = None
    while time.monotonic() < deadline:
        configs = sorted(client_dir.glob("*.toml"))
        if configs:
            try:
                client = KMSClient.from_config(configs[0])
                client.create_key("bench/first", "ec-p256", provider="hsm0")
                client.sign("bench/first", b"first signature")
                return time.monotonic()
            except Exception as exc:  # the stack is still coming up: retry until the deadline
                last = exc
        time.sleep(0.2)
    raise TimeoutError(f"no signature before the deadline: {last!r}")


def container_rss(found: Engine, env: dict[str, str], project: str) -> dict[str, int]:
    """kB resident per long-running container (sum over its processes)."""
    out: dict[str, int] = {}
    for service in ("nats", "crypto-hsm", "crypto-tpm", "swtpm", "ca", "broker"):
        text = _compose(found, env, project, "exec", "-T", service, "sh", "-c", RSS_SCRIPT)
        out[service] = int(text.strip())
    return out


def run(found: Engine, timeout: float = 600.0) -> dict[str, Any]:
    build_images(found)
    results: dict[str, Any] = {"engine": found.kind, "compose": " ".join(found.compose)}
    results["loadavg_at_start"] = [round(x, 2) for x in os.getloadavg()]
    results["image_bytes"] = image_sizes(found)
    project = f"edgekms-bench-{os.getpid()}"
    with tempfile.TemporaryDirectory(prefix="edgekms-bench-client-") as tmp:
        client_dir = Path(tmp)
        os.chown(client_dir, IMAGE_UID, IMAGE_UID)
        env = {
            **found.env,
            "EDGEKMS_CLIENT_DIR": str(client_dir),
            "EDGEKMS_BROKER_PORT": str(free_port()),
            "EDGEKMS_CA_PORT": str(free_port()),
        }
        try:
            started = time.monotonic()
            _compose(found, env, project, "up", "-d", "--no-build")
            up_returned = time.monotonic()
            signed = _first_signature(client_dir, started + timeout)
            results["up_returned_s"] = round(up_returned - started, 2)
            results["up_to_first_signature_s"] = round(signed - started, 2)
            # Idle memory after the first signature, every service having served once.
            results["rss_kb"] = container_rss(found, env, project)
        finally:
            Engine(found.kind, env, found.compose).run(
                [*found.compose, "-p", project, "-f", "compose.yaml", "down", "-v", "-t", "5"],
                600.0,
                check=False,
            )
    return results


def write(results: dict[str, Any], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "containers.json").write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")
    if "skipped" in results:
        (out / "containers.md").write_text(f"# Containers\n\nSkipped: {results['skipped']}\n")
        return
    mib = 1024 * 1024
    lines = [
        "# Containers: the compose stack",
        "",
        f"Engine: {results['engine']} (compose CLI: `{results['compose']}`); load average "
        f"at start {results.get('loadavg_at_start', '?')}.",
        "",
        "| figure | value |",
        "| --- | --- |",
    ]
    for name, size in results["image_bytes"].items():
        lines.append(f"| image `{name}` | {size / mib:.0f} MiB |")
    lines += [
        f"| `compose up -d` returned | {results['up_returned_s']} s |",
        f"| `compose up` to the first signature through the broker | "
        f"{results['up_to_first_signature_s']} s |",
    ]
    for service, kb in results["rss_kb"].items():
        lines.append(f"| RSS `{service}` (idle, after the first signature) | {kb / 1024:.1f} MiB |")
    total = sum(results["rss_kb"].values())
    lines.append(f"| RSS, all six long-running containers | {total / 1024:.1f} MiB |")
    (out / "containers.md").write_text("\n".join(lines) + "\n")


def measure() -> dict[str, Any]:
    try:
        with engine() as found:
            return run(found)
    except EngineUnavailable as exc:
        return {"skipped": str(exc)}


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.containers", description=__doc__)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args()
    results = measure()
    write(results, args.out)
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
