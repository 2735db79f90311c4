"""What makes the embedded broker a secured one (`streamrec broker --secure`, the tests).

One SASL_SSL listener:
- TLS with a certificate for 127.0.0.1 and localhost, signed by a CA made on the spot with
  trustme (nothing checked in); clients trust `ca_file`;
- SASL SCRAM-SHA-512, the users' credentials written into the KRaft metadata when the
  storage is formatted (KIP-900), so they exist before the broker first starts;
- the StandardAuthorizer with allow.everyone.if.no.acl.found=false: a principal may do only
  what an ACL grants (streams/acls.py has each role's). `admin` is the super user.
The controller listener stays PLAINTEXT on loopback (the broker's own connections to its
controller, as ANONYMOUS, which is therefore a super user too; it is not advertised).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

ADMIN = "admin"
MECHANISM = "SCRAM-SHA-512"


@dataclass
class BrokerSecurity:
    dir: Path  # where the CA and the broker's key and certificate are written
    users: dict[str, str] = field(default_factory=dict)  # name -> password (admin included)

    @classmethod
    def create(cls, dir: Path, users: dict[str, str] | None = None) -> BrokerSecurity:
        """A new CA, a broker certificate from it, and `users` (+ admin) with passwords."""
        import secrets

        import trustme
        from cryptography.hazmat.primitives import serialization

        dir.mkdir(parents=True, exist_ok=True)
        sec = cls(dir, {ADMIN: secrets.token_urlsafe(16), **(users or {})})
        ca = trustme.CA()
        cert = ca.issue_cert("localhost", "127.0.0.1")
        key = serialization.load_pem_private_key(cert.private_key_pem.bytes(), password=None)
        pkcs8 = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption())  # Kafka's PEM keystore wants it
        sec.keystore.write_bytes(pkcs8 + b"".join(c.bytes() for c in cert.cert_chain_pems))
        ca.cert_pem.write_to_path(str(sec.ca_file))
        return sec

    @property
    def ca_file(self) -> Path:
        return self.dir / "ca.pem"

    @property
    def keystore(self) -> Path:
        return self.dir / "broker.pem"

    def server_properties(self, port: int, controller_port: int) -> dict[str, str]:
        jaas = (f'org.apache.kafka.common.security.scram.ScramLoginModule required '
                f'username="{ADMIN}" password="{self.users[ADMIN]}";')
        return {
            "listeners": f"SASL_SSL://127.0.0.1:{port},CONTROLLER://127.0.0.1:{controller_port}",
            "advertised.listeners": f"SASL_SSL://127.0.0.1:{port}",
            "listener.security.protocol.map": "CONTROLLER:PLAINTEXT,SASL_SSL:SASL_SSL",
            "inter.broker.listener.name": "SASL_SSL",
            "sasl.enabled.mechanisms": MECHANISM,
            "sasl.mechanism.inter.broker.protocol": MECHANISM,
            "listener.name.sasl_ssl.scram-sha-512.sasl.jaas.config": jaas,
            "ssl.keystore.type": "PEM",
            "ssl.keystore.location": str(self.keystore),
            "ssl.truststore.type": "PEM",
            "ssl.truststore.location": str(self.ca_file),
            "authorizer.class.name": "org.apache.kafka.metadata.authorizer.StandardAuthorizer",
            "allow.everyone.if.no.acl.found": "false",
            "super.users": f"User:{ADMIN};User:ANONYMOUS",
        }

    def format_args(self) -> list[str]:
        """`kafka-storage format` arguments that store the users' SCRAM credentials."""
        return [a for name, pw in self.users.items()
                for a in ("--add-scram", f"{MECHANISM}=[name={name},password={pw}]")]

    def client(self, user: str = ADMIN, password: str | None = None) -> dict[str, object]:
        """Settings fields of a client of this broker, as `user`."""
        return {"security_protocol": "SASL_SSL", "sasl_mechanism": MECHANISM,
                "sasl_username": user,
                "sasl_password": self.users.get(user) if password is None else password,
                "ssl_cafile": self.ca_file}

    def kafka_python(self, user: str = ADMIN) -> dict[str, object]:
        """The same, as kafka-python keyword arguments (the broker's own readiness check)."""
        return {"security_protocol": "SASL_SSL", "sasl_mechanism": MECHANISM,
                "sasl_plain_username": user, "sasl_plain_password": self.users[user],
                "ssl_cafile": str(self.ca_file)}
