//! Which Envoy fields weft implements, which it ignores (and why), and the document generated from both.
//! Anything else is rejected by its path (see `tree::Obj::finish`). A test keeps `docs/envoy-config.md` in
//! step with these tables.

/// Implemented fields, as path patterns (`[]` = any list index).
pub const SUPPORTED: &[(&str, &str)] = &[
    ("node.id", "node identity (admin /server_info, xDS)"),
    ("node.cluster", "node identity"),
    ("node.metadata", "kept as given, shown in config_dump; NAME, NAMESPACE, WORKLOAD_NAME, CLUSTER_ID, OWNER and LABELS (app, version, service.istio.io/canonical-name, service.istio.io/canonical-revision) are the workload metadata Istio's metadata exchanges send"),
    ("admin.address.socket_address", "address, port_value"),
    ("static_resources.listeners[].name", ""),
    ("static_resources.listeners[].address.socket_address", "address, port_value (TCP)"),
    ("static_resources.listeners[].filter_chains[]", "name, filter_chain_match, filters; chains are chosen as Envoy chooses them"),
    ("...filter_chain_match", "destination_port, prefix_ranges, server_names, transport_protocol, application_protocols, source_type, source_prefix_ranges, source_ports"),
    ("static_resources.listeners[].default_filter_chain", "serves connections no chain matches"),
    ("static_resources.listeners[].use_original_dst", "hand-off to the listener of the original destination (exact address, then wildcard with the port)"),
    ("static_resources.listeners[].bind_to_port", "false: no socket, served through use_original_dst hand-off"),
    ("static_resources.listeners[].listener_filters[]", "original_dst, tls_inspector (SNI, ALPN), http_inspector (http/1.0, http/1.1, h2c); filter_disabled on the two inspectors (or_match, and_match, not_match, any_match, destination_port_range on the restored destination port)"),
    ("static_resources.listeners[].listener_filters_timeout", "default 15s, 0s disables"),
    ("static_resources.listeners[].continue_on_listener_filters_timeout", "default false (close on timeout)"),
    ("static_resources.listeners[].filter_chains[].transport_socket", "envoy.transport_sockets.tls with DownstreamTlsContext (rustls): require_client_certificate, common_tls_context (below); raw_buffer; session resumption fields accepted"),
    ("...common_tls_context", "one certificate: tls_certificates[] {certificate_chain, private_key} or tls_certificate_sds_secret_configs[] (name; with sds_config.ads subscribed over ADS, otherwise resolved by the agent: default = the pod's identity, ROOTCA = the mesh roots, then static_resources.secrets); validation_context {trusted_ca, match_subject_alt_names, match_typed_subject_alt_names (URI, DNS, EMAIL, IP_ADDRESS)}, validation_context_sds_secret_config, combined_validation_context; alpn_protocols; tls_params {tls_minimum/maximum_protocol_version TLSv1_2/TLSv1_3 (1.0 and 1.1 rejected), cipher_suites (the ECDHE AES-GCM/CHACHA20 suites of the list are offered for TLS 1.2; a list without any is rejected), ecdh_curves}. Files are read at handshake time and reloaded when they change; the host name of an upstream is never checked (only SAN matchers, as in Envoy); expired certificates are refused"),
    ("static_resources.listeners[].filter_chains[].transport_socket_connect_timeout", "a TLS handshake not finished this long after the chain was chosen closes the connection (absent or 0s: no limit, Envoy's default)"),
    ("static_resources.listeners[].filter_chains[].filters[]", "Istio's metadata exchange (at most one) and network RBAC filters, then exactly one terminal network filter per chain, last; optional filters of unknown types skipped"),
    ("...filters[].typed_config (MetadataExchange)", "envoy.tcp.metadataexchange.config.MetadataExchange (istiod's istio.metadata_exchange, typed or as TypedStruct), on filter chains and as Cluster.filters: protocol (when the connection's ALPN is it, each side writes one frame [u32 BE 0x3D230467][u32 BE length][Any{Struct}] with its workload metadata and node id right after the handshake and strips the peer's; a stream without the magic passes through untouched), additional_labels (peer labels kept), enable_discovery (accepted: weft has no workload discovery, a failed exchange means no peer)"),
    ("...filters[].typed_config (network RBAC)", "envoy.extensions.filters.network.rbac.v3.RBAC: rules, shadow_rules, stat_prefix (<stat_prefix>.rbac.allowed/denied/[<shadow_rules_stat_prefix>.]shadow_allowed/shadow_denied), shadow_rules_stat_prefix, enforcement_type (ONE_TIME_ON_FIRST_BYTE, CONTINUOUS); decided on the first bytes, a denied connection closed; a configuration update whose policy for the connection's chain denies it closes it at once. Header rules refused as by Envoy; matcher, shadow_matcher and delay_deny refused"),
    ("...rules / shadow_rules (RBAC)", "envoy.config.rbac.v3.RBAC: action ALLOW/DENY/LOG, policies.{permissions, principals}. Permissions: any, and_rules, or_rules, not_rule, header, url_path (normalised path without its query), destination_ip, destination_port, destination_port_range, requested_server_name. Principals: any, and_ids, or_ids, not_id, header, url_path, authenticated (principal_name against URI SANs, DNS SANs, subject), source_ip, direct_remote_ip, remote_ip (x-forwarded-for as the connection manager derives it). Refused by path: condition, checked_condition (CEL), metadata, sourced_metadata, filter_state, uri_template, matcher, audit_logging_options"),
    ("...filters[].typed_config (TcpProxy)", "stat_prefix, cluster or weighted_clusters, idle_timeout (default 1h, 0s disables), max_connect_attempts"),
    ("...filters[].typed_config (HttpConnectionManager)", "stat_prefix, codec_type AUTO/HTTP1/HTTP2 (HTTP/1.1 and h2c on one port), route_config or rds, http_filters, use_remote_address, xff_num_trusted_hops, internal_address_config.cidr_ranges, server_name, server_header_transformation, via, max_request_headers_kb (431), common_http_protocol_options.max_headers_count, normalize_path, merge_slashes, path_with_escaped_slashes_action, strip_matching_host_port, strip_any_host_port, strip_trailing_host_dot, generate_request_id, preserve_external_request_id, always_set_request_id_in_response, http_protocol_options.accept_http_10, upgrade_configs (websocket and other HTTP/1.1 upgrades over a connection of their own; CONNECT terminated by routes with connect_config, otherwise forwarded to the route's cluster over HTTP/1.1 or HTTP/2; also per route), local_reply_config (mappers with status_code/header/and/or filters, text and JSON body formats); stream_idle_timeout (re-armed by body frames; 408/504 stream timeout before the response starts, a reset after), request_timeout (408), request_headers_timeout (408 request header timeout, HTTP/1), common_http_protocol_options.{idle_timeout, max_connection_duration (graceful close), max_stream_duration (408/504 downstream duration timeout, gRPC DEADLINE_EXCEEDED; a reset after the response starts), headers_with_underscores_action}, forward_client_cert_details (SANITIZE, FORWARD_ONLY, APPEND_FORWARD, SANITIZE_SET, ALWAYS_FORWARD_ONLY) and set_current_client_cert_details (subject, cert, chain, dns, uri: x-forwarded-client-cert byte for byte as Envoy's); x-forwarded-proto https on TLS connections; http2_protocol_options (max_concurrent_streams, initial_stream_window_size, initial_connection_window_size of downstream HTTP/2 connections)"),
    ("...http_filters[]", "envoy.filters.http.router (last; suppress_envoy_headers false), fault (fixed and header-controlled delay and abort, percentages, headers), cors (policies per route), local_ratelimit (token bucket, filter_enabled, filter_enforced, status, response_headers_to_add), rbac (below), io.istio.http.peer_metadata.Config (below), istio.alpn and grpc_stats (below); optional filters of unknown types skipped"),
    ("...http_filters[].typed_config (istio.alpn)", "istio.envoy.config.filter.http.alpn.v2alpha1.FilterConfig: alpn_override[].{upstream_protocol HTTP10 (the default)/HTTP11/HTTP2, alpn_override}: a TLS connection to the routed cluster offers the list for the protocol the request goes upstream in (HTTP2 when the cluster speaks HTTP/2, HTTP10 for an HTTP/1.0 request with use_downstream_protocol_config, else HTTP11) instead of the context's alpn_protocols, unless the cluster's metadata istio.alpn_override is \"false\"; pooled connections are keyed by the list"),
    ("...filters[].typed_config (istio.stats)", "stats.PluginConfig, Istio's standard metrics (istio_requests_total, istio_request_duration_milliseconds, istio_request_bytes, istio_response_bytes, istio_tcp_connections_opened_total/closed_total, istio_tcp_sent_bytes_total/received_bytes_total) with istio-proxy's labels, as a network and an HTTP filter: reporter UNSPECIFIED (the listener's traffic_direction decides; SERVER_GATEWAY refused), disable_host_header_fallback, tcp_reporting_duration, metrics[] (drop, tags_to_remove, dimensions whose expression is a string literal; other CEL expressions are treated as istio-proxy treats one it cannot parse), definitions[] (validated, not produced), rotation_interval, graceful_deletion_interval"),
    ("...http_filters[].typed_config (grpc_stats)", "envoy.extensions.filters.http.grpc_stats.v3.FilterConfig: emit_filter_state, stats_for_all_methods, individual_method_stats_allowlist, enable_upstream_stats, replace_dots_in_grpc_service_name; telemetry only, accepted and kept: changes no request or response"),
    ("...request_id_extension", "typed_config envoy.extensions.request_id.uuid.v3.UuidRequestIdConfig (the default): x-request-id a random UUID, generated when absent, kept when present; with tracing, pack_trace_reason packs the trace decision into it and use_request_id_for_trace_sampling draws random sampling from it"),
    ("...tracing (HttpConnectionManager)", "client_sampling, random_sampling, overall_sampling (Envoy's decision, packed into x-request-id), verbose, max_path_tag_length, custom_tags (literal, environment, request_header, metadata of kind request under envoy.filters.http.rbac: the shadow rules' result), provider envoy.tracers.opentelemetry (OpenTelemetryConfig: grpc_service.envoy_grpc {cluster_name, authority}, grpc_service.timeout, service_name; W3C traceparent/tracestate, OTLP/gRPC) or envoy.tracers.zipkin (ZipkinConfig: collector_cluster, collector_endpoint, collector_endpoint_version HTTP_JSON, collector_hostname, trace_id_128bit, shared_span_context; B3 multi or single header, JSON v2 over HTTP): spans with Envoy's names, kinds and tags reported in batches; spawn_upstream_span true, other tracers, http_service, resource_detectors, sampler, split_spans_for_request refused"),
    ("...routes[].decorator", "operation (the span name; x-envoy-decorator-operation to the other side of the hop when the connection manager traces), propagate"),
    ("...http_filters[].typed_config (peer metadata)", "io.istio.http.peer_metadata.Config (istiod's HTTP istio.metadata_exchange): downstream_discovery / upstream_discovery (istio_headers reads and removes x-envoy-peer-metadata and x-envoy-peer-metadata-id from the request / response; workload_discovery and baggage find nothing: weft has no WDS), upstream_propagation (istio_headers {skip_external_clusters}: the node's metadata and id on requests, not to PassthroughCluster or istio.external clusters when skipping, never to istio.disable_mx clusters), downstream_propagation (the same on responses, each header only if the request carried it), additional_labels; shared_with_upstream accepted (no filter state to share)"),
    ("...http_filters[].typed_config (HTTP RBAC)", "envoy.extensions.filters.http.rbac.v3.RBAC: rules, shadow_rules, rules_stat_prefix, shadow_rules_stat_prefix (http.<stat_prefix>.rbac.[<rules_stat_prefix>.]allowed/denied, [<shadow_rules_stat_prefix>.]shadow_allowed/shadow_denied, checked against Envoy's /stats); denied requests get 403 RBAC: access denied; several filters run in order. matcher, shadow_matcher and track_per_rule_stats refused"),
    ("...typed_per_filter_config (RBACPerRoute)", "on routes, virtual hosts and route configurations, the most specific wins: its rbac.rules/shadow_rules replace the filter's; without rbac (or without rules) the filter allows everything there"),
    ("...route_config", "name, validate_clusters, most_specific_header_mutations_wins, ignore_port_in_host_matching, request/response_headers_to_add/_remove, typed_per_filter_config, virtual_hosts[].{name, domains, routes[], headers, retry_policy, typed_per_filter_config, include_request_attempt_count, include_attempt_count_in_response}"),
    ("...rds", "route_config_name, config_source.ads (RDS over ADS, V3); the listener starts once its routes arrive"),
    ("...routes[].match", "prefix, path, safe_regex, path_separated_prefix, connect_matcher, case_sensitive, headers (every HeaderMatcher form, invert_match, treat_missing_header_as_empty), query_parameters, grpc, runtime_fraction (its default value), tls_context.presented"),
    ("...routes[].route", "cluster, cluster_header, weighted_clusters (with header_name and per-cluster header changes), cluster_not_found_response_code, prefix_rewrite, regex_rewrite, host_rewrite_literal, auto_host_rewrite, host_rewrite_header, host_rewrite_path_regex, timeout (not applied once max_stream_duration is set, as in Envoy), idle_timeout, max_stream_duration.{max_stream_duration, grpc_timeout_header_max, grpc_timeout_header_offset} (grpc-timeout rewritten upstream), max_grpc_timeout and grpc_timeout_offset (deprecated; the router's timeout from grpc-timeout), retry_policy (retry_on 5xx, gateway-error, reset, reset-before-request, connect-failure, retriable-4xx, refused-stream, retriable-status-codes, retriable-headers, and the gRPC conditions cancelled, deadline-exceeded, internal, resource-exhausted, unavailable (grpc-status of a trailers-only response); retriable_headers, num_retries, per_try_timeout, retry_back_off, previous_hosts, host_selection_retry_max_attempts), hash_policy (header, cookie, connection_properties.source_ip, query_parameter), internal_redirect_policy, request_mirror_policies (cluster, runtime_fraction, disable_shadow_host_suffix_append), upgrade_configs"),
    ("...routes[].redirect", "https_redirect, scheme_redirect, host_redirect, port_redirect, path_redirect, prefix_rewrite, regex_rewrite, response_code, strip_query"),
    ("...routes[].direct_response", "status, body.inline_string (at most max_direct_response_body_size_bytes of the route configuration, default 4096)"),
    ("...routes[].metadata", "filter_metadata and typed_filter_metadata (istiod names the VirtualService here): accepted; no filter of weft's reads route metadata"),
    ("...request_headers_to_add[] / response_headers_to_add[]", "header {key, value, raw_value}, append_action, append, keep_empty_value; %DOWNSTREAM_REMOTE_ADDRESS[_WITHOUT_PORT]%, %DOWNSTREAM_LOCAL_ADDRESS[_WITHOUT_PORT]%, %DOWNSTREAM_LOCAL_PORT%, %PROTOCOL%, %REQ(h)%, %RESP(h)%, %RESPONSE_CODE%, %UPSTREAM_REMOTE_ADDRESS%, %UPSTREAM_CLUSTER%"),
    ("static_resources.secrets[]", "name, tls_certificate {certificate_chain, private_key}, validation_context {trusted_ca}; DataSource filename, inline_string or inline_bytes; files are read when used, as in Envoy; private keys redacted in config_dump"),
    ("static_resources.clusters[].name", ""),
    ("static_resources.clusters[].type", "STATIC, STRICT_DNS, LOGICAL_DNS (dns_refresh_rate, dns_lookup_family, respect_dns_ttl (refresh at the answer's smallest TTL); /etc/resolv.conf and /etc/hosts, no cache), EDS, ORIGINAL_DST"),
    ("static_resources.clusters[].eds_cluster_config", "service_name, eds_config.ads (EDS over ADS, V3)"),
    ("static_resources.clusters[].connect_timeout", "default 5s"),
    ("static_resources.clusters[].lb_policy", "ROUND_ROBIN, RANDOM, LEAST_REQUEST (least_request_lb_config.choice_count), RING_HASH (ring_hash_lb_config, XX_HASH, Envoy's ring), MAGLEV (maglev_lb_config.table_size, Envoy's table), CLUSTER_PROVIDED (ORIGINAL_DST)"),
    ("static_resources.clusters[].load_assignment", "cluster_name, endpoints[].{priority (Envoy's priority load with overprovisioning 1.4), locality, load_balancing_weight (with locality_weighted_lb_config: weight × overprovisioned availability; an unweighted locality takes nothing)}, endpoints[].lb_endpoints[].{endpoint.address.socket_address, endpoint.hostname (static clusters: auto_host_rewrite), load_balancing_weight, health_status (UNHEALTHY, DRAINING, TIMEOUT take no traffic; UNHEALTHY and TIMEOUT count against their locality's availability), metadata.filter_metadata (`envoy.transport_socket_match` selects the endpoint's transport socket; other namespaces, such as Istio's `istio.workload`, are read by no filter of weft's)}"),
    ("static_resources.clusters[].circuit_breakers.thresholds[]", "DEFAULT priority: max_connections, max_pending_requests, max_requests, max_retries (503 with x-envoy-overloaded)"),
    ("static_resources.clusters[].outlier_detection", "consecutive_5xx, consecutive_gateway_failure, success_rate_{minimum_hosts, request_volume, stdev_factor}, failure_percentage_{threshold, minimum_hosts, request_volume}, enforcing_{consecutive_5xx, consecutive_gateway_failure, success_rate, failure_percentage}, interval (the sweep judging success rates and returning ejected hosts), base_ejection_time, max_ejection_time (backoff as Envoy's), max_ejection_percent, always_eject_one_host"),
    ("static_resources.clusters[].common_lb_config.healthy_panic_threshold", "percent of available endpoints below which all are used"),
    ("static_resources.clusters[].common_lb_config.locality_weighted_lb_config", "a priority level's localities share its traffic by load_balancing_weight × availability (overprovisioning 1.4); not with RING_HASH, MAGLEV or DNS clusters"),
    ("static_resources.clusters[].health_checks[]", "one: timeout, interval, unhealthy_threshold, healthy_threshold; tcp_health_check (send as hex text, receive blocks matched in order; a binary send is not written, as in Envoy), http_health_check (path, host, method, send body, receive blocks in the first response_buffer_size bytes of the body, expected_statuses, request_headers_to_add, codec_client_type HTTP1 or HTTP2), grpc_health_check (service_name, authority); jitter, no-traffic intervals and logging fields accepted (timing and logs only)"),
    ("static_resources.clusters[].http2_protocol_options", "the upstream speaks HTTP/2 (pooled, multiplexed); max_concurrent_streams (more requests open another connection), initial_stream_window_size, initial_connection_window_size"),
    ("static_resources.clusters[].transport_socket", "envoy.transport_sockets.tls with UpstreamTlsContext: sni (none sent when empty), common_tls_context as above; pooled connections are per TLS context; not with health_checks yet"),
    ("static_resources.clusters[].transport_socket_matches", "name, match (key/values an endpoint's `envoy.transport_socket_match` metadata must all have; empty matches every endpoint), transport_socket (as above): the first match wins, else the cluster's transport_socket (Istio's auto mTLS: tlsMode-istio / tlsMode-disabled)"),
    ("static_resources.clusters[].upstream_bind_config.source_address", "address, port_value: the source of upstream connections"),
    ("static_resources.clusters[].typed_extension_protocol_options", "HttpProtocolOptions with explicit_http_config (http, or http2 with the http2_protocol_options fields above) or use_downstream_protocol_config, and common_http_protocol_options.{idle_timeout (default 1h), max_requests_per_connection}"),
    ("static_resources.clusters[].max_requests_per_connection", "requests a pooled connection carries at most"),
    ("static_resources.clusters[].filters[]", "upstream network filters: Istio's metadata exchange (see MetadataExchange above), at most one; other types refused"),
    ("static_resources.clusters[].metadata", "filter_metadata: every namespace kept; istio.{services, default_original_port, alpn_override (only the string \"false\" opts out of istio.alpn), external, disable_mx, config, subset} read as istio-proxy reads them (another type reads as the default); typed_filter_metadata kept"),
    ("*.access_log (listeners, tcp_proxy, HttpConnectionManager)", "envoy.access_loggers.file (FileAccessLog: path, /dev/stdout and /dev/stderr included; log_format or the deprecated format/json_format) and the stdout/stderr stream loggers; log_format text_format, text_format_source.inline_string, json_format (one operator alone is typed, missing is null), omit_empty_values; Envoy's default format without one. Operators: START_TIME (default or strftime %Y %m %d %H %M %S %E<n>S %Es %s %f %j %F %T ...), REQ/RESP/TRAILER(h?alt):len, PROTOCOL, RESPONSE_CODE, RESPONSE_CODE_DETAILS, RESPONSE_FLAGS(_LONG), CONNECTION_TERMINATION_DETAILS, UPSTREAM_TRANSPORT_FAILURE_REASON, BYTES_RECEIVED, BYTES_SENT, DURATION, UPSTREAM_HOST, UPSTREAM_CLUSTER(_RAW), UPSTREAM_LOCAL_ADDRESS, DOWNSTREAM_{LOCAL,REMOTE,DIRECT_REMOTE}_ADDRESS(_WITHOUT_PORT), DOWNSTREAM_{LOCAL,REMOTE}_PORT, REQUESTED_SERVER_NAME, ROUTE_NAME, DOWNSTREAM_{PEER,LOCAL}_URI_SAN, UPSTREAM_{PEER,LOCAL}_URI_SAN; others refused by path. Filters: status_code, duration, not_health_check, response_flag, runtime (its default percentage), header, and/or. A listener's log covers connections no filter chain matches (NR). In the agent each line names its pod (a `ns/name ` prefix, a `pod` JSON key); other loggers (gRPC, OpenTelemetry) and formatter extensions refused"),
    ("dynamic_resources.ads_config", "api_type GRPC or DELTA_GRPC, transport_api_version V3, one envoy_grpc service"),
    ("dynamic_resources.lds_config / cds_config", "ads: {} with resource_api_version V3 (listeners and clusters over ADS)"),
    ("xDS Listener and Cluster resources", "the same fields as static_resources.listeners[] and clusters[]"),
    ("xDS ClusterLoadAssignment resources", "the same fields as load_assignment, without endpoint hostnames"),
    ("xDS RouteConfiguration resources", "the same fields as an inline route_config"),
    ("xDS Secret resources (SDS over ADS)", "the same fields as static_resources.secrets[]; subscribed by the names TLS contexts give with sds_config.ads; inline material is checked on receipt (PEM, key against certificate, validity) and NACKed naming the secret"),
];

/// Fields accepted and ignored because they change nothing a connection sees: naming, documentation,
/// telemetry and runtime knobs. Path patterns; a leading `*.` matches the field in any object.
pub const IGNORED: &[(&str, &str)] = &[
    ("*.stat_prefix", "stats naming"),
    ("*.alt_stat_name", "stats naming"),
    ("stats_config", "stats tag extraction"),
    ("stats_sinks", "telemetry export"),
    ("layered_runtime", "runtime layers; weft has no runtime overrides"),
    ("admin.access_log_path", "admin endpoint access log"),
    ("node.locality", "used by zone-aware routing, which weft does not implement yet; informational here"),
    ("node.user_agent_name", "informational"),
    ("*.traffic_direction", "telemetry and tracing direction (a listener's decides Istio's reporter); routing uses the listener's own configuration"),
    ("*.initial_read_buffer_size", "the TLS inspector's first read size: weft's inspector reads as much as the ClientHello needs"),
    ("*.max_connections_to_accept_per_socket_event", "Envoy's accept batching (0 refused, as by Envoy); weft's accept loop takes connections as they come"),
    ("*.cleanup_interval", "ORIGINAL_DST host clean-up (0s refused, as by Envoy); weft keeps no host list: pooled connections to a destination close after the cluster's idle timeout"),
];

/// Whether `path` (with concrete list indices) is in [`IGNORED`].
pub fn ignorable(path: &str) -> bool {
    let generic = strip_indices(path);
    IGNORED.iter().any(|(pattern, _)| match pattern.strip_prefix("*.") {
        Some(field) => generic == field || generic.ends_with(&format!(".{field}")),
        None => generic == *pattern,
    })
}

fn strip_indices(path: &str) -> String {
    let mut out = String::with_capacity(path.len());
    let mut in_index = false;
    for c in path.chars() {
        match c {
            '[' => {
                in_index = true;
                out.push('[');
            }
            ']' => {
                in_index = false;
                out.push(']');
            }
            _ if in_index => {}
            _ => out.push(c),
        }
    }
    out
}

/// The text of `docs/envoy-config.md`.
pub fn document() -> String {
    let mut doc = String::from(
        "# Envoy configuration support\n\n\
         Generated from `agent/src/config/fields.rs` (a test keeps them in step). weft reads Envoy v3 bootstrap\n\
         files (YAML or JSON). A field not listed as supported or ignored is **rejected** with its full path,\n\
         so nothing that changes routing, security or limits is ever silently dropped. `typed_config` of an\n\
         unknown type is rejected unless the filter has `is_optional: true`.\n\n\
         ## Supported\n\n| field | notes |\n|---|---|\n",
    );
    for (path, notes) in SUPPORTED {
        doc.push_str(&format!("| `{path}` | {notes} |\n"));
    }
    doc.push_str("\n## Ignored (safe to ignore)\n\n| field | why it is safe |\n|---|---|\n");
    for (path, why) in IGNORED {
        doc.push_str(&format!("| `{path}` | {why} |\n"));
    }
    doc
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ignore_patterns_match_any_index_and_depth() {
        assert!(ignorable("static_resources.listeners[3].filter_chains[0].filters[1].typed_config.stat_prefix"));
        assert!(ignorable("layered_runtime"));
        assert!(!ignorable("static_resources.clusters[0].circuit_breakers"));
        assert!(!ignorable("layered_runtime_x"));
    }

    #[test]
    fn the_document_in_the_repo_is_generated_from_these_tables() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/envoy-config.md");
        if std::env::var_os("UPDATE_GOLDEN").is_some() {
            std::fs::write(&path, document()).unwrap();
        }
        let on_disk = std::fs::read_to_string(&path).unwrap_or_default();
        assert_eq!(on_disk, document(), "docs/envoy-config.md is stale: run the tests with UPDATE_GOLDEN=1");
    }
}
