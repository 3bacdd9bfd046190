"""The IRSA issuer documents from a real RSA key made by openssl: the JWKS round-trips to the same public key, the
kid is kube-apiserver's, a signature made with the private key verifies against the published JWK, and the
documents land in (moto) S3 under exactly the two public keys as application/json."""

from __future__ import annotations

import base64
import hashlib
import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from node_agent.audit import api_server_audit
from node_agent.config import AgentConfig, AgentConfigError, AgentSettings
from node_agent.instance import InstanceIdentity
from node_agent.irsa import (
    DISCOVERY_KEY,
    IN_CLUSTER_ISSUER,
    JWKS_KEY,
    STS_AUDIENCE,
    IrsaError,
    IssuerPublisher,
    api_server_extra_args,
    discovery_document,
    jwks,
    read_public_key,
    with_extra_args,
)
from node_agent.kubeadm import init_configuration_yaml
from node_agent.runner import SubprocessRunner
from stages.config import IRSA_AUDIENCE, IRSA_DISCOVERY_KEY, IRSA_JWKS_KEY
from tests.agent.conftest import REGION, config_values

TOKEN = "abcdef.0123456789abcdef"
ISSUER = f"https://dk8s-demo-irsa-oidc-123456789012-{REGION}.s3.{REGION}.amazonaws.com"
BUCKET = f"dk8s-demo-irsa-oidc-123456789012-{REGION}"


def openssl(*args: str, data: bytes | None = None) -> bytes:
    return subprocess.run(["openssl", *args], input=data, capture_output=True, check=True, timeout=60).stdout


@pytest.fixture(scope="module")
def sa_key(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """kubeadm's service-account key pair: ``sa.key`` (RSA 2048) and ``sa.pub`` (PEM SubjectPublicKeyInfo)."""
    pki = tmp_path_factory.mktemp("pki")
    openssl("genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048", "-out", str(pki / "sa.key"))
    openssl("pkey", "-in", str(pki / "sa.key"), "-pubout", "-out", str(pki / "sa.pub"))
    return pki / "sa.key", pki / "sa.pub"


def b64url_decode(text: str) -> bytes:
    assert "=" not in text and "+" not in text and "/" not in text
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def der_length(n: int) -> bytes:
    if n < 0x80:
        return bytes([n])
    body = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([0x80 | len(body)]) + body


def der(tag: int, body: bytes) -> bytes:
    return bytes([tag]) + der_length(len(body)) + body


def der_integer(value: int) -> bytes:
    body = value.to_bytes(value.bit_length() // 8 + 1, "big")  # one spare octet keeps the sign bit clear
    while len(body) > 1 and body[0] == 0 and body[1] < 0x80:
        body = body[1:]
    return der(0x02, body)


def spki_from_jwk(jwk: dict[str, str]) -> bytes:
    """Rebuild the DER SubjectPublicKeyInfo from a JWK's n and e (independently of the code under test)."""
    n, e = (int.from_bytes(b64url_decode(jwk[k]), "big") for k in ("n", "e"))
    rsa_encryption = der(0x30, der(0x06, bytes.fromhex("2a864886f70d010101")) + der(0x05, b""))
    public_key = der(0x30, der_integer(n) + der_integer(e))
    return der(0x30, rsa_encryption + der(0x03, b"\x00" + public_key))


def test_the_jwk_round_trips_to_the_same_public_key_openssl_derives_from_the_private_key(
    sa_key: tuple[Path, Path], tmp_path: Path
) -> None:
    private, public = sa_key
    (jwk,) = jwks(read_public_key(SubprocessRunner(), public))["keys"]
    assert (jwk["kty"], jwk["alg"], jwk["use"], jwk["e"]) == ("RSA", "RS256", "sig", "AQAB")
    # n against openssl's modulus of the *private* key file (a different input than the one parsed).
    modulus = openssl("rsa", "-in", str(private), "-noout", "-modulus").decode().strip().removeprefix("Modulus=")
    assert int.from_bytes(b64url_decode(jwk["n"]), "big") == int(modulus, 16)
    assert len(b64url_decode(jwk["n"])) == 256  # minimal big-endian octets, no leading zero
    # The key rebuilt from n/e alone is byte-for-byte the DER public key openssl writes.
    expected_der = openssl("pkey", "-in", str(private), "-pubout", "-outform", "DER")
    assert spki_from_jwk(jwk) == expected_der


def test_a_signature_by_the_service_account_key_verifies_against_the_published_jwk(
    sa_key: tuple[Path, Path], tmp_path: Path
) -> None:
    """What STS does with a pod token: RS256 over the signing input, checked with the JWKS key."""
    private, public = sa_key
    (jwk,) = jwks(read_public_key(SubprocessRunner(), public))["keys"]
    rebuilt = tmp_path / "from-jwks.der"
    rebuilt.write_bytes(spki_from_jwk(jwk))
    signing_input = tmp_path / "token"
    signing_input.write_bytes(b"eyJhbGciOiJSUzI1NiJ9.eyJhdWQiOlsic3RzLmFtYXpvbmF3cy5jb20iXX0")
    signature = tmp_path / "signature"
    openssl("dgst", "-sha256", "-sign", str(private), "-out", str(signature), str(signing_input))
    verified = openssl("dgst", "-sha256", "-verify", str(rebuilt), "-keyform", "DER", "-signature",
                       str(signature), str(signing_input))  # fmt: skip
    assert verified.strip() == b"Verified OK"
    other = tmp_path / "other.key"
    openssl("genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048", "-out", str(other))
    openssl("dgst", "-sha256", "-sign", str(other), "-out", str(signature), str(signing_input))
    refused = subprocess.run(
        ["openssl", "dgst", "-sha256", "-verify", str(rebuilt), "-keyform", "DER", "-signature", str(signature),
         str(signing_input)],
        capture_output=True, check=False, timeout=60,
    )  # fmt: skip
    assert refused.returncode != 0 and b"Verified OK" not in refused.stdout


def test_the_kid_is_base64url_of_the_sha256_of_the_der_subject_public_key_info(sa_key: tuple[Path, Path]) -> None:
    private, public = sa_key
    key = read_public_key(SubprocessRunner(), public)
    spki = openssl("pkey", "-in", str(private), "-pubout", "-outform", "DER")
    digest = hashlib.sha256(spki).digest()
    assert key.jwk()["kid"] == base64.urlsafe_b64encode(digest).decode().rstrip("=")
    assert len(key.jwk()["kid"]) == 43 and b64url_decode(key.jwk()["kid"]) == digest


def test_a_pkcs1_public_key_gives_the_same_jwk_and_a_non_rsa_key_is_refused(
    sa_key: tuple[Path, Path], tmp_path: Path
) -> None:
    private, public = sa_key
    pkcs1 = tmp_path / "sa.pkcs1.pub"
    openssl("rsa", "-in", str(private), "-RSAPublicKey_out", "-out", str(pkcs1))
    assert pkcs1.read_text().startswith("-----BEGIN RSA PUBLIC KEY-----")
    runner = SubprocessRunner()
    assert read_public_key(runner, pkcs1).jwk() == read_public_key(runner, public).jwk()
    ec_key, ec_pub = tmp_path / "ec.key", tmp_path / "ec.pub"
    openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", str(ec_key))
    openssl("pkey", "-in", str(ec_key), "-pubout", "-out", str(ec_pub))
    with pytest.raises(IrsaError, match="not an RSA public key"):
        read_public_key(runner, ec_pub)
    garbage = tmp_path / "garbage.pub"
    garbage.write_text("not a key\n")
    with pytest.raises(IrsaError, match="not a public key"):
        read_public_key(runner, garbage)


def test_the_documents_are_published_under_exactly_the_two_keys_as_json(
    aws: dict[str, Any], sa_key: tuple[Path, Path]
) -> None:
    s3 = aws["s3"]
    s3.create_bucket(Bucket=BUCKET, CreateBucketConfiguration={"LocationConstraint": REGION})
    _, public = sa_key
    publisher = IssuerPublisher(runner=SubprocessRunner(), s3=s3, bucket=BUCKET, issuer_url=ISSUER)
    written = publisher.publish(public)
    publisher.publish(public)  # idempotent: a second init attempt overwrites with the same bytes
    listed = s3.list_objects_v2(Bucket=BUCKET)["Contents"]
    assert (
        sorted(o["Key"] for o in listed)
        == sorted([DISCOVERY_KEY, JWKS_KEY])
        == [
            ".well-known/openid-configuration",
            "keys.json",
        ]
    )
    bodies = {}
    for name in (DISCOVERY_KEY, JWKS_KEY):
        obj = s3.get_object(Bucket=BUCKET, Key=name)
        assert obj["ContentType"] == "application/json"
        bodies[name] = obj["Body"].read()
        assert bodies[name] == written[name]
    discovery = json.loads(bodies[DISCOVERY_KEY])
    assert discovery == {
        "issuer": ISSUER,
        "jwks_uri": f"{ISSUER}/keys.json",
        "response_types_supported": ["id_token"],
        "subject_types_supported": ["public"],
        "id_token_signing_alg_values_supported": ["RS256"],
    }
    assert discovery == discovery_document(ISSUER)
    assert json.loads(bodies[JWKS_KEY]) == jwks(read_public_key(SubprocessRunner(), public))


def test_a_failed_upload_names_the_object(sa_key: tuple[Path, Path], aws: dict[str, Any]) -> None:
    publisher = IssuerPublisher(runner=SubprocessRunner(), s3=aws["s3"], bucket="no-such-bucket", issuer_url=ISSUER)
    with pytest.raises(IrsaError, match=r"s3://no-such-bucket/\.well-known/openid-configuration"):
        publisher.publish(sa_key[1])


def test_the_api_server_signs_with_the_issuer_still_accepts_kubeadms_and_keeps_the_in_cluster_audience() -> None:
    args = api_server_extra_args(ISSUER)
    assert args == [
        {"name": "service-account-issuer", "value": ISSUER},  # first: signs every new token
        {"name": "service-account-issuer", "value": "https://kubernetes.default.svc.cluster.local"},
        {"name": "service-account-jwks-uri", "value": f"{ISSUER}/keys.json"},
        {"name": "api-audiences", "value": IN_CLUSTER_ISSUER},
    ]
    assert all(STS_AUDIENCE not in a["value"] for a in args if a["name"] == "api-audiences")
    assert api_server_extra_args("") == []


def test_the_irsa_args_are_appended_to_the_audit_args_never_replacing_them(tmp_path: Path) -> None:
    audit = api_server_audit(tmp_path)
    merged = with_extra_args({"certSANs": ["x"], **audit}, api_server_extra_args(ISSUER))
    assert merged["extraArgs"] == [*audit["extraArgs"], *api_server_extra_args(ISSUER)]
    assert merged["extraVolumes"] == audit["extraVolumes"] and merged["certSANs"] == ["x"]
    assert with_extra_args({"certSANs": ["x"], **audit}, api_server_extra_args("")) == {"certSANs": ["x"], **audit}
    assert with_extra_args({}, api_server_extra_args(ISSUER))["extraArgs"] == api_server_extra_args(ISSUER)


def test_the_agent_and_the_stacks_agree_on_the_two_keys_and_the_audience() -> None:
    assert (DISCOVERY_KEY, JWKS_KEY, STS_AUDIENCE) == (IRSA_DISCOVERY_KEY, IRSA_JWKS_KEY, IRSA_AUDIENCE)


# ---- the agent configuration and the kubeadm ClusterConfiguration -------------------------------------------


def test_the_agent_config_takes_the_issuer_and_bucket_together_or_neither() -> None:
    off = AgentConfig.from_mapping(config_values())
    assert (off.irsa_enabled, off.irsa_issuer_url, off.irsa_bucket) == (False, "", "")
    assert not AgentConfig.from_mapping(config_values(irsaIssuerUrl="", irsaBucket="")).irsa_enabled
    on = AgentConfig.from_mapping(config_values(irsaIssuerUrl=ISSUER, irsaBucket=BUCKET))
    assert (on.irsa_enabled, on.irsa_issuer_url, on.irsa_bucket) == (True, ISSUER, BUCKET)
    for overrides, named in (
        ({"irsaIssuerUrl": ISSUER}, "'irsaBucket': missing"),
        ({"irsaBucket": BUCKET}, "'irsaIssuerUrl': missing"),
        ({"irsaIssuerUrl": ISSUER + "/", "irsaBucket": BUCKET}, "'irsaIssuerUrl'"),
        ({"irsaIssuerUrl": ISSUER.replace("https", "http"), "irsaBucket": BUCKET}, "'irsaIssuerUrl'"),
        ({"irsaIssuerUrl": ISSUER, "irsaBucket": "Not_A_Bucket"}, "'irsaBucket'"),
    ):
        with pytest.raises(AgentConfigError) as err:
            AgentConfig.from_mapping(config_values(**overrides))
        assert named in str(err.value)


def test_kubeadm_init_configures_the_issuer_after_the_audit_args_only_when_irsa_is_on(tmp_path: Path) -> None:
    ident = InstanceIdentity(instance_id="i-0abc1234def567890", private_ip="10.0.1.23", region=REGION)
    settings = AgentSettings(kubernetes_dir=tmp_path)
    audit = api_server_audit(tmp_path)

    def api_server(**overrides: Any) -> dict[str, Any]:
        text = init_configuration_yaml(AgentConfig.from_mapping(config_values(**overrides)), ident, settings, TOKEN)
        (cluster,) = [d for d in yaml.safe_load_all(text) if d and d["kind"] == "ClusterConfiguration"]
        return dict(cluster["apiServer"])

    on = api_server(irsaIssuerUrl=ISSUER, irsaBucket=BUCKET)
    text = init_configuration_yaml(AgentConfig.from_mapping(config_values()), ident, settings, TOKEN)
    (cluster,) = [d for d in yaml.safe_load_all(text) if d and d["kind"] == "ClusterConfiguration"]
    assert cluster["encryptionAlgorithm"] == "RSA-2048", "the service-account key stays RSA (the JWKS is RS256)"
    assert on["extraArgs"] == [*audit["extraArgs"], *api_server_extra_args(ISSUER)]
    issuers = [a["value"] for a in on["extraArgs"] if a["name"] == "service-account-issuer"]
    assert issuers == [ISSUER, IN_CLUSTER_ISSUER]
    assert on["extraVolumes"] == audit["extraVolumes"] and "10.0.1.23" in on["certSANs"]
    off = api_server()
    assert off["extraArgs"] == audit["extraArgs"]
    assert not any(a["name"].startswith(("service-account", "api-audiences")) for a in off["extraArgs"])
