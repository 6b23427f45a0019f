import Foundation
import Glibc
import KMSClient
import Testing

/// `kmsctl encrypt-file` / `decrypt-file` (PROTOCOL.md §16) against a real kmsd: round trips
/// through pipes and paths, every kind of damage refused with InvalidCiphertextException and
/// nothing left behind, the file read back by the independent Python reference, and 1 GiB
/// streamed in constant memory.
@Suite(.serialized)
final class FileEnvelopeTests {
    let daemon: Daemon
    let dir: String

    init() throws {
        daemon = try Daemon()
        dir = try Paths.tempDir("envelope")
    }

    deinit {
        daemon.stop()
        try? FileManager.default.removeItem(atPath: dir)
    }

    func kmsctl(_ args: [String], stdin: Data = Data()) throws -> ProcessResult { try daemon.kmsctl(args, stdin: stdin) }

    func createKey() async throws -> String {
        try await daemon.client().createKey(description: "files").keyID
    }

    static func pattern(_ n: Int, seed: UInt8 = 1) -> Data {
        Data((0..<n).map { UInt8(truncatingIfNeeded: $0 &* 131 &+ Int(seed) &* 7 &+ ($0 >> 9)) })
    }

    @Test(arguments: [0, 1, 4095, 4096, 4097, 3 * 4096, 100_000])
    func roundTripsThroughStandardInputAndOutput(size: Int) async throws {
        let id = try await createKey()
        let plaintext = Self.pattern(size)
        let enc = try kmsctl(["encrypt-file", "--key-id", id, "--context", "app=web", "--context", "tier=db", "--chunk-size", "4096"], stdin: plaintext)
        #expect(enc.status == 0, "\(enc.stderr)")
        #expect(enc.stdout.starts(with: Array("KMSDENVL".utf8)))
        // Chunks: size / 4096 full ones (17 bytes of type and tag each) and one final (21).
        let header = enc.stdout.count - size - (size / 4096) * 17 - 21
        #expect(header > 102 && header < 400, "header of \(header) bytes")
        let dec = try kmsctl(["decrypt-file", "--context", "tier=db"], stdin: enc.stdout)
        #expect(dec.status == 0, "\(dec.stderr)")
        #expect(dec.stdout == plaintext)
        // Two encryptions of the same input differ (fresh data key and message id).
        let again = try kmsctl(["encrypt-file", "--key-id", id, "--context", "app=web", "--context", "tier=db", "--chunk-size", "4096"], stdin: plaintext)
        #expect(again.stdout != enc.stdout)
    }

    @Test func pathsAliasesJSONAndPermissions() async throws {
        let id = try await createKey()
        let client = daemon.client()
        try await client.createAlias(aliasName: "alias/files", targetKeyID: id)
        let plain = dir + "/plain", sealed = dir + "/sealed", opened = dir + "/opened"
        try Self.pattern(200_000).write(to: URL(fileURLWithPath: plain))
        let enc = try kmsctl(["encrypt-file", "--key-id", "alias/files", "--in", plain, "--out", sealed, "--json"])
        let summary = try #require(try JSONSerialization.jsonObject(with: enc.stdout) as? [String: Any], "\(enc.stderr)")
        #expect(summary["KeyId"] as? String == id)
        #expect(summary["PlaintextBytes"] as? Int == 200_000)
        #expect(summary["Chunks"] as? Int == 4)
        #expect((summary["MessageId"] as? String)?.count == 64)
        let dec = try kmsctl(["decrypt-file", "--key-id", id, "--in", sealed, "--out", opened])
        #expect(dec.status == 0, "\(dec.stderr)")
        #expect(try Data(contentsOf: URL(fileURLWithPath: opened)) == Self.pattern(200_000))
        var st = stat()
        stat(opened, &st)
        #expect(st.st_mode & 0o777 == 0o600, "decrypted files are private to their owner")
        // No temporary files are left beside the outputs.
        #expect(try FileManager.default.contentsOfDirectory(atPath: dir).sorted() == ["opened", "plain", "sealed"])
        // --key-id on decrypt-file must name the key that encrypted the data key.
        let other = try await createKey()
        let wrong = try kmsctl(["decrypt-file", "--key-id", other, "--in", sealed])
        #expect(wrong.status == 1 && wrong.stderr.contains("IncorrectKeyException"), "\(wrong.stderr)")
    }

    /// Each damage is refused with InvalidCiphertextException, status 1; with --out no file
    /// (and no temporary file) is left behind.
    @Test func damageIsRefusedAndLeavesNothingBehind() async throws {
        let id = try await createKey()
        let plaintext = Self.pattern(3 * 1000 + 500)
        let enc = try kmsctl(["encrypt-file", "--key-id", id, "--context", "k=v", "--chunk-size", "1000"], stdin: plaintext)
        #expect(enc.status == 0, "\(enc.stderr)")
        let file = [UInt8](enc.stdout)
        let full = 1 + 1000 + 16
        let headerLength = file.count - 3 * full - (1 + 4 + 500 + 16)
        let head = Array(file[..<headerLength])
        let chunks = (0..<3).map { Array(file[(headerLength + $0 * full)..<(headerLength + ($0 + 1) * full)]) }
        let final = Array(file[(headerLength + 3 * full)...])
        func flipped(_ at: Int) -> [UInt8] { var f = file; f[at] ^= 0x40; return f }
        let damaged: [(String, [UInt8])] = [
            ("truncated before the final chunk", head + chunks[0] + chunks[1] + chunks[2]),
            ("cut inside a chunk", Array(file.dropLast(3))),
            ("only the header", head),
            ("chunks reordered", head + chunks[1] + chunks[0] + chunks[2] + final),
            ("chunk duplicated", head + chunks[0] + chunks[0] + chunks[1] + chunks[2] + final),
            ("chunk dropped", head + chunks[0] + chunks[2] + final),
            ("bit flip in a chunk", flipped(headerLength + full + 10)),
            ("bit flip in a tag", flipped(file.count - 1)),
            ("bit flip in the commitment", flipped(headerLength - 20)),
            ("bit flip in the header tag", flipped(headerLength - 1)),
            ("bit flip in the message id", flipped(20)),
            ("bytes appended", file + [0]),
            ("two files joined", file + file),
            ("not an envelope", Array("hello world, this is not encrypted at all".utf8)),
        ]
        for (what, bytes) in damaged {
            let r = try kmsctl(["decrypt-file"], stdin: Data(bytes))
            #expect(r.status == 1, "\(what): status \(r.status)")
            #expect(r.stderr.hasPrefix("kmsctl: InvalidCiphertextException: "), "\(what): \(r.stderr)")
            // Nothing of a chunk that did not verify reaches the output.
            #expect(r.stdout.count <= plaintext.count && plaintext.starts(with: r.stdout), "\(what)")
            let input = dir + "/damaged", output = dir + "/out"
            try Data(bytes).write(to: URL(fileURLWithPath: input))
            let toPath = try kmsctl(["decrypt-file", "--in", input, "--out", output])
            #expect(toPath.status == 1, "\(what)")
            #expect(!FileManager.default.fileExists(atPath: output), "\(what): a partial output was left")
            #expect(try FileManager.default.contentsOfDirectory(atPath: dir) == ["damaged"], "\(what)")
            unlink(input)
        }
        // The intact file still decrypts.
        #expect(try kmsctl(["decrypt-file"], stdin: enc.stdout).stdout == plaintext)
    }

    /// The context is stored in the header and bound to the data key by kmsd: an expected
    /// pair that is not in the file refuses before kmsd is asked, and a header whose context
    /// was rewritten is refused by kmsd's Decrypt (the data key is bound to the original).
    @Test func encryptionContextIsEnforced() async throws {
        let id = try await createKey()
        let enc = try kmsctl(["encrypt-file", "--key-id", id, "--context", "dept=payroll"], stdin: Data("salaries".utf8))
        #expect(enc.status == 0)
        let decrypts = { try await self.daemon.client().status().requests.filter { $0.action == "Decrypt" }.reduce(0) { $0 + $1.count } }
        let before = try await decrypts()
        for expected in ["dept=finance", "owner=alice"] {
            let r = try kmsctl(["decrypt-file", "--context", expected], stdin: enc.stdout)
            #expect(r.status == 1 && r.stderr.contains("InvalidCiphertextException") && r.stdout.isEmpty, "\(r.stderr)")
        }
        #expect(try await decrypts() == before, "an unexpected context is refused before kmsd is asked")
        // Rewrite "payroll" to "finance" in the stored context (same length).
        var bytes = [UInt8](enc.stdout)
        let at = try #require(bytes.firstRange(of: Array("payroll".utf8)))
        bytes.replaceSubrange(at, with: Array("finance".utf8))
        let rewritten = try kmsctl(["decrypt-file"], stdin: Data(bytes))
        #expect(rewritten.status == 1 && rewritten.stderr.contains("InvalidCiphertextException") && rewritten.stdout.isEmpty, "\(rewritten.stderr)")
        #expect(try kmsctl(["decrypt-file", "--context", "dept=payroll"], stdin: enc.stdout).stdout == Data("salaries".utf8))
    }

    /// A file kmsctl made is read by the independent Python reader of PROTOCOL.md §16
    /// (Protocol/vectors/gen_envelope.py), given the data key that kmsctl decrypt returns for
    /// the encrypted data key in the header.
    @Test func theIndependentReaderReadsWhatKmsctlWrites() async throws {
        let id = try await createKey()
        let plaintext = Self.pattern(70_000)
        let enc = try kmsctl(["encrypt-file", "--key-id", id, "--context", "app=ref", "--chunk-size", "30000"], stdin: plaintext)
        #expect(enc.status == 0)
        var input = BytesInput([UInt8](enc.stdout))
        let header = try FileEnvelope.readHeader(from: &input)
        #expect(header.encryptionContext == ["app": "ref"] && header.chunkSize == 30000)
        let dataKey = try kmsctl(["decrypt", "--context", "app=ref"], stdin: Data(header.encryptedDataKey))
        #expect(dataKey.status == 0 && dataKey.stdout.count == 32, "\(dataKey.stderr)")
        let hex = dataKey.stdout.map { String(format: "%02x", $0) }.joined()
        let reference = try runReference("gen_envelope.py", ["--decrypt", hex], stdin: enc.stdout)
        #expect(reference.status == 0, "\(reference.stderr)")
        #expect(reference.stdout == plaintext)
        // And the reference refuses the same file cut short.
        let cut = try runReference("gen_envelope.py", ["--decrypt", hex], stdin: enc.stdout.dropLast(30))
        #expect(cut.status == 1 && cut.stderr.contains("truncated"), "\(cut.stderr)")
    }

    /// 1 GiB of pseudo-random bytes through `encrypt-file | decrypt-file` in one pipeline: the
    /// output hashes to the input's hash and no process in the pipeline grows past 100 MiB.
    @Test func oneGibibyteStreamsInConstantMemory() async throws {
        let id = try await createKey()
        let generator = "openssl enc -aes-256-ctr -nosalt -K \(String(repeating: "5a", count: 32)) -iv \(String(repeating: "00", count: 16)) -in /dev/zero 2>/dev/null | head -c 1073741824"
        let script = """
        \(generator) | sha256sum | cut -d' ' -f1 > \(dir)/in.sha
        \(generator) | \(Paths.kmsctl) encrypt-file --key-id \(id) --context size=1GiB \
          | tee >(wc -c > \(dir)/enc.size) \
          | \(Paths.kmsctl) decrypt-file --context size=1GiB | sha256sum | cut -d' ' -f1 > \(dir)/out.sha
        echo "${PIPESTATUS[@]}" > \(dir)/status
        wait
        """
        try script.write(toFile: dir + "/pipeline.sh", atomically: true, encoding: .utf8)
        let child = try ChildProcess("/bin/bash", [dir + "/pipeline.sh"], env: ["KMSD_SOCKET": daemon.socket], stderr: dir + "/stderr")
        let (status, maxRSS) = child.waitWithMaxRSS()
        let read = { (name: String) in (try? String(contentsOfFile: "\(self.dir)/\(name)", encoding: .utf8))?.trimmingCharacters(in: .whitespacesAndNewlines) ?? "" }
        #expect(status == 0, "\(read("stderr"))")
        // PIPESTATUS: openssl (ends when head has enough), head, encrypt-file, tee, decrypt-file,
        // sha256sum, cut.
        let statuses = read("status").split(separator: " ")
        #expect(statuses.count == 7 && statuses[2] == "0" && statuses[4] == "0", "statuses \(statuses): \(read("stderr"))")
        #expect(read("in.sha").count == 64 && read("in.sha") == read("out.sha"))
        // 1 GiB of plaintext, 16384 full chunks of 64 KiB and an empty final chunk.
        let header = (Int(read("enc.size")) ?? 0) - 1_073_741_824 - 16384 * 17 - 21
        #expect(header > 102 && header < 400, "envelope of \(read("enc.size")) bytes")
        #expect(maxRSS < 100 * 1024, "largest process in the pipeline: \(maxRSS) KiB")
        print("1 GiB pipeline: largest resident set \(maxRSS / 1024) MiB")
    }
}
