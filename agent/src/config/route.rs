//! `envoy.config.route.v3.RouteConfiguration`: virtual hosts and routes of an HTTP connection manager.

use super::tree::{ConfigError, Obj, Result};

#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct RouteConfiguration {
    pub name: String,
    pub virtual_hosts: Vec<VirtualHost>,
}

#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct VirtualHost {
    pub name: String,
    pub domains: Vec<String>,
    pub routes: Vec<Route>,
}

#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Route {
    pub path: PathMatch,
    pub action: Action,
}

#[derive(Debug, Clone, PartialEq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PathMatch {
    Prefix(String),
    Path(String),
}

#[derive(Debug, Clone, PartialEq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    Cluster(String),
    DirectResponse { status: u16, body: Option<String> },
}

impl PathMatch {
    pub fn matches(&self, path: &str) -> bool {
        match self {
            PathMatch::Prefix(p) => path.starts_with(p.as_str()),
            PathMatch::Path(p) => path == p,
        }
    }
}

impl RouteConfiguration {
    /// The clusters its routes forward to.
    pub fn clusters(&self) -> impl Iterator<Item = &str> {
        self.virtual_hosts.iter().flat_map(|vh| &vh.routes).filter_map(|r| match &r.action {
            Action::Cluster(c) => Some(c.as_str()),
            Action::DirectResponse { .. } => None,
        })
    }

    /// The virtual host for `host` (without port), by Envoy's precedence: exact, then longest `*.suffix`,
    /// then longest `prefix.*`, then `*`.
    pub fn virtual_host(&self, host: &str) -> Option<&VirtualHost> {
        let host = host.to_ascii_lowercase();
        let matching = |test: &dyn Fn(&str) -> Option<usize>| {
            self.virtual_hosts
                .iter()
                .flat_map(|vh| vh.domains.iter().filter_map(move |d| test(d).map(|len| (len, vh))))
                .max_by_key(|(len, _)| *len)
                .map(|(_, vh)| vh)
        };
        matching(&|d| (*d == host).then_some(usize::MAX))
            .or_else(|| matching(&|d| d.strip_prefix('*').filter(|s| !s.is_empty() && host.ends_with(s) && host.len() > s.len()).map(str::len)))
            .or_else(|| matching(&|d| d.strip_suffix('*').filter(|p| !p.is_empty() && host.starts_with(p) && host.len() > p.len()).map(str::len)))
            .or_else(|| matching(&|d| (d == "*").then_some(0)))
    }
}

pub fn translate(mut rc: Obj<'_>) -> Result<RouteConfiguration> {
    let name = rc.string("name")?.unwrap_or_default().to_string();
    let mut virtual_hosts = Vec::new();
    let mut seen_domains = std::collections::HashSet::new();
    for mut vh in rc.objects("virtual_hosts")? {
        let vh_name = vh.required_string("name")?.to_string();
        let domains: Vec<String> = vh.strings("domains")?.into_iter().map(str::to_ascii_lowercase).collect();
        if domains.is_empty() {
            return Err(ConfigError::new(vh.at("domains"), "must have at least one domain"));
        }
        for d in &domains {
            if !seen_domains.insert(d.clone()) {
                return Err(ConfigError::new(
                    vh.at("domains"),
                    format!("Only unique values for domains are permitted. Duplicate entry of domain {d} in route {name}"),
                ));
            }
        }
        let routes = vh.objects("routes")?.into_iter().map(route).collect::<Result<Vec<_>>>()?;
        vh.finish()?;
        virtual_hosts.push(VirtualHost { name: vh_name, domains, routes });
    }
    rc.finish()?;
    Ok(RouteConfiguration { name, virtual_hosts })
}

fn route(mut r: Obj<'_>) -> Result<Route> {
    let _ = r.string("name")?;
    let mut m = r.required_object("match")?;
    let path = match (m.string("prefix")?, m.string("path")?) {
        (Some(p), None) => PathMatch::Prefix(p.to_string()),
        (None, Some(p)) => PathMatch::Path(p.to_string()),
        _ => return Err(ConfigError::new(m.path(), "needs exactly one of prefix or path (others are not supported yet)")),
    };
    m.finish()?;
    let action = match (r.object("route")?, r.object("direct_response")?) {
        (Some(mut to), None) => {
            let cluster = to.required_string("cluster")?.to_string();
            to.finish()?;
            Action::Cluster(cluster)
        }
        (None, Some(mut dr)) => {
            let status = dr.u64("status")?.unwrap_or(0);
            if !(200..600).contains(&status) {
                return Err(ConfigError::new(dr.at("status"), format!("{status} is not in [200, 600)")));
            }
            let body = match dr.object("body")? {
                Some(mut b) => {
                    let text = b.required_string("inline_string")?.to_string();
                    b.finish()?;
                    Some(text)
                }
                None => None,
            };
            dr.finish()?;
            Action::DirectResponse { status: status as u16, body }
        }
        _ => return Err(ConfigError::new(r.path(), "needs exactly one of route or direct_response (others are not supported yet)")),
    };
    r.finish()?;
    Ok(Route { path, action })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn rc(v: serde_json::Value) -> RouteConfiguration {
        translate(Obj::new(&v, "rc").unwrap()).unwrap()
    }

    #[test]
    fn virtual_host_precedence_is_envoys() {
        let config = rc(json!({"virtual_hosts": [
            {"name": "any", "domains": ["*"]},
            {"name": "suffix", "domains": ["*.example.com"]},
            {"name": "prefix", "domains": ["api.*"]},
            {"name": "exact", "domains": ["api.example.com"]},
        ]}));
        let pick = |h: &str| config.virtual_host(h).map(|vh| vh.name.as_str());
        assert_eq!(pick("api.example.com"), Some("exact"));
        assert_eq!(pick("www.example.com"), Some("suffix"));
        assert_eq!(pick("api.other"), Some("prefix"));
        assert_eq!(pick("elsewhere"), Some("any"));
    }

    #[test]
    fn route_errors_name_the_field() {
        let v = json!({"virtual_hosts": [{"name": "a", "domains": ["*"], "routes": [{"match": {"prefix": "/"}, "route": {"cluster": "c", "timeout": "1s"}}]}]});
        let err = translate(Obj::new(&v, "rc").unwrap()).unwrap_err();
        assert_eq!(err.path, "rc.virtual_hosts[0].routes[0].route.timeout");
    }
}
