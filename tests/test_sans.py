"""edgekms.sans: the one SAN -> "kind:value" helper, and each caller's behaviour from
before the four copies became one (pinned with the same names, so a change of spelling
in any caller shows up here: the broker's admission checks decide what is refused by
these strings)."""

from __future__ import annotations

import ipaddress

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from agent.certs import _names as agent_names
from broker.device_certs import _names as device_cert_names
from broker.enrollment import _csr_names
from ca_service.profiles import san_strings as profile_san_strings

OTHER_OID = x509.ObjectIdentifier("1.3.6.1.4.1.311.20.2.3")
NAMES: list[x509.GeneralName] = [
    x509.DNSName("NAS.Home.ARPA"),
    x509.IPAddress(ipaddress.ip_address("192.168.1.10")),
    x509.IPAddress(ipaddress.ip_address("fd00::1")),
    x509.RFC822Name("Ops@Home.arpa"),
    x509.UniformResourceIdentifier("spiffe://home.arpa/Dev"),
    x509.RegisteredID(x509.ObjectIdentifier("1.2.3.4")),
    x509.DirectoryName(x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "dir")])),
    x509.OtherName(OTHER_OID, b"\x0c\x03abc"),
]
KEY = ec.generate_private_key(ec.SECP256R1())


def _csr() -> x509.CertificateSigningRequest:
    return (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "nas")]))
        .add_extension(x509.SubjectAlternativeName(NAMES), critical=False)
        .sign(KEY, hashes.SHA256())
    )


def _cert() -> x509.Certificate:
    import datetime

    now = datetime.datetime.now(datetime.UTC)
    name = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "nas")])
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(KEY.public_key())
        .serial_number(1)
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName(NAMES), critical=False)
        .sign(KEY, hashes.SHA256())
    )


def test_the_ca_profiles_spelling_keeps_case_and_reprs_unknown_types() -> None:
    assert profile_san_strings(x509.SubjectAlternativeName(NAMES)) == [
        "dns:NAS.Home.ARPA",
        "ip:192.168.1.10",
        "ip:fd00::1",
        "email:Ops@Home.arpa",
        "uri:spiffe://home.arpa/Dev",
        f"other:{NAMES[5]!r}",
        f"other:{NAMES[6]!r}",
        f"other:{NAMES[7]!r}",
    ]


def test_the_agent_compares_the_four_known_kinds_and_drops_the_rest() -> None:
    cn, sans = agent_names(_cert())
    assert cn == "nas"
    assert sans == {
        "dns:NAS.Home.ARPA",
        "ip:192.168.1.10",
        "ip:fd00::1",
        "email:Ops@Home.arpa",
        "uri:spiffe://home.arpa/Dev",
    }


def test_enrollment_lowers_dns_and_tags_everything_else_but_ip_other() -> None:
    cns, sans = _csr_names(_csr())
    assert cns == ["nas"]
    assert sans == [
        "dns:nas.home.arpa",
        "ip:192.168.1.10",
        "ip:fd00::1",
        "other:Ops@Home.arpa",
        "other:spiffe://home.arpa/Dev",
        f"other:{NAMES[5].value}",
        f"other:{NAMES[6].value}",
        f"other:{NAMES[7].value}",
    ]


def test_device_certs_lower_dns_and_tag_everything_else_with_its_type() -> None:
    attributes, sans = device_cert_names(_csr())
    assert attributes == [(x509.NameOID.COMMON_NAME, "nas")]
    assert sans == [
        "dns:nas.home.arpa",
        "ip:192.168.1.10",
        "ip:fd00::1",
        "RFC822Name:Ops@Home.arpa",
        "UniformResourceIdentifier:spiffe://home.arpa/Dev",
        f"RegisteredID:{NAMES[5].value}",
        f"DirectoryName:{NAMES[6].value}",
        f"OtherName:{NAMES[7].value}",
    ]


def test_no_caller_ever_lets_an_email_or_uri_pass_as_a_dns_name() -> None:
    """What the broker's admission checks rely on: only dns:/ip: strings can equal a
    recorded name, whatever else a CSR carries."""
    for sans in (_csr_names(_csr())[1], device_cert_names(_csr())[1]):
        assert [s for s in sans if s.startswith(("dns:", "ip:"))] == [
            "dns:nas.home.arpa",
            "ip:192.168.1.10",
            "ip:fd00::1",
        ]


def test_the_helper_spells_each_parameter_as_documented() -> None:
    from edgekms.sans import ADDRESS_KINDS, dropped, san_strings, type_and_value

    assert san_strings(NAMES[:2], lower_dns=True) == ["dns:nas.home.arpa", "ip:192.168.1.10"]
    assert san_strings(NAMES, other=dropped) == [
        "dns:NAS.Home.ARPA",
        "ip:192.168.1.10",
        "ip:fd00::1",
        "email:Ops@Home.arpa",
        "uri:spiffe://home.arpa/Dev",
    ]
    assert san_strings(NAMES[3:5], kinds=ADDRESS_KINDS, other=type_and_value) == [
        "RFC822Name:Ops@Home.arpa",
        "UniformResourceIdentifier:spiffe://home.arpa/Dev",
    ]
    assert san_strings([]) == []
