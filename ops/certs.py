"""`noprop-certs`: development TLS certificates and SuperNode key pairs for a federation, and the checks the
launchers make on them before anything starts.

    noprop-certs DIR [--host NAME ...] [--clients N | --client NAME ...] [--days D] [--force]

writes (private keys 0600, every file atomically)

    DIR/ca.crt, DIR/ca.key          a development CA; clients trust ca.crt (noprop-client --root-certificate)
    DIR/server.crt, DIR/server.key  the SuperLink's certificate, signed by the CA; its names (SANs) are every
                                    --host plus localhost, 127.0.0.1 and ::1 (noprop-server --certificates DIR)
    DIR/clients/NAME, NAME.pub      a SuperNode key pair per client (NIST P-384, OpenSSH format, as Flower's
                                    node authentication wants): noprop-client --key DIR/clients/NAME, and
                                    noprop-server --authorized-keys DIR/clients registers every *.pub

A CA already in DIR is never replaced without --force (certificates it signed would stop being trusted).
For production, use certificates from your own CA: noprop-server only needs the three files named above.
"""

from __future__ import annotations

import argparse
import base64
import datetime as dt
import hashlib
import ipaddress
import re
import socket
import ssl
import sys
from collections.abc import Sequence
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from noprop.io import atomic_write
from noprop.ops.cli import LaunchError, OneLineParser, examples, fail
from noprop.ops.network import format_address

PROG = "noprop-certs"
CA_CERT, CA_KEY = "ca.crt", "ca.key"
SERVER_CERT, SERVER_KEY = "server.crt", "server.key"
CLIENTS_DIR = "clients"
LOOPBACK_SANS = ("localhost", "127.0.0.1", "::1")
TLS_CURVE = ec.SECP256R1()  # certificates: P-256 ECDSA, which gRPC, OpenSSL and browsers all accept
NODE_CURVE = ec.SECP384R1()  # node keys: the curve Flower's documentation uses (any NIST curve is accepted)
NIST_CURVES = ("secp256r1", "secp384r1", "secp521r1")
SECRET_MODE, PUBLIC_MODE = 0o600, 0o644
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


# ----------------------------------------------------------------------------------------------------------
# Making them


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "noprop-fl development"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def san_entry(host: str) -> x509.GeneralName:
    """An IP address SAN for an address, a DNS name SAN for anything else (checked to be a plausible name)."""
    host = host.strip().strip("[]")
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        pass
    labels = host.rstrip(".").split(".")
    if not host or not host.isascii() or not all(re.fullmatch(r"(\*|[A-Za-z0-9_]([A-Za-z0-9_-]*[A-Za-z0-9_])?)", x)
                                                 for x in labels):
        raise LaunchError(f"--host {host!r} is neither an IP address nor a DNS name (letters, digits, '-', '.')")
    return x509.DNSName(host.rstrip("."))


def server_names(hosts: Sequence[str]) -> list[str]:
    """--host values plus the loopback names, each once, in order."""
    names: list[str] = []
    for host in (*hosts, *LOOPBACK_SANS):
        host = host.strip().strip("[]")
        if host not in names:
            names.append(host)
    return names


def make_ca(days: int) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(TLS_CURVE)
    now = dt.datetime.now(dt.UTC)
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (x509.CertificateBuilder()
            .subject_name(_name("noprop-fl development CA")).issuer_name(_name("noprop-fl development CA"))
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                         crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(ski, critical=False)
            .sign(key, hashes.SHA256()))
    return key, cert


def make_server_certificate(ca_key: ec.EllipticCurvePrivateKey, ca_cert: x509.Certificate, hosts: Sequence[str],
                            days: int) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    names = server_names(hosts)
    key = ec.generate_private_key(TLS_CURVE)
    now = dt.datetime.now(dt.UTC)
    ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    cert = (x509.CertificateBuilder()
            .subject_name(_name(names[0])).issuer_name(ca_cert.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.SubjectAlternativeName([san_entry(n) for n in names]), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False, key_cert_sign=False,
                                         crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False)
            .sign(ca_key, hashes.SHA256()))
    return key, cert


def make_node_key(name: str) -> tuple[bytes, bytes]:
    """(private key, public key) of one SuperNode, both in OpenSSH format; the public key's comment is its name."""
    key = ec.generate_private_key(NODE_CURVE)
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    return private, public + f" {name}\n".encode()


def client_names(clients: int | None, names: Sequence[str] | None) -> list[str]:
    if names:
        for name in names:
            if not NAME_RE.match(name):
                raise LaunchError(f"--client {name!r}: use letters, digits, '.', '_' and '-' (it becomes a file name)")
        if len(set(names)) != len(names):
            raise LaunchError("--client names repeat: give each client once")
        return list(names)
    if clients is not None and clients < 0:
        raise LaunchError(f"--clients {clients}: must be 0 or more")
    return [f"client{i}" for i in range(clients or 0)]


def write_bundle(out: Path, hosts: Sequence[str], clients: Sequence[str], days: int = 365,
                 force: bool = False) -> list[Path]:
    """Write the CA, the server certificate and the client key pairs into ``out``; returns the paths written."""
    if days < 1:
        raise LaunchError(f"--days {days}: must be 1 or more")
    for host in hosts:
        san_entry(host)
    if out.exists() and not out.is_dir():
        raise LaunchError(f"{out} exists and is not a folder: choose another DIR")
    if not force:
        existing = [out / n for n in (CA_CERT, CA_KEY) if (out / n).exists()]
        existing += [out / CLIENTS_DIR / n for n in clients if (out / CLIENTS_DIR / n).exists()]
        if existing:
            raise LaunchError(f"{existing[0]} exists: pass --force to replace it (whatever it signed or "
                              "authorized stops working), or choose another DIR")
    ca_key, ca_cert = make_ca(days)
    server_key, server_cert = make_server_certificate(ca_key, ca_cert, hosts, days)
    files: list[tuple[Path, bytes, int]] = [
        (out / CA_KEY, _pem_key(ca_key), SECRET_MODE),
        (out / CA_CERT, ca_cert.public_bytes(serialization.Encoding.PEM), PUBLIC_MODE),
        (out / SERVER_KEY, _pem_key(server_key), SECRET_MODE),
        (out / SERVER_CERT, server_cert.public_bytes(serialization.Encoding.PEM), PUBLIC_MODE),
    ]
    for name in clients:
        private, public = make_node_key(name)
        files += [(out / CLIENTS_DIR / name, private, SECRET_MODE), (out / CLIENTS_DIR / f"{name}.pub", public,
                                                                        PUBLIC_MODE)]
    try:
        for path, data, mode in files:
            atomic_write(path, lambda f, data=data: f.write(data), mode=mode)
    except OSError as exc:
        raise LaunchError(f"cannot write to {out}: {exc.strerror or exc}: give a DIR in a folder you can write to, "
                          "e.g. noprop-certs ./certs") from None
    return [path for path, _, _ in files]


# ----------------------------------------------------------------------------------------------------------
# Checking them (noprop-server --certificates / --authorized-keys, noprop-client --root-certificate / --key)


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise LaunchError(f"{what}: {path} does not exist (noprop-certs DIR makes it)") from None
    except IsADirectoryError:
        raise LaunchError(f"{what}: {path} is a folder, not a file") from None
    except OSError as exc:
        raise LaunchError(f"{what}: cannot read {path}: {exc.strerror or exc}") from None


def load_certificate(path: Path, what: str) -> x509.Certificate:
    try:
        cert = x509.load_pem_x509_certificate(_read(path, what))
    except ValueError:
        raise LaunchError(f"{what}: {path} is not a PEM certificate") from None
    now = dt.datetime.now(dt.UTC)
    if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
        raise LaunchError(f"{what}: {path} is valid only from {cert.not_valid_before_utc:%Y-%m-%d} to "
                          f"{cert.not_valid_after_utc:%Y-%m-%d}: make new certificates (noprop-certs)")
    return cert


def certificate_names(cert: x509.Certificate) -> list[str]:
    try:
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return [*sans.get_values_for_type(x509.DNSName), *(str(a) for a in sans.get_values_for_type(x509.IPAddress))]


def check_server_certificates(folder: str | Path) -> dict[str, Path]:
    """DIR/ca.crt, server.crt, server.key: readable, the key matches the certificate, the CA signed it, valid now,
    and it names localhost or 127.0.0.1 (the SuperLink's own processes connect to it there). Returns the paths."""
    folder = Path(folder).expanduser().resolve()
    what = "--certificates"
    if not folder.is_dir():
        raise LaunchError(f"{what} {folder} is not a folder: make one with noprop-certs {folder} --host NAME")
    paths = {"ca": folder / CA_CERT, "cert": folder / SERVER_CERT, "key": folder / SERVER_KEY}
    ca = load_certificate(paths["ca"], what)
    cert = load_certificate(paths["cert"], what)
    try:
        key = serialization.load_pem_private_key(_read(paths["key"], what), password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise LaunchError(f"{what}: {paths['key']} is not an unencrypted PEM private key") from None
    if key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo) \
            != cert.public_key().public_bytes(serialization.Encoding.DER,
                                              serialization.PublicFormat.SubjectPublicKeyInfo):
        raise LaunchError(f"{what}: {paths['key']} is not the key of {paths['cert']}")
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        raise LaunchError(f"{what}: {paths['cert']} is not signed by {paths['ca']}") from None
    if not {"localhost", "127.0.0.1", "::1"} & set(certificate_names(cert)):
        raise LaunchError(f"{what}: {paths['cert']} does not name localhost or 127.0.0.1, which the SuperLink's own "
                          "processes connect to: make it with noprop-certs")
    return paths


def load_node_public_key(path: Path, what: str) -> ec.EllipticCurvePublicKey:
    """An OpenSSH public key on a NIST curve (what Flower's node authentication accepts)."""
    try:
        key = serialization.load_ssh_public_key(_read(path, what).strip())
    except (ValueError, UnsupportedAlgorithm):
        raise LaunchError(f"{what}: {path} is not an OpenSSH public key") from None
    if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name not in NIST_CURVES:
        raise LaunchError(f"{what}: {path} is not an EC key on a NIST curve (P-256/384/521): make node keys with "
                          "noprop-certs or ssh-keygen -t ecdsa -b 384")
    return key


def key_fingerprint(path: Path) -> str:
    """``SHA256:...`` of an OpenSSH public key file (its comment ignored), as ssh-keygen -l prints it."""
    raw = load_node_public_key(path, "--authorized-keys").public_bytes(serialization.Encoding.OpenSSH,
                                                                       serialization.PublicFormat.OpenSSH)
    blob = base64.b64decode(raw.split()[1])
    return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")


def authorized_keys(folder: str | Path) -> list[Path]:
    """Every DIR/*.pub, each checked; at least one."""
    folder = Path(folder).expanduser().resolve()
    if not folder.is_dir():
        raise LaunchError(f"--authorized-keys {folder} is not a folder of *.pub files")
    keys = sorted(folder.glob("*.pub"))
    if not keys:
        raise LaunchError(f"--authorized-keys {folder} holds no *.pub file: make node keys with noprop-certs DIR "
                          "--clients N and pass DIR/clients")
    seen: dict[str, Path] = {}
    for path in keys:
        fingerprint = key_fingerprint(path)
        if fingerprint in seen:
            raise LaunchError(f"--authorized-keys: {path} and {seen[fingerprint]} hold the same key: remove one")
        seen[fingerprint] = path
    return keys


def check_node_key(private_path: str | Path) -> tuple[Path, Path]:
    """--key FILE: an OpenSSH EC private key and FILE.pub beside it, which must be its public key."""
    private_path = Path(private_path).expanduser().resolve()
    public_path = private_path.with_name(private_path.name + ".pub")
    try:
        key = serialization.load_ssh_private_key(_read(private_path, "--key"), password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise LaunchError(f"--key: {private_path} is not an unencrypted OpenSSH private key") from None
    public = load_node_public_key(public_path, "--key")
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.public_key() != public:
        raise LaunchError(f"--key: {public_path} is not the public key of {private_path}")
    return private_path, public_path


def check_root_certificate(path: str | Path) -> Path:
    path = Path(path).expanduser().resolve()
    load_certificate(path, "--root-certificate")
    return path


def tls_handshake(host: str, port: int, root_certificate: Path, timeout: float = 10.0) -> str | None:
    """None if the server at host:port completes a TLS handshake whose certificate ``root_certificate`` trusts
    for that host name; else why not, in a few words. gRPC (h2) is offered, as a SuperNode does."""
    context = ssl.create_default_context(cafile=str(root_certificate))
    context.set_alpn_protocols(["h2"])
    try:
        with socket.create_connection((host.strip("[]"), port), timeout=timeout) as sock, \
                context.wrap_socket(sock, server_hostname=host.strip("[]")):
            return None
    except ssl.SSLCertVerificationError as exc:
        return f"its certificate is not trusted: {exc.verify_message}"
    except ssl.SSLError as exc:
        return f"no TLS handshake ({exc.reason or exc}): does it run with --insecure?"
    except (ConnectionError, TimeoutError) as exc:
        return f"no TLS handshake ({exc.strerror or type(exc).__name__}): does it run with --insecure?"
    except OSError as exc:
        return exc.strerror or type(exc).__name__


def speaks_tls(host: str, port: int, timeout: float = 5.0) -> bool:
    """Whether the server at host:port completes a TLS handshake at all (its certificate unchecked): a client
    about to connect without TLS asks, so that it fails with a clear line instead of retrying forever."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.set_alpn_protocols(["h2"])
    try:
        with socket.create_connection((host.strip("[]"), port), timeout=timeout) as sock, \
                context.wrap_socket(sock, server_hostname=host.strip("[]")):
            return True
    except (ssl.SSLError, OSError):
        return False


# ----------------------------------------------------------------------------------------------------------
# The command


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(
        prog=PROG,
        description="Make a development CA, a TLS certificate for noprop-server and SuperNode key pairs for "
                    "noprop-client, in one folder.",
        epilog=examples(
            "noprop-certs certs",
            "noprop-certs certs --host server.lan --host 192.168.1.20 --clients 4",
            "noprop-server --host 0.0.0.0 --certificates certs --authorized-keys certs/clients --min-clients 4",
            "noprop-client --server server.lan:9092 --root-certificate certs/ca.crt --key certs/clients/client0 "
            "--data fashion-mnist --partition 0/4",
        ) + "\nThe first for one machine; the rest across machines (copy ca.crt and clients/clientI with its .pub "
            "to client I; keep ca.key on the server).",
    )
    p.add_argument("dir", metavar="DIR", help="output folder (made if missing)")
    p.add_argument("--host", action="append", default=[], metavar="NAME",
                   help="a name or address clients use to reach the server (repeatable); localhost, 127.0.0.1 and "
                        "::1 are always in the certificate (default: those three alone)")
    who = p.add_mutually_exclusive_group()
    who.add_argument("--clients", type=int, default=None, metavar="N",
                     help="make N node key pairs, clients/client0 .. client{N-1} (default: none)")
    who.add_argument("--client", action="append", default=None, metavar="NAME",
                     help="make a node key pair clients/NAME (repeatable)")
    p.add_argument("--days", type=int, default=365, metavar="N",
                   help="validity of the certificates in days (default: 365)")
    p.add_argument("--force", action="store_true",
                   help="replace an existing CA and same-named client keys (default: refuse)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    out = Path(args.dir).expanduser().resolve()
    try:
        names = client_names(args.clients, args.client)
        write_bundle(out, args.host, names, days=args.days, force=args.force)
    except LaunchError as exc:
        return fail(PROG, str(exc))
    sans = ", ".join(server_names(args.host))
    print(f"[{PROG}] {out}: CA ca.crt (+ ca.key, keep it private), server certificate server.crt + server.key for "
          f"{sans}, valid {args.days} days")
    if names:
        print(f"[{PROG}] node keys in {out / CLIENTS_DIR}: {', '.join(names)} (+ .pub)")
    print(f"[{PROG}] server: noprop-server --certificates {out}"
          + (f" --authorized-keys {out / CLIENTS_DIR}" if names else "") + " --host ...")
    client_hint = f"noprop-client --server {format_address(server_names(args.host)[0], 9092)} --root-certificate " \
                  f"{out / CA_CERT}"
    if names:
        client_hint += f" --key {out / CLIENTS_DIR / names[0]}"
    print(f"[{PROG}] client (copy ca.crt{' and its key pair' if names else ''} to the device): {client_hint} ...")
    return 0


if __name__ == "__main__":
    sys.exit(main())
