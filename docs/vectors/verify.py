#!/usr/bin/env python3
"""An independent reader of envelope's blob v1, checked against the committed vectors.

It follows docs/FORMAT.md only (not the Rust code) and uses pyca/cryptography's AES-GCM, so a
vector that passes here and in the Rust tests was produced to the spec, not to one
implementation's quirks. Usage: python3 docs/vectors/verify.py [DIR]; exit status 0 when every
vector gives its expected result.
"""
import base64
import binascii
import json
import pathlib
import sys

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

TEXT_PREFIX = "ev1:"


class Reject(Exception):
    """A MUST-reject rule fired; the argument is the error's name."""


def parse(blob: bytes):
    if len(blob) == 0 or blob[0] == 0 or blob[0] > 0x1F:
        raise Reject("NotEnvelope")
    if blob[0] != 1:
        raise Reject("UnsupportedVersion")
    if len(blob) < 30:
        raise Reject("Truncated")
    if blob[1] != 1:
        raise Reject("UnknownAlgorithm")
    length, shift, pos = 0, 0, 30
    for i in range(4):
        if pos >= len(blob):
            raise Reject("Truncated")
        b = blob[pos]
        pos += 1
        length |= (b & 0x7F) << shift
        shift += 7
        if b & 0x80 == 0:
            if i > 0 and b == 0:
                raise Reject("MalformedLength")
            break
    else:
        raise Reject("MalformedLength")
    body = blob[pos:]
    if len(body) < length + 16:
        raise Reject("Truncated")
    if len(body) > length + 16:
        raise Reject("TrailingBytes")
    return blob[:30], body[:length], body[length:]


def from_text(text: str) -> bytes:
    if not text.startswith(TEXT_PREFIX):
        raise Reject("NotEnvelope")
    body = text[len(TEXT_PREFIX):]
    try:
        raw = base64.b64decode(body, validate=True)
    except (binascii.Error, ValueError):
        raise Reject("MalformedText")
    # Canonical padded base64 only: re-encoding must give the same text.
    if base64.b64encode(raw).decode() != body:
        raise Reject("MalformedText")
    return raw


def open_vector(v) -> bytes:
    blob = bytes.fromhex(v["blob"])
    if v["form"] == "text":
        blob = from_text(blob.decode("utf-8"))
    header, ciphertext, tag = parse(blob)
    # The harness holds one key: `dek` under `key_id`. Any other id is not in its key table.
    if header[2:18] != bytes.fromhex(v["key_id"]):
        raise Reject("UnknownKey")
    dek = bytes.fromhex(v["dek"])
    if len(dek) != 32:
        raise Reject("BadKeyLength")
    aad = header + v["context"].encode("ascii")
    try:
        return AESGCM(dek).decrypt(header[18:30], ciphertext + tag, aad)
    except InvalidTag:
        raise Reject("Decrypt")


def main() -> int:
    here = pathlib.Path(sys.argv[1] if len(sys.argv) > 1 else pathlib.Path(__file__).parent / "v1")
    failures, count = 0, 0
    for path in sorted(here.glob("*.json")):
        v = json.loads(path.read_text())
        count += 1
        try:
            got = "ok"
            plaintext = open_vector(v)
            if plaintext.hex() != v["plaintext"]:
                got = "wrong plaintext"
        except Reject as r:
            got = r.args[0]
        if got != v["expect"]:
            failures += 1
            print(f"FAIL {v['name']}: expected {v['expect']}, got {got}")
    print(f"{count - failures} passed, {failures} failed")
    return 1 if failures or count == 0 else 0


if __name__ == "__main__":
    sys.exit(main())
