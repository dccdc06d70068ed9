"""The agent's TOML file: what loads, and every refusal typed, naming the key (pure)."""

from __future__ import annotations

import datetime
from pathlib import Path

import pytest

from agent.config import REASON, load_config, parse_config
from edgekms.errors import InvalidArgument

CERT = (
    '[[cert]]\nname = "web"\nprofile = "https-server"\ncommon_name = "nas.home.arpa"\n'
    'sans = ["dns:nas.home.arpa", "ip:192.168.1.10"]\ncert = "tls/nas.crt"\nkey = "tls/nas.key"\n'
)
TOP = 'client_config = "client/config.toml"\n'


def parse(text: str) -> object:
    return parse_config(text, Path("/etc/edgekms/agent.toml"))


def refusal(text: str) -> InvalidArgument:
    with pytest.raises(InvalidArgument) as caught:
        parse(text)
    assert caught.value.reason == REASON
    return caught.value


def test_a_full_config_loads_with_paths_beside_the_file() -> None:
    config = parse_config(
        TOP
        + "renew_at = 0.5\nretry_initial_seconds = 2\n"
        + CERT
        + 'ttl = "12h"\nfullchain = true\nkey_mode = "0640"\ngroup = "www-data"\n'
        'exec = "systemctl reload nginx"\n'
        '[[crl]]\nname = "vpn-crl"\npath = "/etc/openvpn/crl.pem"\n'
        'exec = ["/usr/bin/systemctl", "reload", "openvpn-server@server"]\n',
        Path("/etc/edgekms/agent.toml"),
    )
    assert config.client_config == Path("/etc/edgekms/client/config.toml")
    assert config.state_file == Path("/etc/edgekms/agent-state.json")
    (web,) = config.certs
    assert web.cert == Path("/etc/edgekms/tls/nas.crt")
    assert web.ttl == datetime.timedelta(hours=12)
    assert web.renew_at == 0.5  # the file's default reaches every item
    assert web.key_mode == 0o640 and web.owner.group == "www-data"
    assert web.exec == ("systemctl", "reload", "nginx")  # split, never a shell
    (crl,) = config.crls
    assert crl.format == "pem" and crl.exec[0] == "/usr/bin/systemctl"
    assert [i.name for i in config.items] == ["web", "vpn-crl"]


def test_defaults_are_two_thirds_and_0600() -> None:
    (web,) = parse_config(TOP + CERT, Path("/a/agent.toml")).certs
    assert abs(web.renew_at - 2 / 3) < 1e-9
    assert web.key_mode == 0o600 and web.cert_mode == 0o644 and web.key_type == "ec-p256"


@pytest.mark.parametrize(
    ("text", "key"),
    [
        (TOP + CERT + 'key_mode = "0644"\n', "cert[0].key_mode"),
        (TOP + CERT + 'key_mode = "0660"\n', "cert[0].key_mode"),
        (TOP + CERT + 'cert_mode = "rw-r--r--"\n', "cert[0].cert_mode"),
        (TOP + CERT + 'colour = "blue"\n', "cert[0].colour"),
        (TOP + CERT + 'ttl = "1m"\n', "cert[0].ttl"),
        (TOP + CERT + 'key_type = "dsa-1024"\n', "cert[0].key_type"),
        (TOP + CERT + 'sans2 = []\n', "cert[0].sans2"),
        (TOP + CERT.replace('"dns:nas.home.arpa"', '"nas.home.arpa"'), "cert[0].sans"),
        (TOP + CERT + CERT, "cert[1].name"),
        (TOP + CERT.replace('name = "web"', 'name = "Web Server"'), "cert[0].name"),
        (TOP + CERT + "renew_at = 1.5\n", "cert[0].renew_at"),
        (TOP + CERT + 'exec = "reload \'nginx"\n', "cert[0].exec"),
        (TOP + CERT + "exec = []\n", "cert[0].exec"),
        (TOP + CERT + "exec = 5\n", "cert[0].exec"),
        (TOP + CERT + 'owner = "root; rm -rf /"\n', "cert[0].owner"),
        (TOP + CERT.replace('key = "tls/nas.key"', 'key = "tls/nas.crt"'), "cert[0].key"),
        (
            TOP + CERT + '[[crl]]\nname = "crl"\npath = "tls/nas.key"\n',
            "crl[0].path",
        ),
        (TOP + '[[crl]]\nname = "crl"\npath = "c.pem"\nformat = "txt"\n', "crl[0].format"),
        (CERT, "client_config"),
        (TOP, "cert"),
        (TOP + "retry_initial_seconds = 60\nretry_max_seconds = 10\n" + CERT, "retry_max_seconds"),
        (TOP + 'renew_at = "soon"\n' + CERT, "renew_at"),
        (TOP + "verbose = true\n" + CERT, "verbose"),
        (TOP + "cert = 5\n", "cert"),
    ],
    ids=[
        "key_mode_world", "key_mode_group_write", "mode_not_octal", "unknown_key", "ttl_short",
        "key_type", "unknown_sans2", "san_without_kind", "duplicate_name", "bad_name",
        "renew_at_range", "exec_unsplittable", "exec_empty", "exec_not_text", "owner_bad",
        "key_is_cert", "same_file_twice", "crl_format", "no_client_config", "nothing_to_keep",
        "retry_order", "renew_at_type", "unknown_top", "cert_not_tables",
    ],
)  # fmt: skip
def test_refusals_name_the_key(text: str, key: str) -> None:
    err = refusal(text)
    assert err.details["key"] == key, err.message
    assert key in err.message


def test_toml_syntax_error_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "agent.toml"
    path.write_text(TOP + "[[cert]\nname = 1\n")
    with pytest.raises(InvalidArgument) as caught:
        load_config(path)
    assert caught.value.reason == REASON and "line 2" in caught.value.message


def test_missing_file_is_typed(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgument) as caught:
        load_config(tmp_path / "absent.toml")
    assert caught.value.reason == REASON and caught.value.details["file"].endswith("absent.toml")
