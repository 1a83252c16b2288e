#!/usr/bin/env python3
"""Sign requests with the official Tencent Cloud SDK's own request builder, clock frozen.

Reads a JSON array of cases from stdin: {secret_id, secret_key, token, region, host, timestamp,
action, params}. Writes a JSON array of {authorization, body, content_type, host}: the exact
bytes and headers the SDK would send.
"""
import json
import sys
import time

from tencentcloud.common import credential
from tencentcloud.common.http.request import RequestInternal
from tencentcloud.common.profile.client_profile import ClientProfile
from tencentcloud.common.profile.http_profile import HttpProfile
from tencentcloud.kms.v20190118 import kms_client

out = []
real_time = time.time
try:
    for case in json.load(sys.stdin):
        profile = ClientProfile(httpProfile=HttpProfile(endpoint=case["host"]))
        cred = credential.Credential(case["secret_id"], case["secret_key"], case.get("token") or None)
        client = kms_client.KmsClient(cred, case["region"], profile)
        req = RequestInternal(case["host"], "POST", "/")
        time.time = lambda ts=case["timestamp"]: ts
        client._build_req_with_tc3_signature(case["action"], case["params"], req)
        body = req.data if isinstance(req.data, str) else req.data.decode("utf-8")
        out.append({
            "authorization": req.header["Authorization"],
            "body": body,
            "content_type": req.header["Content-Type"],
            "host": req.header["Host"],
        })
finally:
    time.time = real_time
json.dump(out, sys.stdout)
