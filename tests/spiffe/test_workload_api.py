"""The Workload API against the real stack: workloads under different uids each get
their own SVID and nothing else, the SVIDs are X509-SVIDs as the specification has
them, two workloads authenticate each other over mutual TLS, JWT-SVIDs validate for
their audience only, and the `workload.spiffe.io` header is required."""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import secrets
import stat
import subprocess
import sys
from pathlib import Path

from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from tests.conftest import SLOWDOWN
from tests.e2e.conftest import BIN
from tests.spiffe.conftest import (
    SYSTEM_PYTHON,
    TRUST_DOMAIN,
    Agent,
    SpiffeStack,
    UnitCgroups,
    as_user,
    read_json_line,
    system_python_path,
    wait_for,
    workload,
    workload_in_cgroup,
    workload_process,
)

BACKUP = f"spiffe://{TRUST_DOMAIN}/backup"
SENSOR = f"spiffe://{TRUST_DOMAIN}/sensor/reader"
WEB = f"spiffe://{TRUST_DOMAIN}/web"


def test_each_uid_gets_its_own_svid_and_nothing_else(
    spiffe_stack: SpiffeStack, agent: Agent
) -> None:
    spiffe_stack.entry(BACKUP, "unix:uid:1001")
    spiffe_stack.entry(SENSOR, "unix:uid:1002", "unix:gid:1002")

    def fetched(uid: int, gid: int) -> dict[str, object]:
        answer = workload(agent.socket, uid, gid, "x509")
        # The agent reads its entries every half second: wait until it has them.
        return answer if "svids" in answer else {}

    backup = wait_for(lambda: fetched(1001, 1001), 60, "the backup SVID")
    sensor = wait_for(lambda: fetched(1002, 1002), 60, "the sensor SVID")
    assert [s["spiffe_id"] for s in backup["svids"]] == [BACKUP]
    assert [s["spiffe_id"] for s in sensor["svids"]] == [SENSOR]
    # Leaf and the SPIFFE signing CA; lifetime the default hour.
    assert backup["svids"][0]["chain"] == 2
    lifetime = backup["svids"][0]["not_after"] - backup["svids"][0]["not_before"]
    assert 3600 - 60 <= lifetime <= 3600 + 60
    # uid 1002 with another gid matches no entry (both selectors must match).
    assert workload(agent.socket, 1002, 1003, "x509") == {
        "error": "PERMISSION_DENIED",
        "details": "spiffe.no_identity: no identity issued",
    }
    # A uid with no entry: no identity, not even the bundle.
    nobody = workload(agent.socket, 1003, 1003, "x509")
    assert nobody["error"] == "PERMISSION_DENIED", nobody
    assert workload(agent.socket, 1003, 1003, "bundles")["error"] == "PERMISSION_DENIED"
    # Our trust domain's root (federated domains, if another test added some, beside it).
    assert workload(agent.socket, 1001, 1001, "bundles")["bundles"][f"spiffe://{TRUST_DOMAIN}"] == 1
    events = agent.events("spiffe_no_identity")
    assert any(e["uid"] == "1003" for e in events), events


def test_two_workloads_authenticate_each_other_over_mutual_tls(
    spiffe_stack: SpiffeStack, agent: Agent
) -> None:
    spiffe_stack.entry(WEB, "unix:uid:1011")
    client_id = f"spiffe://{TRUST_DOMAIN}/web-client"
    spiffe_stack.entry(client_id, "unix:uid:1012")
    wait_for(
        lambda: "svids" in workload(agent.socket, 1012, 1012, "x509"), 60, "the client's entry"
    )
    server = workload_process(agent.socket, 1011, 1011, "tls-server")
    try:
        listening = read_json_line(server)
        assert listening["me"] == WEB, listening
        client = workload(agent.socket, 1012, 1012, "tls-client", str(listening["port"]))
        assert client == {"peer": WEB, "me": client_id, "said": f"hello {client_id}"}
        assert read_json_line(server) == {"peer": client_id}
    finally:
        server.kill()
        server.wait()


def test_the_workload_header_is_required(spiffe_stack: SpiffeStack, agent: Agent) -> None:
    answer = workload(agent.socket, 1001, 1001, "nohdr")
    assert answer["error"] == "INVALID_ARGUMENT", answer
    assert "security header missing" in answer["details"]


def test_a_jwt_svid_validates_for_its_audience_only(
    spiffe_stack: SpiffeStack, agent: Agent
) -> None:
    spiffe_stack.entry(f"spiffe://{TRUST_DOMAIN}/jwt-user", "unix:uid:1021")
    fetched = wait_for(
        lambda: (a := workload(agent.socket, 1021, 1021, "jwt", "nas-api")).get("svids") and a,
        60,
        "a JWT-SVID",
    )
    token = fetched["svids"][0]["token"]
    assert fetched["svids"][0]["spiffe_id"] == f"spiffe://{TRUST_DOMAIN}/jwt-user"
    # Another workload (the backup job) validates it: same trust domain.
    valid = workload(agent.socket, 1001, 1001, "validate", "nas-api", token)
    assert valid == {
        "spiffe_id": f"spiffe://{TRUST_DOMAIN}/jwt-user",
        "sub": f"spiffe://{TRUST_DOMAIN}/jwt-user",
    }
    other = workload(agent.socket, 1001, 1001, "validate", "bank-api", token)
    assert other["error"] == "INVALID_ARGUMENT" and "jwt.audience_mismatch" in other["details"]
    head, claims, sig = token.split(".")
    forged = workload(
        agent.socket, 1001, 1001, "validate", "nas-api", f"{head}.{claims}.{sig[::-1]}"
    )
    assert forged["error"] == "INVALID_ARGUMENT", forged
    missing = workload(agent.socket, 1021, 1021, "jwt")
    assert missing["error"] == "INVALID_ARGUMENT", missing


def test_svids_are_x509_svids_and_only_for_the_devices_own_entries(
    spiffe_stack: SpiffeStack,
) -> None:
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    from edgekms.client import KMSClient
    from edgekms.errors import PermissionDenied

    mine = f"spiffe://{TRUST_DOMAIN}/profile-check"
    spiffe_stack.entry(mine, "unix:uid:4242", ttl="30m")
    theirs = f"spiffe://{TRUST_DOMAIN}/elsewhere"
    spiffe_stack.entry(theirs, "unix:uid:4242", node="other-device")
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([]))
        .sign(key, hashes.SHA256())
        .public_bytes(serialization.Encoding.DER)
    )
    with KMSClient.from_config(spiffe_stack.device_config, timeout=30 * SLOWDOWN) as device:
        answer = device.spiffe_sign_x509_svid(mine, csr)
        try:
            device.spiffe_sign_x509_svid(theirs, csr)
            raise AssertionError("another node's SPIFFE ID was signed")
        except PermissionDenied as exc:
            assert exc.reason == "spiffe.not_entitled"
        listed = list(device.spiffe_iter_entries(node="other-device"))
    # The broker narrows a device's listing to its own node whatever it asks for.
    assert listed and {e.node for e in listed} == {"nas-spiffe"}
    with spiffe_stack.stack.client() as admin:
        try:
            admin.spiffe_sign_x509_svid(mine, csr)
            raise AssertionError("an administrator got an SVID")
        except PermissionDenied as exc:
            assert exc.reason == "authz.role_denied"

    leaf = x509.load_der_x509_certificate(answer.certificate_der)
    ca = x509.load_der_x509_certificate(answer.intermediates_der[0])
    root = x509.load_der_x509_certificate(answer.bundle.x509_authorities_der[0])
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert san.value.get_values_for_type(x509.UniformResourceIdentifier) == [mine]
    assert len(list(san.value)) == 1
    basic = leaf.extensions.get_extension_for_class(x509.BasicConstraints)
    assert basic.critical and basic.value.ca is False
    usage = leaf.extensions.get_extension_for_class(x509.KeyUsage)
    assert usage.critical and usage.value.digital_signature
    assert not usage.value.key_cert_sign and not usage.value.crl_sign
    assert not usage.value.key_encipherment  # an EC key
    eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(eku) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    assert leaf.not_valid_after_utc - leaf.not_valid_before_utc == datetime.timedelta(minutes=30)
    # Chain: leaf <- SPIFFE signing CA <- the mini-CA's root (the bundle).
    leaf.verify_directly_issued_by(ca)
    ca.verify_directly_issued_by(root)
    ca_basic = ca.extensions.get_extension_for_class(x509.BasicConstraints).value
    assert ca_basic.ca and ca_basic.path_length == 0
    # The signing certificate is an SVID signing certificate as the specification has
    # it: the trust domain's ID (no path) as its one URI SAN, keyCertSign (critical),
    # and not digitalSignature, which is for leaves.
    ca_san = ca.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert ca_san.get_values_for_type(x509.UniformResourceIdentifier) == [
        f"spiffe://{TRUST_DOMAIN}"
    ]
    assert len(list(ca_san)) == 1
    ca_usage = ca.extensions.get_extension_for_class(x509.KeyUsage)
    assert ca_usage.critical and ca_usage.value.key_cert_sign
    assert not ca_usage.value.digital_signature
    jwks = json.loads(answer.bundle.jwks)
    assert [k["use"] for k in jwks["keys"]] == ["jwt-svid"]
    assert leaf.public_key() == key.public_key()


def test_an_independent_spiffe_library_talks_to_the_agent(
    spiffe_stack: SpiffeStack, agent: Agent
) -> None:
    """py-spiffe (PyPI `spiffe`) as a root process whose executable is this venv's
    python: a uid-and-path entry."""
    exe = os.path.realpath(sys.executable)
    tool = f"spiffe://{TRUST_DOMAIN}/admin-tool"
    spiffe_stack.entry(tool, "unix:uid:0", f"unix:path:{exe}")

    def call() -> dict[str, object]:
        result = subprocess.run(
            [sys.executable, str(Path(__file__).with_name("pyspiffe_client.py")),
             str(agent.socket), "nas-api"],
            capture_output=True, text=True, timeout=120 * SLOWDOWN,
        )  # fmt: skip
        return json.loads(result.stdout) if result.returncode == 0 else {}

    answer = wait_for(call, 60, "py-spiffe's answer")
    assert answer["spiffe_id"] == tool
    assert answer["chain"] == 2
    assert answer["context_svids"] == [tool]
    assert TRUST_DOMAIN in answer["x509_bundle_domains"]
    assert answer["jwt_spiffe_id"] == tool and answer["jwt_audience"] == ["nas-api"]
    assert answer["validated"] == tool
    assert answer["jwt_bundle_for_own_domain"] is True


def test_the_path_selector_tells_two_programs_of_one_uid_apart(
    spiffe_stack: SpiffeStack, agent: Agent
) -> None:
    exe = system_python_path()
    spiffe_stack.entry(f"spiffe://{TRUST_DOMAIN}/by-path", "unix:uid:1031", f"unix:path:{exe}")
    spiffe_stack.entry(
        f"spiffe://{TRUST_DOMAIN}/other-program", "unix:uid:1031", "unix:path:/usr/bin/restic"
    )
    answer = wait_for(
        lambda: (a := workload(agent.socket, 1031, 1031, "x509")).get("svids") and a,
        60,
        "the by-path SVID",
    )
    assert [s["spiffe_id"] for s in answer["svids"]] == [f"spiffe://{TRUST_DOMAIN}/by-path"]


def test_the_sha256_selector_is_the_executables_digest(
    spiffe_stack: SpiffeStack, agent: Agent
) -> None:
    """The digest is of the running executable (read through /proc/<pid>/exe): the
    right one gives the identity, another digest for the same uid does not."""
    digest = hashlib.sha256(open(system_python_path(), "rb").read()).hexdigest()  # noqa: SIM115
    spiffe_stack.entry(
        f"spiffe://{TRUST_DOMAIN}/by-digest", "unix:uid:1065", f"unix:sha256:{digest}"
    )
    spiffe_stack.entry(
        f"spiffe://{TRUST_DOMAIN}/other-digest", "unix:uid:1065", f"unix:sha256:{'0' * 64}"
    )
    answer = wait_for(
        lambda: (a := workload(agent.socket, 1065, 1065, "x509")).get("svids") and a,
        60,
        "the by-digest SVID",
    )
    assert [s["spiffe_id"] for s in answer["svids"]] == [f"spiffe://{TRUST_DOMAIN}/by-digest"]


def test_the_systemd_unit_selector_and_a_users_lookalike_unit(
    spiffe_stack: SpiffeStack, agent: Agent
) -> None:
    """A process in the system unit's cgroup gets the unit's identity; a process of the
    same uid in a cgroup its own user manager could have named `<unit>` does not."""
    cgroups = UnitCgroups()
    unit = f"edgekms-test-{secrets.token_hex(4)}.service"
    unit_id = f"spiffe://{TRUST_DOMAIN}/unit-job"
    spiffe_stack.entry(unit_id, "unix:uid:1071", f"systemd:unit:{unit}")
    try:
        system = cgroups.make(f"system.slice/{unit}")
        lookalike = cgroups.make(f"user.slice/user-1071.slice/user@1071.service/app.slice/{unit}")
        answer = wait_for(
            lambda: (
                (a := workload_in_cgroup(agent.socket, system, 1071, 1071, "x509")).get("svids")
                and a
            ),
            60,
            "the unit's SVID",
        )
        assert [s["spiffe_id"] for s in answer["svids"]] == [unit_id]
        spoofed = workload_in_cgroup(agent.socket, lookalike, 1071, 1071, "x509")
        assert spoofed == {
            "error": "PERMISSION_DENIED",
            "details": "spiffe.no_identity: no identity issued",
        }
        # Outside any unit the same uid is nobody either.
        assert workload(agent.socket, 1071, 1071, "x509")["error"] == "PERMISSION_DENIED"
        refused = [e for e in agent.events("spiffe_no_identity") if e.get("uid") == "1071"]
        assert any(e.get("unit") == "user@1071.service" for e in refused), refused
    finally:
        cgroups.cleanup()


def _listening_paths(pid: int) -> list[str]:
    """The Unix socket paths process `pid` holds open (its fds against /proc/net/unix)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        target = os.readlink(fd) if fd.is_symlink() else ""
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    paths = []
    for line in Path("/proc/net/unix").read_text().splitlines()[1:]:
        fields = line.split()
        if len(fields) >= 8 and fields[6] in inodes:
            paths.append(fields[7])
    return paths


def test_the_socket_modes_and_the_gate_cannot_be_skipped(
    spiffe_stack: SpiffeStack, agent: Agent
) -> None:
    """The public socket is 0666 in a 0755 directory (docs/spiffe.md, "The socket's
    mode"); the gRPC server behind the gate listens in a 0700 directory another uid
    cannot enter, so no workload reaches it without being attested."""
    assert stat.S_IMODE(agent.socket.stat().st_mode) == 0o666
    assert stat.S_IMODE(agent.socket.parent.stat().st_mode) == 0o755
    inner = [p for p in _listening_paths(agent.proc.pid) if p.endswith("/grpc.sock")]
    assert len(inner) == 1, _listening_paths(agent.proc.pid)
    assert stat.S_IMODE(Path(inner[0]).parent.stat().st_mode) == 0o700
    dial = (
        "import socket, sys\n"
        "s = socket.socket(socket.AF_UNIX)\n"
        "try:\n    s.connect(sys.argv[1]); print('connected')\n"
        "except OSError as e:\n    print(e.errno)\n"
    )
    result = subprocess.run(
        [str(SYSTEM_PYTHON), "-S", "-c", dial, inner[0]],
        capture_output=True, text=True, timeout=60 * SLOWDOWN, **as_user(1001, 1001),
    )  # fmt: skip
    assert result.stdout.strip() == "13", result.stdout + result.stderr  # EACCES


def test_a_second_agent_does_not_take_a_served_socket(
    spiffe_stack: SpiffeStack, agent: Agent, tmp_path: Path
) -> None:
    """Starting another agent on a socket an agent serves is refused (exit 6), and the
    first keeps serving on it; a path that is not a socket is refused and left alone."""
    spiffe_stack.entry(f"spiffe://{TRUST_DOMAIN}/still-served", "unix:uid:1095")
    wait_for(lambda: "svids" in workload(agent.socket, 1095, 1095, "x509"), 60, "an SVID")
    inode = agent.socket.stat().st_ino

    def second(path: Path) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(BIN / "kmsctl"), "spiffe", "agent", "--client-config",
             str(spiffe_stack.device_config), "--socket", f"unix://{path}"],
            capture_output=True, text=True, timeout=60 * SLOWDOWN,
        )  # fmt: skip

    taken = second(agent.socket)
    assert taken.returncode == 6, taken.stdout + taken.stderr
    assert taken.stderr.startswith("kmsctl: spiffe.socket_in_use:"), taken.stderr
    assert agent.socket.stat().st_ino == inode
    assert "svids" in workload(agent.socket, 1095, 1095, "x509")
    a_file = tmp_path / "workload.sock"
    a_file.write_text("not a socket")
    refused = second(a_file)
    assert refused.returncode == 6, refused.stdout + refused.stderr
    assert refused.stderr.startswith("kmsctl: spiffe.socket_unusable:"), refused.stderr
    assert a_file.read_text() == "not a socket"


def test_entry_listing_pages_in_order_from_the_keys(spiffe_stack: SpiffeStack) -> None:
    """A listing is paged by (node, entry id) from the entries' keys, each page unsealing
    only its own entries: every entry once, in order, across pages; a node's listing
    holds that node's only (a dotted node name included); an entry deleted between two
    pages is simply not listed, and nothing else is skipped."""
    from edgekms import spiffe as sp

    nodes = ["page.node.b", "page-node-a"]
    made = {
        (node, sp.entry_id(node, f"spiffe://{TRUST_DOMAIN}/paged/{i}"))
        for node in nodes
        for i in range(5)
    }
    for node in nodes:
        for i in range(5):
            spiffe_stack.entry(f"spiffe://{TRUST_DOMAIN}/paged/{i}", "unix:uid:7", node=node)
    with spiffe_stack.stack.client() as admin:
        for node in nodes:
            listed = [(e.node, e.entry_id) for e in admin.spiffe_iter_entries(node, page_size=2)]
            assert listed == sorted(p for p in made if p[0] == node)
        everything = [(e.node, e.entry_id) for e in admin.spiffe_iter_entries(page_size=3)]
        assert everything == sorted(everything) and len(everything) == len(set(everything))
        assert made <= set(everything)
        pages = admin.spiffe_iter_entries("page-node-a", page_size=2)
        first = [next(pages), next(pages)]
        doomed = sorted(p for p in made if p[0] == "page-node-a")[3]
        admin.spiffe_delete_entry(doomed[1])
        rest = list(pages)
    got = [(e.node, e.entry_id) for e in [*first, *rest]]
    assert got == [p for p in sorted(made) if p[0] == "page-node-a" and p != doomed]


def test_entries_are_managed_and_the_ca_refuses_bad_ones_itself(
    spiffe_stack: SpiffeStack,
) -> None:
    """The CA checks what kmsctl checks (a caller may skip kmsctl), and list, show and
    delete work as documented, -o json for scripts."""
    import pytest

    from edgekms.errors import AlreadyExists, InvalidArgument

    with spiffe_stack.stack.client() as admin:
        for spiffe_id, selectors, reason in [
            ("spiffe://home.arpa/x?y", ["unix:uid:1"], "spiffe.id_invalid"),
            ("spiffe://other.example/x", ["unix:uid:1"], "spiffe.trust_domain_mismatch"),
            ("spiffe://home.arpa/x", ["unix:pid:1"], "spiffe.selector_invalid"),
            ("spiffe://home.arpa/x", [], "spiffe.selector_missing"),
        ]:
            with pytest.raises(InvalidArgument) as caught:
                admin.spiffe_create_entry(spiffe_id, "nas-spiffe", selectors)
            assert caught.value.reason == reason
        with pytest.raises(AlreadyExists) as exists:
            admin.spiffe_init("other.example")
        assert exists.value.reason == "spiffe.already_initialized"
    eid = spiffe_stack.entry(f"spiffe://{TRUST_DOMAIN}/managed", "systemd:unit:backup.service")
    again = spiffe_stack.kmsctl(
        "spiffe", "entry", "create", "--id", f"spiffe://{TRUST_DOMAIN}/managed",
        "--node", "nas-spiffe", "--selector", "unix:uid:5", check=False,
    )  # fmt: skip
    assert again.returncode == 5 and "spiffe.entry_exists" in again.stderr
    shown = json.loads(spiffe_stack.kmsctl("spiffe", "entry", "show", eid, "-o", "json").stdout)
    assert shown["selectors"] == ["systemd:unit:backup.service"]
    assert shown["ttl_seconds"] == 3600 and shown["created_by"] == "admin"
    listed = json.loads(
        spiffe_stack.kmsctl("spiffe", "entry", "list", "--node", "nas-spiffe", "-o", "json").stdout
    )
    assert eid in {e["entry_id"] for e in listed}
    spiffe_stack.kmsctl("spiffe", "entry", "delete", eid)
    gone = spiffe_stack.kmsctl("spiffe", "entry", "show", eid, check=False)
    assert gone.returncode == 4 and "spiffe.entry_not_found" in gone.stderr
    bundle = json.loads(spiffe_stack.kmsctl("spiffe", "bundle", "-o", "json").stdout)
    assert bundle["trust_domain"] == TRUST_DOMAIN and len(bundle["x509_authorities_pem"]) == 1
