//! `envoy.config.listener.v3.Listener` with its network filters (tcp_proxy, http_connection_manager).

use std::net::SocketAddr;

use super::route::{self, RouteConfiguration};
use super::tree::{ConfigError, Obj, Result};
use super::{expect_type, socket_address};

#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Listener {
    pub name: String,
    pub address: SocketAddr,
    pub filter: NetworkFilter,
}

/// The terminal network filter of the listener's filter chain.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum NetworkFilter {
    TcpProxy { cluster: String },
    HttpConnectionManager(Routes),
}

/// Where an HTTP connection manager's routes come from.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Routes {
    Inline(RouteConfiguration),
    /// A RouteConfiguration by name over ADS (RDS).
    Rds(String),
}

const TCP_PROXY: &str = "envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy";
const HCM: &str = "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager";
const ROUTER: &str = "envoy.extensions.filters.http.router.v3.Router";

pub fn translate(mut l: Obj<'_>) -> Result<Listener> {
    let name = l.required_string("name")?.to_string();
    let address = socket_address(l.required_object("address")?)?;
    let mut chains = l.objects("filter_chains")?;
    if chains.len() != 1 {
        return Err(ConfigError::new(l.at("filter_chains"), "weft supports exactly one filter chain per listener for now"));
    }
    let mut chain = chains.remove(0);
    let mut filters: Vec<Obj<'_>> = chain.objects("filters")?;
    // Optional filters of unknown types are skipped, as Envoy does; the terminal filter must be last.
    let mut terminal = None;
    let count = filters.len();
    for (i, mut f) in filters.drain(..).enumerate() {
        let filter_name = f.string("name")?.unwrap_or_default().to_string();
        let optional = f.bool("is_optional")?.unwrap_or(false);
        let mut typed = f.required_object("typed_config")?;
        let type_url = typed.required_string("@type")?;
        let type_name = type_url.rsplit('/').next().unwrap_or(type_url).to_string();
        let filter = match type_name.as_str() {
            TCP_PROXY => Some(tcp_proxy(typed)?),
            HCM => Some(http_connection_manager(typed)?),
            _ if optional => None,
            _ => {
                return Err(ConfigError::new(
                    f.at("typed_config"),
                    format!("filter {filter_name:?} of type {type_url} is not supported (mark it is_optional to skip it)"),
                ))
            }
        };
        f.finish()?;
        if let Some(filter) = filter {
            if i + 1 != count {
                return Err(ConfigError::new(f_path(&chain, i), "a terminal filter must be the last filter of the chain"));
            }
            terminal = Some(filter);
        }
    }
    let filter = terminal.ok_or_else(|| ConfigError::new(chain.at("filters"), "the filter chain has no terminal filter"))?;
    chain.finish()?;
    l.finish()?;
    Ok(Listener { name, address, filter })
}

fn f_path(chain: &Obj<'_>, i: usize) -> String {
    format!("{}[{i}]", chain.at("filters"))
}

fn tcp_proxy(mut t: Obj<'_>) -> Result<NetworkFilter> {
    let _ = t.string("stat_prefix")?;
    let cluster = t.required_string("cluster")?.to_string();
    t.finish()?;
    Ok(NetworkFilter::TcpProxy { cluster })
}

fn http_connection_manager(mut h: Obj<'_>) -> Result<NetworkFilter> {
    let _ = h.string("stat_prefix")?;
    match h.string("codec_type")?.unwrap_or("AUTO") {
        "AUTO" | "HTTP1" => {}
        other => return Err(ConfigError::new(h.at("codec_type"), format!("{other} is not supported yet; use AUTO or HTTP1"))),
    }
    let routes = match (h.object("route_config")?, h.object("rds")?) {
        (Some(rc), None) => Routes::Inline(route::translate(rc)?),
        (None, Some(mut rds)) => {
            let name = rds.required_string("route_config_name")?.to_string();
            let mut source = rds.required_object("config_source")?;
            match source.string("resource_api_version")? {
                None | Some("V3") => {}
                Some(other) => return Err(ConfigError::new(source.at("resource_api_version"), format!("{other} is not supported; only V3"))),
            }
            let ads = source.required_object("ads").map_err(|e| ConfigError::new(e.path, "is required: weft takes RDS over ADS only"))?;
            ads.finish()?;
            source.finish()?;
            rds.finish()?;
            Routes::Rds(name)
        }
        _ => return Err(ConfigError::new(h.path(), "needs exactly one of route_config or rds")),
    };
    let filters = h.objects("http_filters")?;
    let mut saw_router = false;
    for mut f in filters {
        let name = f.string("name")?.unwrap_or_default().to_string();
        let mut typed = f.required_object("typed_config")?;
        expect_type(&mut typed, ROUTER)
            .map_err(|e| ConfigError::new(e.path, format!("HTTP filter {name:?}: only the router filter is supported yet")))?;
        typed.finish()?;
        f.finish()?;
        saw_router = true;
    }
    if !saw_router {
        return Err(ConfigError::new(h.at("http_filters"), "needs the router filter (envoy.filters.http.router)"));
    }
    h.finish()?;
    Ok(NetworkFilter::HttpConnectionManager(routes))
}
