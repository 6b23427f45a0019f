import KMSCore
import KMSProtocol

/// Hello and WhoAmI: about the daemon and the caller, open to every caller.
enum DaemonHandlers {
    /// MAJOR.MINOR.PATCH of kmsd (PROTOCOL.md §5); for diagnostics, never for feature checks.
    static let serverVersion = "0.1.0"

    static func hello(_ r: Kmsd_V1_HelloRequest, _ ctx: HandlerContext) -> Kmsd_V1_HelloResponse {
        .with {
            // A client states the highest version it speaks (0: unspecified, read as 1); the
            // answer is the highest both speak. A client that does not speak the answer closes.
            $0.protocolVersion = min(max(r.protocolVersion, 1), KMSProtocolConstants.protocolVersion)
            $0.serverVersion = serverVersion
            $0.operations = Dispatcher.operations
            $0.maxFrameBytes = UInt32(ctx.settings.maxFrameBytes)
            $0.maxInFlight = UInt32(ctx.settings.maxInFlight)
        }
    }

    static func whoAmI(_ r: Kmsd_V1_WhoAmIRequest, _ ctx: HandlerContext) -> Kmsd_V1_WhoAmIResponse {
        let p = ctx.principal
        return .with {
            $0.uid = p.uid
            $0.gid = p.gid
            $0.pid = p.pid
            $0.userName = p.userName
            $0.groups = p.groups
            $0.executable = p.executable ?? ""
            $0.systemdUnit = p.systemdUnit ?? ""
            $0.isAdministrator = ctx.service.isAdministrator(p)
        }
    }
}
