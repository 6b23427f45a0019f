import Foundation
import KMSProtocol
import KMSServer
import Testing

/// Every input in Tests/FuzzRegressions (inputs `make fuzz` found or that once broke something)
/// runs through its fuzz target: a crash or trap fails the whole test run.
@Suite struct FuzzRegressionTests {
    static let root = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
        .appendingPathComponent("FuzzRegressions")

    static func inputs(_ target: String) throws -> [URL] {
        let dir = root.appendingPathComponent(target)
        return try FileManager.default.contentsOfDirectory(at: dir, includingPropertiesForKeys: nil)
            .sorted { $0.path < $1.path }
    }

    @Test(arguments: FuzzTargets.names)
    func regressionsStayFixed(target: String) throws {
        let files = try Self.inputs(target)
        #expect(!files.isEmpty, "Tests/FuzzRegressions/\(target) has no inputs")
        for file in files {
            let data = try Data(contentsOf: file)
            data.withUnsafeBytes { FuzzTargets.run(target, $0) }
        }
    }

    /// The request target really reaches the dispatcher: a Hello frame body gets a Hello answer
    /// (so a fuzz run that only ever hit decode errors would not pass unnoticed).
    @Test func requestTargetDispatches() throws {
        // Request{id 1, hello{protocolVersion 1}}: field 1 varint, field 10 (hello) message.
        let body: [UInt8] = [0x08, 0x01, 0x52, 0x02, 0x08, 0x01]
        let answer = ([0] + body).withUnsafeBytes { FuzzTargets.requestAnswer($0) }
        #expect(answer == "hello")
        let garbage = ([1] + [0xff, 0xff]).withUnsafeBytes { FuzzTargets.requestAnswer($0) }
        #expect(garbage == "error")
        // And the keystore behind it: a key created, then listed (a read through the reader
        // connections, which must see what the writer wrote).
        func send(_ caller: UInt8, _ operation: Kmsd_V1_Request.OneOf_Operation) throws -> String {
            var request = Kmsd_V1_Request()
            request.id = 7
            request.operation = operation
            let body: [UInt8] = try request.serializedBytes()
            return ([caller] + body).withUnsafeBytes { FuzzTargets.requestAnswer($0) }
        }
        #expect(try send(0, .createKey(.with { $0.description_p = "fuzz" })) == "result")
        #expect(try send(0, .listKeys(.with { $0.limit = 10 })) == "result")
        // Another user may not create keys: denied, not a crash.
        #expect(try send(1, .createKey(.init())) == "error")
    }
}
