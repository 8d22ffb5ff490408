#!/usr/bin/env python3
"""Mints an HS256 JWT for local use: mint-token.py SECRET USER [TTL_SECONDS]."""
import base64, hashlib, hmac, json, sys, time, uuid

def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

secret, user = sys.argv[1], sys.argv[2]
ttl = int(sys.argv[3]) if len(sys.argv) > 3 else 3600
now = int(time.time())
header = b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
claims = b64(json.dumps({"sub": user, "iat": now, "exp": now + ttl, "jti": uuid.uuid4().hex}).encode())
signing_input = f"{header}.{claims}".encode()
sig = b64(hmac.new(secret.encode(), signing_input, hashlib.sha256).digest())
print(f"{header}.{claims}.{sig}")
