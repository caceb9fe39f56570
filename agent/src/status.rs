//! `weft-agent status`: every captured pod of a running agent as `istioctl proxy-status` shows sidecars, from
//! the agent's admin `/status`: its capture mode, the control-plane sync state per type with the version
//! accepted, the reason of a rejected push, and the pod's workload identity with its certificate's expiry.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::time::Duration;

use http_body_util::{BodyExt, Empty};
use hyper::body::Bytes;
use serde_json::{json, Value};

/// The xDS types in the order the table shows them.
const TYPES: [&str; 5] = ["CDS", "LDS", "EDS", "RDS", "SDS"];

/// Fetches the agent's `/status` from its admin address.
pub async fn fetch(admin: SocketAddr) -> Result<Value, String> {
    fetch_json(admin, "/status").await.map_err(|e| e.to_string())
}

/// Why the admin endpoint gave no JSON document.
#[derive(Debug)]
pub enum AdminError {
    /// Nothing answered: the message says what to check.
    Unreachable(String),
    /// It answered with an error status; `body` is what it said.
    Refused { status: hyper::StatusCode, body: String, what: String },
    Invalid(String),
}

impl std::fmt::Display for AdminError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AdminError::Unreachable(m) | AdminError::Invalid(m) => f.write_str(m),
            AdminError::Refused { status, body, what } => write!(f, "{what} answered {status}: {body}"),
        }
    }
}

/// Fetches a JSON document from the agent's admin endpoint.
pub async fn fetch_json(admin: SocketAddr, path: &str) -> Result<Value, AdminError> {
    let unreachable = |e: &dyn std::fmt::Display| {
        AdminError::Unreachable(format!("cannot reach weft-agent's admin endpoint at {admin} ({e}); is `weft-agent run` running, and with this --admin-address?"))
    };
    let exchange = async {
        let stream = tokio::net::TcpStream::connect(admin).await.map_err(|e| unreachable(&e))?;
        let (mut sender, connection) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await.map_err(|e| unreachable(&e))?;
        tokio::spawn(connection);
        let request = hyper::Request::get(path).header("host", admin.to_string()).body(Empty::<Bytes>::new()).map_err(|e| AdminError::Invalid(e.to_string()))?;
        let response = sender.send_request(request).await.map_err(|e| unreachable(&e))?;
        let status = response.status();
        let body = response.into_body().collect().await.map_err(|e| unreachable(&e))?.to_bytes();
        if !status.is_success() {
            return Err(AdminError::Refused { status, body: String::from_utf8_lossy(&body).trim().to_string(), what: format!("{admin}{path}") });
        }
        serde_json::from_slice(&body).map_err(|e| AdminError::Invalid(format!("{admin}{path} is not the JSON weft-agent answers: {e}")))
    };
    tokio::time::timeout(Duration::from_secs(10), exchange).await.map_err(|_| unreachable(&"no answer within 10 s"))?
}

/// One pod as the command shows it: its name, capture, sync per type and identity.
fn pods(status: &Value) -> Vec<Value> {
    let expiry = |identity: &str| {
        let identities = status["identities"].as_array().into_iter().flatten();
        identities.filter(|i| i["identity"] == identity).find_map(|i| i["not_after_unix"].as_u64())
    };
    let pods = status["pods"].as_array().into_iter().flatten();
    pods.map(|p| {
        let identity = p["identity"].as_str();
        let xds: serde_json::Map<String, Value> = TYPES
            .iter()
            .filter_map(|t| {
                let state = p["xds"][t].as_str()?;
                let detail = &p["xds_detail"][t];
                Some((t.to_string(), json!({"state": state, "version": detail["version"], "rejected": detail["rejected"]})))
            })
            .collect();
        json!({
            "pod": format!("{}/{}", p["namespace"].as_str().unwrap_or_default(), p["name"].as_str().unwrap_or_default()),
            "capture": p["redirect"],
            "listening": p["listening"],
            "xds": xds,
            "identity": identity,
            "cert_expires_unix": identity.and_then(expiry),
        })
    })
    .collect()
}

/// `-o json`: the pods as [`pods`] reads them.
pub fn json(status: &Value) -> String {
    serde_json::to_string_pretty(&json!({"pods": pods(status)})).unwrap_or_default() + "\n"
}

/// The table, then each rejected push with its reason.
pub fn table(status: &Value, now_unix: u64) -> String {
    let pods = pods(status);
    let mut rows = Vec::new();
    for p in &pods {
        let mut row = vec![p["pod"].as_str().unwrap_or_default().to_string(), p["capture"].as_str().unwrap_or("-").to_string()];
        row.extend(TYPES.iter().map(|t| p["xds"][t]["state"].as_str().unwrap_or("-").to_string()));
        row.push(p["identity"].as_str().unwrap_or("-").to_string());
        row.push(p["cert_expires_unix"].as_u64().map_or("-".into(), |at| in_words(at.saturating_sub(now_unix))));
        rows.push(row);
    }
    let mut out = columns(&["POD", "CAPTURE", "CDS", "LDS", "EDS", "RDS", "SDS", "IDENTITY", "CERT EXPIRES"], rows);
    for p in &pods {
        for t in TYPES {
            if let Some(why) = p["xds"][t]["rejected"].as_str() {
                let _ = writeln!(out, "{} {t} rejected: {why}", p["pod"].as_str().unwrap_or_default());
            }
        }
    }
    if pods.is_empty() {
        out.push_str("no captured pods\n");
    }
    out
}

/// A table with its columns padded to their widest cell, as `istioctl` prints them.
pub fn columns(header: &[&str], rows: Vec<Vec<String>>) -> String {
    let mut all = vec![header.iter().map(|h| h.to_string()).collect::<Vec<_>>()];
    all.extend(rows);
    let widths: Vec<usize> = (0..header.len()).map(|c| all.iter().map(|r| r.get(c).map_or(0, String::len)).max().unwrap_or(0)).collect();
    let mut out = String::new();
    for row in &all {
        let cells: Vec<String> = row.iter().zip(&widths).map(|(cell, w)| format!("{cell:<w$}")).collect();
        let _ = writeln!(out, "{}", cells.join("  ").trim_end());
    }
    out
}

/// A duration from now, as `in 23h 59m`.
fn in_words(seconds: u64) -> String {
    match seconds {
        0 => "expired".into(),
        s if s < 3600 => format!("in {}m", s / 60),
        s => format!("in {}h {}m", s / 3600, s % 3600 / 60),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status() -> Value {
        json!({"ready": true, "identities": [{"identity": "spiffe://cluster.local/ns/shop/sa/web", "not_after_unix": 1_000_000 + 86_000}],
            "pods": [
                {"namespace": "shop", "name": "web-1", "redirect": "iptables", "listening": true, "identity": "spiffe://cluster.local/ns/shop/sa/web",
                 "xds": {"CDS": "SYNCED", "LDS": "STALE", "EDS": "SYNCED", "RDS": "SYNCED", "SDS": "NOT SENT"},
                 "xds_detail": {"CDS": {"version": "v3"}, "LDS": {"version": "v1", "rejected": "version v2: listener 'x': bad"}, "EDS": {"version": "v3"}, "RDS": {"version": "v3"}, "SDS": {"version": ""}}},
                {"namespace": "shop", "name": "db-0", "redirect": "nftables", "listening": true}]})
    }

    #[test]
    fn the_table_shows_sync_state_identity_and_rejections() {
        let text = table(&status(), 1_000_000);
        let lines: Vec<&str> = text.lines().collect();
        assert!(lines[0].starts_with("POD") && lines[0].contains("CERT EXPIRES"), "{text}");
        assert!(lines[1].starts_with("shop/web-1") && lines[1].contains("SYNCED  STALE") && lines[1].contains("NOT SENT") && lines[1].ends_with("in 23h 53m"), "{text}");
        assert!(lines[2].starts_with("shop/db-0") && lines[2].contains("nftables"), "{text}");
        assert_eq!(lines[3], "shop/web-1 LDS rejected: version v2: listener 'x': bad");
        let parsed: Value = serde_json::from_str(&json(&status())).unwrap();
        assert_eq!(parsed["pods"][0]["xds"]["LDS"]["rejected"], "version v2: listener 'x': bad");
        assert_eq!(parsed["pods"][0]["cert_expires_unix"], 1_086_000);
        assert_eq!(parsed["pods"][1]["identity"], Value::Null);
    }

    #[tokio::test]
    async fn an_agent_that_is_not_running_is_named_with_what_to_do() {
        let free = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
        let e = fetch(free).await.unwrap_err();
        assert!(e.contains("cannot reach weft-agent's admin endpoint") && e.contains("is `weft-agent run` running"), "{e}");
    }
}
