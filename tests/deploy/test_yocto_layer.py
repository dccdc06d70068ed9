"""Checks on meta-edgekms that need no bitbake: oelint-adv over every recipe and
append, layer.conf's fields, one systemd unit per service with the right user,
restart policy and device groups, the image's contents, and the kas pins."""

from __future__ import annotations

import configparser
import re
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
TARGET_ONLY = {"edgekms_0.1.0.bb", "edgekms-firewall_1.0.bb"}

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
    assert {"core", "openembedded-layer", "meta-python", "tpm-layer"} <= depends
    assert "recipes-*/*/*.bb" in conf["BBFILES"]


def read_unit(name: str) -> configparser.ConfigParser:
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.optionxform = str  # type: ignore[assignment,method-assign]
    unit.read_string((FILES / name).read_text())
    return unit


def test_every_service_package_has_its_unit() -> None:
    recipe = bb_assignments(RECIPE)
    packages = recipe["SYSTEMD_PACKAGES"].split()
    units = {recipe[f"SYSTEMD_SERVICE:{pkg}"] for pkg in packages}
    assert set(SERVICES) | {"edgekms-init.service", "edgekms-setup.service"} == units
    src_uri = recipe["SRC_URI"]
    for unit in units:
        assert (FILES / unit).is_file(), unit
        assert f"file://{unit}" in src_uri
        pkg = next(p for p in packages if recipe[f"SYSTEMD_SERVICE:{p}"] == unit)
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
    assert kas["distro"] == "edgekms" and kas["target"] == "edgekms-image"
    assert (LAYER / "conf" / "distro" / "edgekms.conf").is_file()
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
