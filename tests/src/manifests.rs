//! The manifests users install (`deploy/`), as JSON documents.

use serde_json::Value;

use crate::tools::workspace_root;
use crate::util::HarnessError;

/// The plain manifests' file (the Helm chart's default rendering).
pub fn path() -> std::path::PathBuf {
    workspace_root().join("deploy/weft.yaml")
}

/// Every document of the plain manifests, in order.
pub fn documents() -> Result<Vec<Value>, HarnessError> {
    let text = std::fs::read_to_string(path())?;
    let mut docs = Vec::new();
    for doc in serde_yaml::Deserializer::from_str(&text) {
        let value = <Value as serde::Deserialize>::deserialize(doc)
            .map_err(|e| HarnessError(format!("{}: {e}", path().display())))?;
        if !value.is_null() {
            docs.push(value);
        }
    }
    Ok(docs)
}
