import Foundation
@testable import KMSServer
import Testing

/// What the shipped kmsd.service must keep for the daemon's own guarantees to hold.
struct UnitFileTests {
    static let unit: [String: String] = {
        let path = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
            .deletingLastPathComponent().appendingPathComponent("systemd/kmsd.service").path
        let text = (try? String(contentsOfFile: path, encoding: .utf8)) ?? ""
        var settings: [String: String] = [:]
        for line in text.split(separator: "\n") where !line.hasPrefix("#") {
            let parts = line.split(separator: "=", maxSplits: 1)
            if parts.count == 2 { settings[String(parts[0])] = String(parts[1]) }
        }
        return settings
    }()

    @Test func journaldNeverRateLimitsTheAuditTrail() {
        #expect(Self.unit["LogRateLimitIntervalSec"] == "0")
    }

    @Test func theFileLimitFitsTheDefaultConnections() throws {
        let limit = try #require(Self.unit["LimitNOFILE"].flatMap(Int.init))
        #expect(limit >= ServerConfiguration().maxConnections + 64)
    }

    @Test func noCoreDumpsAndLockedMemory() {
        #expect(Self.unit["LimitCORE"] == "0")
        #expect(Self.unit["LimitMEMLOCK"] != nil)
    }
}
