//! The HTTP conformance suite: every case file in `tests/conformance/` is served by the real Envoy and by weft
//! from the same bootstrap, and by weft with the same listeners, clusters and routes delivered over xDS (ADS
//! from a test management server); every request must get the same answer from all three (see
//! `weft_tests::conformance` for the file format). Prints one row per request and weft side, then fails if
//! any differs.
//!
//! `WEFT_CONFORMANCE_FILTER=substring` runs only the matching files; `WEFT_CONFORMANCE_ONLY=envoy` runs Envoy
//! alone (to check the cases' `expect`s while writing them), `=weft` Envoy and weft on the static
//! bootstrap, `=xds` Envoy and weft over xDS.

use std::time::Instant;

use weft_tests::{bin_path, conformance, envoy_path, require_root, workspace_root};

#[test]
fn http_routing_matches_envoy() {
    if let Err(why) = require_root() {
        eprintln!("SKIPPED http_routing_matches_envoy: {why}");
        return;
    }
    envoy_path().expect("envoy is required: run `cargo xtask setup`");
    let filter = std::env::var("WEFT_CONFORMANCE_FILTER").ok().filter(|f| !f.is_empty());
    let sides = match std::env::var("WEFT_CONFORMANCE_ONLY").unwrap_or_default().as_str() {
        "" => conformance::Sides { weft: true, xds: true },
        "envoy" => conformance::Sides { weft: false, xds: false },
        "weft" => conformance::Sides { weft: true, xds: false },
        "xds" => conformance::Sides { weft: false, xds: true },
        other => panic!("WEFT_CONFORMANCE_ONLY={other}: expected envoy, weft or xds"),
    };
    if sides.weft || sides.xds {
        bin_path("weft-agent").unwrap_or_else(|e| panic!("{e}"));
    }
    let started = Instant::now();
    let outcomes = conformance::run_suite(&workspace_root().join("tests/conformance"), filter.as_deref(), sides)
        .unwrap_or_else(|e| panic!("{e}"));
    println!("{}", conformance::table(&outcomes));
    println!("took {:.1}s", started.elapsed().as_secs_f64());
    let failed: Vec<String> =
        outcomes.iter().filter(|o| !o.passed()).map(|o| format!("{} / {} / {}", o.file, o.proxy, o.request)).collect();
    let shown = failed.iter().take(20).cloned().collect::<Vec<_>>().join(", ");
    let more = if failed.len() > 20 { format!(" and {} more (see the table)", failed.len() - 20) } else { String::new() };
    assert!(failed.is_empty(), "{} of {} requests failed: {shown}{more}", failed.len(), outcomes.len());
}
