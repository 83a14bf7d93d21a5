//! What a browser, an API client or the sign-on proxy controls before it is known who they are:
//! Host, Origin and Cookie headers, bearer tokens, request paths, the proxy's roles file and the
//! admin socket's request line; and a deployer's rollout plan, resolved against a fleet. Each is
//! refused or understood; nothing panics.
#![no_main]

use axum::http::{HeaderMap, HeaderValue, Method, header};
use libfuzzer_sys::fuzz_target;
use outpost_cloud_sync::access::{RoleMap, cookie, describe, host_allowed, same_origin};
use outpost_cloud_sync::operators::admin::AdminRequest;
use outpost_cloud_sync::operators::parse_token;
use outpost_cloud_sync::rollout::PlanRequest;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let names = vec!["console.plant".to_string()];
    let _ = host_allowed(&text, &names);
    let _ = parse_token(&text);
    let _ = describe(&Method::POST, &text);
    let _ = RoleMap::parse(&text);
    let _ = serde_json::from_str::<AdminRequest>(&text);
    if let Ok(plan) = serde_json::from_str::<PlanRequest>(&text) {
        let fleet: Vec<(String, Vec<(String, String)>)> = (0..12)
            .map(|i| (format!("gw{i}"), vec![("site".to_string(), (i % 3).to_string())]))
            .collect();
        if let Ok((_, waves)) = plan.resolve("w", &fleet) {
            assert_eq!(waves.iter().map(|w| w.devices.len()).sum::<usize>(), fleet.len());
        }
    }
    if let Ok(v) = HeaderValue::from_bytes(data) {
        let mut h = HeaderMap::new();
        h.insert(header::ORIGIN, v.clone());
        h.insert(header::REFERER, v.clone());
        h.insert(header::COOKIE, v);
        let _ = same_origin(&h, "https", "127.0.0.1:8080");
        let _ = cookie(&h, "outpost_session");
    }
});
