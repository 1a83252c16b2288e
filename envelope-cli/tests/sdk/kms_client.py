#!/usr/bin/env python3
"""The official Tencent Cloud SDK's KMS client, unchanged, against `envelope kms-emulator`.

Usage: kms_client.py HOST:PORT SECRET_ID SECRET_KEY. Prints one line per check and a closing
'N passed, N failed'; exits non-zero on any failure.
"""
import base64
import json
import sys

from tencentcloud.common import credential
from tencentcloud.common.exception.tencent_cloud_sdk_exception import TencentCloudSDKException
from tencentcloud.common.profile.client_profile import ClientProfile
from tencentcloud.common.profile.http_profile import HttpProfile
from tencentcloud.kms.v20190118 import kms_client, models

endpoint, secret_id, secret_key = sys.argv[1:4]


def client(key=secret_key):
    profile = ClientProfile(httpProfile=HttpProfile(endpoint=endpoint, protocol="http"))
    return kms_client.KmsClient(credential.Credential(secret_id, key), "ap-guangzhou", profile)


kms = client()
passed = failed = 0


def check(name, fn):
    global passed, failed
    try:
        fn()
        passed += 1
        print(f"ok   {name}")
    except Exception as e:  # noqa: BLE001 - report every failure and go on
        failed += 1
        print(f"FAIL {name}: {e!r}")


def req(model, **fields):
    r = model()
    for k, v in fields.items():
        setattr(r, k, v)
    return r


def expect_code(code, fn):
    try:
        fn()
    except TencentCloudSDKException as e:
        assert e.get_code() == code, f"expected {code}, got {e.get_code()}: {e.get_message()}"
        assert e.get_request_id(), "errors carry a RequestId"
        return
    raise AssertionError(f"expected {code}, call succeeded")


ctx = json.dumps({"table": "users", "column": "ssn"})
state = {}


def create():
    r = kms.CreateKey(req(models.CreateKeyRequest, Alias="sdk-a", Description="from the SDK"))
    assert r.KeyState == "Enabled", r.KeyState
    state["a"] = r.KeyId
    state["b"] = kms.CreateKey(req(models.CreateKeyRequest, Alias="sdk-b")).KeyId


def describe():
    r = kms.DescribeKey(req(models.DescribeKeyRequest, KeyId=state["a"]))
    assert r.KeyMetadata.KeyId == state["a"] and r.KeyMetadata.Alias == "sdk-a"


def generate():
    for spec, n in (("AES_256", 32), ("AES_128", 16)):
        r = kms.GenerateDataKey(req(models.GenerateDataKeyRequest, KeyId=state["a"], KeySpec=spec, EncryptionContext=ctx))
        assert len(base64.b64decode(r.Plaintext)) == n
        assert r.CiphertextBlob.count("-k-") == 2, r.CiphertextBlob
    r = kms.GenerateDataKey(req(models.GenerateDataKeyRequest, KeyId=state["a"], NumberOfBytes=48, EncryptionContext=ctx))
    assert len(base64.b64decode(r.Plaintext)) == 48
    state["dk"] = r


def decrypt():
    r = kms.Decrypt(req(models.DecryptRequest, CiphertextBlob=state["dk"].CiphertextBlob, EncryptionContext=ctx))
    assert r.Plaintext == state["dk"].Plaintext and r.KeyId == state["a"]
    # The same pairs in another order and spacing are the same context.
    same = json.dumps({"column": "ssn", "table": "users"}, separators=(",", ":"))
    assert kms.Decrypt(req(models.DecryptRequest, CiphertextBlob=state["dk"].CiphertextBlob, EncryptionContext=same)).Plaintext == r.Plaintext


def wrong_context():
    expect_code("InvalidParameterValue.InvalidCiphertext", lambda: kms.Decrypt(
        req(models.DecryptRequest, CiphertextBlob=state["dk"].CiphertextBlob, EncryptionContext=json.dumps({"table": "other"}))))


def encrypt_and_reencrypt():
    pt = base64.b64encode(b"hello kms").decode()
    blob = kms.Encrypt(req(models.EncryptRequest, KeyId=state["a"], Plaintext=pt, EncryptionContext=ctx)).CiphertextBlob
    r = kms.ReEncrypt(req(models.ReEncryptRequest, CiphertextBlob=blob, DestinationKeyId=state["b"],
                          SourceEncryptionContext=ctx, DestinationEncryptionContext="{}"))
    assert r.KeyId == state["b"] and r.SourceKeyId == state["a"] and r.ReEncrypted
    back = kms.Decrypt(req(models.DecryptRequest, CiphertextBlob=r.CiphertextBlob, EncryptionContext="{}"))
    assert back.Plaintext == pt and back.KeyId == state["b"]


def random_bytes():
    r = kms.GenerateRandom(req(models.GenerateRandomRequest, NumberOfBytes=64))
    assert len(base64.b64decode(r.Plaintext)) == 64


def disable_enable():
    kms.DisableKey(req(models.DisableKeyRequest, KeyId=state["b"]))
    expect_code("ResourceUnavailable.CmkDisabled", lambda: kms.GenerateDataKey(
        req(models.GenerateDataKeyRequest, KeyId=state["b"], KeySpec="AES_256")))
    kms.EnableKey(req(models.EnableKeyRequest, KeyId=state["b"]))
    kms.GenerateDataKey(req(models.GenerateDataKeyRequest, KeyId=state["b"], KeySpec="AES_256"))


def schedule_deletion():
    kms.ScheduleKeyDeletion(req(models.ScheduleKeyDeletionRequest, KeyId=state["b"], PendingWindowInDays=7))
    expect_code("ResourceUnavailable.KeyPendingDelete", lambda: kms.GenerateDataKey(
        req(models.GenerateDataKeyRequest, KeyId=state["b"], KeySpec="AES_256")))


def bad_secret():
    expect_code("AuthFailure.SignatureFailure", lambda: client("not-the-key").GenerateRandom(
        req(models.GenerateRandomRequest, NumberOfBytes=8)))


def unknown_key():
    expect_code("ResourceUnavailable.CmkNotFound", lambda: kms.GenerateDataKey(
        req(models.GenerateDataKeyRequest, KeyId="00000000-0000-4000-8000-000000000000", KeySpec="AES_256")))


for name, fn in [
    ("CreateKey", create), ("DescribeKey", describe), ("GenerateDataKey", generate),
    ("Decrypt", decrypt), ("Decrypt with a wrong context", wrong_context),
    ("Encrypt and ReEncrypt", encrypt_and_reencrypt), ("GenerateRandom", random_bytes),
    ("DisableKey and EnableKey", disable_enable), ("ScheduleKeyDeletion", schedule_deletion),
    ("a wrong SecretKey", bad_secret), ("an unknown key", unknown_key),
]:
    check(name, fn)

print(f"{passed} passed, {failed} failed")
sys.exit(1 if failed else 0)
