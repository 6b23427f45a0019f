#!/usr/bin/env python3
"""Independent reference implementation of the kmsd wire formats; writes the test vectors.

    python3 Protocol/vectors/gen_vectors.py

(Re)writes, next to this script:

  ciphertext.json  symmetric ciphertext format v1 (PROTOCOL.md section 9): valid vectors with
                   every intermediate value, and invalid blobs that must not decrypt.
  frames.json      length-prefixed protobuf frames (PROTOCOL.md sections 3 and 7) with the same
                   message in the canonical proto3 JSON mapping.
  backup.json      the backup file format v1 (PROTOCOL.md section 14): one valid file with its
                   parts, and damaged or foreign files that must be refused.
  replication.json a replication bundle v1 (PROTOCOL.md section 15.4) with the keys that make,
                   sign, verify and unwrap it.

It shares no code with the Swift implementation. AES-256-GCM, HKDF-SHA256, RSA decryption and
AES key wrap with padding (for the self-checks) come from the `cryptography` package; protobuf
encoding is done by hand (varints and length-delimited fields) from a schema read out of
../kmsd.proto, so field numbers cannot drift from the normative file. RSA-OAEP wrapping of
imported key material (PROTOCOL.md section 7.32) is done by hand too, with a fixed seed. No
randomness: every input is fixed (even the RSA wrapping keys are derived from labels), so the
output is byte-for-byte reproducible.

Before writing anything it checks itself: every valid vector is decrypted again by a separate
parser, every invalid one must fail, every frame is decoded again and compared with its JSON,
every wrapped key material in the frames is unwrapped again with the `cryptography` package's
RSA-OAEP and RFC 5649 code, every KMS_CHAIN of the VerifyAuditRecords frames is computed again
with the standard library's hmac module (HKDF written out by hand; ../AUDIT.md), the figures
of the Status answer are checked against one another (PROTOCOL.md section 7.45), and, when
`protoc` is on PATH, every frame body (except the unknown-operation one) is compared with what
`protoc --encode` produces from the same message in text format.
"""

import base64
import hashlib
import hmac
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import uuid

try:
    from cryptography.exceptions import InvalidTag
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import padding, rsa
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF
    from cryptography.hazmat.primitives.keywrap import aes_key_unwrap_with_padding
except ImportError:  # pragma: no cover
    sys.exit("gen_vectors.py needs the Python 'cryptography' package (pip install cryptography)")

HERE = os.path.dirname(os.path.abspath(__file__))
PROTO_DIR = os.path.normpath(os.path.join(HERE, ".."))
PROTO_FILE = os.path.join(PROTO_DIR, "kmsd.proto")

# ---------------------------------------------------------------------------------------------
# Symmetric ciphertext format v1
# ---------------------------------------------------------------------------------------------

FORMAT_VERSION = 0x01
ALGORITHM_SYMMETRIC_DEFAULT = 0x01
HEADER_LEN = 66          # version 1 + algorithm 1 + key id 16 + key version 4 + salt 32 + nonce 12
TAG_LEN = 16
MIN_BLOB_LEN = HEADER_LEN + TAG_LEN   # 82
MESSAGE_KEY_LABEL = b"kmsd/v1/symmetric-message-key"

MAX_CONTEXT_PAIRS = 64
MAX_CONTEXT_CANONICAL_BYTES = 8192
MAX_PLAINTEXT = 4096


def u32be(n):
    return struct.pack(">I", n)


def canonical_context(ctx):
    """C(ctx) = u32be(count) || for each pair, ascending by the key's UTF-8 bytes:
    u32be(len(key)) || key || u32be(len(value)) || value."""
    pairs = sorted(((k.encode("utf-8"), v.encode("utf-8")) for k, v in ctx.items()),
                   key=lambda kv: kv[0])          # bytes compare bytewise, never by locale
    out = bytearray(u32be(len(pairs)))
    for k, v in pairs:
        out += u32be(len(k)) + k + u32be(len(v)) + v
    return bytes(out)


def check_context_limits(ctx):
    assert len(ctx) <= MAX_CONTEXT_PAIRS, "too many context pairs"
    assert all(len(k) > 0 for k in ctx), "empty context key"
    assert len(canonical_context(ctx)) <= MAX_CONTEXT_CANONICAL_BYTES, "context too large"


def build_header(key_id, key_version, salt, nonce):
    assert len(salt) == 32 and len(nonce) == 12 and 1 <= key_version <= 0xFFFFFFFF
    return (bytes([FORMAT_VERSION, ALGORITHM_SYMMETRIC_DEFAULT]) + uuid.UUID(key_id).bytes
            + u32be(key_version) + salt + nonce)


def hkdf_sha256(ikm, salt, info, length=32):
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=salt, info=info).derive(ikm)


def message_key(material, salt, header):
    return hkdf_sha256(material, salt, MESSAGE_KEY_LABEL + header)


def encrypt(key_id, key_version, material, salt, nonce, ctx, plaintext):
    """Encrypt with explicit salt and nonce; returns every intermediate value."""
    assert len(material) == 32
    assert 1 <= len(plaintext) <= MAX_PLAINTEXT
    check_context_limits(ctx)
    header = build_header(key_id, key_version, salt, nonce)
    assert len(header) == HEADER_LEN
    cctx = canonical_context(ctx)
    key = message_key(material, salt, header)
    aad = header + cctx
    sealed = AESGCM(key).encrypt(nonce, plaintext, aad)   # ciphertext || 16-byte tag
    blob = header + sealed
    assert len(blob) == MIN_BLOB_LEN + len(plaintext)
    return {
        "header": header, "canonical_context": cctx, "hkdf_info": MESSAGE_KEY_LABEL + header,
        "message_key": key, "aad": aad, "blob": blob,
    }


class DecryptFailure(Exception):
    def __init__(self, stage):
        super().__init__(stage)
        self.stage = stage   # length | format_version | algorithm | authentication


def parse_blob(blob):
    """The checks a server makes before any cryptography; returns the header fields."""
    if len(blob) < MIN_BLOB_LEN:
        raise DecryptFailure("length")
    if blob[0] != FORMAT_VERSION:
        raise DecryptFailure("format_version")
    if blob[1] != ALGORITHM_SYMMETRIC_DEFAULT:
        raise DecryptFailure("algorithm")
    return {
        "key_id": str(uuid.UUID(bytes=bytes(blob[2:18]))),
        "key_version": struct.unpack(">I", blob[18:22])[0],
        "salt": blob[22:54],
        "nonce": blob[54:66],
    }


def decrypt(material, blob, ctx):
    """Decrypt a v1 blob from the blob alone (no intermediate values from encrypt())."""
    fields = parse_blob(blob)
    header = blob[:HEADER_LEN]
    key = message_key(material, fields["salt"], header)
    try:
        plaintext = AESGCM(key).decrypt(fields["nonce"], blob[HEADER_LEN:],
                                        header + canonical_context(ctx))
    except InvalidTag:
        raise DecryptFailure("authentication")
    return fields, plaintext


def fixed_bytes(label, n):
    """Deterministic stand-in for random bytes: SHA-256 in counter mode over a label."""
    out = b""
    counter = 0
    while len(out) < n:
        out += hashlib.sha256(b"kmsd test vectors/" + label.encode() + u32be(counter)).digest()
        counter += 1
    return out[:n]


KEY_A = "1234abcd-12ab-34cd-56ef-1234567890ab"
KEY_B = "0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0"
KEY_C = "5e6f7a8b-9c0d-4e1f-8a2b-3c4d5e6f7a8b"   # Origin EXTERNAL (frames only)
KEY_D = "7a8b9c0d-1e2f-4a3b-9c4d-5e6f7a8b9c0d"   # created with a key policy (frames only)
MATERIAL = {
    (KEY_A, 1): bytes(range(32)),                       # 00 01 02 ... 1f
    (KEY_B, 1): fixed_bytes("key material/B/1", 32),
    (KEY_B, 258): fixed_bytes("key material/B/258", 32),
}

# (name, key id, key version, context, plaintext, salt/nonce label). Dict order is the order a
# caller might write the context in; the canonical encoding sorts it.
VALID_INPUTS = [
    ("empty-context", KEY_A, 1, {}, b"Hello, kmsd!", None),
    ("one-pair", KEY_A, 1, {"purpose": "example"}, b"attack at dawn", None),
    ("several-pairs-sorted", KEY_A, 1,
     {"tenant": "acme", "b": "", "aa": "prefix sorts after its prefix", "a": "shortest first",
      "Z": "upper case (0x5a) sorts before lower case"},
     b"context pairs are sorted by the bytes of their keys", None),
    ("context-ab-c", KEY_A, 1, {"ab": "c"}, b"same everything but the context",
     "context-ambiguity"),
    ("context-a-bc", KEY_A, 1, {"a": "bc"}, b"same everything but the context",
     "context-ambiguity"),
    ("utf8-context", KEY_A, 1,
     {"r\u00e9gion": "Z\u00fcrich", "\u65e5\u672c": "\u6771\u4eac", "key \U0001f511": "\u2713"},
     "non-ASCII context: UTF-8 bytes, lengths count bytes".encode(), None),
    # U+0065 U+0301 (e + combining acute, NFD) encodes as 65 cc 81 and so sorts before "f" (66)
    # bytewise, while a Unicode-aware comparison of the NFC form (U+00E9) puts it after "f".
    # Implementations must sort by UTF-8 bytes and must not normalise.
    ("utf8-bytewise-order", KEY_A, 1, {"f": "plain f", "e\u0301": "e + combining acute (NFD)"},
     b"keys are compared as bytes, not as Unicode strings", None),
    ("one-byte-plaintext", KEY_B, 1, {"k": "v"}, b"\x00", None),
    ("max-plaintext-4096", KEY_B, 1, {"size": "4096"},
     bytes((i * 7 + 3) & 0xFF for i in range(4096)), None),
    ("key-version-258", KEY_B, 258, {"rotation": "yes"},
     b"encrypted under version 258 (00 00 01 02 in the header)", None),
]


def hexs(b):
    return bytes(b).hex()


def build_ciphertext_vectors():
    valid = []
    blobs = {}
    for name, key_id, version, ctx, plaintext, label in VALID_INPUTS:
        label = label or name
        salt = fixed_bytes("salt/" + label, 32)
        nonce = fixed_bytes("nonce/" + label, 12)
        material = MATERIAL[(key_id, version)]
        r = encrypt(key_id, version, material, salt, nonce, ctx, plaintext)
        blobs[name] = (key_id, version, material, ctx, plaintext, r["blob"])
        valid.append({
            "name": name,
            "key_id": key_id,
            "key_version": version,
            "key_material_hex": hexs(material),
            "salt_hex": hexs(salt),
            "nonce_hex": hexs(nonce),
            "encryption_context": ctx,
            "plaintext_hex": hexs(plaintext),
            "header_hex": hexs(r["header"]),
            "canonical_context_hex": hexs(r["canonical_context"]),
            "hkdf_info_hex": hexs(r["hkdf_info"]),
            "message_key_hex": hexs(r["message_key"]),
            "aad_hex": hexs(r["aad"]),
            "ciphertext_blob_hex": hexs(r["blob"]),
        })

    def flip(blob, offset, mask=0x01):
        b = bytearray(blob)
        b[offset] ^= mask
        return bytes(b)

    def setbyte(blob, offset, value):
        b = bytearray(blob)
        b[offset] = value
        return bytes(b)

    invalid = []

    def bad(name, base, blob, ctx, fails_at, reason):
        key_id, version, material, _, _, _ = blobs[base]
        invalid.append({
            "name": name,
            "based_on": base,
            "key_id": key_id,
            "key_version": version,
            "key_material_hex": hexs(material),
            "encryption_context": ctx,
            "ciphertext_blob_hex": hexs(blob),
            "expected_error": "InvalidCiphertextException",
            "fails_at": fails_at,
            "reason": reason,
        })

    one = blobs["one-pair"][5]
    one_ctx = blobs["one-pair"][3]
    bad("tampered-tag", "one-pair", flip(one, len(one) - 1), one_ctx, "authentication",
        "last byte of the GCM tag flipped")
    bad("tampered-ciphertext", "one-pair", flip(one, HEADER_LEN), one_ctx, "authentication",
        "first ciphertext byte flipped")
    bad("tampered-header-salt", "one-pair", flip(one, 30), one_ctx, "authentication",
        "header byte 30 (inside the salt) flipped: another message key and another AAD")
    bad("tampered-header-nonce", "one-pair", flip(one, 60), one_ctx, "authentication",
        "header byte 60 (inside the nonce) flipped")
    bad("tampered-header-key-id", "one-pair", flip(one, 17), one_ctx, "authentication",
        "last key id byte flipped: with the original key's material the message key and AAD "
        "differ; a server finds no such key (also InvalidCiphertextException)")
    bad("wrong-context-value", "one-pair", one, {"purpose": "other"}, "authentication",
        "context value differs from the one used to encrypt")
    bad("missing-context", "one-pair", one, {}, "authentication",
        "blob was encrypted with a context; decrypting with none must fail")
    bad("extra-context-pair", "one-pair", one, {"purpose": "example", "x": "y"},
        "authentication", "one context pair more than was used to encrypt")
    ab = blobs["context-ab-c"][5]
    bad("context-ab-c-decrypted-with-a-bc", "context-ab-c", ab, {"a": "bc"}, "authentication",
        "{\"ab\":\"c\"} and {\"a\":\"bc\"} have different canonical encodings")
    short = blobs["one-byte-plaintext"][5]
    assert len(short) == 83
    bad("truncated-81-bytes", "one-byte-plaintext", short[:81], blobs["one-byte-plaintext"][3],
        "length", "81 bytes, shorter than the 82-byte minimum (66-byte header + 16-byte tag)")
    bad("format-version-2", "one-pair", setbyte(one, 0, 0x02), one_ctx, "format_version",
        "format version byte 0x02 is unknown; rejected before any cryptography")
    bad("format-version-0", "one-pair", setbyte(one, 0, 0x00), one_ctx, "format_version",
        "format version byte 0x00 is unknown; rejected before any cryptography")
    bad("algorithm-id-2", "one-pair", setbyte(one, 1, 0x02), one_ctx, "algorithm",
        "algorithm byte 0x02 is unknown; rejected before any cryptography")
    return valid, invalid


def check_ciphertext_vectors(valid, invalid):
    for v in valid:
        blob = bytes.fromhex(v["ciphertext_blob_hex"])
        material = bytes.fromhex(v["key_material_hex"])
        fields, pt = decrypt(material, blob, v["encryption_context"])
        assert pt == bytes.fromhex(v["plaintext_hex"]), v["name"]
        assert fields["key_id"] == v["key_id"] and fields["key_version"] == v["key_version"]
        assert blob[:HEADER_LEN].hex() == v["header_hex"]
        assert len(blob) == MIN_BLOB_LEN + len(pt)
        assert v["aad_hex"] == v["header_hex"] + v["canonical_context_hex"]
    by_name = {v["name"]: v for v in valid}
    assert by_name["context-ab-c"]["ciphertext_blob_hex"] != by_name["context-a-bc"]["ciphertext_blob_hex"]
    assert by_name["context-ab-c"]["canonical_context_hex"] != by_name["context-a-bc"]["canonical_context_hex"]
    for v in invalid:
        blob = bytes.fromhex(v["ciphertext_blob_hex"])
        try:
            decrypt(bytes.fromhex(v["key_material_hex"]), blob, v["encryption_context"])
        except DecryptFailure as e:
            assert e.stage == v["fails_at"], (v["name"], e.stage)
        else:
            raise AssertionError("invalid vector %s decrypted" % v["name"])
    # Known-answer check of the canonical context encoding, independent of the vectors.
    assert canonical_context({}) == b"\x00\x00\x00\x00"
    assert canonical_context({"ab": "c"}).hex() == "00000001" "00000002" "6162" "00000001" "63"
    assert canonical_context({"a": "bc"}).hex() == "00000001" "00000001" "61" "00000002" "6263"
    assert canonical_context({"f": "", "e\u0301": ""}).hex() == (
        "00000002" "00000003" "65cc81" "00000000" "00000001" "66" "00000000")


# ---------------------------------------------------------------------------------------------
# Bring your own key (PROTOCOL.md sections 7.31-7.33): deterministic RSA wrapping keys and
# key material wrapped the ways ImportKeyMaterial accepts
# ---------------------------------------------------------------------------------------------

SMALL_PRIMES = [p for p in range(3, 2000) if all(p % d for d in range(2, int(p ** 0.5) + 1))]


def is_probable_prime(n):
    """Miller-Rabin with the first 40 odd primes as bases (deterministic, no randomness)."""
    if n < 2:
        return False
    for p in SMALL_PRIMES:
        if n % p == 0:
            return n == p
    d, r = n - 1, 0
    while d % 2 == 0:
        d, r = d // 2, r + 1
    for a in SMALL_PRIMES[:40]:
        x = pow(a, d, n)
        if x in (1, n - 1):
            continue
        for _ in range(r - 1):
            x = pow(x, 2, n)
            if x == n - 1:
                break
        else:
            return False
    return True


def fixed_prime(label, bits, e):
    """The first probable prime from fixed bytes upwards: top two bits set (so p * q has
    exactly 2 * bits bits), odd, and p - 1 coprime to e."""
    n = int.from_bytes(fixed_bytes(label, bits // 8), "big") | (3 << (bits - 2)) | 1
    while not (is_probable_prime(n) and (n - 1) % e != 0):
        n += 2
    return n


def wrapping_key(label, bits=2048):
    """A deterministic RSA key pair standing in for the fresh one GetParametersForImport makes:
    (private key object, DER SubjectPublicKeyInfo, DER PKCS#8 private key). Test data only."""
    e = 65537
    p = fixed_prime("rsa wrapping key/%s/p" % label, bits // 2, e)
    q = fixed_prime("rsa wrapping key/%s/q" % label, bits // 2, e)
    assert p != q
    n = p * q
    assert n.bit_length() == bits
    d = pow(e, -1, (p - 1) * (q - 1))
    key = rsa.RSAPrivateNumbers(p, q, d, d % (p - 1), d % (q - 1), pow(q, -1, p),
                                rsa.RSAPublicNumbers(e, n)).private_key()
    spki = key.public_key().public_bytes(serialization.Encoding.DER,
                                         serialization.PublicFormat.SubjectPublicKeyInfo)
    pkcs8 = key.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
                              serialization.NoEncryption())
    return key, spki, pkcs8


def mgf1(seed, length, hash_name):
    out = b""
    counter = 0
    while len(out) < length:
        out += hashlib.new(hash_name, seed + u32be(counter)).digest()
        counter += 1
    return out[:length]


def rsa_oaep_encrypt(public_key, message, seed, hash_name="sha256"):
    """RSAES-OAEP (RFC 8017 section 7.1.1), empty label, MGF1 with the same hash, and the given
    seed instead of a random one, so the output is reproducible."""
    numbers = public_key.public_numbers()
    k = (numbers.n.bit_length() + 7) // 8
    h_len = hashlib.new(hash_name).digest_size
    assert len(seed) == h_len and len(message) <= k - 2 * h_len - 2
    db = (hashlib.new(hash_name, b"").digest() + b"\x00" * (k - len(message) - 2 * h_len - 2)
          + b"\x01" + message)
    masked_db = bytes(a ^ b for a, b in zip(db, mgf1(seed, k - h_len - 1, hash_name)))
    masked_seed = bytes(a ^ b for a, b in zip(seed, mgf1(masked_db, h_len, hash_name)))
    em = b"\x00" + masked_seed + masked_db
    return pow(int.from_bytes(em, "big"), numbers.e, numbers.n).to_bytes(k, "big")


def aes_kwp_wrap(kek, plaintext):
    """AES key wrap with padding (RFC 5649), written out from the RFC; checked against the
    `cryptography` package's unwrap."""
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

    def aes(block):
        enc = Cipher(algorithms.AES(kek), modes.ECB()).encryptor()
        return enc.update(block) + enc.finalize()

    aiv = bytes.fromhex("a65959a6") + struct.pack(">I", len(plaintext))
    padded = plaintext + b"\x00" * (-len(plaintext) % 8)
    if len(padded) == 8:
        return aes(aiv + padded)
    r = [padded[i:i + 8] for i in range(0, len(padded), 8)]
    a, n = aiv, len(r)
    for j in range(6):
        for i in range(n):
            b = aes(a + r[i])
            t = n * j + i + 1
            a = struct.pack(">Q", struct.unpack(">Q", b[:8])[0] ^ t)
            r[i] = b[8:]
    return a + b"".join(r)


def wrap_key_material(private_key, algorithm, material, label):
    """EncryptedKeyMaterial as ImportKeyMaterial takes it for `algorithm` (PROTOCOL.md section
    7.32), with fixed seeds and AES keys; returns (wrapped, the fixed inputs used)."""
    hash_name = "sha1" if algorithm.endswith("_SHA_1") else "sha256"
    seed = fixed_bytes("oaep seed/" + label, hashlib.new(hash_name).digest_size)
    if algorithm.startswith("RSAES_OAEP_"):
        return rsa_oaep_encrypt(private_key.public_key(), material, seed, hash_name), {
            "oaep_seed_hex": hexs(seed)}
    assert algorithm.startswith("RSA_AES_KEY_WRAP_")
    aes_key = fixed_bytes("aes wrapping key/" + label, 32)
    wrapped = (rsa_oaep_encrypt(private_key.public_key(), aes_key, seed, hash_name)
               + aes_kwp_wrap(aes_key, material))
    return wrapped, {"oaep_seed_hex": hexs(seed), "aes_key_hex": hexs(aes_key)}


def unwrap_key_material(private_key, algorithm, wrapped):
    """The server's side, with the `cryptography` package only (independent of the above)."""
    h = hashes.SHA1() if algorithm.endswith("_SHA_1") else hashes.SHA256()
    oaep = padding.OAEP(mgf=padding.MGF1(algorithm=h), algorithm=h, label=None)
    k = private_key.key_size // 8
    if algorithm.startswith("RSAES_OAEP_"):
        return private_key.decrypt(wrapped, oaep)
    aes_key = private_key.decrypt(wrapped[:k], oaep)
    return aes_key_unwrap_with_padding(aes_key, wrapped[k:])


# ---------------------------------------------------------------------------------------------
# Protobuf: schema from kmsd.proto, hand-written encoder/decoder, proto3 JSON mapping
# ---------------------------------------------------------------------------------------------

VARINT_TYPES = {"uint64", "uint32", "int64", "int32", "bool"}
LEN_SCALARS = {"string", "bytes"}


class Field:
    def __init__(self, name, number, type_, repeated=False, map_types=None, oneof=None):
        self.name, self.number, self.type = name, number, type_
        self.repeated, self.map_types, self.oneof = repeated, map_types, oneof

    @property
    def json_name(self):
        # protoc's default json_name: drop underscores, upper-case the letter after each one.
        parts = self.name.split("_")
        return parts[0] + "".join(p[:1].upper() + p[1:] for p in parts[1:])


def parse_proto(path):
    text = open(path, encoding="utf-8").read()
    text = re.sub(r"//[^\n]*", "", text)
    assert re.search(r"package\s+kmsd\.v1\s*;", text)
    schema = {}
    for m in re.finditer(r"\bmessage\s+(\w+)\s*\{", text):
        depth, i = 1, m.end()
        while depth:
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            i += 1
        body = text[m.end():i - 1]
        oneof_spans = [(o.start(), o.end(), o.group(1))
                       for o in re.finditer(r"\boneof\s+(\w+)\s*\{[^}]*\}", body)]
        fields = {}
        for f in re.finditer(r"(repeated\s+)?(map\s*<\s*(\w+)\s*,\s*(\w+)\s*>|[\w.]+)\s+(\w+)"
                             r"\s*=\s*(\d+)\s*;", body):
            oneof = next((n for s, e, n in oneof_spans if s <= f.start() < e), None)
            map_types = (f.group(3), f.group(4)) if f.group(3) else None
            field = Field(f.group(5), int(f.group(6)), "map" if map_types else f.group(2),
                          bool(f.group(1)), map_types, oneof)
            assert field.number not in fields, (m.group(1), field.number)
            fields[field.number] = field
        schema[m.group(1)] = fields
    return schema


SCHEMA = parse_proto(PROTO_FILE)


def fields_by_name(msg):
    return {f.name: f for f in SCHEMA[msg].values()}


def enc_varint(n):
    if n < 0:
        n &= (1 << 64) - 1          # int32/int64 negatives: ten-byte two's complement
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def enc_tag(number, wire_type):
    return enc_varint((number << 3) | wire_type)


def enc_len(number, payload):
    return enc_tag(number, 2) + enc_varint(len(payload)) + payload


def scalar_varint(type_, v):
    return int(v) if type_ != "bool" else (1 if v else 0)


def is_default(field, v):
    if field.repeated or field.type == "map":
        return len(v) == 0
    if field.type in VARINT_TYPES:
        return not v
    if field.type in LEN_SCALARS:
        return len(v) == 0
    return False   # a message field that is present is always encoded, even when empty


def encode_message(msg, value):
    """value: dict of proto field name -> Python value (str, bytes, int, bool, dict, list).
    Fields are written in field-number order; proto3 default values are omitted; repeated
    numeric fields are packed; map entries are nested messages {1: key, 2: value}."""
    by_name = fields_by_name(msg)
    unknown = set(value) - set(by_name) - {"__unknown__"}
    assert not unknown, (msg, unknown)
    present_oneofs = {}
    out = bytearray()
    for number in sorted(SCHEMA[msg]):
        f = SCHEMA[msg][number]
        if f.name not in value:
            continue
        v = value[f.name]
        if f.oneof:
            assert f.oneof not in present_oneofs, "two members of oneof %s" % f.oneof
            present_oneofs[f.oneof] = f.name
        elif is_default(f, v):
            continue
        if f.type == "map":
            for k, val in v.items():
                out += enc_len(number, encode_map_entry(f, k, val))
        elif f.repeated:
            if f.type in VARINT_TYPES:
                out += enc_len(number, b"".join(enc_varint(scalar_varint(f.type, x)) for x in v))
            else:
                for x in v:
                    out += enc_single(f, x)
        else:
            out += enc_single(f, v)
    for number, payload in value.get("__unknown__", []):   # raw length-delimited extras
        out += enc_len(number, payload)
    return bytes(out)


def encode_map_entry(f, k, v):
    key_type, value_type = f.map_types
    assert key_type == "string" and value_type in ("string", "uint64")
    # Both key and value are always written, as protoc and swift-protobuf do.
    if value_type == "uint64":
        return enc_len(1, k.encode("utf-8")) + enc_tag(2, 0) + enc_varint(int(v))
    return enc_len(1, k.encode("utf-8")) + enc_len(2, v.encode("utf-8"))


def enc_single(f, v):
    if f.type in VARINT_TYPES:
        return enc_tag(f.number, 0) + enc_varint(scalar_varint(f.type, v))
    if f.type == "string":
        return enc_len(f.number, v.encode("utf-8"))
    if f.type == "bytes":
        return enc_len(f.number, bytes(v))
    return enc_len(f.number, encode_message(f.type, v))


def dec_varint(buf, i):
    shift = n = 0
    while True:
        if i >= len(buf) or shift > 63:
            raise ValueError("bad varint")
        b = buf[i]
        i += 1
        n |= (b & 0x7F) << shift
        shift += 7
        if not b & 0x80:
            return n, i


def from_varint(type_, n):
    if type_ == "bool":
        return n != 0
    if type_ == "int32":
        n &= 0xFFFFFFFF
        return n - (1 << 32) if n >> 31 else n
    if type_ == "int64":
        return n - (1 << 64) if n >> 63 else n
    if type_ == "uint32":
        return n & 0xFFFFFFFF
    return n


def decode_message(msg, buf):
    """Returns (dict, unknown field numbers). Oneof: the last member seen wins."""
    fields = SCHEMA[msg]
    out, unknown, i = {}, [], 0
    while i < len(buf):
        key, i = dec_varint(buf, i)
        number, wt = key >> 3, key & 7
        if wt == 0:
            raw, i = dec_varint(buf, i)
        elif wt == 2:
            n, i = dec_varint(buf, i)
            if i + n > len(buf):
                raise ValueError("truncated field")
            raw, i = buf[i:i + n], i + n
        elif wt == 1:
            raw, i = buf[i:i + 8], i + 8
        elif wt == 5:
            raw, i = buf[i:i + 4], i + 4
        else:
            raise ValueError("unsupported wire type %d" % wt)
        f = fields.get(number)
        if f is None:
            unknown.append(number)
            continue
        if f.oneof:
            for other in fields.values():
                if other.oneof == f.oneof and other is not f:
                    out.pop(other.name, None)
        if f.type == "map":
            entry, _ = decode_map_entry(raw, f.map_types[1])
            out.setdefault(f.name, {})[entry[0]] = entry[1]
        elif f.repeated and f.type in VARINT_TYPES:
            lst = out.setdefault(f.name, [])
            if wt == 2:
                j = 0
                while j < len(raw):
                    n, j = dec_varint(raw, j)
                    lst.append(from_varint(f.type, n))
            else:
                lst.append(from_varint(f.type, raw))
        elif f.repeated:
            out.setdefault(f.name, []).append(dec_single(f, raw))
        else:
            out[f.name] = from_varint(f.type, raw) if wt == 0 else dec_single(f, raw)
    return out, unknown


def decode_map_entry(raw, value_type="string"):
    key, value = "", (0 if value_type == "uint64" else "")
    i = 0
    while i < len(raw):
        k, i = dec_varint(raw, i)
        if k & 7 == 0:                      # a varint value (map<string, uint64>)
            n, i = dec_varint(raw, i)
            assert k >> 3 == 2 and value_type == "uint64"
            value = n
            continue
        n, i = dec_varint(raw, i)
        s = bytes(raw[i:i + n]).decode("utf-8")
        i += n
        if k >> 3 == 1:
            key = s
        elif k >> 3 == 2:
            value = s
    return (key, value), i


def dec_single(f, raw):
    if f.type == "string":
        return bytes(raw).decode("utf-8")
    if f.type == "bytes":
        return bytes(raw)
    return decode_message(f.type, raw)[0]


def strip_defaults(msg, value):
    """The value as a decoder sees it: proto3 defaults (other than oneof members) removed."""
    out = {}
    for name, v in value.items():
        if name == "__unknown__":
            continue
        f = fields_by_name(msg)[name]
        if not f.oneof and is_default(f, v):
            continue
        if f.type not in VARINT_TYPES | LEN_SCALARS | {"map"}:
            v = [strip_defaults(f.type, x) for x in v] if f.repeated else strip_defaults(f.type, v)
        out[name] = v
    return out


def to_json(msg, value):
    """Canonical proto3 JSON: lowerCamelCase names, 64-bit integers as strings, bytes as
    standard padded base64, default values omitted, fields in field-number order."""
    out = {}
    for number in sorted(SCHEMA[msg]):
        f = SCHEMA[msg][number]
        if f.name not in value:
            continue
        v = value[f.name]
        if not f.oneof and is_default(f, v):
            continue
        if f.type == "map":
            # proto3 JSON: map values as their scalar type maps (64-bit integers as strings).
            out[f.json_name] = {k: (str(int(x)) if f.map_types[1] in ("uint64", "int64") else x)
                                for k, x in v.items()}
        elif f.repeated:
            out[f.json_name] = [json_scalar(f, x) for x in v]
        else:
            out[f.json_name] = json_scalar(f, v)
    return out


def json_scalar(f, v):
    if f.type in ("uint64", "int64"):
        return str(int(v))
    if f.type in ("uint32", "int32"):
        return int(v)
    if f.type == "bool":
        return bool(v)
    if f.type == "string":
        return v
    if f.type == "bytes":
        return base64.b64encode(bytes(v)).decode("ascii")
    return to_json(f.type, v)


def to_text_format(msg, value, indent=""):
    """protobuf text format, only for the optional `protoc --encode` cross-check."""
    lines = []

    def quote(b):
        s = ""
        for c in b:
            ch = chr(c)
            if ch in "\"\\":
                s += "\\" + ch
            elif 0x20 <= c < 0x7F:
                s += ch
            else:
                s += "\\%03o" % c
        return '"' + s + '"'

    def scalar(f, v):
        if f.type == "bool":
            return "true" if v else "false"
        if f.type in VARINT_TYPES:
            return str(int(v))
        if f.type == "string":
            return quote(v.encode("utf-8"))
        return quote(bytes(v))

    for number in sorted(SCHEMA[msg]):
        f = SCHEMA[msg][number]
        if f.name not in value:
            continue
        v = value[f.name]
        if f.type == "map":
            for k, val in v.items():
                shown = str(int(val)) if f.map_types[1] == "uint64" else quote(val.encode())
                lines.append("%s%s { key: %s value: %s }" % (
                    indent, f.name, quote(k.encode()), shown))
            continue
        for x in (v if f.repeated else [v]):
            if f.type in VARINT_TYPES | LEN_SCALARS:
                lines.append("%s%s: %s" % (indent, f.name, scalar(f, x)))
            else:
                lines.append("%s%s {" % (indent, f.name))
                lines.append(to_text_format(f.type, x, indent + "  "))
                lines.append("%s}" % indent)
    return "\n".join(l for l in lines if l)


# Backup files (PROTOCOL.md section 14).
BACKUP_MAGIC = b"KMSDBKUP"
BACKUP_VERSION = 1


def backup_keys(root_key):
    """The root key's fingerprint (8 bytes) and backup MAC key (32 bytes)."""
    return (hkdf_sha256(root_key, b"", b"kmsd/v2/root-key-fingerprint", 8),
            hkdf_sha256(root_key, b"", b"kmsd/v1/backup-mac", 32))


def build_backup(root_key, created_at, payload):
    fingerprint, mac_key = backup_keys(root_key)
    header = (BACKUP_MAGIC + struct.pack(">H", BACKUP_VERSION) + fingerprint
              + struct.pack(">QQ", created_at, len(payload)))
    assert len(header) == 34
    body = header + payload
    return {"fingerprint": fingerprint, "mac_key": mac_key, "header": header,
            "tag": hmac.new(mac_key, body, hashlib.sha256).digest(),
            "file": body + hmac.new(mac_key, body, hashlib.sha256).digest(),
            "created_at": created_at, "payload": payload}


class BackupRefused(Exception):
    pass


def open_backup(root_key, data):
    """A separate reader: the payload of an authentic backup under root_key, else raises."""
    if len(data) < 34:
        raise BackupRefused("truncated")
    if data[:8] != BACKUP_MAGIC:
        raise BackupRefused("not a kmsd backup")
    (version,) = struct.unpack(">H", data[8:10])
    if version != BACKUP_VERSION:
        raise BackupRefused("version")
    fingerprint, mac_key = backup_keys(root_key)
    if data[10:18] != fingerprint:
        raise BackupRefused("root key")
    _, length = struct.unpack(">QQ", data[18:34])
    if len(data) < 34 + length + 32:
        raise BackupRefused("truncated")
    if len(data) > 34 + length + 32:
        raise BackupRefused("after its authentication tag")
    expected = hmac.new(mac_key, data[:34 + length], hashlib.sha256).digest()
    if not hmac.compare_digest(expected, data[34 + length:]):
        raise BackupRefused("authentication tag")
    return data[34:34 + length]


def identity_fingerprint(region, agreement_public, signing_public):
    """Section 15.1: the first 16 bytes of HMAC-SHA256 under a fixed label, as hex."""
    data = struct.pack(">I", len(region.encode())) + region.encode() + agreement_public + signing_public
    return hmac.new(b"kmsd/v1/replication-identity", data, hashlib.sha256).digest()[:16].hex()


def identity_of(region, label):
    """A replication identity with keys derived from a label (X25519 and Ed25519 private keys)."""
    from cryptography.hazmat.primitives.asymmetric import ed25519, x25519
    from cryptography.hazmat.primitives import serialization
    raw = serialization.Encoding.Raw, serialization.PublicFormat.Raw
    agreement = x25519.X25519PrivateKey.from_private_bytes(fixed_bytes(label + "/agreement", 32))
    signing = ed25519.Ed25519PrivateKey.from_private_bytes(fixed_bytes(label + "/signing", 32))
    a, g = agreement.public_key().public_bytes(*raw), signing.public_key().public_bytes(*raw)
    return {"region": region, "agreement_public_key": a, "signing_public_key": g,
            "fingerprint": identity_fingerprint(region, a, g),
            "agreement_private": fixed_bytes(label + "/agreement", 32), "signing_private": signing}


# Replication bundles (PROTOCOL.md section 15.4).
BUNDLE_SIGNATURE_LABEL = b"kmsd/v1/replication-bundle"
BUNDLE_WRAP_LABEL = b"kmsd/v1/replication-wrap"
BUNDLE_VERSION_LABEL = b"kmsd/v1/replicated-version"


def bundle_key(shared, ephemeral_public, target_public, key_id, sequence):
    return hkdf_sha256(shared, ephemeral_public + target_public,
                       BUNDLE_WRAP_LABEL + lp(key_id.encode()) + struct.pack(">Q", sequence))


def version_aad(key_id, version):
    return BUNDLE_VERSION_LABEL + lp(key_id.encode()) + struct.pack(">I", version)


def build_bundle(source, target, key_id, sequence, versions, label, description="", tags=(), policy=""):
    """A signed bundle of `versions` [(number, created_at, rotation_type, material)]."""
    from cryptography.hazmat.primitives.asymmetric import x25519
    from cryptography.hazmat.primitives import serialization
    raw = serialization.Encoding.Raw, serialization.PublicFormat.Raw
    eph = x25519.X25519PrivateKey.from_private_bytes(fixed_bytes(label + "/ephemeral", 32))
    eph_public = eph.public_key().public_bytes(*raw)
    shared = eph.exchange(x25519.X25519PublicKey.from_public_bytes(target["agreement_public_key"]))
    kek = bundle_key(shared, eph_public, target["agreement_public_key"], key_id, sequence)
    wrapped = []
    for number, created_at, rotation_type, material in versions:
        nonce = fixed_bytes(label + "/nonce/%d" % number, 12)
        wrapped.append({"version": number, "created_at": created_at, "rotation_type": rotation_type,
                        "nonce": nonce,
                        "wrapped_material": AESGCM(kek).encrypt(nonce, material, version_aad(key_id, number))})
    bundle = {"format": 1, "source_region": source["region"],
              "source_signing_public_key": source["signing_public_key"],
              "target_region": target["region"], "target_agreement_public_key": target["agreement_public_key"],
              "sequence": sequence, "key_id": key_id, "creation_date": 1700000000,
              "description": description, "tags": list(tags), "policy": policy,
              "ephemeral_public_key": eph_public, "versions": wrapped,
              "primary_region": source["region"], "replica_regions": []}
    body = encode_message("ReplicationBundle", bundle)
    signature = source["signing_private"].sign(BUNDLE_SIGNATURE_LABEL + body)
    signed = encode_message("SignedReplicationBundle", {"bundle": body, "signature": signature})
    return signed, bundle, kek


def open_bundle(signed, target, pinned_source):
    """A separate reader: verifies and unwraps; returns {version: material}."""
    from cryptography.hazmat.primitives.asymmetric import ed25519, x25519
    outer, _ = decode_message("SignedReplicationBundle", signed)
    body, signature = outer["bundle"], outer["signature"]
    ed25519.Ed25519PublicKey.from_public_bytes(pinned_source["signing_public_key"]).verify(
        signature, BUNDLE_SIGNATURE_LABEL + body)
    b, _ = decode_message("ReplicationBundle", body)
    assert b["target_region"] == target["region"]
    assert b["target_agreement_public_key"] == target["agreement_public_key"]
    mine = x25519.X25519PrivateKey.from_private_bytes(target["agreement_private"])
    shared = mine.exchange(x25519.X25519PublicKey.from_public_bytes(b["ephemeral_public_key"]))
    kek = bundle_key(shared, b["ephemeral_public_key"], target["agreement_public_key"], b["key_id"], int(b["sequence"]))
    return {v["version"]: AESGCM(kek).decrypt(v["nonce"], v["wrapped_material"], version_aad(b["key_id"], v["version"]))
            for v in b["versions"]}


def identity_message(identity):
    return {k: identity[k] for k in ("region", "agreement_public_key", "signing_public_key", "fingerprint")}


def lp(b):
    return struct.pack(">I", len(b)) + b


EAST = identity_of("east", "identity/east")
WEST = identity_of("west", "identity/west")
assert EAST["fingerprint"] != WEST["fingerprint"] and len(EAST["fingerprint"]) == 32
# An mrk- key id: 16 bytes with 8 in the high nibble of byte 6 (section 15.3).
_mrk = bytearray(fixed_bytes("mrk/key-id", 16))
_mrk[6] = (_mrk[6] & 0x0F) | 0x80
MRK_KEY_ID = "mrk-" + bytes(_mrk).hex()
MRK_VERSIONS = [(1, 1700000000, "", fixed_bytes("mrk/material/1", 32)),
                (2, 1700086400, "ON_DEMAND", fixed_bytes("mrk/material/2", 32))]


def build_replication_vectors():
    signed, bundle, kek = build_bundle(EAST, WEST, MRK_KEY_ID, 1700090000000000, MRK_VERSIONS, "bundle/1",
                                       description="orders")
    opened = open_bundle(signed, WEST, EAST)
    assert opened == {n: m for n, _, _, m in MRK_VERSIONS}
    # A bundle altered anywhere must not verify.
    for at in (10, len(signed) // 2, len(signed) - 1):
        b = bytearray(signed)
        b[at] ^= 1
        try:
            open_bundle(bytes(b), WEST, EAST)
            raise AssertionError("an altered bundle opened")
        except Exception as e:
            if isinstance(e, AssertionError) and "altered bundle opened" in str(e):
                raise
    return {
        "key_id": MRK_KEY_ID,
        "source_region": EAST["region"],
        "source_signing_public_key_hex": EAST["signing_public_key"].hex(),
        "source_agreement_public_key_hex": EAST["agreement_public_key"].hex(),
        "target_region": WEST["region"],
        "target_agreement_private_key_hex": WEST["agreement_private"].hex(),
        "target_signing_public_key_hex": WEST["signing_public_key"].hex(),
        "sequence": bundle["sequence"],
        "wrapping_key_hex": kek.hex(),
        "versions": [{"version": n, "material_hex": m.hex()} for n, _, _, m in MRK_VERSIONS],
        "signed_bundle_hex": signed.hex(),
    }, signed


REPLICATION, REPLICATION_BUNDLE = build_replication_vectors()


def mrk_metadata(kind, replicas):
    arn = "kmsd:key/" + MRK_KEY_ID
    return {"key_id": MRK_KEY_ID, "arn": arn, "creation_date": 1700000000, "enabled": True,
            "description": "orders", "key_usage": "ENCRYPT_DECRYPT", "key_state": "Enabled",
            "key_spec": "SYMMETRIC_DEFAULT", "origin": "AWS_KMS", "key_manager": "CUSTOMER",
            "encryption_algorithms": ["SYMMETRIC_DEFAULT"], "owner_uid": 0, "current_key_version": 2,
            "minimum_decryption_version": 1, "multi_region": True,
            "multi_region_configuration": {
                "multi_region_key_type": kind, "primary_key": {"arn": arn, "region": "east"},
                "replica_keys": [{"arn": arn, "region": r} for r in replicas]}}


BACKUP_ROOT_KEY = fixed_bytes("backup/root-key", 32)
# The payload stands in for a keystore (an SQLite file); the format does not look inside it.
BACKUP = build_backup(BACKUP_ROOT_KEY, 1700003600, b"SQLite format 3\x00" + fixed_bytes("backup/payload", 100))
BACKUP_ID = fixed_bytes("backup/id", 16).hex()


def build_backup_vectors():
    good = BACKUP["file"]
    n = len(good)

    def flip(at):
        b = bytearray(good)
        b[at] ^= 0x01
        return bytes(b)
    other_root = fixed_bytes("backup/other-root-key", 32)
    invalid = [
        ("truncated-header", good[:20], BACKUP_ROOT_KEY, "truncated"),
        ("truncated-payload", good[:34 + 50], BACKUP_ROOT_KEY, "truncated"),
        ("truncated-tag", good[:n - 1], BACKUP_ROOT_KEY, "truncated"),
        ("extended", good + b"\x00", BACKUP_ROOT_KEY, "after its authentication tag"),
        ("bad-magic", b"KMSDBKUQ" + good[8:], BACKUP_ROOT_KEY, "not a kmsd backup"),
        ("version-2", good[:8] + b"\x00\x02" + good[10:], BACKUP_ROOT_KEY, "version"),
        ("flipped-created-at", flip(20), BACKUP_ROOT_KEY, "authentication tag"),
        ("flipped-payload", flip(34 + 40), BACKUP_ROOT_KEY, "authentication tag"),
        ("flipped-tag", flip(n - 1), BACKUP_ROOT_KEY, "authentication tag"),
        ("other-root-key", good, other_root, "root key"),
    ]
    assert open_backup(BACKUP_ROOT_KEY, good) == BACKUP["payload"]
    out = []
    for name, data, root, reason in invalid:
        try:
            open_backup(root, data)
            raise AssertionError(name + " opened")
        except BackupRefused as e:
            assert reason in str(e), (name, str(e))
        out.append({"name": name, "root_key_hex": root.hex(), "backup_hex": data.hex(), "fails_with": reason})
    valid = {
        "root_key_hex": BACKUP_ROOT_KEY.hex(),
        "root_key_fingerprint_hex": BACKUP["fingerprint"].hex(),
        "backup_mac_key_hex": BACKUP["mac_key"].hex(),
        "created_at": BACKUP["created_at"],
        "payload_hex": BACKUP["payload"].hex(),
        "header_hex": BACKUP["header"].hex(),
        "tag_hex": BACKUP["tag"].hex(),
        "backup_hex": good.hex(),
    }
    return valid, out


def frame(body):
    return u32be(len(body)) + body


# ---------------------------------------------------------------------------------------------
# Key policies (PROTOCOL.md section 7.1.1): the default policy as GetKeyPolicy writes it out,
# and the example policies of the frames. Policies travel as JSON text in string fields.
# ---------------------------------------------------------------------------------------------

def default_key_policy(owner_uid):
    """The default key policy, character for character as kmsd writes it out (no final
    newline), for a key created by `owner_uid`."""
    return ('{\n'
            '  "Version": "2012-10-17",\n'
            '  "Id": "kmsd-default-key-policy",\n'
            '  "Statement": [\n'
            '    {\n'
            '      "Sid": "KeyCreator",\n'
            '      "Effect": "Allow",\n'
            '      "Principal": {"Uid": "%d"},\n'
            '      "Action": "kms:*",\n'
            '      "Resource": "*"\n'
            '    },\n'
            '    {\n'
            '      "Sid": "Administrators",\n'
            '      "Effect": "Allow",\n'
            '      "Principal": {"Role": "Administrators"},\n'
            '      "Action": "kms:*",\n'
            '      "Resource": "*"\n'
            '    },\n'
            '    {\n'
            '      "Sid": "EnableIdentityPolicies",\n'
            '      "Effect": "Allow",\n'
            '      "Principal": {"Role": "IdentityPolicies"},\n'
            '      "Action": "kms:*",\n'
            '      "Resource": "*"\n'
            '    }\n'
            '  ]\n'
            '}') % owner_uid


POLICY_ADMINISTRATORS = ('{"Sid": "Administrators", "Effect": "Allow", '
                         '"Principal": {"Role": "Administrators"}, "Action": "kms:*", '
                         '"Resource": "*"}')
POLICY_ORDERS = ('{"Version": "2012-10-17", "Statement": [' + POLICY_ADMINISTRATORS + ', '
                 '{"Sid": "OrdersEncrypts", "Effect": "Allow", '
                 '"Principal": {"Unit": "orders.service"}, "Action": "kms:Encrypt", '
                 '"Resource": "*", "Condition": {"StringEquals": '
                 '{"kms:EncryptionContext:app": "orders"}}}]}')
POLICY_PAYROLL = ('{"Version": "2012-10-17", "Statement": [' + POLICY_ADMINISTRATORS + ', '
                  '{"Sid": "PayrollDecrypts", "Effect": "Allow", '
                  '"Principal": {"Group": "1000"}, "Action": "kms:Decrypt", "Resource": "*", '
                  '"Condition": {"StringEquals": {"kms:EncryptionContext:dept": "payroll"}}}]}')


def grant_id(label):
    """A grant id: 64 lowercase hex digits (random in real use; fixed bytes here)."""
    return fixed_bytes("grant id/" + label, 32).hex()


GRANT_TOKEN_PREFIX = "kmsd-grant-token-v1:"


def grant_token(key_id, gid):
    """A grant token as kmsd writes it (section 7.1.3): it names the grant, it is no secret."""
    return GRANT_TOKEN_PREFIX + key_id + ":" + gid


def parse_grant_token(token):
    assert token.startswith(GRANT_TOKEN_PREFIX)
    key_id, gid = token[len(GRANT_TOKEN_PREFIX):].split(":")
    assert len(key_id) == 36 and len(gid) == 64 and int(gid, 16) >= 0
    return key_id, gid


def compact_json(value):
    """JSON as ReviewAccess writes a Condition block or grant constraints: compact, keys sorted."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def review_entries_of(policy_text):
    """The ReviewAccess entries (section 7.43) of a key policy's statements, as written."""
    doc = json.loads(policy_text)
    statements = doc["Statement"] if isinstance(doc["Statement"], list) else [doc["Statement"]]
    entries = []
    for i, st in enumerate(statements):
        field = "Principal" if "Principal" in st else "NotPrincipal"
        raw = st[field]
        if raw == "*":
            principals = ["*"]
        else:
            principals = []
            for kind in sorted(raw):
                values = raw[kind] if isinstance(raw[kind], list) else [raw[kind]]
                principals += ["%s:%s" % (kind, v) for v in values]
        afield = "Action" if "Action" in st else "NotAction"
        actions = st[afield] if isinstance(st[afield], list) else [st[afield]]
        flags = []
        if raw == "*" or (field == "NotPrincipal" and st["Effect"] == "Allow"):
            flags.append("wildcard-principal")
        if any(a.endswith("*") for a in actions) or afield == "NotAction":
            flags.append("wildcard-action")
        if raw == {"Role": "IdentityPolicies"}:
            flags.append("delegates-to-identity-policies")
        entry = {"source": "key-policy:" + (st.get("Sid") or "#%d" % i), "effect": st["Effect"],
                 "principals": principals, "actions": actions, "flags": flags}
        if field == "NotPrincipal":
            entry["not_principal"] = True
        if afield == "NotAction":
            entry["not_action"] = True
        if "Condition" in st:
            entry["conditions"] = compact_json(st["Condition"])
        entries.append(entry)
    return entries


def check_policy_shape(text):
    """A light check that a policy of the frames keeps to the grammar of section 7.1.1 (the
    server's parser is the authority): JSON, the known members only, unique Sids, at most
    32768 bytes, and an Administrators statement so that it passes the lockout check for an
    administrator."""
    assert len(text.encode("utf-8")) <= 32768
    doc = json.loads(text)
    assert set(doc) <= {"Version", "Id", "Statement"} and doc.get("Version") == "2012-10-17"
    statements = doc["Statement"] if isinstance(doc["Statement"], list) else [doc["Statement"]]
    sids = [s["Sid"] for s in statements if s.get("Sid")]
    assert len(sids) == len(set(sids))
    for s in statements:
        assert set(s) <= {"Sid", "Effect", "Principal", "NotPrincipal", "Action", "NotAction",
                          "Resource", "Condition"}
        assert s["Effect"] in ("Allow", "Deny")
        assert ("Principal" in s) != ("NotPrincipal" in s)
        assert ("Action" in s) != ("NotAction" in s)
        assert s.get("Resource", "*") in ("*", ["*"])
        if s.get("Principal") == {"Role": "IdentityPolicies"}:
            # A delegating statement: an Allow with Principal naming only that role.
            assert s["Effect"] == "Allow"
    assert any(s.get("Principal") == {"Role": "Administrators"} and s["Effect"] == "Allow"
               and s.get("Action") == "kms:*" for s in statements)


# ---------------------------------------------------------------------------------------------
# Audit chain (AUDIT.md "KMS_CHAIN" and "Checkpoint"): the keyed hash chain over kmsd's journald
# records, and the checkpoint kmsd keeps in its keystore so the next run links to this one.
# ---------------------------------------------------------------------------------------------

AUDIT_RECORD_MAC_INFO = b"kmsd/v1/keystore-record-mac"
AUDIT_CHAIN_KEY_INFO = b"kmsd/v1/audit-chain-key"
AUDIT_CHAIN_LABEL = b"kmsd/v1/audit-chain"
AUDIT_CHECKPOINT_LABEL = b"kmsd/v1/audit-checkpoint"
AUDIT_CHAINED_NAMES = {"MESSAGE", "MESSAGE_ID", "PRIORITY", "SYSLOG_IDENTIFIER"}
AUDIT_REQUEST_MESSAGE_ID = "3f1c2a4e9b7d4c2e8a6f0d1b5e9c7a31"
AUDIT_EVENT_MESSAGE_ID = "c1b7e0f4a2d94e8b9f3a6d5c2e1b0a97"


def audit_keys(root_key):
    """(record MAC key, chain key): HKDF-SHA256 without salt, as PROTOCOL.md section 11."""
    record_mac_key = hkdf_sha256(root_key, None, AUDIT_RECORD_MAC_INFO)
    return record_mac_key, hkdf_sha256(record_mac_key, None, AUDIT_CHAIN_KEY_INFO)


def lp(b):
    return u32be(len(b)) + b


def audit_chained(name):
    return (name.startswith("KMS_") and name != "KMS_CHAIN") or name in AUDIT_CHAINED_NAMES


def audit_chain_input(previous, fields):
    """label || lp(previous chain) || lp(name) || lp(value) for each chained field, sorted by
    the UTF-8 bytes of the name. `fields`: (name, value) pairs in any order."""
    assert len(previous) == 32
    chained = sorted(((n, v) for n, v in fields if audit_chained(n)), key=lambda f: f[0].encode())
    names = [n for n, _ in chained]
    assert len(names) == len(set(names)), "a field name twice"
    out = AUDIT_CHAIN_LABEL + lp(previous)
    for name, value in chained:
        out += lp(name.encode("utf-8")) + lp(value.encode("utf-8"))
    return out


def audit_chain(chain_key, previous, fields):
    return hmac.new(chain_key, audit_chain_input(previous, fields), hashlib.sha256).digest()


def audit_checkpoint(chain_key, run_id_hex, seq, chain, clean):
    body = bytes.fromhex(run_id_hex) + struct.pack(">Q", seq) + chain + bytes([1 if clean else 0])
    assert len(body) == 57
    return body + hmac.new(chain_key, AUDIT_CHECKPOINT_LABEL + body, hashlib.sha256).digest()


def audit_record(kind, action, principal, run_id, seq, message, result="Allowed", error="",
                 key_id="", key_version="", alias="", request_id=0, context_keys="",
                 decided_by="", duration_us=0, extra=()):
    """A record's fields in the order kmsd writes them (AuditLog.swift), without KMS_CHAIN."""
    priority = ({"Allowed": 5}.get(result, 3) if kind == "event"
                else {"Allowed": 6, "Denied": 4}.get(result, 3))
    uid, gid, pid, user, exe, unit = principal
    return [
        ("MESSAGE", message),
        ("MESSAGE_ID", AUDIT_EVENT_MESSAGE_ID if kind == "event" else AUDIT_REQUEST_MESSAGE_ID),
        ("PRIORITY", str(priority)),
        ("SYSLOG_IDENTIFIER", "kmsd"),
        ("KMS_ACTION", action),
        ("KMS_RESULT", result),
        ("KMS_ERROR", error),
        ("KMS_KEY_ID", key_id),
        ("KMS_KEY_VERSION", str(key_version)),
        ("KMS_ALIAS", alias),
        ("KMS_REQUEST_ID", str(request_id)),
        ("KMS_PEER_UID", str(uid)),
        ("KMS_PEER_GID", str(gid)),
        ("KMS_PEER_PID", str(pid)),
        ("KMS_PEER_USER", user),
        ("KMS_PEER_EXE", exe),
        ("KMS_PEER_UNIT", unit),
        ("KMS_PEER_UNRESOLVED", ""),
        ("KMS_ENCRYPTION_CONTEXT", context_keys),
        ("KMS_DECIDED_BY", decided_by),
        ("KMS_DURATION_US", str(duration_us)),
    ] + list(extra) + [("KMS_RUN_ID", run_id), ("KMS_SEQ", str(seq))]


def build_audit_example():
    """A run's first two records as journalctl shows them, the checkpoint of the run before
    that the first one links to, and one record altered after the fact."""
    root_key = fixed_bytes("audit/root key", 32)
    record_mac_key, chain_key = audit_keys(root_key)
    previous_run, previous_seq = fixed_bytes("audit/previous run id", 16).hex(), 1234
    previous_chain = fixed_bytes("audit/previous run's last KMS_CHAIN", 32)
    checkpoint = audit_checkpoint(chain_key, previous_run, previous_seq, previous_chain, True)
    run = fixed_bytes("audit/run id", 16).hex()
    kmsd = (998, 998, 4100, "kmsd", "", "")
    alice = (1000, 1000, 4242, "alice", "/usr/bin/python3.11", "billing.service")
    started = audit_record(
        "event", "KmsdStarted", kmsd, run, 1,
        "kmsd started (run %s); the previous run stopped cleanly" % run,
        extra=[("KMS_PREVIOUS_STOP", "clean"), ("KMS_PREVIOUS_RUN_ID", previous_run),
               ("KMS_PREVIOUS_SEQ", str(previous_seq)),
               ("KMS_PREVIOUS_CHAIN", previous_chain.hex())])
    encrypt = audit_record(
        "request", "Encrypt", alice, run, 2,
        "Encrypt by uid 1000 (alice) allowed on key %s" % KEY_A,
        key_id=KEY_A, key_version=1, request_id=7, context_keys="purpose",
        decided_by="key-policy:KeyCreator", duration_us=41)
    records, inputs, chains, previous = [], [], [], previous_chain
    for fields in (started, encrypt):
        chain = audit_chain(chain_key, previous, fields)
        inputs.append(audit_chain_input(previous, fields))
        chains.append(chain)
        records.append({"previous_chain": previous,
                        "fields": [{"name": n, "value": v} for n, v in fields + [("KMS_CHAIN", chain.hex())]]})
        previous = chain
    # The Encrypt record again, its key id changed in the journal: its KMS_CHAIN no longer fits.
    altered = [(n, KEY_B if n == "KMS_KEY_ID" else v) for n, v in encrypt]
    inputs.append(audit_chain_input(chains[0], altered))
    chains.append(audit_chain(chain_key, chains[0], altered))
    records.append({"previous_chain": chains[0],
                    "fields": [{"name": n, "value": v} for n, v in altered + [("KMS_CHAIN", chains[1].hex())]]})
    extra = {
        "audit_root_key_hex": root_key.hex(),
        "audit_record_mac_key_hex": record_mac_key.hex(),
        "audit_chain_key_hex": chain_key.hex(),
        "audit_previous_checkpoint_hex": checkpoint.hex(),
        "audit_chain_inputs_hex": [i.hex() for i in inputs],
        "audit_computed_chains_hex": [c.hex() for c in chains],
    }
    return run, records, [True, True, False], extra


# Status (PROTOCOL.md section 7.45): the latency buckets of this version, in microseconds.
STATUS_BUCKETS_MICROS = [50, 100, 250, 500, 1000, 2500, 5000, 10000, 25000, 100000, 1000000]


def status_percentile(fraction, histograms):
    """The upper bound of the bucket holding the given percentile over every action, as
    section 7.45 defines it: 2**64 - 1 for the +Inf bucket, 0 before any request."""
    buckets = [sum(h["bucket_counts"][i] for h in histograms)
               for i in range(len(STATUS_BUCKETS_MICROS) + 1)]
    total = sum(buckets)
    if total == 0:
        return 0
    target, seen = -(-total * fraction // 1), 0      # ceil(total * fraction)
    for i, n in enumerate(buckets):
        seen += n
        if seen >= target:
            return STATUS_BUCKETS_MICROS[i] if i < len(STATUS_BUCKETS_MICROS) else 2**64 - 1
    return 2**64 - 1


def build_status_example(run_id):
    requests = [("Decrypt", "Allowed", 40), ("Decrypt", "Denied", 21), ("Encrypt", "Allowed", 41)]
    latencies = [
        {"action": "Decrypt", "bucket_upper_micros": STATUS_BUCKETS_MICROS,
         "bucket_counts": [0, 21, 34, 5, 1, 0, 0, 0, 0, 0, 0, 0], "sum_micros": 9150, "count": 61},
        {"action": "Encrypt", "bucket_upper_micros": STATUS_BUCKETS_MICROS,
         "bucket_counts": [0, 25, 14, 2, 0, 0, 0, 0, 0, 0, 0, 0], "sum_micros": 5210, "count": 41},
    ]
    return {
        "server_version": "0.1.0",
        "started_at": 1700000000,
        "uptime_seconds": 3600,
        "keys_by_state": {"Enabled": 3},
        "requests": [{"action": a, "result": r, "count": n} for a, r, n in requests],
        "latencies": latencies,
        "latency_p50_micros": status_percentile(0.5, latencies),
        "latency_p99_micros": status_percentile(0.99, latencies),
        "key_cache_entries": 3,
        "key_cache_capacity": 4096,
        "connections": 1,                 # the caller's own
        "audit_run_id": run_id,
        # KmsdStarted, the 102 requests' records and the alarm's (not the Status request's own).
        "audit_sequence": 1 + 102 + 1,
        "identity_policies": 1,
        "alarms": {"AccessDeniedRate": 1},
        # Allowed Encrypts and Decrypts that reused their connection's remembered decision: at
        # most the allowed ones, less each connection's first of each kind.
        "access_decisions_reused": 70,
    }


def build_frames(valid_ciphertexts):
    ct = {v["name"]: v for v in valid_ciphertexts}
    enc = ct["one-pair"]
    blob = bytes.fromhex(enc["ciphertext_blob_hex"])

    # A GenerateDataKey answer: a 32-byte data key sealed exactly like Encrypt would seal it.
    data_key = fixed_bytes("data key/AES_256", 32)
    dk_ctx = {"bucket": "invoices"}
    dk = encrypt(KEY_A, 1, MATERIAL[(KEY_A, 1)], fixed_bytes("salt/generate-data-key", 32),
                 fixed_bytes("nonce/generate-data-key", 12), dk_ctx, data_key)
    assert decrypt(MATERIAL[(KEY_A, 1)], dk["blob"], dk_ctx)[1] == data_key

    # Exactly as kmsd's Dispatcher.operations lists them (a set: clients must not rely on the
    # order, PROTOCOL.md section 5).
    operations = ["Hello", "WhoAmI", "CreateKey", "DescribeKey", "ListKeys", "EnableKey",
                  "DisableKey", "ScheduleKeyDeletion", "CancelKeyDeletion",
                  "UpdateKeyDescription", "CreateAlias", "UpdateAlias", "DeleteAlias",
                  "ListAliases", "TagResource", "UntagResource", "ListResourceTags",
                  "EnableKeyRotation", "DisableKeyRotation", "GetKeyRotationStatus",
                  "RotateKeyOnDemand", "ListKeyRotations", "SetMinimumDecryptionVersion",
                  "GetParametersForImport", "ImportKeyMaterial", "DeleteImportedKeyMaterial",
                  "GetKeyPolicy", "PutKeyPolicy", "ListKeyPolicies", "SimulatePolicy",
                  "CreateGrant", "ListGrants", "ListRetirableGrants", "RetireGrant",
                  "RevokeGrant", "ReviewAccess", "VerifyAuditRecords", "Status",
                  "CreateBackup", "GetBackupChunk", "GetReplicationIdentity",
                  "PinReplicationIdentity", "ReplicateKey", "ImportReplica",
                  "UpdatePrimaryRegion", "Encrypt", "Decrypt", "ReEncrypt", "GenerateDataKey",
                  "GenerateDataKeyWithoutPlaintext", "GenerateRandom"]
    assert len(operations) == 51 and len(set(operations)) == 51
    metadata = {
        "key_id": KEY_A,
        "arn": "kmsd:key/" + KEY_A,
        "creation_date": 1700000000,
        "enabled": True,
        "description": "example key",
        "key_usage": "ENCRYPT_DECRYPT",
        "key_state": "Enabled",
        "key_spec": "SYMMETRIC_DEFAULT",
        "origin": "AWS_KMS",
        "key_manager": "CUSTOMER",
        "encryption_algorithms": ["SYMMETRIC_DEFAULT"],
        "owner_uid": 0,                # created by root: 0 is the default and is not encoded
        "current_key_version": 1,
        "minimum_decryption_version": 1,   # field 16: kmsd always sends it, 1 = none retired
    }
    # The same key after ScheduleKeyDeletion with a 7-day window, as DescribeKey shows it:
    # `enabled` false (so not encoded), deletion date and window set (fields 14 and 15).
    deletion_date = metadata["creation_date"] + 7 * 86400
    pending_metadata = dict(metadata, enabled=False, key_state="PendingDeletion",
                            deletion_date=deletion_date, pending_deletion_window_in_days=7)
    # Rotation (sections 7.25-7.30) of key A: automatic rotation every 180 days turned on at
    # 1700000000, an on-demand rotation at 1700003600 (version 2), the automatic one when it
    # came due (version 3), then versions below 2 retired.
    rotation_period = 180
    next_rotation = metadata["creation_date"] + rotation_period * 86400
    rotated_metadata = dict(metadata, current_key_version=3, minimum_decryption_version=2)
    retired_version = ct["one-pair"]["key_version"]
    assert retired_version == 1 and enc["key_id"] == KEY_A
    # Bring your own key (sections 7.31-7.33): key C is created with Origin EXTERNAL at
    # 1700000000, gets its material wrapped with RSAES_OAEP_SHA_256 (no expiry), is given the
    # same material again with RSA_AES_KEY_WRAP_SHA_256 and an expiry, and loses it again.
    external_metadata = dict(metadata, key_id=KEY_C, arn="kmsd:key/" + KEY_C, enabled=False,
                             description="imported key", key_state="PendingImport",
                             origin="EXTERNAL")
    imported = fixed_bytes("key material/C/imported", 32)
    import_params = []
    for label, algorithm, issued in (("C/1", "RSAES_OAEP_SHA_256", 1700000000),
                                     ("C/2", "RSA_AES_KEY_WRAP_SHA_256", 1700003600)):
        private_key, spki, pkcs8 = wrapping_key(label)
        token = fixed_bytes("import token/" + label, 32)
        wrapped, inputs = wrap_key_material(private_key, algorithm, imported, label)
        assert unwrap_key_material(private_key, algorithm, wrapped) == imported
        import_params.append({"algorithm": algorithm, "spki": spki, "pkcs8": pkcs8,
                              "token": token, "valid_to": issued + 86400, "wrapped": wrapped,
                              "inputs": inputs})
    oaep, kwp = import_params
    material_valid_to = 1700003600 + 30 * 86400
    imported_metadata = dict(external_metadata, enabled=True, key_state="Enabled",
                             expiration_model="KEY_MATERIAL_EXPIRES", valid_to=material_valid_to)
    # Key policies (sections 7.1.1, 7.34-7.37). Key A, created by root, has the default policy
    # until `put-key-policy-request` gives it POLICY_ORDERS: administrators keep every right, and
    # whatever runs in orders.service may Encrypt with the context app=orders.
    default_policy_a = default_key_policy(metadata["owner_uid"])
    policy_orders = POLICY_ORDERS
    policy_payroll = POLICY_PAYROLL
    for text in (default_policy_a, policy_orders, policy_payroll):
        check_policy_shape(text)
    policy_metadata = dict(metadata, key_id=KEY_D, arn="kmsd:key/" + KEY_D,
                           creation_date=1700000000, description="payroll")
    # Grants (sections 7.1.3, 7.38-7.42) on key A, under POLICY_ORDERS: root gives uid 1000
    # Encrypt and Decrypt with contexts holding app=orders, retirable by uid 1001, at 1700000000.
    grant = {
        "key_id": KEY_A, "grant_id": grant_id("orders-app"), "name": "orders-app",
        "creation_date": 1700000000, "grantee_principal": "uid:1000",
        "retiring_principal": "uid:1001", "issuing_principal": "uid:0",
        "operations": ["Encrypt", "Decrypt"],
        "constraints": {"encryption_context_subset": {"app": "orders"}},
    }
    token = grant_token(KEY_A, grant["grant_id"])
    assert parse_grant_token(token) == (KEY_A, grant["grant_id"])
    revoked_grant_id = grant_id("payroll-reports")
    # ReviewAccess of key A then: POLICY_ORDERS's two statements as written, then the grant.
    review_entries = review_entries_of(POLICY_ORDERS) + [{
        "source": "grant:" + grant["grant_id"], "effect": "Allow",
        "principals": [grant["grantee_principal"]],
        "actions": ["kms:" + op for op in grant["operations"]],
        "conditions": compact_json({"EncryptionContextSubset":
                                    grant["constraints"]["encryption_context_subset"]})}]
    audit_run, audit_records, audit_valid, audit_extra = build_audit_example()
    status = build_status_example(fixed_bytes("status/run id", 16).hex())
    R, S = "request", "response"
    vectors = [
        ("hello-request", R, {"id": 1, "hello": {"protocol_version": 1,
                                                 "client_name": "example/1"}}),
        ("hello-response", S, {"id": 1, "hello": {
            "protocol_version": 1, "server_version": "0.1.0", "operations": operations,
            "max_frame_bytes": 65536, "max_in_flight": 64}}),
        ("who-am-i-request", R, {"id": 2, "who_am_i": {}}),
        ("who-am-i-response", S, {"id": 2, "who_am_i": {
            "uid": 1000, "gid": 1000, "pid": 4242, "user_name": "alice",
            "groups": [1000, 27, 100], "executable": "/usr/bin/python3.11",
            "systemd_unit": "billing.service", "is_administrator": False}}),
        ("create-key-request", R, {"id": 3, "create_key": {
            "description": "example key", "tags": [{"tag_key": "team", "tag_value": "payments"}]}}),
        ("create-key-response", S, {"id": 3, "create_key": {"key_metadata": metadata}}),
        ("list-keys-request", R, {"id": 4, "list_keys": {"limit": 2}}),
        ("list-keys-response", S, {"id": 4, "list_keys": {
            "keys": [{"key_id": KEY_B, "key_arn": "kmsd:key/" + KEY_B},
                     {"key_id": KEY_A, "key_arn": "kmsd:key/" + KEY_A}],
            "next_marker": KEY_A, "truncated": True}}),
        ("encrypt-request", R, {"id": 5, "encrypt": {
            "key_id": enc["key_id"], "plaintext": bytes.fromhex(enc["plaintext_hex"]),
            "encryption_context": enc["encryption_context"]}}),
        ("encrypt-response", S, {"id": 5, "encrypt": {
            "ciphertext_blob": blob, "key_id": enc["key_id"],
            "encryption_algorithm": "SYMMETRIC_DEFAULT"}}),
        ("decrypt-request", R, {"id": 6, "decrypt": {
            "ciphertext_blob": blob, "encryption_context": enc["encryption_context"]}}),
        ("decrypt-response", S, {"id": 6, "decrypt": {
            "key_id": enc["key_id"], "plaintext": bytes.fromhex(enc["plaintext_hex"]),
            "encryption_algorithm": "SYMMETRIC_DEFAULT", "key_version": enc["key_version"]}}),
        ("error-response", S, {"id": 7, "error": {
            "code": "NotFoundException",
            "message": "key 0badc0de-0000-4000-8000-000000000000 does not exist"}}),
        ("generate-data-key-request", R, {"id": 8, "generate_data_key": {
            "key_id": KEY_A, "key_spec": "AES_256", "encryption_context": dk_ctx}}),
        ("generate-data-key-response", S, {"id": 8, "generate_data_key": {
            "ciphertext_blob": dk["blob"], "plaintext": data_key, "key_id": KEY_A}}),
        ("unknown-operation-request", R, {"id": 9, "__unknown__": [(999, b"")]}),
        ("unknown-operation-response", S, {"id": 9, "error": {
            "code": "UnsupportedOperationException",
            "message": "this server does not know the requested operation"}}),
        ("generate-random-request", R, {"id": 10, "generate_random": {"number_of_bytes": 32}}),
        ("generate-random-response", S, {"id": 10, "generate_random": {
            "plaintext": fixed_bytes("random/32", 32)}}),
        ("connection-error-response", S, {"error": {
            "code": "ValidationException",
            "message": "frame length 16777217 is outside 1...65536"}}),
        ("enable-key-request", R, {"id": 11, "enable_key": {"key_id": KEY_A}}),
        ("enable-key-response", S, {"id": 11, "enable_key": {}}),
        ("disable-key-request", R, {"id": 12, "disable_key": {"key_id": KEY_A}}),
        ("disable-key-response", S, {"id": 12, "disable_key": {}}),
        ("schedule-key-deletion-request", R, {"id": 13, "schedule_key_deletion": {
            "key_id": KEY_A, "pending_window_in_days": 7}}),
        ("schedule-key-deletion-response", S, {"id": 13, "schedule_key_deletion": {
            "key_id": KEY_A, "deletion_date": deletion_date, "key_state": "PendingDeletion",
            "pending_window_in_days": 7}}),
        ("describe-key-request", R, {"id": 14, "describe_key": {"key_id": "kmsd:key/" + KEY_A}}),
        ("describe-key-response-pending-deletion", S, {"id": 14, "describe_key": {
            "key_metadata": pending_metadata}}),
        ("cancel-key-deletion-request", R, {"id": 15, "cancel_key_deletion": {"key_id": KEY_A}}),
        ("cancel-key-deletion-response", S, {"id": 15, "cancel_key_deletion": {"key_id": KEY_A}}),
        ("update-key-description-request", R, {"id": 16, "update_key_description": {
            "key_id": KEY_A, "description": "orders, retired 2023-11"}}),
        ("update-key-description-response", S, {"id": 16, "update_key_description": {}}),
        ("key-deleted-error-response", S, {"id": 17, "error": {
            "code": "NotFoundException",
            "message": "key 1234abcd-12ab-34cd-56ef-1234567890ab was deleted on "
                       "2023-11-21T22:13:20Z; its material is gone and nothing encrypted under "
                       "it can be decrypted"}}),
        # Aliases (PROTOCOL.md section 7.18-7.21). Alias `alias/orders` is created for key A at
        # 1700000000 and later moved to key B; list pages carry placeholder markers (real ones
        # are opaque and MAC'd, so they differ per server and caller).
        ("create-alias-request", R, {"id": 18, "create_alias": {
            "alias_name": "alias/orders", "target_key_id": KEY_A}}),
        ("create-alias-response", S, {"id": 18, "create_alias": {}}),
        ("encrypt-by-alias-request", R, {"id": 19, "encrypt": {
            "key_id": "kmsd:alias/orders", "plaintext": bytes.fromhex(enc["plaintext_hex"]),
            "encryption_context": enc["encryption_context"]}}),
        ("alias-exists-error-response", S, {"id": 20, "error": {
            "code": "AlreadyExistsException",
            "message": "alias alias/orders already exists; choose another name or update-alias it"}}),
        ("list-aliases-request", R, {"id": 21, "list_aliases": {"limit": 2}}),
        ("list-aliases-response", S, {"id": 21, "list_aliases": {
            "aliases": [
                {"alias_name": "alias/orders", "alias_arn": "kmsd:alias/orders",
                 "target_key_id": KEY_A, "creation_date": 1700000000,
                 "last_updated_date": 1700000000},
                {"alias_name": "alias/reports/2023", "alias_arn": "kmsd:alias/reports/2023",
                 "target_key_id": KEY_B, "creation_date": 1700000100,
                 "last_updated_date": 1700003600}],
            "next_marker": "placeholder-marker-aliases", "truncated": True}}),
        ("update-alias-request", R, {"id": 22, "update_alias": {
            "alias_name": "alias/orders", "target_key_id": "kmsd:key/" + KEY_B}}),
        ("update-alias-response", S, {"id": 22, "update_alias": {}}),
        ("list-aliases-for-key-request", R, {"id": 23, "list_aliases": {"key_id": KEY_B}}),
        ("list-aliases-for-key-response", S, {"id": 23, "list_aliases": {
            "aliases": [
                {"alias_name": "alias/orders", "alias_arn": "kmsd:alias/orders",
                 "target_key_id": KEY_B, "creation_date": 1700000000,
                 "last_updated_date": 1700086400},
                {"alias_name": "alias/reports/2023", "alias_arn": "kmsd:alias/reports/2023",
                 "target_key_id": KEY_B, "creation_date": 1700000100,
                 "last_updated_date": 1700003600}]}}),
        ("delete-alias-request", R, {"id": 24, "delete_alias": {"alias_name": "alias/orders"}}),
        ("delete-alias-response", S, {"id": 24, "delete_alias": {}}),
        # Tags (sections 7.22-7.24) on key A, which CreateKey gave `team=payments`. An empty
        # tag value is the proto3 default and is not encoded.
        ("tag-resource-request", R, {"id": 25, "tag_resource": {
            "key_id": KEY_A, "tags": [{"tag_key": "Project", "tag_value": "atlas"},
                                      {"tag_key": "cost-center", "tag_value": ""}]}}),
        ("tag-resource-response", S, {"id": 25, "tag_resource": {}}),
        ("list-resource-tags-request", R, {"id": 26, "list_resource_tags": {
            "key_id": KEY_A, "limit": 2}}),
        ("list-resource-tags-response", S, {"id": 26, "list_resource_tags": {
            "tags": [{"tag_key": "Project", "tag_value": "atlas"},
                     {"tag_key": "cost-center", "tag_value": ""}],
            "next_marker": "placeholder-marker-tags", "truncated": True}}),
        ("untag-resource-request", R, {"id": 27, "untag_resource": {
            "key_id": KEY_A, "tag_keys": ["cost-center", "no-such-tag"]}}),
        ("untag-resource-response", S, {"id": 27, "untag_resource": {}}),
        ("tag-limit-error-response", S, {"id": 28, "error": {
            "code": "LimitExceededException",
            "message": "a key may have at most 50 tags; this would make 51"}}),
        ("enable-key-rotation-request", R, {"id": 29, "enable_key_rotation": {
            "key_id": KEY_A, "rotation_period_in_days": rotation_period}}),
        ("enable-key-rotation-response", S, {"id": 29, "enable_key_rotation": {}}),
        ("get-key-rotation-status-request", R, {"id": 30, "get_key_rotation_status": {
            "key_id": KEY_A}}),
        ("get-key-rotation-status-response", S, {"id": 30, "get_key_rotation_status": {
            "key_rotation_enabled": True, "key_id": KEY_A,
            "rotation_period_in_days": rotation_period, "next_rotation_date": next_rotation,
            "current_key_version": 1, "minimum_decryption_version": 1}}),
        ("rotate-key-on-demand-request", R, {"id": 31, "rotate_key_on_demand": {
            "key_id": KEY_A}}),
        ("rotate-key-on-demand-response", S, {"id": 31, "rotate_key_on_demand": {
            "key_id": KEY_A, "key_version": 2}}),
        ("list-key-rotations-request", R, {"id": 32, "list_key_rotations": {"key_id": KEY_A}}),
        ("list-key-rotations-response", S, {"id": 32, "list_key_rotations": {
            "rotations": [
                {"key_id": KEY_A, "rotation_date": 1700003600, "rotation_type": "ON_DEMAND",
                 "key_version": 2},
                {"key_id": KEY_A, "rotation_date": next_rotation, "rotation_type": "AUTOMATIC",
                 "key_version": 3}]}}),
        ("set-minimum-decryption-version-request", R, {"id": 33,
            "set_minimum_decryption_version": {"key_id": KEY_A, "minimum_decryption_version": 2}}),
        ("set-minimum-decryption-version-response", S, {"id": 33,
                                                         "set_minimum_decryption_version": {}}),
        ("describe-key-rotated-request", R, {"id": 34, "describe_key": {"key_id": KEY_A}}),
        ("describe-key-rotated-response", S, {"id": 34, "describe_key": {
            "key_metadata": rotated_metadata}}),
        # Decrypt of `decrypt-request`'s blob (vector one-pair, key version 1) after that.
        ("retired-version-error-response", S, {"id": 35, "error": {
            "code": "KMSInvalidStateException",
            "message": "version %d of key %s is retired: its minimum decryption version is 2"
                       % (retired_version, KEY_A)}}),
        ("disable-key-rotation-request", R, {"id": 36, "disable_key_rotation": {
            "key_id": KEY_A}}),
        ("disable-key-rotation-response", S, {"id": 36, "disable_key_rotation": {}}),
        ("rotation-limit-error-response", S, {"id": 37, "error": {
            "code": "LimitExceededException",
            "message": "key %s has had 10 on-demand rotations, the most a key may have; "
                       "automatic rotation still runs" % KEY_A}}),
        # Bring your own key (sections 7.31-7.33), key C. The wrapping key pairs, OAEP seeds and
        # AES key are fixed test data (real ones are fresh and random); the extra members of
        # these entries give them, so the wrapping can be checked and reproduced.
        ("create-key-external-request", R, {"id": 38, "create_key": {
            "description": "imported key", "origin": "EXTERNAL"}}),
        ("create-key-external-response", S, {"id": 38, "create_key": {
            "key_metadata": external_metadata}}),
        ("get-parameters-for-import-request", R, {"id": 39, "get_parameters_for_import": {
            "key_id": KEY_C, "wrapping_algorithm": oaep["algorithm"],
            "wrapping_key_spec": "RSA_2048"}}),
        ("get-parameters-for-import-response", S, {"id": 39, "get_parameters_for_import": {
            "key_id": KEY_C, "import_token": oaep["token"], "public_key": oaep["spki"],
            "parameters_valid_to": oaep["valid_to"]}},
         {"wrapping_private_key_pkcs8_hex": hexs(oaep["pkcs8"])}),
        ("import-key-material-request", R, {"id": 40, "import_key_material": {
            "key_id": KEY_C, "import_token": oaep["token"],
            "encrypted_key_material": oaep["wrapped"],
            "expiration_model": "KEY_MATERIAL_DOES_NOT_EXPIRE"}},
         dict(oaep["inputs"], key_material_hex=hexs(imported))),
        ("import-key-material-response", S, {"id": 40, "import_key_material": {}}),
        # The same ImportKeyMaterial sent again: its token was used up by the first.
        ("invalid-import-token-error-response", S, {"id": 41, "error": {
            "code": "InvalidImportTokenException",
            "message": "ImportToken is not an unused token for key %s: tokens are single use, "
                       "belong to one key, and do not survive a restart of kmsd; call "
                       "GetParametersForImport again" % KEY_C}}),
        ("get-parameters-for-import-aes-key-wrap-request", R, {"id": 42,
            "get_parameters_for_import": {
                "key_id": "kmsd:key/" + KEY_C, "wrapping_algorithm": kwp["algorithm"],
                "wrapping_key_spec": "RSA_2048"}}),
        ("get-parameters-for-import-aes-key-wrap-response", S, {"id": 42,
            "get_parameters_for_import": {
                "key_id": KEY_C, "import_token": kwp["token"], "public_key": kwp["spki"],
                "parameters_valid_to": kwp["valid_to"]}},
         {"wrapping_private_key_pkcs8_hex": hexs(kwp["pkcs8"])}),
        ("import-key-material-aes-key-wrap-request", R, {"id": 43, "import_key_material": {
            "key_id": KEY_C, "import_token": kwp["token"],
            "encrypted_key_material": kwp["wrapped"], "valid_to": material_valid_to}},
         dict(kwp["inputs"], key_material_hex=hexs(imported))),
        ("import-key-material-aes-key-wrap-response", S, {"id": 43,
                                                           "import_key_material": {}}),
        ("describe-key-imported-request", R, {"id": 44, "describe_key": {"key_id": KEY_C}}),
        ("describe-key-imported-response", S, {"id": 44, "describe_key": {
            "key_metadata": imported_metadata}}),
        # An import into key C of material other than the material it was first given.
        ("incorrect-key-material-error-response", S, {"id": 45, "error": {
            "code": "IncorrectKeyMaterialException",
            "message": "key %s was given other material before; only that same material can "
                       "be imported into it again" % KEY_C}}),
        ("delete-imported-key-material-request", R, {"id": 46,
            "delete_imported_key_material": {"key_id": KEY_C}}),
        ("delete-imported-key-material-response", S, {"id": 46,
                                                       "delete_imported_key_material": {}}),
        # Key policies (sections 7.1.1, 7.34-7.37), on key A: the default policy written out
        # with its creator's uid (0: root), replaced by POLICY_ORDERS, listed, and simulated for
        # a process of uid 1000 in orders.service; then the errors of a refused decision and of
        # the lockout safety check, and a key created with a policy of its own.
        ("get-key-policy-request", R, {"id": 47, "get_key_policy": {
            "key_id": KEY_A, "policy_name": "default"}}),
        ("get-key-policy-response", S, {"id": 47, "get_key_policy": {
            "policy": default_policy_a, "policy_name": "default"}}),
        ("put-key-policy-request", R, {"id": 48, "put_key_policy": {
            "key_id": KEY_A, "policy_name": "default", "policy": policy_orders}}),
        ("put-key-policy-response", S, {"id": 48, "put_key_policy": {}}),
        ("list-key-policies-request", R, {"id": 49, "list_key_policies": {"key_id": KEY_A}}),
        ("list-key-policies-response", S, {"id": 49, "list_key_policies": {
            "policy_names": ["default"]}}),
        ("simulate-policy-request", R, {"id": 50, "simulate_policy": {
            "key_id": KEY_A, "action": "kms:Encrypt",
            "principal": {"uid": 1000, "has_uid": True, "groups": ["1000", "100"],
                          "unit": "orders.service"},
            "encryption_context": {"app": "orders"}}}),
        ("simulate-policy-response", S, {"id": 50, "simulate_policy": {
            "decision": "Allow", "decided_by": "key-policy:OrdersEncrypts", "key_id": KEY_A}}),
        # The same simulation without the context: StringEquals on an absent key fails.
        ("simulate-policy-no-context-request", R, {"id": 51, "simulate_policy": {
            "key_id": "kmsd:key/" + KEY_A, "action": "kms:Encrypt",
            "principal": {"uid": 1000, "has_uid": True, "unit": "orders.service"}}}),
        ("simulate-policy-no-context-response", S, {"id": 51, "simulate_policy": {
            "decision": "ImplicitDeny", "decided_by": "implicit-deny", "key_id": KEY_A}}),
        # A Decrypt by uid 1000 in orders.service under POLICY_ORDERS (Encrypt only).
        ("access-denied-error-response", S, {"id": 52, "error": {
            "code": "AccessDeniedException",
            "message": "uid 1000 (alice) is not allowed kms:Decrypt on key %s: no statement in "
                       "its key policy and no grant allows it" % KEY_A}}),
        # A PutKeyPolicy by root of a policy that would not let root change it again.
        ("policy-lockout-error-response", S, {"id": 53, "error": {
            "code": "ValidationException",
            "message": "the new key policy would not allow you (uid 0) to change it again "
                       "(kms:PutKeyPolicy), so nobody might ever be able to; include a statement "
                       "that allows it, or set BypassPolicyLockoutSafetyCheck if that is really "
                       "what you want"}}),
        ("invalid-policy-error-response", S, {"id": 54, "error": {
            "code": "ValidationException",
            "message": "invalid policy: Statement[1].Action[0] \"kms:Encrpt\" names no kms "
                       "action (write kms:Encrypt, kms:GenerateDataKey*, kms:*)"}}),
        ("create-key-with-policy-request", R, {"id": 55, "create_key": {
            "description": "payroll", "policy": policy_payroll}}),
        ("create-key-with-policy-response", S, {"id": 55, "create_key": {
            "key_metadata": policy_metadata}}),
        # Grants (sections 7.1.3, 7.38-7.43) on key A: one created by root with a constraint
        # and a retiring principal, listed, listed again by its retiring principal, reviewed with
        # the key's policy, then retired by its token; and another grant revoked.
        ("create-grant-request", R, {"id": 56, "create_grant": {
            "key_id": KEY_A, "grantee_principal": grant["grantee_principal"],
            "retiring_principal": grant["retiring_principal"],
            "operations": grant["operations"], "constraints": grant["constraints"],
            "name": grant["name"]}}),
        ("create-grant-response", S, {"id": 56, "create_grant": {
            "grant_token": token, "grant_id": grant["grant_id"]}}),
        ("list-grants-request", R, {"id": 57, "list_grants": {"key_id": KEY_A}}),
        ("list-grants-response", S, {"id": 57, "list_grants": {"grants": [grant]}}),
        ("list-retirable-grants-request", R, {"id": 58, "list_retirable_grants": {
            "retiring_principal": grant["retiring_principal"], "limit": 10}}),
        ("list-retirable-grants-response", S, {"id": 58, "list_retirable_grants": {
            "grants": [grant]}}),
        ("review-access-request", R, {"id": 59, "review_access": {"key_id": KEY_A}}),
        ("review-access-response", S, {"id": 59, "review_access": {
            "keys": [{"key_id": KEY_A, "entries": review_entries}]}}),
        ("retire-grant-request", R, {"id": 60, "retire_grant": {"grant_token": token}}),
        ("retire-grant-response", S, {"id": 60, "retire_grant": {}}),
        ("revoke-grant-request", R, {"id": 61, "revoke_grant": {
            "key_id": KEY_A, "grant_id": revoked_grant_id}}),
        ("revoke-grant-response", S, {"id": 61, "revoke_grant": {}}),
        # VerifyAuditRecords (section 7.44, AUDIT.md): an administrator has kmsd check the first
        # two records of a run (its KmsdStarted, linking to the checkpoint of the run before, and
        # an Encrypt) and a copy of the Encrypt whose KMS_KEY_ID was changed in the journal.
        # Fields with empty values carry only their name (proto3 default).
        ("verify-audit-records-request", R, {"id": 62, "verify_audit_records": {
            "records": audit_records}}, audit_extra),
        ("verify-audit-records-response", S, {"id": 62, "verify_audit_records": {
            "valid": audit_valid, "current_run_id": audit_run, "current_sequence": 3}}),
        # Status (section 7.45): an administrator asks how kmsd is doing an hour after it started.
        # Since then: 40 Decrypts allowed and 21 denied to one uid within a minute (which set off
        # one AccessDeniedRate alarm), 41 Encrypts allowed. Every map has one entry (see the
        # encoding conventions in README.md).
        ("status-request", R, {"id": 63, "status": {}}),
        ("status-response", S, {"id": 63, "status": status}),
        # Backups (sections 7.46, 7.47, 14): the backup of backup.json, read in two chunks.
        ("create-backup-request", R, {"id": 64, "create_backup": {}}),
        ("create-backup-response", S, {"id": 64, "create_backup": {
            "backup_id": BACKUP_ID, "size": len(BACKUP["file"]),
            "root_key_fingerprint": BACKUP["fingerprint"].hex(), "created_at": BACKUP["created_at"],
            "key_count": 1, "expires_at": BACKUP["created_at"] + 900}}),
        ("get-backup-chunk-request", R, {"id": 65, "get_backup_chunk": {
            "backup_id": BACKUP_ID, "offset": 0}}),
        ("get-backup-chunk-response", S, {"id": 65, "get_backup_chunk": {
            "data": BACKUP["file"][:64], "size": len(BACKUP["file"])}}),
        ("get-backup-chunk-request-2", R, {"id": 66, "get_backup_chunk": {
            "backup_id": BACKUP_ID, "offset": 64}}),
        ("get-backup-chunk-response-2", S, {"id": 66, "get_backup_chunk": {
            "data": BACKUP["file"][64:], "size": len(BACKUP["file"])}}),
        # Replication identities (sections 7.48, 7.49, 15.1): host "east" shows its identity and
        # its pin of "west", then pins "west" again (the same keys: a replacement).
        ("get-replication-identity-request", R, {"id": 67, "get_replication_identity": {}}),
        ("get-replication-identity-response", S, {"id": 67, "get_replication_identity": {
            "identity": identity_message(EAST), "pinned": [identity_message(WEST)]}}),
        ("pin-replication-identity-request", R, {"id": 68, "pin_replication_identity": {
            "identity": identity_message(WEST)}}),
        ("pin-replication-identity-response", S, {"id": 68, "pin_replication_identity": {
            "identity": identity_message(WEST), "replaced": True}}),
        # Multi-region keys (sections 7.50, 7.51, 15.3, 15.4): east replicates the key of
        # replication.json to west; west imports it.
        ("replicate-key-request", R, {"id": 69, "replicate_key": {
            "key_id": MRK_KEY_ID, "replica_region": "west"}}),
        ("replicate-key-response", S, {"id": 69, "replicate_key": {
            "replication_bundle": REPLICATION_BUNDLE, "key_metadata": mrk_metadata("PRIMARY", ["west"])}}),
        ("import-replica-request", R, {"id": 70, "import_replica": {
            "replication_bundle": REPLICATION_BUNDLE}}),
        ("import-replica-response", S, {"id": 70, "import_replica": {
            "key_metadata": mrk_metadata("REPLICA", []), "imported_versions": 2}}),
    ]
    out = []
    for name, direction, value, *extra in vectors:
        msg = "Request" if direction == R else "Response"
        body = encode_message(msg, value)
        v = {"name": name, "direction": direction, "frame_hex": frame(body).hex(),
             "json": to_json(msg, value)}
        if "__unknown__" in value:
            v["unknown_operation"] = True
        for more in extra:
            v.update(more)
        out.append((v, msg, value, body))
    return out


def check_import_frames(built):
    """Unwraps every import-key-material request's material again, from the written vectors
    alone: the private key of the GetParametersForImport answer that issued its token, and the
    wrapping algorithm of the request that asked for it. Returns how many were checked."""
    algorithms, issued, checked = {}, {}, 0
    for v, msg, _, body in built:
        decoded, _ = decode_message(msg, bytes.fromhex(v["frame_hex"])[4:])
        if msg == "Request" and "get_parameters_for_import" in decoded:
            algorithms[decoded["id"]] = decoded["get_parameters_for_import"]["wrapping_algorithm"]
        elif msg == "Response" and "get_parameters_for_import" in decoded:
            answer = decoded["get_parameters_for_import"]
            key = serialization.load_der_private_key(
                bytes.fromhex(v["wrapping_private_key_pkcs8_hex"]), password=None)
            public = serialization.load_der_public_key(answer["public_key"])
            assert public.public_numbers() == key.public_key().public_numbers(), v["name"]
            assert len(answer["import_token"]) == 32, v["name"]
            issued[answer["import_token"]] = (key, algorithms[decoded["id"]])
        elif msg == "Request" and "import_key_material" in decoded:
            request = decoded["import_key_material"]
            key, algorithm = issued[request["import_token"]]
            material = unwrap_key_material(key, algorithm, request["encrypted_key_material"])
            assert material.hex() == v["key_material_hex"] and len(material) == 32, v["name"]
            seed = bytes.fromhex(v["oaep_seed_hex"])
            k = key.key_size // 8
            rsa_part = (material if algorithm.startswith("RSAES_OAEP_")
                        else bytes.fromhex(v["aes_key_hex"]))
            hash_name = "sha1" if algorithm.endswith("_SHA_1") else "sha256"
            assert rsa_oaep_encrypt(key.public_key(), rsa_part, seed, hash_name) == \
                request["encrypted_key_material"][:k], v["name"]
            checked += 1
    return checked


def hkdf_by_hand(ikm, info):
    """RFC 5869 HKDF-SHA256, no salt (32 zero bytes), L = 32: one expand block."""
    prk = hmac.new(b"\x00" * 32, ikm, hashlib.sha256).digest()
    return hmac.new(prk, info + b"\x01", hashlib.sha256).digest()


def check_audit_frames(built):
    """Checks the VerifyAuditRecords frames from the written vectors alone: the keys derived
    again, each record's chain input and KMS_CHAIN computed again, the answer's `valid` equal to
    whether the claimed KMS_CHAIN matches, the records linked (each previous_chain the KMS_CHAIN
    before it, the first one the KMS_PREVIOUS_CHAIN it names), and the previous run's
    checkpoint authentic and naming that link. Returns how many records were checked."""
    requests, answers, checked = {}, {}, 0
    for v, msg, _, body in built:
        decoded, _ = decode_message(msg, bytes.fromhex(v["frame_hex"])[4:])
        if "verify_audit_records" in decoded:
            (requests if msg == "Request" else answers)[decoded["id"]] = (v, decoded["verify_audit_records"])
    for rid, (v, request) in requests.items():
        root = bytes.fromhex(v["audit_root_key_hex"])
        mac_key = hkdf_by_hand(root, AUDIT_RECORD_MAC_INFO)
        chain_key = hkdf_by_hand(mac_key, AUDIT_CHAIN_KEY_INFO)
        assert mac_key.hex() == v["audit_record_mac_key_hex"], v["name"]
        assert chain_key.hex() == v["audit_chain_key_hex"], v["name"]
        valid = []
        for i, record in enumerate(request["records"]):
            fields = [(f["name"], f.get("value", "")) for f in record["fields"]]
            claimed = bytes.fromhex(dict(fields)["KMS_CHAIN"])
            data = AUDIT_CHAIN_LABEL + lp(record["previous_chain"])
            for name, value in sorted((f for f in fields if audit_chained(f[0])),
                                      key=lambda f: f[0].encode()):
                data += lp(name.encode()) + lp(value.encode())
            assert data.hex() == v["audit_chain_inputs_hex"][i], (v["name"], i)
            computed = hmac.new(chain_key, data, hashlib.sha256).digest()
            assert computed.hex() == v["audit_computed_chains_hex"][i], (v["name"], i)
            valid.append(hmac.compare_digest(claimed, computed))
            checked += 1
        assert answers[rid][1].get("valid") == valid, v["name"]
        records = [dict((f["name"], f.get("value", "")) for f in r["fields"]) for r in request["records"]]
        first, second = records[0], records[1]
        assert first["KMS_SEQ"] == "1" and second["KMS_SEQ"] == "2"
        assert first["KMS_RUN_ID"] == second["KMS_RUN_ID"] == answers[rid][1]["current_run_id"]
        assert request["records"][0]["previous_chain"].hex() == first["KMS_PREVIOUS_CHAIN"]
        assert request["records"][1]["previous_chain"].hex() == first["KMS_CHAIN"]
        checkpoint = bytes.fromhex(v["audit_previous_checkpoint_hex"])
        assert len(checkpoint) == 89
        body, tag = checkpoint[:57], checkpoint[57:]
        assert hmac.compare_digest(tag, hmac.new(chain_key, AUDIT_CHECKPOINT_LABEL + body,
                                                 hashlib.sha256).digest())
        assert body[:16].hex() == first["KMS_PREVIOUS_RUN_ID"]
        assert struct.unpack(">Q", body[16:24])[0] == int(first["KMS_PREVIOUS_SEQ"])
        assert body[24:56].hex() == first["KMS_PREVIOUS_CHAIN"]
        assert body[56] == 1 and first["KMS_PREVIOUS_STOP"] == "clean"
    return checked


def check_status_frames(built):
    """Checks, from the written frames alone, that the Status answer's figures agree as section
    7.45 requires. Returns how many answers were checked."""
    checked = 0
    for v, msg, _, body in built:
        decoded, _ = decode_message(msg, bytes.fromhex(v["frame_hex"])[4:])
        if msg != "Response" or "status" not in decoded:
            continue
        s = decoded["status"]
        requests, latencies = s["requests"], s["latencies"]
        keys = [(r["action"], r["result"]) for r in requests]
        assert keys == sorted(keys, key=lambda k: (k[0].encode(), k[1].encode())), v["name"]
        assert all(r["result"] in ("Allowed", "Denied", "Failed") for r in requests)
        actions = [h["action"] for h in latencies]
        assert actions == sorted(set(a for a, _ in keys), key=str.encode), v["name"]
        for h in latencies:
            assert h["bucket_upper_micros"] == STATUS_BUCKETS_MICROS
            assert len(h["bucket_counts"]) == len(h["bucket_upper_micros"]) + 1
            assert sum(h["bucket_counts"]) == h["count"] == sum(
                r["count"] for r in requests if r["action"] == h["action"]), v["name"]
        assert s["latency_p50_micros"] == status_percentile(0.5, latencies)
        assert s["latency_p99_micros"] == status_percentile(0.99, latencies)
        assert set(s["keys_by_state"]) <= {"Enabled", "Disabled", "PendingDeletion", "PendingImport"}
        denied = sum(r["count"] for r in requests if r["result"] == "Denied")
        assert s["alarms"] == {"AccessDeniedRate": 1} and denied > 20
        assert s["audit_sequence"] == 1 + sum(r["count"] for r in requests) + sum(s["alarms"].values())
        reusable = ("Encrypt", "Decrypt", "GenerateDataKey", "GenerateDataKeyWithoutPlaintext")
        assert s.get("access_decisions_reused", 0) <= sum(
            r["count"] for r in requests if r["action"] in reusable and r["result"] == "Allowed")
        checked += 1
    return checked


def check_frames(built):
    protoc = shutil.which("protoc")
    checked_with_protoc = 0
    for v, msg, value, body in built:
        raw = bytes.fromhex(v["frame_hex"])
        n = struct.unpack(">I", raw[:4])[0]
        assert n == len(raw) - 4 and 1 <= n <= 65536, v["name"]
        decoded, unknown = decode_message(msg, raw[4:])
        assert decoded == strip_defaults(msg, value), v["name"]
        assert to_json(msg, decoded) == v["json"], v["name"]
        if v.get("unknown_operation"):
            assert unknown == [999] and not any(f.oneof and f.name in decoded
                                                for f in SCHEMA[msg].values())
            assert v["json"] == {"id": str(value["id"])}
            continue
        assert not unknown, v["name"]
        if protoc:
            text = to_text_format(msg, value)
            r = subprocess.run([protoc, "--proto_path=" + PROTO_DIR,
                                "--encode=kmsd.v1." + msg, "kmsd.proto"],
                               input=text.encode(), capture_output=True, cwd=PROTO_DIR)
            if r.returncode != 0:
                raise AssertionError("protoc failed on %s: %s" % (v["name"], r.stderr.decode()))
            assert r.stdout == body, "protoc disagrees on %s" % v["name"]
            checked_with_protoc += 1
    return checked_with_protoc if protoc else None


def write_json(path, obj):
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="ascii") as fh:
        json.dump(obj, fh, indent=2, ensure_ascii=True)
        fh.write("\n")
    os.replace(tmp, path)


def main():
    valid, invalid = build_ciphertext_vectors()
    check_ciphertext_vectors(valid, invalid)
    built = build_frames(valid)
    protoc_checked = check_frames(built)
    imports_checked = check_import_frames(built)
    assert imports_checked == 2
    audit_checked = check_audit_frames(built)
    assert audit_checked == 3
    status_checked = check_status_frames(built)
    assert status_checked == 1

    write_json(os.path.join(HERE, "ciphertext.json"), {
        "format": "kmsd symmetric ciphertext v1",
        "vectors": valid,
        "invalid": invalid,
    })
    write_json(os.path.join(HERE, "frames.json"), {
        "vectors": [v for v, _, _, _ in built],
    })
    write_json(os.path.join(HERE, "replication.json"), {
        "format": "kmsd replication bundle v1",
        "bundle": REPLICATION,
    })
    backup_valid, backup_invalid = build_backup_vectors()
    write_json(os.path.join(HERE, "backup.json"), {
        "format": "kmsd backup file v1",
        "valid": backup_valid,
        "invalid": backup_invalid,
    })
    print("backup.json: 1 valid, %d invalid backup files (all self-checked)" % len(backup_invalid))
    print("replication.json: 1 bundle (verified and unwrapped again; 3 altered copies refused)")
    print("ciphertext.json: %d valid, %d invalid vectors (all self-checked)"
          % (len(valid), len(invalid)))
    print("frames.json: %d frames (decoded back and compared with their JSON; protoc: %s; "
          "%d wrapped key materials unwrapped again; %d audit chains computed again; "
          "%d Status answer checked)"
          % (len(built), "not found, skipped" if protoc_checked is None
             else "%d bodies identical" % protoc_checked, imports_checked, audit_checked,
             status_checked))


if __name__ == "__main__":
    main()
