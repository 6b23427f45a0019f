"""The Python client against a real kmsd: KMSD_SOCKET must name a running kmsd whose
administrators include this uid (EndToEndTests/PythonClientTests starts one and runs this).

    KMSD_SOCKET=... PYTHONPATH=clients/python python3 -m unittest discover -s clients/python/tests -v

KMSCTL, when set, names a kmsctl to check that blobs cross between the two clients.
"""

import os
import socket
import struct
import subprocess
import unittest

import kmsd
from kmsd import kmsd_pb2


class ClientTests(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        if not os.environ.get("KMSD_SOCKET"):
            raise unittest.SkipTest("KMSD_SOCKET is not set")  # never counted as passing by the Swift runner
        cls.kms = kmsd.Client()
        cls.key = cls.kms.create_key(Description="python client")["KeyMetadata"]["KeyId"]

    @classmethod
    def tearDownClass(cls):
        cls.kms.close()

    def test_hello_negotiates_version_1_and_lists_operations(self):
        answer = self.kms.hello()
        self.assertEqual(answer["ProtocolVersion"], 1)
        for op in ["Encrypt", "Decrypt", "GenerateDataKey", "CreateKey", "ListAliases"]:
            self.assertIn(op, answer["Operations"])
        # Every operation the server lists is a method here (both come from kmsd.proto).
        methods = {name.replace("_", "") for name in kmsd.Client.operations()}
        for op in answer["Operations"]:
            self.assertIn(op.lower(), methods)
        self.assertGreater(answer["MaxFrameBytes"], 0)

    def test_encrypt_decrypt_round_trip_with_context(self):
        plaintext = bytes(range(256)) + b"\x00\x00"
        enc = self.kms.encrypt(KeyId=self.key, Plaintext=plaintext, EncryptionContext={"app": "py", "tier": "1"})
        self.assertEqual(enc["KeyId"], self.key)
        blob = enc["CiphertextBlob"]
        self.assertEqual(len(blob), len(plaintext) + 82)   # PROTOCOL.md section 9.1
        self.assertEqual(blob[0], 0x01)
        dec = self.kms.decrypt(CiphertextBlob=blob, EncryptionContext={"tier": "1", "app": "py"})
        self.assertEqual(dec["Plaintext"], plaintext)
        self.assertEqual(dec["KeyId"], self.key)

    def test_errors_carry_stable_codes(self):
        blob = self.kms.encrypt(KeyId=self.key, Plaintext=b"x", EncryptionContext={"a": "b"})["CiphertextBlob"]
        with self.assertRaises(kmsd.InvalidCiphertextException) as cm:
            self.kms.decrypt(CiphertextBlob=blob, EncryptionContext={"a": "c"})
        self.assertEqual(cm.exception.code, "InvalidCiphertextException")
        with self.assertRaises(kmsd.NotFoundException):
            self.kms.describe_key(KeyId="00000000-0000-4000-8000-000000000000")
        with self.assertRaises(kmsd.ValidationException):
            self.kms.encrypt(KeyId=self.key, Plaintext=b"", EncryptionContext={})
        with self.assertRaises(kmsd.KMSError) as generic:
            self.kms.create_alias(AliasName="alias/aws/reserved", TargetKeyId=self.key)
        self.assertIsInstance(generic.exception, kmsd.errors[generic.exception.code])
        # A field or operation that does not exist is refused here, before anything is sent.
        with self.assertRaises(TypeError):
            self.kms.encrypt(KeyID=self.key, Plaintext=b"x")
        with self.assertRaises(AttributeError):
            self.kms.encrypt_everything()

    def test_data_keys(self):
        gdk = self.kms.generate_data_key(KeyId=self.key, KeySpec="AES_256", EncryptionContext={"f": "1"})
        self.assertEqual(len(gdk["Plaintext"]), 32)
        again = self.kms.decrypt(CiphertextBlob=gdk["CiphertextBlob"], EncryptionContext={"f": "1"})
        self.assertEqual(again["Plaintext"], gdk["Plaintext"])
        without = self.kms.generate_data_key_without_plaintext(KeyId=self.key, NumberOfBytes=64)
        self.assertEqual(len(self.kms.decrypt(CiphertextBlob=without["CiphertextBlob"])["Plaintext"]), 64)
        self.assertEqual(len(self.kms.generate_random(NumberOfBytes=48)["Plaintext"]), 48)

    def test_pipelined_requests_are_matched_by_id(self):
        # 200 requests: more than one window (kmsd.Client.WINDOW) and more than kmsd's in-flight limit.
        plaintexts = [f"message {i}".encode() for i in range(200)]
        requests = [self.kms.request("encrypt", KeyId=self.key, Plaintext=p) for p in plaintexts]
        requests.insert(7, self.kms.request("describe_key", KeyId="00000000-0000-4000-8000-000000000000"))
        answers = self.kms.pipeline(requests)
        self.assertIsInstance(answers[7], kmsd.NotFoundException)
        blobs = [a["CiphertextBlob"] for i, a in enumerate(answers) if i != 7]
        decrypted = self.kms.pipeline([self.kms.request("decrypt", CiphertextBlob=b) for b in blobs])
        self.assertEqual([d["Plaintext"] for d in decrypted], plaintexts)

    def test_aliases_tags_and_listing(self):
        key = self.kms.create_key(Description="aliased", Tags=[{"TagKey": "team", "TagValue": "py"}])["KeyMetadata"]["KeyId"]
        self.kms.create_alias(AliasName="alias/python-client", TargetKeyId=key)
        blob = self.kms.encrypt(KeyId="alias/python-client", Plaintext=b"via alias")["CiphertextBlob"]
        self.assertEqual(self.kms.decrypt(CiphertextBlob=blob)["KeyId"], key)
        aliases = self.kms.list_aliases(KeyId=key)["Aliases"]
        self.assertEqual([a["AliasName"] for a in aliases], ["alias/python-client"])
        tags = self.kms.list_resource_tags(KeyId=key)["Tags"]
        self.assertEqual(tags, [{"TagKey": "team", "TagValue": "py"}])
        listed = []
        marker = ""
        while True:
            page = self.kms.list_keys(Limit=1, Marker=marker)
            listed += [k["KeyId"] for k in page["Keys"]]
            if not page["Truncated"]:
                break
            marker = page["NextMarker"]
        self.assertIn(key, listed)
        self.assertIn(self.key, listed)

    def test_a_malformed_frame_is_a_connection_level_error(self):
        # Written from PROTOCOL.md section 3: a zero-length frame gets an id-0 ValidationException
        # and the connection is closed; other connections are unaffected.
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(10)
        s.connect(os.environ["KMSD_SOCKET"])
        s.sendall(b"\x00\x00\x00\x00")
        (n,) = struct.unpack(">I", s.recv(4, socket.MSG_WAITALL))
        response = kmsd_pb2.Response()
        response.ParseFromString(s.recv(n, socket.MSG_WAITALL))
        self.assertEqual(response.id, 0)
        self.assertEqual(response.error.code, "ValidationException")
        self.assertEqual(s.recv(1), b"")
        s.close()
        self.assertEqual(self.kms.hello()["ProtocolVersion"], 1)

    def test_blobs_cross_between_python_and_kmsctl(self):
        kmsctl = os.environ.get("KMSCTL")
        if not kmsctl:
            self.skipTest("KMSCTL is not set")
        blob = self.kms.encrypt(KeyId=self.key, Plaintext=b"from python", EncryptionContext={"x": "y"})["CiphertextBlob"]
        out = subprocess.run([kmsctl, "decrypt", "--context", "x=y"], input=blob, capture_output=True, check=True)
        self.assertEqual(out.stdout, b"from python")
        made = subprocess.run([kmsctl, "encrypt", "--key-id", self.key, "--context", "x=y"], input=b"from kmsctl",
                              capture_output=True, check=True).stdout
        self.assertEqual(self.kms.decrypt(CiphertextBlob=made, EncryptionContext={"x": "y"})["Plaintext"], b"from kmsctl")


if __name__ == "__main__":
    unittest.main()
