//! Messages between `weft-cni` and `weft-agent` over the agent's unix socket.
//!
//! One request per connection: the plugin writes one JSON object followed by `\n`, the agent answers with one
//! JSON object followed by `\n` and closes. Requests are small; the agent refuses anything over
//! [`MAX_MESSAGE_BYTES`].

use serde::{Deserialize, Serialize};
use std::net::IpAddr;

/// Default path of the agent's CNI socket, used when the conflist entry does not set `agent_socket`.
pub const DEFAULT_SOCKET: &str = "/var/run/weft/cni.sock";
/// Largest request or response accepted on the socket.
pub const MAX_MESSAGE_BYTES: usize = 64 * 1024;

/// What kubelet and the runtime tell us about a pod sandbox on ADD.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PodSandbox {
    /// `K8S_POD_NAMESPACE`.
    pub namespace: String,
    /// `K8S_POD_NAME`.
    pub name: String,
    /// `K8S_POD_UID` (empty when the runtime does not send it).
    #[serde(default)]
    pub uid: String,
    /// `CNI_CONTAINERID`: the sandbox id, the key of the attachment.
    pub container_id: String,
    /// `K8S_POD_INFRA_CONTAINER_ID` (empty when the runtime does not send it).
    #[serde(default)]
    pub infra_container_id: String,
    /// `CNI_IFNAME`.
    pub ifname: String,
    /// `CNI_NETNS`: path of the pod's network namespace.
    pub netns: String,
    /// Addresses the previous plugins gave the pod (from `prevResult.ips`).
    #[serde(default)]
    pub ips: Vec<IpAddr>,
}

/// One attachment, as CNI identifies it (`CNI_CONTAINERID` + `CNI_IFNAME`).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Attachment {
    pub container_id: String,
    pub ifname: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    /// Capture this pod; answer only once its listeners and redirection are in place.
    Add { pod: PodSandbox },
    /// Stop capturing this attachment. Unknown attachments succeed (DEL is idempotent).
    Del { attachment: Attachment },
    /// Verify that this attachment is captured: registered, listening, rules in place.
    Check { attachment: Attachment },
    /// Forget every attachment not in `valid` (CNI GC).
    Gc { valid: Vec<Attachment> },
    /// Is the agent up and ready? (A struct variant: serde does not apply `deny_unknown_fields` to unit
    /// variants of internally tagged enums.)
    Status {},
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "snake_case", deny_unknown_fields)]
pub enum Response {
    /// The operation succeeded.
    Ok {
        /// Human-readable detail, logged by the plugin.
        #[serde(default)]
        detail: String,
    },
    /// The operation failed; `msg` says what, `details` says why or what to fix.
    Error { msg: String, details: String },
}

impl Response {
    pub fn ok(detail: impl Into<String>) -> Self {
        Response::Ok { detail: detail.into() }
    }

    pub fn error(msg: impl Into<String>, details: impl Into<String>) -> Self {
        Response::Error { msg: msg.into(), details: details.into() }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_wire_shape_is_stable() {
        let req = Request::Del { attachment: Attachment { container_id: "c1".into(), ifname: "eth0".into() } };
        let text = serde_json::to_string(&req).unwrap();
        assert_eq!(text, r#"{"op":"del","attachment":{"container_id":"c1","ifname":"eth0"}}"#);
        assert_eq!(serde_json::from_str::<Request>(&text).unwrap(), req);
    }

    #[test]
    fn unknown_fields_are_refused() {
        let err = serde_json::from_str::<Request>(r#"{"op":"status","extra":1}"#).unwrap_err();
        assert!(err.to_string().contains("extra"), "{err}");
        let err =
            serde_json::from_str::<Request>(r#"{"op":"del","attachment":{"container_id":"c","ifname":"e"},"x":1}"#)
                .unwrap_err();
        assert!(err.to_string().contains("`x`"), "{err}");
        assert_eq!(serde_json::from_str::<Request>(r#"{"op":"status"}"#).unwrap(), Request::Status {});
        assert_eq!(serde_json::to_string(&Request::Status {}).unwrap(), r#"{"op":"status"}"#);
    }
}
