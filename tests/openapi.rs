//! The committed OpenAPI document (docs/openapi.json) matches the routes the server serves.

use std::collections::BTreeSet;

use knots::server::ROUTES;
use knots::server::state::Limits;
use serde_json::Value;

use crate::server::{client, start};

fn documented() -> BTreeSet<(String, String)> {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/openapi.json");
    let doc: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let mut ops = BTreeSet::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        for method in item.as_object().unwrap().keys() {
            ops.insert((method.to_uppercase(), path.clone()));
        }
    }
    ops
}

#[test]
fn the_document_lists_exactly_the_served_routes() {
    let served: BTreeSet<(String, String)> = ROUTES
        .iter()
        .map(|(m, p)| (m.to_string(), p.replace("{*", "{")))
        .collect();
    assert_eq!(documented(), served);
}

#[tokio::test]
async fn every_documented_operation_is_routed() {
    let s = start(Limits::default()).await;
    for (method, path) in documented() {
        let url = format!(
            "{}{}",
            s.url,
            path.replace("{name}", "x").replace("{id}", "x")
        );
        let method = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
        let r = client()
            .request(method.clone(), &url)
            .bearer_auth("sk-operator")
            .json(&serde_json::json!({}))
            .send()
            .await
            .unwrap();
        let status = r.status();
        let body = r.text().await.unwrap();
        assert_ne!(status, 405, "{method} {path} is documented but not served");
        assert!(
            !body.contains("route not found"),
            "{method} {path} is documented but not served"
        );
    }
    s.stop().await.unwrap();
}
