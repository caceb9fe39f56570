//! Between protobuf and the JSON tree the config translator reads: xDS resources are decoded with the
//! descriptors of the whole xDS API (so nested `typed_config` Anys expand to `{"@type": ...}` objects, the
//! proto3 JSON mapping), and the translator never knows whether a resource came from a file or the wire.

use std::sync::LazyLock;

use prost_reflect::{DescriptorPool, DynamicMessage, SerializeOptions};
use serde_json::Value;

static POOL: LazyLock<Result<DescriptorPool, String>> = LazyLock::new(build_pool);

/// A file under `agent/proto/`, by its import path.
macro_rules! proto {
    ($path:literal) => {
        ($path, include_str!(concat!("../../proto/", $path)))
    };
}

/// Extension messages the `xds-api` descriptors lack, under `agent/proto/` (see its README), and the newer
/// core files they need (which replace the older copies in the set).
const EXTRA_PROTOS: [(&str, &str); 27] = [
    proto!("envoy/config/core/v3/proxy_protocol.proto"),
    proto!("envoy/extensions/filters/network/tcp_proxy/v3/tcp_proxy.proto"),
    proto!("envoy/extensions/upstreams/http/v3/http_protocol_options.proto"),
    proto!("envoy/extensions/filters/listener/original_dst/v3/original_dst.proto"),
    proto!("envoy/extensions/filters/listener/tls_inspector/v3/tls_inspector.proto"),
    proto!("envoy/extensions/filters/listener/http_inspector/v3/http_inspector.proto"),
    proto!("envoy/extensions/filters/common/fault/v3/fault.proto"),
    proto!("envoy/extensions/filters/http/fault/v3/fault.proto"),
    proto!("envoy/extensions/filters/http/cors/v3/cors.proto"),
    proto!("envoy/extensions/filters/http/local_ratelimit/v3/local_rate_limit.proto"),
    proto!("envoy/extensions/retry/host/previous_hosts/v3/previous_hosts.proto"),
    proto!("envoy/extensions/transport_sockets/tls/v3/common.proto"),
    proto!("envoy/extensions/transport_sockets/tls/v3/secret.proto"),
    proto!("envoy/extensions/transport_sockets/tls/v3/tls.proto"),
    proto!("envoy/extensions/transport_sockets/raw_buffer/v3/raw_buffer.proto"),
    proto!("envoy/extensions/filters/http/rbac/v3/rbac.proto"),
    proto!("envoy/extensions/filters/http/grpc_stats/v3/config.proto"),
    proto!("envoy/extensions/request_id/uuid/v3/uuid.proto"),
    proto!("envoy/extensions/filters/network/rbac/v3/rbac.proto"),
    proto!("udpa/type/v1/typed_struct.proto"),
    proto!("xds/type/v3/typed_struct.proto"),
    proto!("istio/stats.proto"),
    proto!("istio/metadata_exchange.proto"),
    proto!("istio/alpn.proto"),
    proto!("istio/peer_metadata.proto"),
    proto!("envoy/extensions/access_loggers/file/v3/file.proto"),
    proto!("envoy/extensions/access_loggers/stream/v3/stream.proto"),
];

/// The xDS API descriptors plus the vendored extensions, compiled against them.
fn build_pool() -> Result<DescriptorPool, String> {
    use protox::file::{ChainFileResolver, DescriptorSetFileResolver, File, FileResolver};
    struct Vendored;
    impl FileResolver for Vendored {
        fn open_file(&self, name: &str) -> Result<File, protox::Error> {
            match EXTRA_PROTOS.iter().find(|(n, _)| *n == name) {
                Some((n, source)) => File::from_source(n, source),
                None => Err(protox::Error::file_not_found(name)),
            }
        }
    }
    let set = DescriptorPool::decode(xds_api::FILE_DESCRIPTOR_SET).map_err(|e| e.to_string())?;
    let names: Vec<String> = set.files().map(|f| f.name().to_string()).collect();
    let known = DescriptorSetFileResolver::decode(xds_api::FILE_DESCRIPTOR_SET).map_err(|e| e.to_string())?;
    let mut resolver = ChainFileResolver::new();
    resolver.add(Vendored);
    resolver.add(known);
    let mut compiler = protox::Compiler::with_file_resolver(resolver);
    compiler.include_imports(true);
    let files = names.iter().map(String::as_str).chain(EXTRA_PROTOS.iter().map(|(n, _)| *n));
    compiler.open_files(files).map_err(|e| e.to_string())?;
    Ok(compiler.descriptor_pool())
}

fn pool() -> Result<&'static DescriptorPool, String> {
    POOL.as_ref().map_err(|e| format!("xDS descriptors: {e}"))
}

fn message_name(type_url: &str) -> &str {
    type_url.rsplit('/').next().unwrap_or(type_url)
}

/// Decodes an `Any`'s bytes of `type_url` into the proto3 JSON tree (field names as in the .proto files).
pub fn any_to_json(type_url: &str, bytes: &[u8]) -> Result<Value, String> {
    let name = message_name(type_url);
    let descriptor = pool()?.get_message_by_name(name).ok_or_else(|| format!("unknown resource type {type_url}"))?;
    let message = DynamicMessage::decode(descriptor, bytes).map_err(|e| format!("cannot decode {name}: {e}"))?;
    let options = SerializeOptions::new().use_proto_field_name(true);
    message.serialize_with_options(serde_json::value::Serializer, &options).map_err(|e| format!("{name} as JSON: {e}"))
}

/// Encodes a JSON tree as message `name` (for building requests and for test servers).
pub fn json_to_bytes(name: &str, value: &Value) -> Result<Vec<u8>, String> {
    let descriptor = pool()?.get_message_by_name(name).ok_or_else(|| format!("unknown message {name}"))?;
    let message = DynamicMessage::deserialize(descriptor, value).map_err(|e| format!("{name}: {e}"))?;
    Ok(prost::Message::encode_to_vec(&message))
}

/// A typed message from a JSON tree.
pub fn json_to_message<T: prost::Message + Default>(name: &str, value: &Value) -> Result<T, String> {
    T::decode(json_to_bytes(name, value)?.as_slice()).map_err(|e| format!("{name}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn round_trip_expands_nested_any() {
        let listener = json!({
            "name": "l",
            "address": {"socket_address": {"address": "127.0.0.1", "port_value": 10000}},
            "filter_chains": [{"filters": [{"name": "tcp", "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy",
                "stat_prefix": "s", "cluster": "c"}}]}]
        });
        let bytes = json_to_bytes("envoy.config.listener.v3.Listener", &listener).unwrap();
        for vendored in ["envoy.extensions.upstreams.http.v3.HttpProtocolOptions", "envoy.extensions.access_loggers.file.v3.FileAccessLog", "envoy.extensions.access_loggers.stream.v3.StdoutAccessLog"] {
            assert!(pool().unwrap().get_message_by_name(vendored).is_some(), "{vendored}");
        }
        let back = any_to_json("type.googleapis.com/envoy.config.listener.v3.Listener", &bytes).unwrap();
        assert_eq!(back["filter_chains"][0]["filters"][0]["typed_config"]["cluster"], "c");
        assert_eq!(back["address"]["socket_address"]["port_value"], 10000);
    }
}
