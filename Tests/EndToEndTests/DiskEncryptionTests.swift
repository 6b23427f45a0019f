import Foundation
import Glibc
import KMSClient
import Testing

/// A LUKS2 passphrase sealed under a kmsd key and handed to cryptsetup through a pipe, as the
/// README's recipe does. Needs root (loop devices, cryptsetup). Formats a file-backed volume on
/// a loop device when one can be had (else on the file itself), then opens it through kmsctl:
/// with a real dm-crypt mapping when the kernel offers device-mapper here, else with
/// `cryptsetup open --test-passphrase` (the same key-slot unlock, without creating the
/// mapping). Prints which ran. A wrong encryption context, a disabled key and a wrong
/// passphrase cannot open it.
@Suite(.serialized)
final class DiskEncryptionTests {
    let daemon: Daemon
    let dir: String

    init() throws {
        daemon = try Daemon()
        dir = try Paths.tempDir("luks")
    }

    deinit {
        daemon.stop()
        try? FileManager.default.removeItem(atPath: dir)
    }

    /// Runs a bash script with KMSD_SOCKET and kmsctl on PATH; returns status and output.
    func shell(_ script: String) throws -> ProcessResult {
        try run("/bin/bash", ["-c", "export PATH=\(Paths.binDir.path):$PATH; " + script], env: ["KMSD_SOCKET": daemon.socket])
    }

    @Test(.enabled(if: isRoot, "loop devices and cryptsetup need root"))
    func aSealedPassphraseOpensTheVolumeAndOnlyWithItsContext() async throws {
        let key = try await daemon.client().createKey(description: "disks").keyID
        try await daemon.client().createAlias(aliasName: "alias/disks", targetKeyID: key)
        let sealed = dir + "/data.luks-key.enc", image = dir + "/volume.img"

        // 1. A fresh random passphrase, sealed at once: it exists only in the pipe.
        let make = try shell("set -o pipefail; kmsctl generate-random --number-of-bytes 64 | kmsctl encrypt --key-id alias/disks --context volume=data > \(sealed)")
        #expect(make.status == 0, "\(make.stderr)")
        #expect((try? Data(contentsOf: URL(fileURLWithPath: sealed)))?.count == 64 + 82)

        // 2. The volume: a loop device when possible.
        #expect(try shell("truncate -s 40M \(image)").status == 0)
        let loop = try shell("losetup --find --show \(image)")
        let device = loop.status == 0 ? loop.text.trimmingCharacters(in: .whitespacesAndNewlines) : image
        defer { if device != image { _ = try? shell("cryptsetup close kmsd-e2e-data 2>/dev/null; losetup -d \(device)") } }
        let format = try shell("set -o pipefail; kmsctl decrypt --context volume=data < \(sealed) | cryptsetup luksFormat --type luks2 --batch-mode --pbkdf pbkdf2 --pbkdf-force-iterations 1000 --key-file=- \(device)")
        #expect(format.status == 0, "\(format.stderr)")
        let dump = try shell("cryptsetup luksDump \(device)")
        #expect(dump.text.split(separator: "\n").contains { $0.hasPrefix("Version:") && $0.split(whereSeparator: \.isWhitespace).last == "2" }, "LUKS2: \(dump.text)")

        // 3. Open through kmsctl.
        let mapper = FileManager.default.fileExists(atPath: "/dev/mapper/control")
        var mode = "--test-passphrase (no device-mapper in this kernel/container)"
        let open = try shell("set -o pipefail; kmsctl decrypt --context volume=data < \(sealed) | cryptsetup open --test-passphrase --key-file=- \(device)")
        #expect(open.status == 0, "\(open.stderr)")
        if mapper {
            let mapped = try shell("set -o pipefail; kmsctl decrypt --context volume=data < \(sealed) | cryptsetup open --key-file=- \(device) kmsd-e2e-data")
            if mapped.status == 0 {
                mode = "a dm-crypt mapping (/dev/mapper/kmsd-e2e-data), written and read back"
                let io = try shell("set -e; printf 'kmsd-luks-check' | dd of=/dev/mapper/kmsd-e2e-data bs=512 conv=sync,fsync status=none; cryptsetup close kmsd-e2e-data; kmsctl decrypt --context volume=data < \(sealed) | cryptsetup open --key-file=- \(device) kmsd-e2e-data; head -c 15 /dev/mapper/kmsd-e2e-data; cryptsetup close kmsd-e2e-data")
                #expect(io.status == 0 && io.text == "kmsd-luks-check", "\(io.stderr)")
            } else {
                #expect(mapped.stderr.contains("device-mapper"), "open failed for another reason than device-mapper: \(mapped.stderr)")
            }
        }
        print("LUKS2 test: formatted on \(device == image ? "the image file (no loop device)" : "loop device \(device)"); opened with \(mode)")

        // 4. The wrong context: kmsd refuses, cryptsetup gets no passphrase, the volume stays shut.
        let wrongContext = try shell("kmsctl decrypt --context volume=other < \(sealed) | cryptsetup open --test-passphrase --key-file=- \(device); echo \"${PIPESTATUS[@]}\"")
        let statuses = wrongContext.text.split(whereSeparator: \.isWhitespace)
        #expect(statuses.count == 2 && statuses[0] == "1" && statuses[1] != "0", "\(wrongContext.text) \(wrongContext.stderr)")
        #expect(wrongContext.stderr.contains("InvalidCiphertextException"))
        // A different passphrase does not open it either (the check above is not vacuous).
        let wrongPassphrase = try shell("kmsctl generate-random --number-of-bytes 64 | cryptsetup open --test-passphrase --key-file=- \(device)")
        #expect(wrongPassphrase.status != 0)
        // A disabled key: nothing opens until it is enabled again.
        try await daemon.client().disableKey(keyID: key)
        let disabled = try shell("set -o pipefail; kmsctl decrypt --context volume=data < \(sealed) | cryptsetup open --test-passphrase --key-file=- \(device)")
        #expect(disabled.status != 0 && disabled.stderr.contains("DisabledException"), "\(disabled.stderr)")
        try await daemon.client().enableKey(keyID: key)
        #expect(try shell("set -o pipefail; kmsctl decrypt --context volume=data < \(sealed) | cryptsetup open --test-passphrase --key-file=- \(device)").status == 0)
    }
}
