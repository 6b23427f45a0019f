import Foundation
import Testing

/// The Python client (clients/python, written from Protocol/ alone) runs its own test suite
/// against a real kmsd, with kmsctl beside it for blobs that cross between the two clients.
/// Every Python test must run and pass: a skipped one fails this test.
struct PythonClientTests {
    static let clientDir = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
        .deletingLastPathComponent().appendingPathComponent("clients/python").path

    static let interpreter = python(importing: "google.protobuf")

    @Test func thePythonSuitePassesAgainstARealKMSD() throws {
        let daemon = try Daemon()
        defer { daemon.stop() }
        let r = try run("/usr/bin/env", [Self.interpreter, "-B", "-m", "unittest", "discover", "-v", "-s", Self.clientDir + "/tests", "-t", Self.clientDir + "/tests"],
                        env: ["KMSD_SOCKET": daemon.socket, "KMSCTL": Paths.kmsctl, "PYTHONPATH": Self.clientDir])
        // unittest reports on stderr.
        #expect(r.status == 0, "\(r.stderr)")
        let summary = r.stderr.split(separator: "\n").map(String.init)
        let ran = summary.first { $0.hasPrefix("Ran ") }.flatMap { Int($0.split(separator: " ")[1]) } ?? 0
        #expect(ran >= 8, "\(r.stderr)")
        #expect(summary.last == "OK", "every test passed and none was skipped: \(summary.last ?? "")")
        #expect(!r.stderr.contains("skipped"), "\(r.stderr)")
        print("Python client: \(ran) tests passed against kmsd")
    }
}
