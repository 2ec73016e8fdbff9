//! The words the stages share, each defined once: which end of a connection a process is, how
//! a request is keyed, and the span attribute keys (OpenTelemetry's semantic conventions, and
//! sockspan's own `sockspan.*`).

/// Which end of a connection a process is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Side {
    /// The process accepted the connection: it serves requests.
    Server,
    /// The process connected: it sends requests.
    Client,
}

/// A request: (connection id, the request's number on it).
pub type RequestKey = (u64, u64);

/// Span attribute keys.
pub mod attr {
    pub const CLIENT_ADDRESS: &str = "client.address";
    pub const CLIENT_PORT: &str = "client.port";
    pub const ERROR_TYPE: &str = "error.type";
    pub const HTTP_REQUEST_BODY_SIZE: &str = "http.request.body.size";
    pub const HTTP_REQUEST_METHOD: &str = "http.request.method";
    pub const HTTP_REQUEST_RESEND_COUNT: &str = "http.request.resend_count";
    pub const HTTP_RESPONSE_BODY_SIZE: &str = "http.response.body.size";
    pub const HTTP_RESPONSE_STATUS_CODE: &str = "http.response.status_code";
    pub const HTTP_ROUTE: &str = "http.route";
    pub const NETWORK_PEER_ADDRESS: &str = "network.peer.address";
    pub const NETWORK_PEER_PORT: &str = "network.peer.port";
    pub const NETWORK_PROTOCOL_VERSION: &str = "network.protocol.version";
    pub const SERVER_ADDRESS: &str = "server.address";
    pub const SERVER_PORT: &str = "server.port";
    pub const SOCKSPAN_INCOMPLETE: &str = "sockspan.incomplete";
    pub const SOCKSPAN_LINK_SOURCE: &str = "sockspan.link.source";
    pub const SOCKSPAN_PARENT_SOURCE: &str = "sockspan.parent.source";
    pub const URL_PATH: &str = "url.path";
    pub const URL_QUERY: &str = "url.query";
    pub const URL_SCHEME: &str = "url.scheme";
}
