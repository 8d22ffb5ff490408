#!/usr/bin/env python3
"""Derive jwks.json from rsa_public.pem and ec_public.pem (run from this folder).

Standard library plus the openssl CLI only: the n/e and x/y values are read
from `openssl pkey -text` output and re-encoded as unpadded base64url.
"""
import base64, json, re, subprocess, sys

def b64u(b):
    return base64.urlsafe_b64encode(b).rstrip(b"=").decode()

def hexblock(text, label):
    # openssl -text prints multi-line colon-separated hex after "label:"
    m = re.search(label + r":\s*\n((?:\s+[0-9a-f:]+\n)+)", text)
    return bytes.fromhex(re.sub(r"[\s:]", "", m.group(1)))

rsa = subprocess.run(["openssl", "pkey", "-pubin", "-in", "rsa_public.pem", "-noout", "-text"],
                     capture_output=True, text=True, check=True).stdout
n = hexblock(rsa, "Modulus").lstrip(b"\x00")
e = int(re.search(r"Exponent: (\d+)", rsa).group(1))
e_bytes = e.to_bytes((e.bit_length() + 7) // 8, "big")
assert len(n) == 256, len(n)

ec = subprocess.run(["openssl", "pkey", "-pubin", "-in", "ec_public.pem", "-noout", "-text"],
                    capture_output=True, text=True, check=True).stdout
assert "prime256v1" in ec or "P-256" in ec
pt = hexblock(ec, "pub")
assert len(pt) == 65 and pt[0] == 4
x, y = pt[1:33], pt[33:]

jwks = {"keys": [
    {"kty": "RSA", "use": "sig", "alg": "RS256", "kid": "rsa-1", "n": b64u(n), "e": b64u(e_bytes)},
    {"kty": "EC", "use": "sig", "alg": "ES256", "kid": "ec-1", "crv": "P-256", "x": b64u(x), "y": b64u(y)},
]}
json.dump(jwks, sys.stdout, indent=2)
print()
