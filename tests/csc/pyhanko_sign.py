"""Signs PDFs with pyHanko's own CSC client (pyhanko.sign.signers.csc_signer) against a
smartsign daemon's /csc/v1 facade, approving each authorisation as the user's app would, then
validates every signed PDF with pyHanko's validator against the given root.

  pyhanko_sign.py CONFIG.json

CONFIG: {"api", "ca", "service_cert", "service_key", "gateway_cert", "gateway_key",
         "credential_id", "device_key", "root", "out_dir", "documents", "expect_serial"}
Prints one JSON line per signed PDF; exits non-zero on any failure.
"""

import asyncio
import base64
import hashlib
import io
import json
import ssl
import sys

import aiohttp
from asn1crypto import x509 as asn1_x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from pyhanko.pdf_utils.incremental_writer import IncrementalPdfFileWriter
from pyhanko.pdf_utils.reader import PdfFileReader
from pyhanko.sign import signers
from pyhanko.sign.signers import csc_signer
from pyhanko.sign.validation import async_validate_pdf_signature
from pyhanko_certvalidator import ValidationContext


def minimal_pdf(text: str) -> bytes:
    """A one-page PDF with correct cross-reference offsets."""
    stream = f"BT /F1 12 Tf 72 720 Td ({text}) Tj ET".encode()
    objects = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents 4 0 R "
        b"/Resources << /Font << /F1 5 0 R >> >> >>",
        b"<< /Length %d >>\nstream\n" % len(stream) + stream + b"\nendstream",
        b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>",
    ]
    out = io.BytesIO()
    out.write(b"%PDF-1.7\n")
    offsets = []
    for number, body in enumerate(objects, start=1):
        offsets.append(out.tell())
        out.write(b"%d 0 obj\n" % number + body + b"\nendobj\n")
    xref = out.tell()
    out.write(b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1))
    for offset in offsets:
        out.write(b"%010d 00000 n \n" % offset)
    out.write(
        b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n"
        % (len(objects) + 1, xref)
    )
    return out.getvalue()


class AppApproval(csc_signer.CSCAuthorizationManager):
    """Authorises by credentials/authorize, then approves the request as the user's app does
    (the device key signs the authorisation statement; the gateway passes it on)."""

    def __init__(self, session_info, credential_info, http, gateway, device_key):
        super().__init__(session_info, credential_info)
        self.http = http
        self.gateway = gateway
        self.device_key = device_key
        self.authorizations = 0

    async def authorize_signature(self, hash_b64s):
        url = self.csc_session_info.endpoint_url("credentials/authorize")
        body = self.format_csc_auth_request(hash_b64s=hash_b64s, description="pyHanko")
        async with self.http.post(url, json=body) as response:
            answer = await response.json()
            if response.status != 200:
                raise RuntimeError(f"authorize: {response.status} {answer}")
        raw = [base64.b64decode(h) for h in hash_b64s]
        request_id, code = answer["request_id"], answer["identification_code"]
        if len(raw) == 1:
            statement = "\n".join(
                ["smartsign-authorise-v1", request_id, code, "sha256", raw[0].hex(), "approve"]
            )
        else:
            statement = "\n".join(
                [
                    "smartsign-authorise-batch-v1",
                    request_id,
                    code,
                    "sha256",
                    str(len(raw)),
                    hashlib.sha256(b"".join(raw)).hexdigest(),
                    "approve",
                ]
            )
        signature = self.device_key.sign(statement.encode(), ec.ECDSA(hashes.SHA256()))
        approval = {
            "decision": "approve",
            "device_signature": base64.b64encode(signature).decode(),
        }
        gateway_url = self.csc_session_info.service_url + (
            f"/v1/signing-requests/{request_id}/authorisation"
        )
        async with self.gateway.post(gateway_url, json=approval) as response:
            if response.status != 200:
                raise RuntimeError(f"approval: {response.status} {await response.text()}")
        self.authorizations += 1
        return self.parse_csc_auth_response(answer)


def tls(config, cert, key):
    context = ssl.create_default_context(cafile=config["ca"])
    context.load_cert_chain(config[cert], config[key])
    return aiohttp.TCPConnector(ssl=context)


async def main(config):
    documents = int(config["documents"])
    with open(config["device_key"], "rb") as f:
        device_key = serialization.load_pem_private_key(f.read(), password=None)
    with open(config["root"], "rb") as f:
        root = asn1_x509.Certificate.load(
            base64.b64decode(b"".join(f.read().split(b"\n")[1:-2]))
        )
    async with aiohttp.ClientSession(connector=tls(config, "service_cert", "service_key")) as http, \
            aiohttp.ClientSession(connector=tls(config, "gateway_cert", "gateway_key")) as gateway:
        session_info = csc_signer.CSCServiceSessionInfo(
            service_url=config["api"], credential_id=config["credential_id"]
        )
        credential = await csc_signer.fetch_certs_in_csc_credential(http, session_info)
        assert credential.hash_pinning_required, "SCAL 2"
        manager = AppApproval(session_info, credential, http, gateway, device_key)
        signer = csc_signer.CSCSigner(http, manager, batch_size=documents)
        outputs = [io.BytesIO() for _ in range(documents)]

        async def sign(index):
            writer = IncrementalPdfFileWriter(io.BytesIO(minimal_pdf(f"document {index}")))
            meta = signers.PdfSignatureMetadata(field_name="Signature1", md_algorithm="sha256")
            await signers.async_sign_pdf(writer, meta, signer=signer, output=outputs[index])

        await asyncio.gather(*(sign(i) for i in range(documents)))
        if manager.authorizations != 1:
            raise RuntimeError(f"{manager.authorizations} approvals for one batch")

    context = ValidationContext(trust_roots=[root], allow_fetching=False, revocation_mode="soft-fail")
    for index, output in enumerate(outputs):
        path = f"{config['out_dir']}/signed-{index}.pdf"
        with open(path, "wb") as f:
            f.write(output.getvalue())
        reader = PdfFileReader(io.BytesIO(output.getvalue()))
        embedded = reader.embedded_signatures[0]
        status = await async_validate_pdf_signature(embedded, context)
        serial = format(status.signing_cert.serial_number, "x")
        print(json.dumps({
            "file": path,
            "intact": status.intact,
            "valid": status.valid,
            "trusted": status.trusted,
            "serial": serial,
        }))
        if not (status.intact and status.valid and status.trusted):
            raise RuntimeError(f"{path}: {status.summary()}")
        if serial.lstrip("0") != config["expect_serial"].lower().lstrip("0"):
            raise RuntimeError(f"{path}: signed by {serial}, not {config['expect_serial']}")


if __name__ == "__main__":
    with open(sys.argv[1]) as f:
        asyncio.run(main(json.load(f)))
