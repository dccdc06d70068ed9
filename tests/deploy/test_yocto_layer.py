"""Checks on meta-edgekms that need no bitbake: oelint-adv over every recipe and
append, layer.conf's fields, one systemd unit per service with the right user,
restart policy, hardening and device groups, the image's contents, the Go modules of
nats-server, the data partition and provisioning scripts, and the kas pins.

The bitbake parse itself (against the upstream layers) is yocto-layer/scripts/
check-layer.sh: it needs the upstream layers, which CI does not have."""

from __future__ import annotations

import configparser
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
LAYER = ROOT / "yocto-layer"
RECIPE = LAYER / "recipes-edgekms" / "edgekms" / "edgekms_0.1.0.bb"
FILES = RECIPE.parent / "files"
IMAGE = LAYER / "recipes-edgekms" / "images" / "edgekms-image.bb"
KAS = LAYER / "kas" / "edgekms-stm32mp15-disco.yml"

# oelint-adv's HOMEPAGE check pings the site: there is no network here, so it is off.
ALWAYS_SUPPRESSED = ["oelint.vars.homepageping"]
# Target-only packages (services, a firewall ruleset) have no native variant.
TARGET_ONLY = {"edgekms_0.1.0.bb", "edgekms-firewall_1.0.bb", "python3-tpm2-pytss_2.2.1.bb"}

# The long-running services and what each must run (the agreed command lines).
SERVICES = {
    # nats.conf is made by edgekms-setup and reaches nats-server as a credential (%d).
    "edgekms-nats.service": ("edgekms-nats", "/nats-server -c %d/nats.conf"),
    "edgekms-crypto-hsm0.service": (
        "edgekms-hsm",
        "/kms-crypto --config /etc/edgekms/crypto-hsm0.toml",
    ),
    "edgekms-crypto-tpm0.service": (
        "edgekms-tpm",
        "/kms-crypto --config /etc/edgekms/crypto-tpm0.toml",
    ),
    "edgekms-ca.service": ("edgekms-ca", "/kmsctl ca serve --config /etc/edgekms/ca.toml"),
    "edgekms-broker.service": ("edgekms-broker", "/kms-broker --config /etc/edgekms/broker.toml"),
}


# The single-process modes (kmsctl up) on the board's OP-TEE token, package edgekms-node:
# unit -> (the option that makes the mode, its data dir).
ROLE_UNITS = {
    "edgekms-node.service": ("--join", "/var/lib/edgekms/node"),
    "edgekms-fleet-hub.service": ("--leaf-listen", "/var/lib/edgekms/hub"),
    "edgekms-fleet-device.service": ("--uplink", "/var/lib/edgekms/device"),
}
# What the per-service units hold that a role unit holds too: ports, the token.
PER_SERVICE = {
    "edgekms-nats.service",
    "edgekms-init.service",
    "edgekms-crypto-hsm0.service",
    "edgekms-crypto-tpm0.service",
    "edgekms-ca.service",
    "edgekms-broker.service",
}


def bb_assignments(path: Path) -> dict[str, str]:
    """VAR = "value" / VAR += "value" lines (continuations joined), last one wins for '='."""
    text = re.sub(r"\\\n\s*", " ", path.read_text())
    values: dict[str, str] = {}
    for match in re.finditer(r'^([A-Za-z0-9_:${}\-\.]+)\s*(\+?=|\?=|:=)\s*"([^"]*)"', text, re.M):
        name, op, value = match.groups()
        value = " ".join(value.split())
        values[name] = (values.get(name, "") + " " + value).strip() if op == "+=" else value
    return values


def oelint(files: list[Path], *suppress: str) -> subprocess.CompletedProcess[str]:
    binary = Path(sys.executable).parent / "oelint-adv"
    args = [str(binary if binary.exists() else shutil.which("oelint-adv") or "oelint-adv")]
    args += ["--quiet", "--release", "scarthgap", "--jobs", "2"]
    for rule in (*ALWAYS_SUPPRESSED, *suppress):
        args += ["--suppress", rule]
    return subprocess.run(
        [*args, *map(str, files)], capture_output=True, text=True, timeout=120, check=False
    )


def test_oelint_finds_nothing_on_any_recipe_or_append() -> None:
    recipes = sorted([*LAYER.rglob("*.bb"), *LAYER.rglob("*.bbappend")])
    assert len(recipes) >= 8, recipes
    general = [r for r in recipes if r.name not in TARGET_ONLY]
    target_only = [r for r in recipes if r.name in TARGET_ONLY]
    for batch, extra in ((general, ()), (target_only, ("oelint.var.bbclassextend",))):
        result = oelint(batch, *extra)
        findings = (result.stdout + result.stderr).strip()
        assert result.returncode == 0 and findings == "", findings


def test_oelint_does_report_a_bad_recipe(tmp_path: Path) -> None:
    """The lint above can fail: a recipe without LICENSE is reported."""
    bad = tmp_path / "bad_1.0.bb"
    bad.write_text('SUMMARY = "x"\nSRC_URI = "file://x"\n')
    result = oelint([bad])
    assert "oelint.var.mandatoryvar.LICENSE" in result.stdout + result.stderr


def test_layer_conf_has_its_fields() -> None:
    conf = bb_assignments(LAYER / "conf" / "layer.conf")
    assert "edgekms" in conf["BBFILE_COLLECTIONS"].split()
    assert conf["BBFILE_PATTERN_edgekms"] == "^${LAYERDIR}/"
    assert int(conf["BBFILE_PRIORITY_edgekms"]) > 7  # above meta-python and meta-tpm
    assert conf["LAYERSERIES_COMPAT_edgekms"].split() == ["scarthgap"]
    depends = set(conf["LAYERDEPENDS_edgekms"].split())
    # Hard dependencies for every provider the image needs (optee-client is meta-arm's).
    assert {
        "core",
        "openembedded-layer",
        "meta-python",
        "networking-layer",
        "tpm-layer",
        "meta-arm",
    } <= depends
    assert "recipes-*/*/*.bb" in conf["BBFILES"]
    # The board's parts only with the BSP layer: dynamic-layers/<collection>/.
    dynamic = conf["BBFILES_DYNAMIC"].split()
    for recipe in (LAYER / "dynamic-layers").rglob("*.bb*"):
        collection = recipe.relative_to(LAYER / "dynamic-layers").parts[0]
        assert any(entry.startswith(f"{collection}:") for entry in dynamic), recipe
    assert "stm-st-stm32mp" not in conf.get("LAYERRECOMMENDS_edgekms", "")
    assert not list((LAYER / "recipes-kernel").glob("**/*.bbappend"))


def test_distro_name_is_no_recipe_name() -> None:
    """DISTRO is an override: a PN equal to it breaks parsing (defect 1)."""
    distro = bb_assignments(LAYER / "conf" / "distro" / "edgekms-os.conf")["DISTRO"]
    recipes = {p.name.split("_")[0].removesuffix(".bb") for p in LAYER.rglob("*.bb")}
    assert distro == "edgekms-os" and distro not in recipes
    for append in LAYER.rglob("*.bbappend"):
        overrides = re.findall(r"^[A-Z_]+(?::\w+)*:([a-z0-9-]+)\s", append.read_text(), re.M)
        assert set(overrides) <= {"edgekms-os", "prepend", "append", "remove"}, append


def test_no_recipe_needs_a_package_scarthgap_lacks() -> None:
    text = "\n".join(p.read_text() for p in LAYER.rglob("*.bb*"))
    assert "uvloop" not in text
    assert "externalsrc" not in RECIPE.read_text().split("SRC_URI", 1)[1]
    recipe = bb_assignments(RECIPE)
    assert recipe["SRC_URI"].startswith("git://") and re.fullmatch(
        r"[0-9a-f]{40}", recipe["SRCREV"]
    )
    tpm = recipe["RDEPENDS:${PN}-crypto-tpm"]
    assert "libtss2-tcti-device" in tpm and "python3-tpm2-pytss (>= 2.2.1)" in tpm
    pytss = LAYER / "recipes-devtools" / "python" / "python3-tpm2-pytss_2.2.1.bb"
    assert re.search(r'^SRC_URI\[sha256sum\] = "b8f15473[0-9a-f]{56}"$', pytss.read_text(), re.M)


NATS = LAYER / "recipes-edgekms" / "nats-server"


def test_nats_server_fetches_every_go_module_and_builds_offline() -> None:
    recipe_text = (NATS / "nats-server_2.10.25.bb").read_text()
    assert "[network]" not in recipe_text
    recipe = bb_assignments(NATS / "nats-server_2.10.25.bb")
    # Stripping is the packaging's job; a pre-stripped binary is a QA error.
    assert not {"-s", "-w"} & set(recipe["GO_EXTRA_LDFLAGS"].split())
    assert 'export GOFLAGS = "-mod=vendor"' in recipe_text
    assert 'export GOPROXY = "off"' in recipe_text
    assert "go-vendor" in recipe_text
    mods = bb_assignments(NATS / "nats-server-go-mods.inc")
    uris = mods["SRC_URI"].split()
    modules_txt = (NATS / "files" / "modules.txt").read_text()
    required = re.findall(r"^# (\S+) (\S+)$", modules_txt, re.M)
    assert len(required) == 10 and modules_txt.count("## explicit") == 10
    for path, version in required:
        uri = next(u for u in uris if f";go_module_path={path};" in u)
        assert uri.startswith("git://") and "is_go_dependency=1" in uri
        assert f"@{version};" in uri
        name = re.search(r";name=([^;]+)", uri)
        assert name and re.fullmatch(r"[0-9a-f]{40}", mods[f"SRCREV_{name.group(1)}"])
    licences = bb_assignments(NATS / "nats-server-licenses.inc")["LIC_FILES_CHKSUM"].split()
    assert len(licences) == len(required)


def read_unit(name: str) -> configparser.ConfigParser:
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.optionxform = str  # type: ignore[assignment,method-assign]
    unit.read_string((FILES / name).read_text())
    return unit


def test_every_service_package_has_its_unit() -> None:
    recipe = bb_assignments(RECIPE)
    packages = recipe["SYSTEMD_PACKAGES"].split()
    units = {unit for pkg in packages for unit in recipe[f"SYSTEMD_SERVICE:{pkg}"].split()}
    assert (
        set(SERVICES)
        | set(ROLE_UNITS)
        | {
            "edgekms-init.service",
            "edgekms-setup.service",
            "edgekms-datafs.service",
            "edgekms-provision.service",
            "edgekms-agent.service",
            "edgekms-spiffe-agent.service",
            "edgekms-unlock@.service",
        }
        == units
    )
    src_uri = recipe["SRC_URI"]
    for unit in units:
        assert (FILES / unit).is_file(), unit
        assert f"file://{unit}" in src_uri
        pkg = next(p for p in packages if unit in recipe[f"SYSTEMD_SERVICE:{p}"].split())
        assert unit in recipe[f"FILES:{pkg}"]


@pytest.mark.parametrize("name", sorted(SERVICES))
def test_service_unit_runs_as_its_user_and_restarts(name: str) -> None:
    user, command = SERVICES[name]
    service = read_unit(name)["Service"]
    assert service["Restart"] == "on-failure"
    assert service["User"] == user and user != "root"
    assert (
        service["ExecStart"]
        .replace("@BINDIR@", "/usr/bin")
        .replace("@SYSCONFDIR@", "/etc")
        .endswith(command)
    )
    assert service["NoNewPrivileges"] == "yes"
    assert service["ProtectSystem"] == "strict"
    recipe = bb_assignments(RECIPE)
    params = " ".join(v for k, v in recipe.items() if k.startswith("USERADD_PARAM:"))
    assert re.search(rf"\b{re.escape(user)}$|\b{re.escape(user)}\s*;", params) or params.count(
        user
    ), f"{user} is not created by useradd"


def test_tpm_service_is_in_tss_group_and_hsm_in_teeclnt() -> None:
    tpm = read_unit("edgekms-crypto-tpm0.service")["Service"]
    assert "tss" in tpm["SupplementaryGroups"].split()
    assert "/dev/tpmrm0" in tpm["DeviceAllow"]
    hsm = read_unit("edgekms-crypto-hsm0.service")["Service"]
    assert "teeclnt" in hsm["SupplementaryGroups"].split()
    recipe = bb_assignments(RECIPE)
    assert "--groups tss edgekms-tpm" in recipe["USERADD_PARAM:${PN}-crypto-tpm"]


def test_tmpfiles_create_every_state_dir_the_configs_use() -> None:
    tmpfiles = (FILES / "edgekms.tmpfiles").read_text().replace("@LOCALSTATEDIR@", "/var")
    declared = {line.split()[1] for line in tmpfiles.splitlines() if line.startswith("d ")}
    for conf in ("crypto-hsm0.toml", "crypto-tpm0.toml", "broker.toml", "ca.toml"):
        settings = tomllib.loads((ROOT / "deploy" / conf).read_text())
        values = [*settings.values()]
        values += [v for t in settings.values() if isinstance(t, dict) for v in t.values()]
        for value in values:
            if isinstance(value, str) and value.startswith("/var/lib/edgekms/"):
                parent = value if value.endswith("/tpm0") else str(Path(value).parent)
                assert parent in declared, (conf, value)
    secrets = next(line for line in tmpfiles.splitlines() if "/edgekms/secrets " in line)
    assert secrets.split()[2:5] == ["0700", "root", "root"]


def test_board_configs_match_the_service_formats() -> None:
    hsm = tomllib.loads((ROOT / "deploy" / "crypto-hsm0.toml").read_text())
    assert hsm["provider_id"] == "hsm0"
    assert hsm["pkcs11"]["module"] == "/usr/lib/libckteec.so.0"
    tpm = tomllib.loads((ROOT / "deploy" / "crypto-tpm0.toml").read_text())
    assert tpm["tpm2"]["tcti"] == "device:/dev/tpmrm0"
    broker = tomllib.loads((ROOT / "deploy" / "broker.toml").read_text())
    assert set(broker["providers"]) == {"hsm0", "tpm0"}
    assert set(broker["tls"]) == {"cert", "key", "client_ca"}
    # The bus is authenticated on the board too: nats.conf is generated, never shipped.
    assert not (ROOT / "deploy" / "nats.conf").exists()
    assert "nats.conf" not in RECIPE.read_text().split("do_install", 1)[1].split("FILES:", 1)[0]


def test_image_installs_every_service_and_no_debug_features() -> None:
    image = bb_assignments(IMAGE)
    installed = set(image["IMAGE_INSTALL"].split())
    # Set outright, without core-image's packagegroup-base-extended (wifi, avahi, nfs).
    assert "IMAGE_INSTALL" in re.findall(r"^(IMAGE_INSTALL) = ", IMAGE.read_text(), re.M)
    assert not installed & {"packagegroup-base-extended", "avahi-daemon", "wpa-supplicant"}
    distro = bb_assignments(LAYER / "conf" / "distro" / "edgekms-os.conf")
    assert not set(distro["DISTRO_FEATURES"].split()) & {"wifi", "nfs", "zeroconf", "x11"}
    packages = set(bb_assignments(RECIPE)["SYSTEMD_PACKAGES"].replace("${PN}", "edgekms").split())
    assert packages <= installed
    assert {"optee-client", "tpm2-tss", "edgekms-firewall"} <= installed
    assert "read-only-rootfs" in image["IMAGE_FEATURES"]
    for feature in ("debug-tweaks", "tools-debug"):
        assert feature in image["IMAGE_FEATURES:remove"]
    nft = (LAYER / "recipes-connectivity" / "nftables" / "files" / "edgekms.nft").read_text()
    assert "policy drop" in nft and re.findall(r"tcp dport (\d+)", nft) == ["8443"]


def test_kas_pins_every_layer_to_a_scarthgap_commit() -> None:
    kas = yaml.safe_load(KAS.read_text())
    assert kas["machine"] == "stm32mp15-disco"
    assert kas["distro"] == "edgekms-os" and kas["target"] == "edgekms-image"
    assert (LAYER / "conf" / "distro" / "edgekms-os.conf").is_file()
    remote = {name: repo for name, repo in kas["repos"].items() if repo and "url" in repo}
    assert set(remote) == {
        "poky",
        "meta-openembedded",
        "meta-security",
        "meta-arm",
        "meta-st-stm32mp",
    }
    for name, repo in remote.items():
        assert repo["branch"] == "scarthgap", name
        assert re.fullmatch(r"[0-9a-f]{40}", repo["commit"]), name
    assert "meta-tpm" in kas["repos"]["meta-security"]["layers"]
    assert "yocto-layer" in kas["repos"]["edgekms"]["layers"]


HARDENING = {
    "NoNewPrivileges": "yes",
    "ProtectSystem": "strict",
    "ProtectClock": "yes",
    "ProtectKernelLogs": "yes",
    "ProtectKernelModules": "yes",
    "ProtectKernelTunables": "yes",
    "RestrictNamespaces": "yes",
    "CapabilityBoundingSet": "",
}


@pytest.mark.parametrize(
    "name", sorted({*SERVICES, *ROLE_UNITS, "edgekms-init.service", "edgekms-setup.service"})
)
def test_unit_is_confined(name: str) -> None:
    unit = read_unit(name)
    service = unit["Service"]
    for key, value in HARDENING.items():
        assert service.get(key) == value, (name, key)
    assert "\nSystemCallFilter=@system-service\n" in (FILES / name).read_text(), name
    families = set(service["RestrictAddressFamilies"].split())
    assert families and families <= {"AF_UNIX", "AF_INET", "AF_INET6"}, name
    # edgekms-setup alone is uid 0 (it owns the root-only secrets), with no capabilities.
    if name != "edgekms-setup.service":
        assert service.get("User", "root") != "root", name
    # None of them runs on the tmpfs /var/lib: only with the data partition mounted.
    assert unit["Unit"]["ConditionPathIsMountPoint"] == "@LOCALSTATEDIR@/lib/edgekms", name


def test_init_gives_up_after_a_few_tries() -> None:
    unit = read_unit("edgekms-init.service")
    assert unit["Service"]["Restart"] == "on-failure"
    assert int(unit["Unit"]["StartLimitBurst"]) <= 5
    assert unit["Unit"]["StartLimitIntervalSec"]
    assert unit["Service"]["User"] == "edgekms-init"


def test_tee_supplicant_runs_unprivileged_on_the_data_partition() -> None:
    dropin = read_unit("tee-supplicant-edgekms.conf")
    assert dropin["Service"]["User"] == "teesuppl"
    assert dropin["Service"]["CapabilityBoundingSet"] == ""
    assert dropin["Service"]["ReadWritePaths"] == "@LOCALSTATEDIR@/lib/tee"
    assert "edgekms-datafs.service" in dropin["Unit"]["Requires"]
    rules = (FILES / "edgekms-tee.rules").read_text()
    assert 'KERNEL=="teepriv[0-9]*", MODE="0660", GROUP="teesuppl"' in rules


def test_firewall_fails_closed() -> None:
    nft = LAYER / "recipes-connectivity" / "nftables" / "files"
    unit = read_unit_at(nft / "edgekms-firewall.service")
    assert "ExecStop" not in unit["Service"]
    assert "systemd-networkd.service" in unit["Install"]["RequiredBy"]
    dropin = read_unit_at(nft / "networkd-edgekms-firewall.conf")
    assert dropin["Unit"]["Requires"] == "edgekms-firewall.service"
    assert (
        "networkd-edgekms-firewall.conf"
        in (LAYER / "recipes-connectivity" / "nftables" / "edgekms-firewall_1.0.bb").read_text()
    )


def read_unit_at(path: Path) -> configparser.ConfigParser:
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.optionxform = str  # type: ignore[assignment,method-assign]
    unit.read_string(path.read_text())
    return unit


def test_data_partition_is_in_the_flash_layout() -> None:
    distro = bb_assignments(LAYER / "conf" / "distro" / "edgekms-os.conf")
    assert "edgekmsfs" in distro["PARTITIONS_IMAGES"].split()
    assert "edgekmsfs" in distro["PARTITIONS_LIST"].split()
    flag = re.search(
        r'^PARTITIONS_IMAGES\[edgekmsfs\] = "([^"]*)"',
        (LAYER / "conf" / "distro" / "edgekms-os.conf").read_text(),
        re.M,
    )
    assert flag
    image, label, _mount, size, kind = flag.group(1).split(",")
    assert label == "${EDGEKMS_DATAFS_LABEL}" and distro["EDGEKMS_DATAFS_LABEL"] == "edgekmsfs"
    assert kind == "FileSystem" and int(distro[size.strip("${}")]) >= 65536
    placeholder = LAYER / "dynamic-layers" / "stm-st-stm32mp" / "recipes-edgekms" / "images"
    assert (placeholder / f"{image}.bb").is_file()
    datafs = (FILES / "edgekms-datafs").read_text()
    assert "by-partlabel/edgekmsfs" in datafs and "luksFormat --type luks2" in datafs
    assert "--tpm2-device=auto" in datafs and "--recovery-key" in datafs


def test_data_partition_holds_the_audit_streams_reservation() -> None:
    """JetStream refuses a stream whose max_bytes it cannot reserve (err 10047) against
    its store's cap, so every writer's stream must be sized for the board: each service
    config the layer installs sets its writer's limit, the limits and the KV buckets fit
    the store's cap (edgekms-setup --max-file-store), and the cap fits the 256 MiB
    partition less LUKS2's header, ext4's share and the other files on it. The live
    half is tests/deploy/test_board_store.py."""
    from edgekms.audit import MIN_STREAM_BYTES, default_max_bytes
    from tests.deploy.boardsizing import KV_BUCKETS, OTHER_FILES, board_sizing

    board = board_sizing()
    assert set(board.limits) == {"broker", "ca", "crypto-hsm0", "crypto-tpm0"}
    for writer, limit in board.limits.items():
        assert limit is not None, f"{writer}: no audit_max_bytes, so the 1-2 GiB default"
        assert MIN_STREAM_BYTES <= limit.max_bytes < default_max_bytes(writer), writer
    # The broker records every decision: it gets the largest share.
    sizes = {writer: limit.max_bytes for writer, limit in board.limits.items() if limit}
    assert max(sizes, key=sizes.__getitem__) == "broker", sizes
    assert board.reserved + KV_BUCKETS <= board.max_file_store, (
        board.reserved,
        board.max_file_store,
    )
    assert board.max_file_store + OTHER_FILES <= board.usable, (board.max_file_store, board.usable)


SCRIPTS = [
    FILES / "edgekms-datafs",
    FILES / "edgekms-provision",
    FILES / "edgekms-unlock-keyscript",
]


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_board_script_is_valid_sh(script: Path) -> None:
    result = subprocess.run(["sh", "-n", str(script)], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    checker = shutil.which("shellcheck")
    if checker:
        result = subprocess.run(
            [checker, "-s", "sh", str(script)], capture_output=True, text=True, check=False
        )
        assert result.returncode == 0, result.stdout


def run_datafs(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "EDGEKMS_DATAFS_DEVICE": str(tmp_path / "none")}
    return subprocess.run(
        ["sh", str(FILES / "edgekms-datafs"), *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=30,
        check=False,
    )


def test_datafs_refuses_without_its_partition(tmp_path: Path) -> None:
    """Without the partition nothing is mounted or formatted: distinct exit codes."""
    assert run_datafs(tmp_path, "status").stdout.strip() == "missing"
    opened = run_datafs(tmp_path, "open")
    assert opened.returncode == 2 and "no data partition" in opened.stderr
    formatted = run_datafs(tmp_path, "format")
    assert formatted.returncode == 2 and "no data partition" in formatted.stderr
    assert run_datafs(tmp_path, "bogus").returncode == 64
    assert not (tmp_path / "none").exists()


def test_provisioning_owns_the_console_until_initialized() -> None:
    unit = read_unit("edgekms-provision.service")
    assert unit["Unit"]["ConditionPathExists"] == "!@LOCALSTATEDIR@/lib/edgekms/init/.initialized"
    assert unit["Service"]["StandardInput"] == "tty"
    assert unit["Service"]["TTYPath"] == "/dev/console"
    init = read_unit("edgekms-init.service")["Service"]
    assert init["ExecStartPost"].endswith("@LOCALSTATEDIR@/lib/edgekms/init/.initialized")
    script = (FILES / "edgekms-provision").read_text()
    # PINs come from no-echo prompts, never argv; the admin key leaves the board.
    assert "--pin" not in script and "--so-pin" not in script
    assert "systemd-ask-password" in script
    assert 'rm -f "$STATE/init/client/admin.key"' in script


def test_dk_boards_get_a_tpm_node() -> None:
    linux = LAYER / "dynamic-layers" / "stm-st-stm32mp" / "recipes-kernel" / "linux"
    dtsi = (linux / "linux-stm32mp" / "stm32mp15xx-dkx-edgekms-tpm.dtsi").read_text()
    assert '"tcg,tpm_tis-spi"' in dtsi and 'status = "okay"' in dtsi
    append = (linux / "linux-stm32mp_%.bbappend").read_text()
    assert "file://stm32mp15xx-dkx-edgekms-tpm.dtsi" in append
    assert '#include "stm32mp15xx-dkx-edgekms-tpm.dtsi"' in append
    fragment = (linux / "linux-stm32mp" / "edgekms.config").read_text()
    assert "CONFIG_TCG_TIS_SPI=y" in fragment


def role_argv(name: str, credentials: Path) -> list[str]:
    """The unit's ExecStart as the board runs it: the recipe's paths, `%d` its
    credentials directory."""
    service = read_unit(name)["Service"]
    line = (
        service["ExecStart"]
        .replace("@BINDIR@", "/usr/bin")
        .replace("@LOCALSTATEDIR@", "/var")
        .replace("@LIBDIR@", "/usr/lib")
        .replace("%d", str(credentials))
    )
    return shlex.split(line)


@pytest.mark.parametrize("name", sorted(ROLE_UNITS))
def test_role_unit_runs_kmsctl_up_on_the_boards_token(
    name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each role unit's command is one `kmsctl up` passes, on OP-TEE's token as the
    per-service hsm0 opens it (module, label), its PIN a credential of the unit, never
    on the command line; the bundle or uplink where docs/cluster.md says."""
    from mgmt.cli.stack import (
        UpOptions,
        _audit_limits,
        _external_token,
        _fleet_copy_limit,
        _max_file_store,
        up,
    )

    unit = read_unit(name)
    service = unit["Service"]
    text = (FILES / name).read_text()
    option, data_dir = ROLE_UNITS[name]
    credentials = tmp_path / "credentials"
    credentials.mkdir()
    (credentials / "hsm0-pin").write_text("123456\n")
    (credentials / "hsm0-pin").chmod(0o440)  # root's, the unit's user let in by an ACL
    (credentials / "uplink.toml").write_text("")
    module = tmp_path / "libckteec.so.0"
    module.write_bytes(b"")
    argv = role_argv(name, credentials)
    assert argv[:2] == ["/usr/bin/kmsctl", "up"]
    assert argv[argv.index("--data-dir") + 1] == data_dir
    hsm = tomllib.loads((ROOT / "deploy" / "crypto-hsm0.toml").read_text())["pkcs11"]
    assert argv[argv.index("--pkcs11-module") + 1] == hsm["module"]
    assert argv[argv.index("--pkcs11-token-label") + 1] == hsm["token_label"]
    assert "TOKEN_LABEL=" + hsm["token_label"] in (FILES / "edgekms-provision").read_text()
    assert argv[argv.index("--pkcs11-pin-file") + 1] == f"{credentials}/hsm0-pin"
    assert "LoadCredential=hsm0-pin:@LOCALSTATEDIR@/lib/edgekms/secrets/hsm0.pin" in text
    if option == "--join":
        assert argv[argv.index("--join") + 1] == "/var/lib/edgekms/bundle"
        argv[argv.index("--join") + 1] = str(tmp_path)
    if option == "--uplink":
        assert argv[argv.index("--uplink") + 1] == f"{credentials}/uplink.toml"
        assert "LoadCredential=uplink.toml:@LOCALSTATEDIR@/lib/edgekms/uplink.toml" in text
    argv[argv.index("--pkcs11-module") + 1] = str(module)
    with up.make_context("up", argv[2:]) as ctx:
        options = UpOptions(**ctx.params)
        # The checks `kmsctl up` makes before it starts anything, as the unit runs them.
        monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(credentials))
        token = _external_token(options)
        assert token is not None and token.label == "edgekms"
        _audit_limits(options.audit_limits)
        _max_file_store(options.max_file_store)
        _fleet_copy_limit(options.fleet_copy_limit, options.leaf_listen)
    assert service["User"] == "edgekms-node"
    assert "teeclnt" in service["SupplementaryGroups"].split()
    assert service["DeviceAllow"] == "/dev/tee0 rw" and service["DevicePolicy"] == "closed"
    assert service["KillSignal"] == "SIGINT" and service["Restart"] == "on-failure"
    assert data_dir.removeprefix("/var/lib/") in service["StateDirectory"].split()
    conflicts = set(unit["Unit"]["Conflicts"].split())
    assert PER_SERVICE | (set(ROLE_UNITS) - {name}) == conflicts
    assert "edgekms-datafs.service" in unit["Unit"]["Requires"]
    assert "tee-supplicant@teepriv0.service" in unit["Unit"]["After"]
    assert unit["Install"]["WantedBy"] == "multi-user.target"


def test_role_units_ship_disabled_in_their_own_package() -> None:
    recipe = bb_assignments(RECIPE)
    assert set(recipe["SYSTEMD_SERVICE:${PN}-node"].split()) == set(ROLE_UNITS)
    assert recipe["SYSTEMD_AUTO_ENABLE:${PN}-node"] == "disable"
    assert "--groups teeclnt edgekms-node" in recipe["USERADD_PARAM:${PN}-node"]
    assert {"nats-server", "optee-client", "python3-pkcs11"} <= set(
        recipe["RDEPENDS:${PN}-node"].split()
    )
    # @LIBDIR@ (libckteec's directory) is substituted in the installed units.
    assert "-e 's,@LIBDIR@,${libdir},g'" in RECIPE.read_text()
    services = recipe["EDGEKMS_SERVICES"].split()
    for unit in ROLE_UNITS:
        assert unit.removesuffix(".service").removeprefix("edgekms-") in services
    image = IMAGE.read_text()
    assert 'EDGEKMS_ROLE ??= ""' in image and "edgekms_role;" in image
    # A role masks the per-service units and enables its own (the root is read-only).
    for unit in PER_SERVICE:
        assert unit.removesuffix(".service") in image
    script = (FILES / "edgekms-provision").read_text()
    assert 'is-enabled --quiet "edgekms-$unit.service"' in script
    assert "for unit in node fleet-hub fleet-device; do" in script
    assert 'cp -r "$USB_MNT/edgekms-bundle/." "$STATE/bundle/"' in script
    assert 'mv "$STATE/uplink.toml.tmp" "$STATE/uplink.toml"' in script
    assert 'cp -r "$USB_MNT/edgekms-hub/." "$data/"' in script


def _limits(argv: list[str]) -> dict[str, int]:
    from edgekms.audit import parse_size

    out = {}
    for at, arg in enumerate(argv):
        if arg == "--audit-limit":
            writer, _, size = argv[at + 1].partition("=")
            out[writer] = parse_size(size.partition("/")[0])
    return out


@pytest.mark.parametrize("name", sorted(ROLE_UNITS))
def test_role_unit_store_holds_its_streams(name: str, tmp_path: Path) -> None:
    """As the per-service board (test_data_partition_holds_the_audit_streams_reservation):
    JetStream refuses a stream it cannot reserve, so every stream the role makes has a
    limit, and they fit the store's cap, which fits the partition. A node reserves a copy
    of every node's crypto stream (crypto-*: five nodes), a hub one copy per device (four
    devices at least)."""
    from edgekms.audit import parse_size
    from tests.deploy.boardsizing import KV_BUCKETS, OTHER_FILES, board_sizing

    argv = role_argv(name, tmp_path)
    cap = parse_size(argv[argv.index("--max-file-store") + 1])
    limits = _limits(argv)
    option = ROLE_UNITS[name][0]
    writers = {"broker", "crypto-*"} | ({"ca"} if option != "--uplink" else set())
    assert set(limits) == writers, limits
    reserved = limits["broker"] + limits.get("ca", 0)
    if option == "--join":
        reserved += 5 * limits["crypto-*"]
    elif option == "--leaf-listen":
        copy = parse_size(argv[argv.index("--fleet-copy-limit") + 1])
        reserved += limits["crypto-*"] + 4 * copy
    else:
        reserved += limits["crypto-*"]
    assert reserved + KV_BUCKETS <= cap, (reserved, cap)
    assert cap + OTHER_FILES <= board_sizing().usable
