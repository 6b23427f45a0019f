#!/usr/bin/env python3
"""Independent reference implementation of the kmsd file envelope format v1 (PROTOCOL.md §16).

    python3 Protocol/vectors/gen_envelope.py                      # (re)writes envelope.json
    python3 Protocol/vectors/gen_envelope.py --decrypt DATAKEYHEX  # reads a file on stdin,
                                                                  # writes its plaintext to stdout

Written from PROTOCOL.md §16 and §9 alone; it shares no code with kmsd (Swift) or with
gen_vectors.py. AES-256-GCM and HKDF-SHA256 come from the `cryptography` package; everything
else (the header, C(ctx), the chunk layout, the checks of §16.4) is written out here. Nothing
is random: data keys, message ids and the salt and nonce of the encrypted data key are fixed
bytes derived from labels, so regenerating gives identical output.

Before writing, it decrypts every valid vector again with the separate reader below and checks
that every damaged one is refused at the step its `fails_at` names.

`--decrypt` is the same reader used on a real file (the test suite feeds it files kmsctl made,
with the data key kmsctl's own decrypt gave back): it exits 0 after writing the plaintext, or 1
with the refusing step on stderr.
"""

import hashlib
import hmac
import json
import os
import struct
import sys

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

HERE = os.path.dirname(os.path.abspath(__file__))

MAGIC = b"KMSDENVL"
VERSION = 1
SUITE = 1
MAX_CHUNK = 16 * 1024 * 1024
MAX_CONTEXT_BYTES = 8192
MAX_PAIRS = 64
MAX_EDK = 6144
KEY_LABEL = b"kmsd/v1/envelope-key"
COMMIT_LABEL = b"kmsd/v1/envelope-commit"
FULL, FINAL = 0x00, 0x01


class Refused(Exception):
    """A reader's refusal; `step` is the §16.4 step (header, context, datakey, commitment,
    header-tag, truncated, malformed-chunk, chunk-tag, trailing)."""

    def __init__(self, step, why):
        super().__init__(f"{step}: {why}")
        self.step = step


def hkdf(ikm, salt, info, n=32):
    return HKDF(algorithm=hashes.SHA256(), length=n, salt=salt, info=info).derive(ikm)


def canonical_context(ctx):
    """§9.3: u32 count, then pairs by ascending key bytes, each u32-length-prefixed."""
    pairs = sorted((k.encode(), v.encode()) for k, v in ctx.items())
    out = struct.pack(">I", len(pairs))
    for k, v in pairs:
        out += struct.pack(">I", len(k)) + k + struct.pack(">I", len(v)) + v
    return out


def parse_context(c):
    """The strict reading of §16.1: returns the context as a dict, or raises Refused."""
    if len(c) < 4:
        raise Refused("header", "context field shorter than its count")
    (count,) = struct.unpack_from(">I", c, 0)
    if count > MAX_PAIRS:
        raise Refused("header", "too many context pairs")
    i, out, last = 4, {}, None
    for _ in range(count):
        parts = []
        for _ in range(2):
            if i + 4 > len(c):
                raise Refused("header", "context length runs past the field")
            (n,) = struct.unpack_from(">I", c, i)
            i += 4
            if i + n > len(c):
                raise Refused("header", "context bytes run past the field")
            parts.append(c[i:i + n])
            i += n
        k, v = parts
        if not k:
            raise Refused("header", "empty context key")
        if last is not None and not (last < k):
            raise Refused("header", "context keys not in strictly ascending order")
        last = k
        try:
            out[k.decode("utf-8")] = v.decode("utf-8")
        except UnicodeDecodeError:
            raise Refused("header", "context is not UTF-8")
    if i != len(c):
        raise Refused("header", "context field has bytes after its pairs")
    return out


def keys(data_key, message_id):
    suite = struct.pack(">H", SUITE)
    return hkdf(data_key, message_id, KEY_LABEL + suite), hkdf(data_key, message_id, COMMIT_LABEL + suite)


def chunk_iv(i):
    return b"\x00" * 4 + struct.pack(">Q", i)


def chunk_aad(message_id, i, kind, n):
    return message_id + struct.pack(">Q", i) + bytes([kind]) + struct.pack(">I", n)


def encrypt(data_key, message_id, ctx, encrypted_data_key, plaintext, chunk_size):
    """Returns the file and every intermediate value (as a dict of bytes)."""
    k, commitment = keys(data_key, message_id)
    c = canonical_context(ctx)
    head = (MAGIC + struct.pack(">HHI", VERSION, SUITE, chunk_size) + message_id
            + struct.pack(">I", len(c)) + c + struct.pack(">H", len(encrypted_data_key))
            + encrypted_data_key + commitment)
    header_tag = AESGCM(k).encrypt(b"\x00" * 12, b"", head)
    out = head + header_tag
    gcm = AESGCM(k)
    i, pos = 1, 0
    while len(plaintext) - pos >= chunk_size:
        piece = plaintext[pos:pos + chunk_size]
        out += bytes([FULL]) + gcm.encrypt(chunk_iv(i), piece, chunk_aad(message_id, i, FULL, chunk_size))
        i, pos = i + 1, pos + chunk_size
    rest = plaintext[pos:]
    out += bytes([FINAL]) + struct.pack(">I", len(rest)) + gcm.encrypt(
        chunk_iv(i), rest, chunk_aad(message_id, i, FINAL, len(rest)))
    return out, {"envelope_key": k, "commitment": commitment, "canonical_context": c,
                 "header": head + header_tag, "header_tag": header_tag, "chunks": i}


class Reader:
    """Reads a file in order, as §16.4 says; `data_key_for` stands in for kmsd's Decrypt."""

    def __init__(self, stream):
        self.s = stream

    def take(self, n, step="header"):
        b = self.s.read(n)
        if len(b) != n:
            raise Refused(step, f"file ends early (wanted {n} more bytes, got {len(b)})")
        return b

    def read(self, data_key_for, expected_context=None, emit=None):
        fixed = self.take(52)
        if fixed[:8] != MAGIC:
            raise Refused("header", "not a kmsd file envelope")
        version, suite, s = struct.unpack_from(">HHI", fixed, 8)
        if version != VERSION:
            raise Refused("header", "unknown version")
        if suite != SUITE:
            raise Refused("header", "unknown suite")
        if not 1 <= s <= MAX_CHUNK:
            raise Refused("header", "chunk size out of range")
        message_id = fixed[16:48]
        (c_len,) = struct.unpack_from(">I", fixed, 48)
        if not 4 <= c_len <= MAX_CONTEXT_BYTES:
            raise Refused("header", "context length out of range")
        c = self.take(c_len)
        ctx = parse_context(c)
        e_bytes = self.take(2)
        (e,) = struct.unpack(">H", e_bytes)
        if not 1 <= e <= MAX_EDK:
            raise Refused("header", "encrypted data key length out of range")
        edk = self.take(e)
        commitment = self.take(32)
        header_tag = self.take(16)
        for k, v in (expected_context or {}).items():
            if ctx.get(k) != v:
                raise Refused("context", f"expected context pair {k!r} is not in the file")
        data_key = data_key_for(edk, ctx)
        if len(data_key) != 32:
            raise Refused("datakey", "data key is not 32 bytes")
        key, want = keys(data_key, message_id)
        if not hmac_compare(want, commitment):
            raise Refused("commitment", "key commitment does not match")
        head = fixed + c + e_bytes + edk + commitment
        gcm = AESGCM(key)
        try:
            gcm.decrypt(b"\x00" * 12, header_tag, head)
        except Exception:
            raise Refused("header-tag", "header tag does not verify")
        out, i = [], 1
        while True:
            kind = self.s.read(1)
            if not kind:
                raise Refused("truncated", f"file ends before chunk {i}")
            kind = kind[0]
            if kind == FULL:
                n = s
            elif kind == FINAL:
                (n,) = struct.unpack(">I", self.take(4, "truncated"))
                if n >= s:
                    raise Refused("malformed-chunk", "final chunk length not below the chunk size")
            else:
                raise Refused("malformed-chunk", f"chunk {i} has type byte {kind}")
            body = self.take(n + 16, "truncated")
            try:
                plain = gcm.decrypt(chunk_iv(i), body, chunk_aad(message_id, i, kind, n))
            except Exception:
                raise Refused("chunk-tag", f"chunk {i} does not verify")
            if emit:
                emit(plain)
            out.append(plain)
            if kind == FINAL:
                break
            i += 1
        if self.s.read(1):
            raise Refused("trailing", "bytes after the final chunk")
        return b"".join(out), ctx


def hmac_compare(a, b):
    return hmac.compare_digest(a, b)


# ---- Fixed inputs ----------------------------------------------------------------------------

def fixed(label, n):
    out, counter = b"", 0
    while len(out) < n:
        out += hashlib.sha256(label.encode() + struct.pack(">I", counter)).digest()
        counter += 1
    return out[:n]


KEY_ID = "1234abcd-12ab-34cd-56ef-1234567890ab"
KEY_MATERIAL = bytes(range(32))


def kmsd_blob(material, key_id, ctx, plaintext, label):
    """§9: a real kmsd ciphertext blob of the data key, so each vector's encrypted data key is
    what GenerateDataKey would return under KEY_ID version 1 with this material."""
    salt, nonce = fixed(label + "/salt", 32), fixed(label + "/nonce", 12)
    header = bytes([1, 1]) + bytes.fromhex(key_id.replace("-", "")) + struct.pack(">I", 1) + salt + nonce
    k = hkdf(material, salt, b"kmsd/v1/symmetric-message-key" + header)
    return header + AESGCM(k).encrypt(nonce, plaintext, header + canonical_context(ctx))


def kmsd_open(material, blob, ctx):
    header = blob[:66]
    k = hkdf(material, blob[22:54], b"kmsd/v1/symmetric-message-key" + header)
    return AESGCM(k).decrypt(blob[54:66], blob[66:], header + canonical_context(ctx))


VALID = [
    # name, chunk size, context, plaintext
    ("empty", 65536, {}, b""),
    ("one-short-chunk", 65536, {"purpose": "example"}, b"attack at dawn"),
    ("three-chunks", 16, {"app": "billing", "tenant": "42"}, bytes(range(40))),
    ("exact-multiple", 16, {"app": "billing"}, bytes(range(32))),
    ("chunk-size-one", 1, {}, b"abc"),
    ("utf8-context", 32, {"Z": "last-by-bytes", "a": "b", "\u00e9t\u00e9": "\u00e7a"}, fixed("plain", 100)),
]


def h(b):
    return b.hex()


def build():
    vectors, files = [], {}
    for name, s, ctx, plain in VALID:
        dk = fixed(f"envelope/{name}/data-key", 32)
        mid = fixed(f"envelope/{name}/message-id", 32)
        edk = kmsd_blob(KEY_MATERIAL, KEY_ID, ctx, dk, f"envelope/{name}/edk")
        data, parts = encrypt(dk, mid, ctx, edk, plain, s)
        files[name] = (data, dk, ctx, s, parts)
        vectors.append({
            "name": name, "chunk_size": s, "encryption_context": ctx,
            "data_key_hex": h(dk), "message_id_hex": h(mid), "plaintext_hex": h(plain),
            "encrypted_data_key_hex": h(edk), "canonical_context_hex": h(parts["canonical_context"]),
            "envelope_key_hex": h(parts["envelope_key"]), "commitment_hex": h(parts["commitment"]),
            "header_hex": h(parts["header"]), "header_tag_hex": h(parts["header_tag"]),
            "chunks": parts["chunks"], "file_hex": h(data),
        })

    base, dk, ctx, s, parts = files["three-chunks"]
    hl = len(parts["header"])
    full = 1 + s + 16
    c1, c2, c3 = base[hl:hl + full], base[hl + full:hl + 2 * full], base[hl + 2 * full:]
    head = base[:hl]

    def flip(b, at):
        b = bytearray(b)
        b[at] ^= 0x01
        return bytes(b)

    def reseal(header_without_tag, key):
        return header_without_tag + AESGCM(key).encrypt(b"\x00" * 12, b"", header_without_tag)

    ctx_off = 52
    edk_len_off = ctx_off + len(parts["canonical_context"])
    commit_off = hl - 48
    # A commitment of another data key, with a header tag that verifies under the real K: only
    # the commitment check (step 4) can refuse it.
    other_commit = keys(fixed("another data key", 32), fixed("envelope/three-chunks/message-id", 32))[1]
    forged_commit = reseal(head[:commit_off] + other_commit, parts["envelope_key"]) + c1 + c2 + c3
    # The final chunk re-marked as full: read as a full chunk it needs S + 16 bytes, more than
    # the file has left, so it is refused as truncated before any tag is checked.
    final_as_full = head + c1 + c2 + bytes([FULL]) + c3[5:]
    pairs = [(b"tenant", b"42"), (b"app", b"billing")]
    unsorted_ctx = struct.pack(">I", 2) + b"".join(
        struct.pack(">I", len(k)) + k + struct.pack(">I", len(v)) + v for k, v in pairs)

    def with_context(c):
        """The base file with the context field replaced by the bytes `c` (length fixed up)."""
        return base[:48] + struct.pack(">I", len(c)) + c + base[edk_len_off:]

    def pairs_bytes(pairs):
        return struct.pack(">I", len(pairs)) + b"".join(
            struct.pack(">I", len(k)) + k + struct.pack(">I", len(v)) + v for k, v in pairs)

    invalid = [
        ("bad-magic", b"KMSDENVX" + base[8:], "header"),
        ("version-2", base[:8] + b"\x00\x02" + base[10:], "header"),
        ("suite-2", base[:10] + b"\x00\x02" + base[12:], "header"),
        ("chunk-size-zero", base[:12] + b"\x00\x00\x00\x00" + base[16:], "header"),
        ("chunk-size-too-big", base[:12] + struct.pack(">I", MAX_CHUNK + 1) + base[16:], "header"),
        ("context-length-too-big", base[:48] + struct.pack(">I", MAX_CONTEXT_BYTES + 1) + base[52:], "header"),
        ("context-unsorted", base[:48] + struct.pack(">I", len(unsorted_ctx)) + unsorted_ctx + base[edk_len_off:], "header"),
        ("context-length-below-4", base[:48] + struct.pack(">I", 3) + base[52:], "header"),
        ("context-too-many-pairs", with_context(pairs_bytes([(b"k%02d" % i, b"") for i in range(MAX_PAIRS + 1)])), "header"),
        ("context-empty-key", with_context(pairs_bytes([(b"", b"v")])), "header"),
        ("context-bytes-after-pairs", with_context(pairs_bytes([(b"app", b"billing")]) + b"\x00"), "header"),
        ("context-length-past-field", with_context(struct.pack(">I", 1) + struct.pack(">I", 50) + b"app"), "header"),
        ("context-not-utf8", with_context(pairs_bytes([(b"app", b"\xff\xfe")])), "header"),
        ("context-count-too-high", with_context(struct.pack(">I", 2) + pairs_bytes([(b"app", b"x")])[4:]), "header"),
        ("edk-length-zero", base[:edk_len_off] + b"\x00\x00" + base[edk_len_off + 2:], "header"),
        ("edk-length-too-big", base[:edk_len_off] + struct.pack(">H", MAX_EDK + 1) + base[edk_len_off + 2:], "header"),
        ("header-cut", base[:hl - 1], "header"),
        ("commitment-flipped", flip(base, commit_off), "commitment"),
        ("commitment-of-another-key", forged_commit, "commitment"),
        ("message-id-flipped", flip(base, 20), "commitment"),
        ("context-value-flipped", flip(base, ctx_off + len(parts["canonical_context"]) - 1), "datakey"),
        ("chunk-size-changed", base[:12] + struct.pack(">I", 17) + base[16:], "header-tag"),
        ("header-tag-flipped", flip(base, hl - 1), "header-tag"),
        ("final-chunk-dropped", head + c1 + c2, "truncated"),
        ("cut-inside-chunk", base[:-1], "truncated"),
        ("empty-after-header", head, "truncated"),
        ("chunks-swapped", head + c2 + c1 + c3, "chunk-tag"),
        ("chunk-duplicated", head + c1 + c1 + c2 + c3, "chunk-tag"),
        ("chunk-dropped", head + c1 + c3, "chunk-tag"),
        ("ciphertext-flipped", flip(base, hl + 5), "chunk-tag"),
        ("chunk-tag-flipped", flip(base, hl + full - 1), "chunk-tag"),
        ("final-length-one-less", base[:hl + 2 * full + 1] + struct.pack(">I", 7) + base[hl + 2 * full + 5:], "chunk-tag"),
        ("final-marked-full", final_as_full, "truncated"),
        ("unknown-chunk-type", head + bytes([0x02]) + c1[1:] + c2 + c3, "malformed-chunk"),
        ("final-length-not-below-chunk-size", head + c1 + c2 + bytes([FINAL]) + struct.pack(">I", s) + b"\x00" * (s + 16), "malformed-chunk"),
        ("byte-appended", base + b"\x00", "trailing"),
        ("file-appended", base + base, "trailing"),
        ("chunk-from-another-file", head + c1 + c2 + files["exact-multiple"][0][-21:], "chunk-tag"),
    ]
    # Expected-context refusals (step 2): the file is intact, the caller expects otherwise.
    context_checks = [
        {"name": "expected-subset", "expected_context": {"app": "billing"}, "fails_at": None},
        {"name": "expected-all", "expected_context": {"app": "billing", "tenant": "42"}, "fails_at": None},
        {"name": "expected-other-value", "expected_context": {"app": "payroll"}, "fails_at": "context"},
        {"name": "expected-missing-key", "expected_context": {"dept": "x"}, "fails_at": "context"},
    ]
    return vectors, [{"name": n, "file_hex": h(b), "fails_at": step} for n, b, step in invalid], context_checks, files


def data_key_from(material):
    def get(edk, ctx):
        try:
            return kmsd_open(material, edk, ctx)
        except Exception:
            raise Refused("datakey", "kmsd would refuse the encrypted data key")
    return get


def check(vectors, invalid, context_checks, files):
    import io
    for v in vectors:
        plain, ctx = Reader(io.BytesIO(bytes.fromhex(v["file_hex"]))).read(data_key_from(KEY_MATERIAL))
        assert plain.hex() == v["plaintext_hex"], v["name"]
        assert ctx == v["encryption_context"], v["name"]
        assert kmsd_open(KEY_MATERIAL, bytes.fromhex(v["encrypted_data_key_hex"]), ctx).hex() == v["data_key_hex"]
    for v in invalid:
        try:
            Reader(io.BytesIO(bytes.fromhex(v["file_hex"]))).read(data_key_from(KEY_MATERIAL))
        except Refused as r:
            assert r.step == v["fails_at"], (v["name"], r.step, str(r))
        else:
            raise AssertionError(f"{v['name']} was not refused")
    base = files["three-chunks"][0]
    for c in context_checks:
        try:
            Reader(io.BytesIO(base)).read(data_key_from(KEY_MATERIAL), c["expected_context"])
            got = None
        except Refused as r:
            got = r.step
        assert got == c["fails_at"], (c["name"], got)


def main():
    if len(sys.argv) == 3 and sys.argv[1] == "--decrypt":
        dk = bytes.fromhex(sys.argv[2])
        out = sys.stdout.buffer
        try:
            Reader(sys.stdin.buffer).read(lambda edk, ctx: dk, emit=out.write)
        except Refused as r:
            out.flush()
            print(f"refused at {r.step}: {r}", file=sys.stderr)
            sys.exit(1)
        out.flush()
        return
    if len(sys.argv) != 1:
        print(__doc__, file=sys.stderr)
        sys.exit(2)
    vectors, invalid, context_checks, files = build()
    check(vectors, invalid, context_checks, files)
    doc = {
        "format": "kmsd file envelope v1",
        "spec": "PROTOCOL.md section 16",
        "key_id": KEY_ID,
        "key_material_hex": h(KEY_MATERIAL),
        "vectors": vectors,
        "invalid": invalid,
        "invalid_base": "three-chunks",
        "context_checks": context_checks,
        "context_checks_base": "three-chunks",
    }
    with open(os.path.join(HERE, "envelope.json"), "w") as f:
        json.dump(doc, f, indent=1, ensure_ascii=False)
        f.write("\n")
    print(f"envelope.json: {len(vectors)} valid, {len(invalid)} invalid, {len(context_checks)} context checks")


if __name__ == "__main__":
    main()
