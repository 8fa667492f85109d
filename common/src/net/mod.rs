//! What both ends of the QUIC control plane share: the job's credentials files, the TLS
//! configuration (a pinned self-signed certificate), and the connection close codes. The message
//! flow is described in the coordinator's `net` module.

pub mod credentials;
pub mod tls;

/// QUIC application close codes, so each side can tell why a connection ended.
pub mod close_code {
    /// The job is over.
    pub const FINISHED: u32 = 0;
    /// Refused at the handshake (see the `Refused` message).
    pub const REFUSED: u32 = 1;
    /// A frame that could not be read or decoded, or a message out of place.
    pub const PROTOCOL_ERROR: u32 = 2;
    /// The same worker id connected again.
    pub const REPLACED: u32 = 3;
    /// Declared dead (heartbeat, probe or rendezvous timeout).
    pub const DECLARED_DEAD: u32 = 4;
    /// The worker said it is leaving.
    pub const LEFT: u32 = 5;
    /// The coordinator is shutting down (it may come back: reconnect).
    pub const SHUTDOWN: u32 = 6;
}
