import Foundation
import KMSClient
import KMSProtocol
import Testing

/// Status and metrics: what kmsctl status and kmsctl metrics show matches what was done, and
/// the metrics follow the Prometheus text format's rules (checked by a parser of those rules).
@Suite(.serialized)
final class StatusTests {
    let daemon: Daemon
    init() throws { daemon = try Daemon() }
    deinit { daemon.stop() }

    func kmsctl(_ args: [String]) throws -> ProcessResult {
        try run(Paths.kmsctl, args, env: ["KMSD_SOCKET": daemon.socket])
    }

    @Test func statusCountsWhatHappened() async throws {
        let c = daemon.client()
        let a = try await c.createKey().keyID
        let b = try await c.createKey().keyID
        try await c.disableKey(keyID: b)
        for i in 0..<3 { _ = try await c.encrypt(keyID: a, plaintext: [UInt8(i)]) }
        await expectKMSError(.notFound) { try await c.describeKey(keyID: UUID().uuidString) }
        await c.close()
        let r = try kmsctl(["status", "--json"])
        #expect(r.status == 0, "\(r.stderr)")
        let s = try #require(try JSONSerialization.jsonObject(with: r.stdout) as? [String: Any])
        #expect((s["KeysByState"] as? [String: Int]) == ["Enabled": 1, "Disabled": 1])
        let requests = try #require(s["Requests"] as? [[String: Any]])
        func count(_ action: String, _ result: String) -> Int? {
            requests.first { $0["Action"] as? String == action && $0["Result"] as? String == result }?["Count"] as? Int
        }
        #expect(count("Encrypt", "Allowed") == 3 && count("CreateKey", "Allowed") == 2 && count("DescribeKey", "Failed") == 1)
        #expect((s["KeyCacheEntries"] as? Int ?? 0) >= 1 && (s["LatencyP50Micros"] as? Int ?? 0) > 0)
        #expect((s["AuditSequence"] as? Int ?? -1) >= 0 && (s["UptimeSeconds"] as? Int) != nil)
        let table = try kmsctl(["status"])
        #expect(table.status == 0 && table.text.contains("Enabled 1") && table.text.contains("Encrypt"), "\(table.text)")
    }

    @Test func metricsAreValidPrometheusText() async throws {
        let c = daemon.client()
        let key = try await c.createKey().keyID
        for _ in 0..<5 { _ = try await c.encrypt(keyID: key, plaintext: [1]) }
        await c.close()
        let r = try kmsctl(["metrics"])
        #expect(r.status == 0, "\(r.stderr)")
        let families = try PrometheusText.parse(r.text)
        #expect(families["kmsd_requests_total"]?.type == "counter")
        #expect(families["kmsd_request_duration_seconds"]?.type == "histogram")
        let encrypts = families["kmsd_requests_total"]?.samples.first { $0.labels == ["action": "Encrypt", "result": "Allowed"] }
        #expect(encrypts?.value == 5)
        #expect(families["kmsd_keys"]?.samples.first { $0.labels["state"] == "Enabled" }?.value == 1)
        #expect(families["kmsd_up"]?.samples.first?.value == 1)
    }

    /// The format checker itself refuses what Prometheus would.
    @Test(arguments: [
        "# TYPE x_total counter\nx_total{a=b} 1\n",                       // unquoted label value
        "# TYPE x counter\nx 1\n",                                        // counter not *_total
        "# TYPE x gauge\nx one\n",                                        // not a number
        "# TYPE h histogram\nh_bucket{le=\"1\"} 2\nh_bucket{le=\"+Inf\"} 1\nh_sum 1\nh_count 1\n",  // not cumulative
        "# TYPE h histogram\nh_bucket{le=\"1\"} 1\nh_sum 1\nh_count 1\n", // no +Inf
        "# TYPE a gauge\na 1\n# TYPE b gauge\nb 1\na 2\n",              // family split
        "# TYPE 1x gauge\n1x 1\n",                                        // bad name
    ])
    func theFormatCheckerRefusesBadText(_ text: String) {
        #expect(throws: PrometheusText.Invalid.self) { try PrometheusText.parse(text) }
    }

    @Test(.enabled(if: isRoot, "needs root to act as another user"))
    func onlyAdministratorsSeeStatus() throws {
        let r = try runAs(uid: 64201, [Paths.kmsctl, "status"], env: ["KMSD_SOCKET": daemon.socket])
        #expect(r.status != 0 && r.stderr.contains("AccessDeniedException"), "\(r.stderr)")
    }
}

/// The Prometheus text exposition format (0.0.4), parsed strictly: metric and label names,
/// quoted and escaped label values, numeric values, one HELP and TYPE per family before its
/// samples, samples of a family together, histograms with ascending `le`, cumulative counts,
/// a +Inf bucket equal to _count, and _sum; counters named *_total.
enum PrometheusText {
    struct Sample { let name: String; let labels: [String: String]; let value: Double }
    struct Family { var type = ""; var help = ""; var samples: [Sample] = [] }
    struct Invalid: Error, CustomStringConvertible { let description: String }

    static func parse(_ text: String) throws -> [String: Family] {
        var families: [String: Family] = [:]
        var closed = Set<String>()
        var current: String? = nil
        func isName(_ s: Substring, colons: Bool = true) -> Bool {
            guard let first = s.first, first.isLetter || first == "_" || (colons && first == ":") else { return false }
            return s.allSatisfy { $0.isASCII && ($0.isLetter || $0.isNumber || $0 == "_" || (colons && $0 == ":")) }
        }
        func family(of sample: String) -> String {
            for suffix in ["_bucket", "_sum", "_count"] where sample.hasSuffix(suffix) {
                let base = String(sample.dropLast(suffix.count))
                if families[base]?.type == "histogram" { return base }
            }
            return sample
        }
        for (n, raw) in text.split(separator: "\n", omittingEmptySubsequences: false).enumerated() {
            let line = String(raw)
            if line.isEmpty { continue }
            if line.hasPrefix("# ") {
                let parts = line.split(separator: " ", maxSplits: 3)
                guard parts.count >= 3, parts[1] == "HELP" || parts[1] == "TYPE", isName(parts[2]) else { continue }
                let name = String(parts[2])
                if let c = current, c != name { closed.insert(c) }
                guard !closed.contains(name) else { throw Invalid(description: "line \(n + 1): \(name) described again after its samples") }
                current = name
                if parts[1] == "TYPE" {
                    let type = parts.count > 3 ? String(parts[3]) : ""
                    guard ["counter", "gauge", "histogram", "summary", "untyped"].contains(type) else { throw Invalid(description: "line \(n + 1): type \(type)") }
                    guard families[name]?.type.isEmpty ?? true else { throw Invalid(description: "line \(n + 1): second TYPE for \(name)") }
                    guard families[name]?.samples.isEmpty ?? true else { throw Invalid(description: "line \(n + 1): TYPE after samples of \(name)") }
                    families[name, default: Family()].type = type
                    if type == "counter", !name.hasSuffix("_total") { throw Invalid(description: "counter \(name) is not named *_total") }
                } else {
                    families[name, default: Family()].help = parts.count > 3 ? String(parts[3]) : ""
                }
                continue
            }
            // name{label="value",...} value
            var rest = Substring(line)
            let nameEnd = rest.firstIndex { $0 == "{" || $0 == " " } ?? rest.endIndex
            let name = String(rest[..<nameEnd])
            guard isName(Substring(name)) else { throw Invalid(description: "line \(n + 1): metric name '\(name)'") }
            rest = rest[nameEnd...]
            var labels: [String: String] = [:]
            if rest.first == "{" {
                rest = rest.dropFirst()
                while rest.first != "}" {
                    guard let eq = rest.firstIndex(of: "=") else { throw Invalid(description: "line \(n + 1): label without =") }
                    let label = rest[..<eq]
                    guard isName(label, colons: false), !label.hasPrefix("__") else { throw Invalid(description: "line \(n + 1): label name '\(label)'") }
                    rest = rest[rest.index(after: eq)...]
                    guard rest.first == "\"" else { throw Invalid(description: "line \(n + 1): unquoted label value") }
                    rest = rest.dropFirst()
                    var value = ""
                    while let ch = rest.first, ch != "\"" {
                        rest = rest.dropFirst()
                        if ch == "\\" {
                            guard let esc = rest.first, "\\\"n".contains(esc) else { throw Invalid(description: "line \(n + 1): bad escape") }
                            value.append(esc == "n" ? "\n" : esc)
                            rest = rest.dropFirst()
                        } else { value.append(ch) }
                    }
                    guard rest.first == "\"" else { throw Invalid(description: "line \(n + 1): unterminated label value") }
                    rest = rest.dropFirst()
                    guard labels.updateValue(value, forKey: String(label)) == nil else { throw Invalid(description: "line \(n + 1): label \(label) twice") }
                    if rest.first == "," { rest = rest.dropFirst() } else if rest.first != "}" { throw Invalid(description: "line \(n + 1): expected , or }") }
                }
                rest = rest.dropFirst()
            }
            guard rest.first == " " else { throw Invalid(description: "line \(n + 1): no value") }
            let fields = rest.dropFirst().split(separator: " ")
            guard (1...2).contains(fields.count), let value = Double(fields[0] == "+Inf" ? "inf" : fields[0] == "-Inf" ? "-inf" : String(fields[0])) else {
                throw Invalid(description: "line \(n + 1): value '\(rest)'")
            }
            let base = family(of: name)
            guard families[base] != nil, !closed.contains(base) else { throw Invalid(description: "line \(n + 1): sample of \(base) outside its family") }
            if let c = current, c != base { closed.insert(c) }
            current = base
            families[base]!.samples.append(Sample(name: name, labels: labels, value: value))
        }
        for (name, f) in families where f.type == "histogram" {
            let series = Dictionary(grouping: f.samples) { $0.labels.filter { $0.key != "le" } }
            for (labels, samples) in series {
                let buckets = samples.filter { $0.name == name + "_bucket" }
                let bounds = buckets.map { $0.labels["le"] == "+Inf" ? Double.infinity : Double($0.labels["le"] ?? "") ?? .nan }
                guard bounds == bounds.sorted(), bounds.last == .infinity, !bounds.contains(where: \.isNaN) else { throw Invalid(description: "\(name)\(labels): le not ascending to +Inf") }
                let counts = buckets.map(\.value)
                guard counts == counts.sorted() else { throw Invalid(description: "\(name)\(labels): buckets not cumulative") }
                guard let count = samples.first(where: { $0.name == name + "_count" })?.value, count == counts.last,
                      samples.contains(where: { $0.name == name + "_sum" }) else { throw Invalid(description: "\(name)\(labels): _count or _sum missing or wrong") }
            }
        }
        return families
    }
}
